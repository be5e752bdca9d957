"""Compile a checked rule into one set-algebra query over the derived views.

Every clause of a rule denotes a *set of persons*. A clause that is true for a person with
no data (``count(purchase, within=7d) == 0``, ``not has(email)``) is compiled as the
*complement* of the persons it is false for, so no query ever enumerates the population
to find absences; ``and``/``or``/``not`` then combine sets with INTERSECT / UNION /
EXCEPT (``A and not B`` is ``A EXCEPT B``). Only a rule that is true "by absence" at its
root needs the population, once, at the very end.

The same compiled form evaluates the whole population (full evaluation, preview) and a given
set of persons (incremental: every clause is restricted to them), so the two can never
disagree. Evaluation time ``now`` is a parameter: ``within=7d`` and ``ago(7d)`` are
relative to it.

Tables read: ``person_traits`` / ``person_trait_elements`` (traits, cohorts),
``events`` joined to ``identifiers`` (event facts), ``event_totals`` (computed traits),
``identifiers`` (``has``) and ``person_consent`` (``consent``). Semantics are specified
in docs/audiences.md; the property-based test checks them against a brute-force evaluator.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Float,
    Select,
    Table,
    and_,
    case,
    false,
    func,
    intersect,
    literal_column,
    not_,
    or_,
    select,
    union,
)
from sqlalchemy import (
    cast as sql_cast,
)
from sqlalchemy.orm import Session

from audiences.models import PersonConsentRow, PersonTraitElementRow, PersonTraitRow
from audiences.rules import ast
from identity.events.models import EventRow, EventTotalRow
from identity.models import IdentifierRow, PersonRow

PT = cast(Table, PersonTraitRow.__table__)
PTE = cast(Table, PersonTraitElementRow.__table__)
PC = cast(Table, PersonConsentRow.__table__)
EV = cast(Table, EventRow.__table__)
TOT = cast(Table, EventTotalRow.__table__)
IDS = cast(Table, IdentifierRow.__table__)
PERSONS = cast(Table, PersonRow.__table__)

MICROS = Decimal(1_000_000)
#: Largest number of persons an incremental evaluation restricts one query to.
SCOPE_CHUNK = 2000

Scope = Callable[[Any], ColumnElement[bool]] | None


@dataclass(frozen=True, slots=True)
class PersonSet:
    """A set of persons: ``query`` (a SELECT of ``person_pk``; ``None`` = no one) if
    ``positive``, else everyone *except* ``query``."""

    positive: bool
    query: Select[Any] | None

    def flipped(self) -> PersonSet:
        return PersonSet(not self.positive, self.query)


EMPTY = PersonSet(True, None)
EVERYONE = PersonSet(False, None)


_COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _holds(left: Decimal | int, op: str, right: Any) -> bool:
    """Whether ``left op right`` holds (used to decide if a zero count satisfies a clause)."""
    if op == "in":
        return any(left == item for item in right)
    return bool(_COMPARISONS[op](left, right))


def _apply(column: Any, op: str, value: Any) -> ColumnElement[bool]:
    if op == "in":
        return cast(ColumnElement[bool], column.in_(list(value)))
    return cast(ColumnElement[bool], _COMPARISONS[op](column, value))


def _as_set(query: Select[Any]) -> Select[Any]:
    """``query`` as a plain one-column SELECT, usable inside INTERSECT/UNION/EXCEPT."""
    sub = query.subquery()
    return select(sub.c.person_pk)


def _combine(kind: str, queries: list[Select[Any]]) -> Select[Any]:
    if len(queries) == 1:
        return queries[0]
    compound = intersect(*queries) if kind == "intersect" else union(*queries)
    return _as_set(cast(Any, compound))


def _except(base: Select[Any], minus: list[Select[Any]]) -> Select[Any]:
    if not minus:
        return base
    return _as_set(cast(Any, base.except_(_combine("union", minus))))


@dataclass(frozen=True, slots=True)
class TimeSource:
    """Where time-relative facts of a rule come from, for the window-expiry pass: the
    persons whose ``events`` of ``name`` (any event when empty) or trait ``name`` times lie
    in ``[since - shift, now - shift)`` may have changed between two passes."""

    kind: str  # "event" | "trait"
    name: str
    shift_us: int


class CompiledRule:
    """A checked rule, compiled once; :meth:`sets` renders it for a time and a scope."""

    def __init__(self, rule: ast.BoolExpr, dialect: str) -> None:
        self.rule = rule
        self.dialect = dialect
        self.atoms = ast.atoms(rule)
        self.time_sources = tuple(sorted(set(_time_sources(rule)), key=lambda s: (s.kind, s.name, s.shift_us)))

    @property
    def time_dependent(self) -> bool:
        return bool(self.time_sources)

    # -- rendering -----------------------------------------------------------------------

    def sets(self, now_us: int, scope: Scope = None) -> PersonSet:
        return _Renderer(self.dialect, now_us, scope).node(self.rule)

    def atom_set(self, atom: ast.Atom, now_us: int, scope: Scope = None) -> PersonSet:
        return _Renderer(self.dialect, now_us, scope).node(atom)

    # -- evaluation ----------------------------------------------------------------------

    def evaluate(self, session: Session, now_us: int, persons: Sequence[int] | None = None) -> set[int]:
        """The persons matching the rule: everyone (``persons`` None) or among ``persons``."""
        return evaluate_set(session, lambda scope: self.sets(now_us, scope), persons)

    def evaluate_atom(self, session: Session, atom: ast.Atom, now_us: int, person_pk: int) -> bool:
        return person_pk in evaluate_set(session, lambda scope: self.atom_set(atom, now_us, scope), [person_pk])

    def value(self, session: Session, target: ast.EventFact | ast.ComputedRef, now_us: int, person_pk: int) -> Any:
        """The raw aggregate one person has for an event fact or computed trait (None when it
        has no such rows): the number behind a clause, for explanations."""
        renderer = _Renderer(self.dialect, now_us, lambda column: column == person_pk)
        if isinstance(target, ast.EventFact):
            return session.execute(renderer._events(target).with_only_columns(
                renderer._fact_aggregate(target))).scalar()
        aggregate, query = renderer._computed(target)
        return session.execute(query.with_only_columns(aggregate).group_by(None)).scalar()

    def query(self, now_us: int) -> Select[Any]:
        """The whole-population query (what preview and full evaluation run)."""
        return population_query(self.sets(now_us))

    def boundary_query(self, since_us: int, now_us: int) -> Select[Any] | None:
        """Persons whose time-relative facts may have changed between ``since_us`` and
        ``now_us`` (None when the rule has none)."""
        parts: list[Select[Any]] = []
        for source in self.time_sources:
            low, high = since_us - source.shift_us, now_us - source.shift_us
            if source.kind == "event":
                q = select(IDS.c.person_pk.label("person_pk")).select_from(
                    EV.join(IDS, IDS.c.id == EV.c.identifier_pk)).where(
                    EV.c.occurred_us >= low, EV.c.occurred_us < high)
                if source.name:
                    q = q.where(EV.c.event == source.name)
            else:
                q = select(PT.c.person_pk).where(PT.c.key == source.name, PT.c.ts_us >= low, PT.c.ts_us < high)
            parts.append(q)
        return _combine("union", parts) if parts else None


def all_of(parts: list[PersonSet]) -> PersonSet:
    """The intersection of ``parts``."""
    return _Renderer._and(parts)


def count_query(result: PersonSet) -> Select[Any]:
    """``SELECT count(*)`` of the persons in ``result``."""
    return select(func.count()).select_from(population_query(result).subquery())


def population_query(result: PersonSet) -> Select[Any]:
    if result.positive:
        return result.query if result.query is not None else select(PERSONS.c.id.label("person_pk")).where(false())
    everyone = select(PERSONS.c.id.label("person_pk"))
    return everyone if result.query is None else _as_set(cast(Any, everyone.except_(result.query)))


def evaluate_set(session: Session, render: Callable[[Scope], PersonSet], persons: Sequence[int] | None) -> set[int]:
    if persons is None:
        return set(session.execute(population_query(render(None))).scalars())
    found: set[int] = set()
    wanted = sorted(set(persons))
    for start in range(0, len(wanted), SCOPE_CHUNK):
        chunk = wanted[start:start + SCOPE_CHUNK]
        alive: set[int] = set(session.execute(select(PERSONS.c.id).where(PERSONS.c.id.in_(chunk))).scalars())
        if not alive:
            continue
        members = sorted(alive)
        result = render(lambda column, members=members: column.in_(members))  # type: ignore[misc]
        rows: set[int] = set(session.execute(result.query).scalars()) if result.query is not None else set()
        found |= (rows & alive) if result.positive else (alive - rows)
    return found


class _Renderer:
    def __init__(self, dialect: str, now_us: int, scope: Scope) -> None:
        self.dialect = dialect
        self.now_us = now_us
        self.scope = scope

    def _scoped(self, column: Any) -> list[ColumnElement[bool]]:
        return [self.scope(column)] if self.scope is not None else []

    # -- boolean structure ---------------------------------------------------------------

    def node(self, node: ast.BoolExpr) -> PersonSet:
        if isinstance(node, ast.And):
            return self._and([self.node(item) for item in node.items])
        if isinstance(node, ast.Or):
            return self._or([self.node(item) for item in node.items])
        if isinstance(node, ast.Not):
            return self.node(node.item).flipped()
        return self.atom(node)

    @staticmethod
    def _and(parts: list[PersonSet]) -> PersonSet:
        if any(p.positive and p.query is None for p in parts):
            return EMPTY
        positives = [p.query for p in parts if p.positive and p.query is not None]
        negatives = [p.query for p in parts if not p.positive and p.query is not None]
        if positives:
            return PersonSet(True, _except(_combine("intersect", positives), negatives))
        return PersonSet(False, _combine("union", negatives)) if negatives else EVERYONE

    @staticmethod
    def _or(parts: list[PersonSet]) -> PersonSet:
        if any(not p.positive and p.query is None for p in parts):
            return EVERYONE
        positives = [p.query for p in parts if p.positive and p.query is not None]
        negatives = [p.query for p in parts if not p.positive and p.query is not None]
        if negatives:
            return PersonSet(False, _except(_combine("intersect", negatives), positives))
        return PersonSet(True, _combine("union", positives)) if positives else EMPTY

    # -- atoms ---------------------------------------------------------------------------

    def atom(self, atom: ast.Atom) -> PersonSet:
        if isinstance(atom, ast.BoolLit):
            return EVERYONE if atom.value else EMPTY
        if isinstance(atom, ast.Cohort):
            return PersonSet(True, select(PT.c.person_pk).where(
                PT.c.key == atom.trait_key, PT.c.flag.is_(True), *self._scoped(PT.c.person_pk)))
        if isinstance(atom, ast.Has):
            return PersonSet(True, select(IDS.c.person_pk.label("person_pk")).where(
                IDS.c.type == atom.identifier_type, *self._scoped(IDS.c.person_pk)).distinct())
        if isinstance(atom, ast.ConsentRef):
            return PersonSet(True, select(PC.c.person_pk).where(
                PC.c.purpose == atom.purpose, PC.c.granted.is_(True), *self._scoped(PC.c.person_pk)))
        if isinstance(atom, ast.Exists):
            return self._exists(atom.target)
        return self._compare(atom)

    def _exists(self, target: ast.ValueExpr) -> PersonSet:
        if isinstance(target, ast.TraitRef):
            return PersonSet(True, select(PT.c.person_pk).where(PT.c.key == target.key,
                                                                *self._scoped(PT.c.person_pk)))
        if isinstance(target, ast.EventFact):
            if target.kind in (ast.FactKind.COUNT, ast.FactKind.SUM):
                return EVERYONE
            return PersonSet(True, self._events(target).group_by(IDS.c.person_pk))
        if ast.COMPUTED_TYPES[target.name] is ast.Type.NUMBER:
            return EVERYONE
        aggregate, query = self._computed(target)
        return PersonSet(True, query.having(aggregate.is_not(None)))

    def _compare(self, atom: ast.Compare) -> PersonSet:
        left, op, right = atom.left, atom.op, atom.right
        if isinstance(left, ast.TraitRef):
            return self._trait_compare(left.key, op, right)
        value = _literal_value(right, self.now_us, money=_is_money(left))
        if isinstance(left, ast.EventFact):
            aggregate = self._fact_aggregate(left)
            query = self._events(left).group_by(IDS.c.person_pk)
            absent_zero = left.kind in (ast.FactKind.COUNT, ast.FactKind.SUM)
        else:
            aggregate, query = self._computed(left)
            absent_zero = ast.COMPUTED_TYPES[left.name] is ast.Type.NUMBER
        if absent_zero:
            aggregate = func.coalesce(aggregate, 0)
            if _holds(0, op, value):
                return PersonSet(False, query.having(not_(_apply(aggregate, op, value))))
        return PersonSet(True, query.having(_apply(aggregate, op, value)))

    # -- traits --------------------------------------------------------------------------

    def _trait_compare(self, key: str, op: str, right: ast.Scalar | ast.ListLit) -> PersonSet:
        base = [PT.c.key == key, *self._scoped(PT.c.person_pk)]
        if op == "contains":
            if isinstance(right, ast.StringLit):
                in_text = select(PT.c.person_pk).where(*base, self._contains(PT.c.text, right.value))
                element = select(PTE.c.person_pk).where(PTE.c.key == key, PTE.c.text == right.value,
                                                        *self._scoped(PTE.c.person_pk))
                return PersonSet(True, _combine("union", [in_text, element]))
            number = float(cast(ast.NumberLit, right).value)
            return PersonSet(True, select(PTE.c.person_pk).where(PTE.c.key == key, PTE.c.num == number,
                                                                 *self._scoped(PTE.c.person_pk)).distinct())
        items = right.items if isinstance(right, ast.ListLit) else (right,)
        conditions: list[ColumnElement[bool]] = []
        for column, values in _typed_groups(items, self.now_us):
            if op == "in":
                conditions.append(column.in_(values))
            else:
                conditions.append(_apply(column, op, values[0]))
        return PersonSet(True, select(PT.c.person_pk).where(*base, or_(*conditions)))

    def _contains(self, column: Any, needle: str) -> ColumnElement[bool]:
        # Case-sensitive substring on both stores (SQLite's LIKE ignores ASCII case).
        if self.dialect == "postgresql":
            return func.strpos(column, needle) > 0
        return func.instr(column, needle) > 0

    # -- events --------------------------------------------------------------------------

    def _events(self, fact: ast.EventFact) -> Select[Any]:
        conditions: list[ColumnElement[bool]] = [EV.c.event == fact.event, EV.c.identity_only.is_(False)]
        if fact.within is not None:
            conditions.append(EV.c.occurred_us >= self.now_us - fact.within)
        if fact.currency:
            conditions.append(EV.c.currency == fact.currency)
        conditions += [self._property_filter(f) for f in fact.filters]
        return (select(IDS.c.person_pk.label("person_pk"))
                .select_from(EV.join(IDS, IDS.c.id == EV.c.identifier_pk))
                .where(*conditions, *self._scoped(IDS.c.person_pk)))

    @staticmethod
    def _fact_aggregate(fact: ast.EventFact) -> Any:
        if fact.kind is ast.FactKind.COUNT:
            return func.count()
        if fact.kind is ast.FactKind.SUM:
            return func.sum(EV.c.value_micros)
        if fact.kind is ast.FactKind.FIRST:
            return func.min(EV.c.occurred_us)
        return func.max(EV.c.occurred_us)

    def _json_path(self, path: tuple[str, ...]) -> tuple[Any, Any]:
        """(text value, JSON type name) of ``body.properties.<path>``."""
        if self.dialect == "postgresql":
            pg_path = "{" + ",".join(['properties', *(p.replace('"', '\\"') for p in path)]) + "}"
            node = EV.c.body.op("#>")(literal_column(_sql_string(pg_path)))
            text = EV.c.body.op("#>>")(literal_column(_sql_string(pg_path)))
            return text, func.json_typeof(node)
        json_path = "$.properties" + "".join('."' + p.replace('"', '\\"') + '"' for p in path)
        return func.json_extract(EV.c.body, json_path), func.json_type(EV.c.body, json_path)

    def _property_filter(self, f: ast.PropertyFilter) -> ColumnElement[bool]:
        text, json_type = self._json_path(f.path)
        if f.op == "exists":
            return and_(json_type.is_not(None), json_type != "null")
        items = f.value.items if isinstance(f.value, ast.ListLit) else (cast(ast.Scalar, f.value),)
        conditions = []
        for kind, values in _property_groups(items, self.now_us):
            if kind == "string":
                typed = json_type == ("string" if self.dialect == "postgresql" else "text")
                column: Any = text
            elif kind == "number":
                typed = json_type == "number" if self.dialect == "postgresql" else json_type.in_(["integer", "real"])
                column = case((typed, sql_cast(text, Float())), else_=None)
            else:  # bool
                if self.dialect == "postgresql":
                    typed = json_type == "boolean"
                    column = text
                    values = ["true" if v else "false" for v in values]
                else:
                    typed = json_type.in_(["true", "false"])
                    column = json_type
                    values = ["true" if v else "false" for v in values]
            condition = column.in_(values) if f.op == "in" else _apply(column, f.op, values[0])
            conditions.append(and_(typed, condition))
        return or_(false(), *conditions)

    # -- computed traits -----------------------------------------------------------------

    def _computed(self, ref: ast.ComputedRef) -> tuple[Any, Select[Any]]:
        conditions: list[ColumnElement[bool]] = []
        name = ref.name
        if name in ("purchase_count", "first_purchase_at", "last_purchase_at"):
            conditions.append(TOT.c.event == "purchase")
        elif name == "refund_count":
            conditions.append(TOT.c.event == "refund")
        elif name == "lifetime_value":
            conditions += [TOT.c.event.in_(["purchase", "refund"]), TOT.c.currency == ref.currency]
        elif name == "refunded_value":
            conditions += [TOT.c.event == "refund", TOT.c.currency == ref.currency]
        aggregate: Any = {
            "event_count": func.sum(TOT.c.count), "purchase_count": func.sum(TOT.c.count),
            "refund_count": func.sum(TOT.c.count),
            "lifetime_value": func.sum(case((TOT.c.event == "purchase", TOT.c.value_micros),
                                            else_=-TOT.c.value_micros)),
            "refunded_value": func.sum(TOT.c.value_micros),
            "first_seen_at": func.min(TOT.c.first_us), "last_seen_at": func.max(TOT.c.last_us),
            "first_purchase_at": func.min(TOT.c.first_us), "last_purchase_at": func.max(TOT.c.last_us),
        }[name]
        query = (select(IDS.c.person_pk.label("person_pk"))
                 .select_from(TOT.join(IDS, IDS.c.id == TOT.c.identifier_pk))
                 .where(*conditions, *self._scoped(IDS.c.person_pk)).group_by(IDS.c.person_pk))
        return aggregate, query


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _is_money(expr: ast.ValueExpr) -> bool:
    if isinstance(expr, ast.EventFact):
        return expr.kind is ast.FactKind.SUM
    return isinstance(expr, ast.ComputedRef) and expr.name in ast.MONEY_COMPUTED


def _scalar(literal: ast.Scalar, now_us: int, *, money: bool = False) -> Any:
    if isinstance(literal, ast.NumberLit):
        return int((literal.value * MICROS).to_integral_value()) if money else literal.value
    if isinstance(literal, ast.AgoLit):
        return now_us - literal.micros
    if isinstance(literal, ast.TimeLit):
        return literal.micros
    return literal.value


def _literal_value(literal: ast.Scalar | ast.ListLit, now_us: int, *, money: bool) -> Any:
    if isinstance(literal, ast.ListLit):
        return [_scalar(item, now_us, money=money) for item in literal.items]
    return _scalar(literal, now_us, money=money)


def _typed_groups(items: Sequence[ast.Scalar], now_us: int) -> list[tuple[Any, list[Any]]]:
    """Literal values grouped by the ``person_traits`` column they compare with."""
    groups: dict[str, list[Any]] = {}
    for item in items:
        if isinstance(item, ast.StringLit):
            groups.setdefault("text", []).append(item.value)
        elif isinstance(item, ast.NumberLit):
            groups.setdefault("num", []).append(float(item.value))
        elif isinstance(item, ast.BoolLit):
            groups.setdefault("flag", []).append(item.value)
        else:
            groups.setdefault("ts_us", []).append(_scalar(item, now_us))
    return [(PT.c[name], values) for name, values in groups.items()]


def _property_groups(items: Sequence[ast.Scalar], now_us: int) -> list[tuple[str, list[Any]]]:
    groups: dict[str, list[Any]] = {}
    for item in items:
        if isinstance(item, ast.StringLit):
            groups.setdefault("string", []).append(item.value)
        elif isinstance(item, ast.NumberLit):
            groups.setdefault("number", []).append(float(item.value))
        elif isinstance(item, ast.BoolLit):
            groups.setdefault("bool", []).append(item.value)
    return list(groups.items())


def _time_sources(node: ast.BoolExpr) -> list[TimeSource]:
    found: list[TimeSource] = []
    for atom in ast.atoms(node):
        target: ast.ValueExpr | None = None
        agos: list[int] = []
        if isinstance(atom, ast.Compare):
            target = atom.left
            items = atom.right.items if isinstance(atom.right, ast.ListLit) else (atom.right,)
            agos = [item.micros for item in items if isinstance(item, ast.AgoLit)]
        elif isinstance(atom, ast.Exists):
            target = atom.target
        if isinstance(target, ast.EventFact):
            shifts = ([target.within] if target.within is not None else []) + agos
            found += [TimeSource("event", target.event, shift) for shift in shifts]
        elif isinstance(target, ast.ComputedRef):
            event = "purchase" if "purchase" in target.name else ""
            found += [TimeSource("event", event, shift) for shift in agos]
        elif isinstance(target, ast.TraitRef):
            found += [TimeSource("trait", target.key, shift) for shift in agos]
    return found
