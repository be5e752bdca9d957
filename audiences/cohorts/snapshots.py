"""Applying a cohort snapshot: membership diff, identifier resolution, trait evidence.

A *full* snapshot is the cohort's whole membership: it is diffed against the current
members on their source keys, and only the difference is written — for each member who
joined, a *set* of the cohort's trait (``true``) at the snapshot time on the identifier
it resolved to; for each who left, an *unset*. A *delta* names additions and removals.
Everything of one snapshot is written in one transaction, so it applies entirely or not
at all, and the persons touched are journalled so audiences follow.

Member IDs are resolved through the identity graph: an ID the graph already holds (for an
untyped PostHog ``distinct_id``: as a user, anonymous or PostHog distinct ID) is used as
is; an unknown ID becomes a new identifier of the cohort's member type that merges with
nothing. Junk values (the identity blocklist: ``null``, ``undefined``, ...) are ignored.

A full snapshot that looks like a broken pull is *held* instead of applied (the
:class:`Guard`): empty while the cohort has many members, or removing more than a set
share of them. Its members are kept until an operator confirms or discards it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.orm import Session

from audiences.cohorts.models import CohortImportRow, CohortMemberRow, CohortSnapshotRow, HeldMemberRow
from identity.events.capture import record_trait_evidence
from identity.identifiers import Identifier
from identity.models import IdentifierRow
from identity.operations import IdentityOperations
from identity.policy import CompiledPolicy
from identity.sightings import Sighting
from stitchgraph import changes
from stitchgraph.changes import mark_persons
from stitchgraph.db import Database, bulk_insert, in_values

__all__ = [
    "APPLIED",
    "DELTA",
    "DISCARDED",
    "FAILED",
    "FULL",
    "HELD",
    "RECEIVING",
    "UNTYPED_TYPES",
    "Guard",
    "Member",
    "SnapshotEngine",
    "SnapshotOutcome",
    "member_key",
]

FULL = "FULL"
DELTA = "DELTA"

RECEIVING = "RECEIVING"
APPLIED = "APPLIED"
HELD = "HELD"
FAILED = "FAILED"
DISCARDED = "DISCARDED"

#: The identifier types an untyped ID (a PostHog ``distinct_id``) may already be stored as.
UNTYPED_TYPES = ("user_id", "anonymous_id", "posthog_distinct_id")

_MEMBERS = cast(Table, CohortMemberRow.__table__)
_HELD = cast(Table, HeldMemberRow.__table__)
_CHUNK = 20_000


@dataclass(frozen=True, slots=True)
class Member:
    """One member as the source names it: its IDs, strongest first. A type of ``None`` is an
    untyped ID (PostHog distinct IDs) looked up among :data:`UNTYPED_TYPES`; typed IDs are
    already normalised (``email`` hashed)."""

    ids: tuple[tuple[str | None, str], ...]


@dataclass(frozen=True, slots=True)
class Guard:
    """When a full snapshot is held rather than applied."""

    max_removed_percent: int = 50
    empty_hold_min_members: int = 100

    def reason_to_hold(self, current: int, incoming: int, removed: int) -> str:
        """Why a snapshot of ``incoming`` members removing ``removed`` of ``current`` is held ("" = apply)."""
        if incoming == 0 and current >= self.empty_hold_min_members and current > 0:
            return (f"empty snapshot while the cohort has {current} members (hold threshold "
                    f"{self.empty_hold_min_members})")
        if current and self.max_removed_percent < 100 and removed * 100 > self.max_removed_percent * current:
            return (f"snapshot removes {removed} of {current} members ({removed * 100 // current}%, more than the "
                    f"{self.max_removed_percent}% allowed)")
        return ""


@dataclass(frozen=True, slots=True)
class SnapshotOutcome:
    status: str
    member_count: int = 0
    added: int = 0
    removed: int = 0
    new_identifiers: int = 0
    ignored: int = 0
    error: str = ""


def member_key(type_: str, value: str) -> str:
    """The key a resolved member is kept under: ``type:value``."""
    return f"{type_}:{value}"


def _now() -> datetime:
    return datetime.now(UTC)


class SnapshotEngine:
    """Applies snapshots to the store (one transaction each)."""

    def __init__(self, db: Database, identity: IdentityOperations) -> None:
        self.db = db
        self.identity = identity

    # -- entry points ------------------------------------------------------------------------

    def apply(self, snapshot_pk: int, members: Sequence[Member], *, removals: Sequence[Member] = (),
              guard: Guard | None = None, default_type: str = "posthog_distinct_id") -> SnapshotOutcome:
        """Apply the snapshot row ``snapshot_pk`` (RECEIVING or HELD) with ``members`` (FULL:
        the membership; DELTA: additions) and ``removals`` (DELTA). ``guard`` ``None`` applies
        without holding (a confirmed snapshot, an explicit drain). Returns the outcome, also
        recorded on the snapshot row."""
        with self.db.transaction() as session:
            snapshot = session.get(CohortSnapshotRow, snapshot_pk, with_for_update=True)
            assert snapshot is not None
            self.db.advisory_lock(session, f"cohort:{snapshot.cohort_pk}")
            cohort = session.get(CohortImportRow, snapshot.cohort_pk, with_for_update=True)
            if cohort is None:
                return self._finish(session, snapshot, SnapshotOutcome(FAILED, error="the cohort was removed"))
            if cohort.last_snapshot_us is not None and snapshot.snapshot_us < cohort.last_snapshot_us:
                return self._finish(session, snapshot, SnapshotOutcome(
                    FAILED, error="snapshot_time is older than the cohort's last applied snapshot"))
            policy = self.identity.policy(session)
            outcome = self._apply_in(session, policy, snapshot, cohort, members, removals, guard, default_type)
            return self._finish(session, snapshot, outcome)

    def apply_in(self, session: Session, snapshot: CohortSnapshotRow, cohort: CohortImportRow,
                 members: Sequence[Member], *, default_type: str) -> SnapshotOutcome:
        """Apply ``snapshot`` unguarded in the caller's transaction (removing a source's traits
        together with the source) and record the outcome on it."""
        policy = self.identity.policy(session)
        return self._finish(session, snapshot, self._apply_in(session, policy, snapshot, cohort, members, (), None,
                                                              default_type))

    def fail(self, snapshot_pk: int, error: str) -> SnapshotOutcome:
        """Mark a snapshot FAILED (nothing applied)."""
        with self.db.transaction() as session:
            snapshot = session.get(CohortSnapshotRow, snapshot_pk, with_for_update=True)
            assert snapshot is not None
            return self._finish(session, snapshot, SnapshotOutcome(FAILED, error=error[:2000]))

    def held_members(self, session: Session, snapshot_pk: int) -> list[Member]:
        rows: Iterable[Any] = session.execute(select(_HELD.c.candidates).where(_HELD.c.snapshot_pk == snapshot_pk)
                               .order_by(_HELD.c.member_key)).scalars()
        return [Member(tuple((c[0], c[1]) for c in candidates)) for candidates in rows]

    # -- the work --------------------------------------------------------------------------------

    def _apply_in(self, session: Session, policy: CompiledPolicy, snapshot: CohortSnapshotRow,
                  cohort: CohortImportRow, members: Sequence[Member], removals: Sequence[Member],
                  guard: Guard | None, default_type: str) -> SnapshotOutcome:
        # Read through the driver: a million (key, pk) tuples, without a Row object each.
        marker = "%s" if self.db.is_postgres else "?"
        current: dict[str, int] = dict(session.connection().exec_driver_sql(
            f"SELECT member_key, identifier_pk FROM cohort_members WHERE cohort_pk = {marker}",
            (cohort.id,)).fetchall())
        ignored = 0
        kept: set[str] = set()
        fresh: list[Member] = []
        for member in members:
            if len(member.ids) == 1 and member.ids[0][0] is not None:  # one typed ID: one key to look up
                key = f"{member.ids[0][0]}:{member.ids[0][1]}"
                if key in current:
                    kept.add(key)
                else:
                    fresh.append(member)
                continue
            hit = False
            for type_, value in member.ids:
                if type_ is None:
                    for t in UNTYPED_TYPES:
                        key = member_key(t, value)
                        if key in current:
                            kept.add(key)
                            hit = True
                elif (key := member_key(type_, value)) in current:
                    kept.add(key)
                    hit = True
            if not hit:
                fresh.append(member)
        gone = [key for key in current if key not in kept] if snapshot.mode == FULL else _keys_of(removals, current)
        if guard is not None and snapshot.mode == FULL:
            reason = guard.reason_to_hold(len(current), len(members), len(gone))
            if reason:
                self._hold(session, snapshot.id, members)
                return SnapshotOutcome(HELD, member_count=len(members), error=reason)

        additions, new_identifiers, junk = self._resolve(session, policy, fresh, default_type, snapshot.snapshot_us,
                                                         current)
        ignored += junk
        added_pks = {pk for pk in additions.values()}
        removed_pks = {current[key] for key in gone}
        # An identifier removed under one key and kept or added under another stays a member.
        still = {current[key] for key in kept} | added_pks
        unset_pks = removed_pks - still
        set_pks = added_pks - {current[key] for key in kept}

        for start in range(0, len(gone), _CHUNK):
            chunk = gone[start:start + _CHUNK]
            session.execute(delete(_MEMBERS).where(_MEMBERS.c.cohort_pk == cohort.id,
                                                   in_values(session, _MEMBERS.c.member_key, chunk)))
        rows = [{"cohort_pk": cohort.id, "member_key": key, "identifier_pk": pk} for key, pk in additions.items()]
        for start in range(0, len(rows), 100_000):
            bulk_insert(session, _MEMBERS, rows[start:start + 100_000], ignore_conflicts=True)

        self._write_traits(session, snapshot, cohort.trait_name, set_pks, unset_pks)
        member_count = len(current) - len(gone) + len(additions)
        cohort.member_count = member_count
        cohort.last_snapshot_pk = snapshot.id
        cohort.last_snapshot_us = snapshot.snapshot_us
        return SnapshotOutcome(APPLIED, member_count=member_count, added=len(set_pks), removed=len(unset_pks),
                               new_identifiers=new_identifiers, ignored=ignored)

    def _resolve(self, session: Session, policy: CompiledPolicy, members: Sequence[Member], default_type: str,
                 snapshot_us: int, current: dict[str, int]) -> tuple[dict[str, int], int, int]:
        """Member key → identifier pk for members not yet in the cohort, creating identifiers
        for unknown IDs; with the number created and the number of members ignored as junk."""
        untyped: set[str] = set()
        typed: dict[str, set[str]] = {}
        clean: list[list[tuple[str | None, str]]] = []
        ignored = 0
        for member in members:
            ids = [(t, v) for t, v in member.ids if v]
            if not ids:
                ignored += 1
                continue
            clean.append(ids)
            for t, v in ids:
                if t is None:
                    untyped.add(v)
                else:
                    typed.setdefault(t, set()).add(v)
        found: dict[tuple[str, str], int] = {}
        for types, values in [(UNTYPED_TYPES, untyped), *(((t,), vs) for t, vs in typed.items())]:
            listed = sorted(values)
            for start in range(0, len(listed), _CHUNK):
                query = select(IdentifierRow.id, IdentifierRow.type, IdentifierRow.value).where(
                    in_values(session, IdentifierRow.value, listed[start:start + _CHUNK]),
                    IdentifierRow.type.in_(types))
                for pk, t, v in session.execute(query):
                    found[(t, v)] = pk
        resolved: dict[str, int] = {}
        create: dict[Identifier, str] = {}
        for ids in clean:
            hits = []
            for t, v in ids:
                for candidate in (UNTYPED_TYPES if t is None else (t,)):
                    hit = found.get((candidate, v))
                    if hit is not None:
                        hits.append((member_key(candidate, v), hit))
            if hits:
                resolved.update(hits)
                continue
            # Junk values (the blocklist) are never stored, so only IDs about to be created are checked.
            fresh = [(t or default_type, v) for t, v in ids if policy.blocklist.match(t or default_type, v) is None]
            if not fresh:
                ignored += 1
                continue
            identifier = Identifier(*fresh[0])
            create.setdefault(identifier, member_key(identifier.type, identifier.value))
        created = 0
        if create:
            created = self._create(session, policy, list(create), snapshot_us)
            by_type: dict[str, list[str]] = {}
            for identifier in create:
                by_type.setdefault(identifier.type, []).append(identifier.value)
            for t, created_values in by_type.items():
                for start in range(0, len(created_values), _CHUNK):
                    chunk = created_values[start:start + _CHUNK]
                    for pk, v in session.execute(select(IdentifierRow.id, IdentifierRow.value).where(
                            IdentifierRow.type == t, in_values(session, IdentifierRow.value, chunk))):
                        resolved[member_key(t, v)] = pk
        # A key already current (found through another ID of the member) is not an addition.
        return {k: pk for k, pk in resolved.items() if k not in current}, created, ignored

    def _create(self, session: Session, policy: CompiledPolicy, identifiers: list[Identifier], snapshot_us: int
                ) -> int:
        """New identifiers for unknown member IDs, each alone (they merge nothing)."""
        from identity.identifiers import NormalizedIdentifier

        sightings = [Sighting((NormalizedIdentifier(identifier),), snapshot_us,
                              f"cohort-member:{identifier.type}:{identifier.value}"[:256], "cohort")
                     for identifier in identifiers]
        created = 0
        for start in range(0, len(sightings), 5_000):
            results = self.identity.graph.observe(session, policy, sightings[start:start + 5_000])
            created += sum(1 for r in results if r.person_pk is not None)
        return created

    def _write_traits(self, session: Session, snapshot: CohortSnapshotRow, trait: str, set_pks: set[int],
                      unset_pks: set[int]) -> None:
        source = f"cohort:{snapshot.source_pk}"
        prefix = f"cohort:{snapshot.source_pk}/{snapshot.snapshot_id}:"
        evidence: list[dict[str, Any]] = []
        for op, pks, value in (("set", set_pks, True), ("unset", unset_pks, None)):
            evidence.extend({"identifier_pk": pk, "key": trait, "op": op, "value": value,
                             "occurred_us": snapshot.snapshot_us, "event_id": f"{prefix}{pk}", "source": source}
                            for pk in sorted(pks))
        for start in range(0, len(evidence), 100_000):
            record_trait_evidence(session, evidence[start:start + 100_000])
        touched = sorted(set_pks | unset_pks)
        persons: set[int] = set()
        for start in range(0, len(touched), _CHUNK):
            persons.update(session.execute(select(IdentifierRow.person_pk).where(
                in_values(session, IdentifierRow.id, touched[start:start + _CHUNK]))).scalars())
        mark_persons(session, persons, changes.EVIDENCE)

    def _hold(self, session: Session, snapshot_pk: int, members: Sequence[Member]) -> None:
        session.execute(delete(_HELD).where(_HELD.c.snapshot_pk == snapshot_pk))
        rows = {}
        for member in members:
            first_type, first_value = member.ids[0]
            key = member_key(first_type or "", first_value)
            rows[key] = {"snapshot_pk": snapshot_pk, "member_key": key,
                         "candidates": [[t, v] for t, v in member.ids]}
        listed = list(rows.values())
        for start in range(0, len(listed), _CHUNK):
            session.execute(insert(_HELD), listed[start:start + _CHUNK])

    def _finish(self, session: Session, snapshot: CohortSnapshotRow, outcome: SnapshotOutcome) -> SnapshotOutcome:
        values: dict[str, Any] = {"status": outcome.status, "member_count": outcome.member_count,
                                  "added_count": outcome.added, "removed_count": outcome.removed,
                                  "new_identifier_count": outcome.new_identifiers,
                                  "ignored_count": outcome.ignored, "error": outcome.error}
        if outcome.status == APPLIED:
            values["apply_time"] = _now()
        if outcome.status != HELD:
            session.execute(delete(_HELD).where(_HELD.c.snapshot_pk == snapshot.id))
        session.execute(update(CohortSnapshotRow).where(CohortSnapshotRow.id == snapshot.id).values(**values))
        return outcome


def _keys_of(members: Iterable[Member], current: dict[str, int]) -> list[str]:
    """The current keys ``members`` name (for removals)."""
    keys: list[str] = []
    for member in members:
        for type_, value in member.ids:
            for t in (UNTYPED_TYPES if type_ is None else (type_,)):
                key = member_key(t, value)
                if key in current:
                    keys.append(key)
    return list(dict.fromkeys(keys))
