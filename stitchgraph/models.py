"""Every table of the store, gathered so Alembic and tests see one metadata.

Each package owns its models (``identity/models.py``, ``audiences/models.py``);
this module only imports them.
"""

from __future__ import annotations

import audiences.destinations
import audiences.models
import audiences.outbox  # noqa: F401  (delivery outbox and log)
import identity.events.models
import identity.models  # noqa: F401  (registers the identity tables)
from stitchgraph import changes, idempotency  # noqa: F401  (registers their tables)
from stitchgraph.db import Base

metadata = Base.metadata

__all__ = ["metadata"]
