"""The Heap Segments Sync route's signature gate: only a delivery signed with the source's secret,
inside the timestamp window, reaches the cohort service; anything else is refused and applies
nothing. The cohort service is a small recording fake here (the route's contract with it is two
calls); Heap deliveries into the real cohort service are tested end to end with it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.app import Application, build_application
from server.config import Settings, WebhookSettings
from server.http_ingress import Reply, WebhookIngress
from server.webhook_auth import heap_hash
from stitchgraph.errors import FieldViolation, InvalidArgument, NotFound

SECRET = "heap-webhook-secret"
NOW = 1_700_000_000.0
NOW_MS = int(NOW * 1000)


class RecordingCohorts:
    """Knows one HEAP_WEBHOOK source and records what it is asked to apply."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, dict[str, Any], int]] = []
        self.refuse_with: Exception | None = None

    def heap_webhook_secret(self, cohort_source_id: str) -> str:
        if cohort_source_id == "heap-without-secret":
            return ""
        if cohort_source_id != "heap-segments":
            raise NotFound(f"cohort source {cohort_source_id!r} not found")
        return SECRET

    def apply_heap_sync(self, cohort_source_id: str, payload: dict[str, Any], received_us: int) -> dict[str, Any]:
        if self.refuse_with is not None:
            raise self.refuse_with
        self.applied.append((cohort_source_id, payload, received_us))
        return {"status": "APPLIED", "added": len(payload["data"].get("add", []))}


def sync_body(page: int = 1) -> bytes:
    return json.dumps({
        "id_token": "7a36ae58-c4b9-11eb-8529-0242ac130003", "action_type": "segment.users.sync",
        "customer_config": {"fields": []},
        "data": {"segment": {"id": 1338065, "name": "Free Customers"},
                 "sync_info": {"page_number": page, "total_pages": 2, "sync_task_id": "afe74af0"},
                 "add": [{"id": "user1@example.com"}, {"id": "user2@example.com"}]},
    }, separators=(",", ":")).encode()


@pytest.fixture
def application(tmp_path: Path) -> Iterator[Application]:
    # The Heap route never touches the store; a real application keeps the wiring honest.
    app = build_application(Settings(database_url=f"sqlite:///{tmp_path}/unused.db", metrics_address=None))
    try:
        yield app
    finally:
        app.close()


@pytest.fixture
def cohorts() -> RecordingCohorts:
    return RecordingCohorts()


@pytest.fixture
def ingress(application: Application, cohorts: RecordingCohorts) -> WebhookIngress:
    ingress = WebhookIngress(app=application, settings=WebhookSettings(listen="127.0.0.1:0"), secrets={},
                             cohorts=cohorts, clock=lambda: NOW)
    ingress.serving.set()
    return ingress


def post(ingress: WebhookIngress, body: bytes, heap_hash_header: str | None, source: str = "heap-segments") -> Reply:
    route = ingress.route(f"/webhooks/heap/{source}")
    assert route is not None
    headers = {"content-type": "application/json"}
    if heap_hash_header is not None:
        headers["heap-hash"] = heap_hash_header
    return ingress.handle(route, headers, body)


def test_a_signed_delivery_is_applied_once_with_its_receive_time(ingress: WebhookIngress,
                                                                 cohorts: RecordingCohorts) -> None:
    body = sync_body()
    reply = post(ingress, body, heap_hash(SECRET, NOW_MS - 2_000, body))
    assert reply.status == 200
    assert reply.body == {"summary": {"status": "APPLIED", "added": 2}}
    assert cohorts.applied == [("heap-segments", json.loads(body), int(NOW * 1_000_000))]


@pytest.mark.parametrize("header", [
    heap_hash("another-secret", NOW_MS, sync_body()),  # forged: wrong secret
    heap_hash(SECRET, NOW_MS, sync_body(page=2)),  # signed for another body
    heap_hash(SECRET, NOW_MS - 60_001, sync_body()),  # stale: outside the 60 s window
    heap_hash(SECRET, NOW_MS + 5_001, sync_body()),  # too far in the future
    f"ts:{NOW_MS}",  # no MAC
    None,  # no header
])
def test_a_forged_stale_or_missing_signature_is_401_and_applies_nothing(
        header: str | None, ingress: WebhookIngress, cohorts: RecordingCohorts) -> None:
    reply = post(ingress, sync_body(), header)
    assert reply.status == 401
    assert SECRET not in json.dumps(reply.body)
    assert cohorts.applied == []


def test_the_window_is_configurable(application: Application, cohorts: RecordingCohorts) -> None:
    ingress = WebhookIngress(app=application, secrets={}, cohorts=cohorts, clock=lambda: NOW,
                             settings=WebhookSettings(listen="127.0.0.1:0", heap_max_age_seconds=300))
    ingress.serving.set()
    body = sync_body()
    assert post(ingress, body, heap_hash(SECRET, NOW_MS - 120_000, body)).status == 200


def test_an_unknown_cohort_source_is_404(ingress: WebhookIngress, cohorts: RecordingCohorts) -> None:
    body = sync_body()
    reply = post(ingress, body, heap_hash(SECRET, NOW_MS, body), source="not-a-heap-source")
    assert (reply.status, reply.body["error"]["reason"]) == (404, "UNKNOWN_COHORT_SOURCE")
    assert cohorts.applied == []


def test_a_source_without_a_secret_accepts_nothing_even_signed_with_the_empty_key(
        ingress: WebhookIngress, cohorts: RecordingCohorts) -> None:
    body = sync_body()
    reply = post(ingress, body, heap_hash("", NOW_MS, body), source="heap-without-secret")
    assert reply.status == 404
    assert cohorts.applied == []


def test_a_signed_body_that_is_not_a_json_object_is_400(ingress: WebhookIngress, cohorts: RecordingCohorts) -> None:
    for body in (b"[1, 2]", b"{not json"):
        reply = post(ingress, body, heap_hash(SECRET, NOW_MS, body))
        assert (reply.status, reply.body["error"]["reason"]) == (400, "INVALID_PAYLOAD")
    assert cohorts.applied == []


def test_a_delivery_the_cohort_service_refuses_is_400_with_its_violations(
        ingress: WebhookIngress, cohorts: RecordingCohorts) -> None:
    cohorts.refuse_with = InvalidArgument("data.sync_info.page_number: required",
                                          violations=[FieldViolation("data.sync_info.page_number", "required",
                                                                     "REQUIRED")])
    body = sync_body()
    reply = post(ingress, body, heap_hash(SECRET, NOW_MS, body))
    assert reply.status == 400
    assert reply.body["error"]["violations"] == [{"field": "data.sync_info.page_number", "description": "required",
                                                  "reason": "REQUIRED"}]


def test_no_cohort_service_means_no_heap_sources(application: Application) -> None:
    ingress = WebhookIngress(app=application, settings=WebhookSettings(listen="127.0.0.1:0"), secrets={})
    ingress.serving.set()
    body = sync_body()
    assert post(ingress, body, heap_hash(SECRET, NOW_MS, body)).status == 404


def test_nothing_is_applied_while_the_server_is_not_serving(ingress: WebhookIngress,
                                                            cohorts: RecordingCohorts) -> None:
    ingress.serving.clear()
    body = sync_body()
    reply = post(ingress, body, heap_hash(SECRET, NOW_MS, body))
    assert reply.status == 503 and ("Retry-After", "5") in reply.headers
    assert cohorts.applied == []
