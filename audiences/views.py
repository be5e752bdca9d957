"""The per-person views the rule language reads, refreshed from evidence.

``person_traits`` (+ ``person_trait_elements``) hold each person's current asserted traits
with typed columns; ``person_consent`` the resolved verdict per purpose. Both are pure
functions of the evidence of the person's identifiers, so refreshing a person is always
safe: :func:`refresh` rewrites the rows of the given persons (and drops those of persons
that no longer exist).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, and_, delete, or_, select
from sqlalchemy.orm import Session

from audiences.consent.store import ConsentStore, PersonConsent
from audiences.models import PersonConsentRow, PersonTraitElementRow, PersonTraitRow
from identity.events import traits as trait_rules
from identity.events.models import TraitEvidenceRow, TraitStateRow
from identity.models import IdentifierRow

_PT = cast(Table, PersonTraitRow.__table__)
_PTE = cast(Table, PersonTraitElementRow.__table__)
_PC = cast(Table, PersonConsentRow.__table__)
_CHUNK = 500


def timestamp_us(value: Any) -> int | None:
    """Microseconds of an RFC 3339 time (or a date: midnight UTC) given as a string; None if
    ``value`` is not one. A time without an offset is read as UTC."""
    if not isinstance(value, str) or not (10 <= len(value) <= 40) or not value[:4].isdigit() or value[4:5] != "-":
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp()) * 1_000_000 + parsed.microsecond


def typed_columns(value: Any) -> dict[str, Any]:
    """The typed columns of a trait value (see :class:`audiences.models.PersonTraitRow`)."""
    return {
        "text": value if isinstance(value, str) else None,
        "num": float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None,
        "flag": value if isinstance(value, bool) else None,
        "ts_us": timestamp_us(value),
    }


def element_columns(item: Any) -> dict[str, Any] | None:
    if isinstance(item, str):
        return {"text": item, "num": None}
    if isinstance(item, int | float) and not isinstance(item, bool):
        return {"text": None, "num": float(item)}
    return None


def asserted_traits(session: Session, person_pks: Sequence[int]) -> dict[int, dict[str, trait_rules.TraitValue]]:
    """Current asserted (not computed) traits of each person, folded from its identifiers."""
    idents = session.execute(select(IdentifierRow.id, IdentifierRow.person_pk)
                             .where(IdentifierRow.person_pk.in_(list(person_pks)))).all()
    person_of = {r.id: r.person_pk for r in idents}
    states: dict[int, dict[str, list[trait_rules.TraitState]]] = {}
    ids = sorted(person_of)
    for start in range(0, len(ids), _CHUNK):
        for row in session.execute(select(TraitStateRow).where(
                TraitStateRow.identifier_pk.in_(ids[start:start + _CHUNK]))).scalars():
            states.setdefault(person_of[row.identifier_pk], {}).setdefault(row.key, []).append(trait_rules.TraitState(
                row.lw_us, row.lw_event, bool(row.lw_unset), row.lw_value, row.lw_source, row.so_us, row.so_event,
                row.so_value, row.so_source))
    identifiers_of: dict[int, list[int]] = {}
    for pk, person in person_of.items():
        identifiers_of.setdefault(person, []).append(pk)
    result: dict[int, dict[str, trait_rules.TraitValue]] = {}
    for person, by_key in states.items():
        own = identifiers_of[person]

        def set_once_after(key: str, us: int, event_id: str, own: list[int] = own) -> trait_rules.Evidence | None:
            row = session.execute(select(TraitEvidenceRow).where(
                TraitEvidenceRow.identifier_pk.in_(own), TraitEvidenceRow.key == key,
                TraitEvidenceRow.op == trait_rules.SET_ONCE,
                or_(TraitEvidenceRow.occurred_us > us,
                    and_(TraitEvidenceRow.occurred_us == us, TraitEvidenceRow.event_id > event_id)))
                .order_by(TraitEvidenceRow.occurred_us, TraitEvidenceRow.event_id).limit(1)).scalar()
            if row is None:
                return None
            return trait_rules.Evidence(row.op, key, row.value, row.occurred_us, row.event_id, row.source)

        values = {key: v for key, s in by_key.items() if (v := trait_rules.fold(key, s, set_once_after)) is not None}
        if values:
            result[person] = values
    return result


def refresh(session: Session, person_pks: Sequence[int], consent: ConsentStore) -> dict[int, PersonConsent]:
    """Rewrite the views of ``person_pks``; return the resolved consent of those that exist."""
    resolved: dict[int, PersonConsent] = {}
    wanted = sorted(set(person_pks))
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start:start + _CHUNK]
        session.execute(delete(_PT).where(_PT.c.person_pk.in_(chunk)))
        session.execute(delete(_PTE).where(_PTE.c.person_pk.in_(chunk)))
        session.execute(delete(_PC).where(_PC.c.person_pk.in_(chunk)))
        traits = asserted_traits(session, chunk)
        rows, elements = [], []
        for person, values in traits.items():
            for key, trait in values.items():
                rows.append({"person_pk": person, "key": key, "value": trait.value, **typed_columns(trait.value)})
                if isinstance(trait.value, list):
                    elements += [{"person_pk": person, "key": key, **columns} for item in trait.value
                                 if (columns := element_columns(item)) is not None]
        if rows:
            session.execute(_PT.insert(), rows)
        if elements:
            session.execute(_PTE.insert(), elements)
        plain = {person: {k: t.value for k, t in values.items()} for person, values in traits.items()}
        found = consent.resolve_persons(session, chunk, plain)
        consent_rows = [{"person_pk": person, "purpose": v.purpose, "granted": v.granted,
                         "resolved_by": v.resolved_by} for person, state in found.items() for v in state.verdicts]
        if consent_rows:
            session.execute(_PC.insert(), consent_rows)
        resolved.update(found)
    return resolved
