"""The parser of the audience rule language: text → :mod:`audiences.rules.ast` tree.

A hand-written recursive-descent parser over :func:`~audiences.rules.lexer.tokenize`'s tokens,
one method per grammar rule of docs/audiences.md ("Rule language"). Precedence is
``not`` > ``and`` > ``or``; comparisons are atoms, so ``not trait("a") == 1`` negates the
comparison.

Design:

- **Calls are parsed generically, then built.** Every ``name(...)`` is parsed into a list of
  positional and ``keyword=`` arguments (``where=`` takes property conditions, everything else a
  term), and a per-function builder checks the arguments and makes the node. Builders validate
  everything that needs no catalog: argument shapes (``WRONG_ARGUMENTS``), literal values such as
  durations, ``time("...")``, currencies, trait keys and computed-trait names
  (``INVALID_LITERAL``), cohort sources. Catalog look-ups (events, purposes, identifier types)
  and type rules are the checker's (:mod:`audiences.rules.checker`).
- **Shapes the AST cannot hold are rejected here**: a bare value as a condition
  (``count(purchase)``), a comparison of two values or two literals, a duration outside
  ``within=``, ``property()`` outside ``where=``. A comparison with the literal on the left is
  flipped (``3 < count(x)`` → ``count(x) > 3``), and ``x not in [...]`` becomes
  ``Not(Compare(x, "in", [...]))`` with both nodes spanning the whole clause (likewise
  ``not contains``).
- **Errors.** A syntax error (or a lexical one, or a size limit) stops the parse: what follows
  would only produce noise. Errors that leave the token structure intact (an unknown function,
  wrong arguments, a bad literal) are recorded and parsing continues with a placeholder, so
  one pass reports them all. Any error means no tree: the checker only ever sees clean trees.
- **Limits** keep the recursion bounded whatever the input: text ≤ 16 KiB (UTF-8), nesting
  (parentheses, ``not``, calls, lists) ≤ 64 levels, ≤ 256 clauses, lists ≤ 1,000 items.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import NoReturn

from audiences.rules.ast import (
    COHORT_TRAIT_PREFIX,
    COMPUTED_TYPES,
    MONEY_COMPUTED,
    AgoLit,
    And,
    BoolExpr,
    BoolLit,
    Cohort,
    Compare,
    ComputedRef,
    ConsentRef,
    DurationLit,
    EventFact,
    Exists,
    FactKind,
    Has,
    ListLit,
    Not,
    NumberLit,
    Or,
    PropertyFilter,
    Span,
    StringLit,
    TimeLit,
    TraitRef,
    Type,
)
from audiences.rules.checker import literal_type, type_of
from audiences.rules.lexer import (
    DURATION_UNITS,
    EMPTY_RULE,
    INVALID_LITERAL,
    KEYWORDS,
    RULE_TOO_LONG,
    SYNTAX_ERROR,
    TYPE_MISMATCH,
    UNEXPECTED_END,
    UNKNOWN_COHORT_SOURCE,
    UNKNOWN_FUNCTION,
    UNSUPPORTED,
    WRONG_ARGUMENTS,
    Diagnostic,
    Source,
    Token,
    TokenKind,
    quote,
    tokenize,
)

MAX_RULE_BYTES = 16 * 1024
MAX_DEPTH = 64
MAX_ATOMS = 256
MAX_LIST_ITEMS = 1000
MAX_TRAIT_KEY = 128
MIN_DURATION = DURATION_UNITS["s"]
MAX_DURATION = 3650 * DURATION_UNITS["d"]
#: Raw identifier types accepted by ``has()`` and the stored type they stand for.
IDENTIFIER_ALIASES = {"email": "email_sha256", "phone": "phone_sha256"}
#: Flipping ``literal OP value`` into ``value OP' literal``.
FLIPPED_OPS = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
EVENT_FACTS = ("count", "sum", "first", "last")

_CURRENCY = re.compile(r"[A-Z]{3}")
_DURATION_TEXT = re.compile(r"[0-9]+[smhdw]")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATETIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?(?P<zone>Z|[+-][0-9]{2}:[0-9]{2})?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- Intermediate terms (never in a finished tree) -------------------------------------------


@dataclass(frozen=True, slots=True)
class _Name:
    """A bare word as an argument: the ``purchase`` of ``count(purchase)``."""

    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class _Property:
    """``property("a.b")``: only meaningful inside ``where=``."""

    path: tuple[str, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class _Filters:
    """The value of ``where=``."""

    items: tuple[PropertyFilter, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class _Invalid:
    """Stands in for a construct whose error is already reported."""

    span: Span


_Term = (
    StringLit | NumberLit | BoolLit | DurationLit | AgoLit | TimeLit | ListLit
    | TraitRef | EventFact | ComputedRef
    | Exists | Cohort | Has | ConsentRef | PropertyFilter
    | _Name | _Property | _Filters | _Invalid
)
_SCALARS = (StringLit, NumberLit, BoolLit, AgoLit, TimeLit)
_LITERALS = (*_SCALARS, ListLit)
_VALUES = (TraitRef, EventFact, ComputedRef)
_CONDITIONS = (Exists, Cohort, Has, ConsentRef)


@dataclass(frozen=True, slots=True)
class _Arg:
    keyword: str | None
    keyword_span: Span | None
    value: _Term
    span: Span


@dataclass(frozen=True, slots=True)
class _Call:
    name: str
    args: tuple[_Arg, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class _Op:
    op: str  # ==, !=, <, <=, >, >=, in, contains
    negated: bool  # `not in`, `not contains`
    text: str
    span: Span


_Parsed = tuple[BoolExpr, int, int]  # a node and the extent of its text including parentheses


@dataclass(frozen=True, slots=True)
class ParseResult:
    """The tree (None when there is any error) and the parse errors."""

    rule: BoolExpr | None
    diagnostics: tuple[Diagnostic, ...]


class _Stop(Exception):
    """Ends the parse after a syntax error (already recorded)."""


def parse(text: str) -> ParseResult:
    """Parse a rule. Never raises: problems come back as diagnostics."""
    source = Source(text)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RULE_BYTES:
        diagnostic = Diagnostic(
            "ERROR", RULE_TOO_LONG, f"the rule is longer than {MAX_RULE_BYTES // 1024} KiB",
            source.span(0, len(text)), "split it into several audiences",
        )
        return ParseResult(None, (diagnostic,))
    parser = _Parser(source)
    rule = parser.parse_rule()
    return ParseResult(rule, tuple(parser.diagnostics))


def slug(name: str) -> str:
    """A cohort name as a trait-key suffix: lower-case, runs of other characters as ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def parse_time(value: str) -> int:
    """``time("...")``'s argument as microseconds since the epoch (UTC).

    Raises :class:`LiteralError` for anything but a date or a date-time with a zone."""
    try:
        if _DATE.fullmatch(value):
            day = date.fromisoformat(value)
            instant = datetime(day.year, day.month, day.day, tzinfo=UTC)
        elif match := _DATETIME.fullmatch(value):
            if match.group("zone") is None:
                raise LiteralError(f'time "{value}" has no time zone', f"add Z for UTC: time({quote(value + 'Z')})")
            instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
        else:
            raise LiteralError(
                f"{quote(value)} is not a date or a date-time",
                'write time("2024-05-01") or time("2024-05-01T10:00:00Z")',
            )
    except ValueError:
        raise LiteralError(f"{quote(value)} is not a valid date or time", "check the month, day and hour") from None
    return (instant - _EPOCH) // timedelta(microseconds=1)


