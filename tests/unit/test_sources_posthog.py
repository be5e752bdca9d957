"""PostHog payload parsing (sources-and-consent §1), the shared source helpers and the dispatcher."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from identity.events.incoming import IncomingEvent, ParsedPayload
from identity.events.sources import SOURCE_KINDS, parse
from identity.events.sources.common import click_ids_from_url, coerce_id, parse_timestamp
from stitchgraph.errors import FieldViolation

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
DEVICE = "018f2b9c-6c1e-7a3b-9d1e-2f4a5b6c7d8e"
SESSION = "018f2b9c-7000-7abc-8def-0123456789ab"
UUID = "018f2b9d-0000-7000-8000-00000000aaaa"
UA = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15"
)


def _parse(payload: Any, *, received_at: datetime = RECEIVED) -> ParsedPayload:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return parse("posthog", body, source="posthog", received_at=received_at)


def _one(payload: Any) -> IncomingEvent:
    parsed = _parse(payload)
    assert parsed.violations == []
    assert len(parsed.messages) == 1
    return parsed.messages[0]


def _reasons(event: IncomingEvent) -> dict[str, str]:
    return {v.field: v.reason for v in event.violations}


def _js_properties(**extra: Any) -> dict[str, Any]:
    """What posthog-js 1.x attaches to every event."""
    base: dict[str, Any] = {
        "$os": "Mac OS X",
        "$browser": "Safari",
        "$device_type": "Desktop",
        "$current_url": "https://shop.example/landing?utm_source=google&gclid=Cj0KCQjw&fbclid=IwAR2xyz",
        "$host": "shop.example",
        "$pathname": "/landing",
        "$raw_user_agent": UA,
        "$browser_language": "en-US",
        "$referrer": "$direct",
        "$lib": "web",
        "$lib_version": "1.130.2",
        "$insert_id": "k3n9x0w2q8",
        "$time": 1714564795.123,
        "$device_id": DEVICE,
        "$session_id": SESSION,
        "$window_id": "018f2b9c-7000-7abc-8def-0000000000ff",
        "$is_identified": False,
        "token": "phc_test",
    }
    base.update(extra)
    return base


# --- posthog-js ---------------------------------------------------------------------------------


def test_posthog_js_anonymous_pageview() -> None:
    event = _one(
        {
            "event": "$pageview",
            "distinct_id": DEVICE,
            "uuid": UUID,
            "timestamp": "2024-05-01T11:59:55.123Z",
            "properties": _js_properties(),
        }
    )
    assert (event.kind, event.source_event, event.source) == ("page", "$pageview", "posthog")
    assert event.identifiers == [("anonymous_id", DEVICE)]
    assert event.inferred_anonymous == frozenset()
    assert event.identified == frozenset()
    assert event.occurred_at == datetime(2024, 5, 1, 11, 59, 55, 123000, tzinfo=UTC)
    assert event.message_id == UUID
    assert event.context == {
        "user_agent": UA,
        "page_url": "https://shop.example/landing?utm_source=google&gclid=Cj0KCQjw&fbclid=IwAR2xyz",
        "locale": "en-US",
        "gclid": "Cj0KCQjw",
        "fbc": "fb.1.1714564795123.IwAR2xyz",
    }
    assert event.metadata == {"posthog_session_id": SESSION, "library": "web/1.130.2"}
    assert event.action_source == "WEBSITE"
    # context keys stay as properties; identity and id keys are consumed
    assert event.properties["$current_url"].startswith("https://shop.example/")
    assert event.properties["$time"] == Decimal("1714564795.123")
    assert "$device_id" not in event.properties
    assert "$insert_id" not in event.properties
    assert event.violations == []
    assert event.personless is False


def test_posthog_js_identified_purchase_links_device_and_keeps_money_exact() -> None:
    event = _one(
        {
            "event": "Order Completed",
            "distinct_id": "user_42",
            "timestamp": "2024-05-01T11:58:00Z",
            "properties": _js_properties(
                **{
                    "$is_identified": True,
                    "event_id": "order-1001-completed",
                    "revenue": 49.99,
                    "currency": "EUR",
                    "order_id": "1001",
                    "products": [{"sku": "A-1", "price": 19.99, "quantity": 1}],
                    "_fbp": "fb.1.1714500000000.123456789",
                    "$geoip_country_code": "DE",
                    "$geoip_subdivision_1_code": "BE",
                    "$ip": "203.0.113.7",
                }
            ),
        }
    )
    assert event.kind == "track"
    assert event.identifiers == [("user_id", "user_42"), ("anonymous_id", DEVICE)]
    assert event.event_id == "order-1001-completed"
    assert "event_id" not in event.properties
    assert event.message_id == "k3n9x0w2q8"  # no uuid: $insert_id
    assert event.properties["revenue"] == Decimal("49.99")
    assert event.properties["products"] == [{"sku": "A-1", "price": Decimal("19.99"), "quantity": 1}]
    assert (event.properties["currency"], event.properties["order_id"]) == ("EUR", "1001")
    assert (event.value, event.currency, event.order_id, event.items) == ("", "", "", [])
    assert event.context["fbp"] == "fb.1.1714500000000.123456789"
    assert event.context["ip"] == "203.0.113.7"
    assert (event.context["country_code"], event.context["region_code"]) == ("DE", "DE-BE")
    assert event.context["fbc"] == "fb.1.1714564680000.IwAR2xyz"


def test_identify_folds_anonymous_id_into_identified_user_with_traits() -> None:
    event = _one(
        {
            "event": "$identify",
            "distinct_id": "user_42",
            "timestamp": "2024-05-01T11:59:00+02:00",
            "properties": _js_properties(
                **{
                    "$anon_distinct_id": DEVICE,
                    "$set": {"email": "ada@example.com", "plan": "pro"},
                    "$set_once": {"first_seen_plan": "free"},
                }
            ),
            "$set": {"plan": "basic", "name": "Ada"},
        }
    )
    assert event.kind == "identify"
    assert event.source_event == "$identify"
    assert event.identifiers == [("user_id", "user_42"), ("anonymous_id", DEVICE)]
    assert event.identified == frozenset({"user_42"})
    assert event.inferred_anonymous == frozenset()
    # properties.$set wins over top-level $set; raw email stays a trait (the pipeline promotes it)
    assert event.trait_set == {"plan": "pro", "name": "Ada", "email": "ada@example.com"}
    assert event.trait_set_once == {"first_seen_plan": "free"}
    assert event.occurred_at == datetime(2024, 5, 1, 9, 59, tzinfo=UTC)
    for key in ("$anon_distinct_id", "$set", "$set_once", "$device_id"):
        assert key not in event.properties


def test_identify_without_anon_id_only_sets_traits() -> None:
    event = _one({"event": "$identify", "distinct_id": "user_42", "properties": {"$set": {"plan": "pro"}}})
    assert event.identifiers == [("user_id", "user_42")]
    assert event.trait_set == {"plan": "pro"}
    assert event.occurred_at == RECEIVED


def test_mobile_screen_is_app() -> None:
    event = _one(
        {
            "event": "$screen",
            "distinct_id": "C0FFEE00-1111-2222-3333-444455556666",
            "properties": {
                "$screen_name": "Checkout",
                "$lib": "posthog-ios",
                "$lib_version": "3.5.0",
                "$device_id": "C0FFEE00-1111-2222-3333-444455556666",
                "$locale": "fr-FR",
            },
        }
    )
    assert (event.kind, event.source_event, event.action_source) == ("screen", "$screen", "APP")
    assert event.identifiers == [("anonymous_id", "C0FFEE00-1111-2222-3333-444455556666")]
    assert event.context == {"locale": "fr-FR"}
    assert event.metadata == {"library": "posthog-ios/3.5.0"}


def test_device_id_different_from_distinct_id_types_distinct_id_as_user() -> None:
    event = _one({"event": "clicked", "distinct_id": "user_7", "properties": {"$device_id": "dev-1"}})
    assert event.identifiers == [("user_id", "user_7"), ("anonymous_id", "dev-1")]


# --- posthog-python batch -----------------------------------------------------------------------


def _python_event(event: str, distinct_id: str, /, **props: Any) -> dict[str, Any]:
    return {
        "event": event,
        "distinct_id": distinct_id,
        "uuid": f"uuid-{event}-{distinct_id}",
        "timestamp": "2024-05-01T11:59:50.000000+00:00",
        "properties": {"$lib": "posthog-python", "$lib_version": "7.42.0", "$geoip_disable": True, **props},
        "type": "capture",
        "library": "posthog-python",
        "library_version": "7.42.0",
    }


def test_posthog_python_batch_corrects_clock_skew() -> None:
    body = {
        "api_key": "phc_test",
        "batch": [
            _python_event("invoice paid", "cust_981", amount=120, currency="USD"),
            _python_event("$set", "cust_981", **{"$set": {"plan": "enterprise"}, "$unset": ["trial_ends"]}),
            _python_event("$set_once", "cust_981", **{"$set_once": {"signup_source": "sales"}}),
        ],
        "sent_at": "2024-05-01T12:00:05.000000+00:00",
        "historical_migration": False,
    }
    parsed = _parse(body)
    assert parsed.violations == []
    paid, set_event, set_once = parsed.messages
    # sender clock 15 s ahead of the event: occurred = received - (sent_at - timestamp)
    assert paid.occurred_at == RECEIVED - timedelta(seconds=15)
    assert paid.metadata == {"sent_at": datetime(2024, 5, 1, 12, 0, 5, tzinfo=UTC), "library": "posthog-python/7.42.0"}
    assert paid.identifiers == [("user_id", "cust_981")]
    assert paid.inferred_anonymous == frozenset()
    assert paid.action_source == ""
    assert paid.message_id == "uuid-invoice paid-cust_981"
    assert paid.properties == {
        "$lib": "posthog-python",
        "$lib_version": "7.42.0",
        "$geoip_disable": True,
        "amount": 120,
        "currency": "USD",
    }
    assert (set_event.kind, set_event.source_event) == ("identify", "$set")
    assert set_event.identifiers == [("user_id", "cust_981")]
    assert set_event.trait_set == {"plan": "enterprise"}
    assert set_event.trait_unset == ["trial_ends"]
    assert (set_once.kind, set_once.trait_set_once) == ("identify", {"signup_source": "sales"})


def test_posthog_python_alias_new_id_is_identified_previous_is_inferred_anonymous() -> None:
    # posthog-python alias(previous_id="anon-77", distinct_id="user-77")
    raw = _python_event("$create_alias", "anon-77", **{"distinct_id": "anon-77", "alias": "user-77"})
    event = _one({"api_key": "phc_test", "batch": [raw]})
    assert event.kind == "alias"
    assert event.identifiers == [("user_id", "user-77"), ("anonymous_id", "anon-77")]
    assert event.identified == frozenset({"user-77"})
    assert event.inferred_anonymous == frozenset({"anon-77"})
    assert "alias" not in event.properties
    assert "distinct_id" not in event.properties


def test_merge_dangerously_without_alias_is_reported() -> None:
    event = _one({"event": "$merge_dangerously", "distinct_id": "user-1", "properties": {}})
    assert event.kind == "alias"
    assert _reasons(event) == {"properties.alias": "REQUIRED"}
    assert event.identifiers == [("anonymous_id", "user-1")]


def test_inconsistent_api_keys_reject_the_batch() -> None:
    body = {"api_key": "phc_a", "batch": [{**_python_event("x", "u1"), "api_key": "phc_b"}]}
    parsed = _parse(body)
    assert parsed.messages == []
    assert parsed.violations == [
        FieldViolation("api_key", "all events of a batch must carry the same api_key", "INCONSISTENT_API_KEY")
    ]


def test_same_api_key_on_batch_and_events_is_fine() -> None:
    body = {"api_key": "phc_a", "batch": [{**_python_event("x", "u1"), "api_key": "phc_a"}]}
    assert _parse(body).violations == []


def test_bare_array_of_events() -> None:
    parsed = _parse([_python_event("a", "u1"), _python_event("b", "u2")])
    assert [m.source_event for m in parsed.messages] == ["a", "b"]


# --- Typing rules and personless ----------------------------------------------------------------


def test_raw_http_event_without_evidence_is_inferred_anonymous() -> None:
    event = _one({"api_key": "phc_test", "event": "signed up", "distinct_id": "12345", "properties": {"plan": "pro"}})
    assert event.identifiers == [("anonymous_id", "12345")]
    assert event.inferred_anonymous == frozenset({"12345"})
    assert event.action_source == ""


def test_is_server_flag_types_user() -> None:
    event = _one({"event": "x", "distinct_id": "u1", "properties": {"$is_server": True}})
    assert event.identifiers == [("user_id", "u1")]


def test_personless_event_is_anonymous_and_marked() -> None:
    event = _one(
        {
            "event": "$pageview",
            "distinct_id": DEVICE,
            "properties": _js_properties(**{"$process_person_profile": False, "$is_identified": True}),
        }
    )
    assert event.personless is True
    assert event.identifiers == [("anonymous_id", DEVICE)]
    assert event.violations == []


def test_only_literal_false_makes_personless() -> None:
    event = _one({"event": "x", "distinct_id": "u1", "properties": {"$process_person_profile": "false"}})
    assert event.personless is False
    assert event.inferred_anonymous == frozenset({"u1"})


@pytest.mark.parametrize("name", ["$identify", "$create_alias", "$merge_dangerously", "$groupidentify"])
def test_personless_identity_events_are_rejected(name: str) -> None:
    event = _one(
        {
            "event": name,
            "distinct_id": "u1",
            "properties": {"$process_person_profile": False, "alias": "u2", "$group_type": "company"},
        }
    )
    assert _reasons(event)["properties.$process_person_profile"] == "PERSONLESS_IDENTITY_EVENT"
    assert event.personless is True


# --- Time ---------------------------------------------------------------------------------------


def test_event_level_sent_at_wins_over_batch_level() -> None:
    raw = {**_python_event("x", "u1"), "sent_at": "2024-05-01T11:59:51Z"}
    event = _one({"batch": [raw], "sent_at": "2024-05-01T12:00:05Z"})
    assert event.occurred_at == RECEIVED - timedelta(seconds=1)


def test_offset_without_timestamp() -> None:
    event = _one({"event": "x", "distinct_id": "u1", "offset": 2500})
    assert event.occurred_at == RECEIVED - timedelta(milliseconds=2500)


def test_invalid_timestamp_is_reported_and_time_unknown() -> None:
    event = _one({"event": "x", "distinct_id": "u1", "timestamp": "yesterday"})
    assert _reasons(event) == {"timestamp": "INVALID_TIMESTAMP"}
    assert event.occurred_at is None


def test_invalid_batch_sent_at_rejects_payload() -> None:
    parsed = _parse({"batch": [_python_event("x", "u1")], "sent_at": 1714564800})
    assert [(v.field, v.reason) for v in parsed.violations] == [("sent_at", "INVALID_TIMESTAMP")]


# --- Required fields and types ------------------------------------------------------------------


def test_missing_event_and_distinct_id() -> None:
    event = _one({"properties": {"a": 1}})
    assert _reasons(event) == {"event": "REQUIRED", "distinct_id": "REQUIRED"}
    assert event.identifiers == []
    assert event.properties == {"a": 1}


def test_distinct_id_from_properties() -> None:
    event = _one({"event": "x", "properties": {"distinct_id": 981, "$lib": "posthog-node"}})
    assert event.identifiers == [("user_id", "981")]
    assert "distinct_id" not in event.properties


def test_distinct_id_too_long() -> None:
    event = _one({"event": "x", "distinct_id": "a" * 201})
    assert _reasons(event) == {"distinct_id": "TOO_LONG"}


@pytest.mark.parametrize("value", [12.5, True, {"id": 1}, ["a"]])
def test_distinct_id_of_wrong_type(value: Any) -> None:
    event = _one({"event": "x", "distinct_id": value})
    assert _reasons(event) == {"distinct_id": "INVALID_TYPE"}


def test_trait_operation_shapes() -> None:
    event = _one(
        {
            "event": "$set",
            "distinct_id": "u1",
            "properties": {"$lib": "posthog-python", "$unset": {"old_a": None, "old_b": None}, "$set_once": "x"},
        }
    )
    assert event.trait_unset == ["old_a", "old_b"]
    assert _reasons(event) == {"properties.$set_once": "INVALID_TYPE"}


def test_junk_distinct_ids_are_not_filtered_here() -> None:
    event = _one({"event": "x", "distinct_id": "undefined", "properties": {"$lib": "posthog-go"}})
    assert event.identifiers == [("user_id", "undefined")]


# --- Payload-level problems ---------------------------------------------------------------------


@pytest.mark.parametrize("body", ["{not json", '{"event": "x", "distinct_id": "u", "properties": {"v": NaN}}', ""])
def test_invalid_json(body: str) -> None:
    parsed = _parse(body)
    assert parsed.messages == []
    assert [(v.field, v.reason) for v in parsed.violations] == [("", "INVALID_JSON")]


def test_batch_shapes() -> None:
    assert [(v.field, v.reason) for v in _parse({"batch": {}}).violations] == [("batch", "INVALID_TYPE")]
    assert [(v.field, v.reason) for v in _parse({"batch": []}).violations] == [("batch", "EMPTY_BATCH")]
    assert [(v.field, v.reason) for v in _parse("42").violations] == [("", "INVALID_TYPE")]
    parsed = _parse({"batch": [_python_event("x", "u1"), "oops"]})
    assert parsed.violations == []
    assert [(v.field, v.reason) for v in parsed.messages[1].violations] == [("", "INVALID_TYPE")]


# --- Shared helpers and dispatcher ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00.123456789Z", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2024-05-01T12:00:00.5", datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)),
        ("2024-05-01 07:00:00-05:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
    ],
)
def test_parse_timestamp_accepts_iso_8601(text: str, expected: datetime) -> None:
    violations: list[FieldViolation] = []
    parsed = parse_timestamp(text, "timestamp", violations)
    assert parsed == expected
    assert parsed is not None and parsed.tzinfo == UTC
    assert violations == []


@pytest.mark.parametrize("value", ["2024-05-01", "1714564800", 1714564800, "2024-13-01T00:00:00Z", "", True])
def test_parse_timestamp_rejects_others(value: Any) -> None:
    violations: list[FieldViolation] = []
    assert parse_timestamp(value, "sentAt", violations) is None
    assert [(v.field, v.reason) for v in violations] == [("sentAt", "INVALID_TIMESTAMP")]


def test_coerce_id() -> None:
    violations: list[FieldViolation] = []
    assert coerce_id("abc", "f", violations) == "abc"
    assert coerce_id(9007199254740993, "f", violations) == "9007199254740993"
    assert coerce_id(None, "f", violations) is None
    assert coerce_id("", "f", violations) is None
    assert violations == []
    assert coerce_id(Decimal("1.0"), "f", violations) is None
    assert coerce_id(False, "f", violations) is None
    assert [v.reason for v in violations] == ["INVALID_TYPE", "INVALID_TYPE"]


def test_click_ids_from_url() -> None:
    url = "https://a.example/p?gbraid=GB&wbraid=&ttclid=TT&fbclid=FB&gclid=G1&gclid=G2#gclid=frag"
    assert click_ids_from_url(url) == {"gclid": "G1", "gbraid": "GB", "ttclid": "TT", "fbclid": "FB"}
    assert click_ids_from_url("http://[::1/broken?gclid=x") == {}


def test_dispatcher() -> None:
    assert frozenset({"posthog", "segment", "rudderstack", "heap"}) == SOURCE_KINDS
    naive = datetime(2024, 5, 1, 12, 0, 0)
    parsed = parse("posthog", '{"event": "x", "distinct_id": "u"}', source="ph-eu", received_at=naive)
    assert parsed.messages[0].source == "ph-eu"
    assert parsed.messages[0].occurred_at == RECEIVED
    offset = datetime(2024, 5, 1, 14, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    assert (
        parse("posthog", '{"event": "x", "distinct_id": "u"}', source="p", received_at=offset).messages[0].occurred_at
        == RECEIVED
    )
    with pytest.raises(ValueError, match="unknown source kind"):
        parse("mixpanel", "{}", source="m", received_at=RECEIVED)
