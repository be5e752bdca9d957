"""The audience rule language: parsing into the AST, type checking, diagnostics and spans."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiences.rules import RuleAnalysis, RuleCatalog, analyze, clause_text
from audiences.rules.ast import (
    AgoLit,
    And,
    BoolExpr,
    BoolLit,
    Cohort,
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
    Span,
    StringLit,
    TimeLit,
    TraitRef,
    atoms,
)
from audiences.rules.lexer import Source
from audiences.rules.parser import parse

CATALOG = RuleCatalog(
    events=frozenset({"purchase", "refund", "page_view", "add_to_cart", "sign_up", "begin_checkout"}),
    purposes=("ad_personalization", "analytics"),
    identifier_types=frozenset({"email_sha256", "phone_sha256", "user_id", "crm_id", "anonymous_id"}),
)
EXAMPLE = (
    'cohort("posthog", "checkout_abandoners") and trait("country") in ["DE", "FR"] '
    "and count(purchase, within=7d) == 0"
)
S = Span(0, 0, 0, 0, 0, 0)  # placeholder span for expected shapes
DAY = 86_400 * 1_000_000


def at(text: str, fragment: str, occurrence: int = 0) -> Span:
    """The span of the ``occurrence``-th ``fragment`` in ``text``."""
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(fragment, start + 1)
    return Source(text).span(start, start + len(fragment))


def shape(node: Any) -> Any:
    """A node's structure without spans, for comparing trees."""
    if isinstance(node, tuple):
        return tuple(shape(item) for item in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        fields = {f.name: shape(getattr(node, f.name)) for f in dataclasses.fields(node) if f.name != "span"}
        return type(node).__name__, fields
    return node


def ok(text: str) -> BoolExpr:
    analysis = analyze(text, CATALOG)
    assert analysis.errors == (), analysis.diagnostics
    assert analysis.rule is not None
    return analysis.rule


def only(text: str) -> Any:
    """The single diagnostic of a rule."""
    analysis = analyze(text, CATALOG)
    assert len(analysis.diagnostics) == 1, analysis.diagnostics
    return analysis.diagnostics[0]


def trait_eq(key: str, value: str) -> Compare:
    return Compare(TraitRef(key, S), "==", StringLit(value, S), S)


# --- parsing ---------------------------------------------------------------------------------


def test_example_parses_to_the_exact_tree() -> None:
    analysis = analyze(EXAMPLE, CATALOG)
    t = EXAMPLE
    assert analysis.diagnostics == ()
    assert analysis.rule == And(
        (
            Cohort(
                "posthog", "checkout_abandoners", "posthog_cohort_checkout_abandoners",
                at(t, 'cohort("posthog", "checkout_abandoners")'),
            ),
            Compare(
                TraitRef("country", at(t, 'trait("country")')),
                "in",
                ListLit(
                    (StringLit("DE", at(t, '"DE"')), StringLit("FR", at(t, '"FR"'))),
                    at(t, '["DE", "FR"]'),
                ),
                at(t, 'trait("country") in ["DE", "FR"]'),
            ),
            Compare(
                EventFact(FactKind.COUNT, "purchase", 7 * DAY, (), None, at(t, "count(purchase, within=7d)")),
                "==",
                NumberLit(Decimal(0), at(t, "0")),
                at(t, "count(purchase, within=7d) == 0"),
            ),
        ),
        Source(t).span(0, len(t)),
    )
    assert analysis.valid
    assert analysis.traits == ("country", "posthog_cohort_checkout_abandoners")
    assert analysis.cohorts == ("posthog/checkout_abandoners",)
    assert analysis.events == ("purchase",)
    assert analysis.purposes == ()


def test_precedence_not_over_and_over_or() -> None:
    a, b, c, d = (trait_eq(k, "x") for k in "abcd")
    rule = ok('trait("a") == "x" or trait("b") == "x" and not trait("c") == "x" or trait("d") == "x"')
    assert shape(rule) == shape(Or((a, And((b, Not(c, S)), S), d), S))


def test_parentheses_group_and_spans_include_them() -> None:
    text = '(trait("a") == "x" or trait("b") == "x") and trait("c") == "x"'
    rule = ok(text)
    a, b, c = (trait_eq(k, "x") for k in "abc")
    assert shape(rule) == shape(And((Or((a, b), S), c), S))
    assert isinstance(rule, And)
    assert clause_text(text, rule.span) == text
    assert clause_text(text, rule.items[0].span) == 'trait("a") == "x" or trait("b") == "x"'
    negated = "not (has(email))"
    assert clause_text(negated, ok(negated).span) == negated


def num(value: str | int) -> NumberLit:
    return NumberLit(Decimal(value), S)


def fact(kind: FactKind, event: str, within: int | None = None, filters: tuple[PropertyFilter, ...] = (),
         currency: str | None = None) -> EventFact:
    return EventFact(kind, event, within, filters, currency, S)


def cmp(left: TraitRef | EventFact | ComputedRef, op: str, right: Any) -> Compare:
    return Compare(left, op, right, S)


COUNT, SUM, FIRST, LAST = FactKind.COUNT, FactKind.SUM, FactKind.FIRST, FactKind.LAST


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('trait("plan") == "pro"', cmp(TraitRef("plan", S), "==", StringLit("pro", S))),
        ("count(purchase) > 0", cmp(fact(COUNT, "purchase"), ">", num(0))),
        ('sum(purchase, within=30d, currency="EUR") >= 100.50',
         cmp(fact(SUM, "purchase", 30 * DAY, currency="EUR"), ">=", num("100.50"))),
        ("first(sign_up) < ago(2w)", cmp(fact(FIRST, "sign_up"), "<", AgoLit(14 * DAY, "2w", S))),
        ('last("Order Completed", within=12h) > time("2024-05-01")',
         cmp(fact(LAST, "Order Completed", 12 * 3600 * 10**6), ">", TimeLit(1714521600 * 10**6, "2024-05-01", S))),
        ('count(purchase, where=(property("plan") == "pro" and property("amount") >= 10)) > 0',
         cmp(fact(COUNT, "purchase", filters=(
             PropertyFilter(("plan",), "==", StringLit("pro", S), S),
             PropertyFilter(("amount",), ">=", num(10), S),
         )), ">", num(0))),
        ('count(add_to_cart, where=property("items.sku") in ["a", "b"] and exists(property("coupon")), '
         "within=90s) == 1",
         cmp(fact(COUNT, "add_to_cart", 90 * 10**6, (
             PropertyFilter(("items", "sku"), "in", ListLit((StringLit("a", S), StringLit("b", S)), S), S),
             PropertyFilter(("coupon",), "exists", None, S),
         )), "==", num(1))),
        ('count(purchase, where=10 <= property("amount")) > 0',
         cmp(fact(COUNT, "purchase", filters=(PropertyFilter(("amount",), ">=", num(10), S),)), ">", num(0))),
        ('computed("purchase_count") >= 2', cmp(ComputedRef("purchase_count", None, S), ">=", num(2))),
        ('computed("lifetime_value", "USD") > 99.99', cmp(ComputedRef("lifetime_value", "USD", S), ">", num("99.99"))),
        ('computed(refunded_value, currency="EUR") == 0', cmp(ComputedRef("refunded_value", "EUR", S), "==", num(0))),
        ('exists(trait("plan"))', Exists(TraitRef("plan", S), S)),
        ("exists(last(purchase))", Exists(fact(LAST, "purchase"), S)),
        ('exists(computed("last_purchase_at"))', Exists(ComputedRef("last_purchase_at", None, S), S)),
        ('cohort(heap, "Big Spenders (EU)!")', Cohort("heap", "Big Spenders (EU)!", "heap_segment_big_spenders_eu", S)),
        ("has(email)", Has("email_sha256", S)),
        ("has(phone)", Has("phone_sha256", S)),
        ("has(user_id)", Has("user_id", S)),
        ('has("crm_id")', Has("crm_id", S)),
        ("consent(ad_personalization)", ConsentRef("ad_personalization", S)),
        ('consent("analytics")', ConsentRef("analytics", S)),
        ("true", BoolLit(True, S)),
        ("false", BoolLit(False, S)),
        ('trait("tags") contains "vip"', cmp(TraitRef("tags", S), "contains", StringLit("vip", S))),
        ('trait("ids") contains 7', cmp(TraitRef("ids", S), "contains", num(7))),
        ('trait("vip") == true', cmp(TraitRef("vip", S), "==", BoolLit(True, S))),
        ('trait("score") != -1.25', cmp(TraitRef("score", S), "!=", num("-1.25"))),
        ('trait("s") == "q\\"\\\\\\n\\t\\u00e9\\ud83d\\ude00"',
         cmp(TraitRef("s", S), "==", StringLit('q"\\\n\té\U0001f600', S))),
        ("count(count, within=1w) > 0", cmp(fact(COUNT, "count", 7 * DAY), ">", num(0))),
        ('trait("x") in [1, 2,]', cmp(TraitRef("x", S), "in", ListLit((num(1), num(2)), S))),
    ],
)
def test_functions_and_literals(text: str, expected: BoolExpr) -> None:
    assert shape(ok(text)) == shape(expected)


