"""Webhook ingress end to end, on SQLite and PostgreSQL: RudderStack and Segment posts through the
real HTTP listener into the real store, read back over gRPC the way an operator would; the same
payload through ``CaptureSourcePayloads`` stores the same event; credentials, environments, bad
payloads, duplicates, oversized bodies, a store that is not serving, and ``stitchgraph serve``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from identity.events.capture import EventSettings
from server.app import build_application
from server.config import Settings, WebhookEnvironment, WebhookSettings
from server.grpc_server import StitchgraphServer
from server.http_ingress import create_webhook_listener
from stitchgraph.v1 import (
    common_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    events_pb2,
    identity_service_pb2,
    identity_service_pb2_grpc,
)
from tests.support.grpc_client import running_server, server_settings

PROD_SECRET = "rs-prod-secret-0123456789"
STAGING_SECRET = "rs-staging-secret-0123456789"
ENVIRONMENTS = (WebhookEnvironment("prod", "env:WEBHOOK_PROD_SECRET"),
                WebhookEnvironment("staging", "env:WEBHOOK_STAGING_SECRET", source="rudderstack-staging"))
PROD = {"X-Stitchgraph-Secret": PROD_SECRET}


def webhook_settings(**overrides: Any) -> WebhookSettings:
    return WebhookSettings(**{"listen": "127.0.0.1:0", "environments": ENVIRONMENTS, **overrides})


def order_completed(message_id: str = "msg-order-1", email: str = "Ada@Example.com", **extra: Any) -> dict[str, Any]:
    """A RudderStack Webhook destination body: the event as RudderStack sends it, unmodified."""
    return {
        "type": "track", "event": "Order Completed", "messageId": message_id, "channel": "web",
        "userId": "user-1", "anonymousId": "anon-1",
        "properties": {"order_id": f"order-{message_id}", "revenue": 42.5, "currency": "EUR",
                       "products": [{"product_id": "sku-1", "price": 42.5, "quantity": 1}]},
        "context": {"traits": {"email": email}, "ip": "203.0.113.9", "userAgent": "Mozilla/5.0",
                    "page": {"url": "https://shop.example.com/checkout"},
                    "consent": {"categoryPreferences": {"Advertising": True, "Analytics": True}}},
        "originalTimestamp": "2024-05-01T10:00:00.000Z", "sentAt": "2024-05-01T10:00:00.500Z",
        "timestamp": "2024-05-01T10:00:00.000Z", **extra,
    }


def identify(message_id: str = "msg-identify-1") -> dict[str, Any]:
    return {"type": "identify", "messageId": message_id, "userId": "user-1", "anonymousId": "anon-1",
            "traits": {"email": "Ada@Example.com", "plan": "pro"}, "timestamp": "2024-05-01T09:59:00.000Z"}


class Api:
    """The gRPC side a test reads the store through."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.events = event_service_pb2_grpc.EventServiceStub(channel)
        self.identity = identity_service_pb2_grpc.IdentityServiceStub(channel)

    def event(self, event_id: str) -> events_pb2.Event:
        return self.events.GetEvent(event_service_pb2.GetEventRequest(name=f"events/{event_id}")).event

    def has_event(self, event_id: str) -> bool:
        try:
            self.event(event_id)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
            return False
        return True

    def knows_email(self, email: str) -> bool:
        try:
            self.identity.LookupPerson(identity_service_pb2.LookupPersonRequest(
                identifier=common_pb2.Identifier(type="email", value=email)))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
            return False
        return True

    def traits(self, person: str) -> list[events_pb2.Trait]:
        return list(self.events.ListPersonTraits(event_service_pb2.ListPersonTraitsRequest(parent=person)).traits)

    def parked(self) -> list[events_pb2.ParkedEvent]:
        return list(self.events.ListParkedEvents(event_service_pb2.ListParkedEventsRequest()).parked_events)


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_PROD_SECRET", PROD_SECRET)
    monkeypatch.setenv("WEBHOOK_STAGING_SECRET", STAGING_SECRET)


@pytest.fixture
def server(db_url: str, secrets: None) -> Iterator[StitchgraphServer]:
    with running_server(server_settings(db_url, webhooks=webhook_settings())) as handle:
        yield handle


