"""The Heap trait write-back adapter against the Heap sandbox: what Heap would have stored as
user properties, and how its answers are classified (specs/sources-and-consent.md §3.1)."""

from __future__ import annotations

from collections.abc import Iterator
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
from audiences.destinations.heap import EU_HOST, US_HOST, HeapTraitsAdapter, heap_value, identity_problem
from audiences.destinations.registry import adapter_for
from tests.sandboxes.base import running
from tests.sandboxes.heap import HeapSandbox

APP_ID = "2084764307"
ADAPTER = HeapTraitsAdapter()


@pytest.fixture(scope="module")
def served() -> Iterator[HeapSandbox]:
    heap = HeapSandbox(app_ids={APP_ID})
    with running(heap):
        yield heap


@pytest.fixture
def sandbox(served: HeapSandbox) -> HeapSandbox:
    served.reset()
    return served


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as http:
        yield http


def environment(sandbox: HeapSandbox, credentials: dict[str, str] | None = None,
                **settings: Any) -> DestinationContext:
    return DestinationContext("heap-prod", "HEAP_TRAITS", {"host": sandbox.url, **settings},
                              credentials if credentials is not None else {"token": APP_ID}, timeout_seconds=5.0)


def update(delivery_id: int = 1, identity: str = "user-1", values: dict[str, Any] | None = None,
           unset: tuple[str, ...] = ()) -> TraitUpdate:
    return TraitUpdate(delivery_id, identity, {"lifetime_value": 129.9} if values is None else values, unset)


def classifications(result: BatchResult) -> dict[int, tuple[str, str]]:
    return {d: (o.classification, o.status_reason) for d, o in result.outcomes.items()}


# -- catalogue ------------------------------------------------------------------------------------

def test_the_registry_serves_the_adapter_with_the_catalogue_batch_limit() -> None:
    adapter = adapter_for("HEAP_TRAITS")

    assert isinstance(adapter, HeapTraitsAdapter)
    assert adapter.batch_limit == KINDS["HEAP_TRAITS"].batch_limit == 1000


def test_conversions_and_audiences_are_not_this_kind() -> None:
    with httpx.Client() as http:
        destination = DestinationContext("d", "HEAP_TRAITS", {}, {"token": APP_ID})
        conversions = ADAPTER.send_conversions(http, destination, [Conversion(7, "e", "purchase", 0, PersonKeys())])
        audience = ADAPTER.send_audience(http, destination, "remove", [AudienceChange(8, PersonKeys())])

    assert classifications(conversions) == {7: (PERMANENT, "NOT_SUPPORTED")}
    assert classifications(audience) == {8: (PERMANENT, "NOT_SUPPORTED")}
    assert conversions.requests == audience.requests == 0


# -- values -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("gold", "gold"),
    (3, 3),
    (129.9, 129.9),
    (True, "true"),
    (False, "false"),
    (None, ""),
    (["a", "b", 3], "a||b||3"),
    ("x" * 2000, "x" * 1023),
    (["y" * 600, "z" * 600], ("y" * 600 + "||" + "z" * 600)[:1023]),
    ({"nested": 1}, None),
    (float("inf"), None),
])
def test_values_become_what_heap_can_store(value: Any, expected: Any) -> None:
    assert heap_value(value) == expected


@pytest.mark.parametrize(("identity", "refused"), [
    ("user-1", False), ("a" * 255, False), ("username", False), ("", True), ("  ", True), ("a" * 256, True),
    ("undefined", True), ("NULL", True), ("user", True), ("User", True), ("'null'", True),
])
def test_identities_are_checked_the_way_heap_asks(identity: str, refused: bool) -> None:
    assert (identity_problem(identity) is not None) is refused


# -- what Heap stores ---------------------------------------------------------------------------

