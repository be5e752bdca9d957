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

import base64
import hashlib
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

Node = Hashable


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


def person_id_for(identifier_type: str, value: str) -> str:
    """The public person ID of a person anchored on this identifier: ``p_`` and 26
    base32 characters of a SHA-256, so it reveals nothing of the identifier."""
    digest = hashlib.sha256(f"stitchgraph-person\x00{identifier_type}\x00{value}".encode()).digest()
    return "p_" + base64.b32encode(digest).decode("ascii").lower()[:26]


@dataclass(frozen=True)
class Limits:
    """The guards: ``type_limits`` maps each limited type to its maximum per person
    (types absent are unlimited)."""

    type_limits: Mapping[str, int]
    max_identifiers: int
    max_merges: int


@dataclass(slots=True)
class Component:
    """What the guards and the anchor need to know about one person."""

    size: int
    merges: int
    counts: dict[str, int]
    anchor: Anchor
    anchor_node: Node
    pinned: set[Node] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one link was decided; ``winner`` keeps its label, ``loser`` was relabelled."""

    decision: Decision
    reason: str = ""
    detail: str = ""
    winner: Node | None = None
    loser: Node | None = None


def refusal(a: Component, b: Component, limits: Limits, *, forced: bool) -> tuple[RefusalReason, str] | None:
    """Why joining ``a`` and ``b`` must be refused (pins aside), or ``None``."""
    if forced:
        return None
    for identifier_type, limit in limits.type_limits.items():
        total = a.counts.get(identifier_type, 0) + b.counts.get(identifier_type, 0)
        if total > limit:
            return RefusalReason.TYPE_LIMIT, (
                f"would give one person {total} {identifier_type} identifiers (limit {limit})"
            )
    if a.size + b.size > limits.max_identifiers:
        return RefusalReason.IDENTIFIER_CAP, (
            f"would give one person {a.size + b.size} identifiers (cap {limits.max_identifiers})"
        )
    if a.merges + b.merges + 1 > limits.max_merges:
        return RefusalReason.MERGE_CAP, f"would exceed {limits.max_merges} merges for one person"
    return None


class GuardedUnionFind:
    """Union-find over nodes with per-component guards.

    ``component_of(node)`` is called once for a node never seen before and must
    return its component (a singleton, or the stored state of an existing person whose
    label is ``node``). ``pins`` maps a node to the nodes it must never share a person
    with.
    """

    def __init__(
        self,
        limits: Limits,
        component_of: Callable[[Node], Component],
        pins: Mapping[Node, Iterable[Node]] | None = None,
    ) -> None:
        self.limits = limits
        self._component_of = component_of
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
        self.components[self.find(a)].pinned.add(a)
        self.components[self.find(b)].pinned.add(b)

    def _pinned_apart(self, ra: Node, rb: Node) -> bool:
        a, b = self.components[ra], self.components[rb]
        small, other_root = (a, rb) if len(a.pinned) <= len(b.pinned) else (b, ra)
        for node in small.pinned:
            for partner in self._pins.get(node, ()):
                if self.find(partner) == other_root:
                    return True
        return False

    def link(self, a: Node, b: Node, *, forced: bool = False) -> Outcome:
        """Decide one link and apply it."""
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
        if (ca.size, _order(rb)) < (cb.size, _order(ra)):
            ra, rb, ca, cb = rb, ra, cb, ca
        self._parent[rb] = ra
        ca.size += cb.size
        ca.merges += cb.merges + 1
        for identifier_type, count in cb.counts.items():
            ca.counts[identifier_type] = ca.counts.get(identifier_type, 0) + count
        if cb.anchor < ca.anchor:
            ca.anchor, ca.anchor_node = cb.anchor, cb.anchor_node
        ca.pinned |= cb.pinned
        del self.components[rb]
        return Outcome(Decision.FORCED if forced else Decision.ACCEPTED, winner=ra, loser=rb)

    def roots(self) -> dict[Node, Node]:
        """Every node seen, mapped to its component's label."""
        return {node: self.find(node) for node in list(self._parent)}


def _order(label: Node) -> tuple[int, str]:
    # Labels are ints in the store and anything hashable in tests; order them stably.
    return (0, f"{label:020d}") if isinstance(label, int) and label >= 0 else (1, repr(label))


def singleton(node: Node, identifier_type: str, value: str, first_seen_us: int, priority: int,
              limits: Limits, pinned: bool = False) -> Component:
    """The component of one identifier alone."""
    counts = {identifier_type: 1} if identifier_type in limits.type_limits else {}
    return Component(size=1, merges=0, counts=counts,
                     anchor=Anchor(first_seen_us, priority, identifier_type, value), anchor_node=node,
                     pinned={node} if pinned else set())
