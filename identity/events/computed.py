"""Computed traits: what Stitchgraph derives from a person's events (pure; no I/O).

They are folded from per-identifier totals (:class:`~identity.events.models.EventTotalRow`),
which only ever grow by addition, so a person's computed traits are the same whatever the
order of its events and however its identifiers were merged or split.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from identity.events.money import format_micros
from identity.events.traits import TraitValue

SOURCE = "computed"
#: Keys of the computed traits, documented in docs/events.md.
KEYS = ("event_count", "first_purchase_at", "first_seen_at", "last_purchase_at", "last_seen_at", "lifetime_value",
        "purchase_count", "refund_count", "refunded_value")


@dataclass(frozen=True, slots=True)
class Total:
    event: str
    currency: str
    count: int
    value_micros: int
    first_us: int
    last_us: int


def rfc3339(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC).isoformat().replace("+00:00", "Z")


def computed_traits(totals: Iterable[Total]) -> list[TraitValue]:
    """The computed traits of a person whose identifiers have ``totals``, ordered by key."""
    rows = list(totals)
    if not rows:
        return []
    purchases = [t for t in rows if t.event == "purchase"]
    refunds = [t for t in rows if t.event == "refund"]
    last_seen = max(t.last_us for t in rows)
    values: dict[str, tuple[Any, int]] = {
        "event_count": (sum(t.count for t in rows), last_seen),
        "first_seen_at": (rfc3339(min(t.first_us for t in rows)), last_seen),
        "last_seen_at": (rfc3339(last_seen), last_seen),
        "purchase_count": (sum(t.count for t in purchases), max((t.last_us for t in purchases), default=0)),
    }
    if purchases:
        values["first_purchase_at"] = (rfc3339(min(t.first_us for t in purchases)), max(t.last_us for t in purchases))
        values["last_purchase_at"] = (rfc3339(max(t.last_us for t in purchases)), max(t.last_us for t in purchases))
    money = purchases + refunds
    if money:
        net: dict[str, int] = {}
        for t in money:
            if t.currency:
                net[t.currency] = net.get(t.currency, 0) + (t.value_micros if t.event == "purchase" else
                                                            -t.value_micros)
        values["lifetime_value"] = ({c: format_micros(m) for c, m in sorted(net.items())},
                                    max(t.last_us for t in money))
    if refunds:
        refunded: dict[str, int] = {}
        for t in refunds:
            if t.currency:
                refunded[t.currency] = refunded.get(t.currency, 0) + t.value_micros
        values["refund_count"] = (sum(t.count for t in refunds), max(t.last_us for t in refunds))
        values["refunded_value"] = ({c: format_micros(m) for c, m in sorted(refunded.items())},
                                    max(t.last_us for t in refunds))
    return [TraitValue(key, value, "COMPUTED", SOURCE, us, "") for key, (value, us) in sorted(values.items())]