@pytest.fixture
def http(server: StitchgraphServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as client:
        yield client


@pytest.fixture
def api(server: StitchgraphServer) -> Iterator[Api]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Api(channel)


def comparable(event: events_pb2.Event) -> events_pb2.Event:
    """An event without what differs between two stores by construction (person IDs, receive time)."""
    copy = events_pb2.Event()
    copy.CopyFrom(event)
    copy.ClearField("person")
    copy.ClearField("receive_time")
    return copy


# -- RudderStack and Segment into the store -------------------------------------------------------

def test_a_rudderstack_event_is_stored_and_read_back_through_get_event(http: httpx.Client, api: Api) -> None:
    reply = http.post("/webhooks/rudderstack/prod", json=order_completed(), headers=PROD)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["received"], body["accepted"], body["duplicate"], body["parked"], body["rejected"]) == (1, 1, 0, 0, 0)
    assert body["results"][0] == {"index": 0, "status": "ACCEPTED", "event_id": "msg-order-1"}
    assert reply.headers["x-request-id"] == body["request_id"]
    stored = api.event("msg-order-1")
    assert (stored.event, stored.source, stored.source_event) == ("purchase", "rudderstack", "Order Completed")
    assert (stored.value, stored.currency, stored.order_id) == ("42.5", "EUR", "order-msg-order-1")
    assert stored.person.startswith("persons/")
    assert api.knows_email("ada@example.com")
    assert "Ada@Example.com" not in str(stored) and "ada@example.com" not in str(stored)


def test_a_segment_batch_with_basic_auth_stores_every_message(http: httpx.Client, api: Api) -> None:
    batch = {"batch": [identify(), order_completed()], "sentAt": "2024-05-01T10:00:01.000Z"}
    reply = http.post("/webhooks/segment/prod", json=batch, auth=(PROD_SECRET, ""))
    assert reply.status_code == 200, reply.text
    assert [r["status"] for r in reply.json()["results"]] == ["ACCEPTED", "ACCEPTED"]
    assert api.event("msg-order-1").source == "segment"


