"""DestinationService (configuration) end to end over gRPC, on SQLite and PostgreSQL: create,
read, list with paging and filters, update masks, etags, delete, pause and resume, every
INVALID_ARGUMENT case, credentials that are never echoed, idempotent request IDs."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from stitchgraph.v1 import destination_service_pb2, destination_service_pb2_grpc, destinations_pb2
from tests.e2e.conftest import ADMIN_TOKEN, READ_TOKEN, bearer
from tests.support.grpc_client import rich_error, running_server, server_settings

pb = destination_service_pb2
Destination = destinations_pb2.Destination
META_CONVERSIONS = destinations_pb2.DESTINATION_KIND_META_CONVERSIONS
META_CUSTOM_AUDIENCE = destinations_pb2.DESTINATION_KIND_META_CUSTOM_AUDIENCE
TIKTOK_EVENTS = destinations_pb2.DESTINATION_KIND_TIKTOK_EVENTS
POSTHOG_TRAITS = destinations_pb2.DESTINATION_KIND_POSTHOG_TRAITS
ACTIVE = destinations_pb2.DESTINATION_STATE_ACTIVE
PAUSED = destinations_pb2.DESTINATION_STATE_PAUSED
#: What a real Meta system-user token looks like (made up): it must never come back.
RAW_TOKEN = "EAAGm0PX4ZCpsBAKZCuQ7f3jlZBx0ZAvTVZBLcE1pZCZA9Dq8ZBYZCZA"


@pytest.fixture
def stub(db_url: str) -> Iterator[Any]:
    with running_server(server_settings(db_url)) as handle, \
            grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        yield destination_service_pb2_grpc.DestinationServiceStub(channel)  # type: ignore[no-untyped-call]


def meta(display_name: str = "Meta CAPI (shop)", **fields: Any) -> destinations_pb2.Destination:
    values: dict[str, Any] = {"credentials_ref": "env:META_CAPI_TOKEN", "events": ["purchase", "lead"], **fields}
    destination = Destination(kind=META_CONVERSIONS, display_name=display_name, **values)
    destination.settings.update({"pixel_id": "1234567890", "api_version": "v25.0", "limited_data_use": True})
    return destination


def audience(display_name: str = "Meta lookalike seed", **fields: Any) -> destinations_pb2.Destination:
    destination = Destination(kind=META_CUSTOM_AUDIENCE, display_name=display_name,
                              credentials_ref="file:/run/secrets/meta", **fields)
    destination.settings.update({"ad_account_id": "act_42", "audience_id": 23851234567890})
    return destination


def create(stub: Any, destination: destinations_pb2.Destination, destination_id: str = "",
           request_id: str = "") -> destinations_pb2.Destination:
    response = stub.CreateDestination(pb.CreateDestinationRequest(destination=destination,
                                                                  destination_id=destination_id,
                                                                  request_id=request_id))
    created: destinations_pb2.Destination = response.destination
    return created


def call_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def violations(error: grpc.RpcError) -> dict[str, str]:
    """Field → reason of the BadRequest details of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found: dict[str, str] = {}
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.reason for v in bad.field_violations})
    return found


def everything_said(error: Any) -> str:
    """The message and every byte of trailing metadata (status details included) of a failed
    call, as text."""
    parts: list[str] = [error.details() or ""]
    for key, value in error.trailing_metadata() or ():
        parts.append(f"{key}={value.decode(errors='replace') if isinstance(value, bytes) else value}")
    return "\n".join(parts)


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


# -- create, get, list ---------------------------------------------------------------------------

def test_create_then_get_returns_the_stored_destination(stub: Any) -> None:
    created = create(stub, meta(description="Purchases and leads of the web shop",
                                purposes=["ad_user_data", "ad_storage"]), "meta-capi")
    assert created.name == "destinations/meta-capi"
    assert created.kind == META_CONVERSIONS and created.state == ACTIVE
    assert created.display_name == "Meta CAPI (shop)"
    assert created.description == "Purchases and leads of the web shop"
    assert created.credentials_ref == "env:META_CAPI_TOKEN"
    assert dict(created.settings) == {"pixel_id": "1234567890", "api_version": "v25.0", "limited_data_use": True}
    assert list(created.purposes) == ["ad_user_data", "ad_storage"]
    assert list(created.events) == ["purchase", "lead"]
    assert created.etag and created.create_time == created.update_time and created.create_time.seconds > 0
    assert created.HasField("stats") and created.stats.pending_count == 0 and created.stats.dead_lettered_count == 0

    got = stub.GetDestination(pb.GetDestinationRequest(name="destinations/meta-capi")).destination
    assert got == created