@pytest.mark.parametrize(
    ("text", "op"),
    [("3 < count(x)", ">"), ("3 <= count(x)", ">="), ("3 > count(x)", "<"), ("3 >= count(x)", "<="),
     ("3 == count(x)", "=="), ("3 != count(x)", "!=")],
)
def test_literal_on_the_left_flips_the_operator(text: str, op: str) -> None:
    rule = parse(text).rule
    assert isinstance(rule, Compare)
    assert rule.op == op
    assert isinstance(rule.left, EventFact) and rule.right == NumberLit(Decimal(3), at(text, "3"))
    assert clause_text(text, rule.span) == text


@pytest.mark.parametrize("op", ["in", "contains"])
def test_not_in_and_not_contains_are_a_not_around_the_comparison(op: str) -> None:
    literal = '["DE", "FR"]' if op == "in" else '"vip"'
    text = f'trait("k") not {op} {literal}'
    rule = ok(text)
    assert isinstance(rule, Not) and isinstance(rule.item, Compare)
    assert rule.item.op == op
    assert rule.span == rule.item.span == Source(text).span(0, len(text))
    assert len(atoms(rule)) == 1


def test_comments_newlines_and_positions() -> None:
    text = (
        "# people who abandoned checkout\n"
        'cohort("posthog", "checkout_abandoners")  # from PostHog\n'
        "  and\n"
        "  count(purchase,\n"
        "        within=7d) == 0\n"
    )
    rule = ok(text)
    assert isinstance(rule, And)
    compare = rule.items[1]
    assert (compare.span.line, compare.span.column, compare.span.end_line, compare.span.end_column) == (4, 3, 5, 24)
    assert clause_text(text, compare.span) == "count(purchase,\n        within=7d) == 0"

    error = only('has(email)\n  and has(phone)\n  and count(purchase) == "3"')
    assert (error.code, error.span.line, error.span.column, error.span.end_line, error.span.end_column) == (
        "TYPE_MISMATCH", 3, 7, 3, 29)

    syntax = only("has(email)\n# and then\n  and trait(\"x\" == 1")
    assert syntax.code == "SYNTAX_ERROR"
    assert (syntax.span.line, syntax.span.column) == (3, 17)
    assert syntax.message == 'expected "," or ")" to close "trait(" at 3:7, found "=="'


