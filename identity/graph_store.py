"""The identity graph over the store: ingest sightings, re-resolve clusters, rebuild.

Ingest (:meth:`IdentityGraph.observe`) works per batch of sightings in one
transaction:

1. load the batch's identifiers, their persons and clusters; give new identifiers
   primary keys (under the graph lock, so keys are allocated without a round trip);
2. decide each new link in canonical order with the guarded union-find. A link whose
   key sorts after every link already in the clusters it touches is decided right
   away (*fast path*): replaying the clusters' evidence would decide everything before
   it identically, so only this decision is new. Otherwise the link is *late*: it is
   stored and its clusters are re-resolved from their stored evidence (*slow path*);
3. write only what changed: new identifiers and links, the smaller side of each merge
   relabelled, person and cluster rows upserted, history for refusals and merges.

A cluster is a connected component over *all* links, refused ones included: the most
that a late link can change, since a refusal in one person can depend on the order of
links in another.

On PostgreSQL every graph write holds one transaction-scoped advisory lock, so
several server processes apply evidence one batch at a time and end with exactly the
persons one process would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, delete, func, insert, select, update
from sqlalchemy.orm import Session

from identity.graph import (
    NO_LINK,
    Anchor,
    Component,
    Decision,
    GuardedUnionFind,
    LinkKey,
    Outcome,
    person_id_for,
    singleton,
)
from identity.identifiers import Identifier, NormalizedIdentifier
from identity.models import (
    ClusterRow,
    CounterRow,
    HistoryRow,
    IdentifierRow,
    LinkRow,
    PersonRow,
    PinRow,
    TombstoneRow,
)
from identity.policy import CompiledPolicy
from identity.replay import NodeInfo, StoredLink, connected_clusters, fresh_union_find, replay, stable_labels
from identity.sightings import Ignored, Sighting
from stitchgraph import changes
from stitchgraph.changes import mark_persons
from stitchgraph.db import Database, insert_ignoring_conflicts
from stitchgraph.db import driver_executemany as _driver_executemany

GRAPH_LOCK = "stitchgraph.identity-graph"
_CHUNK = 400  # bound parameters per IN (...) list, well under every backend's limit


def identifier_hash(identifier_type: str, value: str) -> str:
    """The tombstone hash of an identifier (what is kept of an erased one)."""
    return hashlib.sha256(f"{identifier_type}:{value}".encode()).hexdigest()


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _now() -> datetime:
    return datetime.now(UTC)


_IDENTIFIERS = cast(Table, IdentifierRow.__table__)
_PERSONS = cast(Table, PersonRow.__table__)
_CLUSTERS = cast(Table, ClusterRow.__table__)
_LINKS = cast(Table, LinkRow.__table__)
_HISTORY = cast(Table, HistoryRow.__table__)


def _json(value: Any) -> Any:
    """A JSON column read through the driver: text on SQLite, already decoded on PostgreSQL."""
    return json.loads(value) if isinstance(value, str) else value


def _insert_rows(session: Session, table: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Bulk INSERT of ``rows`` (all with the same keys)."""
    if not rows:
        return
    columns = list(rows[0])
    sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    _driver_executemany(session, table, sql, columns, rows)


