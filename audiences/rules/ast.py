"""The syntax tree of the audience rule language (see docs/audiences.md).

The parser (:mod:`audiences.rules.parser`) builds these nodes, the checker
(:mod:`audiences.rules.checker`) types them, and the compiler
(:mod:`audiences.rules.compiler`) turns a checked tree into one query. Every node keeps its
:class:`Span` so diagnostics and eligibility explanations can point into the rule text.

Nothing here does I/O; all nodes are immutable.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import Enum


@dataclass(frozen=True, slots=True)
class Span:
    """Where a node sits in the rule text: 1-based line/column (columns in code points),
    end exclusive; ``start``/``end`` are 0-based offsets into the text."""

    line: int
    column: int
    end_line: int
    end_column: int
    start: int
    end: int


class Type(Enum):
    """Static types of expressions."""

    BOOL = "a boolean"
    NUMBER = "a number"
    STRING = "a string"
    TIME = "a time"
    DURATION = "a duration"
    LIST = "a list"
    ANY = "a trait value"  # trait(...): its type is known only per person


# --- Literals --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StringLit:
    value: str
    span: Span


@dataclass(frozen=True, slots=True)
class NumberLit:
    value: Decimal
    span: Span


@dataclass(frozen=True, slots=True)
class BoolLit:
    value: bool
    span: Span


@dataclass(frozen=True, slots=True)
class DurationLit:
    """``7d``, ``12h``, ``30m``, ``2w``, ``90s``: a length of time in microseconds."""

    micros: int
    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class AgoLit:
    """``ago(7d)``: the evaluation time minus a duration (resolved when the rule runs)."""

    micros: int
    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class TimeLit:
    """``time("2024-05-01")`` or ``time("2024-05-01T10:00:00Z")``: an absolute UTC instant."""

    micros: int
    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class ListLit:
    items: tuple[Literal, ...]
    span: Span


Literal = StringLit | NumberLit | BoolLit | AgoLit | TimeLit
Scalar = StringLit | NumberLit | BoolLit | AgoLit | TimeLit

# --- Value expressions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraitRef:
    """``trait("country")``: the person's current value of a trait (type ANY)."""

    key: str
    span: Span


@dataclass(frozen=True, slots=True)
class PropertyFilter:
    """One condition on an event property inside ``where=``: ``property("plan") == "pro"``.
    ``path`` splits on dots (``property("items.0.sku")`` is not supported: paths name
    nested object keys only). ``op`` is one of ==, !=, <, <=, >, >=, in, exists."""

    path: tuple[str, ...]
    op: str
    value: Scalar | ListLit | None  # None for exists
    span: Span


class FactKind(Enum):
    COUNT = "count"  # NUMBER, 0 when the person has no such event
    SUM = "sum"  # NUMBER: sum of `value` of the events, 0 when none
    FIRST = "first"  # TIME: earliest occurrence; absent when none
    LAST = "last"  # TIME: latest occurrence; absent when none


@dataclass(frozen=True, slots=True)
class EventFact:
    """``count(purchase, within=7d, where=property("plan") == "pro")`` and friends.

    ``within`` (microseconds) limits to events at or after evaluation time minus within;
    ``currency`` (``sum`` only, ISO-4217) keeps only events in that currency."""

    kind: FactKind
    event: str
    within: int | None
    filters: tuple[PropertyFilter, ...]
    currency: str | None
    span: Span


@dataclass(frozen=True, slots=True)
class ComputedRef:
    """``computed("purchase_count")``, ``computed("lifetime_value", "USD")``: a computed trait
    (docs/events.md). Counts and money are NUMBER (0 when none), ``*_at`` are TIME."""

    name: str
    currency: str | None
    span: Span


ValueExpr = TraitRef | EventFact | ComputedRef

# --- Boolean expressions ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Compare:
    """``left op right``; the parser puts the non-literal side left (flipping the operator).
    ``op``: ==, !=, <, <=, >, >=, in (right is a ListLit), contains (left is a trait)."""

    left: ValueExpr
    op: str
    right: Scalar | ListLit
    span: Span


@dataclass(frozen=True, slots=True)
class Exists:
    """``exists(trait("plan"))``, ``exists(last(purchase))``: the value is present."""

    target: ValueExpr
    span: Span


@dataclass(frozen=True, slots=True)
class Cohort:
    """``cohort("posthog", "checkout_abandoners")``: the cohort trait
    (``posthog_cohort_<slug>`` / ``heap_segment_<slug>``) is true."""

    source: str
    cohort: str
    trait_key: str
    span: Span


@dataclass(frozen=True, slots=True)
class Has:
    """``has(email)``: the person has an identifier of this stored type
    (``email`` → ``email_sha256``, ``phone`` → ``phone_sha256``)."""

    identifier_type: str
    span: Span


@dataclass(frozen=True, slots=True)
class ConsentRef:
    """``consent(ad_personalization)``: the purpose resolves to granted."""

    purpose: str
    span: Span


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[BoolExpr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[BoolExpr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Not:
    item: BoolExpr
    span: Span


Atom = Compare | Exists | Cohort | Has | ConsentRef | BoolLit
BoolExpr = And | Or | Not | Atom

COMPARE_OPS = ("==", "!=", "<", "<=", ">", ">=", "in", "contains")
COHORT_TRAIT_PREFIX = {"posthog": "posthog_cohort_", "heap": "heap_segment_"}
#: Computed traits the language reads, with their types (docs/events.md).
COMPUTED_TYPES = {
    "event_count": Type.NUMBER, "purchase_count": Type.NUMBER, "refund_count": Type.NUMBER,
    "lifetime_value": Type.NUMBER, "refunded_value": Type.NUMBER,
    "first_seen_at": Type.TIME, "last_seen_at": Type.TIME,
    "first_purchase_at": Type.TIME, "last_purchase_at": Type.TIME,
}
#: Computed traits that need a currency argument.
MONEY_COMPUTED = frozenset({"lifetime_value", "refunded_value"})


def atoms(node: BoolExpr) -> list[Atom]:
    """The leaf clauses of a rule, in text order."""
    if isinstance(node, And | Or):
        return [a for item in node.items for a in atoms(item)]
    if isinstance(node, Not):
        return atoms(node.item)
    return [node]