def test_output_only_fields_are_ignored_and_numbers_stay_integers(stub: Any) -> None:
    sent = audience(name="destinations/other", state=PAUSED, etag="mine")
    created = create(stub, sent, "seed")
    assert created.name == "destinations/seed" and created.state == ACTIVE and created.etag != "mine"
    # The Struct number comes back as the same number (stored as an integer, not 2.385e13).
    assert created.settings["audience_id"] == 23851234567890
    assert created.purposes == []  # empty = the kind's defaults (ad_user_data, ad_personalization)


def test_the_server_chooses_an_id_when_none_is_given(stub: Any) -> None:
    destination = Destination(kind=TIKTOK_EVENTS, display_name="TikTok", credentials_ref="env:TIKTOK_TOKEN")
    destination.settings.update({"event_source": "web", "event_source_id": "CABC123"})
    created = create(stub, destination)
    assert re.fullmatch(r"destinations/tiktok-events-[0-9a-f]{8}", created.name)
    assert stub.GetDestination(pb.GetDestinationRequest(name=created.name)).destination == created


def test_a_taken_id_is_already_exists(stub: Any) -> None:
    create(stub, meta(), "meta-capi")
    error = rich_error(call_error(lambda: create(stub, audience(), "meta-capi")))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.reason == "DESTINATION_EXISTS"
    assert error.metadata["existing"] == "destinations/meta-capi"


def test_unknown_and_malformed_names(stub: Any) -> None:
    error = rich_error(call_error(lambda: stub.GetDestination(pb.GetDestinationRequest(name="destinations/nope"))))
    assert error.code == grpc.StatusCode.NOT_FOUND and error.reason == "DESTINATION_NOT_FOUND"
    for name in ("", "nope", "destinations/", "destinations/Bad_Id", "destinations/a/b", "audiences/x"):
        caught = call_error(partial(stub.GetDestination, pb.GetDestinationRequest(name=name)))
        assert caught.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert violations(caught) == {"name": "INVALID_NAME"}


def test_list_pages_through_destinations_ordered_by_display_name(stub: Any) -> None:
    names = ["delta", "alpha", "echo", "charlie", "bravo"]
    for i, display in enumerate(names):
        create(stub, meta(display) if i % 2 else audience(display), f"d-{i}")
    create(stub, audience("alpha"), "d-9")  # same display name: ordered by ID

    seen: list[tuple[str, str]] = []
    token = ""
    pages = 0
    while True:
        response = stub.ListDestinations(pb.ListDestinationsRequest(page_size=2, page_token=token))
        seen.extend((d.display_name, d.name) for d in response.destinations)
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == [("alpha", "destinations/d-1"), ("alpha", "destinations/d-9"), ("bravo", "destinations/d-4"),
                    ("charlie", "destinations/d-3"), ("delta", "destinations/d-0"), ("echo", "destinations/d-2")]
    everything = stub.ListDestinations(pb.ListDestinationsRequest()).destinations
    assert [d.name for d in everything] == [name for _, name in seen]

    first = stub.ListDestinations(pb.ListDestinationsRequest(page_size=2))
    caught = call_error(lambda: stub.ListDestinations(pb.ListDestinationsRequest(
        page_size=2, page_token=first.next_page_token, filter="state = ACTIVE")))
    assert caught.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in violations(caught)