def test_columns_count_code_points() -> None:
    text = 'trait("😀é") == "ü" and foo(1)'
    error = only(text)
    assert (error.code, error.span.column, error.span.end_column) == ("UNKNOWN_FUNCTION", 24, 27)


# --- diagnostics -----------------------------------------------------------------------------

DIAGNOSTICS = [
    # text, severity, code, (line, column, end_line, end_column), message fragment, hint
    ("has(email) AND has(phone)", "ERROR", "SYNTAX_ERROR", (1, 12, 1, 15),
     'expected "and", "or" or end of rule, found "AND"', "keywords are lower-case: use `and`"),
    ('trait("a") == 1 && trait("b") == 2', "ERROR", "SYNTAX_ERROR", (1, 17, 1, 19), 'found "&&"', "use `and`"),
    ("has(email) || has(phone)", "ERROR", "SYNTAX_ERROR", (1, 12, 1, 14), 'found "||"', "use `or`"),
    ("!has(email)", "ERROR", "SYNTAX_ERROR", (1, 1, 1, 2), 'expected a condition, found "!"', "use `not`"),
    ('trait("plan") = "pro"', "ERROR", "SYNTAX_ERROR", (1, 15, 1, 16), 'found "="', "use `==` to compare"),
    ("1 < count(purchase) < 5", "ERROR", "SYNTAX_ERROR", (1, 21, 1, 22), 'found "<"',
     "comparisons cannot be chained: join two comparisons with `and`"),
    ('trait("plan") == pro', "ERROR", "SYNTAX_ERROR", (1, 18, 1, 21), 'expected a value after ==, found "pro"',
     'strings need double quotes: write "pro"'),
    ("(has(email) or has(phone)", "ERROR", "UNEXPECTED_END", (1, 26, 1, 26),
     'expected ")" to close "(" at 1:1, found end of rule', ""),
    ('trait("a") ==', "ERROR", "UNEXPECTED_END", (1, 14, 1, 14), "expected a value after ==, found end of rule", ""),
    ('trait("a") == "abc', "ERROR", "UNEXPECTED_END", (1, 15, 1, 19), "string starting at 1:15 is not closed", ""),
    ("cuont(purchase) > 0", "ERROR", "UNKNOWN_FUNCTION", (1, 1, 1, 6), 'unknown function "cuont"',
     "did you mean count(...)?"),
    ("Count(purchase) > 0", "ERROR", "UNKNOWN_FUNCTION", (1, 1, 1, 6), 'unknown function "Count"',
     "function names are lower-case: count(...)"),
    ("count(purchase, 7d) > 0", "ERROR", "WRONG_ARGUMENTS", (1, 17, 1, 19), "count() takes 1 argument",
     "write `within=7d`"),
    ("count(purchase, wihtin=7d) > 0", "ERROR", "WRONG_ARGUMENTS", (1, 17, 1, 23), "count() has no argument wihtin=",
     "did you mean `within=7d`?"),
    ("count(purchase, last=7d) > 0", "ERROR", "WRONG_ARGUMENTS", (1, 17, 1, 21), "has no argument last=",
     "did you mean `within=7d`?"),
    ("count(purchase, within=7d, within=1d) > 0", "ERROR", "WRONG_ARGUMENTS", (1, 28, 1, 34), "within= is given twice",
     "write count(purchase, within=7d)"),
    ('sum(purchase, "eur") > 0', "ERROR", "WRONG_ARGUMENTS", (1, 15, 1, 20), "sum() takes 1 argument",
     'write `currency="EUR"`'),
    ("cohort(posthog) ", "ERROR", "WRONG_ARGUMENTS", (1, 1, 1, 16), "cohort() needs 2 arguments",
     'write cohort("posthog", "checkout_abandoners")'),
    ('computed("lifetime_value") > 0', "ERROR", "WRONG_ARGUMENTS", (1, 1, 1, 27), "needs a currency",
     'write computed("lifetime_value", "USD")'),
    ('computed("purchase_count", "USD") > 0', "ERROR", "WRONG_ARGUMENTS", (1, 28, 1, 33), "takes no currency",
     'write computed("purchase_count")'),
    ('computed("purchases") > 0', "ERROR", "WRONG_ARGUMENTS", (1, 10, 1, 21), 'unknown computed trait "purchases"',
     'did you mean computed("purchase_count")?'),
    ("count(purchase, within=ago(7d)) > 0", "ERROR", "WRONG_ARGUMENTS", (1, 17, 1, 31), "expected a duration",
     "write within=7d"),
    ('exists("plan")', "ERROR", "WRONG_ARGUMENTS", (1, 8, 1, 14), "exists() takes", 'write exists(trait("plan"))'),
    ('count(purchase) == "3"', "ERROR", "TYPE_MISMATCH", (1, 1, 1, 23),
     'cannot compare count(purchase) (a number) with "3" (a string)', "write 3 without quotes"),
    ("last(purchase) > 3", "ERROR", "TYPE_MISMATCH", (1, 1, 1, 19),
     "cannot compare last(purchase) (a time) with 3 (a number)", 'use ago(7d) or time("2024-05-01")'),
    ('last(purchase) in [ago(1d)]', "ERROR", "TYPE_MISMATCH", (1, 1, 1, 28), "`in` does not apply to times", ""),
    ("count(purchase)", "ERROR", "TYPE_MISMATCH", (1, 1, 1, 16), "count(purchase) is a number, not a condition",
     "compare it, e.g. `count(purchase) > 0`"),
    ('trait("x") in ["a", 1]', "ERROR", "TYPE_MISMATCH", (1, 21, 1, 22), "list items must all have the same type",
     "quote all the items or none of them"),
    ('trait("x") == ["a"]', "ERROR", "TYPE_MISMATCH", (1, 1, 1, 20), "`==` compares with one value, not a list",
     'write `trait("x") in ["a"]`'),
    ('trait("x") in "a"', "ERROR", "TYPE_MISMATCH", (1, 1, 1, 18), "`in` needs a list", 'write `trait("x") in ["a"]`'),
    ("count(purchase) contains 1", "ERROR", "TYPE_MISMATCH", (1, 1, 1, 27), "`contains` works on trait(...) only", ""),
    ('trait("x") contains true', "ERROR", "TYPE_MISMATCH", (1, 1, 1, 25), "`contains` needs a string or a number", ""),
    ('trait("x") > true', "ERROR", "TYPE_MISMATCH", (1, 1, 1, 18), "booleans have no order", "use == or !="),
    ('count(purchase, where=property("p") < false) > 0', "ERROR", "TYPE_MISMATCH", (1, 23, 1, 44),
     "booleans have no order", "use == or !="),
    ('count(purchase, where=property("at") > ago(1d)) > 0', "ERROR", "TYPE_MISMATCH", (1, 23, 1, 47),
     "event properties cannot be compared with ago(1d) (a time)",
     "to keep only recent events use within=, e.g. within=7d"),
    ('cohort("posthog", "x") == true', "ERROR", "TYPE_MISMATCH", (1, 1, 1, 23), "is already a condition",
     'write `cohort("posthog", "x")`'),
    ("count(purchse) > 0", "WARNING", "UNKNOWN_EVENT", (1, 7, 1, 14), 'unknown event "purchse"',
     "did you mean purchase?"),
    ('count("Begin Checkout") > 0', "WARNING", "UNKNOWN_EVENT", (1, 7, 1, 23), 'unknown event "Begin Checkout"',
     "did you mean begin_checkout?"),
    ("consent(ad_personalisation)", "ERROR", "UNKNOWN_PURPOSE", (1, 9, 1, 27),
     'unknown consent purpose "ad_personalisation"', "did you mean `consent(ad_personalization)`?"),
    ("has(mail)", "ERROR", "UNKNOWN_IDENTIFIER_TYPE", (1, 5, 1, 9), 'unknown identifier type "mail"',
     "did you mean `has(email)`?"),
    ('cohort("amplitude", "x")', "ERROR", "UNKNOWN_COHORT_SOURCE", (1, 8, 1, 19), 'unknown cohort source "amplitude"',
     "sources: heap, posthog"),
    ('cohort("PostHog", "x")', "ERROR", "UNKNOWN_COHORT_SOURCE", (1, 8, 1, 17), 'unknown cohort source "PostHog"',
     'did you mean "posthog"?'),
    ("trait('DE') == 1", "ERROR", "INVALID_LITERAL", (1, 7, 1, 11), "strings cannot be in single quotes",
     'strings use double quotes: write "DE"'),
    ('trait("a") == “x y”', "ERROR", "INVALID_LITERAL", (1, 15, 1, 20), "curly quote",
     'use straight double quotes: write "x y"'),
    ('trait("a") == "a\\qb"', "ERROR", "INVALID_LITERAL", (1, 17, 1, 19), 'unknown escape "\\q"', ""),
    ("count(purchase, within=7days) > 0", "ERROR", "INVALID_LITERAL", (1, 24, 1, 29),
     '"7days" is neither a number nor a duration', "write 7d"),
    ("count(purchase, within=0d) > 0", "ERROR", "INVALID_LITERAL", (1, 24, 1, 26), "the duration 0d is out of range",
     "durations run from 1s to 3650d"),
    ("count(purchase, within=3651d) > 0", "ERROR", "INVALID_LITERAL", (1, 24, 1, 29), "out of range", ""),
    ('trait("x") == 7d', "ERROR", "INVALID_LITERAL", (1, 15, 1, 17), "a duration (7d) is only valid as within=",
     "for a point in time write ago(7d)"),
    ('last(purchase) > time("2024-05-01T10:00:00")', "ERROR", "INVALID_LITERAL", (1, 23, 1, 44), "has no time zone",
     'add Z for UTC: time("2024-05-01T10:00:00Z")'),
    ('trait("x") in []', "ERROR", "INVALID_LITERAL", (1, 15, 1, 17), "the list is empty", ""),
    ('trait("") == 1', "ERROR", "INVALID_LITERAL", (1, 7, 1, 9), "the trait key is empty", ""),
    ('sum(purchase, currency="usd") > 0', "ERROR", "INVALID_LITERAL", (1, 15, 1, 29),
     '"usd" is not a currency code', 'write "USD"'),
    ('count(purchase, where=property("a") == 1 or property("b") == 2) > 0', "ERROR", "UNSUPPORTED", (1, 42, 1, 44),
     "`or` is not supported inside where=", ""),
    ('count(purchase, where=not property("a") == 1) > 0', "ERROR", "UNSUPPORTED", (1, 23, 1, 26),
     "`not` is not supported inside where=", 'use != instead, e.g. property("plan") != "free"'),
    ('property("plan") == "pro"', "ERROR", "UNSUPPORTED", (1, 1, 1, 17), "property(...) is only valid inside where=",
     ""),
    ("count(a) > count(b)", "ERROR", "UNSUPPORTED", (1, 1, 1, 20), "comparing two values", ""),
    ('"x" in trait("y")', "ERROR", "UNSUPPORTED", (1, 5, 1, 7), "the literal must be on the right of `in`",
     'write `trait("y") contains "x"`'),
    ("sum(purchase) > 10", "WARNING", "MISSING_CURRENCY", (1, 1, 1, 14), "adds values of every currency",
     'add a currency: sum(purchase, currency="USD")'),
    ("exists(count(purchase))", "WARNING", "ALWAYS_TRUE", (1, 1, 1, 24), "is always true",
     "write `count(purchase) > 0`"),
    ("count(purchase) >= 0", "WARNING", "ALWAYS_TRUE", (1, 1, 1, 21), "is always true", ""),
    ("count(purchase) > -1", "WARNING", "ALWAYS_TRUE", (1, 1, 1, 21), "is always true", ""),
    ("count(purchase) == 1.5", "WARNING", "ALWAYS_FALSE", (1, 1, 1, 23), "is always false", ""),
    ('computed("purchase_count") < 0', "WARNING", "ALWAYS_FALSE", (1, 1, 1, 31), "is always false", ""),
    ("count(purchase) > 1.5", "WARNING", "INVALID_LITERAL", (1, 19, 1, 22), "1.5 is not a whole number", ""),
    ("", "ERROR", "EMPTY_RULE", (1, 1, 1, 1), "the rule is empty", ""),
    ("  # only a comment\n", "ERROR", "EMPTY_RULE", (1, 1, 2, 1), "the rule is empty", ""),
]


