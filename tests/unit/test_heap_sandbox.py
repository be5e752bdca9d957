"""The Heap sandbox answers like Heap's server APIs (specs/sources-and-consent.md §3.1), and the
Segments Sync webhook sender builds and signs what Heap sends (§3.2)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.sandboxes.base import Reply, Request, Sandbox, json_reply, running
from tests.sandboxes.heap import HeapSandbox, HeapWebhookSender, heap_hash

APP_ID = "11111"
SECRET = "heap-webhook-secret"


class Clock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def served() -> Iterator[HeapSandbox]:
    heap = HeapSandbox(app_ids={APP_ID})
    with running(heap):
        yield heap


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sandbox(served: HeapSandbox, clock: Clock) -> HeapSandbox:
    served.reset()
    served.clock = clock
    return served


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client() as client:
        yield client


def add(http: httpx.Client, sandbox: HeapSandbox, body: Any) -> httpx.Response:
    return http.post(f"{sandbox.url}/api/add_user_properties", json=body)


def track(http: httpx.Client, sandbox: HeapSandbox, body: Any) -> httpx.Response:
    return http.post(f"{sandbox.url}/api/track", json=body)


# -- add_user_properties --------------------------------------------------------------------------

def test_single_and_bulk_writes_overwrite_properties_key_by_key(sandbox: HeapSandbox, http: httpx.Client) -> None:
    single = add(http, sandbox, {"app_id": APP_ID, "identity": "a@example.com",
                                 "properties": {"tier": "silver", "ltv": 10}})
    bulk = add(http, sandbox, {"app_id": APP_ID, "users": [
        {"identity": "a@example.com", "properties": {"tier": "gold"}},
        {"identity": "b@example.com", "properties": {"ltv": 99.5}},
    ]})

    assert (single.status_code, bulk.status_code) == (200, 200)
    assert sandbox.user_properties("a@example.com") == {"tier": "gold", "ltv": 10}
    assert sandbox.user_properties("b@example.com") == {"ltv": 99.5}
    assert (sandbox.calls("a@example.com"), sandbox.calls("b@example.com")) == (2, 1)


def test_identities_are_case_sensitive(sandbox: HeapSandbox, http: httpx.Client) -> None:
    add(http, sandbox, {"app_id": APP_ID, "identity": "Alice", "properties": {"x": "1"}})

    assert sandbox.user_properties("alice") == {}
    assert sandbox.user_properties("Alice") == {"x": "1"}


@pytest.mark.parametrize("user", [
    {"properties": {"x": "1"}},
    {"identity": "", "properties": {"x": "1"}},
    {"identity": 12345, "properties": {"x": "1"}},
    {"identity": "u" * 256, "properties": {"x": "1"}},
    {"identity": "u", "properties": ["x"]},
    {"identity": "u", "properties": {"vip": True}},
    {"identity": "u", "properties": {"meta": {"a": 1}}},
    {"identity": "u", "properties": {"tags": ["a", "b"]}},
    {"identity": "u", "properties": {"gone": None}},
    {"identity": "u", "properties": {"notes": "n" * 1024}},
    {"identity": "u", "properties": {"k" * 1024: "v"}},
    {"identity": "u", "properties": {"": "v"}},
    {"identity": "u", "properties": {"Id": "7"}},
    {"identity": "u", "properties": {"user_id": "7"}},
])
def test_what_heap_refuses_is_400_and_the_whole_bulk_request_is_dropped(sandbox: HeapSandbox, http: httpx.Client,
                                                                        user: dict[str, Any]) -> None:
    single = add(http, sandbox, {"app_id": APP_ID, **user})
    bulk = add(http, sandbox, {"app_id": APP_ID, "users": [{"identity": "ok", "properties": {"x": "1"}}, user]})

    assert (single.status_code, bulk.status_code) == (400, 400)
    assert "error" in bulk.json()
    assert sandbox.users == {}


def test_values_just_under_the_limits_are_taken(sandbox: HeapSandbox, http: httpx.Client) -> None:
    response = add(http, sandbox, {"app_id": APP_ID, "identity": "u" * 255,
                                   "properties": {"k" * 1023: "v" * 1023, "n": 1.5, "email": "a@example.com"}})

    assert response.status_code == 200
    assert sandbox.user_properties("u" * 255) == {"k" * 1023: "v" * 1023, "n": 1.5, "email": "a@example.com"}


def test_app_id_missing_is_400_and_unknown_is_401(sandbox: HeapSandbox, http: httpx.Client) -> None:
    missing = add(http, sandbox, {"identity": "u", "properties": {"x": "1"}})
    unknown = add(http, sandbox, {"app_id": "99999", "identity": "u", "properties": {"x": "1"}})

    assert (missing.status_code, unknown.status_code) == (400, 401)
    assert sandbox.users == {}


@pytest.mark.parametrize(("count", "status"), [(1000, 200), (1001, 400), (0, 400)])
def test_bulk_takes_up_to_a_thousand_users(sandbox: HeapSandbox, http: httpx.Client, count: int,
                                           status: int) -> None:
    users = [{"identity": f"u{i}", "properties": {"n": i}} for i in range(count)]

    response = add(http, sandbox, {"app_id": APP_ID, "users": users})

    assert response.status_code == status
    assert len(sandbox.users) == (count if status == 200 else 0)


def test_single_calls_are_limited_per_identity_until_the_window_passes(sandbox: HeapSandbox, http: httpx.Client,
                                                                       clock: Clock) -> None:
    body = {"app_id": APP_ID, "identity": "busy", "properties": {"n": 1}}

    statuses = [add(http, sandbox, body).status_code for _ in range(30)]
    clock.now += 10
    limited = add(http, sandbox, body)
    other = add(http, sandbox, {**body, "identity": "quiet"})
    bulk = add(http, sandbox, {"app_id": APP_ID, "users": [body]})
    clock.now += 20
    later = add(http, sandbox, body)

    assert statuses == [200] * 30
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "20"
    assert (other.status_code, bulk.status_code, later.status_code) == (200, 200, 200)
    assert sandbox.calls("busy") == 32


def test_injected_faults_use_heaps_error_body(sandbox: HeapSandbox, http: httpx.Client) -> None:
    body = {"app_id": APP_ID, "identity": "u", "properties": {"x": "1"}}
    sandbox.throttle(1, retry_after=5)

    throttled = add(http, sandbox, body)
    sandbox.inject_reply(503, {"error": "busy"})
    canned = add(http, sandbox, body)

    assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "5")
    assert set(throttled.json()) == {"error"}
    assert (canned.status_code, canned.json()) == (503, {"error": "busy"})
    assert sandbox.users == {}


# -- track ------------------------------------------------------------------------------------------

def test_track_takes_single_and_bulk_events_and_stores_arrays_as_heap_does(sandbox: HeapSandbox,
                                                                            http: httpx.Client) -> None:
    single = track(http, sandbox, {"app_id": APP_ID, "identity": "a", "event": "Signed up",
                                   "properties": {"plan": "pro", "seats": 3, "tags": ["x", "y"]},
                                   "timestamp": "2026-03-01T12:00:00Z"})
    bulk = track(http, sandbox, {"app_id": APP_ID, "events": [
        {"user_id": "12345", "event": "Paid", "idempotency_key": "k1"},
        {"user_id": "12345", "event": "Paid", "idempotency_key": "k1"},
    ]})

    assert (single.status_code, bulk.status_code) == (200, 200)
    assert [(e["event"], e.get("identity"), e.get("user_id")) for e in sandbox.tracked] == \
        [("Signed up", "a", None), ("Paid", None, "12345")]
    assert sandbox.tracked[0]["properties"] == {"plan": "pro", "seats": 3, "tags": "x||y"}
    assert sandbox.duplicate_count == 1


@pytest.mark.parametrize("event", [
    {"identity": "a"},
    {"identity": "a", "event": "e" * 1025},
    {"event": "x"},
    {"identity": "a", "user_id": "1", "event": "x"},
    {"identity": "a", "event": "x", "timestamp": "yesterday"},
    {"identity": "a", "event": "x", "properties": {"flag": False}},
])
def test_track_refuses_what_heap_refuses(sandbox: HeapSandbox, http: httpx.Client, event: dict[str, Any]) -> None:
    response = track(http, sandbox, {"app_id": APP_ID, **event})

    assert response.status_code == 400
    assert sandbox.tracked == []


# -- Segments Sync webhooks ------------------------------------------------------------------------

def test_heap_hash_is_the_base64_hmac_of_timestamp_and_body() -> None:
    body = b'{"action_type":"segment.users.drain"}'
    by_hand = base64.b64encode(hmac.new(SECRET.encode(), b"1700000000000" + body, hashlib.sha256).digest()).decode()

    header = heap_hash(SECRET, 1_700_000_000_000, body)

    # Known answer, also computed with `openssl dgst -sha256 -hmac ... -binary | base64`.
    assert header == "ts:1700000000000,hmac:V/6J2/a5TTZGu4TEMrnoa8WKqpIgwjkP4Q3O/llTUZQ="
    assert header == f"ts:1700000000000,hmac:{by_hand}"


class Receiver(Sandbox):
    """A webhook endpoint checking ``Heap-Hash`` the way Heap's reference app does (60 s old, 1 s
    ahead at most), recording the payloads it accepted."""

    name = "receiver"

    def __init__(self, secret: str, clock: Clock) -> None:
        super().__init__()
        self.secret = secret
        self.clock = clock
        self.payloads: list[dict[str, Any]] = []
        self.route("POST", r"/heap", self._receive)

    def _receive(self, request: Request, match: re.Match[str]) -> Reply:
        parsed = re.fullmatch(r"ts:(\d+),hmac:(\S+)", request.headers.get("heap-hash", ""))
        if parsed is None:
            return json_reply(400, {"error": "Expected heap-hash"})
        ts = int(parsed.group(1))
        now_ms = self.clock() * 1000
        if now_ms - ts > 60_000 or ts - now_ms > 1_000:
            return json_reply(401, {"error": "stale"})
        expected = heap_hash(self.secret, ts, request.raw)
        if not hmac.compare_digest(expected, request.headers["heap-hash"]):
            return json_reply(401, {"error": "Invalid signature"})
        self.payloads.append(json.loads(request.raw))
        return json_reply(200, {})


@pytest.fixture
def receiver(clock: Clock) -> Iterator[Receiver]:
    with running(Receiver(SECRET, clock)) as served:
        assert isinstance(served, Receiver)
        yield served


@pytest.fixture
def sender(receiver: Receiver, clock: Clock) -> HeapWebhookSender:
    return HeapWebhookSender(f"{receiver.url}/heap", SECRET, id_token="7a36ae58-c4b9-11eb-8529-0242ac130003",
                             clock=clock)


def test_a_sync_page_has_the_shape_of_heaps_specification(sender: HeapWebhookSender, receiver: Receiver) -> None:
    status, _ = sender.send_sync(1338065, "Free Customers", ["user3@email.com"], ["user1@email.com"], 2, 5,
                                 "afe74af0-496e-11ec-81d3-0242ac130003")

    assert status == 200
    [payload] = receiver.payloads
    assert payload == {
        "id_token": "7a36ae58-c4b9-11eb-8529-0242ac130003",
        "action_type": "segment.users.sync",
        "customer_config": sender.customer_config,
        "data": {"segment": {"id": 1338065, "name": "Free Customers"},
                 "sync_info": {"page_number": 2, "total_pages": 5,
                               "sync_task_id": "afe74af0-496e-11ec-81d3-0242ac130003"},
                 "add": [{"id": "user3@email.com"}], "remove": [{"id": "user1@email.com"}]},
    }


def test_an_empty_side_is_left_out_as_in_heaps_examples(sender: HeapWebhookSender) -> None:
    payload = sender.sync_payload(1, "S", add=["a"])

    assert "remove" not in payload["data"] and payload["data"]["add"] == [{"id": "a"}]


def test_a_drain_names_only_the_segment(sender: HeapWebhookSender, receiver: Receiver) -> None:
    status, _ = sender.send_drain(1338065, "Segment To Drain")

    assert status == 200
    assert receiver.payloads[0]["action_type"] == "segment.users.drain"
    assert receiver.payloads[0]["data"] == {"segment": {"id": 1338065, "name": "Segment To Drain"}}


def test_a_large_delta_is_split_into_numbered_pages_of_one_task(sender: HeapWebhookSender,
                                                                receiver: Receiver) -> None:
    added = [f"a{i}" for i in range(2500)]
    removed = [f"r{i}" for i in range(100)]

    statuses = sender.send_pages(7, "Power users", added, removed, page_size=1000)

    pages = receiver.payloads
    assert [s for s, _ in statuses] == [200, 200, 200]
    assert [p["data"]["sync_info"]["page_number"] for p in pages] == [1, 2, 3]
    assert {p["data"]["sync_info"]["total_pages"] for p in pages} == {3}
    assert len({p["data"]["sync_info"]["sync_task_id"] for p in pages}) == 1
    assert [u["id"] for p in pages for u in p["data"].get("add", [])] == added
    assert [u["id"] for p in pages for u in p["data"].get("remove", [])] == removed
    assert [len(p["data"].get("add", [])) + len(p["data"].get("remove", [])) for p in pages] == [1000, 1000, 600]


def test_nothing_to_send_is_still_one_empty_page(sender: HeapWebhookSender) -> None:
    [page] = sender.sync_pages(7, "Power users")

    assert page["data"]["sync_info"]["page_number"] == page["data"]["sync_info"]["total_pages"] == 1


@pytest.mark.parametrize(("override", "status"), [
    ({"secret": "not-the-secret"}, 401),
    ({"ts": int(1_750_000_000.0 * 1000) - 61_000}, 401),
    ({"ts": int(1_750_000_000.0 * 1000) + 5_000}, 401),
    ({"ts": int(1_750_000_000.0 * 1000) - 30_000}, 200),
])
def test_forged_and_stale_signatures_can_be_sent(sender: HeapWebhookSender, receiver: Receiver,
                                                 override: dict[str, Any], status: int) -> None:
    result, _ = sender.send_sync(7, "Power users", ["a"], [], 1, 1, "task-1", **override)

    assert result == status
    assert len(receiver.payloads) == (1 if status == 200 else 0)


def test_a_body_other_than_the_signed_one_is_refused(sender: HeapWebhookSender, receiver: Receiver,
                                                     clock: Clock) -> None:
    signed = json.dumps(sender.sync_payload(7, "S", ["a"], [], 1, 1, "t")).encode()
    tampered = signed.replace(b'"a"', b'"mallory"')

    forged, _ = sender.send_raw(tampered, heap_hash(SECRET, int(clock() * 1000), signed))
    unsigned, _ = sender.send_raw(signed, None)

    assert (forged, unsigned) == (401, 400)
    assert receiver.payloads == []
