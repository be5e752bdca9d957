"""Replaying stored evidence: the one function that decides links in canonical order.

Used for the slow path of ingestion (late evidence), for splits and erasure, and for
a full rebuild, so all of them agree by construction with each other and with the
incremental fast path (which is the same guarded union-find applied to evidence
that sorts after everything already in its clusters).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from identity.graph import Anchor, Component, GuardedUnionFind, Limits, LinkKey, Node, Outcome, singleton


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What replay needs of an identifier."""

    type: str
    value: str
    first_seen_us: int
    priority: int


@dataclass(frozen=True, slots=True)
class StoredLink:
    """A distinct pair with the key of its earliest occurrence."""

    key: LinkKey
    a: int
    b: int
    forced: bool = False

    def sort_key(self, nodes: Mapping[int, NodeInfo]) -> tuple[object, ...]:
        # Ties of the key itself (the same event ID reused for different pairs) fall
        # back to the identifiers, never to storage order.
        na, nb = nodes[self.a], nodes[self.b]
        return (*self.key, min((na.type, na.value), (nb.type, nb.value)), max((na.type, na.value), (nb.type, nb.value)))


@dataclass
class ReplayResult:
    """Persons (component label -> component) and each node's label, plus every link's outcome."""

    uf: GuardedUnionFind
    outcomes: list[tuple[StoredLink, Outcome]]

    def label_of(self, node: int) -> int:
        return cast(int, self.uf.find(node))  # replay's nodes are ints, so is every label

    def components(self) -> dict[int, Component]:
        return self.uf.components


def replay(
    nodes: Mapping[int, NodeInfo],
    links: Iterable[StoredLink],
    limits: Limits,
    pins: Iterable[tuple[int, int]] = (),
    *,
    presorted: bool = False,
) -> ReplayResult:
    """Decide ``links`` in canonical order over ``nodes``, each starting alone.

    Every node appears in the result, linked or not. Raises ``KeyError`` if a link
    names a node missing from ``nodes``.
    """
    uf = fresh_union_find(nodes, limits, pins)
    ordered: Sequence[StoredLink] = list(links) if presorted else sorted(links, key=lambda link: link.sort_key(nodes))
    outcomes = [(link, uf.link(link.a, link.b, forced=link.forced)) for link in ordered]
    for node in nodes:
        uf.find(node)
    return ReplayResult(uf, outcomes)


def fresh_union_find(nodes: Mapping[int, NodeInfo], limits: Limits,
                     pins: Iterable[tuple[int, int]] = ()) -> GuardedUnionFind:
    """A guarded union-find in which every node of ``nodes`` starts alone."""
    pin_map: dict[Node, set[Node]] = {}
    for a, b in pins:
        pin_map.setdefault(a, set()).add(b)
        pin_map.setdefault(b, set()).add(a)

    def component_of(node: int) -> Component:
        info = nodes[node]
        return singleton(node, info.type, info.value, info.first_seen_us, info.priority, limits,
                         pinned=node in pin_map)

    def lone(node: int) -> Anchor:
        info = nodes[node]
        return Anchor(info.first_seen_us, info.priority, info.type, info.value)

    return GuardedUnionFind(limits, component_of, pin_map, lone)


def connected_clusters(nodes: Iterable[int], pairs: Iterable[tuple[int, int]]) -> dict[int, int]:
    """Label every node with the smallest node of its connected component over ``pairs``
    (all links, refused ones included)."""
    parent: dict[int, int] = {n: n for n in nodes}

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            parent[rb] = ra
    return {n: find(n) for n in parent}


def stable_labels(members: dict[int, list[int]], old_label: dict[int, int]) -> dict[int, int]:
    """A label (identifier pk) for each component of ``members`` (root -> nodes), reusing
    an old label wherever possible so unchanged persons are not rewritten.

    A label is always the pk of a member node, so a component may keep old label ``L``
    only if it contains node ``L`` — which exactly one component does, so no two claim
    the same label. Otherwise it takes its smallest node.
    """
    labels = {}
    for root, nodes in members.items():
        node_set = set(nodes)
        kept = sorted({old_label[n] for n in nodes if n in old_label and old_label[n] in node_set})
        labels[root] = kept[0] if kept else min(nodes)
    return labels
