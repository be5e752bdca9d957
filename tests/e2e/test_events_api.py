"""EventService end to end over gRPC, on SQLite and PostgreSQL: the reference trace,
cross-source dedup, per-event rejections, traits and computed traits, the registry."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from stitchgraph.v1 import (
    common_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    events_pb2,
    identity_service_pb2,
    identity_service_pb2_grpc,
)
from tests.support.grpc_client import rich_error, running_server, server_settings

pb = event_service_pb2
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
EMAIL = "Jane.Doe@Example.com"
EMAIL_SHA256 = hashlib.sha256(b"jane.doe@example.com").hexdigest()
ACCEPTED = events_pb2.CAPTURE_STATUS_ACCEPTED
DUPLICATE = events_pb2.CAPTURE_STATUS_DUPLICATE
REJECTED = events_pb2.CAPTURE_STATUS_REJECTED
PARKED = events_pb2.CAPTURE_STATUS_PARKED


class Client:
    def __init__(self, channel: grpc.Channel) -> None:
        self.events = event_service_pb2_grpc.EventServiceStub(channel)
        self.identity = identity_service_pb2_grpc.IdentityServiceStub(channel)

    def traits(self, person: str) -> dict[str, events_pb2.Trait]:
        response = self.events.ListPersonTraits(pb.ListPersonTraitsRequest(parent=person, page_size=1000))
        return {t.key: t for t in response.traits}

    def trait_values(self, person: str) -> dict[str, Any]:
        return {k: json_format.MessageToDict(t.value) for k, t in self.traits(person).items()}

    def person_events(self, person: str, **kwargs: Any) -> list[events_pb2.Event]:
        return list(self.events.ListPersonEvents(pb.ListPersonEventsRequest(parent=person, page_size=1000,
                                                                            **kwargs)).events)

    def person_of(self, type_: str, value: str) -> str:
        response = self.identity.LookupPerson(identity_service_pb2.LookupPersonRequest(
            identifier=common_pb2.Identifier(type=type_, value=value)))
        return response.person.name

    def payloads(self, kind: int, *payloads: Any, source: str = "") -> event_service_pb2.CaptureSourcePayloadsResponse:
        return self.events.CaptureSourcePayloads(pb.CaptureSourcePayloadsRequest(
            source_kind=kind, json_payloads=[p if isinstance(p, str) else json.dumps(p) for p in payloads],
            source=source))


@pytest.fixture
def client(db_url: str) -> Iterator[Client]:
    with running_server(server_settings(db_url)) as handle, \
            grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        yield Client(channel)


def ts(moment: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(moment)
    return out


def ident(type_: str, value: str) -> common_pb2.Identifier:
    return common_pb2.Identifier(type=type_, value=value)


def event(name: str, at: datetime, *identifiers: common_pb2.Identifier, **fields: Any) -> events_pb2.Event:
    return events_pb2.Event(event=name, occurred_at=ts(at), identifiers=list(identifiers), **fields)


def test_reference_trace_stitches_one_person_with_one_purchase(client: Client) -> None:
    anonymous = [event("page_view", T0 + timedelta(minutes=i), ident("anonymous_id", "anon-1"),
                       event_id=f"pv-{i}", context=events_pb2.EventContext(page_url=f"https://shop.example/p/{i}"))
                 for i in range(3)]
    batch = client.events.CaptureBatch(pb.CaptureBatchRequest(events=anonymous))
    assert [r.status for r in batch.results] == [ACCEPTED] * 3
    identify = events_pb2.Event(
        event="profile_update", event_id="identify-1", occurred_at=ts(T0 + timedelta(minutes=5)),
        identifiers=[ident("user_id", "u-42"), ident("email_sha256", EMAIL_SHA256), ident("anonymous_id", "anon-1")])
    identify.trait_updates.set.update({"plan": "pro", "country": "DE"})
    assert client.events.Capture(pb.CaptureRequest(event=identify)).status == ACCEPTED
    purchase = event("purchase", T0 + timedelta(minutes=9), ident("user_id", "u-42"), event_id="order-1001",
                     value="129.90", currency="EUR", order_id="1001")
    captured = client.events.Capture(pb.CaptureRequest(event=purchase))
    assert captured.status == ACCEPTED
    person = captured.receipt.person

    # One person: the anonymous events, the identify and the purchase all resolve to it.
    assert client.person_of("anonymous_id", "anon-1") == person
    assert client.person_of("email_sha256", EMAIL_SHA256) == person
    events = client.person_events(person)
    assert [e.event for e in events] == ["purchase", "profile_update", "page_view", "page_view", "page_view"]
    assert [e.event_id for e in client.person_events(person, filter='event = "purchase"')] == ["order-1001"]
    # The email hash is reachable from the purchase's person.
    got = client.events.GetEvent(pb.GetEventRequest(name="events/order-1001")).event
    assert got.person == person and got.value == "129.9" and got.currency == "EUR" and got.order_id == "1001"
    held = client.identity.GetPerson(identity_service_pb2.GetPersonRequest(name=got.person)).person
    assert ("email_sha256", EMAIL_SHA256) in {(i.type, i.value) for i in held.identifiers}
    # Traits and computed traits.
    values = client.trait_values(person)
    assert values["plan"] == "pro" and values["country"] == "DE"
    assert values["purchase_count"] == 1
    assert values["lifetime_value"] == {"EUR": "129.9"}
    assert values["last_purchase_at"] == "2024-03-01T12:09:00Z"
    assert values["last_seen_at"] == "2024-03-01T12:09:00Z"
    assert values["event_count"] == 5
    traits = client.traits(person)
    assert traits["plan"].source == "grpc" and traits["plan"].event_id == "identify-1"
    assert traits["plan"].kind == events_pb2.TRAIT_KIND_SET
    assert traits["purchase_count"].kind == events_pb2.TRAIT_KIND_COMPUTED


def test_reference_trace_from_source_payloads(client: Client) -> None:
    """The same trace as PostHog sends it: anonymous pageviews, $identify, a server-side purchase."""
    pageviews = {"api_key": "phc_test", "batch": [
        {"event": "$pageview", "distinct_id": "ph-anon-1", "uuid": f"0190-pv-{i}",
         "timestamp": (T0 + timedelta(minutes=i)).isoformat(),
         "properties": {"$device_id": "ph-anon-1", "$current_url": "https://shop.example/", "$lib": "web"}}
        for i in range(2)]}
    identify = {"api_key": "phc_test", "event": "$identify", "distinct_id": "u-7", "uuid": "0190-id-1",
                "timestamp": (T0 + timedelta(minutes=3)).isoformat(),
                "properties": {"$anon_distinct_id": "ph-anon-1", "$set": {"email": EMAIL, "plan": "team"}}}
    purchase = {"api_key": "phc_test", "event": "Order Completed", "distinct_id": "u-7", "uuid": "0190-order-9",
                "timestamp": (T0 + timedelta(minutes=8)).isoformat(),
                "properties": {"$lib": "posthog-python", "revenue": 49.99, "currency": "usd", "order_id": "9"}}
    response = client.payloads(events_pb2.SOURCE_KIND_POSTHOG, pageviews, identify, purchase)
    statuses = [r.status for p in response.results for r in p.results]
    assert statuses == [ACCEPTED] * 4, response
    person = response.results[2].results[0].receipt.person
    assert client.person_of("anonymous_id", "ph-anon-1") == person
    assert client.person_of("email_sha256", EMAIL_SHA256) == person
    values = client.trait_values(person)
    assert values["lifetime_value"] == {"USD": "49.99"} and values["purchase_count"] == 1
    assert values["plan"] == "team" and "email" not in values


def test_same_purchase_from_posthog_and_segment_is_stored_once(client: Client) -> None:
    posthog = {"event": "Order Completed", "distinct_id": "u-1", "uuid": "evt-shared-1", "api_key": "phc_x",
               "timestamp": T0.isoformat(),
               "properties": {"$lib": "posthog-node", "revenue": "20.00", "currency": "EUR", "order_id": "A-1"}}
    segment = {"type": "track", "event": "Order Completed", "userId": "u-1", "messageId": "evt-shared-1",
               "timestamp": T0.isoformat(), "properties": {"revenue": 20, "currency": "EUR", "order_id": "A-1"}}
    first = client.payloads(events_pb2.SOURCE_KIND_POSTHOG, posthog).results[0].results[0]
    second = client.payloads(events_pb2.SOURCE_KIND_SEGMENT, segment).results[0].results[0]
    assert first.status == ACCEPTED and first.receipt.event_id == "evt-shared-1"
    assert second.status == DUPLICATE
    assert second.receipt.event_id == "evt-shared-1"
    assert second.receipt.receive_time == first.receipt.receive_time
    person = client.person_of("user_id", "u-1")
    assert [e.event_id for e in client.person_events(person)] == ["evt-shared-1"]
    values = client.trait_values(person)
    assert values["purchase_count"] == 1 and values["lifetime_value"] == {"EUR": "20"}
    # A retry of the gRPC form with the same event_id is a duplicate too.
    retry = client.events.Capture(pb.CaptureRequest(event=event(
        "purchase", T0, ident("user_id", "u-1"), event_id="evt-shared-1", value="20", currency="EUR",
        order_id="A-1")))
    assert retry.status == DUPLICATE and retry.receipt.event_id == "evt-shared-1"


def test_batch_with_one_malformed_event_stores_the_others(client: Client) -> None:
    good = [event("page_view", T0, ident("anonymous_id", f"a-{i}"), event_id=f"ok-{i}") for i in range(2)]
    bad = event("purchase", T0 + timedelta(days=3650), ident("email", "not-an-email"), event_id="bad-1",
                value="12,50", currency="EURO")
    response = client.events.CaptureBatch(pb.CaptureBatchRequest(events=[good[0], bad, good[1]]))
    assert [r.status for r in response.results] == [ACCEPTED, REJECTED, ACCEPTED]
    assert response.summary.accepted_count == 2 and response.summary.rejected_count == 1
    rejected = response.results[1]
    assert rejected.index == 1 and rejected.reason == "INVALID_EVENT" and rejected.event_id == "bad-1"
    fields = {v.field: v for v in rejected.violations}
    assert set(fields) == {"occurred_at", "identifiers[0].value", "value", "currency", "order_id"}
    assert fields["occurred_at"].reason == "TIMESTAMP_IN_FUTURE"
    assert fields["currency"].reason == "INVALID_CURRENCY"
    assert fields["order_id"].reason == "REQUIRED"
    assert "not-an-email" not in str(rejected)
    for i in range(2):
        assert client.events.GetEvent(pb.GetEventRequest(name=f"events/ok-{i}")).event.event_id == f"ok-{i}"
    with pytest.raises(grpc.RpcError) as missing:
        client.events.GetEvent(pb.GetEventRequest(name="events/bad-1"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_unary_capture_rejects_with_field_violations_and_stores_nothing(client: Client) -> None:
    bad = event("refund", T0, ident("user_id", "u-9"), event_id="r-1", value="5")
    with pytest.raises(grpc.RpcError) as failure:
        client.events.Capture(pb.CaptureRequest(event=bad))
    error = rich_error(failure.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(error.field_violations) == {"event.currency", "event.order_id"}
    with pytest.raises(grpc.RpcError):
        client.person_of("user_id", "u-9")


def test_oversized_batch_is_invalid_argument(client: Client) -> None:
    events = [event("page_view", T0, ident("anonymous_id", "x"), event_id=f"e{i}") for i in range(1001)]
    with pytest.raises(grpc.RpcError) as failure:
        client.events.CaptureBatch(pb.CaptureBatchRequest(events=events))
    assert rich_error(failure.value).reason == "BATCH_TOO_LARGE"


def test_unmapped_events_are_parked_with_a_readable_reason(client: Client) -> None:
    segment = {"type": "track", "event": "Coupon Applied", "userId": "u-3", "messageId": "m-coupon",
               "timestamp": T0.isoformat(), "properties": {"coupon": "SPRING"}}
    result = client.payloads(events_pb2.SOURCE_KIND_SEGMENT, segment).results[0].results[0]
    assert result.status == PARKED and result.reason == "UNMAPPED_EVENT"
    assert "Coupon Applied" in result.violations[0].description
    parked = client.events.ListParkedEvents(pb.ListParkedEventsRequest()).parked_events
    assert [(p.source, p.source_event, p.reason) for p in parked] == [("segment", "Coupon Applied", "UNMAPPED_EVENT")]
    # Once a mapping is approved, the same source event is accepted.
    client.events.CreateEventMapping(pb.CreateEventMappingRequest(event_mapping=events_pb2.EventMapping(
        source="segment", source_event="Coupon Applied", canonical_event="add_payment_info",
        status=events_pb2.EVENT_MAPPING_STATUS_APPROVED)))
    again = dict(segment, messageId="m-coupon-2")
    assert client.payloads(events_pb2.SOURCE_KIND_SEGMENT, again).results[0].results[0].status == ACCEPTED


def test_default_registry_and_mapping_lifecycle(client: Client) -> None:
    listed = client.events.ListEventMappings(pb.ListEventMappingsRequest(page_size=1000)).event_mappings
    defaults = {(m.source_event, m.canonical_event) for m in listed}
    for pair in [("Purchase Completed", "purchase"), ("Order Completed", "purchase"),
                 ("Checkout Started", "begin_checkout"), ("Signed Up", "sign_up"), ("Lead Submitted", "lead"),
                 ("Product Viewed", "view_content"), ("Product Added", "add_to_cart"),
                 ("Trial Started", "start_trial"), ("Payment Info Completed", "add_payment_info"),
                 ("Lead Form Qualified", "qualify_lead"), ("page", "page_view"), ("identify", "profile_update")]:
        assert pair in defaults
    created = client.events.CreateEventMapping(pb.CreateEventMappingRequest(
        event_mapping_id="demo-booked", event_mapping=events_pb2.EventMapping(
            source_event="Demo Booked", canonical_event="qualify_lead", required_properties=["plan"],
            status=events_pb2.EVENT_MAPPING_STATUS_DRAFT))).event_mapping
    assert created.name == "eventMappings/demo-booked" and created.etag
    draft = client.events.CaptureBatch(pb.CaptureBatchRequest(events=[
        event("Demo Booked", T0, ident("user_id", "u-5"), event_id="d-1")])).results[0]
    assert draft.status == PARKED and draft.reason == "MAPPING_NOT_APPROVED"
    approved = client.events.UpdateEventMapping(pb.UpdateEventMappingRequest(
        event_mapping=events_pb2.EventMapping(name=created.name, etag=created.etag,
                                              status=events_pb2.EVENT_MAPPING_STATUS_APPROVED),
        update_mask={"paths": ["status"]})).event_mapping
    assert approved.status == events_pb2.EVENT_MAPPING_STATUS_APPROVED and approved.required_properties == ["plan"]
    missing = client.events.CaptureBatch(pb.CaptureBatchRequest(events=[
        event("Demo Booked", T0, ident("user_id", "u-5"), event_id="d-2")])).results[0]
    assert missing.status == REJECTED and [v.field for v in missing.violations] == ["properties.plan"]
    with_plan = event("Demo Booked", T0, ident("user_id", "u-5"), event_id="d-3")
    with_plan.properties.update({"plan": "enterprise"})
    stored = client.events.CaptureBatch(pb.CaptureBatchRequest(events=[with_plan])).results[0]
    assert stored.status == ACCEPTED and stored.receipt.canonical_event == "qualify_lead"
    with pytest.raises(grpc.RpcError) as stale:
        client.events.UpdateEventMapping(pb.UpdateEventMappingRequest(
            event_mapping=events_pb2.EventMapping(name=created.name, etag=created.etag, description="x"),
            update_mask={"paths": ["description"]}))
    assert stale.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.RpcError) as unknown:
        client.events.CreateEventMapping(pb.CreateEventMappingRequest(event_mapping=events_pb2.EventMapping(
            source_event="X", canonical_event="not_a_thing")))
    assert rich_error(unknown.value).field_violations.keys() == {"event_mapping.canonical_event"}


def test_traits_fold_by_event_time_not_arrival(client: Client) -> None:
    def traits_event(event_id: str, at: datetime, **updates: Any) -> events_pb2.Event:
        e = event("profile_update", at, ident("user_id", "u-t"), event_id=event_id)
        if "set" in updates:
            e.trait_updates.set.update(updates["set"])
        if "set_once" in updates:
            e.trait_updates.set_once.update(updates["set_once"])
        e.trait_updates.unset.extend(updates.get("unset", []))
        return e

    # Arrive out of order: the later event first.
    later = traits_event("t-2", T0 + timedelta(hours=2), set={"plan": "pro"}, set_once={"first_plan": "pro"})
    earlier = traits_event("t-1", T0, set={"plan": "free", "city": "Berlin"}, set_once={"first_plan": "free"})
    removal = traits_event("t-3", T0 + timedelta(hours=1), unset=["city"])
    client.events.CaptureBatch(pb.CaptureBatchRequest(events=[later, removal]))
    client.events.CaptureBatch(pb.CaptureBatchRequest(events=[earlier]))
    person = client.person_of("user_id", "u-t")
    values = client.trait_values(person)
    assert values["plan"] == "pro" and values["first_plan"] == "free" and "city" not in values
    traits = client.traits(person)
    assert traits["first_plan"].kind == events_pb2.TRAIT_KIND_SET_ONCE and traits["first_plan"].event_id == "t-1"


def test_identify_traits_are_trait_evidence(client: Client) -> None:
    request = identity_service_pb2.IdentifyRequest(
        identifiers=[ident("user_id", "u-i")], occurred_at=ts(T0), source="crm", event_id="crm-1")
    request.traits.update({"tier": "gold", "email": EMAIL})
    person = client.identity.Identify(request).person
    assert (("email_sha256", EMAIL_SHA256)) in {(i.type, i.value) for i in person.identifiers}
    traits = client.traits(person.name)
    assert json_format.MessageToDict(traits["tier"].value) == "gold" and traits["tier"].source == "crm"
    assert "email" not in traits


def test_capture_stream_commits_each_message(client: Client) -> None:
    def requests() -> Iterator[event_service_pb2.CaptureStreamRequest]:
        for chunk in range(3):
            yield pb.CaptureStreamRequest(events=[
                event("page_view", T0, ident("anonymous_id", f"s-{chunk}-{i}"), event_id=f"s-{chunk}-{i}")
                for i in range(4)], omit_accepted_results=True)
        yield pb.CaptureStreamRequest(events=[event("page_view", T0, ident("anonymous_id", "s-0-0"),
                                                    event_id="s-0-0")])

    response = client.events.CaptureStream(requests())
    assert response.summary.received_count == 13 and response.summary.accepted_count == 12
    assert [(r.index, r.status) for r in response.results] == [(12, DUPLICATE)]