def test_list_filters_by_kind_state_and_display_name(stub: Any) -> None:
    create(stub, meta("Meta CAPI"), "meta-capi")
    create(stub, audience("Meta audience"), "meta-audience")
    paused = create(stub, audience("Paused audience"), "paused-audience")
    stub.PauseDestination(pb.PauseDestinationRequest(name=paused.name))

    def listed(text: str) -> list[str]:
        response = stub.ListDestinations(pb.ListDestinationsRequest(filter=text))
        return [d.name.removeprefix("destinations/") for d in response.destinations]

    assert listed("kind = META_CUSTOM_AUDIENCE") == ["meta-audience", "paused-audience"]
    assert listed("kind = DESTINATION_KIND_META_CONVERSIONS") == ["meta-capi"]
    assert listed("state = PAUSED") == ["paused-audience"]
    assert listed("kind = META_CUSTOM_AUDIENCE AND state = ACTIVE") == ["meta-audience"]
    assert listed("state != PAUSED") == ["meta-capi", "meta-audience"]
    assert listed('display_name = "Meta CAPI"') == ["meta-capi"]
    assert listed('display_name > "Meta audience"') == ["paused-audience"]  # code point order, as listed
    assert listed('display_name < "Meta audience"') == ["meta-capi"]
    for bad in ("kind = FACEBOOK", "state = SLEEPING", "pixel_id = 1", "kind META_CONVERSIONS"):
        caught = call_error(partial(listed, bad))
        assert caught.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert rich_error(caught).reason == "INVALID_FILTER" and "filter" in violations(caught)


# -- update ----------------------------------------------------------------------------------------

def test_update_replaces_only_the_masked_fields(stub: Any) -> None:
    created = create(stub, meta(description="first"), "meta-capi")
    change = Destination(name=created.name, display_name="Meta CAPI (EU shop)", description="ignored",
                         events=["sign_up"], etag=created.etag)
    updated = stub.UpdateDestination(pb.UpdateDestinationRequest(destination=change,
                                                                 update_mask=mask("display_name"))).destination
    assert updated.display_name == "Meta CAPI (EU shop)"
    assert updated.description == "first" and list(updated.events) == ["purchase", "lead"]
    assert updated.etag != created.etag
    assert updated.create_time == created.create_time
    assert updated.update_time.ToDatetime() >= created.update_time.ToDatetime()

    # Settings are replaced as a whole; the result must still be complete (pixel_id required).
    settings_only = Destination(name=created.name)
    settings_only.settings.update({"pixel_id": "999", "test_event_code": "TEST123"})
    replaced = stub.UpdateDestination(pb.UpdateDestinationRequest(destination=settings_only,
                                                                  update_mask=mask("settings"))).destination
    assert dict(replaced.settings) == {"pixel_id": "999", "test_event_code": "TEST123"}
    incomplete = Destination(name=created.name)
    incomplete.settings.update({"test_event_code": "TEST123"})
    caught = call_error(lambda: stub.UpdateDestination(pb.UpdateDestinationRequest(
        destination=incomplete, update_mask=mask("settings"))))
    assert caught.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught) == {"destination.settings.pixel_id": "REQUIRED"}


def test_update_without_a_mask_replaces_every_field_set_and_star_replaces_all(stub: Any) -> None:
    created = create(stub, meta(description="first", purposes=["ad_user_data"]), "meta-capi")
    change = Destination(name=created.name, description="second", purposes=["ad_user_data", "sale_or_sharing"])
    updated = stub.UpdateDestination(pb.UpdateDestinationRequest(destination=change)).destination
    assert updated.description == "second" and list(updated.purposes) == ["ad_user_data", "sale_or_sharing"]
    assert updated.display_name == created.display_name and list(updated.events) == ["purchase", "lead"]

    everything = meta("Renamed")  # no description, purposes or events: "*" clears them
    everything.ClearField("events")
    everything.name = created.name
    replaced = stub.UpdateDestination(pb.UpdateDestinationRequest(destination=everything,
                                                                  update_mask=mask("*"))).destination
    assert replaced.display_name == "Renamed" and replaced.description == ""
    assert list(replaced.purposes) == [] and list(replaced.events) == []

    # Nothing changed: the etag stays.
    again = stub.UpdateDestination(pb.UpdateDestinationRequest(destination=everything,
                                                               update_mask=mask("*"))).destination
    assert again.etag == replaced.etag