def _update_by_id(session: Session, table: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Bulk UPDATE of ``rows`` by ``id`` (all with the same keys)."""
    if not rows:
        return
    columns = [k for k in rows[0] if k != "id"]
    sql = f"UPDATE {table.name} SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?"
    _driver_executemany(session, table, sql, [*columns, "id"], rows)


@dataclass(slots=True)
class LinkResult:
    """How one pair of a sighting was decided."""

    first: Identifier
    second: Identifier
    decision: Decision
    reason: str = ""
    detail: str = ""


@dataclass
class SightingResult:
    """What one sighting did: the person of its strongest identifier, its links, what was ignored."""

    person_pk: int | None
    links: list[LinkResult] = field(default_factory=list)
    ignored: list[Ignored] = field(default_factory=list)
    # The identifier that answers for the sighting (its person is ``person_pk``).
    primary_pk: int | None = None


@dataclass(slots=True)
class _Pending:
    key: LinkKey
    a: int
    b: int
    forced: bool
    sighting: int
    source: str
    request_id: str
    operator: str
    existing_link: int | None = None  # id of a stored row whose key this occurrence lowers
    seen: int = 1  # occurrences of the pair in this batch
    last_us: int = 0  # latest occurrence time in this batch


class _Clusters:
    """In-memory union-find over cluster labels with each cluster's latest link key."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.max_key: dict[int, LinkKey] = {}
        self.dirty: set[int] = set()
        self.original: set[int] = set()  # clusters that exist in the store
        self.stored_key: dict[int, LinkKey] = {}

    def add(self, label: int, max_key: LinkKey, stored: bool) -> None:
        if label not in self.parent:
            self.parent[label] = label
            self.max_key[label] = max_key
            if stored:
                self.original.add(label)
                self.stored_key[label] = max_key

    def find(self, label: int) -> int:
        parent = self.parent
        root = label
        while parent[root] != root:
            root = parent[root]
        while parent[label] != root:
            parent[label], label = root, parent[label]
        return root

    def union(self, a: int, b: int, key: LinkKey) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra
            self.max_key[ra] = max(self.max_key[ra], self.max_key.pop(rb))
            if rb in self.dirty:
                self.dirty.discard(rb)
                self.dirty.add(ra)
        if key > self.max_key[ra]:
            self.max_key[ra] = key
        return ra


class IdentityGraph:
    """Graph operations over one :class:`Database`; every method takes the caller's
    session so its writes commit with the caller's other effects."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- ingest -------------------------------------------------------------------------

    def observe(self, session: Session, policy: CompiledPolicy, sightings: Sequence[Sighting]) -> list[SightingResult]:
        """Apply ``sightings`` and return one result per sighting, in order."""
        self.db.advisory_lock(session, GRAPH_LOCK)
        now = _now()
        results = [SightingResult(person_pk=None, ignored=list(s.ignored)) for s in sightings]
        sightings, reborn = self._drop_erased(session, sightings, results)

        seen_at: dict[Identifier, int] = {}
        normalized: dict[Identifier, NormalizedIdentifier] = {}
        for sighting in sightings:
            for n in sighting.kept():
                ident = n.identifier
                if ident not in seen_at or sighting.occurred_us < seen_at[ident]:
                    seen_at[ident] = sighting.occurred_us
                if ident not in normalized or n.match_keys:
                    normalized[ident] = n
        if not seen_at:
            return results

        existing, persons = self._load_context(session, list(seen_at))
        pk_of: dict[Identifier, int] = {ident: row[0] for ident, row in existing.items()}
        info: dict[int, NodeInfo] = {}
        label_of: dict[int, int] = {}  # identifier pk -> stored person pk
        lowered_first_seen: dict[int, int] = {}
        for ident, (pk, person_pk, first_seen, _keys, _ref) in existing.items():
            first = min(first_seen, seen_at[ident])
            if first < first_seen:
                lowered_first_seen[pk] = first
            info[pk] = NodeInfo(ident.type, ident.value, first, policy.priority(ident.type))
            label_of[pk] = person_pk

        new_idents = [ident for ident in seen_at if ident not in pk_of]
        next_pk = self._allocate_pks(session, len(new_idents))
        for offset, ident in enumerate(new_idents):
            pk = next_pk + offset
            pk_of[ident] = pk
            info[pk] = NodeInfo(ident.type, ident.value, seen_at[ident], policy.priority(ident.type))
            label_of[pk] = pk

        clusters = _Clusters()
        person_cluster: dict[int, int] = {}
        for person_pk, person in persons.items():
            clusters.add(person.cluster_pk, person.cluster_key, stored=True)
            person_cluster[person_pk] = person.cluster_pk
        for ident in new_idents:
            pk = pk_of[ident]
            clusters.add(pk, NO_LINK, stored=False)
            person_cluster[pk] = pk

        pins = self._load_pins(session, [p for p, row in persons.items() if row.pinned])
        # Priority is policy, not storage: stored anchors get their type's priority now.
        anchors = {p.anchor_pk: NodeInfo(p.anchor.type, p.anchor.value, p.anchor.first_seen_us,
                                         policy.priority(p.anchor.type)) for p in persons.values()}
        # Stored anchors' person IDs as stored (they may be salted by an old erasure).
        anchor_refs = {p.anchor_pk: p.anchor_ref for p in persons.values()}
        anchor_refs.update({row[0]: row[4] for row in existing.values()})

        def component_of(label: object) -> Component:
            assert isinstance(label, int)
            row = persons.get(label)
            if row is None:  # a new identifier, alone
                node = info[label]
                return singleton(label, node.type, node.value, node.first_seen_us, node.priority, policy.limits)
            anchor_pk = row.anchor_pk
            anchor_info = info.get(anchor_pk) or anchors[anchor_pk]
            return Component(row.size, row.merges, dict(row.type_counts),
                             Anchor(anchor_info.first_seen_us, anchor_info.priority, anchor_info.type,
                                    anchor_info.value), anchor_pk,
                             {label} if label in pins.pin_map else None)

        def lone(label: int) -> Anchor | None:
            if label in persons:
                return None
            node = info[label]
            return Anchor(node.first_seen_us, node.priority, node.type, node.value)

        uf = GuardedUnionFind(policy.limits, component_of, pins.pin_map, lone)
        for pk, first in lowered_first_seen.items():
            comp = uf.components[uf.find(label_of[pk])]
            node = info[pk]
            candidate = Anchor(first, node.priority, node.type, node.value)
            if candidate < comp.anchor:
                comp.anchor, comp.anchor_node = candidate, pk

        # Links of the batch, keyed by pair; an existing pair is only a new sighting of it.
        priority_of = {t.name: t.priority for t in policy.types}
        pending: dict[tuple[int, int], _Pending] = {}
        link_index: list[list[tuple[int, int, Identifier, Identifier]]] = [[] for _ in sightings]
        for s_index, sighting in enumerate(sightings):
            for strong, partner, rank in sighting.star(priority_of):
                a, b = pk_of[strong], pk_of[partner]
                pair = (a, b) if a < b else (b, a)
                link_index[s_index].append((*pair, strong, partner))
                key = LinkKey(sighting.occurred_us, sighting.event_id, rank)
                occurrence = _Pending(key, pair[0], pair[1], sighting.forced, s_index, sighting.source,
                                      sighting.request_id, sighting.operator)
                occurrence.last_us = key.occurred_us
                known = pending.get(pair)
                if known is None:
                    pending[pair] = occurrence
                    continue
                if key < known.key:
                    pending[pair] = occurrence
                occurrence.seen = pending[pair].seen = known.seen + 1
                pending[pair].last_us = max(known.last_us, key.occurred_us)
        stored_links = self._load_links(session, [p for p in pending if p[0] < next_pk and p[1] < next_pk])
        resighted: list[dict[str, Any]] = []
        for pair, (link_id, stored_key, _decision) in stored_links.items():
            occurrence = pending[pair]
            resighted.append({"id": link_id, "last_us": occurrence.last_us, "seen": occurrence.seen})
            if occurrence.key < stored_key:
                occurrence.existing_link = link_id  # earlier evidence of a known pair: late by definition
            else:
                del pending[pair]

        outcomes: dict[tuple[int, int], Outcome] = {}
        merged_existing: list[tuple[_Pending, Outcome, int, int]] = []
        ordered = sorted(pending.values(), key=lambda p: (p.key, *sorted(((info[p.a].type, info[p.a].value),
                                                                             (info[p.b].type, info[p.b].value)))))
        for link in ordered:
            la, lb = label_of[link.a], label_of[link.b]
            ca = clusters.find(person_cluster[uf.label(la)])
            cb = clusters.find(person_cluster[uf.label(lb)])
            late = link.existing_link is not None or ca in clusters.dirty or cb in clusters.dirty or \
                link.key <= max(clusters.max_key[ca], clusters.max_key[cb])
            root = clusters.union(ca, cb, link.key)
            if late:
                clusters.dirty.add(root)
                continue
            ra, rb = uf.label(la), uf.label(lb)
            both_stored = ra in persons and rb in persons
            outcome = uf.link(la, lb, forced=link.forced)
            outcomes[(link.a, link.b)] = outcome
            if outcome.winner is not None:
                person_cluster[outcome.winner] = root
                if both_stored:
                    merged_existing.append((link, outcome, int(ra), int(rb)))
            else:
                person_cluster[int(ra)] = root
                person_cluster[int(rb)] = root

        # -- write ----------------------------------------------------------------------
        final_label = {pk: int(uf.find(label_of[pk])) for pk in info}
        if new_idents:
            _insert_rows(session, _IDENTIFIERS, [
                {"id": pk_of[ident], "type": ident.type, "value": ident.value,
                 "person_pk": final_label[pk_of[ident]], "first_seen_us": seen_at[ident],
                 "person_ref": person_id_for(ident.type, ident.value, salt=reborn.get(ident, "")),
                 "reborn": ident in reborn,
                 "match_keys": {k.platform_key: k.value for k in normalized[ident].match_keys} or None}
                for ident in new_idents
            ])
        if lowered_first_seen:
            _update_by_id(session, _IDENTIFIERS, [{"id": pk, "first_seen_us": us}
                                                  for pk, us in lowered_first_seen.items()])
        self._add_match_keys(session, existing, normalized)

        old_person_ids = {pk: row.person_id for pk, row in persons.items()}
        merged_away = []
        for old_pk in persons:
            new_label = int(uf.find(old_pk))
            if new_label != old_pk:
                session.execute(update(_IDENTIFIERS).where(_IDENTIFIERS.c.person_pk == old_pk)
                                .values(person_pk=new_label))
                session.execute(delete(_PERSONS).where(_PERSONS.c.id == old_pk))
                merged_away.append(old_pk)
        mark_persons(session, merged_away, changes.MERGED)

        person_rows = []
        touched_roots = {final_label[pk] for pk in info}
        for root in touched_roots:
            comp = uf.components[root]
            cluster = clusters.find(person_cluster.get(root, root))
            stored = persons.get(root)
            if stored is not None and stored.anchor_pk == comp.anchor_node:
                person_id = stored.person_id
            else:
                person_id = anchor_refs.get(comp.anchor_node) or person_id_for(
                    info[comp.anchor_node].type, info[comp.anchor_node].value,
                    salt=reborn.get(Identifier(info[comp.anchor_node].type, info[comp.anchor_node].value), ""))
            person_rows.append({
                "id": root, "person_id": person_id,
                "anchor_pk": comp.anchor_node, "size": comp.size, "merges": comp.merges,
                "type_counts": dict(sorted(comp.counts.items())), "pinned": 1 if comp.pinned else 0,
                "cluster_pk": cluster, "updated_at": now,
            })
        existing_roots = [r for r in person_rows if r["id"] in persons and _person_changed(persons[r["id"]], r)]
        fresh_roots = [dict(r, created_at=now) for r in person_rows if r["id"] not in persons]
        _update_by_id(session, _PERSONS, existing_roots)
        _insert_rows(session, _PERSONS, fresh_roots)
        mark_persons(session, touched_roots, changes.IDENTITY)

        # Clusters: relabel persons of clusters absorbed by another, upsert the survivors.
        for label in list(clusters.parent):
            root = clusters.find(label)
            if label != root and label in clusters.original:
                session.execute(update(_PERSONS).where(_PERSONS.c.cluster_pk == label).values(cluster_pk=root))
                session.execute(delete(_CLUSTERS).where(_CLUSTERS.c.id == label))
        cluster_updates, cluster_inserts = [], []
        for label in {clusters.find(label) for label in clusters.parent}:
            key = clusters.max_key[label]
            row = {"id": label, "max_us": key.occurred_us, "max_event": key.event_id, "max_rank": key.rank}
            if label not in clusters.original:
                cluster_inserts.append(row)
            elif key != clusters.stored_key.get(label):
                cluster_updates.append(row)
        _update_by_id(session, _CLUSTERS, cluster_updates)
        _insert_rows(session, _CLUSTERS, cluster_inserts)

        link_inserts, link_updates, history = [], [], []
        for pair, link in pending.items():
            decided_now = outcomes.get(pair)
            decision, reason, detail = (decided_now.decision.value, str(decided_now.reason), decided_now.detail) \
                if decided_now else ("pending", "", "")
            fields = {"occurred_us": link.key.occurred_us, "event_id": link.key.event_id, "rank": link.key.rank,
                      "source": link.source, "request_id": link.request_id, "forced": link.forced,
                      "operator": link.operator, "decision": decision, "reason": reason, "detail": detail}
            if link.existing_link is not None:
                link_updates.append({"id": link.existing_link, **fields})
            else:
                link_inserts.append({"a_pk": pair[0], "b_pk": pair[1], "times_seen": link.seen,
                                     "last_seen_us": link.last_us, **fields})
            if decided_now is not None and decided_now.decision is Decision.REFUSED:
                history.append(self._history("REFUSED", link, pair, now, reason=reason, detail=detail))
        for link, _outcome, ra, rb in merged_existing:
            entry = self._history("MERGED", link, (link.a, link.b), now,
                                  detail="two persons were joined by this link")
            entry["related_person_ids"] = sorted({old_person_ids[ra], old_person_ids[rb]})
            history.append(entry)
        _insert_rows(session, _LINKS, link_inserts)
        _update_by_id(session, _LINKS, link_updates)
        if resighted:
            self._bump_times_seen(session, resighted)

        for s_index, sighting in enumerate(sightings):
            primary = self._primary(sighting, link_index[s_index], priority_of)
            for ignored in results[s_index].ignored:
                if primary is None:
                    continue
                history.append({
                    "kind": "IDENTIFIER_IGNORED", "occurred_us": sighting.occurred_us, "recorded_at": now,
                    "a_pk": pk_of[primary], "b_pk": None, "reason": ignored.reason, "detail": ignored.detail,
                    "event_id": sighting.event_id, "source": sighting.source, "operator": sighting.operator,
                    "person_id": "", "related_person_ids": [],
                    "subject": {"type": ignored.type, "value": ignored.value},
                })
        if history:
            session.execute(insert(_HISTORY), history)

        if clusters.dirty:
            self.resolve_clusters(session, policy, {clusters.find(c) for c in clusters.dirty}, reason="late evidence")

        # Results: the person of each sighting's strongest identifier and each link's decision,
        # from memory unless re-resolution may have changed them.
        decided: dict[tuple[int, int], tuple[str, str, str]] = {
            pair: (o.decision.value, str(o.reason), o.detail) for pair, o in outcomes.items()}
        for pair, (_id, _key, decision) in stored_links.items():
            if pair not in pending:
                decided.setdefault(pair, (decision, "", ""))
        unknown = [(r[0], r[1]) for rows in link_index for r in rows if (r[0], r[1]) not in decided]
        unknown += [pair for pair, (_id, _key, decision) in stored_links.items()
                    if pair not in pending and decision == "refused"]
        if unknown:
            decided.update(self._load_decisions(session, unknown))
        primaries = {}
        for s_index, sighting in enumerate(sightings):
            primary = self._primary(sighting, link_index[s_index], priority_of)
            if primary is not None:
                primaries[s_index] = pk_of[primary]
        if clusters.dirty:
            person_of = self._person_pks(session, list(set(primaries.values())))
        else:
            person_of = {pk: final_label[pk] for pk in primaries.values()}
        for s_index, result in enumerate(results):
            if s_index in primaries:
                result.primary_pk = primaries[s_index]
                result.person_pk = person_of[primaries[s_index]]
            for a, b, strong, partner in link_index[s_index]:
                decision, reason, detail = decided[(a, b)]
                result.links.append(LinkResult(strong, partner, Decision(decision), reason, detail))
        return results

    @staticmethod
    def _allocate_pks(session: Session, count: int) -> int:
        """The first of ``count`` fresh identifier primary keys (the caller holds the graph
        lock). Keys are never reused, even after the largest one was erased."""
        current = session.execute(select(CounterRow.value).where(CounterRow.name == "identifier")).scalar()
        if current is None:
            current = session.execute(select(func.max(IdentifierRow.id))).scalar() or 0
            insert_ignoring_conflicts(session, CounterRow.__table__, {"name": "identifier", "value": current})
        if count:
            session.execute(update(CounterRow).where(CounterRow.name == "identifier")
                            .values(value=current + count))
        return int(current) + 1

    @staticmethod
    def _primary(sighting: Sighting, links: Sequence[tuple[int, int, Identifier, Identifier]],
                 priority_of: dict[str, int]) -> Identifier | None:
        """The identifier whose person answers for a sighting: the centre of its links,
        else its strongest identifier that was not erased."""
        if links:
            return links[0][2]
        kept = [i for i in sighting.ordered(priority_of) if i not in sighting.erased]
        return kept[0] if kept else None

    # -- slow path ------------------------------------------------------------------------

    def resolve_clusters(self, session: Session, policy: CompiledPolicy, cluster_pks: Iterable[int],
                         *, reason: str, operator: str = "") -> list[int]:
        """Re-resolve the persons of ``cluster_pks`` from their stored evidence; return the
        person pks that exist afterwards in those clusters."""
        cluster_pks = sorted(set(cluster_pks))
        person_pks = [pk for chunk in _chunks(cluster_pks) for pk in session.execute(
            select(PersonRow.id).where(PersonRow.cluster_pk.in_(chunk))).scalars()]
        node_rows = [row for chunk in _chunks(person_pks) for row in session.execute(
            select(IdentifierRow.id, IdentifierRow.type, IdentifierRow.value, IdentifierRow.first_seen_us,
                   IdentifierRow.person_pk).where(IdentifierRow.person_pk.in_(chunk)))]
        return self._resolve_nodes(session, policy, node_rows, person_pks, cluster_pks, reason=reason,
                                   operator=operator)

    def _resolve_nodes(self, session: Session, policy: CompiledPolicy, node_rows: Sequence[Any],
                       old_person_pks: Sequence[int], old_cluster_pks: Sequence[int], *, reason: str,
                       operator: str) -> list[int]:
        now = _now()
        nodes = {r.id: NodeInfo(r.type, r.value, r.first_seen_us, policy.priority(r.type)) for r in node_rows}
        old_label = {r.id: r.person_pk for r in node_rows}
        old_person_ids = dict(session.execute(
            select(PersonRow.id, PersonRow.person_id).where(PersonRow.id.in_(list(old_person_pks))))
            .all()) if old_person_pks else {}
        ids = list(nodes)
        link_rows = [row for chunk in _chunks(ids) for row in session.execute(
            select(LinkRow.id, LinkRow.a_pk, LinkRow.b_pk, LinkRow.occurred_us, LinkRow.event_id, LinkRow.rank,
                   LinkRow.forced, LinkRow.decision, LinkRow.reason, LinkRow.source, LinkRow.operator)
            .where(LinkRow.a_pk.in_(chunk)))]
        link_rows = [r for r in link_rows if r.b_pk in nodes]
        pin_rows = [row for chunk in _chunks(ids) for row in session.execute(
            select(PinRow.a_pk, PinRow.b_pk).where(PinRow.a_pk.in_(chunk)))]
        stored = {(r.a_pk, r.b_pk): r for r in link_rows}
        result = replay(nodes, [StoredLink(LinkKey(r.occurred_us, r.event_id, r.rank), r.a_pk, r.b_pk, r.forced)
                                for r in link_rows], policy.limits,
                        [(r.a_pk, r.b_pk) for r in pin_rows if r.b_pk in nodes])
        # New labels: the smallest identifier pk of each person / cluster (deterministic).
        members: dict[int, list[int]] = {}
        for node in nodes:
            members.setdefault(result.label_of(node), []).append(node)
        person_label = stable_labels(members, old_label)
        old_cluster = dict(session.execute(select(PersonRow.id, PersonRow.cluster_pk)
                                           .where(PersonRow.id.in_(list(old_person_pks)))).all()) \
            if old_person_pks else {}
        cluster_of = self._stable_clusters(nodes, [(r.a_pk, r.b_pk) for r in link_rows],
                                           {n: old_cluster.get(old_label[n], -1) for n in nodes})
        cluster_key: dict[int, LinkKey] = {}
        for r in link_rows:
            c = cluster_of[r.a_pk]
            key = LinkKey(r.occurred_us, r.event_id, r.rank)
            if key > cluster_key.get(c, NO_LINK):
                cluster_key[c] = key

        for chunk in _chunks(list(old_person_pks)):
            session.execute(delete(_PERSONS).where(_PERSONS.c.id.in_(chunk)))
        for chunk in _chunks(list(old_cluster_pks)):
            session.execute(delete(_CLUSTERS).where(_CLUSTERS.c.id.in_(chunk)))
        relabel = [{"id": n, "person_pk": person_label[result.label_of(n)]} for n in nodes
                   if person_label[result.label_of(n)] != old_label[n]]
        _update_by_id(session, _IDENTIFIERS, relabel)
        person_rows = []
        refs = self._reborn_refs(session, list(nodes))
        for root, comp in result.components().items():
            label = person_label[root]
            anchor = nodes[comp.anchor_node]
            person_rows.append({
                "id": label, "person_id": refs.get(comp.anchor_node) or person_id_for(anchor.type, anchor.value),
                "anchor_pk": comp.anchor_node,
                "size": comp.size, "merges": comp.merges, "type_counts": dict(sorted(comp.counts.items())),
                "pinned": 1 if comp.pinned else 0, "cluster_pk": cluster_of[label], "created_at": now,
                "updated_at": now,
            })
        if person_rows:
            session.execute(insert(_PERSONS), person_rows)
        mark_persons(session, old_person_pks, changes.SPLIT if "split" in reason else changes.MERGED)
        mark_persons(session, (r["id"] for r in person_rows), changes.IDENTITY)
        cluster_rows = [{"id": c, "max_us": k.occurred_us, "max_event": k.event_id, "max_rank": k.rank}
                        for c, k in ((c, cluster_key.get(c, NO_LINK)) for c in set(cluster_of.values()))]
        if cluster_rows:
            session.execute(insert(_CLUSTERS), cluster_rows)
        changed = []
        # History: a link that is refused now and was not before gets its REFUSED entry, as
        # it would have had the evidence arrived in order.
        history: list[dict[str, Any]] = []
        for link, outcome in result.outcomes:
            row = stored[(link.a, link.b)]
            if row.decision != outcome.decision.value or row.reason != str(outcome.reason):
                changed.append({"id": row.id, "decision": outcome.decision.value, "reason": str(outcome.reason),
                                "detail": outcome.detail})
                if outcome.decision is Decision.REFUSED:
                    history.append({
                        "kind": "REFUSED", "occurred_us": row.occurred_us, "recorded_at": now, "a_pk": row.a_pk,
                        "b_pk": row.b_pk, "person_id": "", "related_person_ids": [], "reason": str(outcome.reason),
                        "detail": outcome.detail, "operator": row.operator, "event_id": row.event_id,
                        "source": row.source, "subject": None})
        _update_by_id(session, _LINKS, changed)
        # ... and every person whose membership differs from before was re-resolved.
        before: dict[int, set[int]] = {}
        for node, label in old_label.items():
            before.setdefault(label, set()).add(node)
        before_sets = {frozenset(v) for v in before.values()}
        for root, nodes_ in members.items():
            if frozenset(nodes_) in before_sets:
                continue
            comp = result.components()[root]
            previous = sorted({old_person_ids[old_label[n]] for n in nodes_ if old_label[n] in old_person_ids})
            anchor = nodes[comp.anchor_node]
            history.append({
                "kind": "RE_RESOLVED", "occurred_us": int(now.timestamp() * 1_000_000), "recorded_at": now,
                "a_pk": comp.anchor_node, "b_pk": None,
                "person_id": refs.get(comp.anchor_node) or person_id_for(anchor.type, anchor.value),
                "related_person_ids": previous, "reason": reason.upper().replace(" ", "_"),
                "detail": f"re-resolved from stored evidence ({reason}); {len(nodes_)} identifiers",
                "operator": operator, "event_id": "", "source": "", "subject": None,
            })
        if history:
            session.execute(insert(_HISTORY), history)
        return sorted(person_label.values())

    @staticmethod
    def _stable_clusters(nodes: Iterable[int], pairs: Sequence[tuple[int, int]],
                         old_cluster_of_node: dict[int, int]) -> dict[int, int]:
        """Each node's cluster label, keeping old cluster labels where they still apply."""
        roots = connected_clusters(nodes, pairs)
        members: dict[int, list[int]] = {}
        for node, root in roots.items():
            members.setdefault(root, []).append(node)
        labels = stable_labels(members, old_cluster_of_node)
        return {node: labels[root] for node, root in roots.items()}

    # -- rebuild ---------------------------------------------------------------------------

    def rebuild(self, session: Session, policy: CompiledPolicy) -> RebuildStats:
        """Re-derive every person, cluster and link decision from the stored evidence.

        Built for a million links in bounded memory: rows come through the driver as
        tuples, the database sorts the links (byte order, like Python's), a node gets a
        component only once a link touches it, and each decision is compared with the
        stored one as it is made. Persons that come out unchanged keep their labels.
        """
        self.db.advisory_lock(session, GRAPH_LOCK)
        started = _now()
        connection = session.connection()
        raw = connection.connection.driver_connection

        def rows(sql: str) -> Iterable[Any]:
            # The DBAPI cursor itself: SQLAlchemy's per-row wrapping costs more than the
            # database does at a million rows.
            cursor = raw.cursor()  # type: ignore[union-attr]  # a live connection always has one
            cursor.execute(sql)
            while batch := cursor.fetchmany(10_000):
                yield from batch
            cursor.close()

        priority = {t.name: t.priority for t in policy.types}
        nodes: dict[int, NodeInfo] = {}
        old_label: dict[int, int] = {}
        types: dict[str, str] = {}  # one string object per type, not one per row
        for pk, type_, value, first_seen, person_pk in rows(
                "SELECT id, type, value, first_seen_us, person_pk FROM identifiers"):
            type_ = types.setdefault(type_, type_)
            nodes[pk] = NodeInfo(type_, value, first_seen, priority.get(type_, 10_000))
            old_label[pk] = person_pk
        pins = list(rows("SELECT a_pk, b_pk FROM identity_pins"))
        pinned_nodes = {node for pair in pins for node in pair}
        limits = policy.limits
        uf = fresh_union_find(nodes, limits, pins)
        collate = ' COLLATE "C"' if connection.dialect.name == "postgresql" else ""
        cursor = rows(
            "SELECT id, a_pk, b_pk, occurred_us, event_id, rank, forced, decision, reason FROM identity_links "
            f"ORDER BY occurred_us, event_id{collate}, rank")
        changed: list[dict[str, Any]] = []
        # Clusters are persons joined by refused links (accepted and redundant links lie
        # inside persons), so only refused pairs are kept; and since links arrive in key
        # order, the last key seen at a node is the latest of any link touching it.
        refused_pairs: list[tuple[int, int]] = []
        last_key: dict[int, LinkKey] = {}
        link_count = 0

        def decide(group: list[Any]) -> None:
            if len(group) > 1:  # one key shared by several pairs: order them by identifiers
                group.sort(key=lambda r: StoredLink(LinkKey(r[3], r[4], r[5]), r[1], r[2]).sort_key(nodes))
            key = LinkKey(group[-1][3], group[-1][4], group[-1][5])
            for link_id, a, b, _us, _event, _rank, forced, decision, reason in group:
                outcome = uf.link(a, b, forced=bool(forced))
                last_key[a] = last_key[b] = key
                if outcome.decision is Decision.REFUSED:
                    refused_pairs.append((a, b))
                if decision != outcome.decision.value or reason != str(outcome.reason):
                    changed.append({"id": link_id, "decision": outcome.decision.value,
                                    "reason": str(outcome.reason), "detail": outcome.detail})

        group: list[Any] = []
        for row in cursor:
            link_count += 1
            if group and (row[3], row[4], row[5]) != (group[0][3], group[0][4], group[0][5]):
                decide(group)
                group = []
            group.append(row)
        if group:
            decide(group)

        members: dict[int, list[int]] = {}
        for node in nodes:
            members.setdefault(int(uf.label(node)), []).append(node)
        labels = stable_labels(members, old_label)
        stored_persons: dict[int, tuple[Any, ...]] = {row[0]: tuple(row[1:]) for row in rows(
            "SELECT id, cluster_pk, person_id, anchor_pk, size, merges, type_counts, pinned FROM persons")}
        old_cluster = {pk: row[0] for pk, row in stored_persons.items()}
        person_cluster = connected_clusters(members, ((uf.label(a), uf.label(b)) for a, b in refused_pairs))
        cluster_members: dict[int, list[int]] = {}
        for root, ns in members.items():
            cluster_members.setdefault(person_cluster[root], []).extend(ns)
        cluster_labels = stable_labels(cluster_members, {n: old_cluster.get(old_label[n], -1) for n in nodes})
        cluster_of: dict[int, int] = {}
        cluster_key: dict[int, LinkKey] = {}
        for root, ns in cluster_members.items():
            label = cluster_labels[root]
            latest = NO_LINK
            for n in ns:
                cluster_of[n] = label
                key = last_key.get(n)
                if key is not None and key > latest:
                    latest = key
            if latest is not NO_LINK:
                cluster_key[label] = latest
        del cluster_members
        last_key.clear()  # the largest structures of the rebuild: free them before writing
        refused_pairs.clear()

        now = _now()
        refs = dict(rows("SELECT id, person_ref FROM identifiers WHERE reborn"))
        stored_clusters = {row[0]: LinkKey(*row[1:]) for row in rows(
            "SELECT id, max_us, max_event, max_rank FROM identity_clusters")}
        relabel = [(labels[root], n) for root, ns in members.items() for n in ns if labels[root] != old_label[n]]
        if relabel:
            marker = "?" if connection.dialect.paramstyle == "qmark" else "%s"
            connection.exec_driver_sql(f"UPDATE identifiers SET person_pk = {marker} WHERE id = {marker}", relabel)
        person_rows: list[dict[str, Any]] = []
        for root in members:
            label = labels[root]
            comp = uf.components.get(root)
            if comp is None:  # never linked: a person of one identifier
                info = nodes[root]
                person_rows.append({
                    "id": label, "person_id": refs.get(root) or person_id_for(info.type, info.value),
                    "anchor_pk": root, "size": 1,
                    "merges": 0, "type_counts": {info.type: 1} if info.type in limits.type_limits else {},
                    "pinned": 1 if root in pinned_nodes else 0, "cluster_pk": cluster_of[label], "created_at": now,
                    "updated_at": now})
                continue
            anchor = nodes[comp.anchor_node]
            person_rows.append({
                "id": label, "person_id": refs.get(comp.anchor_node) or person_id_for(anchor.type, anchor.value),
                "anchor_pk": comp.anchor_node, "size": comp.size, "merges": comp.merges,
                "type_counts": dict(comp.counts),
                "pinned": 1 if comp.pinned else 0, "cluster_pk": cluster_of[label], "created_at": now,
                "updated_at": now})
        # Write only the difference from what is stored: a rebuild of a consistent store
        # reads everything and writes nothing.
        person_ids = {r["id"] for r in person_rows}
        gone = [pk for pk in stored_persons if pk not in person_ids]
        fresh, changed_persons = [], []
        for row in person_rows:
            stored = stored_persons.get(row["id"])
            if stored is None:
                fresh.append(row)
            elif (stored[:5] + stored[6:] != (row["cluster_pk"], row["person_id"], row["anchor_pk"], row["size"],
                                              row["merges"], row["pinned"])
                  or _json(stored[5]) != row["type_counts"]):
                changed_persons.append(row)
        # Changed rows are replaced, not updated: a person ID can move from one row to
        # another, and an in-place update would collide on the unique person_id.
        for chunk in _chunks([*gone, *(r["id"] for r in changed_persons)], 10_000):
            session.execute(delete(_PERSONS).where(_PERSONS.c.id.in_(chunk)))
        _insert_rows(session, _PERSONS, [*fresh, *changed_persons])
        mark_persons(session, gone, changes.MERGED)
        mark_persons(session, (r["id"] for r in [*fresh, *changed_persons]), changes.IDENTITY)
        clusters_now = {c: cluster_key.get(c, NO_LINK) for c in set(cluster_of.values())}
        for chunk in _chunks([c for c in stored_clusters if c not in clusters_now], 10_000):
            session.execute(delete(_CLUSTERS).where(_CLUSTERS.c.id.in_(chunk)))
        _update_by_id(session, _CLUSTERS, [
            {"id": c, "max_us": k.occurred_us, "max_event": k.event_id, "max_rank": k.rank}
            for c, k in clusters_now.items() if c in stored_clusters and stored_clusters[c] != k])
        _insert_rows(session, _CLUSTERS, [
            {"id": c, "max_us": k.occurred_us, "max_event": k.event_id, "max_rank": k.rank}
            for c, k in clusters_now.items() if c not in stored_clusters])
        _update_by_id(session, _LINKS, changed)
        return RebuildStats(identifiers=len(nodes), links=link_count, persons=len(person_rows),
                            relabelled=len(relabel), decisions_changed=len(changed),
                            persons_changed=len(gone) + len(fresh) + len(changed_persons),
                            seconds=(_now() - started).total_seconds())

    # -- loading helpers ---------------------------------------------------------------------

    def _drop_erased(self, session: Session, sightings: Sequence[Sighting],
                     results: list[SightingResult]) -> tuple[list[Sighting], dict[Identifier, str]]:
        """Drop identifiers erased at or after the sighting's time; return the kept
        sightings and, for erased identifiers seen again afterwards, the erasure that
        salts their new person ID (so a returning human never gets the erased ID back)."""
        if session.execute(select(TombstoneRow.identifier_hash).limit(1)).first() is None:
            return list(sightings), {}
        hashes = {n.identifier: identifier_hash(n.identifier.type, n.identifier.value)
                  for s in sightings for n in s.identifiers}
        erased: dict[str, tuple[int, str]] = {}
        for chunk in _chunks(list(set(hashes.values()))):
            for digest, erased_us, erasure_id in session.execute(
                    select(TombstoneRow.identifier_hash, TombstoneRow.erased_us, TombstoneRow.erasure_id)
                    .where(TombstoneRow.identifier_hash.in_(chunk))):
                erased[digest] = (erased_us, erasure_id)
        if not erased:
            return list(sightings), {}
        kept, reborn = [], {}
        for index, sighting in enumerate(sightings):
            erased_now = set()
            positions = sighting.positions or (-1,) * len(sighting.identifiers)  # operator sightings have none
            for position, n in zip(positions, sighting.identifiers, strict=True):
                tombstone = erased.get(hashes[n.identifier])
                if tombstone is not None and sighting.occurred_us <= tombstone[0]:
                    erased_now.add(n.identifier)
                    results[index].ignored.append(Ignored(position, n.identifier.type, "ERASED",
                                                          "this identifier was erased; evidence from before "
                                                          "the erasure cannot bring it back", None))
                elif tombstone is not None:
                    reborn[n.identifier] = tombstone[1]
            kept.append(dataclasses.replace(sighting, erased=frozenset(erased_now)) if erased_now else sighting)
        return kept, reborn

    @staticmethod
    def _reborn_refs(session: Session, pks: Sequence[int]) -> dict[int, str]:
        """Person refs of identifiers re-created after an erasure (salted, so not derivable)."""
        refs: dict[int, str] = {}
        for chunk in _chunks(list(pks)):
            refs.update(session.execute(select(IdentifierRow.id, IdentifierRow.person_ref).where(
                IdentifierRow.reborn.is_(True), IdentifierRow.id.in_(chunk))).all())
        return refs

    @staticmethod
    def _load_context(session: Session, idents: Sequence[Identifier]) -> tuple[
            dict[Identifier, tuple[int, int, int, Any, str]], dict[int, _StoredPerson]]:
        """The stored identifiers among ``idents`` with their persons, clusters and anchors,
        in one joined query per type and chunk (``type = ? AND value IN (...)`` seeks the
        unique index on both engines; a row-value IN list makes SQLite scan it)."""
        by_type: dict[str, list[str]] = {}
        for ident in idents:
            by_type.setdefault(ident.type, []).append(ident.value)
        connection = session.connection()
        marker = "?" if connection.dialect.paramstyle == "qmark" else "%s"
        found: dict[Identifier, tuple[int, int, int, Any, str]] = {}
        persons: dict[int, _StoredPerson] = {}
        for type_name, values_ in by_type.items():
            for chunk in _chunks(values_):
                sql = ("SELECT i.id, i.value, i.person_pk, i.first_seen_us, i.match_keys, p.person_id, p.anchor_pk, "
                       "p.size, p.merges, p.type_counts, p.pinned, p.cluster_pk, c.max_us, c.max_event, c.max_rank, "
                       "a.type, a.value, a.first_seen_us, a.person_ref, i.person_ref FROM identifiers i "
                       "JOIN persons p ON p.id = i.person_pk JOIN identity_clusters c ON c.id = p.cluster_pk "
                       "JOIN identifiers a ON a.id = p.anchor_pk "
                       f"WHERE i.type = {marker} AND i.value IN ({', '.join([marker] * len(chunk))})")
                for row in connection.exec_driver_sql(sql, (type_name, *chunk)):
                    found[Identifier(type_name, row[1])] = (row[0], row[2], row[3], _json(row[4]), row[19])
                    if row[2] not in persons:
                        persons[row[2]] = _StoredPerson(
                            person_id=row[5], anchor_pk=row[6], size=row[7], merges=row[8],
                            type_counts=_json(row[9]) or {}, pinned=row[10], cluster_pk=row[11],
                            cluster_key=LinkKey(row[12], row[13], row[14]),
                            anchor=NodeInfo(row[15], row[16], row[17], priority=-1),  # set by the caller
                            anchor_ref=row[18])
        return found, persons

    def _load_pins(self, session: Session, pinned_persons: Sequence[int]) -> _Pins:
        """The pins of ``pinned_persons``, translated to person labels: the fast path's
        union-find holds persons, and a pin between two identifiers keeps apart the
        persons that hold them."""
        pins = _Pins()
        if not pinned_persons:
            return pins
        members = [row.id for chunk in _chunks(list(pinned_persons)) for row in session.execute(
            select(IdentifierRow.id).where(IdentifierRow.person_pk.in_(chunk)))]
        pairs = {(a, b) for chunk in _chunks(members) for a, b in session.execute(
            select(PinRow.a_pk, PinRow.b_pk).where(PinRow.a_pk.in_(chunk) | PinRow.b_pk.in_(chunk)))}
        ends = sorted({node for pair in pairs for node in pair})
        person_of = {pk: person for chunk in _chunks(ends) for pk, person in session.execute(
            select(IdentifierRow.id, IdentifierRow.person_pk).where(IdentifierRow.id.in_(chunk)))}
        for a, b in pairs:
            pa, pb = person_of[a], person_of[b]
            pins.pin_map.setdefault(pa, set()).add(pb)
            pins.pin_map.setdefault(pb, set()).add(pa)
        return pins

    @staticmethod
    def _pairs_query(session: Session, columns: Sequence[str], pairs: Sequence[tuple[int, int]]) -> Iterable[Any]:
        """Rows (a_pk, b_pk, *columns) of ``identity_links`` for exactly ``pairs``: a VALUES
        CTE joined on the unique (a_pk, b_pk) index, which both engines answer with one
        seek per pair. Written as driver SQL: compiling a fresh VALUES construct per batch
        through SQLAlchemy costs more than the query."""
        connection = session.connection()
        marker = "?" if connection.dialect.paramstyle == "qmark" else "%s"
        selected = ", ".join(f"l.{name}" for name in ("a_pk", "b_pk", *columns))
        for chunk in _chunks(sorted(set(pairs)), 300):
            rows = ", ".join([f"({marker}, {marker})"] * len(chunk))
            sql = (f"WITH wanted(a, b) AS (VALUES {rows}) SELECT {selected} FROM wanted "
                   "JOIN identity_links l ON l.a_pk = wanted.a AND l.b_pk = wanted.b")
            yield from connection.exec_driver_sql(sql, tuple(v for pair in chunk for v in pair))

    def _load_links(self, session: Session,
                    pairs: Sequence[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, LinkKey, str]]:
        return {(r[0], r[1]): (r[2], LinkKey(r[3], r[4], r[5]), r[6]) for r in self._pairs_query(
            session, ["id", "occurred_us", "event_id", "rank", "decision"], pairs)}

    def _load_decisions(self, session: Session,
                        pairs: Sequence[tuple[int, int]]) -> dict[tuple[int, int], tuple[str, str, str]]:
        return {(r[0], r[1]): (r[2], r[3], r[4]) for r in self._pairs_query(
            session, ["decision", "reason", "detail"], pairs)}

    @staticmethod
    def _person_pks(session: Session, identifier_pks: Sequence[int]) -> dict[int, int]:
        found: dict[int, int] = {}
        for chunk in _chunks(list(identifier_pks)):
            found.update(session.execute(select(IdentifierRow.id, IdentifierRow.person_pk)
                                         .where(IdentifierRow.id.in_(chunk))).all())
        return found

    @staticmethod
    def _add_match_keys(session: Session, existing: dict[Identifier, tuple[int, int, int, Any, str]],
                        normalized: dict[Identifier, NormalizedIdentifier]) -> None:
        updates = []
        for ident, (pk, _person, _seen, stored, _ref) in existing.items():
            keys = {k.platform_key: k.value for k in normalized[ident].match_keys}
            if keys and keys != (stored or {}):
                updates.append({"id": pk, "match_keys": {**(stored or {}), **keys}})
        _update_by_id(session, _IDENTIFIERS, updates)

    @staticmethod
    def _bump_times_seen(session: Session, resighted: list[dict[str, Any]]) -> None:
        statement = update(_LINKS).where(_LINKS.c.id == bindparam("_id")).values(
            times_seen=_LINKS.c.times_seen + bindparam("_seen"),
            last_seen_us=case((_LINKS.c.last_seen_us < bindparam("_last"), bindparam("_last")),
                              else_=_LINKS.c.last_seen_us))
        session.execute(statement, [{"_id": r["id"], "_last": r["last_us"], "_seen": r["seen"]} for r in resighted])

    @staticmethod
    def _history(kind: str, link: _Pending, pair: tuple[int, int], now: datetime, *, reason: str = "",
                 detail: str = "") -> dict[str, Any]:
        return {"kind": kind, "occurred_us": link.key.occurred_us, "recorded_at": now, "a_pk": pair[0],
                "b_pk": pair[1], "person_id": "", "related_person_ids": [], "reason": reason, "detail": detail,
                "operator": link.operator, "event_id": link.key.event_id, "source": link.source, "subject": None}


def _person_changed(stored: Any, row: dict[str, Any]) -> bool:
    return bool(stored.size != row["size"] or stored.merges != row["merges"] or stored.anchor_pk != row["anchor_pk"]
                or stored.cluster_pk != row["cluster_pk"] or stored.pinned != row["pinned"]
                or stored.type_counts != row["type_counts"] or stored.person_id != row["person_id"])


@dataclass(frozen=True, slots=True)
class _StoredPerson:
    person_id: str
    anchor_pk: int
    size: int
    merges: int
    type_counts: dict[str, int]
    pinned: int
    cluster_pk: int
    cluster_key: LinkKey
    anchor: NodeInfo
    anchor_ref: str


@dataclass
class _Pins:
    # Person label -> labels of the persons it must never join.
    pin_map: dict[int, set[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class RebuildStats:
    identifiers: int
    links: int
    persons: int
    relabelled: int
    decisions_changed: int
    seconds: float
    persons_changed: int = 0  # person rows removed, added or changed