@pytest.mark.parametrize(("text", "severity", "code", "position", "message", "hint"), DIAGNOSTICS)
def test_diagnostic(text: str, severity: str, code: str, position: tuple[int, int, int, int], message: str,
                    hint: str) -> None:
    diagnostic = only(text)
    assert (diagnostic.severity, diagnostic.code) == (severity, code)
    span = diagnostic.span
    assert (span.line, span.column, span.end_line, span.end_column) == position
    assert message in diagnostic.message
    if hint:
        assert diagnostic.hint == hint


def test_every_code_is_exercised() -> None:
    codes = {code for _, _, code, *_ in DIAGNOSTICS} | {"RULE_TOO_LONG"}
    assert codes == {
        "SYNTAX_ERROR", "UNEXPECTED_END", "UNKNOWN_FUNCTION", "WRONG_ARGUMENTS", "TYPE_MISMATCH", "UNKNOWN_EVENT",
        "UNKNOWN_PURPOSE", "UNKNOWN_IDENTIFIER_TYPE", "UNKNOWN_COHORT_SOURCE", "INVALID_LITERAL", "UNSUPPORTED",
        "MISSING_CURRENCY", "ALWAYS_TRUE", "ALWAYS_FALSE", "RULE_TOO_LONG", "EMPTY_RULE",
    }