def test_update_refuses_kind_output_only_and_unknown_paths(stub: Any) -> None:
    created = create(stub, meta(), "meta-capi")
    cases = [
        (Destination(name=created.name, kind=META_CONVERSIONS), mask("kind"), "update_mask.paths[0]",
         "IMMUTABLE_FIELD"),
        (Destination(name=created.name, kind=TIKTOK_EVENTS, display_name="x"), mask("display_name"),
         "destination.kind", "IMMUTABLE_FIELD"),
        (Destination(name=created.name, kind=TIKTOK_EVENTS), mask(), "destination.kind", "IMMUTABLE_FIELD"),
        (Destination(name=created.name, state=PAUSED), mask("display_name", "state"), "update_mask.paths[1]",
         "NOT_MUTABLE"),
        (Destination(name=created.name), mask("settings.pixel_id"), "update_mask.paths[0]", "NOT_MUTABLE"),
        (Destination(name="meta-capi", display_name="x"), mask("display_name"), "destination.name", "INVALID_NAME"),
    ]
    for destination, paths, field, reason in cases:
        caught = call_error(partial(stub.UpdateDestination,
                                    pb.UpdateDestinationRequest(destination=destination, update_mask=paths)))
        assert caught.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, reason)
        assert violations(caught) == {field: reason}
    # The same kind is not a change.
    same = stub.UpdateDestination(pb.UpdateDestinationRequest(
        destination=Destination(name=created.name, kind=META_CONVERSIONS, display_name="Same kind"))).destination
    assert same.display_name == "Same kind"
    missing = call_error(lambda: stub.UpdateDestination(pb.UpdateDestinationRequest(
        destination=Destination(name="destinations/missing", display_name="x"))))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


def test_a_stale_etag_is_aborted_everywhere(stub: Any) -> None:
    created = create(stub, meta(), "meta-capi")
    fresh = stub.UpdateDestination(pb.UpdateDestinationRequest(
        destination=Destination(name=created.name, display_name="v2", etag=created.etag))).destination
    stale = created.etag
    calls: list[Callable[[], Any]] = [
        lambda: stub.UpdateDestination(pb.UpdateDestinationRequest(
            destination=Destination(name=created.name, display_name="v3", etag=stale))),
        lambda: stub.DeleteDestination(pb.DeleteDestinationRequest(name=created.name, etag=stale)),
        lambda: stub.PauseDestination(pb.PauseDestinationRequest(name=created.name, etag=stale)),
        lambda: stub.ResumeDestination(pb.ResumeDestinationRequest(name=created.name, etag=stale)),
    ]
    for call in calls:
        error = rich_error(call_error(call))
        assert error.code == grpc.StatusCode.ABORTED and error.reason == "STALE_ETAG"
    # Nothing changed.
    assert stub.GetDestination(pb.GetDestinationRequest(name=created.name)).destination == fresh


# -- delete, pause, resume ---------------------------------------------------------------------

def test_delete_returns_the_destination_as_it_was(stub: Any) -> None:
    created = create(stub, meta(), "meta-capi")
    deleted = stub.DeleteDestination(pb.DeleteDestinationRequest(name=created.name, etag=created.etag)).destination
    assert deleted == created
    gone = rich_error(call_error(lambda: stub.GetDestination(pb.GetDestinationRequest(name=created.name))))
    assert gone.code == grpc.StatusCode.NOT_FOUND
    again = rich_error(call_error(lambda: stub.DeleteDestination(pb.DeleteDestinationRequest(name=created.name))))
    assert again.code == grpc.StatusCode.NOT_FOUND
    # The ID can be used again; without an etag (and with force) the delete is unconditional.
    create(stub, audience(), "meta-capi")
    stub.DeleteDestination(pb.DeleteDestinationRequest(name=created.name, force=True))
    assert list(stub.ListDestinations(pb.ListDestinationsRequest()).destinations) == []


