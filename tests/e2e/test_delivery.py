"""Delivery end to end over gRPC, on SQLite and PostgreSQL, against the platform sandboxes:
the reference trace reaching Meta, Google and TikTok with the email learnt at identify;
failures, throttling and timeouts followed by recovery with every event accepted once;
audience adds and removes; consent withdrawn between enqueue and send; erasure; a bad
token dead-lettered and retried; reconciliation as a replace session.

The server's own background workers do the sending; tests wait for what the sandbox
accepted, the way a platform would see it."""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from audiences.delivery import DeliverySettings
from server.grpc_server import StitchgraphServer
from stitchgraph.v1 import (
    audience_service_pb2,
    audience_service_pb2_grpc,
    audiences_pb2,
    common_pb2,
    consent_pb2,
    consent_service_pb2,
    consent_service_pb2_grpc,
    destination_service_pb2,
    destination_service_pb2_grpc,
    destinations_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    events_pb2,
    identity_pb2,
    identity_service_pb2,
    identity_service_pb2_grpc,
)
from tests.sandboxes.base import running
from tests.sandboxes.google import GoogleSandbox
from tests.sandboxes.meta import MetaSandbox
from tests.sandboxes.tiktok import TikTokSandbox
from tests.support.grpc_client import running_server, server_settings

dpb = destination_service_pb2
GOOD = "good-token-0123456789"
GRANTED = consent_pb2.CONSENT_STATUS_GRANTED
DENIED = consent_pb2.CONSENT_STATUS_DENIED
STATUS = destinations_pb2.DeliveryStatus
T = TypeVar("T")