def test_type_mismatch_example() -> None:
    diagnostic = only('count(purchase) == "3"')
    assert diagnostic.message == 'cannot compare count(purchase) (a number) with "3" (a string)'
    assert diagnostic.hint == "write 3 without quotes"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x" * (16 * 1024 + 1), "the rule is longer than 16 KiB"),
        ("not " * 65 + "true", "the rule nests deeper than 64 levels"),
        ("(" * 65 + "true" + ")" * 65, "the rule nests deeper than 64 levels"),
        ("exists(" * 100, "the rule nests deeper than 64 levels"),
        (" or ".join(["true"] * 257), "the rule has more than 256 clauses"),
    ],
)
def test_limits(text: str, message: str) -> None:
    diagnostic = only(text)
    assert (diagnostic.code, diagnostic.message) == ("RULE_TOO_LONG", message)


def test_limits_are_inclusive() -> None:
    assert analyze(" or ".join(["true"] * 256), CATALOG).valid
    assert analyze("not " * 64 + "true", CATALOG).valid
    assert analyze('trait("x") in [' + ", ".join(["1"] * 1000) + "]", CATALOG).valid
    assert only('trait("x") in [' + ", ".join(["1"] * 1001) + "]").code == "INVALID_LITERAL"
    assert analyze('trait("' + "k" * 128 + '") == 1', CATALOG).valid
    assert only('trait("' + "k" * 129 + '") == 1').code == "INVALID_LITERAL"