def test_pause_and_resume_change_the_state_and_are_no_ops_when_repeated(stub: Any) -> None:
    created = create(stub, meta(), "meta-capi")
    paused = stub.PauseDestination(pb.PauseDestinationRequest(
        name=created.name, etag=created.etag, reason="token rotated; waiting for the new one")).destination
    assert paused.state == PAUSED and paused.etag != created.etag
    assert stub.GetDestination(pb.GetDestinationRequest(name=created.name)).destination == paused
    again = stub.PauseDestination(pb.PauseDestinationRequest(name=created.name, etag=paused.etag)).destination
    assert again == paused

    resumed = stub.ResumeDestination(pb.ResumeDestinationRequest(name=created.name, etag=paused.etag)).destination
    assert resumed.state == ACTIVE and resumed.etag != paused.etag
    assert stub.ResumeDestination(pb.ResumeDestinationRequest(name=created.name)).destination == resumed

    too_long = call_error(lambda: stub.PauseDestination(pb.PauseDestinationRequest(name=created.name,
                                                                                   reason="x" * 1025)))
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(too_long) == {"reason": "TOO_LONG"}
    missing = rich_error(call_error(lambda: stub.PauseDestination(pb.PauseDestinationRequest(
        name="destinations/missing"))))
    assert missing.code == grpc.StatusCode.NOT_FOUND


# -- invalid arguments -------------------------------------------------------------------------

def _with(base: Callable[[], destinations_pb2.Destination], change: Callable[[Any], None]) -> Callable[[], Any]:
    def build() -> destinations_pb2.Destination:
        destination = base()
        change(destination)
        return destination
    return build


def _settings(**values: Any) -> Callable[[Any], None]:
    def change(destination: Any) -> None:
        destination.settings.update(values)
    return change


def _set(**values: Any) -> Callable[[Any], None]:
    def change(destination: Any) -> None:
        for key, value in values.items():
            if isinstance(value, list):
                destination.ClearField(key)
                getattr(destination, key).extend(value)
            else:
                setattr(destination, key, value)
    return change


INVALID_CASES: list[tuple[str, Callable[[], Any], str, str]] = [
    ("kind missing", _with(meta, _set(kind=0)), "destination.kind", "REQUIRED"),
    ("kind unknown", _with(meta, _set(kind=99)), "destination.kind", "UNKNOWN_KIND"),
    ("display_name missing", _with(meta, _set(display_name="  ")), "destination.display_name", "REQUIRED"),
    ("display_name too long", _with(meta, _set(display_name="x" * 257)), "destination.display_name", "TOO_LONG"),
    ("description too long", _with(meta, _set(description="x" * 4097)), "destination.description", "TOO_LONG"),
    ("credentials_ref missing", _with(meta, _set(credentials_ref="")), "destination.credentials_ref", "REQUIRED"),
    ("credentials_ref not a reference", _with(meta, _set(credentials_ref="vault:meta")),
     "destination.credentials_ref", "NOT_A_CREDENTIALS_REFERENCE"),
    ("relative file", _with(meta, _set(credentials_ref="file:secrets/meta")), "destination.credentials_ref",
     "NOT_A_CREDENTIALS_REFERENCE"),
    ("secret in settings", _with(meta, _settings(access_token="abc")), "destination.settings.access_token",
     "SECRET_IN_SETTINGS"),
    ("nested secret in settings", _with(meta, _settings(oauth={"clientSecret": "abc"})),
     "destination.settings.oauth.clientSecret", "SECRET_IN_SETTINGS"),
    ("required setting missing", _with(lambda: Destination(kind=META_CONVERSIONS, display_name="x",
                                                           credentials_ref="env:T"), lambda d: None),
     "destination.settings.pixel_id", "REQUIRED"),
    ("required setting empty", _with(meta, _settings(pixel_id="")), "destination.settings.pixel_id", "REQUIRED"),
    ("LDU where the kind has none", _with(audience, _settings(limited_data_use=True)),
     "destination.settings.limited_data_use", "NOT_SUPPORTED"),
    ("LDU not a boolean", _with(meta, _settings(limited_data_use="yes")), "destination.settings.limited_data_use",
     "INVALID_VALUE"),
    ("unknown purpose", _with(meta, _set(purposes=["marketing"])), "destination.purposes[0]", "UNKNOWN_PURPOSE"),
    ("duplicate purpose", _with(meta, _set(purposes=["ad_user_data", "ad_user_data"])), "destination.purposes[1]",
     "DUPLICATE"),
    ("unknown event", _with(meta, _set(events=["purchase", "Order Completed"])), "destination.events[1]",
     "UNKNOWN_CANONICAL_EVENT"),
    ("duplicate event", _with(meta, _set(events=["lead", "lead"])), "destination.events[1]", "DUPLICATE"),
    ("events on an audience kind", _with(audience, _set(events=["purchase"])), "destination.events",
     "NOT_APPLICABLE"),
]


