"""The pure guarded union-find (identity.graph) and canonical replay (identity.replay):
limits, caps, pins, forced links, anchors and ties, union-by-size determinism."""

from __future__ import annotations

import math
import random
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from identity.graph import (
    Anchor,
    Component,
    Decision,
    GuardedUnionFind,
    Limits,
    LinkKey,
    RefusalReason,
    person_id_for,
    singleton,
)
from identity.replay import NodeInfo, StoredLink, replay

PRIORITY = {"user_id": 0, "crm_id": 1, "email_sha256": 2, "phone_sha256": 3, "anonymous_id": 1000}
DEFAULT_LIMITS = Limits(type_limits={"user_id": 1, "crm_id": 1, "email_sha256": 5, "phone_sha256": 5},
                        max_identifiers=1000, max_merges=100)

Node = tuple[str, str]


def make_uf(limits: Limits = DEFAULT_LIMITS, first_seen: dict[Node, int] | None = None,
            pins: dict[Node, list[Node]] | None = None) -> GuardedUnionFind:
    """A union-find over ``(type, value)`` nodes; every node first seen at 0 unless given."""
    seen = first_seen or {}
    pinned = set(pins or {}) | {p for partners in (pins or {}).values() for p in partners}

    def component_of(node: object) -> Component:
        assert isinstance(node, tuple)
        type_, value = node
        return singleton(node, type_, value, seen.get(node, 0), PRIORITY.get(type_, 100), limits,
                         pinned=node in pinned)

    return GuardedUnionFind(limits, component_of, pins)


def members(uf: GuardedUnionFind) -> set[frozenset[object]]:
    groups: dict[object, set[object]] = {}
    for node, root in uf.roots().items():
        groups.setdefault(root, set()).add(node)
    return {frozenset(g) for g in groups.values()}


def user(v: str) -> Node:
    return ("user_id", v)


def anon(v: str) -> Node:
    return ("anonymous_id", v)


def email(v: str) -> Node:
    return ("email_sha256", v)


# -- decisions --------------------------------------------------------------------------------

def test_link_between_two_new_identifiers_is_accepted_and_joins_them() -> None:
    uf = make_uf()
    outcome = uf.link(user("u1"), anon("d1"))
    assert outcome.decision is Decision.ACCEPTED
    assert uf.find(user("u1")) == uf.find(anon("d1"))


def test_link_inside_one_person_is_redundant() -> None:
    uf = make_uf()
    uf.link(user("u1"), anon("d1"))
    uf.link(user("u1"), anon("d2"))
    outcome = uf.link(anon("d1"), anon("d2"))
    assert outcome.decision is Decision.REDUNDANT
    assert outcome.winner is None and outcome.loser is None


def test_second_user_id_through_shared_device_is_refused_by_type_limit() -> None:
    uf = make_uf()
    uf.link(user("u1"), anon("shared"))
    outcome = uf.link(user("u2"), anon("shared"))
    assert outcome.decision is Decision.REFUSED
    assert outcome.reason == RefusalReason.TYPE_LIMIT
    assert "user_id" in outcome.detail and "limit 1" in outcome.detail
    assert uf.find(user("u1")) != uf.find(user("u2"))
    assert uf.find(anon("shared")) == uf.find(user("u1"))


def test_refused_link_leaves_both_components_unchanged() -> None:
    uf = make_uf()
    uf.link(user("u1"), anon("d1"))
    uf.link(user("u2"), anon("d2"))
    before = members(uf)
    sizes = sorted(c.size for c in uf.components.values())
    uf.link(anon("d1"), anon("d2"))
    assert members(uf) == before
    assert sorted(c.size for c in uf.components.values()) == sizes


def test_anonymous_ids_have_no_type_limit() -> None:
    uf = make_uf(Limits(DEFAULT_LIMITS.type_limits, max_identifiers=1000, max_merges=1000))
    decisions = [uf.link(user("u1"), anon(f"d{i}")).decision for i in range(200)]
    assert set(decisions) == {Decision.ACCEPTED}
    assert uf.components[uf.find(user("u1"))].size == 201


def test_five_hashed_emails_are_accepted_and_the_sixth_is_refused() -> None:
    uf = make_uf()
    decisions = [uf.link(user("u1"), email(f"{i:064x}")).decision for i in range(6)]
    assert decisions[:5] == [Decision.ACCEPTED] * 5
    assert decisions[5] is Decision.REFUSED
    assert uf.components[uf.find(user("u1"))].counts["email_sha256"] == 5


def test_type_limit_counts_both_sides_of_a_merge() -> None:
    limits = Limits({"email_sha256": 3}, max_identifiers=1000, max_merges=100)
    uf = make_uf(limits)
    uf.link(anon("a"), email("e1"))
    uf.link(anon("a"), email("e2"))
    uf.link(anon("b"), email("e3"))
    uf.link(anon("b"), email("e4"))
    outcome = uf.link(anon("a"), anon("b"))
    assert outcome.decision is Decision.REFUSED
    assert outcome.reason == RefusalReason.TYPE_LIMIT
    assert "4 email_sha256" in outcome.detail


