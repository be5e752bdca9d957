"""Consent evidence in the store: recording decisions (explicit calls and event signals),
reading them back per person, and resolving a person's consent with the written policy
(:mod:`audiences.consent.policy`).

Decisions are attached to identifiers, never to persons, so they follow identifiers
through merges and splits; a person's consent is always the fold of its identifiers'
decisions, recomputed whenever the change journal names the person.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, delete, select
from sqlalchemy.orm import Session

from audiences.consent.policy import Decision, Verdict, resolve
from audiences.consent.settings import ConsentSettings
from audiences.consent.signals import interpret
from audiences.models import ConsentDecisionRow, ConsentJurisdictionRow, PersonTraitRow
from identity.events.capture import EventSignals
from identity.models import IdentifierRow
from stitchgraph import changes
from stitchgraph.changes import mark_persons

_DECISIONS = cast(Table, ConsentDecisionRow.__table__)
_JURISDICTIONS = cast(Table, ConsentJurisdictionRow.__table__)
_CHUNK = 500

#: Trait keys read as the person's country when nothing better is known.
COUNTRY_TRAITS = ("country", "country_code", "$geoip_country_code")


def new_decision_id() -> str:
    return "cd_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True, slots=True)
class PersonConsent:
    """A person's resolved consent."""

    jurisdiction: str
    jurisdiction_source: str
    verdicts: tuple[Verdict, ...]

    def verdict(self, purpose: str) -> Verdict | None:
        return next((v for v in self.verdicts if v.purpose == purpose), None)


def decision_rows(identifier_pk: int, signals: Mapping[str, Any], settings: ConsentSettings, *, occurred_us: int,
                  source: str, jurisdiction: str, event_id: str = "", request_id: str = "",
                  now: datetime) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """Rows for the decisions ``signals`` imply (and interpretation warnings)."""
    interpretation = interpret(signals, settings)
    rows = [{
        "decision_id": new_decision_id(), "identifier_pk": identifier_pk, "purpose": d.purpose, "granted": d.granted,
        "occurred_us": occurred_us, "origin": d.origin, "source": source or d.origin.lower(),
        "jurisdiction": jurisdiction, "opt_out": d.opt_out, "event_id": event_id, "request_id": request_id,
        "detail": d.detail[:512], "recorded_at": now,
    } for d in interpretation.decisions]
    return rows, interpretation.warnings