class LiteralError(Exception):
    """A literal whose text is malformed: the message and a hint."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def _describe(token: Token) -> str:
    """A token as it appears in "found ..." messages."""
    if token.kind is TokenKind.EOF:
        return "end of rule"
    text = token.text if len(token.text) <= 40 else token.text[:37] + "..."
    labels = {TokenKind.STRING: "the string", TokenKind.NUMBER: "the number", TokenKind.DURATION: "the duration"}
    if token.kind in labels:
        return f"{labels[token.kind]} {text}"
    return f'"{text}"'


def _token_hint(token: Token) -> str:
    """A fix for a token that is a common slip from other languages."""
    text = token.text
    if token.kind is TokenKind.IDENT and text.lower() in KEYWORDS and text not in KEYWORDS:
        return f"keywords are lower-case: use `{text.lower()}`"
    hints = {
        "&&": "use `and`", "&": "use `and`", "||": "use `or`", "|": "use `or`",
        "!": "use `not`", "<>": "use `!=`", "=": "use `==` to compare",
        "-": "write negative numbers without a space: -3",
    }
    return hints.get(text, "") if token.kind in (TokenKind.BAD, TokenKind.ASSIGN) else ""


def _plural(count: int) -> str:
    return f"{count} argument" + ("" if count == 1 else "s")


class _Parser:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.text = source.text
        self.tokens = tokenize(source)
        self.index = 0
        self.last_end = 0  # end offset of the last consumed token
        self.depth = 0
        self.atom_count = 0
        self.placeholders = 0
        self.diagnostics: list[Diagnostic] = []
        self.builders: dict[str, Callable[[_Call], _Term]] = {
            "trait": self._build_trait,
            "count": self._build_fact,
            "sum": self._build_fact,
            "first": self._build_fact,
            "last": self._build_fact,
            "computed": self._build_computed,
            "exists": self._build_exists,
            "cohort": self._build_cohort,
            "has": self._build_has,
            "consent": self._build_consent,
            "ago": self._build_ago,
            "time": self._build_time,
            "property": self._build_property,
        }

    # --- tokens and diagnostics ---------------------------------------------------------------

    def _peek(self, ahead: int = 0) -> Token:
        token = self.tokens[min(self.index + ahead, len(self.tokens) - 1)]
        if token.error is not None:
            self.diagnostics.append(token.error)
            raise _Stop
        return token

    def _advance(self) -> Token:
        token = self._peek()
        if token.kind is not TokenKind.EOF:
            self.index += 1
            self.last_end = token.end
        return token

    @staticmethod
    def _is_word(token: Token, *words: str) -> bool:
        return token.kind is TokenKind.IDENT and token.text in words

    def _span(self, start: int, end: int) -> Span:
        return self.source.span(start, end)

    def _shown(self, span: Span) -> str:
        text = " ".join(self.text[span.start : span.end].split())
        return text if len(text) <= 60 else text[:57] + "..."

    def _error(self, code: str, message: str, span: Span, hint: str = "") -> None:
        self.diagnostics.append(Diagnostic("ERROR", code, message, span, hint))

    def _fail(self, code: str, message: str, span: Span, hint: str = "") -> NoReturn:
        self._error(code, message, span, hint)
        raise _Stop

    def _fail_expected(self, expected: str, token: Token, hint: str = "") -> NoReturn:
        code = UNEXPECTED_END if token.kind is TokenKind.EOF else SYNTAX_ERROR
        message = f"expected {expected}, found {_describe(token)}"
        self._fail(code, message, self._span(token.start, token.end), hint or _token_hint(token))

    def _enter(self, token: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self._fail(
                RULE_TOO_LONG, f"the rule nests deeper than {MAX_DEPTH} levels", self._span(token.start, token.end),
                "remove redundant parentheses or split the rule",
            )

    def _leave(self) -> None:
        self.depth -= 1

    def _placeholder(self, span: Span) -> BoolExpr:
        """A stand-in clause after a reported error (counted, so it can never reach a caller)."""
        self.placeholders += 1
        return BoolLit(True, span)

    # --- boolean structure ------------------------------------------------------------------

    def parse_rule(self) -> BoolExpr | None:
        try:
            if self._peek().kind is TokenKind.EOF:
                self._error(
                    EMPTY_RULE, "the rule is empty", self._span(0, len(self.text)),
                    "write a condition, e.g. count(purchase, within=30d) > 0",
                )
                return None
            rule, _, _ = self._parse_or()
            token = self._peek()
            if token.kind is not TokenKind.EOF:
                self._fail_expected('"and", "or" or end of rule', token, self._after_clause_hint(token))
        except _Stop:
            return None
        if self.placeholders and not self.diagnostics:  # defensive: every placeholder follows an error
            self._error(SYNTAX_ERROR, "the rule could not be parsed", self._span(0, len(self.text)))
        return None if self.diagnostics else rule

    def _after_clause_hint(self, token: Token) -> str:
        if self._is_word(token, "not"):
            return "to negate a clause write `and not ...` or `or not ...`"
        if token.kind is TokenKind.IDENT and token.text.lower() not in KEYWORDS:
            return "join clauses with `and` or `or`"
        if token.kind in (TokenKind.STRING, TokenKind.NUMBER, TokenKind.DURATION, TokenKind.LPAREN):
            return "join clauses with `and` or `or`"
        return _token_hint(token)

    def _parse_or(self) -> _Parsed:
        items = [self._parse_and()]
        while self._is_word(self._peek(), "or"):
            self._advance()
            items.append(self._parse_and())
        return self._join(Or, items)

    def _parse_and(self) -> _Parsed:
        items = [self._parse_not()]
        while self._is_word(self._peek(), "and"):
            self._advance()
            items.append(self._parse_not())
        return self._join(And, items)

    def _join(self, node: type[And] | type[Or], items: list[_Parsed]) -> _Parsed:
        if len(items) == 1:
            return items[0]
        start, end = items[0][1], items[-1][2]
        return node(tuple(item for item, _, _ in items), self._span(start, end)), start, end

    def _parse_not(self) -> _Parsed:
        token = self._peek()
        if self._is_word(token, "not"):
            self._enter(token)
            self._advance()
            item, _, end = self._parse_not()
            self._leave()
            return Not(item, self._span(token.start, end)), token.start, end
        if token.kind is TokenKind.LPAREN:
            self._enter(token)
            self._advance()
            inner, _, _ = self._parse_or()
            close = self._peek()
            if close.kind is not TokenKind.RPAREN:
                where = self.source.where(token.start)
                self._fail_expected(f'")" to close "(" at {where}', close, self._after_clause_hint(close))
            self._advance()
            self._leave()
            return inner, token.start, close.end
        atom = self._parse_atom()
        return atom, atom.span.start, atom.span.end

    def _parse_atom(self) -> BoolExpr:
        left = self._parse_operand("a condition")
        op = self._parse_comparison_op()
        if op is None:
            token = self._peek()
            ends_clause = token.kind in (TokenKind.EOF, TokenKind.RPAREN) or self._is_word(token, "and", "or")
            if isinstance(left, _VALUES) and not ends_clause:
                self._fail_expected("a comparison operator such as == or in", token)
            atom = self._as_condition(left)
        else:
            right = self._parse_operand(f"a value after {op.text}")
            atom = self._compare(left, op, right)
            token = self._peek()
            if token.kind in (TokenKind.OP, TokenKind.ASSIGN) or self._is_word(token, "in", "contains"):
                self._fail_expected(
                    '"and", "or" or end of rule', token,
                    "comparisons cannot be chained: join two comparisons with `and`",
                )
        self.atom_count += 1
        if self.atom_count > MAX_ATOMS:
            self._fail(
                RULE_TOO_LONG, f"the rule has more than {MAX_ATOMS} clauses", atom.span,
                'split the audience, or use `in ["a", "b"]` instead of many comparisons joined by `or`',
            )
        return atom

    def _parse_comparison_op(self) -> _Op | None:
        token = self._peek()
        if token.kind is TokenKind.OP or self._is_word(token, "in", "contains"):
            self._advance()
            return _Op(token.text, False, token.text, self._span(token.start, token.end))
        if self._is_word(token, "not") and self._is_word(self._peek(1), "in", "contains"):
            self._advance()
            second = self._advance()
            return _Op(second.text, True, f"not {second.text}", self._span(token.start, second.end))
        return None

    # --- atoms ------------------------------------------------------------------------------

    def _as_condition(self, term: _Term) -> BoolExpr:
        """A term standing alone as a clause."""
        if isinstance(term, Exists | Cohort | Has | ConsentRef | BoolLit):
            return term
        text = self._shown(term.span)
        if not isinstance(term, _Invalid):
            if isinstance(term, TraitRef):
                self._error(
                    TYPE_MISMATCH, f"{text} is a trait value, not a condition", term.span,
                    f'compare it, e.g. `{text} == "pro"`, or test it with `exists({text})`',
                )
            elif isinstance(term, EventFact | ComputedRef):
                value_type = type_of(term)
                hint = f"compare it, e.g. `{text} > 0`"
                if value_type is Type.TIME:
                    hint = f"compare it, e.g. `{text} > ago(7d)`, or test it with `exists({text})`"
                self._error(TYPE_MISMATCH, f"{text} is {value_type.value}, not a condition", term.span, hint)
            elif isinstance(term, PropertyFilter | _Property):
                self._property_outside_where(term.span)
            elif isinstance(term, DurationLit):
                self._duration_outside_within(term)
            else:
                self._error(
                    TYPE_MISMATCH, f"{text} is {_term_kind(term)}, not a condition", term.span,
                    'a condition is a comparison such as trait("country") == "DE" or a test such as has(email)',
                )
        return self._placeholder(term.span)

    def _compare(self, left: _Term, op: _Op, right: _Term) -> BoolExpr:
        span = self._span(min(left.span.start, right.span.start), max(left.span.end, right.span.end))
        for side in (left, right):
            if isinstance(side, _Invalid):
                return self._placeholder(span)
            if isinstance(side, DurationLit):
                self._duration_outside_within(side)
                return self._placeholder(span)
            if isinstance(side, _CONDITIONS):
                self._compared_condition(side, op, right if side is left else left)
                return self._placeholder(span)
            if isinstance(side, PropertyFilter | _Property):
                self._property_outside_where(side.span)
                return self._placeholder(span)
        oriented = self._orient(left, op, right, _VALUES, "trait(...), count(...), sum(...), first(...), "
                                "last(...) or computed(...)")
        if oriented is None:
            return self._placeholder(span)
        subject, operator, literal = oriented
        assert isinstance(subject, _VALUES) and isinstance(literal, _LITERALS)
        compare = Compare(subject, operator, literal, span)
        return Not(compare, span) if op.negated else compare

    def _orient(
        self, left: _Term, op: _Op, right: _Term, subjects: tuple[type, ...], subject_names: str,
    ) -> tuple[_Term, str, _Term] | None:
        """``(subject, op, literal)`` of a comparison, flipped when the literal is on the left."""
        if isinstance(left, subjects) and isinstance(right, _LITERALS):
            return left, op.op, right
        if isinstance(right, subjects) and isinstance(left, _LITERALS):
            if op.op in ("in", "contains"):
                subject = self._shown(right.span)
                self._error(
                    UNSUPPORTED, f"the literal must be on the right of `{op.text}`", op.span,
                    f"write `{subject} contains {self._shown(left.span)}`" if op.op == "in"
                    else f"write `{subject} in [...]`",
                )
                return None
            return right, FLIPPED_OPS[op.op], left
        span = self._span(min(left.span.start, right.span.start), max(left.span.end, right.span.end))
        if isinstance(left, subjects) and isinstance(right, subjects):
            self._error(
                UNSUPPORTED, "comparing two values with each other is not supported", span,
                "compare each with a literal, e.g. count(purchase) > 0 and count(refund) == 0",
            )
        elif isinstance(left, _LITERALS) and isinstance(right, _LITERALS):
            message = "both sides of the comparison are literals"
            self._error(UNSUPPORTED, message, span, f"one side must be {subject_names}")
        else:
            other = right if isinstance(left, (*subjects, *_LITERALS)) else left
            self._error(
                UNSUPPORTED, f"{self._shown(other.span)} cannot be compared here", other.span,
                f"compare {subject_names} with a literal",
            )
        return None

    def _compared_condition(self, condition: _Term, op: _Op, other: _Term) -> None:
        text = self._shown(condition.span)
        hint = f"use it as it is, or negate it: `not {text}`"
        if isinstance(other, BoolLit) and op.op in ("==", "!="):
            hint = f"write `{text}`" if other.value == (op.op == "==") else f"write `not {text}`"
        self._error(TYPE_MISMATCH, f"{text} is already a condition and cannot be compared", condition.span, hint)

    def _property_outside_where(self, span: Span) -> None:
        self._error(
            UNSUPPORTED, "property(...) is only valid inside where=", span,
            'e.g. count(purchase, where=property("plan") == "pro") > 0',
        )

    def _duration_outside_within(self, duration: DurationLit) -> None:
        self._error(
            INVALID_LITERAL, f"a duration ({duration.text}) is only valid as within=", duration.span,
            f"for a point in time write ago({duration.text})",
        )

    # --- operands ---------------------------------------------------------------------------

    def _parse_operand(self, expected: str, *, allow_name: bool = False) -> _Term:
        token = self._peek()
        span = self._span(token.start, token.end)
        kind = token.kind
        if kind is TokenKind.STRING:
            self._advance()
            assert isinstance(token.value, str)
            return StringLit(token.value, span)
        if kind is TokenKind.NUMBER:
            self._advance()
            assert isinstance(token.value, Decimal)
            return NumberLit(token.value, span)
        if kind is TokenKind.DURATION:
            self._advance()
            assert isinstance(token.value, int)
            return DurationLit(token.value, token.text, span)
        if kind is TokenKind.LBRACKET:
            return self._parse_list()
        if kind is TokenKind.IDENT:
            if token.text in ("true", "false"):
                self._advance()
                return BoolLit(token.text == "true", span)
            if token.text.lower() in KEYWORDS:
                self._fail_expected(expected, token)
            if self._peek(1).kind is TokenKind.LPAREN:
                return self._parse_call()
            if allow_name:
                self._advance()
                return _Name(token.text, span)
            self._fail_expected(expected, token, self._bare_word_hint(token.text, expected))
        self._fail_expected(expected, token)

    def _bare_word_hint(self, word: str, expected: str) -> str:
        if word in self.builders:
            return f"{word} is a function: write {word}(...)"
        if expected == "a condition":
            return f'for an event write count({word}) > 0, for a trait trait("{word}")'
        return f"strings need double quotes: write {quote(word)}"

    def _parse_list(self) -> ListLit | _Invalid:
        open_token = self._advance()
        self._enter(open_token)
        items: list[_Term] = []
        while self._peek().kind is not TokenKind.RBRACKET:
            items.append(self._parse_operand("a list item"))
            token = self._peek()
            if token.kind is TokenKind.COMMA:
                self._advance()
            elif token.kind is not TokenKind.RBRACKET:
                where = self.source.where(open_token.start)
                self._fail_expected(f'"," or "]" to close "[" at {where}', token)
        close = self._advance()
        self._leave()
        span = self._span(open_token.start, close.end)
        if not items:
            self._error(
                INVALID_LITERAL, "the list is empty", span,
                'a list needs at least one item, e.g. ["DE"]; a clause that never matches is `false`',
            )
            return _Invalid(span)
        if len(items) > MAX_LIST_ITEMS:
            self._error(INVALID_LITERAL, f"the list has {len(items)} items; at most {MAX_LIST_ITEMS}", span)
            return _Invalid(span)
        scalars: list[StringLit | NumberLit | BoolLit | AgoLit | TimeLit] = []
        for item in items:
            if isinstance(item, _SCALARS):
                scalars.append(item)
            elif isinstance(item, DurationLit):
                self._duration_outside_within(item)
            elif isinstance(item, ListLit):
                self._error(INVALID_LITERAL, "lists cannot be nested", item.span)
            elif not isinstance(item, _Invalid):
                self._error(
                    INVALID_LITERAL, f"list items must be literals, not {self._shown(item.span)}", item.span,
                    "compare each value separately and join the clauses with `or`",
                )
        if len(scalars) < len(items):
            return _Invalid(span)
        return ListLit(tuple(scalars), span)

    # --- calls ------------------------------------------------------------------------------

    def _parse_call(self) -> _Term:
        name_token = self._advance()
        open_token = self._advance()
        name = name_token.text
        if name not in self.builders:
            self._unknown_function(name_token)
            return _Invalid(self._span(name_token.start, self._skip_arguments(open_token)))
        self._enter(open_token)
        args: list[_Arg] = []
        while self._peek().kind is not TokenKind.RPAREN:
            args.append(self._parse_argument())
            token = self._peek()
            if token.kind is TokenKind.COMMA:
                self._advance()
            elif token.kind is not TokenKind.RPAREN:
                where = self.source.where(name_token.start)
                self._fail_expected(
                    f'"," or ")" to close "{name}(" at {where}', token, self._argument_hint(args[-1], token),
                )
        close = self._advance()
        self._leave()
        return self.builders[name](_Call(name, tuple(args), self._span(name_token.start, close.end)))

    def _unknown_function(self, token: Token) -> None:
        name = token.text
        if name.lower() in self.builders:
            hint = f"function names are lower-case: {name.lower()}(...)"
        elif close := difflib.get_close_matches(name.lower(), list(self.builders), n=1):
            hint = f"did you mean {close[0]}(...)?"
        else:
            hint = "functions: " + ", ".join(sorted(self.builders))
        self._error(UNKNOWN_FUNCTION, f'unknown function "{name}"', self._span(token.start, token.end), hint)

    def _skip_arguments(self, open_token: Token) -> int:
        """Skip to the ``)`` matching ``open_token``; its end offset."""
        depth = 1
        while depth:
            token = self._advance()
            if token.kind is TokenKind.EOF:
                self._fail_expected(f'")" to close "(" at {self.source.where(open_token.start)}', token)
            depth += {TokenKind.LPAREN: 1, TokenKind.RPAREN: -1}.get(token.kind, 0)
        return self.last_end

    def _parse_argument(self) -> _Arg:
        token = self._peek()
        if token.kind is TokenKind.IDENT and self._peek(1).kind is TokenKind.ASSIGN:
            self._advance()
            self._advance()
            value: _Term
            if token.text == "where":
                value = self._parse_where()
            else:
                value = self._parse_operand(f"a value for {token.text}=", allow_name=True)
            keyword_span = self._span(token.start, token.end)
            return _Arg(token.text, keyword_span, value, self._span(token.start, value.span.end))
        value = self._parse_operand("an argument", allow_name=True)
        return _Arg(None, None, value, value.span)

    def _argument_hint(self, last: _Arg, token: Token) -> str:
        if isinstance(last.value, _Property):
            return 'conditions on event properties go in where=, e.g. where=property("plan") == "pro"'
        if token.kind in (TokenKind.IDENT, TokenKind.STRING, TokenKind.NUMBER, TokenKind.DURATION):
            return "separate arguments with commas"
        if token.kind is TokenKind.OP or self._is_word(token, "in", "contains"):
            return "close the call before comparing it"
        return _token_hint(token)

    # --- where= -----------------------------------------------------------------------------

    def _parse_where(self) -> _Filters:
        start = self._peek().start
        items = self._parse_filter_chain()
        return _Filters(tuple(items), self._span(start, self.last_end))

    def _parse_filter_chain(self) -> list[PropertyFilter]:
        items = self._parse_filter_group()
        while self._is_word(self._peek(), "and"):
            self._advance()
            items += self._parse_filter_group()
        token = self._peek()
        if self._is_word(token, "or"):
            self._fail(
                UNSUPPORTED, "`or` is not supported inside where=", self._span(token.start, token.end),
                "where= conditions are joined by `and`; for either/or write two clauses, e.g. "
                "count(purchase, where=A) > 0 or count(purchase, where=B) > 0",
            )
        return items

    def _parse_filter_group(self) -> list[PropertyFilter]:
        token = self._peek()
        if self._is_word(token, "not"):
            self._fail(
                UNSUPPORTED, "`not` is not supported inside where=", self._span(token.start, token.end),
                'use != instead, e.g. property("plan") != "free"',
            )
        if token.kind is TokenKind.LPAREN:
            self._enter(token)
            self._advance()
            items = self._parse_filter_chain()
            close = self._peek()
            if close.kind is not TokenKind.RPAREN:
                self._fail_expected(f'")" to close "(" at {self.source.where(token.start)}', close)
            self._advance()
            self._leave()
            return items
        left = self._parse_operand("a condition on property(...)")
        op = self._parse_comparison_op()
        if op is None:
            if isinstance(left, PropertyFilter):
                return [left]
            if not isinstance(left, _Invalid):
                self._error(
                    UNSUPPORTED, f"{self._shown(left.span)} is not a condition on an event property", left.span,
                    'where= takes conditions such as property("plan") == "pro" or exists(property("coupon"))',
                )
            return []
        right = self._parse_operand(f"a value after {op.text}")
        span = self._span(min(left.span.start, right.span.start), max(left.span.end, right.span.end))
        if isinstance(left, _Invalid) or isinstance(right, _Invalid):
            return []
        if op.negated or op.op == "contains":
            hint = "list the values you want with `in`, or use != for one value"
            if op.op == "contains":
                hint = "compare the whole value with == or `in`"
            self._error(UNSUPPORTED, f"`{op.text}` is not supported inside where=", op.span, hint)
            return []
        for side in (left, right):
            if isinstance(side, DurationLit):
                self._duration_outside_within(side)
                return []
        oriented = self._orient(left, op, right, (_Property,), 'property("...")')
        if oriented is None:
            return []
        subject, operator, literal = oriented
        assert isinstance(subject, _Property) and isinstance(literal, _LITERALS)
        return [PropertyFilter(subject.path, operator, literal, span)]

    # --- builders ---------------------------------------------------------------------------

    def _bind(
        self, call: _Call, positional: tuple[str, ...], keywords: tuple[str, ...], usage: str, required: int,
    ) -> dict[str, _Arg] | None:
        """Match a call's arguments to parameters; None (errors reported) when they do not fit."""
        bound: dict[str, _Arg] = {}
        ok = True
        after_keyword = False
        taken = 0  # positional arguments so far
        for arg in call.args:
            if arg.keyword is None:
                if after_keyword:
                    self._error(
                        WRONG_ARGUMENTS, "a positional argument cannot follow keyword arguments", arg.span,
                        f"write {usage}",
                    )
                    ok = False
                elif taken >= len(positional):
                    self._error(
                        WRONG_ARGUMENTS, f"{call.name}() takes {_plural(len(positional))} without a keyword",
                        arg.span, self._extra_argument_hint(call, arg, usage),
                    )
                    ok = False
                else:
                    bound[positional[taken]] = arg
                    taken += 1
                continue
            after_keyword = True
            keyword_span = arg.keyword_span or arg.span
            if arg.keyword not in keywords:
                self._error(
                    WRONG_ARGUMENTS, f"{call.name}() has no argument {arg.keyword}=", keyword_span,
                    self._keyword_hint(call, arg, keywords, usage),
                )
                ok = False
            elif arg.keyword in bound:
                self._error(WRONG_ARGUMENTS, f"{arg.keyword}= is given twice", keyword_span, f"write {usage}")
                ok = False
            else:
                bound[arg.keyword] = arg
        missing = [name for name in positional[:required] if name not in bound]
        if missing and ok:
            self._error(WRONG_ARGUMENTS, f"{call.name}() needs {_plural(required)}", call.span, f"write {usage}")
            ok = False
        if any(isinstance(arg.value, _Invalid) for arg in bound.values()):
            ok = False
        return bound if ok else None

    def _extra_argument_hint(self, call: _Call, arg: _Arg, usage: str) -> str:
        value = arg.value
        if call.name in EVENT_FACTS:
            if isinstance(value, DurationLit):
                return f"write `within={value.text}`"
            if isinstance(value, StringLit) and call.name == "sum" and re.fullmatch("[A-Za-z]{3}", value.value):
                return f"write `currency={quote(value.value.upper())}`"
            names = "within=, where=" + (", currency=" if call.name == "sum" else "")
            return f"{call.name}() takes one event; name the other arguments: {names}"
        return f"write {usage}"

    def _keyword_hint(self, call: _Call, arg: _Arg, keywords: tuple[str, ...], usage: str) -> str:
        assert arg.keyword is not None
        value = self._shown(arg.value.span)
        if arg.keyword == "currency" and call.name in EVENT_FACTS:
            return "only sum() takes a currency"
        if isinstance(arg.value, DurationLit) and "within" in keywords:
            return f"did you mean `within={value}`?"
        if close := difflib.get_close_matches(arg.keyword, keywords, n=1):
            return f"did you mean `{close[0]}={value}`?"
        if not keywords:
            return f"{call.name}() takes no keyword arguments: write {usage}"
        return f"{call.name}() takes " + ", ".join(f"{keyword}=" for keyword in keywords)

    def _word_arg(self, arg: _Arg, what: str, usage: str) -> str | None:
        """A bare name or a string."""
        if isinstance(arg.value, _Name | StringLit):
            text = arg.value.text if isinstance(arg.value, _Name) else arg.value.value
            if text:
                return text
            self._error(INVALID_LITERAL, f"{what} is empty", arg.span, f"write {usage}")
            return None
        self._wrong_kind(arg, f"{what} must be a name or a string", usage)
        return None

    def _string_arg(self, arg: _Arg, what: str, usage: str) -> str | None:
        if isinstance(arg.value, StringLit):
            return arg.value.value
        if isinstance(arg.value, _Name):
            self._error(WRONG_ARGUMENTS, f"{what} must be a string", arg.span, f"quote it: {quote(arg.value.text)}")
            return None
        self._wrong_kind(arg, f"{what} must be a string", usage)
        return None

    def _wrong_kind(self, arg: _Arg, message: str, usage: str) -> None:
        found = _term_kind(arg.value)
        self._error(WRONG_ARGUMENTS, f"{message}, not {found}", arg.span, f"write {usage}")

    def _duration(self, arg: _Arg, fix: Callable[[str], str]) -> DurationLit | None:
        """A duration argument in range; ``fix`` writes the argument with a given duration text."""
        value = arg.value
        if isinstance(value, DurationLit):
            if MIN_DURATION <= value.micros <= MAX_DURATION:
                return value
            self._error(
                INVALID_LITERAL, f"the duration {value.text} is out of range", value.span,
                "durations run from 1s to 3650d",
            )
            return None
        hint = f"write {fix('7d')}"
        if isinstance(value, AgoLit):
            hint = f"write {fix(value.text)}"
        elif isinstance(value, StringLit) and _DURATION_TEXT.fullmatch(value.value):
            hint = f"write the duration without quotes: {fix(value.value)}"
        elif isinstance(value, NumberLit):
            hint = f"add a unit (s, m, h, d, w): {fix(f'{value.value}d')}"
        self._error(WRONG_ARGUMENTS, f"expected a duration such as 7d, not {_term_kind(value)}", arg.span, hint)
        return None

    def _currency(self, arg: _Arg) -> str | None:
        value = arg.value
        if isinstance(value, StringLit):
            if _CURRENCY.fullmatch(value.value):
                return value.value
            hint = "use an ISO-4217 code such as \"USD\""
            if re.fullmatch("[A-Za-z]{3}", value.value):
                hint = f"write {quote(value.value.upper())}"
            self._error(INVALID_LITERAL, f"{quote(value.value)} is not a currency code", arg.span, hint)
            return None
        if isinstance(value, _Name):
            self._error(WRONG_ARGUMENTS, "the currency must be a string", arg.span, f"quote it: {quote(value.text)}")
            return None
        self._wrong_kind(arg, "the currency must be a string", '"USD"')
        return None

    def _build_trait(self, call: _Call) -> _Term:
        usage = 'trait("country")'
        bound = self._bind(call, ("key",), (), usage, 1)
        key = None if bound is None else self._string_arg(bound["key"], "the trait key", usage)
        if key is None or bound is None:
            return _Invalid(call.span)
        if not key or len(key) > MAX_TRAIT_KEY:
            problem = "is empty" if not key else f"is {len(key)} characters long; at most {MAX_TRAIT_KEY}"
            self._error(INVALID_LITERAL, f"the trait key {problem}", bound["key"].span, f"write {usage}")
            return _Invalid(call.span)
        return TraitRef(key, call.span)

    def _build_fact(self, call: _Call) -> _Term:
        kind = FactKind(call.name)
        keywords = ("within", "where", "currency") if kind is FactKind.SUM else ("within", "where")
        usage = f"{call.name}(purchase, within=7d)"
        if not call.args or call.args[0].keyword is not None:
            self._error(
                WRONG_ARGUMENTS, f"{call.name}() needs an event first", call.span,
                f'write {usage} or {call.name}("Order Completed")',
            )
            return _Invalid(call.span)
        bound = self._bind(call, ("event",), keywords, usage, 1)
        if bound is None:
            return _Invalid(call.span)
        event = self._word_arg(bound["event"], "the event", f"{call.name}(purchase)")
        within = self._duration(bound["within"], lambda text: f"within={text}") if "within" in bound else None
        currency = self._currency(bound["currency"]) if "currency" in bound else None
        where = bound["where"].value if "where" in bound else _Filters((), call.span)
        if (
            event is None
            or ("within" in bound and within is None)
            or ("currency" in bound and currency is None)
            or not isinstance(where, _Filters)  # where= always parses to _Filters
        ):
            return _Invalid(call.span)
        return EventFact(kind, event, within.micros if within else None, where.items, currency, call.span)

    def _build_computed(self, call: _Call) -> _Term:
        usage = 'computed("purchase_count")'
        bound = self._bind(call, ("name", "currency"), ("currency",), usage, 1)
        name = None if bound is None else self._word_arg(bound["name"], "the computed trait", usage)
        if bound is None or name is None:
            return _Invalid(call.span)
        if name not in COMPUTED_TYPES:
            close = difflib.get_close_matches(name, list(COMPUTED_TYPES), n=1)
            hint = f'did you mean computed("{close[0]}")?' if close else "computed traits: " + ", ".join(COMPUTED_TYPES)
            self._error(WRONG_ARGUMENTS, f'unknown computed trait "{name}"', bound["name"].span, hint)
            return _Invalid(call.span)
        currency: str | None = None
        if "currency" in bound:
            if name not in MONEY_COMPUTED:
                self._error(
                    WRONG_ARGUMENTS, f'computed("{name}") takes no currency', bound["currency"].span,
                    f'write computed("{name}")',
                )
                return _Invalid(call.span)
            currency = self._currency(bound["currency"])
            if currency is None:
                return _Invalid(call.span)
        elif name in MONEY_COMPUTED:
            self._error(
                WRONG_ARGUMENTS, f'computed("{name}") needs a currency: amounts are kept per currency', call.span,
                f'write computed("{name}", "USD")',
            )
            return _Invalid(call.span)
        return ComputedRef(name, currency, call.span)

    def _build_exists(self, call: _Call) -> _Term:
        usage = 'exists(trait("plan"))'
        bound = self._bind(call, ("value",), (), usage, 1)
        if bound is None:
            return _Invalid(call.span)
        arg = bound["value"]
        value = arg.value
        if isinstance(value, _VALUES):
            return Exists(value, call.span)
        if isinstance(value, _Property):
            return PropertyFilter(value.path, "exists", None, call.span)
        if isinstance(value, StringLit):
            hint = f"write exists(trait({quote(value.value)}))"
        elif isinstance(value, _Name):
            hint = f'write exists(trait("{value.text}")) for a trait or exists(last({value.text})) for an event'
        elif isinstance(value, _CONDITIONS):
            hint = f"write {self._shown(value.span)} on its own"
        else:
            hint = f"write {usage}"
        self._error(
            WRONG_ARGUMENTS, f"exists() takes trait(...), first(...), last(...) or computed(...), not "
            f"{_term_kind(value)}", arg.span, hint,
        )
        return _Invalid(call.span)

    def _build_cohort(self, call: _Call) -> _Term:
        usage = 'cohort("posthog", "checkout_abandoners")'
        bound = self._bind(call, ("source", "name"), (), usage, 2)
        if bound is None:
            return _Invalid(call.span)
        source = self._word_arg(bound["source"], "the cohort source", usage)
        name = self._word_arg(bound["name"], "the cohort name", usage)
        if source is None or name is None:
            return _Invalid(call.span)
        if source not in COHORT_TRAIT_PREFIX:
            close = difflib.get_close_matches(source.lower(), list(COHORT_TRAIT_PREFIX), n=1)
            hint = f'did you mean "{close[0]}"?' if close else "sources: " + ", ".join(sorted(COHORT_TRAIT_PREFIX))
            self._error(UNKNOWN_COHORT_SOURCE, f'unknown cohort source "{source}"', bound["source"].span, hint)
            return _Invalid(call.span)
        if not slug(name):
            self._error(
                INVALID_LITERAL, f"the cohort name {quote(name)} has no letters or digits", bound["name"].span,
                f"write {usage}",
            )
            return _Invalid(call.span)
        return Cohort(source, name, COHORT_TRAIT_PREFIX[source] + slug(name), call.span)

    def _build_has(self, call: _Call) -> _Term:
        usage = "has(email)"
        bound = self._bind(call, ("type",), (), usage, 1)
        kind = None if bound is None else self._word_arg(bound["type"], "the identifier type", usage)
        if kind is None:
            return _Invalid(call.span)
        return Has(IDENTIFIER_ALIASES.get(kind, kind), call.span)

    def _build_consent(self, call: _Call) -> _Term:
        usage = "consent(ad_personalization)"
        bound = self._bind(call, ("purpose",), (), usage, 1)
        purpose = None if bound is None else self._word_arg(bound["purpose"], "the purpose", usage)
        if purpose is None:
            return _Invalid(call.span)
        return ConsentRef(purpose, call.span)

    def _build_ago(self, call: _Call) -> _Term:
        usage = "ago(7d)"
        bound = self._bind(call, ("duration",), (), usage, 1)
        duration = None if bound is None else self._duration(bound["duration"], lambda text: f"ago({text})")
        if duration is None:
            return _Invalid(call.span)
        return AgoLit(duration.micros, duration.text, call.span)

    def _build_time(self, call: _Call) -> _Term:
        usage = 'time("2024-05-01")'
        bound = self._bind(call, ("value",), (), usage, 1)
        value = None if bound is None else self._string_arg(bound["value"], "the time", usage)
        if value is None or bound is None:
            return _Invalid(call.span)
        try:
            micros = parse_time(value)
        except LiteralError as exc:
            self._error(INVALID_LITERAL, exc.message, bound["value"].span, exc.hint)
            return _Invalid(call.span)
        return TimeLit(micros, value, call.span)

    def _build_property(self, call: _Call) -> _Term:
        usage = 'property("plan")'
        bound = self._bind(call, ("path",), (), usage, 1)
        path = None if bound is None else self._string_arg(bound["path"], "the property path", usage)
        if path is None or bound is None:
            return _Invalid(call.span)
        parts = tuple(path.split("."))
        if not all(parts):
            self._error(
                INVALID_LITERAL, f"the property path {quote(path)} has an empty part", bound["path"].span,
                'separate nested keys with single dots: property("shipping.country")',
            )
            return _Invalid(call.span)
        return _Property(parts, call.span)


def _term_kind(term: _Term) -> str:
    if isinstance(term, _LITERALS):
        return literal_type(term).value
    if isinstance(term, DurationLit):
        return "a duration"
    if isinstance(term, _VALUES):
        return "a value"
    if isinstance(term, _CONDITIONS):
        return "a condition"
    if isinstance(term, _Name):
        return f'the name "{term.text}"'
    if isinstance(term, _Property | PropertyFilter):
        return "a property"
    return "conditions"
