"""The type checker of the audience rule language: a parsed tree → diagnostics.

The parser (:mod:`audiences.rules.parser`) guarantees the *shape* of the tree: every
``Compare`` has a value on the left and a literal on the right, durations and property paths
are valid, every call had the right arguments. This module adds what needs types or the
deployment's catalog (docs/audiences.md, "Type rules"):

- comparisons: a number only with numbers, a time only with ``ago()``/``time()``, ``in`` with a
  list of items of one matching type, ``contains`` only on ``trait(...)`` with a string or a
  number, no ordering of booleans (``TYPE_MISMATCH``);
- the catalog: events (``UNKNOWN_EVENT``, a warning: events may arrive after the rule is
  written), consent purposes (``UNKNOWN_PURPOSE``) and identifier types
  (``UNKNOWN_IDENTIFIER_TYPE``), each with a did-you-mean hint;
- warnings for rules that are valid but probably wrong: ``sum()`` without a currency
  (``MISSING_CURRENCY``), ``exists()`` of a value that is never absent (``ALWAYS_TRUE``),
  counts compared with negative or fractional numbers (``ALWAYS_TRUE``/``ALWAYS_FALSE``, or
  ``INVALID_LITERAL`` as a warning when the clause still depends on the count).

The checker never changes the tree; :func:`type_of` and :func:`literal_type` are the typing
the compiler can reuse.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from audiences.rules.ast import (
    COMPUTED_TYPES,
    AgoLit,
    And,
    BoolExpr,
    BoolLit,
    Compare,
    ComputedRef,
    ConsentRef,
    EventFact,
    Exists,
    FactKind,
    Has,
    ListLit,
    Not,
    NumberLit,
    Or,
    PropertyFilter,
    Scalar,
    Span,
    StringLit,
    TimeLit,
    TraitRef,
    Type,
    ValueExpr,
)
from audiences.rules.lexer import (
    ALWAYS_FALSE,
    ALWAYS_TRUE,
    INVALID_LITERAL,
    MISSING_CURRENCY,
    TYPE_MISMATCH,
    UNKNOWN_EVENT,
    UNKNOWN_IDENTIFIER_TYPE,
    UNKNOWN_PURPOSE,
    Diagnostic,
    Severity,
    Source,
    TokenKind,
    quote,
    tokenize,
)

#: Values that are whole numbers, 0 or more.
COUNT_COMPUTED = frozenset({"event_count", "purchase_count", "refund_count"})
ORDER_OPS = ("<", "<=", ">", ">=")
_DATE_LIKE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_RAW_IDENTIFIER = {"email_sha256": "email", "phone_sha256": "phone"}


@dataclass(frozen=True)
class RuleCatalog:
    """What the deployment knows, for the checks that depend on it."""

    events: frozenset[str]  # known canonical events
    purposes: tuple[str, ...]  # configured consent purposes
    identifier_types: frozenset[str]  # stored identifier types (email_sha256, user_id, ...)


def type_of(expr: ValueExpr) -> Type:
    """The static type of a value expression."""
    if isinstance(expr, TraitRef):
        return Type.ANY
    if isinstance(expr, EventFact):
        return Type.NUMBER if expr.kind in (FactKind.COUNT, FactKind.SUM) else Type.TIME
    return COMPUTED_TYPES[expr.name]


def literal_type(literal: Scalar | ListLit) -> Type:
    """The type of a literal."""
    if isinstance(literal, StringLit):
        return Type.STRING
    if isinstance(literal, NumberLit):
        return Type.NUMBER
    if isinstance(literal, BoolLit):
        return Type.BOOL
    if isinstance(literal, AgoLit | TimeLit):
        return Type.TIME
    return Type.LIST


def check(rule: BoolExpr, text: str, catalog: RuleCatalog) -> list[Diagnostic]:
    """Type-check a parsed rule (``text`` is the rule it was parsed from)."""
    checker = _Checker(Source(text), catalog)
    checker.visit(rule)
    return checker.diagnostics


def did_you_mean(word: str, candidates: Iterable[str], template: str = "did you mean {}?") -> str:
    """A hint naming the candidate closest to ``word``, or "" when none is close."""
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=1)
    return template.format(close[0]) if close else ""


def _is_count(expr: ValueExpr) -> bool:
    if isinstance(expr, EventFact):
        return expr.kind is FactKind.COUNT
    return isinstance(expr, ComputedRef) and expr.name in COUNT_COMPUTED


def _whole(value: Decimal) -> bool:
    return value >= 0 and value == value.to_integral_value()


def _constant(op: str, value: Decimal) -> bool | None:
    """The result of ``count op value`` when it is the same for every count (0, 1, 2, ...)."""
    if op == "==":
        return None if _whole(value) else False
    if op == "!=":
        return None if _whole(value) else True
    if op == "<":
        return False if value <= 0 else None
    if op == "<=":
        return False if value < 0 else None
    if op == ">":
        return True if value < 0 else None
    if op == ">=":
        return True if value <= 0 else None
    return None


class _Checker:
    def __init__(self, source: Source, catalog: RuleCatalog) -> None:
        self.source = source
        self.catalog = catalog
        self.diagnostics: list[Diagnostic] = []

    def _report(self, severity: Severity, code: str, message: str, span: Span, hint: str = "") -> None:
        self.diagnostics.append(Diagnostic(severity, code, message, span, hint))

    def _error(self, code: str, message: str, span: Span, hint: str = "") -> None:
        self._report("ERROR", code, message, span, hint)

    def _warning(self, code: str, message: str, span: Span, hint: str = "") -> None:
        self._report("WARNING", code, message, span, hint)

    def _shown(self, span: Span) -> str:
        text = " ".join(self.source.text[span.start : span.end].split())
        return text if len(text) <= 60 else text[:57] + "..."

    def _first_argument(self, call: Span) -> tuple[Span, str]:
        """The span and the written word of a call's first argument (``purchase`` in
        ``count(purchase, ...)``); the call's span when it cannot be found."""
        tokens = tokenize(self.source, call.start, call.end)
        if len(tokens) > 2 and tokens[2].kind in (TokenKind.IDENT, TokenKind.STRING):
            token = tokens[2]
            word = token.value if isinstance(token.value, str) else token.text
            return self.source.span(token.start, token.end), word
        return call, self._shown(call)

    # --- boolean structure ------------------------------------------------------------------

    def visit(self, node: BoolExpr) -> None:
        if isinstance(node, And | Or):
            for item in node.items:
                self.visit(item)
        elif isinstance(node, Not):
            self.visit(node.item)
        elif isinstance(node, Compare):
            self._value(node.left)
            self._compare(node)
        elif isinstance(node, Exists):
            self._value(node.target)
            self._exists(node)
        elif isinstance(node, Has):
            self._has(node)
        elif isinstance(node, ConsentRef):
            self._consent(node)
        # Cohort and BoolLit need no checks: the parser validated the source.

    def _exists(self, node: Exists) -> None:
        if type_of(node.target) is Type.NUMBER:
            target = self._shown(node.target.span)
            self._warning(
                ALWAYS_TRUE, f"{self._shown(node.span)} is always true: {target} is 0 when there is nothing to count",
                node.span, f"write `{target} > 0`",
            )

    def _has(self, node: Has) -> None:
        types = self.catalog.identifier_types
        if node.identifier_type in types:
            return
        span, written = self._first_argument(node.span)
        candidates = set(types) | {_RAW_IDENTIFIER[t] for t in types if t in _RAW_IDENTIFIER}
        hint = did_you_mean(written, candidates, "did you mean `has({})`?")
        if not hint and types:
            hint = "identifier types: " + ", ".join(sorted(candidates))
        self._error(UNKNOWN_IDENTIFIER_TYPE, f'unknown identifier type "{written}"', span, hint)

    def _consent(self, node: ConsentRef) -> None:
        purposes = self.catalog.purposes
        if node.purpose in purposes:
            return
        span, _ = self._first_argument(node.span)
        hint = did_you_mean(node.purpose, purposes, "did you mean `consent({})`?")
        if not hint:
            hint = "purposes: " + ", ".join(purposes) if purposes else "no consent purposes are configured"
        self._error(UNKNOWN_PURPOSE, f'unknown consent purpose "{node.purpose}"', span, hint)

    # --- values -----------------------------------------------------------------------------

    def _value(self, expr: ValueExpr) -> None:
        if not isinstance(expr, EventFact):
            return
        if expr.event not in self.catalog.events:
            span, _ = self._first_argument(expr.span)
            canonical = re.sub(r"[^a-z0-9]+", "_", expr.event.lower()).strip("_")
            hint = did_you_mean(canonical, self.catalog.events) or did_you_mean(expr.event, self.catalog.events)
            if not hint and self.catalog.events:
                hint = "known events: " + ", ".join(sorted(self.catalog.events)[:20])
            self._warning(
                UNKNOWN_EVENT, f"unknown event {quote(expr.event)}: no such canonical event is known", span, hint,
            )
        if expr.kind is FactKind.SUM and expr.currency is None:
            call = self._shown(expr.span)
            self._warning(
                MISSING_CURRENCY, f"{call} adds values of every currency together", expr.span,
                f'add a currency: {call[:-1]}, currency="USD")' if call.endswith(")") else 'add currency="USD"',
            )
        for item in expr.filters:
            self._filter(item)

    def _filter(self, item: PropertyFilter) -> None:
        value = item.value
        if value is None:  # exists
            return
        items = value.items if isinstance(value, ListLit) else (value,)
        if times := [literal for literal in items if isinstance(literal, AgoLit | TimeLit)]:
            self._error(
                TYPE_MISMATCH, f"event properties cannot be compared with {self._shown(times[0].span)} (a time): "
                "they are strings, numbers or booleans", item.span, "to keep only recent events use within=, e.g. "
                "within=7d",
            )
            return
        if item.op == "in":
            if not isinstance(value, ListLit):
                self._error(
                    TYPE_MISMATCH, f"`in` needs a list, not {literal_type(value).value}", item.span,
                    f"write `in [{self._shown(value.span)}]`",
                )
            else:
                self._same_types(value)
            return
        if isinstance(value, ListLit):
            self._list_with_scalar_op(item.op, item.span, value)
        elif item.op in ORDER_OPS and isinstance(value, BoolLit):
            self._unordered_bool(item.op, item.span)

    # --- comparisons ------------------------------------------------------------------------

    def _compare(self, node: Compare) -> None:
        left, op, right = node.left, node.op, node.right
        left_text, left_type = self._shown(left.span), type_of(left)
        if op == "contains":
            if not isinstance(left, TraitRef):
                self._error(
                    TYPE_MISMATCH, f"`contains` works on trait(...) only, not on {left_text} ({left_type.value})",
                    node.span, "compare it with ==, !=, <, <=, > or >=",
                )
            elif not isinstance(right, StringLit | NumberLit):
                hint = "check one value at a time and join the clauses with `or`" if isinstance(right, ListLit) else ""
                self._error(
                    TYPE_MISMATCH, f"`contains` needs a string or a number, not {literal_type(right).value}",
                    node.span, hint,
                )
            return
        if op == "in":
            if not isinstance(right, ListLit):
                self._error(
                    TYPE_MISMATCH, f"`in` needs a list, not {literal_type(right).value}", node.span,
                    f"write `{left_text} in [{self._shown(right.span)}]`",
                )
            elif left_type is Type.TIME:
                self._error(
                    TYPE_MISMATCH, f"`in` does not apply to times ({left_text} is {left_type.value})", node.span,
                    "compare with <, <=, > or >= and ago(...) or time(...)",
                )
            elif self._same_types(right) and all(self._compatible(node, item, "==") for item in right.items):
                self._count_warnings(node)
            return
        if isinstance(right, ListLit):
            self._list_with_scalar_op(op, node.span, right, left_text)
        elif self._compatible(node, right, op):
            self._count_warnings(node)

    def _compatible(self, node: Compare, literal: Scalar, op: str) -> bool:
        """Whether ``node.left op literal`` is well-typed; reports when it is not."""
        left_type, right_type = type_of(node.left), literal_type(literal)
        if left_type is Type.ANY:
            if op in ORDER_OPS and right_type is Type.BOOL:
                self._unordered_bool(op, node.span)
                return False
            return True
        if left_type is right_type:
            return True
        left_text, right_text = self._shown(node.left.span), self._shown(literal.span)
        hint = ""
        if left_type is Type.NUMBER:
            hint = "compare it with a number, e.g. > 0"
            if isinstance(literal, StringLit) and re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", literal.value.strip()):
                hint = f"write {literal.value.strip()} without quotes"
        elif left_type is Type.TIME:
            hint = 'use ago(7d) or time("2024-05-01")'
            if isinstance(literal, StringLit) and _DATE_LIKE.match(literal.value):
                hint = f"write time({quote(literal.value)})"
        self._error(
            TYPE_MISMATCH,
            f"cannot compare {left_text} ({left_type.value}) with {right_text} ({right_type.value})",
            node.span, hint,
        )
        return False

    def _same_types(self, items: ListLit) -> bool:
        first = items.items[0]
        for item in items.items[1:]:
            if literal_type(item) is not literal_type(first):
                self._error(
                    TYPE_MISMATCH,
                    f"list items must all have the same type: {self._shown(item.span)} is "
                    f"{literal_type(item).value}, {self._shown(first.span)} is {literal_type(first).value}",
                    item.span, "quote all the items or none of them",
                )
                return False
        return True

    def _list_with_scalar_op(self, op: str, span: Span, items: ListLit, subject: str = "") -> None:
        hint = ""
        if op == "==" and subject:
            hint = f"write `{subject} in {self._shown(items.span)}`"
        elif op == "!=" and subject:
            hint = f"write `{subject} not in {self._shown(items.span)}`"
        elif op == "==":
            hint = "use `in`"
        self._error(TYPE_MISMATCH, f"`{op}` compares with one value, not a list", span, hint)

    def _unordered_bool(self, op: str, span: Span) -> None:
        self._error(TYPE_MISMATCH, f"booleans have no order: `{op}` cannot compare with true or false", span,
                    "use == or !=")

    def _count_warnings(self, node: Compare) -> None:
        """Counts are whole numbers, 0 or more: warn about comparisons that ignore it."""
        if not _is_count(node.left):
            return
        text = self._shown(node.span)
        right = node.right
        if isinstance(right, ListLit):
            odd = [item for item in right.items if isinstance(item, NumberLit) and not _whole(item.value)]
            if odd and len(odd) == len(right.items):
                self._warning(
                    ALWAYS_FALSE, f"{text} is always false: counts are whole numbers, 0 or more", node.span,
                    "list whole numbers, e.g. [1, 2, 3]",
                )
            elif odd:
                self._warning(
                    INVALID_LITERAL, f"{self._shown(odd[0].span)} never equals a count: counts are whole numbers, "
                    "0 or more", odd[0].span, "remove it from the list",
                )
            return
        if not isinstance(right, NumberLit):
            return
        verdict = _constant(node.op, right.value)
        if verdict is not None:
            code, word = (ALWAYS_TRUE, "true") if verdict else (ALWAYS_FALSE, "false")
            self._warning(
                code, f"{text} is always {word}: counts are whole numbers, 0 or more", node.span,
                self._constant_hint(node.op, verdict),
            )
        elif not _whole(right.value):
            self._warning(
                INVALID_LITERAL, f"{right.value} is not a whole number, but counts are", right.span,
                "compare with a whole number",
            )

    @staticmethod
    def _constant_hint(op: str, verdict: bool) -> str:
        if not verdict:
            return "no one matches this clause: compare with a whole number, 0 or more"
        if op in (">", ">="):
            return "everyone matches this clause: did you mean `> 0`?"
        return "everyone matches this clause: remove it, or compare with a whole number"
