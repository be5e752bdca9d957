"""The guarded union-find: pure, no I/O.

Persons are the connected components of *accepted* links. Links are decided one at
a time in canonical order (:class:`LinkKey`: evidence time, then event ID, then rank
within the event), so the persons are a function of the evidence alone, never of
arrival order. A link is

* ``redundant`` when both identifiers already belong to one person,
* ``refused`` when joining their persons would break a guard — a per-type limit
  (two ``user_id`` s), the identifier cap, the merge cap, or an operator's pinned
  split — the reason is recorded and explainable,
* ``accepted`` (or ``forced`` for an operator merge, which skips limits and caps but
  not pins) otherwise; the smaller component is relabelled into the larger.

Each component tracks what the guards need (size, merges, counts of limited types,
pinned identifiers) and its *anchor*: the identifier seen first, ties broken by type
priority then type then value, from which the public person ID is derived.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any, NamedTuple

# A component label: any hashable value. The store uses identifier primary keys (ints);
# tests use whatever reads best. Typed Any so callers keep their own key type.
Node = Any


class Decision(StrEnum):
    ACCEPTED = "accepted"
    REDUNDANT = "redundant"
    REFUSED = "refused"
    FORCED = "forced"


class RefusalReason(StrEnum):
    TYPE_LIMIT = "TYPE_LIMIT"
    IDENTIFIER_CAP = "IDENTIFIER_CAP"
    MERGE_CAP = "MERGE_CAP"
    PINNED_SPLIT = "PINNED_SPLIT"


class LinkKey(NamedTuple):
    """Canonical order of link evidence: time (µs since epoch, UTC), event ID, rank of
    the pair within its event."""

    occurred_us: int
    event_id: str
    rank: int


# Sorts before every real link: the key of a cluster that has no links yet.
NO_LINK = LinkKey(-1, "", -1)


class Anchor(NamedTuple):
    """Sort key of an identifier as a person's anchor (smallest wins)."""

    first_seen_us: int
    priority: int
    type: str
    value: str