@pytest.mark.parametrize(("case", "build", "field", "reason"), INVALID_CASES, ids=[c[0] for c in INVALID_CASES])
def test_each_invalid_destination_names_its_field_and_stores_nothing(
        stub: Any, case: str, build: Callable[[], Any], field: str, reason: str) -> None:
    caught = call_error(lambda: create(stub, build(), "dest"))
    error = rich_error(caught)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_DESTINATION"
    assert violations(caught) == {field: reason}
    assert field in error.message and error.field_violations[field]
    assert list(stub.ListDestinations(pb.ListDestinationsRequest()).destinations) == []


def test_every_problem_is_reported_at_once(stub: Any) -> None:
    destination = Destination(kind=POSTHOG_TRAITS, credentials_ref="phc_notareference", events=["purchase"],
                              purposes=["analytics", "tracking"])
    destination.settings.update({"api_key": "phc_x"})
    caught = call_error(lambda: create(stub, destination, "9-bad-id"))
    assert violations(caught) == {
        "destination_id": "INVALID_FORMAT",
        "destination.display_name": "REQUIRED",
        "destination.credentials_ref": "NOT_A_CREDENTIALS_REFERENCE",
        "destination.settings.api_key": "SECRET_IN_SETTINGS",
        "destination.settings.host": "REQUIRED",
        "destination.purposes[1]": "UNKNOWN_PURPOSE",
        "destination.events": "NOT_APPLICABLE",
    }


@pytest.mark.parametrize("secret", [RAW_TOKEN, f"env:{RAW_TOKEN}", f"Bearer {RAW_TOKEN}", f"file: {RAW_TOKEN}",
                                    f"{RAW_TOKEN}\nenv:META_TOKEN"])
def test_a_raw_secret_as_credentials_ref_is_refused_and_never_echoed(
        stub: Any, secret: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = RAW_TOKEN
    caught = call_error(lambda: create(stub, meta(credentials_ref=secret), "meta-capi"))
    assert caught.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught) == {"destination.credentials_ref": "NOT_A_CREDENTIALS_REFERENCE"}
    assert "never the secret itself" in rich_error(caught).message
    assert token not in everything_said(caught)

    created = create(stub, meta(), "meta-capi")
    caught = call_error(lambda: stub.UpdateDestination(pb.UpdateDestinationRequest(
        destination=Destination(name=created.name, credentials_ref=secret))))
    assert violations(caught) == {"destination.credentials_ref": "NOT_A_CREDENTIALS_REFERENCE"}
    assert token not in everything_said(caught)
    assert stub.GetDestination(pb.GetDestinationRequest(name=created.name)).destination.credentials_ref == \
        "env:META_CAPI_TOKEN"
    logged = [record.getMessage() for record in caplog.records if record.name == "stitchgraph.destinations"]
    assert logged == ["destination meta-capi (META_CONVERSIONS) created"]
    assert all(token not in record.getMessage() and token not in str(record.__dict__) for record in caplog.records)


def test_secret_values_in_settings_are_not_echoed(stub: Any) -> None:
    destination = meta()
    destination.settings.update({"app_secret": RAW_TOKEN, "nested": {"password": RAW_TOKEN}})
    caught = call_error(lambda: create(stub, destination, "meta-capi"))
    assert violations(caught) == {"destination.settings.app_secret": "SECRET_IN_SETTINGS",
                                  "destination.settings.nested.password": "SECRET_IN_SETTINGS"}
    assert RAW_TOKEN not in everything_said(caught)


# -- idempotency and access --------------------------------------------------------------------