def test_traits_become_user_properties_in_one_bulk_request(sandbox: HeapSandbox, client: httpx.Client) -> None:
    records = [update(1, "a", {"lifetime_value": 129.9, "vip": True, "tier": "gold"}),
               update(2, "b", {"purchases": 3, "segments": ["x", "y"]})]

    result = ADAPTER.send_traits(client, environment(sandbox), records)

    assert classifications(result) == {1: (SUCCEEDED, ""), 2: (SUCCEEDED, "")}
    assert (result.http_status, result.requests) == (200, 1)
    assert sandbox.user_properties("a") == {"lifetime_value": 129.9, "vip": "true", "tier": "gold"}
    assert sandbox.user_properties("b") == {"purchases": 3, "segments": "x||y"}
    assert sandbox.property_requests == 1
    assert sandbox.requests == [("POST", "/api/add_user_properties", 200)]


def test_unset_traits_are_written_as_empty_strings(sandbox: HeapSandbox, client: httpx.Client) -> None:
    ADAPTER.send_traits(client, environment(sandbox), [update(1, values={"tier": "gold", "vip": True})])

    ADAPTER.send_traits(client, environment(sandbox), [update(2, values={"vip": None}, unset=("tier",))])

    assert sandbox.user_properties("user-1") == {"tier": "", "vip": ""}
    assert sandbox.calls("user-1") == 2


def test_a_long_string_is_cut_to_fit(sandbox: HeapSandbox, client: httpx.Client) -> None:
    result = ADAPTER.send_traits(client, environment(sandbox), [update(values={"notes": "n" * 5000})])

    assert result.outcomes[1].classification == SUCCEEDED
    assert sandbox.user_properties("user-1") == {"notes": "n" * 1023}


def test_reserved_keys_are_left_out_with_a_note(sandbox: HeapSandbox, client: httpx.Client) -> None:
    result = ADAPTER.send_traits(client, environment(sandbox),
                                 [update(values={"ID": "7", "user_id": "u", "tier": "gold"})])

    outcome = result.outcomes[1]
    assert (outcome.classification, outcome.status_reason) == (SUCCEEDED, "PROPERTIES_DROPPED")
    assert "ID" in outcome.error and "user_id" in outcome.error
    assert sandbox.user_properties("user-1") == {"tier": "gold"}


def test_a_record_left_with_nothing_is_permanent_and_the_rest_goes(sandbox: HeapSandbox,
                                                                   client: httpx.Client) -> None:
    result = ADAPTER.send_traits(client, environment(sandbox), [update(1, "a", {"id": "7", "meta": {"x": 1}}),
                                                                update(2, "b", {"tier": "gold"})])

    assert classifications(result) == {1: (PERMANENT, "NO_PROPERTIES"), 2: (SUCCEEDED, "")}
    assert "id" in result.outcomes[1].error and "meta" in result.outcomes[1].error
    assert sandbox.user_properties("a") == {}
    assert sandbox.user_properties("b") == {"tier": "gold"}


def test_a_record_with_nothing_to_write_is_not_sent(sandbox: HeapSandbox, client: httpx.Client) -> None:
    result = ADAPTER.send_traits(client, environment(sandbox), [update(values={})])

    assert (result.requests, classifications(result)) == (0, {1: (SUCCEEDED, "NOTHING_TO_SEND")})
    assert sandbox.requests == []


@pytest.mark.parametrize("identity", ["", "undefined", "null", "user", "x" * 256])
def test_bad_identities_are_refused_before_sending(sandbox: HeapSandbox, client: httpx.Client,
                                                   identity: str) -> None:
    result = ADAPTER.send_traits(client, environment(sandbox), [update(1, identity), update(2, "user-2")])

    assert classifications(result) == {1: (PERMANENT, "INVALID_IDENTITY"), 2: (SUCCEEDED, "")}
    assert sandbox.calls("user-2") == 1


def test_a_thousand_users_go_in_one_request_and_more_is_a_caller_error(sandbox: HeapSandbox,
                                                                       client: httpx.Client) -> None:
    records = [update(i, f"user-{i}", {"n": i}) for i in range(1, 1001)]

    result = ADAPTER.send_traits(client, environment(sandbox), records)
    with pytest.raises(ValueError, match="at most 1000"):
        ADAPTER.send_traits(client, environment(sandbox), [*records, update(1001, "user-1001")])

    assert set(classifications(result).values()) == {(SUCCEEDED, "")}
    assert sandbox.property_requests == 1
    assert sandbox.user_properties("user-1000") == {"n": 1000}


