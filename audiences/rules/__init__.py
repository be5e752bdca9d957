"""The audience rule language (docs/audiences.md, "Rule language").

``analyze(text, catalog)`` is the one entry point: it parses the rule
(:mod:`~audiences.rules.parser`), type-checks the tree against the deployment's catalog
(:mod:`~audiences.rules.checker`) and returns a :class:`RuleAnalysis`: the tree when there is no
error, every diagnostic in text order, and what the rule reads (traits, cohorts, events,
purposes). Analysis is pure and never raises for any text; invalid rules are a normal result.

Layers, bottom up: :mod:`~audiences.rules.ast` (the tree), :mod:`~audiences.rules.lexer`
(positions, diagnostics, tokens), :mod:`~audiences.rules.checker` (types and catalog),
:mod:`~audiences.rules.parser` (text → tree; it uses the checker's typing for its hints).
"""

from __future__ import annotations

from dataclasses import dataclass

from audiences.rules.ast import (
    And,
    BoolExpr,
    Cohort,
    Compare,
    ComputedRef,
    ConsentRef,
    EventFact,
    Exists,
    Not,
    Or,
    TraitRef,
    ValueExpr,
)
from audiences.rules.checker import RuleCatalog, check, literal_type, type_of
from audiences.rules.lexer import Diagnostic, clause_text
from audiences.rules.parser import parse

__all__ = [
    "Diagnostic",
    "RuleAnalysis",
    "RuleCatalog",
    "analyze",
    "clause_text",
    "literal_type",
    "type_of",
]


@dataclass(frozen=True)
class RuleAnalysis:
    """The outcome of :func:`analyze`."""

    rule: BoolExpr | None  # None when there is any ERROR
    diagnostics: tuple[Diagnostic, ...]  # ordered by position
    traits: tuple[str, ...]  # trait keys read: trait(), cohort() trait keys, computed() names; sorted, unique
    cohorts: tuple[str, ...]  # "source/cohort-name-as-written"
    events: tuple[str, ...]
    purposes: tuple[str, ...]

    @property
    def valid(self) -> bool:
        """True when there is no ERROR (warnings allowed)."""
        return not self.errors

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "ERROR")


def analyze(text: str, catalog: RuleCatalog) -> RuleAnalysis:
    """Parse and check a rule. Type checks run only when it parses without error."""
    parsed = parse(text)
    diagnostics = list(parsed.diagnostics)
    traits: set[str] = set()
    cohorts: set[str] = set()
    events: set[str] = set()
    purposes: set[str] = set()
    if parsed.rule is not None:
        diagnostics += check(parsed.rule, text, catalog)
        _collect(parsed.rule, traits, cohorts, events, purposes)
    diagnostics.sort(key=lambda d: (d.span.start, d.span.end))
    has_error = any(d.severity == "ERROR" for d in diagnostics)
    return RuleAnalysis(
        rule=None if has_error else parsed.rule,
        diagnostics=tuple(diagnostics),
        traits=tuple(sorted(traits)),
        cohorts=tuple(sorted(cohorts)),
        events=tuple(sorted(events)),
        purposes=tuple(sorted(purposes)),
    )


def _collect(node: BoolExpr, traits: set[str], cohorts: set[str], events: set[str], purposes: set[str]) -> None:
    """Add what ``node`` reads to the sets."""

    def value(expr: ValueExpr) -> None:
        if isinstance(expr, TraitRef):
            traits.add(expr.key)
        elif isinstance(expr, ComputedRef):
            traits.add(expr.name)
        elif isinstance(expr, EventFact):
            events.add(expr.event)

    if isinstance(node, And | Or):
        for item in node.items:
            _collect(item, traits, cohorts, events, purposes)
    elif isinstance(node, Not):
        _collect(node.item, traits, cohorts, events, purposes)
    elif isinstance(node, Compare):
        value(node.left)
    elif isinstance(node, Exists):
        value(node.target)
    elif isinstance(node, Cohort):
        traits.add(node.trait_key)
        cohorts.add(f"{node.source}/{node.cohort}")
    elif isinstance(node, ConsentRef):
        purposes.add(node.purpose)