def person_id_for(identifier_type: str, value: str, salt: str = "") -> str:
    """The public person ID of a person anchored on this identifier: ``p_`` and 32 hex
    characters (128 bits) of a SHA-256, so it reveals nothing of the identifier.

    ``salt`` is the erasure an identifier came back after: a human who returns after a
    GDPR erasure gets a new person ID, never the erased one.
    """
    material = f"stitchgraph-person\x00{identifier_type}\x00{value}" + (f"\x00{salt}" if salt else "")
    return "p_" + hashlib.sha256(material.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Limits:
    """The guards: ``type_limits`` maps each limited type to its maximum per person
    (types absent are unlimited)."""

    type_limits: Mapping[str, int]
    max_identifiers: int
    max_merges: int


@dataclass(slots=True)
class Component:
    """What the guards and the anchor need to know about one person.

    ``counts`` is never mutated in place (a merge builds a new dict), so singletons of
    one type can share theirs; ``pinned`` is ``None`` when no identifier is pinned. A
    rebuild holds hundreds of thousands of these at once.
    """

    size: int
    merges: int
    counts: Mapping[str, int]
    anchor: Anchor
    anchor_node: Node
    pinned: set[Node] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one link was decided; ``winner`` keeps its label, ``loser`` was relabelled."""

    decision: Decision
    reason: str = ""
    detail: str = ""
    winner: Node | None = None
    loser: Node | None = None


def is_merge(a: Component, b: Component) -> bool:
    """Joining two persons that each hold several identifiers is a *merge* (what the merge
    cap counts); one identifier joining a person only adds an identifier (what the
    identifier cap counts)."""
    return a.size > 1 and b.size > 1


def refusal(a: Component, b: Component, limits: Limits, *, forced: bool) -> tuple[RefusalReason, str] | None:
    """Why joining ``a`` and ``b`` must be refused (pins aside), or ``None``."""
    if forced:
        return None
    # ``counts`` only holds limited types, so walking the smaller one checks every limit
    # that both sides could break together.
    small, large = (a.counts, b.counts) if len(a.counts) <= len(b.counts) else (b.counts, a.counts)
    for identifier_type, count in small.items():
        other = large.get(identifier_type)
        if other is not None:
            total, limit = count + other, limits.type_limits[identifier_type]
            if total > limit:
                return RefusalReason.TYPE_LIMIT, (
                    f"would give one person {total} {identifier_type} identifiers (limit {limit})"
                )
    if a.size + b.size > limits.max_identifiers:
        return RefusalReason.IDENTIFIER_CAP, (
            f"would give one person {a.size + b.size} identifiers (cap {limits.max_identifiers})"
        )
    if is_merge(a, b) and a.merges + b.merges + 1 > limits.max_merges:
        return RefusalReason.MERGE_CAP, f"would exceed {limits.max_merges} merges for one person"
    return None


class GuardedUnionFind:
    """Union-find over nodes with per-component guards.

    ``component_of(node)`` is called once for a node never seen before and must
    return its component (a singleton, or the stored state of an existing person whose
    label is ``node``). ``pins`` maps a node to the nodes it must never share a person
    with.

    ``lone(node)``, if given, returns the :class:`Anchor` of a node never seen before
    that is one identifier alone (``None`` for anything else, e.g. a stored person).
    Such a node joining a person is decided from its own facts, without building a
    component for it: most links attach a new identifier to an existing person, and a
    rebuild meets a million of them.
    """

    def __init__(
        self,
        limits: Limits,
        component_of: Callable[[Node], Component],
        pins: Mapping[Node, Iterable[Node]] | None = None,
        lone: Callable[[Node], Anchor | None] | None = None,
    ) -> None:
        self.limits = limits
        self._component_of = component_of
        self._lone = lone
        self._parent: dict[Node, Node] = {}
        self.components: dict[Node, Component] = {}
        self._pins: dict[Node, set[Node]] = {n: set(p) for n, p in (pins or {}).items()}

    def find(self, node: Node) -> Node:
        parent = self._parent
        if node not in parent:
            parent[node] = node
            self.components[node] = self._component_of(node)
            return node
        root = node
        while parent[root] != root:
            root = parent[root]
        while parent[node] != root:  # path compression
            parent[node], node = root, parent[node]
        return root

    def add_pin(self, a: Node, b: Node) -> None:
        self._pins.setdefault(a, set()).add(b)
        self._pins.setdefault(b, set()).add(a)
        for node in (a, b):
            component = self.components[self.find(node)]
            component.pinned = (component.pinned or set()) | {node}

    def label(self, node: Node) -> Node:
        """The component label of ``node``; a node never linked is its own label."""
        return self.find(node) if node in self._parent else node

    def _pinned_apart(self, ra: Node, rb: Node) -> bool:
        a, b = self.components[ra], self.components[rb]
        small, other_root = (a, rb) if len(a.pinned or ()) <= len(b.pinned or ()) else (b, ra)
        for node in small.pinned or ():
            for partner in self._pins.get(node, ()):
                # label(), not find(): a partner this union-find never met is not in
                # either component, and must not be materialised.
                if self.label(partner) == other_root:
                    return True
        return False

    def link(self, a: Node, b: Node, *, forced: bool = False) -> Outcome:
        """Decide one link and apply it."""
        parent = self._parent
        if self._lone is not None and (a not in parent or b not in parent):
            fresh, other = (b, a) if b not in parent else (a, b)
            if fresh not in self._pins:
                anchor = self._lone(fresh)
                if anchor is not None:
                    root = self.find(other)
                    component = self.components[root]
                    # Only when the person's label survives (it is larger, or wins the tie);
                    # otherwise the general path below relabels it.
                    if component.size > 1 or _before(root, fresh):
                        return self._attach(fresh, anchor, root, component, forced)
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return Outcome(Decision.REDUNDANT)
        ca, cb = self.components[ra], self.components[rb]
        if ca.pinned and cb.pinned and self._pinned_apart(ra, rb):
            return Outcome(Decision.REFUSED, RefusalReason.PINNED_SPLIT,
                           "an operator split keeps these identifiers in separate persons")
        refused = refusal(ca, cb, self.limits, forced=forced)
        if refused is not None:
            return Outcome(Decision.REFUSED, refused[0], refused[1])
        # Relabel the smaller side; ties keep the smaller label so the result is deterministic.
        if ca.size < cb.size or (ca.size == cb.size and _before(rb, ra)):
            ra, rb, ca, cb = rb, ra, cb, ca
        self._parent[rb] = ra
        ca.merges += cb.merges + (1 if is_merge(ca, cb) else 0)
        ca.size += cb.size
        if cb.counts:
            counts = dict(ca.counts)
            for identifier_type, count in cb.counts.items():
                counts[identifier_type] = counts.get(identifier_type, 0) + count
            ca.counts = counts
        if cb.anchor < ca.anchor:
            ca.anchor, ca.anchor_node = cb.anchor, cb.anchor_node
        if cb.pinned:
            ca.pinned = (ca.pinned or set()) | cb.pinned
        del self.components[rb]
        return Outcome(Decision.FORCED if forced else Decision.ACCEPTED, winner=ra, loser=rb)

    def _attach(self, node: Node, anchor: Anchor, root: Node, component: Component, forced: bool) -> Outcome:
        if not forced:
            refused = _attach_refusal(component, anchor, self.limits)
            if refused is not None:
                return Outcome(Decision.REFUSED, refused[0], refused[1])
        self._parent[node] = root
        component.size += 1
        if anchor.type in self.limits.type_limits:
            counts = dict(component.counts)
            counts[anchor.type] = counts.get(anchor.type, 0) + 1
            component.counts = counts
        if anchor < component.anchor:
            component.anchor, component.anchor_node = anchor, node
        return Outcome(Decision.FORCED if forced else Decision.ACCEPTED, winner=root, loser=node)

    def roots(self) -> dict[Node, Node]:
        """Every node seen, mapped to its component's label."""
        return {node: self.find(node) for node in list(self._parent)}


def _attach_refusal(component: Component, anchor: Anchor, limits: Limits) -> tuple[RefusalReason, str] | None:
    """:func:`refusal` for one lone identifier (``anchor``) joining ``component``, in the
    same order of checks and with the same words."""
    limit = limits.type_limits.get(anchor.type)
    if limit is not None:
        total = component.counts.get(anchor.type, 0) + 1
        if total > limit:
            return RefusalReason.TYPE_LIMIT, f"would give one person {total} {anchor.type} identifiers (limit {limit})"
    if component.size + 1 > limits.max_identifiers:
        return RefusalReason.IDENTIFIER_CAP, (
            f"would give one person {component.size + 1} identifiers (cap {limits.max_identifiers})"
        )
    return None


def _before(x: Node, y: Node) -> bool:
    """Whether label ``x`` orders before ``y``: ints (the store's labels) by value, other
    hashables (tests) by their repr, so the order never depends on hashing."""
    if type(x) is int and type(y) is int:
        return x < y
    return repr(x) < repr(y)


def singleton(node: Node, identifier_type: str, value: str, first_seen_us: int, priority: int,
              limits: Limits, pinned: bool = False) -> Component:
    """The component of one identifier alone."""
    counts = _single_count(identifier_type) if identifier_type in limits.type_limits else _NO_COUNTS
    return Component(size=1, merges=0, counts=counts,
                     anchor=Anchor(first_seen_us, priority, identifier_type, value), anchor_node=node,
                     pinned={node} if pinned else None)


_NO_COUNTS: Mapping[str, int] = MappingProxyType({})


@functools.cache
def _single_count(identifier_type: str) -> Mapping[str, int]:
    return MappingProxyType({identifier_type: 1})
