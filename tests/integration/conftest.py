"""Fixtures for domain-level integration tests."""

from __future__ import annotations

import pytest

from identity.operations import IdentityOperations
from stitchgraph.db import Database


@pytest.fixture
def ops(db: Database) -> IdentityOperations:
    """The identity operations over the store under test, with the default policy."""
    return IdentityOperations(db)
