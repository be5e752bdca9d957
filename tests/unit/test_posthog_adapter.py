"""The PostHog trait write-back adapter against the PostHog sandbox: what PostHog would have
ingested as person properties, and how its answers are classified
(specs/sources-and-consent.md §1)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from audiences.destinations import KINDS
from audiences.destinations.base import (
    PERMANENT,
    RETRYABLE,
    SUCCEEDED,
    THROTTLED,
    AudienceChange,
    BatchResult,
    Conversion,
    DestinationContext,
    PersonKeys,
    TraitUpdate,
)
from audiences.destinations.posthog import PostHogTraitsAdapter, distinct_id_problem, event_uuid
from audiences.destinations.registry import adapter_for
from tests.sandboxes.base import running
from tests.sandboxes.posthog import PostHogSandbox

TOKEN = "phc_sandboxProjectToken123"
ADAPTER = PostHogTraitsAdapter()
#: 2026-03-01T12:30:45.123456Z
OCCURRED_US = 1_772_368_245_123_456


@pytest.fixture(scope="module")
def served() -> Iterator[PostHogSandbox]:
    posthog = PostHogSandbox(project_token=TOKEN)
    with running(posthog):
        yield posthog


@pytest.fixture
def sandbox(served: PostHogSandbox) -> PostHogSandbox:
    served.reset()
    served.max_body_bytes = 20 * 1024 * 1024
    return served


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as http:
        yield http


def project(sandbox: PostHogSandbox, credentials: dict[str, str] | None = None, **settings: Any) -> DestinationContext:
    return DestinationContext("posthog-eu", "POSTHOG_TRAITS", {"host": sandbox.url, **settings},
                              credentials if credentials is not None else {"token": TOKEN}, timeout_seconds=5.0)


def update(delivery_id: int = 1, identity: str = "user-1", values: dict[str, Any] | None = None,
           unset: tuple[str, ...] = (), occurred_us: int = OCCURRED_US) -> TraitUpdate:
    return TraitUpdate(delivery_id, identity, {"lifetime_value": 129.9} if values is None else values, unset,
                       occurred_us)


def classifications(result: BatchResult) -> dict[int, tuple[str, str]]:
    return {d: (o.classification, o.status_reason) for d, o in result.outcomes.items()}


def assert_token_hidden(result: BatchResult, token: str = TOKEN) -> None:
    for text in (result.response_excerpt, *(o.error for o in result.outcomes.values())):
        assert token not in text, text


# -- catalogue ------------------------------------------------------------------------------------

def test_the_registry_serves_the_adapter_with_the_catalogue_batch_limit() -> None:
    adapter = adapter_for("POSTHOG_TRAITS")

    assert isinstance(adapter, PostHogTraitsAdapter)
    assert adapter.kind == "POSTHOG_TRAITS"
    assert adapter.batch_limit == KINDS["POSTHOG_TRAITS"].batch_limit == 1000


def test_conversions_and_audiences_are_not_this_kind() -> None:
    with httpx.Client() as http:
        destination = DestinationContext("d", "POSTHOG_TRAITS", {"host": "http://127.0.0.1:9"}, {"token": TOKEN})
        conversions = ADAPTER.send_conversions(http, destination, [Conversion(7, "e", "purchase", 0, PersonKeys())])
        audience = ADAPTER.send_audience(http, destination, "add", [AudienceChange(8, PersonKeys())])

    assert classifications(conversions) == {7: (PERMANENT, "NOT_SUPPORTED")}
    assert classifications(audience) == {8: (PERMANENT, "NOT_SUPPORTED")}
    assert conversions.requests == audience.requests == 0
    assert ADAPTER.platform_event("purchase", {}) is None
    assert ADAPTER.max_age_seconds({}, "website") is None


@pytest.mark.parametrize("kind", sorted(k for k, spec in KINDS.items() if not spec.traits))
def test_every_other_adapter_refuses_traits_without_a_request(kind: str) -> None:
    with httpx.Client() as http:
        result = adapter_for(kind).send_traits(http, DestinationContext("d", kind, {}, {"token": "t"}),
                                               [update(3), update(4)])

    assert classifications(result) == {3: (PERMANENT, "NOT_SUPPORTED"), 4: (PERMANENT, "NOT_SUPPORTED")}
    assert result.requests == 0


# -- what PostHog ingests --------------------------------------------------------------------------

def test_traits_become_person_properties_through_a_set_event(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    values = {"lifetime_value": 129.9, "purchases": 3, "vip": True, "tier": "gold"}

    result = ADAPTER.send_traits(client, project(sandbox), [update(values=values)])

    assert classifications(result) == {1: (SUCCEEDED, "")}
    assert (result.http_status, result.requests) == (200, 1)
    assert sandbox.person_properties("user-1") == values
    assert sandbox.set_calls("user-1") == 1


def test_the_event_carries_set_inside_properties_with_the_server_side_flags(sandbox: PostHogSandbox,
                                                                            client: httpx.Client) -> None:
    ADAPTER.send_traits(client, project(sandbox), [update(values={"tier": "gold"})])

    [event] = sandbox.events()
    assert event["event"] == "$set"
    assert event["distinct_id"] == "user-1"
    assert event["timestamp"] == "2026-03-01T12:30:45.123Z"
    assert event["uuid"] == event_uuid("posthog-eu", 1)
    assert event["properties"] == {"$set": {"tier": "gold"}, "$geoip_disable": True, "$lib": "stitchgraph"}


def test_the_token_travels_once_per_batch_with_sent_at(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    ADAPTER.send_traits(client, project(sandbox), [update(1, "a"), update(2, "b")])

    [batch] = sandbox.batches
    assert batch["api_key"] == TOKEN
    assert datetime.fromisoformat(batch["sent_at"]).tzinfo == UTC
    assert "historical_migration" not in batch
    assert [e["distinct_id"] for e in sandbox.events()] == ["a", "b"]


def test_historical_migration_is_a_batch_level_field(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    ADAPTER.send_traits(client, project(sandbox, historical_migration=True), [update()])

    assert sandbox.batches[0]["historical_migration"] is True


def test_unset_keys_and_none_values_are_removed_from_the_person(sandbox: PostHogSandbox,
                                                                 client: httpx.Client) -> None:
    ADAPTER.send_traits(client, project(sandbox), [update(1, values={"a": 1, "b": 2, "c": 3})])

    ADAPTER.send_traits(client, project(sandbox), [update(2, values={"a": 10, "b": None}, unset=("c",))])

    assert sandbox.person_properties("user-1") == {"a": 10}
    assert sandbox.events()[1]["properties"]["$unset"] == ["b", "c"]


def test_a_key_both_set_and_unset_is_set(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    ADAPTER.send_traits(client, project(sandbox), [update(values={"tier": "gold"}, unset=("tier",))])

    assert sandbox.person_properties("user-1") == {"tier": "gold"}
    assert "$unset" not in sandbox.events()[0]["properties"]


def test_a_trailing_slash_on_the_host_is_ignored(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    result = ADAPTER.send_traits(client, project(sandbox, host=sandbox.url + "/"), [update()])

    assert result.outcomes[1].classification == SUCCEEDED
    assert sandbox.requests == [("POST", "/batch/", 200)]


def test_a_resent_batch_carries_the_same_event_ids_and_changes_nothing_twice(sandbox: PostHogSandbox,
                                                                             client: httpx.Client) -> None:
    first = ADAPTER.send_traits(client, project(sandbox), [update(1, "a"), update(2, "b")])
    again = ADAPTER.send_traits(client, project(sandbox), [update(1, "a"), update(2, "b")])

    assert classifications(first) == classifications(again) == {1: (SUCCEEDED, ""), 2: (SUCCEEDED, "")}
    assert (len(sandbox.events()), sandbox.duplicate_count) == (2, 2)
    assert sandbox.set_calls("a") == sandbox.set_calls("b") == 1


def test_event_ids_differ_per_destination_and_delivery() -> None:
    ids = {event_uuid("posthog-eu", 1), event_uuid("posthog-eu", 2), event_uuid("posthog-us", 1)}

    assert len(ids) == 3
    assert all(uuid.UUID(i).version == 5 for i in ids)


def test_a_record_with_nothing_to_write_is_not_sent(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    result = ADAPTER.send_traits(client, project(sandbox), [update(values={})])

    assert classifications(result) == {1: (SUCCEEDED, "NOTHING_TO_SEND")}
    assert result.requests == 0
    assert sandbox.requests == []


def test_a_value_without_a_json_form_is_refused_alone(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    result = ADAPTER.send_traits(client, project(sandbox), [update(1, "a", {"score": float("nan")}),
                                                            update(2, "b", {"tags": ["x", "y"]})])

    assert classifications(result) == {1: (PERMANENT, "INVALID_PROPERTY"), 2: (SUCCEEDED, "")}
    assert sandbox.person_properties("b") == {"tags": ["x", "y"]}


# -- pre-validation of distinct IDs ------------------------------------------------------------

@pytest.mark.parametrize("distinct_id", ["", "   ", "anonymous", "Guest", "DISTINCT_ID", "undefined", "true",
                                         "null", "None", "0", "NaN", "[object Object]", '"null"', "'undefined'",
                                         "x" * 201])
def test_ids_posthog_would_lose_or_merge_are_refused_before_sending(sandbox: PostHogSandbox,
                                                                    client: httpx.Client, distinct_id: str) -> None:
    result = ADAPTER.send_traits(client, project(sandbox), [update(1, distinct_id), update(2, "user-2")])

    assert classifications(result) == {1: (PERMANENT, "INVALID_DISTINCT_ID"), 2: (SUCCEEDED, "")}
    assert [e["distinct_id"] for e in sandbox.events()] == ["user-2"]


@pytest.mark.parametrize("distinct_id", ["user-1", "NULL", "Nan", "00", "x" * 200, "0190a1b2-user"])
def test_ordinary_ids_pass(distinct_id: str) -> None:
    # PostHog compares "null", "NaN" and "0" exactly: other spellings are ordinary IDs to it.
    assert distinct_id_problem(distinct_id) is None


def test_only_invalid_records_means_no_request(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    result = ADAPTER.send_traits(client, project(sandbox), [update(1, "null"), update(2, "")])

    assert result.requests == 0
    assert sandbox.requests == []


def test_a_thousand_records_go_in_one_request_and_more_is_a_caller_error(sandbox: PostHogSandbox,
                                                                         client: httpx.Client) -> None:
    records = [update(i, f"user-{i}", {"n": i}) for i in range(1, 1001)]

    result = ADAPTER.send_traits(client, project(sandbox), records)
    with pytest.raises(ValueError, match="at most 1000"):
        ADAPTER.send_traits(client, project(sandbox), [*records, update(1001, "user-1001")])

    assert set(classifications(result).values()) == {(SUCCEEDED, "")}
    assert result.requests == 1
    assert len(sandbox.events()) == 1000
    assert len(sandbox.requests) == 1


# -- credentials and settings -------------------------------------------------------------------

def test_a_wrong_project_token_is_permanent_and_never_shown(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    wrong = "phc_someOtherProjectToken"

    result = ADAPTER.send_traits(client, project(sandbox, {"token": wrong}), [update()])

    assert classifications(result) == {1: (PERMANENT, "INVALID_TOKEN")}
    assert result.http_status == 401
    assert sandbox.events() == []
    assert_token_hidden(result, wrong)


def test_a_personal_api_key_is_never_sent_to_capture(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    result = ADAPTER.send_traits(client, project(sandbox, {"token": "phx_personalSecretKey"}), [update()])

    assert classifications(result) == {1: (PERMANENT, "INVALID_TOKEN")}
    assert "phx_personalSecretKey" not in result.outcomes[1].error
    assert sandbox.requests == []


@pytest.mark.parametrize(("credentials", "settings", "reason"), [
    ({}, {}, "INVALID_TOKEN"),
    ({"token": TOKEN}, {"host": ""}, "MISSING_SETTING"),
])
def test_missing_credentials_or_host_send_nothing(sandbox: PostHogSandbox, client: httpx.Client,
                                                  credentials: dict[str, str], settings: dict[str, Any],
                                                  reason: str) -> None:
    result = ADAPTER.send_traits(client, project(sandbox, credentials, **settings), [update()])

    assert (result.requests, classifications(result)) == (0, {1: (PERMANENT, reason)})
    assert sandbox.requests == []


def test_the_token_is_redacted_from_an_answer_that_echoes_it(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    sandbox.inject_reply(400, {"type": "validation_error", "code": "invalid_payload",
                               "detail": f"bad batch for api_key {TOKEN}", "attr": None})

    result = ADAPTER.send_traits(client, project(sandbox), [update()])

    assert classifications(result) == {1: (PERMANENT, "INVALID_REQUEST")}
    assert "bad batch for api_key" in result.outcomes[1].error
    assert "[redacted]" in result.response_excerpt
    assert_token_hidden(result)


# -- answers ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "classification", "reason"), [
    (400, PERMANENT, "INVALID_REQUEST"),
    (401, PERMANENT, "INVALID_TOKEN"),
    (403, PERMANENT, "INVALID_REQUEST"),
    (413, PERMANENT, "PAYLOAD_TOO_LARGE"),
    (408, RETRYABLE, "SERVER_ERROR"),
    (500, RETRYABLE, "SERVER_ERROR"),
    (503, RETRYABLE, "SERVER_ERROR"),
])
def test_http_statuses_are_classified_for_the_whole_batch(sandbox: PostHogSandbox, client: httpx.Client,
                                                          status: int, classification: str, reason: str) -> None:
    sandbox.fail(1, status=status)

    result = ADAPTER.send_traits(client, project(sandbox), [update(1, "a"), update(2, "b")])

    assert classifications(result) == {1: (classification, reason), 2: (classification, reason)}
    assert result.outcomes[1].platform_error_code == str(status)
    assert sandbox.events() == []


def test_a_body_over_the_size_limit_is_payload_too_large(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    sandbox.max_body_bytes = 2000

    result = ADAPTER.send_traits(client, project(sandbox), [update(values={"notes": "x" * 3000})])

    assert classifications(result) == {1: (PERMANENT, "PAYLOAD_TOO_LARGE")}
    assert result.http_status == 413


def test_http_429_is_throttled_with_retry_after(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    sandbox.throttle(1, retry_after=7)

    result = ADAPTER.send_traits(client, project(sandbox), [update()])

    assert classifications(result) == {1: (THROTTLED, "RATE_LIMITED")}
    assert result.retry_after_seconds == 7
    assert sandbox.events() == []


def test_a_connection_failure_is_retryable(client: httpx.Client) -> None:
    gone = PostHogSandbox(project_token=TOKEN)
    with running(gone):
        url = gone.url

    result = ADAPTER.send_traits(client, DestinationContext("d", "POSTHOG_TRAITS", {"host": url}, {"token": TOKEN}),
                                 [update()])

    assert classifications(result) == {1: (RETRYABLE, "TRANSPORT_ERROR")}
    assert result.http_status == 0
    assert_token_hidden(result)


def test_a_timeout_is_retryable_and_the_resend_is_recognised(sandbox: PostHogSandbox, client: httpx.Client) -> None:
    sandbox.stall(1, seconds=0.6)
    slow = DestinationContext("posthog-eu", "POSTHOG_TRAITS", {"host": sandbox.url}, {"token": TOKEN},
                              timeout_seconds=0.2)

    timed_out = ADAPTER.send_traits(client, slow, [update()])
    wait_until(lambda: bool(sandbox.events()))  # PostHog still ingests the request the client gave up on
    resent = ADAPTER.send_traits(client, project(sandbox), [update()])

    assert classifications(timed_out) == {1: (RETRYABLE, "TRANSPORT_ERROR")}
    assert classifications(resent) == {1: (SUCCEEDED, "")}
    assert (sandbox.set_calls("user-1"), sandbox.duplicate_count) == (1, 1)


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)
