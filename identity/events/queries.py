"""Reads over the event ledger: a person's events and traits, one event, parked events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session

from identity.events import traits as trait_rules
from identity.events.computed import Total, computed_traits
from identity.events.models import EventRow, EventTotalRow, ParkedEventRow, TraitEvidenceRow, TraitStateRow
from identity.events.traits import TraitValue
from identity.models import IdentifierRow, PersonRow

_CHUNK = 400


def person_identifier_pks(session: Session, person_pk: int) -> list[int]:
    return list(session.execute(select(IdentifierRow.id).where(IdentifierRow.person_pk == person_pk)).scalars())


def person_traits(session: Session, person_pk: int) -> list[TraitValue]:
    """Every current trait of a person (asserted and computed), ordered by key."""
    pks = person_identifier_pks(session, person_pk)
    by_key: dict[str, list[trait_rules.TraitState]] = {}
    totals: list[Total] = []
    for start in range(0, len(pks), _CHUNK):
        chunk = pks[start:start + _CHUNK]
        for row in session.execute(select(TraitStateRow).where(TraitStateRow.identifier_pk.in_(chunk))).scalars():
            by_key.setdefault(row.key, []).append(trait_rules.TraitState(
                row.lw_us, row.lw_event, bool(row.lw_unset), row.lw_value, row.lw_source, row.so_us, row.so_event,
                row.so_value, row.so_source))
        totals += [Total(r.event, r.currency, r.count, r.value_micros, r.first_us, r.last_us) for r in session.execute(
            select(EventTotalRow).where(EventTotalRow.identifier_pk.in_(chunk))).scalars()]

    def set_once_after(key: str, us: int, event_id: str) -> trait_rules.Evidence | None:
        best: Any = None
        for start in range(0, len(pks), _CHUNK):
            row = session.execute(
                select(TraitEvidenceRow).where(
                    TraitEvidenceRow.identifier_pk.in_(pks[start:start + _CHUNK]), TraitEvidenceRow.key == key,
                    TraitEvidenceRow.op == trait_rules.SET_ONCE,
                    or_(TraitEvidenceRow.occurred_us > us,
                        and_(TraitEvidenceRow.occurred_us == us, TraitEvidenceRow.event_id > event_id)))
                .order_by(TraitEvidenceRow.occurred_us, TraitEvidenceRow.event_id).limit(1)).scalar()
            if row is not None and (best is None or (row.occurred_us, row.event_id) < (best.occurred_us,
                                                                                        best.event_id)):
                best = row
        if best is None:
            return None
        return trait_rules.Evidence(best.op, key, best.value, best.occurred_us, best.event_id, best.source)

    values = [v for key, states in by_key.items()
              if (v := trait_rules.fold(key, states, set_once_after)) is not None]
    values += computed_traits(totals)
    return sorted(values, key=lambda v: (v.key, v.kind))


def person_events(session: Session, person_pk: int, *, limit: int, after: tuple[int, str] | None,
                  conditions: Sequence[ColumnElement[bool]] = ()) -> list[EventRow]:
    """A person's stored events (not identity-only messages), newest first by
    (occurred_at, event_id), starting after the cursor ``after``."""
    pks = person_identifier_pks(session, person_pk)
    if not pks:
        return []
    query = select(EventRow).where(EventRow.identifier_pk.in_(pks), EventRow.identity_only.is_(False), *conditions)
    if after is not None:
        us, event_id = after
        query = query.where(or_(EventRow.occurred_us < us, and_(EventRow.occurred_us == us,
                                                                EventRow.event_id < event_id)))
    query = query.order_by(EventRow.occurred_us.desc(), EventRow.event_id.desc()).limit(limit)
    return list(session.execute(query).scalars())


def event_with_person(session: Session, event_id: str) -> tuple[EventRow, str] | None:
    """A stored event and the ID of the person it resolves to now ("" if none)."""
    row = session.execute(
        select(EventRow, PersonRow.person_id)
        .outerjoin(IdentifierRow, IdentifierRow.id == EventRow.identifier_pk)
        .outerjoin(PersonRow, PersonRow.id == IdentifierRow.person_pk)
        .where(EventRow.event_id == event_id, EventRow.identity_only.is_(False))).first()
    if row is None:
        return None
    return row[0], row[1] or ""


def person_ids_of(session: Session, identifier_pks: Sequence[int]) -> dict[int, str]:
    """Person ID of each identifier pk."""
    found: dict[int, str] = {}
    ids = sorted(set(identifier_pks))
    for start in range(0, len(ids), _CHUNK):
        found.update((r[0], r[1]) for r in session.execute(
            select(IdentifierRow.id, PersonRow.person_id).join(PersonRow, PersonRow.id == IdentifierRow.person_pk)
            .where(IdentifierRow.id.in_(ids[start:start + _CHUNK]))).all())
    return found


def parked_events(session: Session, *, limit: int, after: int | None,
                  conditions: Sequence[ColumnElement[bool]] = ()) -> list[ParkedEventRow]:
    query = select(ParkedEventRow).where(*conditions)
    if after is not None:
        query = query.where(ParkedEventRow.id < after)
    return list(session.execute(query.order_by(ParkedEventRow.id.desc()).limit(limit)).scalars())
