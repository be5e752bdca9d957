"""Stitchgraph: identity resolution and consent-aware audiences as a gRPC service.

This package holds what every layer shares: the domain exception tree
(:mod:`stitchgraph.errors`), the database plumbing (:mod:`stitchgraph.db`),
request idempotency (:mod:`stitchgraph.idempotency`), the Alembic migrations and,
generated at install time from ``protos/``, the public API stubs in
``stitchgraph.v1``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stitchgraph")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

API_VERSION = "v1"

__all__ = ["API_VERSION", "__version__"]
