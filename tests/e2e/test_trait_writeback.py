"""Computed traits written back to PostHog and Heap over the outbox, on SQLite and
PostgreSQL: audience membership, lifetime value and match quality appear at the sandboxes
as accepted person/user properties, once per change, and only with analytics consent."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
import pytest

from server.grpc_server import StitchgraphServer
from stitchgraph.v1 import audience_service_pb2, audiences_pb2, destinations_pb2
from tests.e2e.test_delivery import FAST, Client, purchase, wait_for
from tests.sandboxes.base import running
from tests.sandboxes.heap import HeapSandbox
from tests.sandboxes.posthog import PostHogSandbox
from tests.support.grpc_client import running_server, server_settings

KIND = destinations_pb2.DeliveryKind
STATUS = destinations_pb2.DeliveryStatus
AUDIENCE_TRAIT = "stitchgraph_audience_pros"


@pytest.fixture
def posthog() -> Iterator[PostHogSandbox]:
    with running(PostHogSandbox()) as sandbox:
        yield sandbox  # type: ignore[misc]


@pytest.fixture
def heap() -> Iterator[HeapSandbox]:
    with running(HeapSandbox(app_ids={"11111"})) as sandbox:
        yield sandbox  # type: ignore[misc]


@pytest.fixture
def server(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[StitchgraphServer]:
    monkeypatch.setenv("POSTHOG_PROJECT_TOKEN", "phc_sandbox")
    monkeypatch.setenv("HEAP_APP_ID", "11111")
    with running_server(server_settings(db_url, delivery=FAST)) as handle:
        yield handle


@pytest.fixture
def client(channel: grpc.Channel) -> Client:
    return Client(channel)


def trait_destinations(client: Client, posthog: PostHogSandbox, heap: HeapSandbox) -> None:
    client.destination("posthog-traits", destinations_pb2.DESTINATION_KIND_POSTHOG_TRAITS,
                       {"host": posthog.url, "traits": ["audiences", "lifetime_value", "match_quality"]},
                       credentials_ref="env:POSTHOG_PROJECT_TOKEN")
    client.destination("heap-traits", destinations_pb2.DESTINATION_KIND_HEAP_TRAITS,
                       {"host": heap.url, "traits": ["audience:pros"]}, credentials_ref="env:HEAP_APP_ID")
    client.audiences.CreateAudience(audience_service_pb2.CreateAudienceRequest(
        audience_id="pros", audience=audiences_pb2.Audience(display_name="Pros", rule='trait("plan") == "pro"')))


def trait_deliveries(client: Client, destination: str) -> list[destinations_pb2.Delivery]:
    return client.deliveries(f"destinations/{destination}", kind=KIND.DELIVERY_KIND_TRAIT_UPDATE)


def settled(client: Client) -> bool:
    open_ = {STATUS.DELIVERY_STATUS_PENDING, STATUS.DELIVERY_STATUS_IN_FLIGHT, STATUS.DELIVERY_STATUS_RETRYING}
    return all(d.status not in open_ for d in client.deliveries())


def test_computed_traits_reach_posthog_and_heap_once_per_change(
        server: StitchgraphServer, client: Client, posthog: PostHogSandbox, heap: HeapSandbox) -> None:
    trait_destinations(client, posthog, heap)
    client.identify("u-1", email="ada@example.com", traits={"plan": "pro"})
    client.grant("u-1", "analytics")
    wait_for(lambda: posthog.person_properties("u-1").get(AUDIENCE_TRAIT) is True, what="PostHog $set")
    wait_for(lambda: heap.user_properties("u-1").get(AUDIENCE_TRAIT) == "true", what="Heap user property")
    assert posthog.person_properties("u-1")["stitchgraph_match_quality"] == "medium"

    # Something that changes none of the written traits sends nothing.
    client.identify("u-1", traits={"nickname": "ada"})
    wait_for(lambda: settled(client), what="deliveries settled")
    assert posthog.set_calls("u-1") == 1
    assert heap.calls("u-1") == 1

    # A purchase changes lifetime value (PostHog only); the plan change flips membership (both).
    client.capture(purchase("order-1", "u-1", datetime.now(UTC), value="20.00", currency="EUR"))
    wait_for(lambda: posthog.person_properties("u-1").get("stitchgraph_lifetime_value_eur") == 20.0,
             what="lifetime value")
    client.identify("u-1", traits={"plan": "free"})
    wait_for(lambda: posthog.person_properties("u-1").get(AUDIENCE_TRAIT) is False, what="PostHog false")
    wait_for(lambda: heap.user_properties("u-1").get(AUDIENCE_TRAIT) == "false", what="Heap false")
    wait_for(lambda: settled(client), what="deliveries settled")
    assert posthog.set_calls("u-1") == 3
    assert heap.calls("u-1") == 2
    assert all(d.status == STATUS.DELIVERY_STATUS_SUCCEEDED for d in trait_deliveries(client, "heap-traits"))


def test_without_analytics_consent_no_trait_is_written(
        server: StitchgraphServer, client: Client, posthog: PostHogSandbox, heap: HeapSandbox) -> None:
    trait_destinations(client, posthog, heap)
    client.identify("u-2", traits={"plan": "pro"})
    client.identify("u-3", traits={"plan": "pro"})
    client.grant("u-3", "analytics")
    wait_for(lambda: heap.user_properties("u-3").get(AUDIENCE_TRAIT) == "true", what="u-3 written")
    wait_for(lambda: settled(client), what="deliveries settled")
    assert posthog.person_properties("u-2") == {}
    assert heap.user_properties("u-2") == {}
    # A later grant sends every value.
    client.grant("u-2", "analytics")
    wait_for(lambda: heap.user_properties("u-2").get(AUDIENCE_TRAIT) == "true", what="u-2 written after grant")