def test_custom_type_limit_applies() -> None:
    limits = Limits({"loyalty_id": 1}, max_identifiers=1000, max_merges=100)
    uf = make_uf(limits)
    uf.link(("loyalty_id", "L1"), anon("d"))
    outcome = uf.link(("loyalty_id", "L2"), anon("d"))
    assert outcome.decision is Decision.REFUSED and outcome.reason == RefusalReason.TYPE_LIMIT


def test_identifier_cap_refuses_a_link_that_would_exceed_it() -> None:
    limits = Limits({}, max_identifiers=3, max_merges=100)
    uf = make_uf(limits)
    assert uf.link(anon("a"), anon("b")).decision is Decision.ACCEPTED
    assert uf.link(anon("a"), anon("c")).decision is Decision.ACCEPTED
    outcome = uf.link(anon("a"), anon("d"))
    assert outcome.decision is Decision.REFUSED
    assert outcome.reason == RefusalReason.IDENTIFIER_CAP
    assert uf.components[uf.find(anon("a"))].size == 3


def test_identifier_cap_allows_exactly_the_cap() -> None:
    limits = Limits({}, max_identifiers=4, max_merges=100)
    uf = make_uf(limits)
    uf.link(anon("a"), anon("b"))
    uf.link(anon("c"), anon("d"))
    assert uf.link(anon("a"), anon("c")).decision is Decision.ACCEPTED
    assert uf.components[uf.find(anon("a"))].size == 4


def pair_of(uf: GuardedUnionFind, a: str, b: str) -> None:
    assert uf.link(anon(a), anon(b)).decision is Decision.ACCEPTED


def test_adding_one_identifier_to_a_person_is_not_a_merge() -> None:
    uf = make_uf(Limits({}, max_identifiers=1000, max_merges=1))
    decisions = [uf.link(anon("a"), anon(f"x{i}")).decision for i in range(10)]
    assert set(decisions) == {Decision.ACCEPTED}
    assert uf.components[uf.find(anon("a"))].merges == 0


def test_joining_two_multi_identifier_persons_counts_one_merge() -> None:
    uf = make_uf()
    pair_of(uf, "a", "b")
    pair_of(uf, "c", "d")
    uf.link(anon("a"), anon("c"))
    assert uf.components[uf.find(anon("a"))].merges == 1


def test_merge_cap_refuses_the_merge_beyond_max_merges() -> None:
    uf = make_uf(Limits({}, max_identifiers=1000, max_merges=2))
    for x, y in (("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")):
        pair_of(uf, x, y)
    assert uf.link(anon("a"), anon("c")).decision is Decision.ACCEPTED
    assert uf.link(anon("a"), anon("e")).decision is Decision.ACCEPTED
    outcome = uf.link(anon("a"), anon("g"))
    assert outcome.decision is Decision.REFUSED
    assert outcome.reason == RefusalReason.MERGE_CAP


def test_merge_count_adds_both_sides_merges() -> None:
    uf = make_uf()
    for x, y in (("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")):
        pair_of(uf, x, y)
    uf.link(anon("a"), anon("c"))  # merge 1
    uf.link(anon("e"), anon("g"))  # merge 2
    uf.link(anon("a"), anon("e"))  # merge 3, carrying 1 + 1
    assert uf.components[uf.find(anon("a"))].merges == 3


def test_type_limit_is_checked_before_caps() -> None:
    limits = Limits({"user_id": 1}, max_identifiers=2, max_merges=100)
    uf = make_uf(limits)
    uf.link(user("u1"), anon("a"))
    outcome = uf.link(user("u2"), anon("a"))
    assert outcome.reason == RefusalReason.TYPE_LIMIT


# -- forced links and pins --------------------------------------------------------------------

def test_forced_link_bypasses_type_limit() -> None:
    uf = make_uf()
    outcome = uf.link(user("u1"), user("u2"), forced=True)
    assert outcome.decision is Decision.FORCED
    assert uf.find(user("u1")) == uf.find(user("u2"))
    assert uf.components[uf.find(user("u1"))].counts["user_id"] == 2


def test_forced_link_bypasses_identifier_and_merge_caps() -> None:
    for limits in (Limits({}, max_identifiers=2, max_merges=100),
                   Limits({}, max_identifiers=100, max_merges=1)):
        uf = make_uf(limits)
        for x, y in (("a", "b"), ("c", "d"), ("e", "f")):
            pair_of(uf, x, y)
        uf.link(anon("c"), anon("e"))
        assert uf.link(anon("a"), anon("c")).decision is Decision.REFUSED
        assert uf.link(anon("a"), anon("c"), forced=True).decision is Decision.FORCED
        assert uf.find(anon("a")) == uf.find(anon("d"))