def test_a_segment_actions_array_body_is_accepted(http: httpx.Client, api: Api) -> None:
    reply = http.post("/webhooks/segment/prod", json=[order_completed("msg-a"), order_completed("msg-b")],
                      headers={"Authorization": f"Bearer {PROD_SECRET}"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["accepted"] == 2
    assert api.has_event("msg-a") and api.has_event("msg-b")


def test_a_segment_webhook_signature_authenticates_the_body(http: httpx.Client, api: Api) -> None:
    raw = json.dumps(order_completed()).encode()
    signature = hmac.new(PROD_SECRET.encode(), raw, hashlib.sha1).hexdigest()
    reply = http.post("/webhooks/segment/prod", content=raw,
                      headers={"Content-Type": "application/json", "X-Signature": signature})
    assert reply.status_code == 200, reply.text
    assert api.has_event("msg-order-1")


@pytest.mark.parametrize("route", ["rudderstack", "segment"])
def test_the_webhook_and_capture_source_payloads_store_the_same_event(
        route: str, db_url: str, second_db_url: str, secrets: None) -> None:
    kind = {"rudderstack": events_pb2.SOURCE_KIND_RUDDERSTACK, "segment": events_pb2.SOURCE_KIND_SEGMENT}[route]
    body = json.dumps({"batch": [identify(), order_completed()]})
    with running_server(server_settings(db_url, webhooks=webhook_settings())) as by_webhook, \
            running_server(server_settings(second_db_url)) as by_grpc, \
            grpc.insecure_channel(f"127.0.0.1:{by_webhook.port}") as webhook_channel, \
            grpc.insecure_channel(f"127.0.0.1:{by_grpc.port}") as grpc_channel:
        reply = httpx.post(f"http://127.0.0.1:{by_webhook.http_port}/webhooks/{route}/prod", content=body,
                           headers={**PROD, "Content-Type": "application/json"})
        assert reply.status_code == 200, reply.text
        captured = Api(grpc_channel).events.CaptureSourcePayloads(event_service_pb2.CaptureSourcePayloadsRequest(
            source_kind=kind, json_payloads=[body]))
        webhook_api, grpc_api = Api(webhook_channel), Api(grpc_channel)
        status_name = events_pb2.CaptureStatus.Name
        assert [(r["event_id"], r["status"]) for r in reply.json()["results"]] == \
            [(r.event_id, status_name(r.status).removeprefix("CAPTURE_STATUS_")) for r in captured.results[0].results]
        by_http, by_rpc = webhook_api.event("msg-order-1"), grpc_api.event("msg-order-1")
        assert comparable(by_http) == comparable(by_rpc)
        assert by_http.context.HasField("consent")
        assert webhook_api.traits(by_http.person) == grpc_api.traits(by_rpc.person)
        assert ("plan", "pro") in [(t.key, t.value.string_value) for t in webhook_api.traits(by_http.person)]


def test_the_same_message_through_grpc_after_the_webhook_is_a_duplicate(http: httpx.Client, server: StitchgraphServer,
                                                                         api: Api) -> None:
    assert http.post("/webhooks/rudderstack/prod", json=order_completed(), headers=PROD).status_code == 200
    response = api.events.CaptureSourcePayloads(event_service_pb2.CaptureSourcePayloadsRequest(
        source_kind=events_pb2.SOURCE_KIND_RUDDERSTACK, json_payloads=[json.dumps(order_completed())]))
    result = response.results[0].results[0]
    assert (result.status, result.event_id) == (events_pb2.CAPTURE_STATUS_DUPLICATE, "msg-order-1")


def test_a_repeated_message_id_is_a_duplicate(http: httpx.Client) -> None:
    first = http.post("/webhooks/rudderstack/prod", json=order_completed(), headers=PROD)
    again = http.post("/webhooks/rudderstack/prod", json=order_completed(), headers=PROD)
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json()["duplicate"] == 1 and again.json()["accepted"] == 0
    assert again.json()["results"][0]["status"] == "DUPLICATE"


def test_an_unmapped_event_is_parked_and_reported(http: httpx.Client, api: Api) -> None:
    message = {**order_completed("msg-coupon"), "event": "Coupon Applied"}
    reply = http.post("/webhooks/rudderstack/prod", json=message, headers=PROD)
    assert reply.status_code == 200, reply.text
    assert reply.json()["parked"] == 1
    assert [p.source_event for p in api.parked()] == ["Coupon Applied"]


# -- credentials and environments -----------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {},
    {"X-Stitchgraph-Secret": "not-the-secret"},
    {"Authorization": "Bearer not-the-secret"},
    {"Authorization": "Basic " + base64.b64encode(b"not-the-secret:").decode()},
    {"X-Signature": "0" * 40},
    {"X-Stitchgraph-Secret": STAGING_SECRET},  # another environment's secret
])
def test_a_missing_or_wrong_secret_is_401_and_stores_nothing(headers: dict[str, str], http: httpx.Client,
                                                             api: Api) -> None:
    reply = http.post("/webhooks/rudderstack/prod", json=order_completed(), headers=headers)
    assert reply.status_code == 401
    error = reply.json()["error"]
    assert error["reason"] in {"MISSING_CREDENTIALS", "INVALID_CREDENTIALS"}
    assert PROD_SECRET not in reply.text and STAGING_SECRET not in reply.text
    assert not api.has_event("msg-order-1")
    assert not api.knows_email("ada@example.com")
    assert api.parked() == []


def test_each_environment_accepts_only_its_own_secret_and_labels_its_events(http: httpx.Client, api: Api) -> None:
    refused = http.post("/webhooks/rudderstack/staging", json=order_completed(), headers=PROD)
    accepted = http.post("/webhooks/rudderstack/staging", json=order_completed(),
                         headers={"X-Stitchgraph-Secret": STAGING_SECRET})
    assert (refused.status_code, accepted.status_code) == (401, 200)
    assert api.event("msg-order-1").source == "rudderstack-staging"


def test_an_unknown_environment_is_404(http: httpx.Client) -> None:
    reply = http.post("/webhooks/rudderstack/qa", json=order_completed(), headers=PROD)
    assert reply.status_code == 404
    assert reply.json()["error"]["reason"] == "UNKNOWN_ENVIRONMENT"


# -- what a sender gets wrong ---------------------------------------------------------------------

