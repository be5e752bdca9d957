"""Trait evidence and how it folds into a person's traits (pure; no I/O).

A trait assertion is evidence: *set*, *set_once* or *unset* of one key, at the time of
the event that carried it. A person's value for a key is a function of all evidence of
all its identifiers, independent of arrival order (so a replay, a merge or a split gives
the same answer as in-order arrival):

* the latest *set* or *unset* wins (by event time, then event ID; an unset wins a tie with
  a set of the same event);
* if it is a set, that is the value (kind ``SET``);
* if there is none, the earliest *set_once* is the value (kind ``SET_ONCE``);
* if it is an unset, the key is absent, unless a *set_once* came after the unset (then the
  earliest such one is the value: the key was absent when it arrived).

To stay cheap, evidence is condensed per identifier and key into a :class:`TraitState`
(latest set/unset, earliest set_once), which is a commutative summary; only the rare
"set_once after the latest unset" case needs the evidence itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

SET = "set"
SET_ONCE = "set_once"
UNSET = "unset"
OPS = (SET, SET_ONCE, UNSET)


@dataclass(frozen=True, slots=True)
class Evidence:
    """One assertion about one key."""

    op: str
    key: str
    value: Any
    occurred_us: int
    event_id: str
    source: str


@dataclass(frozen=True, slots=True)
class TraitState:
    """The summary of one identifier's evidence about one key."""

    lw_us: int | None = None
    lw_event: str | None = None
    lw_unset: bool = False
    lw_value: Any = None
    lw_source: str | None = None
    so_us: int | None = None
    so_event: str | None = None
    so_value: Any = None
    so_source: str | None = None

    def lw_order(self) -> tuple[int, str, int] | None:
        if self.lw_us is None:
            return None
        return self.lw_us, self.lw_event or "", 1 if self.lw_unset else 0

    def so_order(self) -> tuple[int, str] | None:
        if self.so_us is None:
            return None
        return self.so_us, self.so_event or ""


def apply(state: TraitState | None, evidence: Evidence) -> TraitState:
    """``state`` with ``evidence`` folded in (commutative and idempotent)."""
    state = state or TraitState()
    if evidence.op == SET_ONCE:
        current = state.so_order()
        if current is None or (evidence.occurred_us, evidence.event_id) < current:
            return replace(state, so_us=evidence.occurred_us, so_event=evidence.event_id, so_value=evidence.value,
                           so_source=evidence.source)
        return state
    unset = evidence.op == UNSET
    current_lw = state.lw_order()
    if current_lw is None or (evidence.occurred_us, evidence.event_id, 1 if unset else 0) > current_lw:
        return replace(state, lw_us=evidence.occurred_us, lw_event=evidence.event_id, lw_unset=unset,
                       lw_value=None if unset else evidence.value, lw_source=evidence.source)
    return state


@dataclass(frozen=True, slots=True)
class TraitValue:
    """A person's current value of one key and the evidence behind it."""

    key: str
    value: Any
    kind: str  # SET | SET_ONCE
    source: str
    occurred_us: int
    event_id: str


SetOnceAfter = Callable[[str, int, str], Evidence | None]


def fold(key: str, states: Iterable[TraitState], set_once_after: SetOnceAfter) -> TraitValue | None:
    """The person's value of ``key`` from its identifiers' states; ``set_once_after(key, us,
    event_id)`` returns the earliest set_once evidence strictly after that point (only
    consulted when an unset is the latest word)."""
    latest: TraitState | None = None
    earliest: TraitState | None = None
    for state in states:
        order = state.lw_order()
        if order is not None and (latest is None or order > latest.lw_order()):  # type: ignore[operator]
            latest = state
        so = state.so_order()
        if so is not None and (earliest is None or so < earliest.so_order()):  # type: ignore[operator]
            earliest = state
    if latest is not None and not latest.lw_unset:
        return TraitValue(key, latest.lw_value, "SET", latest.lw_source or "", latest.lw_us or 0,
                          latest.lw_event or "")
    if latest is None:
        if earliest is None:
            return None
        return TraitValue(key, earliest.so_value, "SET_ONCE", earliest.so_source or "", earliest.so_us or 0,
                          earliest.so_event or "")
    unset_at = (latest.lw_us or 0, latest.lw_event or "")
    if earliest is not None and earliest.so_order() > unset_at:  # type: ignore[operator]
        return TraitValue(key, earliest.so_value, "SET_ONCE", earliest.so_source or "", earliest.so_us or 0,
                          earliest.so_event or "")
    after = set_once_after(key, *unset_at)
    if after is None:
        return None
    return TraitValue(key, after.value, "SET_ONCE", after.source, after.occurred_us, after.event_id)