def insert_decisions(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        session.execute(_DECISIONS.insert(), list(rows))


class ConsentStore:
    """Consent reads and writes over one settings object."""

    def __init__(self, settings: ConsentSettings) -> None:
        self.settings = settings

    # -- writes ---------------------------------------------------------------------------

    def record_event_signals(self, session: Session, events: list[EventSignals]) -> None:
        """Capture hook: decisions from the events' consent signals, and their jurisdiction."""
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        latest: dict[int, EventSignals] = {}
        for e in events:
            if e.consent:
                rows += decision_rows(e.identifier_pk, e.consent, self.settings, occurred_us=e.occurred_us,
                                      source="", jurisdiction=e.jurisdiction, event_id=e.event_id, now=now)[0]
            if e.jurisdiction:
                best = latest.get(e.identifier_pk)
                if best is None or (e.occurred_us, e.event_id) > (best.occurred_us, best.event_id):
                    latest[e.identifier_pk] = e
        insert_decisions(session, rows)
        if latest:
            stored = {r.identifier_pk: r for r in session.execute(
                select(_JURISDICTIONS).where(_JURISDICTIONS.c.identifier_pk.in_(list(latest)))).all()}
            for pk, e in latest.items():
                row = stored.get(pk)
                values = {"jurisdiction": e.jurisdiction, "occurred_us": e.occurred_us, "event_id": e.event_id}
                if row is None:
                    session.execute(_JURISDICTIONS.insert().values(identifier_pk=pk, **values))
                elif (e.occurred_us, e.event_id) > (row.occurred_us, row.event_id):
                    session.execute(_JURISDICTIONS.update().where(_JURISDICTIONS.c.identifier_pk == pk)
                                    .values(**values))
        # The persons are already journalled by the identity graph (every captured
        # identifier's person is); mark CONSENT so membership changes say why.
        if rows:
            pks = {r["identifier_pk"] for r in rows}
            mark_persons(session, session.execute(select(IdentifierRow.person_pk).where(
                IdentifierRow.id.in_(sorted(pks)))).scalars(), changes.CONSENT)

    @staticmethod
    def erase(session: Session, identifier_pks: Sequence[int]) -> None:
        """Erase hook: an erased identifier's consent evidence goes with it."""
        chunk = list(identifier_pks)
        session.execute(delete(_DECISIONS).where(_DECISIONS.c.identifier_pk.in_(chunk)))
        session.execute(delete(_JURISDICTIONS).where(_JURISDICTIONS.c.identifier_pk.in_(chunk)))

    # -- reads ----------------------------------------------------------------------------

    def resolve_persons(self, session: Session, person_pks: Iterable[int],
                        traits: Mapping[int, Mapping[str, Any]] | None = None) -> dict[int, PersonConsent]:
        """The resolved consent of each (existing) person in ``person_pks``. ``traits``
        (person → key → value) saves reading country traits again when the caller has them."""
        wanted = sorted(set(person_pks))
        result: dict[int, PersonConsent] = {}
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start:start + _CHUNK]
            idents = session.execute(select(IdentifierRow.id, IdentifierRow.person_pk, IdentifierRow.type,
                                            IdentifierRow.value).where(IdentifierRow.person_pk.in_(chunk))).all()
            label = {r.id: f"{r.type}:{r.value}" for r in idents}
            person_of = {r.id: r.person_pk for r in idents}
            decisions: dict[int, list[Decision]] = {}
            jurisdictions: dict[int, tuple[int, str, str]] = {}
            ids = sorted(label)
            for s in range(0, len(ids), _CHUNK):
                part = ids[s:s + _CHUNK]
                for row in session.execute(select(ConsentDecisionRow).where(
                        ConsentDecisionRow.identifier_pk.in_(part))).scalars():
                    decisions.setdefault(person_of[row.identifier_pk], []).append(decision_of(row, label))
                for j in session.execute(select(_JURISDICTIONS).where(_JURISDICTIONS.c.identifier_pk.in_(part))):
                    person = person_of[j.identifier_pk]
                    if (j.occurred_us, j.event_id) > jurisdictions.get(person, (-1, "", ""))[:2]:
                        jurisdictions[person] = (j.occurred_us, j.event_id, j.jurisdiction)
            country_traits = traits if traits is not None else _country_traits(session, chunk)
            for person in sorted(set(person_of.values())):
                own = decisions.get(person, [])
                jurisdiction, source = _jurisdiction(own, jurisdictions.get(person), country_traits.get(person, {}))
                result[person] = PersonConsent(jurisdiction, source, resolve(own, jurisdiction, self.settings))
        return result

    def person_decisions(self, session: Session, person_pk: int) -> list[Decision]:
        idents = session.execute(select(IdentifierRow.id, IdentifierRow.type, IdentifierRow.value)
                                 .where(IdentifierRow.person_pk == person_pk)).all()
        label = {r.id: f"{r.type}:{r.value}" for r in idents}
        found: list[Decision] = []
        ids = sorted(label)
        for start in range(0, len(ids), _CHUNK):
            found += [decision_of(row, label) for row in session.execute(select(ConsentDecisionRow).where(
                ConsentDecisionRow.identifier_pk.in_(ids[start:start + _CHUNK]))).scalars()]
        return found


def decision_of(row: ConsentDecisionRow, label: Mapping[int, str]) -> Decision:
    return Decision(decision_id=row.decision_id, purpose=row.purpose, granted=row.granted,
                    occurred_us=row.occurred_us, origin=row.origin, source=row.source,
                    jurisdiction=row.jurisdiction, event_id=row.event_id,
                    identifier=label.get(row.identifier_pk, ""), opt_out=row.opt_out)


def _country_traits(session: Session, person_pks: Sequence[int]) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = {}
    for row in session.execute(select(PersonTraitRow.person_pk, PersonTraitRow.key, PersonTraitRow.value).where(
            PersonTraitRow.person_pk.in_(list(person_pks)), PersonTraitRow.key.in_(COUNTRY_TRAITS))):
        found.setdefault(row.person_pk, {})[row.key] = row.value
    return found


def _jurisdiction(decisions: Sequence[Decision], from_events: tuple[int, str, str] | None,
                  traits: Mapping[str, Any]) -> tuple[str, str]:
    """The person's jurisdiction and where it came from: the latest decision that names
    one, else the latest event location, else a country trait."""
    named = [d for d in decisions if d.jurisdiction]
    if named:
        latest = max(named, key=lambda d: (d.occurred_us, d.decision_id))
        return latest.jurisdiction, "decision"
    if from_events is not None:
        return from_events[2], "event_context"
    for key in COUNTRY_TRAITS:
        value = traits.get(key)
        if isinstance(value, str) and len(value.strip()) == 2 and value.strip().isalpha():
            return value.strip().upper(), f"trait:{key}"
    return "", ""
