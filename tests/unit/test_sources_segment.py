"""Segment and RudderStack message parsing (sources-and-consent §4)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from identity.events.incoming import IncomingEvent, ParsedPayload
from identity.events.sources import parse

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
ANON = "5a1c1f7e-3b2d-4c8e-9f10-1a2b3c4d5e6f"
UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
PAGE_URL = "https://shop.example/checkout?gclid=EAIaIQobChMI&fbclid=IwAR0abc"


def _parse(payload: Any, *, kind: str = "segment") -> ParsedPayload:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return parse(kind, body, source=kind, received_at=RECEIVED)


def _one(payload: Any, *, kind: str = "segment") -> IncomingEvent:
    parsed = _parse(payload, kind=kind)
    assert parsed.violations == []
    assert len(parsed.messages) == 1
    return parsed.messages[0]


def _reasons(event: IncomingEvent) -> dict[str, str]:
    return {v.field: v.reason for v in event.violations}


def _browser_context(**extra: Any) -> dict[str, Any]:
    """The context analytics.js (analytics-next) attaches."""
    context: dict[str, Any] = {
        "library": {"name": "analytics.js", "version": "npm:next-1.70.0"},
        "page": {
            "path": "/checkout",
            "referrer": "https://www.google.com/",
            "search": "?gclid=EAIaIQobChMI&fbclid=IwAR0abc",
            "title": "Checkout",
            "url": PAGE_URL,
        },
        "userAgent": UA,
        "locale": "en-GB",
        "ip": "198.51.100.23",
    }
    context.update(extra)
    return context


# --- analytics.js -------------------------------------------------------------------------------


def test_analytics_js_track_with_consent_and_context_traits() -> None:
    event = _one(
        {
            "type": "track",
            "event": "Order Completed",
            "userId": "user_42",
            "anonymousId": ANON,
            "messageId": "ajs-next-1714564790000-7c1f",
            "properties": {
                "order_id": "1001",
                "total": 27.5,
                "revenue": 25.0,
                "currency": "USD",
                "products": [{"product_id": "507f1f77", "price": 18.99, "quantity": 1}],
                "event_id": "evt-1001",
            },
            "context": _browser_context(
                traits={"email": "Ada@Example.com", "phone": "+44 20 7946 0958", "plan": "pro"},
                consent={"categoryPreferences": {"Advertising": True, "Analytics": False}},
            ),
            "originalTimestamp": "2024-05-01T11:59:50.000Z",
            "sentAt": "2024-05-01T11:59:55.000Z",
            "timestamp": "2024-05-01T11:59:52.000Z",
        }
    )
    assert (event.kind, event.source_event, event.source) == ("track", "Order Completed", "segment")
    assert event.identifiers == [
        ("user_id", "user_42"),
        ("anonymous_id", ANON),
        ("email", "Ada@Example.com"),
        ("phone", "+44 20 7946 0958"),
    ]
    assert event.trait_set == {}
    assert event.occurred_at == datetime(2024, 5, 1, 11, 59, 52, tzinfo=UTC)  # timestamp wins
    assert event.message_id == "ajs-next-1714564790000-7c1f"
    assert event.event_id == "evt-1001"
    assert event.properties == {
        "order_id": "1001",
        "total": Decimal("27.5"),
        "revenue": Decimal("25.0"),
        "currency": "USD",
        "products": [{"product_id": "507f1f77", "price": Decimal("18.99"), "quantity": 1}],
    }
    assert event.context == {
        "ip": "198.51.100.23",
        "user_agent": UA,
        "locale": "en-GB",
        "page_url": PAGE_URL,
        "referrer": "https://www.google.com/",
        "gclid": "EAIaIQobChMI",
        "fbc": "fb.1.1714564792000.IwAR0abc",
    }
    assert event.consent == {"segment": {"category_preferences": {"Advertising": True, "Analytics": False}}}
    assert event.metadata == {
        "sent_at": datetime(2024, 5, 1, 11, 59, 55, tzinfo=UTC),
        "library": "analytics.js/npm:next-1.70.0",
    }
    assert event.action_source == "WEBSITE"
    assert event.violations == []


def test_identify_traits_stay_traits() -> None:
    event = _one(
        {
            "type": "identify",
            "userId": "user_42",
            "anonymousId": ANON,
            "traits": {"email": "ada@example.com", "name": "Ada Lovelace", "plan": "pro", "ltv": 1200.50},
            "context": _browser_context(traits={"email": "ada@example.com"}),
            "messageId": "m-identify-1",
            "timestamp": "2024-05-01T11:00:00Z",
        }
    )
    assert (event.kind, event.source_event) == ("identify", "identify")
    assert event.identifiers == [("user_id", "user_42"), ("anonymous_id", ANON)]
    assert event.trait_set == {
        "email": "ada@example.com",
        "name": "Ada Lovelace",
        "plan": "pro",
        "ltv": Decimal("1200.50"),
    }
    assert event.identified == frozenset()
    assert event.inferred_anonymous == frozenset()


def test_alias_previous_anonymous_id() -> None:
    event = _one({"type": "alias", "previousId": ANON, "anonymousId": ANON, "userId": "user_42", "messageId": "m-a"})
    assert (event.kind, event.source_event) == ("alias", "alias")
    assert event.identifiers == [("user_id", "user_42"), ("anonymous_id", ANON)]
    assert event.violations == []


def test_alias_previous_user_id_plus_anonymous_id() -> None:
    event = _one({"type": "alias", "previousId": "old-user-9", "anonymousId": ANON, "userId": "user_42"})
    assert event.identifiers == [("user_id", "user_42"), ("user_id", "old-user-9"), ("anonymous_id", ANON)]


def test_alias_without_anonymous_id_types_previous_as_user() -> None:
    event = _one({"type": "alias", "previousId": "old@example.com", "userId": "user_42"})
    assert event.identifiers == [("user_id", "user_42"), ("user_id", "old@example.com")]


def test_alias_requires_both_ids() -> None:
    event = _one({"type": "alias", "anonymousId": ANON})
    assert _reasons(event) == {"previousId": "REQUIRED", "userId": "REQUIRED"}
    assert event.identifiers == [("anonymous_id", ANON)]


def test_page_message() -> None:
    event = _one(
        {
            "type": "page",
            "name": "Pricing",
            "category": "Docs",
            "anonymousId": ANON,
            "properties": {
                "path": "/pricing",
                "url": "https://shop.example/pricing?wbraid=WB1&ttclid=TT1",
                "referrer": "https://news.example/",
                "title": "Pricing",
            },
            "context": {"library": {"name": "analytics.js", "version": "4.1.0"}, "userAgent": UA},
            "originalTimestamp": "2024-05-01T11:59:00Z",
        }
    )
    assert (event.kind, event.source_event) == ("page", "page")
    assert event.properties["name"] == "Pricing"
    assert event.properties["category"] == "Docs"
    assert event.context == {
        "user_agent": UA,
        "page_url": "https://shop.example/pricing?wbraid=WB1&ttclid=TT1",
        "referrer": "https://news.example/",
        "wbraid": "WB1",
        "ttclid": "TT1",
    }
    assert event.occurred_at == datetime(2024, 5, 1, 11, 59, tzinfo=UTC)  # no sentAt: as sent


def test_page_name_in_properties_wins() -> None:
    event = _one({"type": "page", "name": "Top", "anonymousId": ANON, "properties": {"name": "Inner"}})
    assert event.properties == {"name": "Inner"}


def test_mobile_screen_is_app() -> None:
    event = _one(
        {
            "type": "screen",
            "name": "Cart",
            "userId": "user_42",
            "context": {
                "app": {"name": "Shop", "version": "5.2.1", "build": "521"},
                "device": {"type": "ios", "id": "B0A0F0C0"},
                "library": {"name": "analytics-swift", "version": "1.5.0"},
                "traits": {"email": "ada@example.com"},
            },
        }
    )
    assert (event.kind, event.source_event, event.action_source) == ("screen", "screen", "APP")
    assert event.properties == {"name": "Cart"}
    assert event.identifiers == [("user_id", "user_42"), ("email", "ada@example.com")]
    assert event.metadata == {"library": "analytics-swift/1.5.0"}


def test_batch_body_merges_context_and_corrects_skew() -> None:
    body = {
        "batch": [
            {
                "type": "track",
                "event": "Signed Up",
                "userId": "user_1",
                "originalTimestamp": "2024-05-01T09:00:00Z",
                "context": {"library": {"version": "3.4.0"}, "ip": "192.0.2.1"},
                "messageId": "m1",
            },
            {"type": "identify", "userId": "user_1", "traits": {"plan": "free"}, "messageId": "m2"},
        ],
        "sentAt": "2024-05-01T09:00:30Z",
        "context": {"library": {"name": "analytics-node", "version": "2.0.0"}, "ip": "192.0.2.99"},
    }
    parsed = _parse(body)
    assert parsed.violations == []
    signed_up, identify = parsed.messages
    # client clock 3 hours behind; the event happened 30 s before sending
    assert signed_up.occurred_at == RECEIVED - timedelta(seconds=30)
    assert signed_up.metadata == {
        "sent_at": datetime(2024, 5, 1, 9, 0, 30, tzinfo=UTC),
        "library": "analytics-node/3.4.0",
    }
    assert signed_up.context == {"ip": "192.0.2.1"}
    assert signed_up.action_source == ""
    assert identify.context == {"ip": "192.0.2.99"}
    assert identify.occurred_at == RECEIVED  # no timestamps at all: received_at, never sentAt
    assert identify.trait_set == {"plan": "free"}


# --- RudderStack --------------------------------------------------------------------------------


def _rudder_message(**extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "track",
        "event": "Product Added",
        "anonymousId": ANON,
        "channel": "web",
        "messageId": "6d3a4b2c-1e0f-4a9b-8c7d-5e6f7a8b9c0d",
        "properties": {"product_id": "P-12", "price": 9.95},
        "context": {
            "library": {"name": "RudderLabs JavaScript SDK", "version": "3.7.5"},
            "userAgent": UA,
            "page": {"url": "https://shop.example/p/12?ttclid=E.C.P.abc"},
            "consentManagement": {
                "provider": "oneTrust",
                "allowedConsentIds": ["C0001", "C0002"],
                "deniedConsentIds": ["C0004"],
                "resolutionStrategy": "and",
            },
            "consent": {"categoryPreferences": {}},
        },
        "originalTimestamp": "2024-05-01T11:59:40.000Z",
        "sentAt": "2024-05-01T11:59:45.000Z",
        "receivedAt": "2024-05-01T11:59:59.000Z",
    }
    message.update(extra)
    return message


def test_rudderstack_webhook_message() -> None:
    event = _one(_rudder_message(), kind="rudderstack")
    assert event.source == "rudderstack"
    assert event.identifiers == [("anonymous_id", ANON)]
    assert event.occurred_at == RECEIVED - timedelta(seconds=5)
    assert event.action_source == "WEBSITE"
    assert event.context == {
        "user_agent": UA,
        "page_url": "https://shop.example/p/12?ttclid=E.C.P.abc",
        "ttclid": "E.C.P.abc",
    }
    assert event.consent == {
        "rudderstack": {
            "provider": "oneTrust",
            "allowed_consent_ids": ["C0001", "C0002"],
            "denied_consent_ids": ["C0004"],
            "resolution_strategy": "and",
        },
        # present but empty: consent false for every category, so it is kept
        "segment": {"category_preferences": {}},
    }
    assert event.metadata["library"] == "RudderLabs JavaScript SDK/3.7.5"
    assert event.properties == {"product_id": "P-12", "price": Decimal("9.95")}


def test_rudderstack_mobile_channel_and_server_channel() -> None:
    assert _one(_rudder_message(channel="mobile"), kind="rudderstack").action_source == "APP"
    assert _one(_rudder_message(channel="server"), kind="rudderstack").action_source == ""


def test_consent_without_category_preferences_is_nothing() -> None:
    event = _one(_rudder_message(context={"consent": {"ketch": "x"}}), kind="rudderstack")
    assert event.consent == {}


def test_consent_shapes_are_checked() -> None:
    event = _one(
        _rudder_message(
            context={
                "consent": {"categoryPreferences": {"Ads": "yes", "Analytics": True}},
                "consentManagement": {"deniedConsentIds": "C0004"},
            }
        )
    )
    assert _reasons(event) == {
        "context.consent.categoryPreferences.Ads": "INVALID_TYPE",
        "context.consentManagement.deniedConsentIds": "INVALID_TYPE",
    }
    assert event.consent["segment"] == {"category_preferences": {"Analytics": True}}


def test_time_falls_back_to_received_at_field() -> None:
    event = _one(_rudder_message(originalTimestamp=None, sentAt=None))
    assert event.occurred_at == datetime(2024, 5, 1, 11, 59, 59, tzinfo=UTC)
    assert "sent_at" not in event.metadata


def test_sent_at_alone_is_never_the_event_time() -> None:
    event = _one(_rudder_message(originalTimestamp=None, receivedAt=None))
    assert event.occurred_at == RECEIVED


# --- Validation ---------------------------------------------------------------------------------


def test_type_is_case_insensitive() -> None:
    assert _one({"type": "TRACK", "event": "X", "userId": "u"}).kind == "track"


def test_group_is_unsupported() -> None:
    event = _one({"type": "group", "groupId": "acme", "userId": "u", "traits": {"name": "Acme"}})
    assert _reasons(event) == {"type": "UNSUPPORTED_MESSAGE_TYPE"}
    assert (event.kind, event.source_event) == ("track", "group")
    assert event.trait_set == {}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"event": "X", "userId": "u"}, {"type": "REQUIRED"}),
        ({"type": "track", "userId": "u"}, {"event": "REQUIRED"}),
        ({"type": "track", "event": "X"}, {"userId": "REQUIRED"}),
        ({"type": "track", "event": "X", "userId": 4.5}, {"userId": "INVALID_TYPE"}),
        ({"type": "track", "event": "X", "userId": "u", "timestamp": "01/05/2024"}, {"timestamp": "INVALID_TIMESTAMP"}),
        ({"type": "identify", "userId": "u", "traits": ["a"]}, {"traits": "INVALID_TYPE"}),
        ({"type": "track", "event": "X", "userId": "u", "properties": "p"}, {"properties": "INVALID_TYPE"}),
    ],
)
def test_message_violations(message: dict[str, Any], expected: dict[str, str]) -> None:
    assert _reasons(_one(message)) == expected


def test_integer_user_id_is_a_string() -> None:
    assert _one({"type": "track", "event": "X", "userId": 1234}).identifiers == [("user_id", "1234")]


def test_payload_level_problems() -> None:
    assert [(v.field, v.reason) for v in _parse("[1,").violations] == [("", "INVALID_JSON")]
    assert [(v.field, v.reason) for v in _parse({"batch": "x"}).violations] == [("batch", "INVALID_TYPE")]
    assert [(v.field, v.reason) for v in _parse({"batch": [], "sentAt": "x"}).violations] == [("batch", "EMPTY_BATCH")]
    bad_envelope = _parse({"batch": [{"type": "track"}], "sentAt": "x", "context": 3})
    assert bad_envelope.messages == []
    assert [(v.field, v.reason) for v in bad_envelope.violations] == [
        ("sentAt", "INVALID_TIMESTAMP"),
        ("context", "INVALID_TYPE"),
    ]


def test_bare_array() -> None:
    parsed = _parse([{"type": "track", "event": "A", "userId": "u"}, {"type": "page", "anonymousId": ANON}])
    assert [(m.kind, m.source_event) for m in parsed.messages] == [("track", "A"), ("page", "page")]


def test_descriptions_never_quote_values() -> None:
    event = _one({"type": "track", "event": "X", "userId": "u", "timestamp": "ada@example.com"})
    assert all("ada@example.com" not in v.description for v in event.violations)