def test_invalid_json_is_400_with_a_violation(http: httpx.Client) -> None:
    reply = http.post("/webhooks/rudderstack/prod", content=b'{"type": "track",',
                      headers={**PROD, "Content-Type": "application/json"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["reason"] == "INVALID_PAYLOAD"
    assert error["violations"][0]["reason"] == "INVALID_JSON"


def test_a_message_that_cannot_be_accepted_is_400_and_stores_nothing(http: httpx.Client, api: Api) -> None:
    message = order_completed()
    del message["event"]
    reply = http.post("/webhooks/rudderstack/prod", json=message, headers=PROD)
    assert reply.status_code == 400
    body = reply.json()
    assert body["error"]["reason"] == "INVALID_EVENTS"
    assert {"index": 0, "field": "event", "reason": "REQUIRED"}.items() <= body["error"]["violations"][0].items()
    assert body["rejected"] == 1
    assert not api.knows_email("ada@example.com")
    assert api.parked() == []


def test_a_batch_with_one_bad_message_stores_the_good_one(http: httpx.Client, api: Api) -> None:
    bad = {**order_completed("msg-bad"), "type": "teleport"}
    reply = http.post("/webhooks/segment/prod", json={"batch": [order_completed("msg-good"), bad]}, headers=PROD)
    assert reply.status_code == 200, reply.text
    assert [r["status"] for r in reply.json()["results"]] == ["ACCEPTED", "REJECTED"]
    assert api.has_event("msg-good") and not api.has_event("msg-bad")


def test_an_empty_batch_is_400(http: httpx.Client) -> None:
    reply = http.post("/webhooks/segment/prod", json={"batch": []}, headers=PROD)
    assert reply.status_code == 400


def test_more_messages_than_one_capture_call_takes_is_400_and_stores_nothing(db_url: str, secrets: None) -> None:
    settings = server_settings(db_url, webhooks=webhook_settings(),
                               events=replace(EventSettings(), max_batch_size=2))
    batch = {"batch": [order_completed(f"msg-{i}") for i in range(3)]}
    with running_server(settings) as handle, grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        reply = httpx.post(f"http://127.0.0.1:{handle.http_port}/webhooks/segment/prod", json=batch, headers=PROD)
        assert reply.status_code == 400
        assert reply.json()["error"]["reason"] == "BATCH_TOO_LARGE"
        assert reply.json()["error"]["violations"][0]["field"] == "batch"
        assert not Api(channel).has_event("msg-0")


def test_a_body_over_the_limit_is_413_and_stores_nothing(db_url: str, secrets: None) -> None:
    settings = server_settings(db_url, webhooks=webhook_settings(max_body_bytes=4096))
    big = order_completed(properties={"order_id": "o-1", "note": "x" * 5000})
    with running_server(settings) as handle, grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel, \
            httpx.Client(base_url=f"http://127.0.0.1:{handle.http_port}") as http:
        reply = http.post("/webhooks/rudderstack/prod", json=big, headers=PROD)
        assert reply.status_code == 413
        assert reply.json()["error"]["reason"] == "PAYLOAD_TOO_LARGE"
        assert not Api(channel).has_event("msg-order-1")
        # The connection was closed rather than left holding an unread body; the next request is served.
        assert http.post("/webhooks/rudderstack/prod", json=order_completed(), headers=PROD).status_code == 200


def test_a_body_that_is_not_json_is_415(http: httpx.Client) -> None:
    reply = http.post("/webhooks/rudderstack/prod", content=b"type=track",
                      headers={**PROD, "Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 415


def test_a_chunked_body_is_read(http: httpx.Client, api: Api) -> None:
    raw = json.dumps(order_completed()).encode()
    reply = http.post("/webhooks/rudderstack/prod", content=iter([raw[:100], raw[100:]]),
                      headers={**PROD, "Content-Type": "application/json"})
    assert reply.status_code == 200, reply.text
    assert api.has_event("msg-order-1")


def test_unknown_paths_and_methods_are_refused(http: httpx.Client) -> None:
    assert http.post("/webhooks/mixpanel/prod", json={}, headers=PROD).status_code == 404
    assert http.post("/", json={}).status_code == 404
    wrong_method = http.get("/webhooks/rudderstack/prod", headers=PROD)
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST, PUT, PATCH")
    assert http.put("/webhooks/heap/heap-segments", json={}).status_code == 405


def test_a_rudderstack_webhook_set_to_put_is_accepted(http: httpx.Client, api: Api) -> None:
    assert http.put("/webhooks/rudderstack/prod", json=order_completed(), headers=PROD).status_code == 200
    assert api.has_event("msg-order-1")


def test_healthz_reports_serving(http: httpx.Client) -> None:
    reply = http.get("/healthz")
    assert (reply.status_code, reply.json()["status"]) == (200, "SERVING")


def test_the_caller_request_id_is_echoed(http: httpx.Client) -> None:
    reply = http.post("/webhooks/rudderstack/prod", json=order_completed(),
                      headers={**PROD, "X-Request-Id": "rs-delivery-42"})
    assert reply.headers["x-request-id"] == "rs-delivery-42" == reply.json()["request_id"]


# -- the store unavailable: 503 so the sender retries ---------------------------------------------

def test_a_store_behind_its_schema_answers_503_until_migrated(tmp_path: Path, secrets: None) -> None:
    settings = server_settings(f"sqlite:///{tmp_path}/empty.db", migrate_on_start=False, webhooks=webhook_settings())
    with running_server(settings) as handle, httpx.Client(base_url=f"http://127.0.0.1:{handle.http_port}") as http:
        reply = http.post("/webhooks/rudderstack/prod", json=order_completed(), headers=PROD)
        assert reply.status_code == 503
        assert reply.headers["retry-after"].isdigit()
        assert http.get("/healthz").status_code == 503


def test_an_unreachable_store_answers_503_with_retry_after(tmp_path: Path, secrets: None) -> None:
    unreachable = f"sqlite:///{tmp_path}/no-such-directory/store.db"
    app = build_application(Settings(database_url=unreachable, metrics_address=None, webhooks=webhook_settings()))
    listener = create_webhook_listener(app)
    assert listener is not None
    listener.start()
    try:
        reply = httpx.post(f"http://127.0.0.1:{listener.port}/webhooks/rudderstack/prod", json=order_completed(),
                           headers=PROD)
    finally:
        listener.stop(0)
        app.close()
    assert reply.status_code == 503
    assert reply.json()["error"]["reason"] == "UNAVAILABLE"
    assert reply.headers["retry-after"].isdigit()


# -- stitchgraph serve ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_starts_the_webhook_listener_and_never_logs_secrets_or_bodies(tmp_path: Path) -> None:
    port, http_port = _free_port(), _free_port()
    env = {**os.environ, "STITCHGRAPH_DATABASE_URL": f"sqlite:///{tmp_path}/store.db",
           "STITCHGRAPH_METRICS_ADDRESS": "", "STITCHGRAPH_LOG_LEVEL": "INFO",
           "STITCHGRAPH_WEBHOOKS_LISTEN": f"127.0.0.1:{http_port}",
           "STITCHGRAPH_WEBHOOKS_ENVIRONMENTS": "prod=env:WEBHOOK_PROD_SECRET", "WEBHOOK_PROD_SECRET": PROD_SECRET}
    process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--listen", f"127.0.0.1:{port}"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the webhook listener did not come up"
            time.sleep(0.1)
        accepted = httpx.post(f"http://127.0.0.1:{http_port}/webhooks/rudderstack/prod", json=order_completed(),
                              headers={**PROD, "X-Request-Id": "req-accepted"})
        refused = httpx.post(f"http://127.0.0.1:{http_port}/webhooks/rudderstack/prod", json=order_completed(),
                             headers={"Authorization": "Bearer guessed-secret", "X-Request-Id": "req-refused"})
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert (accepted.status_code, refused.status_code) == (200, 401)
    assert process.returncode == 0, stderr
    assert f"webhooks:   http://127.0.0.1:{http_port}/webhooks/" in stdout
    log = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    finished = {entry["request_id"]: entry for entry in log if entry["message"] == "http request finished"}
    assert finished["req-accepted"]["http_status"] == 200
    assert (finished["req-refused"]["http_status"], finished["req-refused"]["reason"]) == (401, "INVALID_CREDENTIALS")
    for secret_or_body in (PROD_SECRET, "guessed-secret", "Ada@Example.com", "ada@example.com", "Order Completed"):
        assert secret_or_body not in stderr