# -- hosts and credentials ----------------------------------------------------------------------

def test_the_default_host_is_heaps_us_host_and_eu_host_switches() -> None:
    seen: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200)

    with httpx.Client(transport=httpx.MockTransport(record)) as http:
        for settings in ({}, {"eu_host": True}, {"eu_host": False}):
            ADAPTER.send_traits(http, DestinationContext("d", "HEAP_TRAITS", settings, {"token": APP_ID}), [update()])

    assert seen == [f"{US_HOST}/api/add_user_properties", f"{EU_HOST}/api/add_user_properties",
                    f"{US_HOST}/api/add_user_properties"]


def test_credentials_without_an_app_id_send_nothing(sandbox: HeapSandbox, client: httpx.Client) -> None:
    result = ADAPTER.send_traits(client, environment(sandbox, {}), [update()])

    assert (result.requests, classifications(result)) == (0, {1: (PERMANENT, "INVALID_APP_ID")})
    assert sandbox.requests == []


def test_an_unknown_app_id_is_permanent_and_never_shown(sandbox: HeapSandbox, client: httpx.Client) -> None:
    result = ADAPTER.send_traits(client, environment(sandbox, {"app_id": "9999999"}), [update()])

    assert classifications(result) == {1: (PERMANENT, "INVALID_APP_ID")}
    assert result.http_status == 401
    assert sandbox.user_properties("user-1") == {}
    assert "9999999" not in result.response_excerpt + result.outcomes[1].error


def test_the_app_id_is_redacted_from_an_answer_that_echoes_it(sandbox: HeapSandbox, client: httpx.Client) -> None:
    sandbox.inject_reply(400, {"error": f"bad request for app {APP_ID}"})

    result = ADAPTER.send_traits(client, environment(sandbox), [update()])

    assert classifications(result) == {1: (PERMANENT, "INVALID_REQUEST")}
    assert "bad request for app" in result.outcomes[1].error
    assert APP_ID not in result.response_excerpt + result.outcomes[1].error


# -- answers ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "classification", "reason"), [
    (400, PERMANENT, "INVALID_REQUEST"),
    (401, PERMANENT, "INVALID_APP_ID"),
    (403, PERMANENT, "INVALID_APP_ID"),
    (404, PERMANENT, "INVALID_REQUEST"),
    (408, RETRYABLE, "SERVER_ERROR"),
    (500, RETRYABLE, "SERVER_ERROR"),
    (502, RETRYABLE, "SERVER_ERROR"),
])
def test_http_statuses_are_classified_for_the_whole_batch(sandbox: HeapSandbox, client: httpx.Client,
                                                          status: int, classification: str, reason: str) -> None:
    sandbox.fail(1, status=status)

    result = ADAPTER.send_traits(client, environment(sandbox), [update(1, "a"), update(2, "b")])

    assert classifications(result) == {1: (classification, reason), 2: (classification, reason)}
    assert sandbox.user_properties("a") == {}


def test_http_429_is_throttled_with_retry_after(sandbox: HeapSandbox, client: httpx.Client) -> None:
    sandbox.throttle(1, retry_after=12)

    result = ADAPTER.send_traits(client, environment(sandbox), [update()])

    assert classifications(result) == {1: (THROTTLED, "RATE_LIMITED")}
    assert result.retry_after_seconds == 12


def test_a_connection_failure_is_retryable(client: httpx.Client) -> None:
    gone = HeapSandbox(app_ids={APP_ID})
    with running(gone):
        url = gone.url

    result = ADAPTER.send_traits(client, DestinationContext("d", "HEAP_TRAITS", {"host": url}, {"token": APP_ID}),
                                 [update()])

    assert classifications(result) == {1: (RETRYABLE, "TRANSPORT_ERROR")}
