"""Replaying the whole evidence log into an empty store gives the same persons, traits and
computed traits — checked over gRPC on both stores, SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import json_format

from identity.events.replay import replay_evidence
from stitchgraph.v1 import (
    common_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    events_pb2,
    identity_service_pb2,
    identity_service_pb2_grpc,
)
from tests.support.grpc_client import running_server, server_settings

pb = event_service_pb2
T0 = datetime(2024, 6, 1, 9, 0, tzinfo=UTC)


def at(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat()


def workload(events: event_service_pb2_grpc.EventServiceStub) -> None:
    """Mixed evidence from every input path, out of order, with merges, a refusal and traits."""
    def payloads(kind: int, *items: dict[str, Any]) -> None:
        events.CaptureSourcePayloads(pb.CaptureSourcePayloadsRequest(
            source_kind=kind, json_payloads=[json.dumps(i) for i in items]))

    # PostHog: anonymous browsing, then $identify with traits, a server-side purchase (sent first).
    payloads(events_pb2.SOURCE_KIND_POSTHOG,
             {"event": "Order Completed", "distinct_id": "alice", "uuid": "ph-order-1", "timestamp": at(30),
              "properties": {"$lib": "posthog-python", "revenue": "80.00", "currency": "EUR", "order_id": "o-1"}},
             {"api_key": "phc", "batch": [
                 {"event": "$pageview", "distinct_id": "dev-a", "uuid": f"ph-pv-{i}", "timestamp": at(i),
                  "properties": {"$device_id": "dev-a", "$lib": "web", "$current_url": "https://x.example/"}}
                 for i in range(3)]},
             {"event": "$identify", "distinct_id": "alice", "uuid": "ph-id-1", "timestamp": at(10),
              "properties": {"$anon_distinct_id": "dev-a",
                             "$set": {"email": "alice@example.com", "plan": "pro"},
                             "$set_once": {"first_touch": "ad"}}},
             {"event": "$set", "distinct_id": "alice", "uuid": "ph-set-1", "timestamp": at(5),
              "properties": {"$set": {"plan": "free"}, "$set_once": {"first_touch": "organic"}}})
    # Segment: another person on the same device later (refused: two user IDs), an alias, a refund.
    payloads(events_pb2.SOURCE_KIND_SEGMENT,
             {"type": "identify", "userId": "bob", "anonymousId": "dev-a", "messageId": "sg-id-bob",
              "timestamp": at(40), "traits": {"email": "bob@example.com", "country": "FR"}},
             {"type": "alias", "previousId": "anon-bob-2", "anonymousId": "anon-bob-2", "userId": "bob",
              "messageId": "sg-alias-1", "timestamp": at(41)},
             {"type": "track", "event": "Order Completed", "userId": "bob", "messageId": "sg-order-2",
              "timestamp": at(45), "properties": {"total": 15.5, "currency": "USD", "order_id": "o-2",
                                                  "products": [{"product_id": "sku-1", "price": 15.5,
                                                                "quantity": 1}]}},
             {"type": "track", "event": "Order Refunded", "userId": "alice", "messageId": "sg-refund-1",
              "timestamp": at(50), "properties": {"revenue": "30", "currency": "EUR", "order_id": "o-1"}},
             {"type": "identify", "userId": "bob", "messageId": "sg-id-bob-2", "timestamp": at(39),
              "traits": {"country": "DE", "city": "Lyon"}})
    # Heap: user properties and a track call.
    payloads(events_pb2.SOURCE_KIND_HEAP,
             {"app_id": "1", "users": [{"identity": "carol", "properties": {"tier": "gold"}}]},
             {"app_id": "1", "events": [{"identity": "carol", "event": "Signed Up", "timestamp": at(60),
                                         "idempotency_key": "hp-1"}]})
    # gRPC: an unset that beats the earlier city, and a purchase for carol.
    unset = events_pb2.Event(event="profile_update", event_id="grpc-unset", identifiers=[
        common_pb2.Identifier(type="user_id", value="bob")])
    unset.occurred_at.FromDatetime(T0 + timedelta(minutes=42))
    unset.trait_updates.unset.append("city")
    purchase = events_pb2.Event(event="purchase", event_id="grpc-order-3", value="9.99", currency="GBP",
                                order_id="o-3", identifiers=[common_pb2.Identifier(type="user_id", value="carol")])
    purchase.occurred_at.FromDatetime(T0 + timedelta(minutes=61))
    events.CaptureBatch(pb.CaptureBatchRequest(events=[unset, purchase]))


PROBES = [("user_id", "alice"), ("user_id", "bob"), ("user_id", "carol"), ("anonymous_id", "dev-a"),
          ("anonymous_id", "anon-bob-2")]


def snapshot(channel: grpc.Channel) -> dict[str, Any]:
    """Persons (ID → identifiers) and each person's traits, as a client sees them."""
    identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
    events = event_service_pb2_grpc.EventServiceStub(channel)
    persons: dict[str, Any] = {}
    for type_, value in PROBES:
        person = identity.LookupPerson(identity_service_pb2.LookupPersonRequest(
            identifier=common_pb2.Identifier(type=type_, value=value))).person
        traits = events.ListPersonTraits(pb.ListPersonTraitsRequest(parent=person.name)).traits
        event_ids = [e.event_id for e in events.ListPersonEvents(pb.ListPersonEventsRequest(
            parent=person.name)).events]
        persons[person.person_id] = {
            "identifiers": sorted((i.type, i.value) for i in person.identifiers),
            "traits": {t.key: (json_format.MessageToDict(t.value), t.kind, t.source, t.event_id) for t in traits},
            "events": event_ids,
        }
    return persons


def test_replaying_the_evidence_log_into_an_empty_store_gives_the_same_state(db_url: str,
                                                                              second_db_url: str) -> None:
    with running_server(server_settings(db_url)) as original, \
            grpc.insecure_channel(f"127.0.0.1:{original.port}") as channel:
        workload(event_service_pb2_grpc.EventServiceStub(channel))
        before = snapshot(channel)
        with running_server(server_settings(second_db_url)) as replayed, \
                grpc.insecure_channel(f"127.0.0.1:{replayed.port}") as replay_channel:
            results = replay_evidence(original.app.db, replayed.app.events, batch_size=4, reverse=True)
            assert {r.status for r in results} == {"ACCEPTED"}
            after = snapshot(replay_channel)
    assert after == before
    # The state is the interesting one: merges, a refusal, folded and computed traits.
    alice = next(p for p in before.values() if ("user_id", "alice") in p["identifiers"])
    bob = next(p for p in before.values() if ("user_id", "bob") in p["identifiers"])
    assert ("anonymous_id", "dev-a") in alice["identifiers"] and ("anonymous_id", "dev-a") not in bob["identifiers"]
    assert ("anonymous_id", "anon-bob-2") in bob["identifiers"]
    assert alice["traits"]["plan"][0] == "pro" and alice["traits"]["first_touch"][0] == "organic"
    assert alice["traits"]["lifetime_value"][0] == {"EUR": "50"}
    assert bob["traits"]["country"][0] == "FR" and "city" not in bob["traits"]
    assert bob["traits"]["lifetime_value"][0] == {"USD": "15.5"}
