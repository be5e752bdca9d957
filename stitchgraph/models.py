"""Every table of the store, gathered so Alembic and tests see one metadata.

Each package owns its models (``identity/models.py``, ``audiences/models.py``);
this module only imports them.
"""

from __future__ import annotations

import audiences.cohorts.models
import audiences.destinations
import audiences.models
import audiences.outbox
import audiences.writeback  # noqa: F401  (trait write-back state)
import identity.events.models
import identity.models  # noqa: F401  (registers the identity tables)
import stitchgraph.scheduler  # noqa: F401  (job store, job runs, scheduler lease)
from stitchgraph import changes, idempotency  # noqa: F401  (registers their tables)
from stitchgraph.db import Base

metadata = Base.metadata

__all__ = ["metadata"]