FAST = DeliverySettings(workers=2, poll_interval_seconds=0.05, lease_seconds=5.0, request_timeout_seconds=1.0,
                        max_attempts=8, backoff_base_seconds=0.05, backoff_max_seconds=0.5, throttle_seconds=0.5)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ts(moment: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(moment)
    return t


def wait_for(condition: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def meta() -> Iterator[MetaSandbox]:
    with running(MetaSandbox(tokens={GOOD})) as sandbox:
        yield sandbox  # type: ignore[misc]


@pytest.fixture
def tiktok() -> Iterator[TikTokSandbox]:
    with running(TikTokSandbox(tokens={GOOD})) as sandbox:
        yield sandbox  # type: ignore[misc]


@pytest.fixture
def google() -> Iterator[GoogleSandbox]:
    with running(GoogleSandbox(tokens=set())) as sandbox:
        yield sandbox  # type: ignore[misc]


@pytest.fixture
def server(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[StitchgraphServer]:
    monkeypatch.setenv("SANDBOX_TOKEN", GOOD)
    # Google: an OAuth refresh token exchanged at the sandbox's token endpoint, and a developer token.
    monkeypatch.setenv("GOOGLE_CREDENTIALS", '{"client_id": "sandbox-client-id", "client_secret": '
                       '"sandbox-client-secret", "refresh_token": "sandbox-refresh-token", '
                       '"developer_token": "dev-token-1"}')
    with running_server(server_settings(db_url, delivery=FAST)) as handle:
        yield handle


class Client:
    def __init__(self, channel: grpc.Channel) -> None:
        self.audiences = audience_service_pb2_grpc.AudienceServiceStub(channel)
        self.consent = consent_service_pb2_grpc.ConsentServiceStub(channel)
        self.destinations = destination_service_pb2_grpc.DestinationServiceStub(channel)
        self.events = event_service_pb2_grpc.EventServiceStub(channel)
        self.identity = identity_service_pb2_grpc.IdentityServiceStub(channel)

    def destination(self, destination_id: str, kind: int, settings: dict[str, Any], *,
                    credentials_ref: str = "env:SANDBOX_TOKEN", events: tuple[str, ...] = ()) -> str:
        struct = struct_pb2.Struct()
        struct.update(settings)
        self.destinations.CreateDestination(dpb.CreateDestinationRequest(
            destination_id=destination_id, destination=destinations_pb2.Destination(
                kind=kind, display_name=destination_id, credentials_ref=credentials_ref, settings=struct,
                events=list(events))))
        return f"destinations/{destination_id}"

    def grant(self, user_id: str, *purposes: str, state: int = GRANTED) -> None:
        decisions = [consent_pb2.ConsentDecision(purpose=p, state=state, source="preference_center")
                     for p in purposes or ("ad_user_data", "ad_personalization")]
        self.consent.SetConsent(consent_service_pb2.SetConsentRequest(
            identifier=common_pb2.Identifier(type="user_id", value=user_id), decisions=decisions))

    def identify(self, user_id: str, email: str = "", anonymous_id: str = "",
                 traits: dict[str, Any] | None = None) -> str:
        identifiers = [common_pb2.Identifier(type="user_id", value=user_id)]
        if email:
            identifiers.append(common_pb2.Identifier(type="email", value=email))
        if anonymous_id:
            identifiers.append(common_pb2.Identifier(type="anonymous_id", value=anonymous_id))
        request = identity_service_pb2.IdentifyRequest(identifiers=identifiers, source="test")
        if traits:
            request.traits.update(traits)
        return self.identity.Identify(request).person.name

    def capture(self, *events: events_pb2.Event) -> None:
        response = self.events.CaptureBatch(event_service_pb2.CaptureBatchRequest(events=list(events)))
        assert response.summary.accepted_count == len(events), response

    def deliveries(self, parent: str = "destinations/-", **filters: Any) -> list[destinations_pb2.Delivery]:
        return list(self.destinations.ListDeliveries(dpb.ListDeliveriesRequest(
            parent=parent, page_size=1000, **filters)).deliveries)


@pytest.fixture
def client(channel: grpc.Channel) -> Client:
    return Client(channel)


def purchase(event_id: str, user_id: str, at: datetime, value: str = "49.90", currency: str = "EUR",
             **context: str) -> events_pb2.Event:
    return events_pb2.Event(
        event="purchase", event_id=event_id, source="shop", occurred_at=ts(at), value=value, currency=currency,
        order_id=f"order-{event_id}", identifiers=[common_pb2.Identifier(type="user_id", value=user_id)],
        action_source=events_pb2.ACTION_SOURCE_SYSTEM_GENERATED, context=events_pb2.EventContext(**context))


def meta_conversions(client: Client, sandbox: MetaSandbox, destination_id: str = "meta-capi", **extra: Any) -> str:
    return client.destination(destination_id, destinations_pb2.DESTINATION_KIND_META_CONVERSIONS,
                              {"pixel_id": "1234567890", "base_url": sandbox.url, **extra})


def meta_events(sandbox: MetaSandbox, name: str = "Purchase") -> list[dict[str, Any]]:
    with sandbox.lock:
        return [a.event for a in sandbox.accepted_events if a.event["event_name"] == name]


# -- the reference trace ---------------------------------------------------------------------------

def test_reference_trace_reaches_every_platform_with_the_email_learnt_at_identify(
        server: StitchgraphServer, client: Client, meta: MetaSandbox, tiktok: TikTokSandbox,
        google: GoogleSandbox) -> None:
    meta_conversions(client, meta)
    client.destination("tiktok-events", destinations_pb2.DESTINATION_KIND_TIKTOK_EVENTS,
                       {"event_source_id": "CPIXEL123", "base_url": tiktok.url})
    client.destination("google-ads", destinations_pb2.DESTINATION_KIND_GOOGLE_ADS_CONVERSIONS,
                       {"customer_id": "123-456-7890", "conversion_actions": {"purchase": "555"},
                        "base_url": google.url, "token_url": f"{google.url}/token"},
                       credentials_ref="env:GOOGLE_CREDENTIALS")
    now = datetime.now(UTC).replace(microsecond=0)
    # Anonymous browsing, then identify with the user ID and the email, then a purchase that
    # carries only the user ID.
    client.capture(*[events_pb2.Event(
        event="page_view", event_id=f"pv-{i}", source="web", occurred_at=ts(now - timedelta(minutes=10 - i)),
        identifiers=[common_pb2.Identifier(type="anonymous_id", value="anon-7")],
        action_source=events_pb2.ACTION_SOURCE_WEBSITE,
        context=events_pb2.EventContext(page_url="https://shop.example/p", user_agent="Mozilla/5.0"))
        for i in range(3)])
    client.identify("u-7", email="  Ada.Lovelace@Example.com ", anonymous_id="anon-7")
    client.grant("u-7")
    client.capture(purchase("evt-purchase-7", "u-7", now, value="49.90", currency="EUR"))

    sent = wait_for(lambda: meta_events(meta), what="the purchase at Meta")
    assert len(sent) == 1
    event = sent[0]
    assert event["event_id"] == "evt-purchase-7"
    assert event["custom_data"]["value"] == pytest.approx(49.90)
    assert event["custom_data"]["currency"].upper() == "EUR"
    assert event["user_data"]["em"] == [sha("ada.lovelace@example.com")]
    assert event["user_data"]["external_id"] == ["u-7"]
    assert event["event_time"] == int(now.timestamp())

    def tiktok_purchase() -> list[dict[str, Any]]:
        with tiktok.lock:
            return [e for e in tiktok.accepted_events if e["event_id"] == "evt-purchase-7"]

    at_tiktok = wait_for(tiktok_purchase, what="the purchase at TikTok")
    assert len(at_tiktok) == 1
    assert at_tiktok[0]["user"]["email"] == [sha("ada.lovelace@example.com")]
    assert at_tiktok[0]["properties"]["value"] == pytest.approx(49.90)
    assert at_tiktok[0]["properties"]["currency"] == "EUR"

    def google_purchase() -> list[Any]:
        with google.lock:
            return list(google.accepted_conversions)

    (at_google,) = wait_for(google_purchase, what="the purchase at Google")
    assert at_google.customer_id == "1234567890" and at_google.action_id == "555"
    assert at_google.order_id == "order-evt-purchase-7"
    assert at_google.value == pytest.approx(49.90) and at_google.currency == "EUR"
    assert at_google.identifiers == (("hashedEmail", sha("ada.lovelace@example.com")),)
    assert at_google.ad_user_data == "GRANTED"

    def settled() -> list[destinations_pb2.Delivery]:
        done = [d for d in client.deliveries(event_id="evt-purchase-7")
                if d.status == STATUS.Value("DELIVERY_STATUS_SUCCEEDED")]
        return done if len(done) == 3 else []

    delivery = wait_for(settled, what="the log")
    assert {d.platform_event_name for d in delivery if d.destination != "destinations/google-ads"} == {"Purchase"}
    meta_log = next(d for d in delivery if d.destination == "destinations/meta-capi")
    assert meta_log.person and meta_log.attempts == 1 and meta_log.attempts_log[0].http_status == 200
    assert GOOD not in meta_log.attempts_log[0].response_excerpt


# -- failures and recovery ------------------------------------------------------------------------

def test_failures_then_recovery_deliver_every_event_exactly_once(
        server: StitchgraphServer, client: Client, meta: MetaSandbox) -> None:
    meta_conversions(client, meta)
    client.identify("u-1", email="one@example.com")
    client.grant("u-1")
    meta.fail(2, status=503)
    meta.throttle(1, retry_after=0.6)
    meta.stall(1, seconds=1.5)  # processed by the platform after the client gave up: dedup by event_id
    meta.fail(1, status=500)
    now = datetime.now(UTC)
    ids = [f"evt-{i:03d}" for i in range(40)]
    for start in range(0, len(ids), 10):
        client.capture(*[purchase(e, "u-1", now - timedelta(minutes=1)) for e in ids[start:start + 10]])

    wait_for(lambda: {e["event_id"] for e in meta_events(meta)} >= set(ids), timeout=30, what="all 40 purchases")
    accepted = [e["event_id"] for e in meta_events(meta)]
    assert sorted(accepted) == sorted(ids)  # each once, whatever the platform had to deduplicate
    deliveries = client.deliveries("destinations/meta-capi")
    assert len(deliveries) == 40
    wait_for(lambda: all(d.status == STATUS.Value("DELIVERY_STATUS_SUCCEEDED")
                         for d in client.deliveries("destinations/meta-capi")), what="every delivery settled")
    classes = {a.classification for d in client.deliveries("destinations/meta-capi") for a in d.attempts_log}
    assert destinations_pb2.ATTEMPT_CLASSIFICATION_RETRYABLE in classes
    assert destinations_pb2.ATTEMPT_CLASSIFICATION_THROTTLED in classes
    # Retry-After was honoured: the attempt after the 429 came at least 0.6 s later.
    for d in client.deliveries("destinations/meta-capi"):
        log = list(d.attempts_log)
        for before, after in itertools.pairwise(log):
            if before.classification == destinations_pb2.ATTEMPT_CLASSIFICATION_THROTTLED:
                gap = after.time.ToMicroseconds() - before.time.ToMicroseconds()
                assert gap >= 0.6 * 1_000_000 - before.latency.ToMicroseconds(), (gap, log)


def test_a_bad_token_dead_letters_and_is_retried_after_the_fix(
        server: StitchgraphServer, client: Client, meta: MetaSandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("META_BAD", "expired-token-987654321")
    client.destination("meta-capi", destinations_pb2.DESTINATION_KIND_META_CONVERSIONS,
                       {"pixel_id": "1234567890", "base_url": meta.url}, credentials_ref="env:META_BAD")
    client.identify("u-2", email="two@example.com")
    client.grant("u-2")
    client.capture(purchase("evt-bad-token", "u-2", datetime.now(UTC)))

    dead = wait_for(lambda: [d for d in client.deliveries(status=STATUS.Value("DELIVERY_STATUS_DEAD_LETTERED"))],
                    what="a dead-lettered delivery")
    assert len(dead) == 1 and dead[0].event_id == "evt-bad-token"
    assert dead[0].status_reason == "INVALID_TOKEN"
    attempt = dead[0].attempts_log[-1]
    assert attempt.classification == destinations_pb2.ATTEMPT_CLASSIFICATION_PERMANENT
    assert attempt.platform_error_code == "190"
    assert "expired-token-987654321" not in attempt.response_excerpt + attempt.error
    assert dead[0].attempts == 1  # permanent: not retried on its own
    stats = client.destinations.GetDestination(dpb.GetDestinationRequest(name="destinations/meta-capi")).destination
    assert stats.stats.dead_lettered_count == 1
    assert meta_events(meta) == []

    with pytest.raises(grpc.RpcError) as refused:  # only dead-lettered deliveries can be retried
        client.destinations.RetryDelivery(dpb.RetryDeliveryRequest(name=dead[0].name.rsplit("/", 1)[0] + "/999999"))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND

    # Fix the configuration, then retry.
    client.destinations.UpdateDestination(dpb.UpdateDestinationRequest(
        destination=destinations_pb2.Destination(name="destinations/meta-capi", credentials_ref="env:SANDBOX_TOKEN"),
        update_mask={"paths": ["credentials_ref"]}))
    retried = client.destinations.RetryDelivery(dpb.RetryDeliveryRequest(name=dead[0].name)).delivery
    assert retried.status in (STATUS.Value("DELIVERY_STATUS_PENDING"), STATUS.Value("DELIVERY_STATUS_IN_FLIGHT"),
                              STATUS.Value("DELIVERY_STATUS_SUCCEEDED"))
    wait_for(lambda: meta_events(meta), what="the retried purchase")
    done = client.destinations.GetDelivery(dpb.GetDeliveryRequest(name=dead[0].name)).delivery
    assert done.status == STATUS.Value("DELIVERY_STATUS_SUCCEEDED")
    assert done.attempts == 2
    with pytest.raises(grpc.RpcError) as again:
        client.destinations.RetryDelivery(dpb.RetryDeliveryRequest(name=dead[0].name))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# -- consent and age at send time -----------------------------------------------------------------

def test_consent_withdrawn_between_enqueue_and_send_stops_the_send(
        server: StitchgraphServer, client: Client, meta: MetaSandbox) -> None:
    meta_conversions(client, meta)
    client.destinations.PauseDestination(dpb.PauseDestinationRequest(name="destinations/meta-capi"))
    client.identify("u-3", email="three@example.com")
    client.identify("u-4", email="four@example.com")
    client.grant("u-3")
    client.grant("u-4")
    now = datetime.now(UTC)
    client.capture(purchase("evt-u3", "u-3", now), purchase("evt-u4", "u-4", now),
                   purchase("evt-old", "u-4", now - timedelta(days=8)))
    queued = client.deliveries("destinations/meta-capi")
    by_event = {d.event_id: d for d in queued}
    assert by_event["evt-u3"].status == STATUS.Value("DELIVERY_STATUS_PENDING")
    assert by_event["evt-old"].status == STATUS.Value("DELIVERY_STATUS_EXPIRED")  # past Meta's 7 days
    assert by_event["evt-old"].status_reason == "EVENT_TOO_OLD"
    client.grant("u-3", "ad_user_data", state=DENIED)  # withdrawn while queued
    client.destinations.ResumeDestination(dpb.ResumeDestinationRequest(name="destinations/meta-capi"))

    wait_for(lambda: meta_events(meta), what="u-4's purchase")
    skipped = wait_for(lambda: [d for d in client.deliveries(event_id="evt-u3")
                                if d.status == STATUS.Value("DELIVERY_STATUS_SKIPPED_NO_CONSENT")],
                       what="the skipped delivery")
    assert skipped[0].status_reason == "CONSENT_WITHDRAWN" and skipped[0].attempts == 0
    assert [e["event_id"] for e in meta_events(meta)] == ["evt-u4"]


# -- audiences ------------------------------------------------------------------------------------

RULE = 'trait("plan") == "pro" and consent(ad_personalization)'


def meta_audience(client: Client, sandbox: MetaSandbox, destination_id: str = "meta-ca") -> str:
    return client.destination(destination_id, destinations_pb2.DESTINATION_KIND_META_CUSTOM_AUDIENCE,
                              {"audience_id": "2385", "base_url": sandbox.url})


def tiktok_audience(client: Client, sandbox: TikTokSandbox) -> str:
    return client.destination("tiktok-aud", destinations_pb2.DESTINATION_KIND_TIKTOK_AUDIENCE,
                              {"advertiser_id": "7001", "audience_id": "9001", "base_url": sandbox.url})


def google_audience(client: Client, sandbox: GoogleSandbox) -> str:
    return client.destination("google-dm", destinations_pb2.DESTINATION_KIND_GOOGLE_DATA_MANAGER_AUDIENCE,
                              {"operating_account_id": "1234567890", "product_destination_id": "777",
                               "base_url": sandbox.url, "token_url": f"{sandbox.url}/token"},
                              credentials_ref="env:GOOGLE_CREDENTIALS")


def create_audience(client: Client, destinations: list[str], rule: str = RULE) -> str:
    return client.audiences.CreateAudience(audience_service_pb2.CreateAudienceRequest(
        audience_id="pros", audience=audiences_pb2.Audience(display_name="Pros", rule=rule,
                                                            destinations=destinations))).audience.name


def meta_emails(sandbox: MetaSandbox) -> set[str]:
    return {value for row in sandbox.audience_members("2385") for value in row if len(value) == 64}


def tiktok_emails(sandbox: TikTokSandbox) -> set[str]:
    return {h for schema, h in sandbox.audience_members("9001") if schema == "EMAIL_SHA256"}


def test_audience_deltas_arrive_as_adds_and_removes(
        server: StitchgraphServer, client: Client, meta: MetaSandbox, tiktok: TikTokSandbox,
        google: GoogleSandbox) -> None:
    destinations = [meta_audience(client, meta), tiktok_audience(client, tiktok), google_audience(client, google)]
    for name in ("ann", "ben", "cat"):
        client.identify(name, email=f"{name}@example.com", traits={"plan": "pro"})
        client.grant(name)
    client.identify("dan", email="dan@example.com", traits={"plan": "free"})
    client.grant("dan")
    create_audience(client, destinations)
    expected = {sha(f"{n}@example.com") for n in ("ann", "ben", "cat")}
    wait_for(lambda: meta_emails(meta) == expected, what="three adds at Meta")
    wait_for(lambda: tiktok_emails(tiktok) == expected, what="three adds at TikTok")
    wait_for(lambda: google.audience_members("777") == expected, what="three adds at Google")

    client.identify("ben", traits={"plan": "free"})  # leaves by rule
    client.identify("dan", traits={"plan": "pro"})  # joins
    expected = {sha(f"{n}@example.com") for n in ("ann", "cat", "dan")}
    wait_for(lambda: meta_emails(meta) == expected, what="ben removed and dan added at Meta")
    wait_for(lambda: tiktok_emails(tiktok) == expected, what="ben removed and dan added at TikTok")
    wait_for(lambda: google.audience_members("777") == expected, what="ben removed and dan added at Google")
    kinds = {(d.kind, d.status) for d in client.deliveries("destinations/meta-ca")}
    assert (destinations_pb2.DELIVERY_KIND_AUDIENCE_REMOVE, STATUS.Value("DELIVERY_STATUS_SUCCEEDED")) in kinds


def test_erase_removes_the_person_from_every_audience_destination(
        server: StitchgraphServer, client: Client, meta: MetaSandbox, tiktok: TikTokSandbox,
        google: GoogleSandbox) -> None:
    destinations = [meta_audience(client, meta), tiktok_audience(client, tiktok), google_audience(client, google)]
    for name in ("eve", "fay"):
        client.identify(name, email=f"{name}@example.com", traits={"plan": "pro"})
        client.grant(name)
    create_audience(client, destinations)
    both = {sha("eve@example.com"), sha("fay@example.com")}
    wait_for(lambda: meta_emails(meta) == both and tiktok_emails(tiktok) == both
             and google.audience_members("777") == both, what="both added")

    erasure = client.identity.ErasePerson(identity_service_pb2.ErasePersonRequest(
        identifier=common_pb2.Identifier(type="user_id", value="eve"), operator="dpo", reason="DSR-1")).erasure
    assert len(erasure.deliveries) == 3
    wait_for(lambda: meta_emails(meta) == {sha("fay@example.com")}, what="eve removed at Meta")
    wait_for(lambda: tiktok_emails(tiktok) == {sha("fay@example.com")}, what="eve removed at TikTok")
    wait_for(lambda: google.audience_members("777") == {sha("fay@example.com")}, what="eve removed at Google")
    erase_log = client.deliveries(kind=destinations_pb2.DELIVERY_KIND_ERASE)
    assert {d.erasure for d in erase_log} == {erasure.name}

    def completed() -> bool:
        got = client.identity.GetErasure(identity_service_pb2.GetErasureRequest(name=erasure.name)).erasure
        return got.state == identity_pb2.ERASURE_STATE_COMPLETED

    wait_for(completed, what="the erasure to complete")
    # The hashes kept only to be sent are gone once delivered.
    with server.app.db.read() as session:
        from audiences.outbox import DeliveryRow

        payloads = [r.payload for r in session.query(DeliveryRow).filter(DeliveryRow.kind == "ERASE")]
    assert all("keys" not in (p or {}) for p in payloads)


def test_reconcile_replaces_the_meta_list_and_repairs_drift(
        server: StitchgraphServer, client: Client, meta: MetaSandbox) -> None:
    destination = meta_audience(client, meta)
    for name in ("gus", "hal", "ivy"):
        client.identify(name, email=f"{name}@example.com", traits={"plan": "pro"})
        client.grant(name)
    audience = create_audience(client, [destination])
    members = {sha(f"{n}@example.com") for n in ("gus", "hal", "ivy")}
    wait_for(lambda: meta_emails(meta) == members, what="three adds")
    meta.reset()  # drift: the platform list was emptied

    result = client.destinations.ReconcileAudience(dpb.ReconcileAudienceRequest(audience=audience))
    (only,) = result.reconciliations
    assert only.full_replace and only.member_count == 3 and only.delivery_count == 3
    wait_for(lambda: meta_emails(meta) == members, what="the replace session")


# -- a server process killed mid-delivery ---------------------------------------------------------

def test_a_server_killed_mid_delivery_loses_nothing_and_duplicates_only_what_meta_dedups(
        db_url: str, tmp_path: Any, meta: MetaSandbox) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    config = tmp_path / "stitchgraph.toml"
    config.write_text("[delivery]\nworkers = 2\npoll_interval_seconds = 0.05\nlease_seconds = 2.0\n"
                      "request_timeout_seconds = 1.0\nbackoff_base_seconds = 0.05\nbackoff_max_seconds = 0.5\n")
    env = {**os.environ, "STITCHGRAPH_DATABASE_URL": db_url, "STITCHGRAPH_METRICS_ADDRESS": "",
           "STITCHGRAPH_LOG_LEVEL": "WARNING", "STITCHGRAPH_CONFIG": str(config), "SANDBOX_TOKEN": GOOD}

    def start() -> tuple[subprocess.Popen[str], str]:
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--listen", f"127.0.0.1:{port}"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        return process, address

    ids = [f"evt-kill-{i:03d}" for i in range(30)]
    process, address = start()
    try:
        with grpc.insecure_channel(address) as channel:
            client = Client(channel)
            meta_conversions(client, meta)
            client.identify("u-9", email="nine@example.com")
            client.grant("u-9")
            # The platform holds every request for 3 s (and then accepts it): the server dies
            # while its first batches are in flight.
            meta.stall(100, seconds=3.0)
            client.capture(*[purchase(e, "u-9", datetime.now(UTC)) for e in ids])
            wait_for(lambda: any(path.endswith("/events") for _, path, _ in list(meta.requests)) or
                     meta.events_received > 0 or bool(client.deliveries(
                         status=STATUS.Value("DELIVERY_STATUS_IN_FLIGHT"))), what="a batch in flight")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        meta.clear_faults()

        process, address = start()  # a new process claims the rows whose lease ran out
        with grpc.insecure_channel(address) as channel:
            client = Client(channel)
            wait_for(lambda: {e["event_id"] for e in meta_events(meta)} >= set(ids), timeout=30,
                     what="every purchase after the restart")
            wait_for(lambda: all(d.status == STATUS.Value("DELIVERY_STATUS_SUCCEEDED")
                                 for d in client.deliveries("destinations/meta-capi")), what="the log settled")
            assert len(client.deliveries("destinations/meta-capi")) == len(ids)
        accepted = [e["event_id"] for e in meta_events(meta)]
        assert sorted(accepted) == sorted(ids)  # nothing lost; a resend only reached Meta's dedup
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def test_concurrent_workers_of_two_engines_send_each_delivery_once(
        server: StitchgraphServer, client: Client, meta: MetaSandbox) -> None:
    from audiences.delivery import DeliveryEngine

    meta_conversions(client, meta)
    client.identify("u-5", email="five@example.com")
    client.grant("u-5")
    # A second engine on the same database (as a second server process would run) races the
    # server's own workers for every batch.
    other = DeliveryEngine(server.app.db, server.app.consent, replace(FAST, workers=3))
    other.start()
    try:
        ids = [f"evt-race-{i:04d}" for i in range(300)]
        for start in range(0, len(ids), 25):
            client.capture(*[purchase(e, "u-5", datetime.now(UTC)) for e in ids[start:start + 25]])
        wait_for(lambda: len(meta_events(meta)) >= len(ids), timeout=30, what="all purchases")
        time.sleep(0.3)
    finally:
        other.close()
    assert sorted(e["event_id"] for e in meta_events(meta)) == sorted(ids)
    assert meta.duplicate_count == 0  # no delivery was claimed twice
