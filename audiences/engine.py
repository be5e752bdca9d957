"""The audience engine: materialised membership per audience and destination, kept current
incrementally and by full and window-expiry passes, with every change recorded as a delta.

Flow (DESIGN §7):

* every write journals the persons it touched (:mod:`stitchgraph.changes`);
* :meth:`AudienceEngine.process_changes` (run right after each write commits, and on a
  timer) claims the journal, refreshes those persons' views (traits, consent), and
  re-evaluates every active audience for just those persons with the audience's compiled
  rule;
* :meth:`AudienceEngine.evaluate` runs the same compiled rule over the whole population
  (first build, rule change, ``EvaluateAudience``);
* :meth:`AudienceEngine.expire_windows` re-evaluates the persons whose time-relative facts
  crossed a window boundary since the last pass (someone stops being "purchased within 7
  days" without any new event).

All three end in :meth:`AudienceEngine._apply`, which diffs the new membership against the
stored one and writes only the difference: member rows, per-destination member rows
(rule ∧ consent ∧ a usable match key) and one delta per destination change, with a reason.
Everything happens under one advisory lock so concurrent processes agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from prometheus_client import Counter, Histogram
from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.orm import Session

from audiences.consent.store import ConsentStore, PersonConsent
from audiences.destinations import KINDS, DestinationRow, effective_purposes, limited_data_use_enabled
from audiences.models import (
    AudienceDeltaRow,
    AudienceDestinationMemberRow,
    AudienceDestinationRow,
    AudienceMemberRow,
    AudienceRow,
    PersonConsentRow,
)
from audiences.outbox import cancel_person_deliveries, enqueue_deltas, keys_of_persons, merge_keys
from audiences.rules import RuleAnalysis, RuleCatalog, analyze
from audiences.rules.compiler import CompiledRule, PersonSet, Scope, evaluate_set
from audiences.views import refresh
from identity.models import IdentifierRow, PersonRow
from stitchgraph import changes
from stitchgraph.changes import PersonChangeRow
from stitchgraph.db import Database

logger = logging.getLogger("stitchgraph.audiences")

AUDIENCE_LOCK = "stitchgraph.audiences"
ACTIVE, BUILDING, PAUSED = "ACTIVE", "BUILDING", "PAUSED"
ADD, REMOVE = "ADD", "REMOVE"
#: Opt-outs (not mere defaults) of sale/sharing exclude advertising destinations.
OPT_OUT_RESOLUTIONS = ("EXPLICIT", "GPC", "OPT_OUT_SIGNAL")
SALE_OR_SHARING = "sale_or_sharing"
#: Journal rows claimed per processing transaction.
CLAIM_BATCH = 5000
#: Above this many members, per-destination gates are computed over the population.
_SCOPED_GATE_LIMIT = 20_000

DELTAS = Counter("stitchgraph_audience_deltas_total", "Audience membership changes recorded, by kind and reason",
                 ["kind", "reason"])
EVALUATION_SECONDS = Histogram("stitchgraph_audience_evaluation_seconds", "Audience evaluation time, by mode",
                               ["mode"])


def _us(moment: datetime) -> int:
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


@dataclass
class Evaluation:
    """What one evaluation of one audience changed."""

    member_count: int = 0
    added: int = 0
    removed: int = 0
    deltas: int = 0
    evaluated_us: int = 0


@dataclass(frozen=True)
class DestinationGate:
    """What a destination needs from a member: consent purposes and a match key."""

    pk: int
    destination_id: str
    purposes: tuple[str, ...]
    advertising: bool
    limited_data_use: bool
    match_key_types: tuple[str, ...]

    @staticmethod
    def of(row: DestinationRow, configured: Sequence[str]) -> DestinationGate:
        spec = KINDS.get(row.kind)
        return DestinationGate(
            pk=row.id, destination_id=row.destination_id,
            purposes=tuple(p for p in effective_purposes(row) if p in configured),
            advertising=bool(spec and spec.advertising), limited_data_use=limited_data_use_enabled(row),
            match_key_types=spec.match_key_types if spec else ())

    def consent_set(self, scope: Scope) -> PersonSet:
        """Persons whose consent allows this destination (as one set query)."""
        pc = cast(Table, PersonConsentRow.__table__)
        scoped = [scope(pc.c.person_pk)] if scope is not None else []
        query: Any = None
        if self.purposes:
            query = (select(pc.c.person_pk).where(pc.c.purpose.in_(self.purposes), pc.c.granted.is_(True), *scoped)
                     .group_by(pc.c.person_pk).having(func.count() == len(self.purposes)))
        opted_out = None
        if self.advertising and not self.limited_data_use:
            opted_out = select(pc.c.person_pk).where(pc.c.purpose == SALE_OR_SHARING, pc.c.granted.is_(False),
                                                     pc.c.resolved_by.in_(OPT_OUT_RESOLUTIONS), *scoped)
        if query is None:
            return PersonSet(False, opted_out)
        if opted_out is None:
            return PersonSet(True, query)
        sub = query.except_(opted_out).subquery()
        return PersonSet(True, select(sub.c.person_pk))

    def key_set(self, scope: Scope) -> PersonSet:
        ids = cast(Table, IdentifierRow.__table__)
        return PersonSet(True, select(ids.c.person_pk.label("person_pk")).where(
            ids.c.type.in_(self.match_key_types), *([scope(ids.c.person_pk)] if scope is not None else [])).distinct())


@dataclass
class AudienceSettings:
    """``[audiences]`` configuration."""

    #: Process the change journal right after each write (so membership is current when the
    #: call returns); off, it is processed by the background timer only.
    evaluate_inline: bool = True
    #: Seconds between background passes over the change journal (0 = off).
    process_interval_seconds: float = 5.0
    #: Seconds between window-expiry passes (0 = off).
    window_interval_seconds: float = 300.0


@dataclass
class _Claimed:
    reasons: dict[int, set[str]] = field(default_factory=dict)
    event_ids: dict[int, str] = field(default_factory=dict)


class AudienceEngine:
    """Audience evaluation over one database."""

    def __init__(self, db: Database, consent: ConsentStore, catalog: Callable[[Session], RuleCatalog],
                 settings: AudienceSettings | None = None, clock: Callable[[], datetime] | None = None) -> None:
        self.db = db
        self.consent = consent
        self.catalog = catalog
        self.settings = settings or AudienceSettings()
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self._compiled: dict[tuple[int, str], CompiledRule] = {}
        #: Called with the persons whose views and memberships were just brought up to date, in
        #: the same transaction (trait write-back queues what changed).
        self.person_hooks: list[Callable[[Session, Sequence[int]], object]] = []

    def now_us(self) -> int:
        return _us(self.clock())

    # -- rules ---------------------------------------------------------------------------

    def analyze(self, session: Session, text: str) -> RuleAnalysis:
        return analyze(text, self.catalog(session))

    def compiled(self, session: Session, audience: AudienceRow) -> CompiledRule:
        """The compiled rule of ``audience`` (compiled once per rule text)."""
        key = (audience.id, audience.rule)
        rule = self._compiled.get(key)
        if rule is None:
            analysis = self.analyze(session, audience.rule)
            if analysis.rule is None:
                raise ValueError(f"the stored rule of audience {audience.audience_id} no longer compiles: "
                                 + "; ".join(d.message for d in analysis.errors))
            rule = CompiledRule(analysis.rule, self.db.dialect)
            self._compiled = {k: v for k, v in self._compiled.items() if k[0] != audience.id}
            self._compiled[key] = rule
        return rule

    def compile_text(self, session: Session, text: str) -> tuple[CompiledRule | None, RuleAnalysis]:
        analysis = self.analyze(session, text)
        return (CompiledRule(analysis.rule, self.db.dialect) if analysis.rule is not None else None), analysis

    def configured_purposes(self) -> tuple[str, ...]:
        return tuple(self.consent.settings.purposes)

    def gates(self, session: Session, audience_pk: int) -> list[DestinationGate]:
        rows = session.execute(
            select(DestinationRow)
            .join(AudienceDestinationRow, AudienceDestinationRow.destination_pk == DestinationRow.id)
            .where(AudienceDestinationRow.audience_pk == audience_pk).order_by(AudienceDestinationRow.position)
        ).scalars()
        return [DestinationGate.of(row, self.configured_purposes()) for row in rows]

    # -- the change journal --------------------------------------------------------------

    def process_changes(self) -> int:
        """Drain the change journal: refresh the touched persons' views and re-evaluate every
        active audience for them. Returns the number of persons processed."""
        total = 0
        while True:
            with self.db.transaction() as session:
                self.db.advisory_lock(session, AUDIENCE_LOCK)
                claimed = self._claim(session)
                if not claimed.reasons:
                    return total
                self._process(session, claimed)
                total += len(claimed.reasons)

    def _claim(self, session: Session) -> _Claimed:
        table = cast(Table, PersonChangeRow.__table__)
        rows = session.execute(select(table.c.person_pk, table.c.reason, table.c.event_id)
                               .order_by(table.c.person_pk).limit(CLAIM_BATCH)).all()
        claimed = _Claimed()
        for row in rows:
            claimed.reasons.setdefault(row.person_pk, set()).add(row.reason)
            if row.event_id:
                claimed.event_ids[row.person_pk] = row.event_id
        if rows:
            last = rows[-1].person_pk
            if len(rows) == CLAIM_BATCH:  # keep a person's rows together
                claimed.reasons.pop(last, None)
                session.execute(delete(table).where(table.c.person_pk < last))
            else:
                session.execute(delete(table).where(table.c.person_pk <= last))
        return claimed

    def _process(self, session: Session, claimed: _Claimed) -> None:
        persons = sorted(claimed.reasons)
        refresh(session, persons, self.consent)
        now_us = self.now_us()
        for audience in self._active(session):
            with EVALUATION_SECONDS.labels("incremental").time():
                self._apply(session, audience, now_us, persons, claimed.reasons, claimed.event_ids, mode="incremental")
        for hook in self.person_hooks:
            hook(session, persons)

    @staticmethod
    def _active(session: Session) -> list[AudienceRow]:
        return list(session.execute(select(AudienceRow).where(AudienceRow.state == ACTIVE)
                                    .order_by(AudienceRow.id)).scalars())

    # -- full and window passes ----------------------------------------------------------

    def evaluate(self, audience_id: str, *, reason: str = "") -> Evaluation:
        """Evaluate one audience over the whole population (after draining the journal)."""
        self.process_changes()
        with self.db.transaction() as session:
            audience = session.execute(select(AudienceRow).where(AudienceRow.audience_id == audience_id)).scalar_one()
            return self.evaluate_in(session, audience, reason=reason)

    def evaluate_in(self, session: Session, audience: AudienceRow, *, reason: str = "",
                    add_reason: str = "") -> Evaluation:
        """Full evaluation of ``audience`` in the caller's transaction (a BUILDING audience
        becomes ACTIVE). ``reason``/``add_reason`` override the reasons of the deltas."""
        self.db.advisory_lock(session, AUDIENCE_LOCK)
        with EVALUATION_SECONDS.labels("full").time():
            result = self._apply(session, audience, self.now_us(), None, {}, {}, mode="full",
                                 removal_reason=reason, add_reason=add_reason)
        if audience.state == BUILDING:
            audience.state = ACTIVE
            session.execute(update(AudienceRow).where(AudienceRow.id == audience.id).values(state=ACTIVE))
        return result

    def expire_windows(self) -> dict[str, Evaluation]:
        """The scheduled pass: re-evaluate, in every active audience with time windows, the
        persons whose facts crossed a window boundary since the previous pass."""
        self.process_changes()
        results: dict[str, Evaluation] = {}
        with self.db.transaction() as session:
            self.db.advisory_lock(session, AUDIENCE_LOCK)
            now_us = self.now_us()
            for audience in self._active(session):
                rule = self.compiled(session, audience)
                if not rule.time_dependent:
                    continue
                since = audience.windows_us or audience.evaluated_us
                if since is None:
                    results[audience.audience_id] = self._apply(session, audience, now_us, None, {}, {}, mode="window")
                    continue
                boundary = rule.boundary_query(since, now_us)
                persons: list[int] = sorted(set(session.execute(boundary).scalars())) if boundary is not None else []
                with EVALUATION_SECONDS.labels("window").time():
                    results[audience.audience_id] = self._apply(session, audience, now_us, persons, {}, {},
                                                                mode="window")
                audience.windows_us = now_us
        return results

    # -- the diff ------------------------------------------------------------------------

    def matching(self, session: Session, audience: AudienceRow, now_us: int,
                 persons: Sequence[int] | None) -> set[int]:
        return self.compiled(session, audience).evaluate(session, now_us, persons)

    def eligible(self, session: Session, gate: DestinationGate, members: set[int]) -> set[int]:
        """Members that ``gate`` accepts (consent and match keys)."""
        if not members:
            return set()
        scope = None if len(members) > _SCOPED_GATE_LIMIT else sorted(members)
        allowed = evaluate_set(session, gate.consent_set, scope)
        keyed = evaluate_set(session, gate.key_set, scope)
        return members & allowed & keyed

    def _apply(self, session: Session, audience: AudienceRow, now_us: int, persons: Sequence[int] | None,
               reasons: Mapping[int, set[str]], event_ids: Mapping[int, str], *, mode: str,
               removal_reason: str = "", add_reason: str = "") -> Evaluation:
        """Evaluate ``audience`` for ``persons`` (None = everyone) and write the difference."""
        members_t = cast(Table, AudienceMemberRow.__table__)
        dest_t = cast(Table, AudienceDestinationMemberRow.__table__)
        new = self.matching(session, audience, now_us, persons)
        old: dict[int, str] = {}
        old_dest: dict[int, set[int]] = {}
        old_keys: dict[tuple[int, int], list[list[Any]]] = {}
        old_query = select(members_t.c.person_pk, members_t.c.person_id).where(members_t.c.audience_pk == audience.id)
        old_dest_query = select(dest_t.c.destination_pk, dest_t.c.person_pk, dest_t.c["keys"]).where(
            dest_t.c.audience_pk == audience.id)
        for chunk in [None] if persons is None else _chunks(sorted(set(persons))):
            condition = [] if chunk is None else [members_t.c.person_pk.in_(chunk)]
            old.update((r.person_pk, r.person_id) for r in session.execute(old_query.where(*condition)))
            condition = [] if chunk is None else [dest_t.c.person_pk.in_(chunk)]
            for r in session.execute(old_dest_query.where(*condition)):
                old_dest.setdefault(r.destination_pk, set()).add(r.person_pk)
                if r.keys:
                    old_keys[(r.destination_pk, r.person_pk)] = r.keys
        added, removed = new - old.keys(), old.keys() - new
        changes_by_gate: list[tuple[DestinationGate, set[int], set[int]]] = []
        for gate in self.gates(session, audience.id):
            eligible = self.eligible(session, gate, new)
            before = old_dest.get(gate.pk, set())
            changes_by_gate.append((gate, eligible - before, before - eligible))
        moved = {p for _, joins, leaves in changes_by_gate for p in joins | leaves}
        person_ids = _person_ids(session, sorted(added | removed | moved))
        gone = (removed | moved) - person_ids.keys()
        for p in gone:
            person_ids[p] = old.get(p, "")

        for chunk in _chunks(sorted(removed)):
            session.execute(delete(members_t).where(members_t.c.audience_pk == audience.id,
                                                    members_t.c.person_pk.in_(chunk)))
        if added:
            session.execute(members_t.insert(), [{"audience_pk": audience.id, "person_pk": p,
                                                  "person_id": person_ids.get(p, ""), "join_us": now_us}
                                                 for p in sorted(added)])
        deltas: list[dict[str, Any]] = []
        current_keys = keys_of_persons(session, {p for _, joins, leaves in changes_by_gate for p in joins | leaves})
        removal_keys: dict[tuple[int, int], list[list[Any]]] = {}
        for gate, joins, leaves in changes_by_gate:
            for chunk in _chunks(sorted(leaves)):
                session.execute(delete(dest_t).where(dest_t.c.audience_pk == audience.id,
                                                     dest_t.c.destination_pk == gate.pk, dest_t.c.person_pk.in_(chunk)))
            if joins:
                session.execute(dest_t.insert(), [{"audience_pk": audience.id, "destination_pk": gate.pk,
                                                   "person_pk": p, "since_us": now_us, "keys": current_keys.get(p)}
                                                  for p in sorted(joins)])
            for p in sorted(leaves):
                removal_keys[(gate.pk, p)] = merge_keys(old_keys.get((gate.pk, p)), current_keys.get(p))
                why = removal_reason or self._removal_reason(p, new, gone, reasons.get(p, set()), mode)
                deltas.append(_delta(audience, gate, p, person_ids[p], REMOVE, why, event_ids.get(p, ""), now_us))
            for p in sorted(joins):
                why = add_reason or self._add_reason(p, old, reasons.get(p, set()), mode)
                deltas.append(_delta(audience, gate, p, person_ids[p], ADD, why, event_ids.get(p, ""), now_us))
        if deltas:
            session.execute(cast(Table, AudienceDeltaRow.__table__).insert(), deltas)
            enqueue_deltas(session, deltas, removal_keys, at_us=now_us)
            for d in deltas:
                DELTAS.labels(d["kind"], d["reason"]).inc()
        if mode != "incremental" and (added or removed):
            for hook in self.person_hooks:
                hook(session, sorted(added | removed))
        count = len(new) if persons is None else (audience.member_count or 0) + len(added) - len(removed)
        values: dict[str, Any] = {"member_count": count}
        if persons is None:
            values["evaluated_us"] = now_us
            if audience.windows_us is None or mode == "full":
                values["windows_us"] = now_us
        session.execute(update(AudienceRow).where(AudienceRow.id == audience.id).values(**values))
        for key, value in values.items():
            setattr(audience, key, value)
        return Evaluation(member_count=count, added=len(added), removed=len(removed), deltas=len(deltas),
                          evaluated_us=now_us)

    @staticmethod
    def _removal_reason(person: int, new: set[int], gone: set[int], reasons: set[str], mode: str) -> str:
        if person in gone:
            if changes.ERASED in reasons:
                return "ERASED"
            return "SPLIT" if changes.SPLIT in reasons else "MERGED"
        if person not in new:
            if changes.SPLIT in reasons:
                return "SPLIT"
            if changes.CONSENT in reasons:  # the rule reads consent, and a decision changed it
                return "CONSENT_WITHDRAWN"
            return "WINDOW_EXPIRED" if mode == "window" else "RULE_UNMATCHED"
        if changes.CONSENT in reasons or mode != "incremental":
            return "CONSENT_WITHDRAWN"
        return "SPLIT" if changes.SPLIT in reasons else "MATCH_KEY_REMOVED" if changes.IDENTITY in reasons \
            else "CONSENT_WITHDRAWN"

    @staticmethod
    def _add_reason(person: int, old: Mapping[int, str], reasons: set[str], mode: str) -> str:
        if person not in old:
            if changes.CONSENT in reasons:
                return "CONSENT_GRANTED"
            return "WINDOW_EXPIRED" if mode == "window" else "RULE_MATCHED"
        if changes.CONSENT in reasons:
            return "CONSENT_GRANTED"
        if changes.MERGED in reasons or changes.IDENTITY in reasons:
            return "MATCH_KEY_ADDED"
        return "CONSENT_GRANTED"

    # -- attach / detach / delete ----------------------------------------------------------

    def detach(self, session: Session, audience: AudienceRow, destination_pks: Iterable[int], reason: str) -> int:
        """Remove every member of ``audience`` at the given destinations (with deltas)."""
        dest_t = cast(Table, AudienceDestinationMemberRow.__table__)
        members_t = cast(Table, AudienceMemberRow.__table__)
        now_us = self.now_us()
        count = 0
        for pk in destination_pks:
            destination = session.get(DestinationRow, pk)
            rows = session.execute(select(dest_t.c.person_pk, dest_t.c["keys"], members_t.c.person_id).join(
                members_t, (members_t.c.audience_pk == dest_t.c.audience_pk)
                & (members_t.c.person_pk == dest_t.c.person_pk), isouter=True).where(
                dest_t.c.audience_pk == audience.id, dest_t.c.destination_pk == pk)).all()
            if rows:
                gate_id = destination.destination_id if destination is not None else ""
                deltas = [{"audience_pk": audience.id, "audience_id": audience.audience_id, "destination_pk": pk,
                           "destination_id": gate_id, "person_pk": r.person_pk, "person_id": r.person_id or "",
                           "kind": REMOVE, "reason": reason, "event_id": "", "created_us": now_us} for r in rows]
                session.execute(cast(Table, AudienceDeltaRow.__table__).insert(), deltas)
                current = keys_of_persons(session, [r.person_pk for r in rows])
                enqueue_deltas(session, deltas, {(pk, r.person_pk): merge_keys(r.keys, current.get(r.person_pk))
                                                 for r in rows}, at_us=now_us)
                DELTAS.labels(REMOVE, reason).inc(len(rows))
                count += len(rows)
            session.execute(delete(dest_t).where(dest_t.c.audience_pk == audience.id,
                                                 dest_t.c.destination_pk == pk))
        return count

    def erase_person(self, session: Session, person_pk: int, erasure_id: str) -> list[str]:
        """Erase hook (before the identifiers go): drop the person's memberships at once, record
        REMOVE deltas (reason ERASED) and queue ERASE deliveries carrying the hashed keys each
        destination was sent; cancel the person's queued conversions and additions. Returns the
        names of the ERASE deliveries."""
        self.db.advisory_lock(session, AUDIENCE_LOCK)
        members_t = cast(Table, AudienceMemberRow.__table__)
        dest_t = cast(Table, AudienceDestinationMemberRow.__table__)
        now_us = self.now_us()
        person_id = session.execute(select(PersonRow.person_id).where(PersonRow.id == person_pk)).scalar() or ""
        held = session.execute(select(dest_t.c.audience_pk, dest_t.c.destination_pk, dest_t.c["keys"])
                               .where(dest_t.c.person_pk == person_pk)
                               .order_by(dest_t.c.audience_pk, dest_t.c.destination_pk)).all()
        names: list[str] = []
        if held:
            audiences = {a.id: a.audience_id for a in session.execute(select(AudienceRow.id, AudienceRow.audience_id)
                                                                      .where(AudienceRow.id.in_({h[0] for h in held})))}
            destinations = {d.id: d.destination_id for d in session.execute(
                select(DestinationRow.id, DestinationRow.destination_id)
                .where(DestinationRow.id.in_({h[1] for h in held})))}
            current = keys_of_persons(session, [person_pk]).get(person_pk)
            deltas = [{"audience_pk": h.audience_pk, "audience_id": audiences.get(h.audience_pk, ""),
                       "destination_pk": h.destination_pk, "destination_id": destinations.get(h.destination_pk, ""),
                       "person_pk": person_pk, "person_id": person_id, "kind": REMOVE, "reason": "ERASED",
                       "event_id": "", "created_us": now_us} for h in held]
            session.execute(cast(Table, AudienceDeltaRow.__table__).insert(), deltas)
            names = enqueue_deltas(session, [d | {"erasure_id": erasure_id} for d in deltas],
                                   {(h.destination_pk, person_pk): merge_keys(h.keys, current) for h in held},
                                   at_us=now_us)
            DELTAS.labels(REMOVE, "ERASED").inc(len(deltas))
            session.execute(delete(dest_t).where(dest_t.c.person_pk == person_pk))
        joined: list[int] = list(session.execute(
            select(members_t.c.audience_pk).where(members_t.c.person_pk == person_pk)).scalars())
        if joined:
            session.execute(delete(members_t).where(members_t.c.person_pk == person_pk))
            session.execute(update(AudienceRow).where(AudienceRow.id.in_(joined))
                            .values(member_count=AudienceRow.member_count - 1))
        cancel_person_deliveries(session, person_pk, "PERSON_ERASED", at_us=now_us)
        return names

    def resolved_consent(self, session: Session, person_pk: int) -> PersonConsent | None:
        return self.consent.resolve_persons(session, [person_pk]).get(person_pk)


def _delta(audience: AudienceRow, gate: DestinationGate, person_pk: int, person_id: str, kind: str, reason: str,
           event_id: str, now_us: int) -> dict[str, Any]:
    return {"audience_pk": audience.id, "audience_id": audience.audience_id, "destination_pk": gate.pk,
            "destination_id": gate.destination_id, "person_pk": person_pk, "person_id": person_id, "kind": kind,
            "reason": reason, "event_id": event_id, "created_us": now_us}


def _person_ids(session: Session, pks: Sequence[int]) -> dict[int, str]:
    found: dict[int, str] = {}
    for chunk in _chunks(list(pks)):
        found.update((r[0], r[1]) for r in session.execute(
            select(PersonRow.id, PersonRow.person_id).where(PersonRow.id.in_(chunk))))
    return found


def _chunks(items: Sequence[int], size: int = 2000) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])
