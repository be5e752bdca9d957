"""IdentityService end to end: a real server on SQLite and PostgreSQL, a real gRPC channel,
and only what a client sees."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from stitchgraph.v1 import common_pb2, identity_pb2, identity_service_pb2_grpc
from stitchgraph.v1 import identity_service_pb2 as pb
from tests.support.grpc_client import rich_error, running_server, server_settings

Stub = identity_service_pb2_grpc.IdentityServiceStub
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)

REFUSED = identity_pb2.LINK_DECISION_KIND_REFUSED
ACCEPTED = identity_pb2.LINK_DECISION_KIND_ACCEPTED

# Meta's published vectors (shared/specs/destinations.md §1.3).
META_EMAIL_INPUT = "John_Smith@gmail.com"
META_EMAIL_SHA256 = "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
META_PHONE_INPUT = "(650)555-1212"
META_PHONE_SHA256 = "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"


@pytest.fixture
def stub(db_url: str) -> Iterator[Stub]:
    with running_server(server_settings(db_url)) as handle, \
            grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        yield identity_service_pb2_grpc.IdentityServiceStub(channel)


def ts(moment: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(moment)
    return out


def at(minutes: float) -> Timestamp:
    return ts(T0 + timedelta(minutes=minutes))


def ident(type_: str, value: str) -> common_pb2.Identifier:
    return common_pb2.Identifier(type=type_, value=value)


def U(v: str) -> common_pb2.Identifier:
    return ident("user_id", v)


def A(v: str) -> common_pb2.Identifier:
    return ident("anonymous_id", v)


def identify(stub: Stub, ids: list[common_pb2.Identifier],
             minutes: float | None = None, **kw: object) -> pb.IdentifyResponse:
    request = pb.IdentifyRequest(identifiers=ids, source=str(kw.pop("source", "web")), **kw)
    if minutes is not None:
        request.occurred_at.CopyFrom(at(minutes))
    return stub.Identify(request)


def lookup(stub: Stub, identifier: common_pb2.Identifier) -> identity_pb2.Person:
    return stub.LookupPerson(pb.LookupPersonRequest(identifier=identifier)).person


def held(person: identity_pb2.Person) -> set[tuple[str, str]]:
    return {(i.type, i.value) for i in person.identifiers}


def error_of(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def all_history(stub: Stub, name: str) -> list[identity_pb2.HistoryEntry]:
    return list(stub.ListPersonHistory(pb.ListPersonHistoryRequest(parent=name, page_size=1000)).entries)


# -- stitching and refusals -----------------------------------------------------------------------

def test_anonymous_browsing_then_sign_up_stitches_into_one_person(stub: Stub) -> None:
    identify(stub, [A("cookie-1")], 0)
    anonymous = lookup(stub, A("cookie-1"))
    response = identify(stub, [A("cookie-1"), U("alice")], 10)
    assert held(response.person) == {("anonymous_id", "cookie-1"), ("user_id", "alice")}
    assert lookup(stub, U("alice")).person_id == anonymous.person_id == response.person.person_id
    assert [d.decision for d in response.decisions] == [ACCEPTED]


def test_alias_stitches_a_second_device_of_one_user(stub: Stub) -> None:
    identify(stub, [U("alice"), A("phone")], 0)
    request = pb.AliasRequest(previous_identifier=A("laptop"), identifier=U("alice"), occurred_at=at(5))
    response = stub.Alias(request)
    assert held(response.person) == {("user_id", "alice"), ("anonymous_id", "phone"),
                                     ("anonymous_id", "laptop")}
    assert lookup(stub, A("laptop")).person_id == lookup(stub, A("phone")).person_id


def test_shared_device_refusal_is_visible_in_explain(stub: Stub) -> None:
    identify(stub, [U("alice"), A("family-ipad")], 0, event_id="ev-alice")
    response = identify(stub, [U("bob"), A("family-ipad")], 5, event_id="ev-bob", source="ios")
    assert [(d.decision, d.reason) for d in response.decisions] == [(REFUSED, "TYPE_LIMIT")]
    explained = stub.ExplainIdentifiers(pb.ExplainIdentifiersRequest(first=U("alice"), second=U("bob")))
    assert not explained.same_person
    assert explained.first_person != explained.second_person
    assert [(r.decision, r.reason, r.event_id, r.source) for r in explained.refusals] == \
        [(REFUSED, "TYPE_LIMIT", "ev-bob", "ios")]
    assert {(r.pair.first.value, r.pair.second.value) for r in explained.refusals} <= \
        {("family-ipad", "bob"), ("bob", "family-ipad")}
    assert explained.refusals[0].occurred_at == at(5)


def test_explain_of_stitched_identifiers_gives_the_path_with_its_evidence(stub: Stub) -> None:
    identify(stub, [U("alice"), A("phone")], 0, event_id="ev-1", source="web")
    identify(stub, [U("alice"), A("laptop")], 5, event_id="ev-2", source="ios")
    explained = stub.ExplainIdentifiers(pb.ExplainIdentifiersRequest(first=A("phone"), second=A("laptop")))
    assert explained.same_person
    assert [(link.event_id, link.source, link.occurred_at) for link in explained.path] == \
        [("ev-1", "web", at(0)), ("ev-2", "ios", at(5))]


def test_one_support_inbox_used_by_many_accounts_never_merges_user_ids(stub: Stub) -> None:
    inbox = ident("email", "support@acme.example")
    for i in range(6):
        identify(stub, [U(f"acct-{i}"), inbox], i)
    persons = {lookup(stub, U(f"acct-{i}")).person_id for i in range(6)}
    assert len(persons) == 6
    explained = stub.ExplainIdentifiers(pb.ExplainIdentifiersRequest(first=U("acct-0"), second=U("acct-5")))
    assert not explained.same_person
    assert [r.reason for r in explained.refusals] == ["TYPE_LIMIT"]


@pytest.mark.parametrize("junk", ["null", "undefined"])
def test_junk_device_id_never_merges_two_user_ids(stub: Stub, junk: str) -> None:
    first = identify(stub, [U("alice"), A(junk)], 0)
    identify(stub, [U("bob"), A(junk)], 1)
    assert [(i.index, i.type, i.reason) for i in first.ignored] == [(1, "anonymous_id", "JUNK_VALUE")]
    assert held(lookup(stub, U("alice"))) == {("user_id", "alice")}
    assert held(lookup(stub, U("bob"))) == {("user_id", "bob")}
    assert rich_error(error_of(lambda: lookup(stub, A(junk)))).code == grpc.StatusCode.NOT_FOUND


def test_person_history_shows_ignored_junk_and_refusals(stub: Stub) -> None:
    identify(stub, [U("alice"), A("family-ipad")], 0)
    identify(stub, [U("bob"), A("family-ipad"), A("null")], 5)
    bob = lookup(stub, U("bob"))
    kinds = {(e.kind, e.reason) for e in all_history(stub, bob.name)}
    assert (identity_pb2.HISTORY_ENTRY_KIND_IDENTIFIER_IGNORED, "JUNK_VALUE") in kinds
    assert (identity_pb2.HISTORY_ENTRY_KIND_REFUSED, "TYPE_LIMIT") in kinds


def test_person_history_is_newest_first(stub: Stub) -> None:
    identify(stub, [U("alice"), A("null")], 0)
    identify(stub, [U("alice"), A("undefined")], 5)
    entries = all_history(stub, lookup(stub, U("alice")).name)
    times = [e.time.ToDatetime() for e in entries]
    assert len(times) == 2 and times == sorted(times, reverse=True)


# -- person IDs -----------------------------------------------------------------------------------

def test_get_person_with_a_merged_away_id_resolves_to_the_survivor(stub: Stub) -> None:
    identify(stub, [U("alice")], 0)
    merged_away = identify(stub, [A("cookie")], 5).person
    survivor = identify(stub, [U("alice"), A("cookie")], 10).person
    assert merged_away.person_id != survivor.person_id
    response = stub.GetPerson(pb.GetPersonRequest(name=merged_away.name))
    assert response.person.person_id == survivor.person_id
    assert response.requested_name == merged_away.name
    assert held(response.person) == {("user_id", "alice"), ("anonymous_id", "cookie")}


def test_person_create_time_is_the_evidence_time_of_its_first_identifier(stub: Stub) -> None:
    identify(stub, [A("cookie")], 3)
    person = identify(stub, [A("cookie"), U("alice")], 10).person
    assert person.create_time == at(3)


def test_rebuild_after_late_evidence_changes_no_person(stub: Stub) -> None:
    identify(stub, [U("bob"), A("ipad")], 10)
    identify(stub, [U("alice"), A("ipad")], 5)  # late: happened before bob's
    identify(stub, [A("ipad")], 1)
    before = {v: (lookup(stub, U(v)).person_id, held(lookup(stub, U(v)))) for v in ("alice", "bob")}
    rebuilt = stub.RebuildIdentityGraph(pb.RebuildIdentityGraphRequest(request_id=str(uuid.uuid4())))
    assert rebuilt.persons_changed == 0
    assert rebuilt.persons_after == rebuilt.persons_before == 2
    assert {v: (lookup(stub, U(v)).person_id, held(lookup(stub, U(v)))) for v in ("alice", "bob")} == before
    assert before["alice"][1] == {("user_id", "alice"), ("anonymous_id", "ipad")}


# -- operators --------------------------------------------------------------------------------------

def test_merge_persons_joins_two_users_and_is_audited_with_the_operator(stub: Stub) -> None:
    alice = identify(stub, [U("alice"), A("d1")], 0).person
    old = identify(stub, [U("alice-old"), A("d2")], 1).person
    merged = stub.MergePersons(pb.MergePersonsRequest(names=[alice.name, old.name], operator="ops@acme",
                                                      reason="TICKET-7", request_id=str(uuid.uuid4()))).person
    assert held(merged) == {("user_id", "alice"), ("anonymous_id", "d1"), ("user_id", "alice-old"),
                            ("anonymous_id", "d2")}
    forced = [e for e in all_history(stub, merged.name)
              if e.kind == identity_pb2.HISTORY_ENTRY_KIND_FORCED_MERGE]
    assert forced and {e.operator for e in forced} == {"ops@acme"}
    links = stub.ListPersonLinks(pb.ListPersonLinksRequest(parent=merged.name,
                                                           decision=identity_pb2.LINK_DECISION_KIND_FORCED)).links
    assert [link.operator for link in links] == ["ops@acme"]


def split(stub: Stub, person: identity_pb2.Person, detach: common_pb2.Identifier,
          allow_remerge: bool) -> pb.SplitPersonResponse:
    return stub.SplitPerson(pb.SplitPersonRequest(name=person.name, detach_identifiers=[detach],
                                                  allow_remerge=allow_remerge, operator="ops@acme",
                                                  reason="kiosk", request_id=str(uuid.uuid4())))


def test_split_person_detaches_the_identifier_and_pins_the_split(stub: Stub) -> None:
    identify(stub, [U("alice"), A("phone")], 0)
    person = identify(stub, [U("alice"), A("kiosk")], 1).person
    parts = split(stub, person, A("kiosk"), allow_remerge=False).persons
    assert sorted(map(len, map(held, parts))) == [1, 2]
    again = identify(stub, [U("alice"), A("kiosk")], 30)
    assert [(d.decision, d.reason) for d in again.decisions] == [(REFUSED, "PINNED_SPLIT")]
    assert held(lookup(stub, A("kiosk"))) == {("anonymous_id", "kiosk")}
    assert lookup(stub, U("alice")).person_id == person.person_id


def test_split_person_with_allow_remerge_lets_new_evidence_join_again(stub: Stub) -> None:
    identify(stub, [U("alice"), A("phone")], 0)
    person = identify(stub, [U("alice"), A("kiosk")], 1).person
    split(stub, person, A("kiosk"), allow_remerge=True)
    assert held(lookup(stub, A("kiosk"))) == {("anonymous_id", "kiosk")}
    identify(stub, [U("alice"), A("kiosk")], 30)
    assert lookup(stub, A("kiosk")).person_id == person.person_id


def erase(stub: Stub, identifier: common_pb2.Identifier) -> identity_pb2.Erasure:
    return stub.ErasePerson(pb.ErasePersonRequest(identifier=identifier, operator="dpo@acme", reason="DSR-1",
                                                  request_id=str(uuid.uuid4()))).erasure


def test_erased_person_is_gone_and_not_resurrected_by_replaying_its_evidence(stub: Stub) -> None:
    person = identify(stub, [U("alice"), A("phone"), ident("email", "alice@example.com")], 0).person
    identify(stub, [U("alice"), A("laptop")], 1)
    erasure = erase(stub, U("alice"))
    assert erasure.person_id == person.person_id
    assert "alice" not in str(erasure) and "alice@example.com" not in str(erasure)
    replay = identify(stub, [U("alice"), A("phone"), ident("email", "alice@example.com")], 0)
    identify(stub, [U("alice"), A("laptop")], 1)
    assert {i.reason for i in replay.ignored} == {"ERASED"}
    for identifier in (U("alice"), A("phone"), A("laptop"), ident("email", "alice@example.com")):
        assert rich_error(error_of(lambda i=identifier: lookup(stub, i))).code == grpc.StatusCode.NOT_FOUND
    assert rich_error(error_of(lambda: stub.GetPerson(pb.GetPersonRequest(name=person.name)))).code == \
        grpc.StatusCode.NOT_FOUND


def test_evidence_dated_after_an_erasure_is_a_new_person(stub: Stub) -> None:
    old = identify(stub, [U("alice"), A("phone")], 0).person
    erase(stub, U("alice"))
    request = pb.IdentifyRequest(identifiers=[U("alice"), A("new-phone")],
                                 occurred_at=ts(datetime.now(UTC) + timedelta(minutes=1)))
    response = stub.Identify(request)
    assert not response.ignored
    assert held(lookup(stub, U("alice"))) == {("user_id", "alice"), ("anonymous_id", "new-phone")}
    assert rich_error(error_of(lambda: lookup(stub, A("phone")))).code == grpc.StatusCode.NOT_FOUND
    assert response.person.person_id == lookup(stub, U("alice")).person_id
    # A returning human gets a new person ID: the erased one never resolves again.
    assert response.person.person_id != old.person_id
    error = rich_error(error_of(lambda: stub.GetPerson(pb.GetPersonRequest(name=old.name))))
    assert error.code == grpc.StatusCode.NOT_FOUND


def test_erasure_is_listed_with_hashed_identifiers_only(stub: Stub) -> None:
    identify(stub, [U("alice"), A("phone")], 0)
    erasure = erase(stub, U("alice"))
    fetched = stub.GetErasure(pb.GetErasureRequest(name=erasure.name)).erasure
    assert fetched.identifier_count == 2
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in fetched.identifier_hashes)
    assert fetched.operator == "dpo@acme"


# -- normalisation -----------------------------------------------------------------------------------

def test_raw_email_is_stored_as_metas_sha256_vector(stub: Stub) -> None:
    person = identify(stub, [U("john"), ident("email", META_EMAIL_INPUT)], 0).person
    assert ("email_sha256", META_EMAIL_SHA256) in held(person)
    assert lookup(stub, ident("email_sha256", META_EMAIL_SHA256.upper())).person_id == person.person_id
    assert all(META_EMAIL_INPUT.lower() not in i.value for i in person.identifiers)


def test_raw_phone_stores_metas_match_key_on_the_person(stub: Stub) -> None:
    person = identify(stub, [U("john"), ident("phone", META_PHONE_INPUT)], 0).person
    keys = {(k.identifier_type, k.platform_key, k.value) for k in person.match_keys}
    assert ("phone_sha256", "meta_phone_sha256", META_PHONE_SHA256) in keys
    e164_hash = hashlib.sha256(b"+16505551212").hexdigest()
    assert ("phone_sha256", e164_hash) in held(person)
    assert lookup(stub, ident("phone", "+1 650 555 1212")).person_id == person.person_id


# -- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("bad", "field"), [
    (ident("user_id", ""), "identifiers[1].value"),
    (ident("user_id", "x" * 257), "identifiers[1].value"),
    (ident("favourite_colour", "blue"), "identifiers[1].type"),
    (ident("email_sha256", "alice@example.com"), "identifiers[1].value"),
], ids=["empty", "oversize", "unknown-type", "raw-email-as-hash"])
def test_bad_identifier_is_invalid_argument_with_the_field_and_nothing_is_stored(
        stub: Stub, bad: common_pb2.Identifier, field: str) -> None:
    error = rich_error(error_of(lambda: identify(stub, [A("cookie"), bad], 0)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.field_violations
    assert "alice@example.com" not in error.message + "".join(error.field_violations.values())
    assert rich_error(error_of(lambda: lookup(stub, A("cookie")))).code == grpc.StatusCode.NOT_FOUND


def test_repeated_request_id_returns_the_first_response(stub: Stub) -> None:
    request_id = str(uuid.uuid4())
    first = identify(stub, [U("alice"), A("phone")], 0, request_id=request_id)
    identify(stub, [U("alice"), A("laptop")], 1)
    repeat = identify(stub, [U("alice"), A("phone")], 0, request_id=request_id)
    assert repeat == first


def test_request_id_reused_with_a_different_body_is_refused(stub: Stub) -> None:
    request_id = str(uuid.uuid4())
    identify(stub, [U("alice"), A("phone")], 0, request_id=request_id)
    error = rich_error(error_of(lambda: identify(stub, [U("bob"), A("phone")], 0, request_id=request_id)))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    assert rich_error(error_of(lambda: lookup(stub, U("bob")))).code == grpc.StatusCode.NOT_FOUND


# -- pagination --------------------------------------------------------------------------------------

def test_person_links_paginate_one_at_a_time_without_loss_or_repeats(stub: Stub) -> None:
    for i in range(5):
        identify(stub, [U("alice"), A(f"device-{i}")], i)
    identify(stub, [U("bob"), A("device-0")], 9)  # a refusal touching alice's person
    name = lookup(stub, U("alice")).name
    everything = list(stub.ListPersonLinks(pb.ListPersonLinksRequest(parent=name, page_size=1000)).links)
    pages, token = [], ""
    while True:
        response = stub.ListPersonLinks(pb.ListPersonLinksRequest(parent=name, page_size=1, page_token=token))
        assert len(response.links) <= 1
        pages.extend(response.links)
        token = response.next_page_token
        if not token:
            break
        assert len(pages) <= len(everything), "pagination does not end"
    assert len(everything) == 6
    assert pages == everything


def test_person_links_are_ordered_by_evidence_time(stub: Stub) -> None:
    identify(stub, [U("alice"), A("late")], 9)
    identify(stub, [U("alice"), A("early")], 1)
    identify(stub, [U("alice"), A("middle")], 5)
    name = lookup(stub, U("alice")).name
    links = stub.ListPersonLinks(pb.ListPersonLinksRequest(parent=name)).links
    assert [link.occurred_at for link in links] == [at(1), at(5), at(9)]
