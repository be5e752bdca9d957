"""Property: PreviewAudience counts equal a brute-force Python evaluation of the same rule
over the same data, for random rules over random populations (SQLite and PostgreSQL).

The brute-force evaluator below is written from the rule semantics in docs/audiences.md,
independently of the compiler: it sees only what the test sent (traits, events, identifiers,
consent decisions) and evaluates each rule person by person.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stitchgraph.v1 import (
    audience_service_pb2,
    audience_service_pb2_grpc,
    common_pb2,
    consent_pb2,
    consent_service_pb2,
    consent_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    events_pb2,
    identity_service_pb2,
    identity_service_pb2_grpc,
)

DAY = timedelta(days=1)
EVENTS = ("purchase", "page_view", "add_to_cart")
PLANS = ("free", "pro", "team")
OPT_IN = {"DE", "FR"}
COUNTRIES = ("DE", "FR", "US", "BR", None)
PURPOSES = ("ad_personalization", "analytics")


@dataclass
class Event:
    name: str
    at: datetime
    value: Decimal | None = None
    currency: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class Person:
    user_id: str
    email: bool
    phone: bool
    traits: dict[str, Any]
    events: list[Event]
    consent: dict[str, bool]  # explicit decisions


def make_population(seed: int, now: datetime) -> list[Person]:
    rng = random.Random(seed)
    people = []
    for i in range(36):
        traits: dict[str, Any] = {}
        if rng.random() < 0.8:
            traits["plan"] = rng.choice(PLANS)
        if rng.random() < 0.7:
            traits["score"] = rng.choice([0, 1, 2, 3, 5, 8, 2.5])
        if rng.random() < 0.5:
            traits["vip"] = rng.random() < 0.5
        if rng.random() < 0.4:
            traits["tags"] = rng.sample(["a", "b", "c"], rng.randint(0, 2))
        if rng.random() < 0.5:
            traits["nickname"] = rng.choice(["anna", "hans", "Dan", "bob"])
        if rng.random() < 0.3:
            traits["posthog_cohort_checkout_abandoners"] = rng.random() < 0.8
        country = rng.choice(COUNTRIES)
        if country:
            traits["country"] = country
        events = []
        for _ in range(rng.randint(0, 6)):
            name = rng.choice(EVENTS)
            at = now - rng.randint(0, 40) * DAY - DAY / 2  # half-day margins around whole-day windows
            if name == "purchase":
                events.append(Event(name, at, Decimal(rng.choice(["5", "19.99", "120"])), rng.choice(["EUR", "USD"])))
            else:
                events.append(Event(name, at, properties={"plan": rng.choice(PLANS)} if rng.random() < 0.6 else {}))
        consent = {p: rng.random() < 0.5 for p in PURPOSES if rng.random() < 0.6}
        people.append(Person(f"s{seed}-u{i}", rng.random() < 0.6, rng.random() < 0.3, traits, events, consent))
    return people


def load(channel: grpc.Channel, people: list[Person]) -> None:
    identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
    events = event_service_pb2_grpc.EventServiceStub(channel)
    consent = consent_service_pb2_grpc.ConsentServiceStub(channel)
    batch = []
    for p in people:
        ids = [common_pb2.Identifier(type="user_id", value=p.user_id)]
        if p.email:
            ids.append(common_pb2.Identifier(type="email", value=f"{p.user_id}@example.com"))
        if p.phone:
            ids.append(common_pb2.Identifier(type="phone", value=f"+1415555{abs(hash(p.user_id)) % 10000:04d}"))
        request = identity_service_pb2.IdentifyRequest(identifiers=ids, source="test")
        request.traits.update(p.traits)
        identity.Identify(request)
        for purpose, granted in p.consent.items():
            consent.SetConsent(consent_service_pb2.SetConsentRequest(
                identifier=common_pb2.Identifier(type="user_id", value=p.user_id),
                decisions=[consent_pb2.ConsentDecision(purpose=purpose, state=consent_pb2.CONSENT_STATUS_GRANTED
                                                       if granted else consent_pb2.CONSENT_STATUS_DENIED)]))
        for n, e in enumerate(p.events):
            at = Timestamp()
            at.FromDatetime(e.at)
            message = events_pb2.Event(event=e.name, source="test", occurred_at=at, event_id=f"{p.user_id}-{n}",
                                       identifiers=[common_pb2.Identifier(type="user_id", value=p.user_id)])
            if e.value is not None:
                message.value, message.currency, message.order_id = str(e.value), e.currency or "", f"o-{p.user_id}-{n}"
            if e.properties:
                message.properties.update(e.properties)
            batch.append(message)
    for start in range(0, len(batch), 500):
        response = events.CaptureBatch(event_service_pb2.CaptureBatchRequest(events=batch[start:start + 500]))
        assert all(r.status == events_pb2.CAPTURE_STATUS_ACCEPTED for r in response.results)


# -- the brute-force evaluator ---------------------------------------------------------------

Predicate = Callable[[Person, datetime], bool]
OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def _same_type(value: Any, literal: Any) -> bool:
    if isinstance(literal, bool):
        return isinstance(value, bool)
    if isinstance(literal, int | float | Decimal):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)


def _typed_compare(value: Any, op: str, literal: Any) -> bool:
    if op == "in":
        return any(_same_type(value, item) and value == item for item in literal)
    if not _same_type(value, literal):
        return False
    if isinstance(literal, Decimal):
        return OPS[op](Decimal(str(value)), literal)
    return OPS[op](value, literal)


def _lit(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_lit(v) for v in value) + "]"
    return str(value)


def consent_of(p: Person, purpose: str) -> bool:
    if purpose in p.consent:
        return p.consent[purpose]
    country = p.traits.get("country")
    return country is not None and country not in OPT_IN  # unknown jurisdiction: deny (default policy)


@st.composite
def atoms(draw: st.DrawFn) -> tuple[str, Predicate]:
    kind = draw(st.sampled_from(["plan", "score", "vip", "contains", "exists", "cohort", "count", "where", "sum",
                                 "last", "computed", "ltv", "has", "consent"]))
    op = draw(st.sampled_from(list(OPS)))
    if kind == "plan":
        if draw(st.booleans()):
            values = draw(st.lists(st.sampled_from(PLANS), min_size=1, max_size=2, unique=True))
            return f'trait("plan") in {_lit(values)}', lambda p, now: _typed_compare(p.traits.get("plan"), "in",
                                                                                      values)
        value = draw(st.sampled_from(PLANS))
        eq = draw(st.sampled_from(["==", "!="]))
        return (f'trait("plan") {eq} "{value}"',
                lambda p, now: "plan" in p.traits and _typed_compare(p.traits["plan"], eq, value))
    if kind == "score":
        number = Decimal(draw(st.sampled_from(["0", "1", "2", "2.5", "4"])))
        return (f'trait("score") {op} {number}',
                lambda p, now: "score" in p.traits and _typed_compare(p.traits["score"], op, number))
    if kind == "vip":
        flag = draw(st.booleans())
        eq = draw(st.sampled_from(["==", "!="]))
        return (f'trait("vip") {eq} {_lit(flag)}',
                lambda p, now: "vip" in p.traits and _typed_compare(p.traits["vip"], eq, flag))
    if kind == "contains":
        key, needle = draw(st.sampled_from([("tags", "a"), ("tags", "b"), ("nickname", "an"), ("nickname", "D")]))

        def contains(p: Person, now: datetime) -> bool:
            value = p.traits.get(key)
            return (isinstance(value, str) and needle in value) or (isinstance(value, list) and needle in value)
        return f'trait("{key}") contains "{needle}"', contains
    if kind == "exists":
        key = draw(st.sampled_from(["nickname", "tags", "vip", "missing"]))
        return f'exists(trait("{key}"))', lambda p, now: key in p.traits
    if kind == "cohort":
        return ('cohort("posthog", "checkout_abandoners")',
                lambda p, now: p.traits.get("posthog_cohort_checkout_abandoners") is True)
    if kind in ("count", "where", "sum", "last"):
        event = draw(st.sampled_from(EVENTS if kind != "sum" else ("purchase",)))
        days = draw(st.sampled_from([None, 1, 7, 30]))
        plan = draw(st.sampled_from(PLANS)) if kind == "where" else None
        currency = draw(st.sampled_from(["EUR", "USD"])) if kind == "sum" else None
        args = [event] + ([f"within={days}d"] if days else []) + (
            [f'where=property("plan") == "{plan}"'] if plan else []) + ([f'currency="{currency}"'] if currency else [])

        def matching(p: Person, now: datetime) -> list[Event]:
            return [e for e in p.events if e.name == event and (days is None or e.at >= now - days * DAY)
                    and (plan is None or e.properties.get("plan") == plan)
                    and (currency is None or e.currency == currency)]
        if kind == "last":
            ago = draw(st.sampled_from([2, 10]))
            fn = draw(st.sampled_from(["last", "first"]))
            pick = max if fn == "last" else min

            def last(p: Person, now: datetime) -> bool:
                found = matching(p, now)
                return bool(found) and OPS[op](pick(e.at for e in found), now - ago * DAY)
            return f"{fn}({', '.join(args)}) {op} ago({ago}d)", last
        if kind == "sum":
            amount = Decimal(draw(st.sampled_from(["0", "19.99", "25", "100"])))
            return (f"sum({', '.join(args)}) {op} {amount}",
                    lambda p, now: OPS[op](sum((e.value or Decimal(0) for e in matching(p, now)), Decimal(0)), amount))
        n = draw(st.integers(0, 3))
        return f"count({', '.join(args)}) {op} {n}", lambda p, now: OPS[op](len(matching(p, now)), n)
    if kind == "computed":
        n = draw(st.integers(0, 3))
        return (f'computed("purchase_count") {op} {n}',
                lambda p, now: OPS[op](sum(1 for e in p.events if e.name == "purchase"), n))
    if kind == "ltv":
        amount = Decimal(draw(st.sampled_from(["0", "19.99", "100"])))
        return (f'computed("lifetime_value", "EUR") {op} {amount}',
                lambda p, now: OPS[op](sum((e.value or Decimal(0) for e in p.events
                                            if e.name == "purchase" and e.currency == "EUR"), Decimal(0)), amount))
    if kind == "has":
        which = draw(st.sampled_from(["email", "phone"]))
        return f"has({which})", lambda p, now: getattr(p, which)
    purpose = draw(st.sampled_from(PURPOSES))
    return f"consent({purpose})", lambda p, now: consent_of(p, purpose)


def rules(depth: int = 2) -> st.SearchStrategy[tuple[str, Predicate]]:
    if depth == 0:
        return atoms()

    def combine(parts: tuple[str, list[tuple[str, Predicate]]]) -> tuple[str, Predicate]:
        how, items = parts
        if how == "not":
            text, pred = items[0]
            return f"not ({text})", lambda p, now: not pred(p, now)
        preds = [pred for _, pred in items]
        joined = f" {how} ".join(f"({text})" for text, _ in items)
        if how == "and":
            return joined, lambda p, now: all(f(p, now) for f in preds)
        return joined, lambda p, now: any(f(p, now) for f in preds)

    sub = rules(depth - 1)
    return st.one_of(atoms(), st.tuples(st.sampled_from(["and", "or", "not"]),
                                        st.lists(sub, min_size=2, max_size=3)).map(combine))


@pytest.mark.parametrize("seed", [11, 29])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_preview_counts_equal_brute_force(channel: grpc.Channel, seed: int, data: st.DataObject,
                                          loaded: dict[int, tuple[list[Person], datetime]]) -> None:
    if seed not in loaded:
        now = datetime.now(UTC)
        people = make_population(seed, now)
        load(channel, people)
        loaded[seed] = (people, now)
    people, now = loaded[seed]
    text, predicate = data.draw(rules())
    stub = audience_service_pb2_grpc.AudienceServiceStub(channel)
    preview = stub.PreviewAudience(audience_service_pb2.PreviewAudienceRequest(rule=text, sample_size=100))
    expected = sorted(p.user_id for p in people if predicate(p, now))
    assert preview.member_count == len(expected), text
    got = sorted(i.value for s in preview.sample for i in s.identifiers if i.type == "user_id")
    assert got == expected, text


@pytest.fixture
def loaded() -> dict[int, tuple[list[Person], datetime]]:
    return {}