def test_pin_refuses_a_direct_link_between_pinned_identifiers() -> None:
    uf = make_uf(pins={anon("a"): [anon("b")]})
    outcome = uf.link(anon("a"), anon("b"))
    assert outcome.decision is Decision.REFUSED
    assert outcome.reason == RefusalReason.PINNED_SPLIT


def test_pin_refuses_joining_the_persons_of_pinned_identifiers_transitively() -> None:
    uf = make_uf(pins={anon("a"): [anon("b")]})
    assert uf.link(anon("a"), anon("x")).decision is Decision.ACCEPTED
    assert uf.link(anon("b"), anon("y")).decision is Decision.ACCEPTED
    outcome = uf.link(anon("x"), anon("y"))
    assert outcome.decision is Decision.REFUSED
    assert outcome.reason == RefusalReason.PINNED_SPLIT
    assert uf.find(anon("a")) != uf.find(anon("b"))


def test_forced_link_does_not_override_a_pin() -> None:
    uf = make_uf(pins={user("u1"): [user("u2")]})
    outcome = uf.link(user("u1"), user("u2"), forced=True)
    assert outcome.decision is Decision.REFUSED
    assert outcome.reason == RefusalReason.PINNED_SPLIT


def test_pin_added_later_applies_to_later_links() -> None:
    uf = make_uf()
    uf.find(anon("a"))
    uf.find(anon("b"))
    uf.add_pin(anon("a"), anon("b"))
    assert uf.link(anon("a"), anon("b")).reason == RefusalReason.PINNED_SPLIT


def test_pin_does_not_block_unrelated_links() -> None:
    uf = make_uf(pins={anon("a"): [anon("b")]})
    assert uf.link(anon("a"), anon("c")).decision is Decision.ACCEPTED
    assert uf.link(anon("b"), anon("d")).decision is Decision.ACCEPTED


# -- anchor and person IDs ----------------------------------------------------------------------

def test_anchor_is_the_identifier_seen_first() -> None:
    uf = make_uf(first_seen={anon("d1"): 10, user("u1"): 20})
    uf.link(user("u1"), anon("d1"))
    comp = uf.components[uf.find(user("u1"))]
    assert comp.anchor_node == anon("d1")
    assert comp.anchor == Anchor(10, PRIORITY["anonymous_id"], "anonymous_id", "d1")


def test_anchor_tie_on_time_is_broken_by_type_priority() -> None:
    uf = make_uf(first_seen={anon("a"): 5, user("z"): 5, email("e" * 64): 5})
    uf.link(anon("a"), email("e" * 64))
    uf.link(anon("a"), user("z"))
    assert uf.components[uf.find(anon("a"))].anchor_node == user("z")


def test_anchor_tie_on_time_and_priority_is_broken_by_value() -> None:
    uf = make_uf()
    uf.link(anon("b"), anon("c"))
    uf.link(anon("c"), anon("a"))
    assert uf.components[uf.find(anon("b"))].anchor_node == anon("a")


def test_anchor_does_not_depend_on_link_order() -> None:
    seen = {anon("a"): 3, anon("b"): 1, user("u"): 2, email("f" * 64): 1}
    pairs = [(anon("a"), user("u")), (anon("b"), anon("a")), (email("f" * 64), anon("b"))]
    anchors = set()
    for order in (pairs, list(reversed(pairs)), [pairs[1], pairs[2], pairs[0]]):
        uf = make_uf(first_seen=seen)
        for a, b in order:
            uf.link(a, b)
        anchors.add(uf.components[uf.find(user("u"))].anchor_node)
    assert anchors == {email("f" * 64)}


def test_person_id_is_deterministic_and_opaque() -> None:
    pid = person_id_for("user_id", "alice@example.com")
    assert pid == person_id_for("user_id", "alice@example.com")
    # Opaque, URL-safe, at most 64 characters (identity.proto Person.person_id).
    assert re.fullmatch(r"p_[a-z0-9]{20,62}", pid)
    assert "alice" not in pid


def test_person_id_depends_on_type_and_value() -> None:
    ids = {person_id_for("user_id", "x"), person_id_for("crm_id", "x"), person_id_for("user_id", "y")}
    assert len(ids) == 3


def test_person_id_separates_type_and_value_unambiguously() -> None:
    assert person_id_for("a", "b_c") != person_id_for("a_b", "c")


# -- union by size -----------------------------------------------------------------------------

def test_smaller_component_is_relabelled_into_the_larger() -> None:
    uf = make_uf()
    for i in range(5):
        uf.link(anon("big"), anon(f"b{i}"))
    big_root = uf.find(anon("big"))
    outcome = uf.link(anon("lonely"), anon("b3"))
    assert outcome.winner == big_root
    assert outcome.loser == anon("lonely")
    assert uf.find(anon("lonely")) == big_root