def test_errors_after_a_syntax_error_are_not_reported_but_other_errors_are_collected() -> None:
    analysis = analyze("cuont(purchase) > 0 and has(emial) and cohort(x, y) and trait('a') == 1", CATALOG)
    # the unknown function is collected, parsing continues, then the single quote stops it; no type checks
    assert [d.code for d in analysis.diagnostics] == ["UNKNOWN_FUNCTION", "UNKNOWN_COHORT_SOURCE", "INVALID_LITERAL"]
    analysis = analyze('has(emial) and consent(ads) and count(purchase) == "1"', CATALOG)
    assert [d.code for d in analysis.diagnostics] == ["UNKNOWN_IDENTIFIER_TYPE", "UNKNOWN_PURPOSE", "TYPE_MISMATCH"]
    assert analysis.rule is None and not analysis.valid and len(analysis.errors) == 3


def test_diagnostics_are_ordered_by_position_and_warnings_keep_the_rule() -> None:
    analysis = analyze("sum(refund) > 0 and count(purchse) > 0 and exists(count(x))", CATALOG)
    assert [d.code for d in analysis.diagnostics] == ["MISSING_CURRENCY", "UNKNOWN_EVENT", "ALWAYS_TRUE",
                                                      "UNKNOWN_EVENT"]
    assert [d.span.start for d in analysis.diagnostics] == sorted(d.span.start for d in analysis.diagnostics)
    assert analysis.valid and analysis.errors == () and analysis.rule is not None
    assert analysis.events == ("purchse", "refund", "x")


