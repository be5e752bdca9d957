"""The event ledger over the real stores (SQLite and PostgreSQL): typing of untyped source
IDs across batches, exact money, event-ID derivation, traits across merges, splits and
erasure, unmapped handling and validate-only."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from identity.events.capture import EventLedger, EventSettings
from identity.events.incoming import IncomingEvent
from identity.events.models import EventRow, TraitEvidenceRow
from identity.events.queries import person_traits
from identity.events.registry import SchemaRegistry
from identity.events.sources import parse
from identity.identifiers import Identifier
from identity.operations import IdentityOperations
from stitchgraph.db import Database
from tests.support.identity import T0, at, person_of


@pytest.fixture
def ledger(db: Database, ops: IdentityOperations) -> EventLedger:
    ledger = EventLedger(db, ops, SchemaRegistry())
    ledger.start()
    return ledger


def track(name: str, minutes: float, *identifiers: tuple[str, str], **fields: Any) -> IncomingEvent:
    return IncomingEvent(kind="track", source_event=name, source=fields.pop("source", "grpc"),
                         identifiers=list(identifiers), occurred_at=at(minutes), **fields)


def source(kind: str, *payloads: dict[str, Any]) -> list[IncomingEvent]:
    messages = []
    for payload in payloads:
        parsed = parse(kind, json.dumps(payload), source=kind, received_at=T0 + timedelta(days=1))
        assert not parsed.violations
        messages += parsed.messages
    return messages


def traits_of(db: Database, identifier: tuple[str, str]) -> dict[str, Any]:
    person = person_of(db, identifier)
    assert person is not None
    from identity.queries import person_pk_by_identifier

    with db.read() as session:
        pk = person_pk_by_identifier(session, Identifier(*identifier))
        assert pk is not None
        return {t.key: t.value for t in person_traits(session, pk)}


def statuses(results: Sequence[Any]) -> list[str]:
    return [r.status for r in results]


def test_posthog_purchase_before_identify_lands_on_the_identified_person(db: Database, ledger: EventLedger) -> None:
    # A raw server-side capture with no hint of the ID's kind arrives first (typed anonymous) ...
    early = source("posthog", {"event": "Order Completed", "distinct_id": "u-77", "uuid": "o-77",
                               "timestamp": at(10).isoformat(),
                               "properties": {"revenue": "10", "currency": "EUR", "order_id": "77"}})
    assert statuses(ledger.capture(early)) == ["ACCEPTED"]
    # ... then the browser identifies: the same value as anonymous ID is folded into the user.
    identify = source("posthog", {"event": "$identify", "distinct_id": "u-77", "uuid": "id-77",
                                  "timestamp": at(20).isoformat(), "properties": {"$anon_distinct_id": "dev-77"}})
    assert statuses(ledger.capture(identify)) == ["ACCEPTED"]
    # ... and a later event with the bare ID is typed as the user it is now known to be.
    later = source("posthog", {"event": "$pageview", "distinct_id": "u-77", "uuid": "pv-77",
                               "timestamp": at(30).isoformat()})
    ledger.capture(later)
    person = person_of(db, ("user_id", "u-77"))
    assert person is not None
    held = {(i.type, i.value) for i in person.identifiers}
    assert {("user_id", "u-77"), ("anonymous_id", "u-77"), ("anonymous_id", "dev-77")} <= held
    assert traits_of(db, ("user_id", "u-77"))["purchase_count"] == 1
    with db.read() as session:
        row = session.execute(select(EventRow).where(EventRow.event_id == "pv-77")).scalar_one()
        assert row.body["identifiers"] == [["user_id", "u-77"]]


def test_money_is_exact(db: Database, ledger: EventLedger) -> None:
    payload = {"batch": [
        {"type": "track", "event": "Order Completed", "userId": "m", "messageId": f"m-{i}",
         "timestamp": at(i).isoformat(), "properties": {"revenue": amount, "currency": "EUR", "order_id": str(i)}}
        for i, amount in enumerate([0.1, 0.2, 19.99, "0.000001"])]}
    assert statuses(ledger.capture(source("segment", payload))) == ["ACCEPTED"] * 4
    assert traits_of(db, ("user_id", "m"))["lifetime_value"] == {"EUR": "20.290001"}
    with db.read() as session:
        values = dict(session.execute(select(EventRow.event_id, EventRow.value)).all())
    assert values == {"m-0": "0.1", "m-1": "0.2", "m-2": "19.99", "m-3": "0.000001"}


def test_event_ids_are_derived_deterministically(db: Database, ledger: EventLedger) -> None:
    web = track("purchase", 1, ("user_id", "d"), value="5", currency="EUR", order_id="ord-1", source="web")
    server = track("purchase", 2, ("user_id", "d"), value="5", currency="EUR", order_id="ord-1", source="server")
    first, second = ledger.capture([web]) + ledger.capture([server])
    assert first.status == "ACCEPTED" and first.receipt is not None and first.receipt.generated_event_id
    assert second.status == "DUPLICATE" and second.event_id == first.event_id
    view = track("page_view", 3, ("anonymous_id", "d-a"), properties={"path": "/"})
    again = replace(view, properties={"path": "/"})
    one, two = ledger.capture([view]) + ledger.capture([again])
    assert one.status == "ACCEPTED" and two.status == "DUPLICATE" and one.event_id.startswith("sg_")
    other = track("page_view", 3, ("anonymous_id", "d-a"), properties={"path": "/pricing"})
    assert ledger.capture([other])[0].status == "ACCEPTED"
    with_message = track("page_view", 4, ("anonymous_id", "d-a"), message_id="msg-9")
    result = ledger.capture([with_message])[0]
    assert result.event_id == "msg-9" and result.receipt is not None and not result.receipt.generated_event_id


def test_traits_fold_across_merge_and_split(db: Database, ops: IdentityOperations, ledger: EventLedger) -> None:
    ledger.capture([
        track("profile_update", 1, ("anonymous_id", "dev"), trait_set={"plan": "trial", "color": "red"}),
        track("profile_update", 5, ("user_id", "ann"), trait_set={"plan": "pro"}, trait_set_once={"src": "ad"}),
        track("purchase", 6, ("user_id", "ann"), value="3", currency="EUR", order_id="a1"),
        track("purchase", 2, ("anonymous_id", "dev"), value="4", currency="EUR", order_id="a2"),
    ])
    assert traits_of(db, ("anonymous_id", "dev"))["plan"] == "trial"
    # One identify joins the device to the user: traits and totals fold together.
    ledger.capture([track("profile_update", 7, ("user_id", "ann"), ("anonymous_id", "dev"))])
    merged = traits_of(db, ("user_id", "ann"))
    assert merged["plan"] == "pro" and merged["color"] == "red" and merged["src"] == "ad"
    assert merged["purchase_count"] == 2 and merged["lifetime_value"] == {"EUR": "7"}
    # A split takes the device's evidence away again.
    person = person_of(db, ("user_id", "ann"))
    assert person is not None
    with db.transaction() as session:
        ops.split(session, person.person_id, detach=[Identifier("anonymous_id", "dev")], remove_links=[],
                  allow_remerge=False, operator="test", reason="shared device")
    ann, dev = traits_of(db, ("user_id", "ann")), traits_of(db, ("anonymous_id", "dev"))
    assert ann["purchase_count"] == 1 and "color" not in ann
    assert dev["plan"] == "trial" and dev["lifetime_value"] == {"EUR": "4"}


def test_erasure_removes_events_and_traits(db: Database, ops: IdentityOperations, ledger: EventLedger) -> None:
    ledger.capture([track("purchase", 1, ("user_id", "gone"), ("email", "gone@example.com"), value="1",
                          currency="EUR", order_id="g1", trait_set={"plan": "pro"})])
    with db.transaction() as session:
        ops.erase(session, person_id=None, identifier=Identifier("user_id", "gone"), operator="dpo", reason="gdpr")
    with db.read() as session:
        assert session.execute(select(func.count()).select_from(EventRow)).scalar() == 0
        assert session.execute(select(func.count()).select_from(TraitEvidenceRow)).scalar() == 0


def test_unmapped_events_can_be_rejected_instead_of_parked(db: Database, ops: IdentityOperations) -> None:
    ledger = EventLedger(db, ops, SchemaRegistry(), EventSettings(unmapped_action="reject"))
    ledger.start()
    result = ledger.capture([track("Button Clicked", 1, ("anonymous_id", "x"))])[0]
    assert result.status == "REJECTED" and result.violations[0].reason == "UNMAPPED_EVENT"
    assert "Button Clicked" in result.violations[0].description


def test_validate_only_stores_nothing(db: Database, ledger: EventLedger) -> None:
    results = ledger.capture([track("purchase", 1, ("user_id", "v"), value="1", currency="EUR", order_id="v1"),
                              track("Nope", 1, ("user_id", "v"))], validate_only=True)
    assert statuses(results) == ["ACCEPTED", "PARKED"]
    assert person_of(db, ("user_id", "v")) is None
    with db.read() as session:
        assert session.execute(select(func.count()).select_from(EventRow)).scalar() == 0


def test_junk_and_personless_events_are_stored_without_a_person(db: Database, ledger: EventLedger) -> None:
    junk = track("page_view", 1, ("anonymous_id", "undefined"), event_id="junk-1")
    personless = source("posthog", {"event": "$pageview", "distinct_id": "anon-pl", "uuid": "pl-1",
                                    "timestamp": at(2).isoformat(), "properties": {"$process_person_profile": False}})
    results = ledger.capture([junk, *personless])
    assert statuses(results) == ["ACCEPTED", "ACCEPTED"]
    assert results[0].receipt is not None and results[0].receipt.person_id == ""
    assert results[0].receipt.ignored[0]["reason"] == "JUNK_VALUE"
    assert person_of(db, ("anonymous_id", "anon-pl")) is None


def test_contact_details_never_reach_storage(db: Database, ledger: EventLedger) -> None:
    message = track("Lead Submitted", 1, ("anonymous_id", "lead-dev"), event_id="lead-1",
                    properties={"email": "lead@example.com", "note": "call lead@example.com", "contact": "x@y.io",
                                "value": 50},
                    trait_set={"email": "lead@example.com", "company": "ACME"},
                    context={"page_url": "https://x.example/thanks?email=lead%40example.com&plan=pro"})
    assert ledger.capture([message])[0].status == "ACCEPTED"
    with db.read() as session:
        stored = json.dumps([r.body for r in session.execute(select(EventRow)).scalars()] +
                            [r.value for r in session.execute(select(TraitEvidenceRow)).scalars()])
    assert "lead@example.com" not in stored and "x@y.io" not in stored and "lead%40" not in stored
    assert "plan=pro" in stored and "ACME" in stored and "call [redacted]" in stored
    # The email became a (hashed) identifier of the lead; a value without currency stayed a property.
    person = person_of(db, ("anonymous_id", "lead-dev"))
    assert person is not None and {i.type for i in person.identifiers} == {"anonymous_id", "email_sha256"}
    with db.read() as session:
        row = session.execute(select(EventRow)).scalar_one()
    assert row.value is None and row.body["properties"]["value"] == 50
