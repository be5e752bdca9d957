"""Queries over the identity graph: persons by ID or identifier, explain, links, history.

A person ID that was merged away, or belongs to a person since re-resolved, still
resolves: every identifier remembers the person ID it would give as an anchor, so the
old ID leads to the person that now holds that identifier.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import networkx as nx
from sqlalchemy import func, or_, select, tuple_
from sqlalchemy.orm import Session

from identity.identifiers import Identifier
from identity.models import ErasureRow, HistoryRow, IdentifierRow, LinkRow, PersonRow
from identity.views import ErasureView, Explanation, HistoryView, LinkView, PersonView
from stitchgraph.errors import NotFound


def person_pk_by_id(session: Session, person_id: str) -> int | None:
    """The person pk for a current or former person ID, or ``None``."""
    pk = session.execute(select(PersonRow.id).where(PersonRow.person_id == person_id)).scalar()
    if pk is not None:
        return int(pk)
    pk = session.execute(select(IdentifierRow.person_pk).where(IdentifierRow.person_ref == person_id)
                         .order_by(IdentifierRow.id).limit(1)).scalar()
    return int(pk) if pk is not None else None


def person_pk_by_identifier(session: Session, identifier: Identifier) -> int | None:
    pk = session.execute(select(IdentifierRow.person_pk).where(
        IdentifierRow.type == identifier.type, IdentifierRow.value == identifier.value)).scalar()
    return int(pk) if pk is not None else None


def require_person_pk(session: Session, person_id: str, field: str = "name") -> int:
    pk = person_pk_by_id(session, person_id)
    if pk is None:
        raise NotFound(f"person '{person_id}' not found", reason="PERSON_NOT_FOUND",
                       metadata={"field": field, "person_id": person_id})
    return pk


def person_row(session: Session, person_pk: int) -> PersonRow | None:
    """The person row as stored now. The graph store writes persons through Core, so a
    plain ``session.get`` could hand back a stale object from the identity map."""
    return session.execute(select(PersonRow).where(PersonRow.id == person_pk)
                           .execution_options(populate_existing=True)).scalar()


def person_view(session: Session, person_pk: int) -> PersonView:
    person = person_row(session, person_pk)
    if person is None:
        raise NotFound("person not found", reason="PERSON_NOT_FOUND")
    rows = session.execute(select(IdentifierRow.id, IdentifierRow.type, IdentifierRow.value,
                                  IdentifierRow.match_keys, IdentifierRow.first_seen_us)
                           .where(IdentifierRow.person_pk == person_pk)
                           .order_by(IdentifierRow.first_seen_us, IdentifierRow.type, IdentifierRow.value)).all()
    identifiers = tuple(Identifier(r.type, r.value) for r in rows)
    counts: dict[str, int] = {}
    for identifier in identifiers:
        counts[identifier.type] = counts.get(identifier.type, 0) + 1
    anchor_row = next(r for r in rows if r.id == person.anchor_pk)
    keys = tuple((r.type, key, value) for r in rows for key, value in sorted((r.match_keys or {}).items()))
    members = select(IdentifierRow.id).where(IdentifierRow.person_pk == person_pk).scalar_subquery()
    merged = sorted({pid for related in session.execute(
        select(HistoryRow.related_person_ids).where(HistoryRow.kind.in_(("MERGED", "RE_RESOLVED", "FORCED_MERGE")),
                                                    HistoryRow.a_pk.in_(members))).scalars()
        for pid in related or () if pid != person.person_id and person_pk_by_id(session, pid) == person_pk})
    last_link = session.execute(select(func.max(LinkRow.last_seen_us)).where(
        or_(LinkRow.a_pk.in_(members), LinkRow.b_pk.in_(members)))).scalar()
    return PersonView(
        person_id=person.person_id,
        identifiers=identifiers,
        anchor=Identifier(anchor_row.type, anchor_row.value),
        identifier_counts=counts,
        merge_count=person.merges,
        created_at=person.created_at,
        updated_at=person.updated_at,
        match_keys=keys,
        first_seen_us=min(r.first_seen_us for r in rows),
        last_seen_us=max(last_link or 0, max(r.first_seen_us for r in rows)),
        merged_person_ids=tuple(merged),
    )


def _identifiers_by_pk(session: Session, pks: Sequence[int]) -> dict[int, Identifier]:
    found: dict[int, Identifier] = {}
    unique = sorted(set(pks))
    for start in range(0, len(unique), 400):
        for row in session.execute(select(IdentifierRow.id, IdentifierRow.type, IdentifierRow.value)
                                   .where(IdentifierRow.id.in_(unique[start:start + 400]))):
            found[row.id] = Identifier(row.type, row.value)
    return found


def _link_views(session: Session, rows: Sequence[Any]) -> list[LinkView]:
    names = _identifiers_by_pk(session, [pk for r in rows for pk in (r.a_pk, r.b_pk)])
    return [LinkView(first=names[r.a_pk], second=names[r.b_pk], decision=r.decision, reason=r.reason,
                     detail=r.detail, source=r.source, occurred_us=r.occurred_us, event_id=r.event_id,
                     request_id=r.request_id, times_seen=r.times_seen, last_seen_us=r.last_seen_us,
                     operator=r.operator, id=r.id) for r in rows]


def list_links(session: Session, person_pk: int, *, decision: str | None, after: Sequence[Any] | None,
               limit: int) -> list[LinkView]:
    """Links touching the person's identifiers (refusals to other persons included), in
    evidence order: first occurrence time, event ID, then ID. ``after`` is the
    (time, event ID, ID) of the last link of the previous page."""
    members = select(IdentifierRow.id).where(IdentifierRow.person_pk == person_pk).scalar_subquery()
    query = select(LinkRow).where(or_(LinkRow.a_pk.in_(members), LinkRow.b_pk.in_(members)))
    if decision:
        query = query.where(LinkRow.decision == decision)
    if after is not None:
        query = query.where(tuple_(LinkRow.occurred_us, LinkRow.event_id, LinkRow.id) > tuple_(*after))
    query = query.order_by(LinkRow.occurred_us, LinkRow.event_id, LinkRow.id).limit(limit)
    rows = session.execute(query).scalars().all()
    return _link_views(session, rows)


def list_history(session: Session, person_pk: int, *, kind: str | None, after: int | None,
                 limit: int) -> list[HistoryView]:
    """History entries about the person's identifiers, newest first; ``after`` is the ID
    of the last entry of the previous page."""
    members = select(IdentifierRow.id).where(IdentifierRow.person_pk == person_pk).scalar_subquery()
    query = select(HistoryRow).where(or_(HistoryRow.a_pk.in_(members), HistoryRow.b_pk.in_(members)))
    if kind:
        query = query.where(HistoryRow.kind == kind)
    if after is not None:
        query = query.where(HistoryRow.id < after)
    rows = session.execute(query.order_by(HistoryRow.id.desc()).limit(limit)).scalars().all()
    names = _identifiers_by_pk(session, [pk for r in rows for pk in (r.a_pk, r.b_pk) if pk is not None])
    return [HistoryView(id=r.id, kind=r.kind, occurred_us=r.occurred_us, person_id=r.person_id,
                        related_person_ids=tuple(r.related_person_ids or ()),
                        pair=(names.get(r.a_pk) if r.a_pk else None, names.get(r.b_pk) if r.b_pk else None),
                        reason=r.reason, detail=r.detail, operator=r.operator, event_id=r.event_id,
                        source=r.source, subject=r.subject) for r in rows]


def explain(session: Session, first: Identifier, second: Identifier) -> Explanation:
    """The accepted path joining two identifiers, or the refusals keeping their persons apart.

    Raises :class:`NotFound` when either identifier is unknown.
    """
    rows = {}
    for label, identifier in (("first", first), ("second", second)):
        row = session.execute(select(IdentifierRow.id, IdentifierRow.person_pk).where(
            IdentifierRow.type == identifier.type, IdentifierRow.value == identifier.value)).first()
        if row is None:
            raise NotFound(f"{label}: identifier not found", reason="IDENTIFIER_NOT_FOUND",
                           metadata={"field": label})
        rows[label] = row
    a, b = rows["first"], rows["second"]
    person_ids = dict(session.execute(select(PersonRow.id, PersonRow.person_id)
                                      .where(PersonRow.id.in_([a.person_pk, b.person_pk]))).all())
    if a.person_pk == b.person_pk:
        path = _accepted_path(session, a.person_pk, a.id, b.id)
        text = ("the same identifier" if not path else
                f"joined by {len(path)} accepted link(s); each link is evidence that the two identifiers "
                "were seen together")
        return Explanation(True, person_ids[a.person_pk], person_ids[b.person_pk], tuple(path), (), text)
    members_a = select(IdentifierRow.id).where(IdentifierRow.person_pk == a.person_pk).scalar_subquery()
    members_b = select(IdentifierRow.id).where(IdentifierRow.person_pk == b.person_pk).scalar_subquery()
    refused = session.execute(select(LinkRow).where(
        LinkRow.decision == "refused",
        or_(LinkRow.a_pk.in_(members_a) & LinkRow.b_pk.in_(members_b),
            LinkRow.a_pk.in_(members_b) & LinkRow.b_pk.in_(members_a)))
        .order_by(LinkRow.occurred_us, LinkRow.event_id, LinkRow.rank)).scalars().all()
    refusals = _link_views(session, refused)
    text = (f"kept apart by {len(refusals)} refused link(s)" if refusals else
            "never seen together: no evidence links their persons")
    return Explanation(False, person_ids[a.person_pk], person_ids[b.person_pk], (), tuple(refusals), text)


def _accepted_path(session: Session, person_pk: int, start: int, goal: int) -> list[LinkView]:
    """The shortest chain of accepted links from ``start`` to ``goal`` inside one person
    (bounded by the identifier cap), ties broken by link ID so the answer is stable."""
    if start == goal:
        return []
    members = select(IdentifierRow.id).where(IdentifierRow.person_pk == person_pk).scalar_subquery()
    rows = session.execute(select(LinkRow).where(
        LinkRow.a_pk.in_(members), LinkRow.decision.in_(("accepted", "forced"))).order_by(LinkRow.id)).scalars().all()
    graph = nx.Graph()
    for row in rows:
        graph.add_edge(row.a_pk, row.b_pk, row=row)
    nodes = nx.shortest_path(graph, start, goal)
    return _link_views(session, [graph.edges[a, b]["row"] for a, b in itertools.pairwise(nodes)])


def erasure_view(row: ErasureRow) -> ErasureView:
    return ErasureView(id=row.id, person_id=row.person_id, identifier_hashes=tuple(row.identifier_hashes),
                       state=row.state, operator=row.operator, reason=row.reason, created_at=row.created_at,
                       updated_at=row.updated_at, deliveries=tuple(row.deliveries or ()))