def test_references() -> None:
    analysis = analyze(
        'cohort("heap", "Big Spenders") or trait("plan") == "pro" and not consent(analytics) '
        'or computed("lifetime_value", "EUR") > 1 and has(email) and last(page_view) > ago(1d) '
        'or cohort(posthog, "VIP") or trait("plan") != "x"',
        CATALOG,
    )
    assert analysis.valid
    assert analysis.traits == ("heap_segment_big_spenders", "lifetime_value", "plan", "posthog_cohort_vip")
    assert analysis.cohorts == ("heap/Big Spenders", "posthog/VIP")
    assert analysis.events == ("page_view",)
    assert analysis.purposes == ("analytics",)


# --- literals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "micros"),
    [("1s", 10**6), ("90s", 90 * 10**6), ("30m", 1800 * 10**6), ("12h", 12 * 3600 * 10**6), ("7d", 7 * DAY),
     ("2w", 14 * DAY), ("3650d", 3650 * DAY)],
)
def test_durations(duration: str, micros: int) -> None:
    rule = ok(f"count(purchase, within={duration}) > 0 and last(purchase) > ago({duration})")
    assert isinstance(rule, And)
    fact, ago = rule.items[0], rule.items[1]
    assert isinstance(fact, Compare) and isinstance(fact.left, EventFact) and fact.left.within == micros
    assert isinstance(ago, Compare) and ago.right == AgoLit(micros, duration, ago.right.span)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
        ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T10:00Z", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T12:00:00+02:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T10:00:00.123456Z", datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)),
        ("1969-12-31", datetime(1969, 12, 31, tzinfo=UTC)),
    ],
)
def test_times(value: str, expected: datetime) -> None:
    rule = ok(f'last(purchase) > time("{value}")')
    assert isinstance(rule, Compare) and isinstance(rule.right, TimeLit)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert rule.right.micros == (expected - epoch) // timedelta(microseconds=1)
    assert rule.right.text == value


@pytest.mark.parametrize("value", ["2024-13-01", "2024-02-30", "May 1", "2024-05-01T25:00:00Z", "20240501", ""])
def test_invalid_times(value: str) -> None:
    assert only(f'last(purchase) > time("{value}")').code == "INVALID_LITERAL"