def test_equal_sizes_keep_the_smaller_integer_label_whatever_the_argument_order() -> None:
    limits = DEFAULT_LIMITS
    infos = {n: NodeInfo("anonymous_id", f"v{n}", 0, 1000) for n in (7, 3)}

    def component_of(node: object) -> Component:
        info = infos[node]  # type: ignore[index]
        return singleton(node, info.type, info.value, 0, 1000, limits)

    for a, b in ((7, 3), (3, 7)):
        uf = GuardedUnionFind(limits, component_of)
        outcome = uf.link(a, b)
        assert (outcome.winner, outcome.loser) == (3, 7)


def test_total_relabelling_work_is_n_log_n() -> None:
    # Merge random components of n singletons; sum the sizes of the relabelled (smaller) sides.
    n = 1024
    limits = Limits({}, max_identifiers=10 * n, max_merges=10 * n)

    def component_of(node: object) -> Component:
        return singleton(node, "anonymous_id", str(node), 0, 1000, limits)

    uf = GuardedUnionFind(limits, component_of)
    nodes = list(range(n))
    for node in nodes:
        uf.find(node)
    rng = random.Random(7)
    moved = 0
    while len(uf.components) > 1:
        ra, rb = uf.find(rng.choice(nodes)), uf.find(rng.choice(nodes))
        if ra == rb:
            continue
        sizes = {ra: uf.components[ra].size, rb: uf.components[rb].size}
        outcome = uf.link(ra, rb)
        assert outcome.loser is not None
        assert sizes[outcome.loser] == min(sizes.values())
        moved += sizes[outcome.loser]
    assert moved <= n * math.log2(n)


# -- canonical replay ---------------------------------------------------------------------------

def _nodes() -> dict[int, NodeInfo]:
    types = ["user_id", "user_id", "user_id", "anonymous_id", "anonymous_id", "anonymous_id", "anonymous_id",
             "email_sha256", "email_sha256"]
    return {i: NodeInfo(t, f"{t[:1]}{i}", 0, PRIORITY[t]) for i, t in enumerate(types)}


def _partition(result_nodes: dict[int, NodeInfo], links: list[StoredLink]) -> set[frozenset[int]]:
    result = replay(result_nodes, links, DEFAULT_LIMITS)
    groups: dict[int, set[int]] = {}
    for node in result_nodes:
        groups.setdefault(result.label_of(node), set()).add(node)
    return {frozenset(g) for g in groups.values()}


def test_replay_decides_by_evidence_time_not_input_order() -> None:
    nodes = _nodes()
    early = StoredLink(LinkKey(100, "e1", 0), 0, 3)  # u0 - device 3
    late = StoredLink(LinkKey(200, "e2", 0), 1, 3)   # u1 - device 3
    for links in ([early, late], [late, early]):
        result = replay(nodes, links, DEFAULT_LIMITS)
        assert result.label_of(3) == result.label_of(0)
        assert result.label_of(1) != result.label_of(3)


def test_replay_breaks_time_ties_by_event_id() -> None:
    nodes = _nodes()
    by_b = StoredLink(LinkKey(100, "b", 0), 1, 3)
    by_a = StoredLink(LinkKey(100, "a", 0), 0, 3)
    result = replay(nodes, [by_b, by_a], DEFAULT_LIMITS)
    assert result.label_of(3) == result.label_of(0)
    decided = {(link.a, link.b): outcome.decision for link, outcome in result.outcomes}
    assert decided[(1, 3)] is Decision.REFUSED


def test_replay_includes_unlinked_nodes_as_their_own_persons() -> None:
    nodes = _nodes()
    result = replay(nodes, [], DEFAULT_LIMITS)
    assert len(result.components()) == len(nodes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(0, 5), st.sampled_from("abc")),
                max_size=25), st.randoms(use_true_random=False))
def test_replay_partition_is_independent_of_input_order(raw: list[tuple[int, int, int, str]],
                                                        rnd: random.Random) -> None:
    nodes = _nodes()
    seen: dict[tuple[int, int], StoredLink] = {}
    for a, b, t, event in raw:
        if a == b:
            continue
        pair = (min(a, b), max(a, b))
        link = StoredLink(LinkKey(t, event, 0), *pair)
        if pair not in seen or link.key < seen[pair].key:
            seen[pair] = link
    links = list(seen.values())
    expected = _partition(nodes, links)
    shuffled = links[:]
    rnd.shuffle(shuffled)
    assert _partition(nodes, shuffled) == expected
    # Never two user_ids in one person.
    for group in expected:
        assert sum(1 for n in group if nodes[n].type == "user_id") <= 1
