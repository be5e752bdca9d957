"""Helpers for identity tests at the domain level: identifiers as (type, value) pairs,
evidence at minutes after a fixed instant, and the persons a store holds."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from identity.graph_store import RebuildStats
from identity.identifiers import Identifier
from identity.operations import IdentityOperations, RawSighting
from identity.queries import person_pk_by_identifier, person_view
from identity.views import IdentifyOutcome, PersonView
from stitchgraph.db import Database

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
Ident = tuple[str, str]


def at(minutes: float) -> datetime:
    """The instant ``minutes`` after the tests' fixed origin."""
    return T0 + timedelta(minutes=minutes)


def U(v: str) -> Ident:
    return ("user_id", v)


def A(v: str) -> Ident:
    return ("anonymous_id", v)


def identify(ops: IdentityOperations, db: Database, identifiers: Sequence[Ident], minutes: float,
             **kw: str) -> IdentifyOutcome:
    """Submit identifiers seen together at ``at(minutes)``, in a transaction of their own."""
    with db.transaction() as session:
        return ops.identify(session, RawSighting(list(identifiers), at(minutes), **kw))


def person_of(db: Database, identifier: Ident) -> PersonView | None:
    """The person holding ``identifier``, or ``None``."""
    with db.read() as session:
        pk = person_pk_by_identifier(session, Identifier(*identifier))
        return None if pk is None else person_view(session, pk)


def held(person: PersonView | None) -> set[Ident]:
    """The (type, value) pairs a person holds."""
    assert person is not None
    return {(i.type, i.value) for i in person.identifiers}


def rebuild(ops: IdentityOperations, db: Database) -> RebuildStats:
    """Re-resolve the whole store from its evidence, in a transaction of its own."""
    with db.transaction() as session:
        return ops.rebuild(session)
