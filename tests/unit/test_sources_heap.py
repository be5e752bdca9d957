"""Heap server-side API bodies (sources-and-consent §3.1)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from identity.events.incoming import IncomingEvent, ParsedPayload
from identity.events.sources import heap, parse
from stitchgraph.errors import FieldViolation

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
APP_ID = "3218923456"


def _parse(payload: Any) -> ParsedPayload:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return parse("heap", body, source="heap", received_at=RECEIVED)


def _one(payload: Any) -> IncomingEvent:
    parsed = _parse(payload)
    assert parsed.violations == []
    assert len(parsed.messages) == 1
    return parsed.messages[0]


def _reasons(event: IncomingEvent) -> dict[str, str]:
    return {v.field: v.reason for v in event.violations}


# --- Track --------------------------------------------------------------------------------------


def test_track_with_email_identity() -> None:
    event = _one(
        {
            "app_id": APP_ID,
            "identity": "alice@example.com",
            "event": "Send Transactional Email",
            "timestamp": "2024-04-30T09:15:00.250+02:00",
            "session_id": "8392018273",
            "idempotency_key": "email-7731",
            "properties": {"subject": "Welcome to Heap", "variation": "A", "amount": 12.30, "gclid": "Cj0K"},
        }
    )
    assert (event.kind, event.source_event, event.source) == ("track", "Send Transactional Email", "heap")
    assert event.identifiers == [("email", "alice@example.com")]
    assert event.occurred_at == datetime(2024, 4, 30, 7, 15, 0, 250000, tzinfo=UTC)
    assert event.message_id == "email-7731"
    assert event.properties == {
        "subject": "Welcome to Heap",
        "variation": "A",
        "amount": Decimal("12.30"),
        "gclid": "Cj0K",
    }
    assert event.context == {"gclid": "Cj0K"}
    assert event.action_source == ""
    assert event.violations == []


def test_track_with_heap_user_id_defaults_to_received_at() -> None:
    event = _one(
        {"app_id": APP_ID, "user_id": 8731282791128834, "event": "Server Renewal", "properties": {"event_id": "r-1"}}
    )
    assert event.identifiers == [("heap_user_id", "8731282791128834")]
    assert event.occurred_at == RECEIVED
    assert event.event_id == "r-1"
    assert event.properties == {}


def test_track_with_non_email_identity_is_user_id() -> None:
    event = _one({"app_id": APP_ID, "identity": "CUST-00981", "event": "Renewed"})
    assert event.identifiers == [("user_id", "CUST-00981")]


def test_bulk_track() -> None:
    parsed = _parse(
        {
            "app_id": APP_ID,
            "events": [
                {"identity": "alice@example.com", "event": "Plan Upgraded", "timestamp": "2024-04-30T10:00:00Z"},
                {"user_id": "123456789", "event": "Invoice Paid", "properties": {"total": 99, "currency": "EUR"}},
                {"identity": "bob", "user_id": "42", "event": "Both"},
                {"event": "Nobody"},
            ],
        }
    )
    assert parsed.violations == []
    upgraded, paid, both, nobody = parsed.messages
    assert upgraded.identifiers == [("email", "alice@example.com")]
    assert upgraded.occurred_at == datetime(2024, 4, 30, 10, tzinfo=UTC)
    assert paid.identifiers == [("heap_user_id", "123456789")]
    assert paid.properties == {"total": 99, "currency": "EUR"}
    assert _reasons(both) == {"user_id": "MUTUALLY_EXCLUSIVE"}
    assert both.identifiers == [("user_id", "bob"), ("heap_user_id", "42")]
    assert _reasons(nobody) == {"identity": "REQUIRED"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"identity": "a", "event": ""}, {"event": "REQUIRED"}),
        ({"identity": "a", "event": "x" * 1025}, {"event": "TOO_LONG"}),
        ({"identity": "a" * 256, "event": "x"}, {"identity": "TOO_LONG"}),
        ({"identity": "a", "event": "x", "timestamp": 1714564800000}, {"timestamp": "INVALID_TIMESTAMP"}),
        ({"user_id": 1.5, "event": "x"}, {"user_id": "INVALID_TYPE"}),
        ({"identity": "a", "event": "x", "properties": [1]}, {"properties": "INVALID_TYPE"}),
    ],
)
def test_track_violations(body: dict[str, Any], expected: dict[str, str]) -> None:
    assert _reasons(_one({"app_id": APP_ID, **body})) == expected


# --- User properties ----------------------------------------------------------------------------


def test_add_user_properties() -> None:
    event = _one(
        {
            "app_id": APP_ID,
            "identity": "alice@example.com",
            "properties": {
                "email": "alice@example.com",
                "plan": "pro",
                "posthog_cohort_power_users": "true",
                "age": 31,
            },
        }
    )
    assert (event.kind, event.source_event) == ("traits", "add_user_properties")
    assert event.identifiers == [("email", "alice@example.com")]
    assert event.trait_set == {
        "email": "alice@example.com",
        "plan": "pro",
        "posthog_cohort_power_users": "true",
        "age": 31,
    }
    assert event.occurred_at == RECEIVED
    assert event.properties == {}
    assert event.violations == []


def test_bulk_add_user_properties() -> None:
    parsed = _parse(
        {
            "app_id": APP_ID,
            "users": [
                {"identity": "CUST-1", "properties": {"tier": "gold"}},
                {"identity": "bob@example.org", "properties": {"tier": "silver", "ltv": 10.5}},
                {"properties": {"tier": "none"}},
                {"identity": "CUST-3"},
            ],
        }
    )
    assert parsed.violations == []
    gold, silver, anonymous, bare = parsed.messages
    assert (gold.identifiers, gold.trait_set) == ([("user_id", "CUST-1")], {"tier": "gold"})
    assert silver.identifiers == [("email", "bob@example.org")]
    assert silver.trait_set == {"tier": "silver", "ltv": Decimal("10.5")}
    assert _reasons(anonymous) == {"identity": "REQUIRED"}
    assert _reasons(bare) == {"properties": "REQUIRED"}


def test_explicit_endpoint_overrides_detection() -> None:
    body = json.dumps({"app_id": APP_ID, "identity": "CUST-1", "properties": {"a": "b"}})
    parsed = heap.parse(body, source="heap", received_at=RECEIVED, endpoint="track")
    assert parsed.messages[0].kind == "track"
    assert _reasons(parsed.messages[0]) == {"event": "REQUIRED"}


# --- Payload-level problems ---------------------------------------------------------------------


def test_app_id_is_required() -> None:
    parsed = _parse({"identity": "a", "event": "x"})
    assert parsed.messages == []
    assert parsed.violations == [FieldViolation("app_id", "app_id is required", "REQUIRED")]


def test_numeric_app_id_is_accepted() -> None:
    assert _one({"app_id": 3218923456, "identity": "a", "event": "x"}).identifiers == [("user_id", "a")]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[]", ("", "INVALID_TYPE")),
        ("{", ("", "INVALID_JSON")),
        (json.dumps({"app_id": APP_ID, "events": []}), ("events", "EMPTY_BATCH")),
        (json.dumps({"app_id": APP_ID, "users": {"identity": "a"}}), ("users", "INVALID_TYPE")),
        (json.dumps({"app_id": True, "identity": "a", "event": "x"}), ("app_id", "INVALID_TYPE")),
    ],
)
def test_payload_violations(body: str, expected: tuple[str, str]) -> None:
    parsed = _parse(body)
    assert parsed.messages == []
    assert [(v.field, v.reason) for v in parsed.violations] == [expected]