def test_request_id_makes_mutations_idempotent(stub: Any) -> None:
    generated = Destination(kind=POSTHOG_TRAITS, display_name="PostHog EU", credentials_ref="env:POSTHOG_KEY")
    generated.settings.update({"host": "https://eu.i.posthog.com"})
    first = create(stub, generated, request_id="create-1")
    assert create(stub, generated, request_id="create-1") == first  # same generated ID, same etag
    assert len(stub.ListDestinations(pb.ListDestinationsRequest()).destinations) == 1

    reused = rich_error(call_error(lambda: create(stub, audience(), request_id="create-1")))
    assert reused.code == grpc.StatusCode.INVALID_ARGUMENT and reused.reason == "REQUEST_ID_REUSED"

    pause = pb.PauseDestinationRequest(name=first.name, etag=first.etag, request_id="pause-1")
    paused = stub.PauseDestination(pause).destination
    stub.ResumeDestination(pb.ResumeDestinationRequest(name=first.name))
    assert stub.PauseDestination(pause).destination == paused  # the stored answer; nothing runs again
    assert stub.GetDestination(pb.GetDestinationRequest(name=first.name)).destination.state == ACTIVE

    delete = pb.DeleteDestinationRequest(name=first.name, request_id="delete-1")
    deleted = stub.DeleteDestination(delete).destination
    assert stub.DeleteDestination(delete).destination == deleted


def test_reads_need_read_and_changes_need_admin(db_url: str) -> None:
    from server.config import parse_env_tokens

    tokens = parse_env_tokens(f"reader:read:{READ_TOKEN};ops:admin:{ADMIN_TOKEN}")
    with running_server(server_settings(db_url, tokens=tokens)) as handle, \
            grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        stub = destination_service_pb2_grpc.DestinationServiceStub(channel)  # type: ignore[no-untyped-call]
        request = pb.CreateDestinationRequest(destination=meta(), destination_id="meta-capi")
        denied = call_error(lambda: stub.CreateDestination(request, metadata=bearer(READ_TOKEN)))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        stub.CreateDestination(request, metadata=bearer(ADMIN_TOKEN))
        got = stub.GetDestination(pb.GetDestinationRequest(name="destinations/meta-capi"),
                                  metadata=bearer(READ_TOKEN))
        assert got.destination.credentials_ref == "env:META_CAPI_TOKEN"


def test_the_delivery_log_refuses_bad_names_and_filters(stub: Any) -> None:
    assert list(stub.ListDeliveries(pb.ListDeliveriesRequest(parent="destinations/-")).deliveries) == []
    cases = [
        (lambda: stub.ListDeliveries(pb.ListDeliveriesRequest(parent="meta")), grpc.StatusCode.INVALID_ARGUMENT,
         "parent"),
        (lambda: stub.ListDeliveries(pb.ListDeliveriesRequest(parent="destinations/-", status=99)),
         grpc.StatusCode.INVALID_ARGUMENT, "status"),
        (lambda: stub.ListDeliveries(pb.ListDeliveriesRequest(parent="destinations/-", person="p-1")),
         grpc.StatusCode.INVALID_ARGUMENT, "person"),
        (lambda: stub.GetDelivery(pb.GetDeliveryRequest(name="destinations/x/deliveries/abc")),
         grpc.StatusCode.INVALID_ARGUMENT, "name"),
        (lambda: stub.RetryDelivery(pb.RetryDeliveryRequest(name="deliveries/1")), grpc.StatusCode.INVALID_ARGUMENT,
         "name"),
        (lambda: stub.ReconcileAudience(pb.ReconcileAudienceRequest()), grpc.StatusCode.INVALID_ARGUMENT, "audience"),
    ]
    for call, code, field in cases:
        error = rich_error(call_error(call))
        assert error.code == code, (field, error)
        assert field in error.field_violations, (field, error.field_violations)
    missing = rich_error(call_error(lambda: stub.ListDeliveries(pb.ListDeliveriesRequest(parent="destinations/nope"))))
    assert missing.code == grpc.StatusCode.NOT_FOUND
    gone = rich_error(call_error(lambda: stub.GetDelivery(pb.GetDeliveryRequest(
        name="destinations/nope/deliveries/12"))))
    assert gone.code == grpc.StatusCode.NOT_FOUND and gone.reason == "DELIVERY_NOT_FOUND"