@pytest.mark.parametrize(("text", "hint"), [("1e5", "without an exponent"), ("1.", "write 1 or 1.0"),
                                            ("7D", "units are lower-case: write 7d"), ("1y", "months and years"),
                                            ("-7d", "durations are positive")])
def test_invalid_numbers(text: str, hint: str) -> None:
    diagnostic = only(f'trait("x") == {text}')
    assert diagnostic.code == "INVALID_LITERAL" and hint in diagnostic.hint


# --- robustness and spans ----------------------------------------------------------------------

TOKENS = [
    'trait("a")', "count(purchase", "sum(", "first(", "last(x)", 'computed("purchase_count")', "exists(",
    'cohort("posthog", "c")', "has(email)", "consent(analytics)", " and ", " or ", " not ", "(", ")", "[", "]", ",",
    "==", "!=", "<", ">=", " in ", " contains ", "1", "-2.5", '"s"', "7d", "ago(1d)", 'time("2024-01-01")',
    "within=", "where=", 'property("p")', 'currency="USD"', "true", "false", "# c\n", "\n", "'", '"', "\\", "&&",
    "!", "=", "AND", "$", "é", "x",
]


def _check_invariants(text: str, analysis: RuleAnalysis) -> None:
    for diagnostic in analysis.diagnostics:
        assert 0 <= diagnostic.span.start <= diagnostic.span.end <= len(text)
        assert diagnostic.severity in ("ERROR", "WARNING") and diagnostic.message
    assert (analysis.rule is not None) == analysis.valid


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_random_text_never_raises(text: str) -> None:
    _check_invariants(text, analyze(text, CATALOG))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map("".join))
def test_random_token_soup_never_raises(text: str) -> None:
    _check_invariants(text, analyze(text, CATALOG))


ROUND_TRIP_RULES = [
    EXAMPLE,
    '(trait("a") == "x" or not trait("b") in [1, 2]) and\n  count(purchase, within=7d,\n'
    '    where=(property("plan") == "pro" and exists(property("c")))) > 3',
    '3 < count(purchase) or trait("k") not in ["DE"] or trait("tags") not contains "vip"',
    'last(purchase) > ago(30d) and first(sign_up) < time("2024-05-01T10:00:00Z") # comment\n'
    'and computed("lifetime_value", "USD") >= 10.5 and has(email) and consent(analytics) and true',
    'not (has(phone) or exists(trait("x"))) and sum(refund, currency="EUR", where=1 < property("a.b")) == 0',
]


def _children(node: Any) -> list[Any]:
    found = []
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        for item in value if isinstance(value, tuple) else (value,):
            if dataclasses.is_dataclass(item) and not isinstance(item, type) and not isinstance(item, Span):
                found.append(item)
    return found


def _reparsed(node: Any, text: str) -> Any:
    """The node parsed again from its own source text (wrapped where it is not a rule by itself)."""
    if isinstance(node, TraitRef | EventFact | ComputedRef):
        rule = parse(f"exists({text})").rule
        return rule.target if isinstance(rule, Exists) else None
    if isinstance(node, StringLit | NumberLit | AgoLit | TimeLit | ListLit):
        rule = parse(f'trait("x") {"in" if isinstance(node, ListLit) else "=="} {text}').rule
        return rule.right if isinstance(rule, Compare) else None
    if isinstance(node, PropertyFilter):
        rule = parse(f"count(e, where={text}) > 0").rule
        return rule.left.filters[0] if isinstance(rule, Compare) and isinstance(rule.left, EventFact) else None
    return parse(text).rule


@pytest.mark.parametrize("text", ROUND_TRIP_RULES)
def test_every_span_slices_back_to_its_node(text: str) -> None:
    source = Source(text)
    pending: list[tuple[Any, Any]] = [(ok(text), None)]
    seen = 0
    while pending:
        node, parent = pending.pop()
        pending.extend((child, node) for child in _children(node))
        span = node.span
        assert source.span(span.start, span.end) == span  # line/column agree with the offsets
        sliced = clause_text(text, span)
        assert sliced == sliced.strip(), sliced
        seen += 1
        if isinstance(parent, Not) and parent.span == span:
            assert isinstance(node, Compare) and node.op in ("in", "contains")
            continue  # the comparison of `x not in [...]` spans the whole clause, like its Not
        assert shape(_reparsed(node, sliced)) == shape(node), sliced
    assert seen >= 10
