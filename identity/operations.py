"""Identity operations: the domain API that servicers, jobs and benchmarks call.

Each method takes the caller's session, so its effects commit with the caller's
transaction (and with the idempotency record of the request that caused them).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from identity.graph_store import GRAPH_LOCK, IdentityGraph, RebuildStats, SightingResult, identifier_hash
from identity.identifiers import Identifier, NormalizedIdentifier
from identity.models import (
    ErasureRow,
    HistoryRow,
    IdentifierRow,
    LinkRow,
    PersonRow,
    PinRow,
    PolicyRow,
    TombstoneRow,
)
from identity.policy import CompiledPolicy, IdentityPolicy
from identity.queries import erasure_view, person_pk_by_identifier, person_row, person_view, require_person_pk
from identity.sightings import Sighting, derived_event_id, prepare_identifiers, to_micros
from identity.views import ErasureView, IdentifyOutcome, IgnoredView, LinkOutcomeView, PersonView
from stitchgraph import changes
from stitchgraph.changes import mark_persons
from stitchgraph.db import Database, insert_ignoring_conflicts
from stitchgraph.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from stitchgraph.idempotency import forget_subjects

MAX_IDENTIFIERS_PER_CALL = 50


@dataclass(frozen=True)
class RawSighting:
    """Identifiers as a caller sent them, seen together once."""

    identifiers: Sequence[tuple[str, str]]
    occurred_at: datetime | None = None
    source: str = ""
    event_id: str = ""
    request_id: str = ""


class IdentityOperations:
    """The identity graph's use cases over one database."""

    def __init__(self, db: Database, seed_policy: IdentityPolicy | None = None) -> None:
        self.db = db
        self.graph = IdentityGraph(db)
        self._seed_policy = seed_policy or IdentityPolicy()
        self._compiled: CompiledPolicy | None = None
        self._compiled_etag = ""
        self._lock = threading.Lock()
        #: Called with the pks of identifiers about to be erased, in the erasing transaction,
        #: so evidence kept elsewhere (events, traits) goes with them.
        self.erase_hooks: list[Callable[[Session, Sequence[int]], None]] = []
        #: Called once per erasure, before anything is deleted, with the person's primary key and
        #: the erasure ID; returns the names of the deliveries queued to tell destinations.
        self.person_erase_hooks: list[Callable[[Session, int, str], Sequence[str]]] = []

    # -- policy ---------------------------------------------------------------------------

    def policy(self, session: Session) -> CompiledPolicy:
        """The policy in force, compiled once per version. Until an operator stores one,
        the configured seed is in force; reading never writes (reads run read-only)."""
        etag = session.execute(select(PolicyRow.etag).where(PolicyRow.id == 1)).scalar()
        with self._lock:
            if etag is None:
                if self._compiled is None or self._compiled_etag != self._seed_policy.etag:
                    self._compiled = CompiledPolicy.build(self._seed_policy)
                    self._compiled_etag = self._seed_policy.etag
                return self._compiled
            if self._compiled is None or self._compiled_etag != etag:
                stored: dict[str, Any] = session.execute(select(PolicyRow.policy).where(PolicyRow.id == 1)).scalar_one()
                self._compiled = CompiledPolicy.build(IdentityPolicy.from_dict(stored))
                self._compiled_etag = etag
            return self._compiled

    def _store_seed_policy(self, session: Session) -> None:
        """Make the seed the stored policy if none is stored (a concurrent writer's wins)."""
        seed = self._seed_policy
        insert_ignoring_conflicts(session, PolicyRow.__table__, {
            "id": 1, "policy": seed.to_dict(), "etag": seed.etag, "updated_at": datetime.now(UTC)})

    def update_policy(self, session: Session, policy: IdentityPolicy, *, etag: str, operator: str) -> tuple[
            IdentityPolicy, RebuildStats]:
        """Store ``policy`` and apply it to existing evidence (retroactive blocklist, new limits).

        Raises :class:`Aborted` when ``etag`` is given and stale.
        """
        self.db.advisory_lock(session, GRAPH_LOCK)
        self._store_seed_policy(session)
        current = self.policy(session)
        if etag and etag != current.policy.etag:
            raise Aborted("the identity policy changed since it was read; read it again and retry",
                          reason="STALE_ETAG")
        session.execute(update(PolicyRow).where(PolicyRow.id == 1).values(
            policy=policy.to_dict(), etag=policy.etag, updated_at=datetime.now(UTC)))
        compiled = self.policy(session)
        self._drop_blocklisted(session, compiled, operator)
        stats = self.graph.rebuild(session, compiled)
        return policy, stats

    def preview_policy(self, session: Session, policy: IdentityPolicy) -> PolicyPreview:
        """What :meth:`update_policy` would change, computed without writing anything."""
        self.db.advisory_lock(session, GRAPH_LOCK)
        compiled = CompiledPolicy.build(policy)
        ignored = sum(1 for row in session.execute(select(IdentifierRow.type, IdentifierRow.value))
                      if compiled.blocklist.match(row.type, row.value) is not None)
        before = self._partition(session)
        # Replay in a nested transaction that is rolled back: the store is unchanged.
        nested = session.begin_nested()
        try:
            self._drop_blocklisted(session, compiled, "preview")
            self.graph.rebuild(session, compiled)
            after = self._partition(session)
        finally:
            nested.rollback()
        changed = []
        groups_after: dict[str, set[str]] = {}
        for key, person in after.items():
            groups_after.setdefault(person, set()).add(key)
        groups_before: dict[str, set[str]] = {}
        for key, person in before.items():
            groups_before.setdefault(person, set()).add(key)
        split = 0
        for person, keys in groups_before.items():
            resulting = {after[k] for k in keys if k in after}
            if len(resulting) > 1:
                split += 1
                changed.append(PersonChangeView(person, "SPLIT", tuple(sorted(resulting))))
            elif resulting and (groups_after[next(iter(resulting))] != keys or next(iter(resulting)) != person):
                changed.append(PersonChangeView(person, "CHANGED", tuple(sorted(resulting))))
            elif not resulting:
                changed.append(PersonChangeView(person, "IDENTIFIERS_REMOVED", ()))
        return PolicyPreview(persons_evaluated=len(groups_before), persons_split=split,
                             persons_changed=len(changed), identifiers_newly_ignored=ignored,
                             sample=tuple(changed[:50]))

    @staticmethod
    def _partition(session: Session) -> dict[str, str]:
        return {f"{r.type}:{r.value}": r.person_id for r in session.execute(
            select(IdentifierRow.type, IdentifierRow.value, PersonRow.person_id)
            .join(PersonRow, PersonRow.id == IdentifierRow.person_pk))}

    def _drop_blocklisted(self, session: Session, policy: CompiledPolicy, operator: str) -> None:
        doomed = [row for row in session.execute(select(IdentifierRow.id, IdentifierRow.type, IdentifierRow.value))
                  if policy.blocklist.match(row.type, row.value) is not None]
        if not doomed:
            return
        ids = [row.id for row in doomed]
        for start in range(0, len(ids), 400):
            chunk = ids[start:start + 400]
            session.execute(delete(LinkRow).where(or_(LinkRow.a_pk.in_(chunk), LinkRow.b_pk.in_(chunk))))
            session.execute(delete(PinRow).where(or_(PinRow.a_pk.in_(chunk), PinRow.b_pk.in_(chunk))))
            session.execute(delete(HistoryRow).where(or_(HistoryRow.a_pk.in_(chunk), HistoryRow.b_pk.in_(chunk))))
            session.execute(delete(IdentifierRow).where(IdentifierRow.id.in_(chunk)))

    # -- ingest ---------------------------------------------------------------------------

    def identify(self, session: Session, sighting: RawSighting, *, forced: bool = False,
                 operator: str = "") -> IdentifyOutcome:
        """Submit identifiers seen together; return the person of the strongest one."""
        return self.observe(session, [sighting], forced=forced, operator=operator)[0]

    def observe(self, session: Session, raw: Sequence[RawSighting], *, forced: bool = False,
                operator: str = "", field_prefix: str = "") -> list[IdentifyOutcome]:
        """Submit a batch of sightings in one transaction; one outcome per sighting.

        Raises :class:`InvalidArgument` (nothing stored) when any identifier is invalid.
        """
        # The graph lock first: the policy read must not predate a concurrent policy change.
        self.db.advisory_lock(session, GRAPH_LOCK)
        policy = self.policy(session)
        sightings = [self._sighting(policy, item, i, field_prefix, forced, operator, len(raw) > 1)
                     for i, item in enumerate(raw)]
        results = self.graph.observe(session, policy, sightings)
        return [self._outcome(session, result, sighting) for result, sighting in zip(results, sightings, strict=True)]

    def observe_results(self, session: Session, raw: Sequence[RawSighting]) -> list[SightingResult]:
        """Like :meth:`observe` but returns the graph's raw results (no person views); for bulk loads."""
        self.db.advisory_lock(session, GRAPH_LOCK)
        policy = self.policy(session)
        sightings = [self._sighting(policy, item, i, "", False, "", len(raw) > 1) for i, item in enumerate(raw)]
        return self.graph.observe(session, policy, sightings)

    def observe_sightings(self, session: Session, policy: CompiledPolicy,
                          sightings: Sequence[Sighting]) -> list[SightingResult]:
        """Apply already prepared sightings (the event ledger normalises identifiers itself,
        per event, so one bad event does not sink a batch)."""
        self.db.advisory_lock(session, GRAPH_LOCK)
        return self.graph.observe(session, policy, sightings)

    @staticmethod
    def _sighting(policy: CompiledPolicy, item: RawSighting, index: int, field_prefix: str, forced: bool,
                  operator: str, batched: bool) -> Sighting:
        prefix = f"{field_prefix}[{index}]." if batched or field_prefix else ""
        if not item.identifiers:
            raise InvalidArgument.for_field(f"{prefix}identifiers", "at least one identifier is required")
        if len(item.identifiers) > MAX_IDENTIFIERS_PER_CALL:
            raise InvalidArgument.for_field(f"{prefix}identifiers",
                                            f"at most {MAX_IDENTIFIERS_PER_CALL} identifiers per call")
        for name, text, limit in (("source", item.source, 128), ("event_id", item.event_id, 256)):
            if len(text) > limit:
                raise InvalidArgument.for_field(f"{prefix}{name}", f"must be at most {limit} characters")
            if not text.isprintable():
                raise InvalidArgument.for_field(f"{prefix}{name}", "must not contain control characters")
        normalized, ignored, positions = prepare_identifiers(policy, item.identifiers,
                                                             field_prefix=f"{prefix}identifiers")
        occurred = item.occurred_at or datetime.now(UTC)
        occurred_us = to_micros(occurred)
        source = item.source or "grpc"
        event_id = item.event_id or derived_event_id(source, occurred_us, [n.identifier for n in normalized])
        return Sighting(tuple(normalized), occurred_us, event_id, source, item.request_id, forced, operator,
                        tuple(ignored), tuple(positions))

    def _outcome(self, session: Session, result: SightingResult, sighting: Sighting) -> IdentifyOutcome:
        person = person_view(session, result.person_pk) if result.person_pk is not None else None
        return IdentifyOutcome(
            person=person, primary_pk=result.primary_pk, event_id=sighting.event_id,
            occurred_us=sighting.occurred_us,
            ignored=tuple(IgnoredView(i.index, i.type, i.reason, i.detail) for i in result.ignored),
            decisions=tuple(LinkOutcomeView(x.first, x.second, x.decision.value, x.reason, x.detail)
                            for x in result.links),
        )

    # -- operators ------------------------------------------------------------------------

    def merge(self, session: Session, person_ids: Sequence[str], *, operator: str, reason: str,
              override_pins: bool, request_id: str = "") -> PersonView:
        """Force two persons into one (audited); pins block it unless ``override_pins``."""
        if len(person_ids) != 2:
            raise InvalidArgument.for_field("names", "exactly two persons are required")
        if not operator:
            raise InvalidArgument.for_field("operator", "name the operator responsible for the merge")
        self.db.advisory_lock(session, GRAPH_LOCK)
        pks = [require_person_pk(session, pid, f"names[{i}]") for i, pid in enumerate(person_ids)]
        if pks[0] == pks[1]:
            return person_view(session, pks[0])
        anchors = [person_row(session, pk).anchor_pk for pk in pks]  # type: ignore[union-attr]
        members = [select(IdentifierRow.id).where(IdentifierRow.person_pk == pk).scalar_subquery() for pk in pks]
        pinned = session.execute(select(PinRow.id).where(or_(
            PinRow.a_pk.in_(members[0]) & PinRow.b_pk.in_(members[1]),
            PinRow.a_pk.in_(members[1]) & PinRow.b_pk.in_(members[0])))).scalars().all()
        if pinned and not override_pins:
            raise FailedPrecondition("an operator split keeps these persons apart; set override_pins to merge anyway",
                                     reason="PINNED_SPLIT")
        policy = self.policy(session)
        if pinned:
            # Without these pins other links may decide differently too: re-resolve both
            # persons' clusters from their evidence before forcing the merge.
            clusters = {person_row(session, pk).cluster_pk for pk in pks}  # type: ignore[union-attr]
            session.execute(delete(PinRow).where(PinRow.id.in_(pinned)))
            self.graph.resolve_clusters(session, policy, clusters, reason="operator merge", operator=operator)
        a, b = sorted(anchors)
        now_us = to_micros(datetime.now(UTC))
        event_id = f"merge:{request_id or uuid.uuid4().hex}"
        existing = session.execute(select(LinkRow).where(LinkRow.a_pk == a, LinkRow.b_pk == b)).scalar()
        if existing is not None:
            existing.forced, existing.operator = True, operator
            session.flush()
            holder = session.execute(select(IdentifierRow.person_pk).where(IdentifierRow.id == a)).scalar_one()
            cluster = person_row(session, holder).cluster_pk  # type: ignore[union-attr]
            self.graph.resolve_clusters(session, policy, [cluster], reason="operator merge", operator=operator)
        else:
            identifiers = session.execute(select(IdentifierRow.type, IdentifierRow.value)
                                          .where(IdentifierRow.id.in_([a, b]))).all()
            sighting = Sighting(tuple(NormalizedIdentifier(Identifier(r.type, r.value)) for r in identifiers),
                                now_us, event_id, "operator", request_id, True, operator)
            self.graph.observe(session, policy, [sighting])
        session.add(HistoryRow(kind="FORCED_MERGE", occurred_us=now_us, recorded_at=datetime.now(UTC), a_pk=a, b_pk=b,
                               person_id="", related_person_ids=sorted(person_ids), reason="OPERATOR",
                               detail=reason, operator=operator, event_id=event_id, source="operator"))
        survivor = session.execute(select(IdentifierRow.person_pk).where(IdentifierRow.id == a)).scalar_one()
        return person_view(session, survivor)

    def split(self, session: Session, person_id: str, *, detach: Sequence[Identifier],
              remove_links: Sequence[tuple[Identifier, Identifier]], allow_remerge: bool, operator: str,
              reason: str) -> list[PersonView]:
        """Split a person by detaching identifiers and/or removing links, then re-resolve it.

        With ``allow_remerge`` false (the default) the split is pinned: the removed links
        stay as evidence but the identifiers can never again share a person. With it true,
        the evidence itself is deleted and new evidence may join them again.
        """
        if not detach and not remove_links:
            raise InvalidArgument.for_field("detach_identifiers", "name identifiers to detach or links to remove")
        if not operator:
            raise InvalidArgument.for_field("operator", "name the operator responsible for the split")
        self.db.advisory_lock(session, GRAPH_LOCK)
        pk = require_person_pk(session, person_id)
        person = person_row(session, pk)
        assert person is not None
        members = {(r.type, r.value): r.id for r in session.execute(
            select(IdentifierRow.id, IdentifierRow.type, IdentifierRow.value).where(IdentifierRow.person_pk == pk))}
        detached = []
        for i, identifier in enumerate(detach):
            node = members.get((identifier.type, identifier.value))
            if node is None:
                raise InvalidArgument.for_field(f"detach_identifiers[{i}]", "is not an identifier of this person")
            detached.append(node)
        pairs = []
        for i, (first, second) in enumerate(remove_links):
            a, b = members.get((first.type, first.value)), members.get((second.type, second.value))
            if a is None or b is None:
                raise InvalidArgument.for_field(f"remove_links[{i}]", "both identifiers must belong to this person")
            pairs.append((min(a, b), max(a, b)))
        if len(detached) >= len(members):
            raise InvalidArgument.for_field("detach_identifiers", "cannot detach every identifier of the person")
        now = datetime.now(UTC)
        if allow_remerge:
            for node in detached:
                session.execute(delete(LinkRow).where(or_(LinkRow.a_pk == node, LinkRow.b_pk == node)))
            for a, b in pairs:
                session.execute(delete(LinkRow).where(LinkRow.a_pk == a, LinkRow.b_pk == b))
        else:
            remainder = [n for n in members.values() if n not in detached]
            anchor = person.anchor_pk if person.anchor_pk in remainder else self._earliest(session, remainder)
            for node in detached:
                pairs.append((min(node, anchor), max(node, anchor)))
            for a, b in pairs:
                if session.execute(select(PinRow.id).where(PinRow.a_pk == a, PinRow.b_pk == b)).first() is None:
                    session.add(PinRow(a_pk=a, b_pk=b, operator=operator, reason=reason, created_at=now))
            session.flush()
        for a, b in pairs or [(n, n) for n in detached]:
            session.add(HistoryRow(kind="SPLIT", occurred_us=to_micros(now), recorded_at=now, a_pk=a,
                                   b_pk=b if b != a else None, person_id=person.person_id,
                                   related_person_ids=[person.person_id], reason="OPERATOR", detail=reason,
                                   operator=operator, event_id="", source="operator"))
        session.flush()
        self.graph.resolve_clusters(session, self.policy(session), [person.cluster_pk], reason="operator split",
                                    operator=operator)
        after = sorted({session.execute(select(IdentifierRow.person_pk).where(IdentifierRow.id == n)).scalar_one()
                        for n in members.values()})
        return [person_view(session, p) for p in after]

    def erase(self, session: Session, *, person_id: str | None, identifier: Identifier | None, operator: str,
              reason: str) -> ErasureView:
        """Erase a person: its identifiers, evidence and derived state go; tombstones (hashes)
        stay so old evidence cannot resurrect it; an erasure job records what destinations
        must be told."""
        if not operator:
            raise InvalidArgument.for_field("operator", "name the operator responsible for the erasure")
        self.db.advisory_lock(session, GRAPH_LOCK)
        if person_id:
            pk = require_person_pk(session, person_id)
        elif identifier is not None:
            found = person_pk_by_identifier(session, identifier)
            if found is None:
                raise NotFound("identifier not found", reason="IDENTIFIER_NOT_FOUND", metadata={"field": "identifier"})
            pk = found
        else:
            raise InvalidArgument.for_field("target", "name a person or an identifier")
        person = person_row(session, pk)
        assert person is not None
        rows = session.execute(select(IdentifierRow.id, IdentifierRow.type, IdentifierRow.value)
                               .where(IdentifierRow.person_pk == pk)).all()
        ids = [r.id for r in rows]
        hashes = sorted(identifier_hash(r.type, r.value) for r in rows)
        now = datetime.now(UTC)
        now_us = to_micros(now)
        erasure_id = "er_" + uuid.uuid4().hex[:24]
        deliveries: list[str] = []
        for person_hook in self.person_erase_hooks:
            deliveries += person_hook(session, pk, erasure_id)
        for start in range(0, len(ids), 400):
            chunk = ids[start:start + 400]
            for hook in self.erase_hooks:
                hook(session, chunk)
            session.execute(delete(LinkRow).where(or_(LinkRow.a_pk.in_(chunk), LinkRow.b_pk.in_(chunk))))
            session.execute(delete(PinRow).where(or_(PinRow.a_pk.in_(chunk), PinRow.b_pk.in_(chunk))))
            session.execute(delete(HistoryRow).where(or_(HistoryRow.a_pk.in_(chunk), HistoryRow.b_pk.in_(chunk))))
            session.execute(delete(IdentifierRow).where(IdentifierRow.id.in_(chunk)))
        session.execute(delete(PersonRow).where(PersonRow.id == pk))
        mark_persons(session, [pk], changes.ERASED)
        existing = set(session.execute(select(TombstoneRow.identifier_hash)
                                       .where(TombstoneRow.identifier_hash.in_(hashes))).scalars())
        for h in hashes:
            if h in existing:
                session.execute(update(TombstoneRow).where(TombstoneRow.identifier_hash == h)
                                .values(erased_us=now_us, erasure_id=erasure_id))
            else:
                session.add(TombstoneRow(identifier_hash=h, erased_us=now_us, erasure_id=erasure_id))
        # Stored responses of earlier requests name these identifiers: forget them too.
        forget_subjects(session, hashes)
        row = ErasureRow(id=erasure_id, person_id=person.person_id, identifier_hashes=hashes,
                         state="PROPAGATING" if deliveries else "COMPLETED", deliveries=deliveries,
                         operator=operator, reason=reason, created_at=now)
        session.add(row)
        session.flush()
        self.graph.resolve_clusters(session, self.policy(session), [person.cluster_pk], reason="erasure",
                                    operator=operator)
        return erasure_view(row)

    def rebuild(self, session: Session) -> RebuildStats:
        return self.graph.rebuild(session, self.policy(session))

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _earliest(session: Session, nodes: Sequence[int]) -> int:
        row = session.execute(select(IdentifierRow.id).where(IdentifierRow.id.in_(list(nodes)))
                              .order_by(IdentifierRow.first_seen_us, IdentifierRow.id).limit(1)).scalar_one()
        return int(row)


@dataclass(frozen=True)
class PersonChangeView:
    person_id: str
    kind: str
    resulting_person_ids: tuple[str, ...]


@dataclass(frozen=True)
class PolicyPreview:
    persons_evaluated: int
    persons_split: int
    persons_changed: int
    identifiers_newly_ignored: int
    sample: tuple[PersonChangeView, ...]


__all__ = ["IdentityOperations", "PolicyPreview", "RawSighting"]
