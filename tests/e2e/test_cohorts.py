"""Cohort imports end to end over gRPC, on SQLite and PostgreSQL: a PostHog cohort paged
through the sandbox becomes traits and its audience reaches the Meta sandbox; the next
snapshot removes exactly the persons who left; a pull failing halfway applies nothing;
pushed snapshots are idempotent and guarded; Heap Segments Sync pages apply once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from server.grpc_server import StitchgraphServer
from stitchgraph.v1 import (
    audience_service_pb2,
    audiences_pb2,
    cohort_service_pb2,
    cohort_service_pb2_grpc,
    cohorts_pb2,
    common_pb2,
    consent_pb2,
    event_service_pb2,
    events_pb2,
)
from tests.e2e.test_delivery import FAST, GOOD, Client, meta_audience, ts, wait_for
from tests.sandboxes.base import running
from tests.sandboxes.meta import MetaSandbox
from tests.sandboxes.posthog import PostHogSandbox
from tests.support.grpc_client import rich_error, running_server, server_settings

cpb = cohort_service_pb2
GRANTED = consent_pb2.CONSENT_STATUS_GRANTED
STATUS = cohorts_pb2.CohortSnapshotStatus
PERSONS = 2500


@pytest.fixture
def posthog() -> Iterator[PostHogSandbox]:
    with running(PostHogSandbox(rate_limit_per_minute=100_000)) as sandbox:
        yield sandbox  # type: ignore[misc]


@pytest.fixture
def meta() -> Iterator[MetaSandbox]:
    with running(MetaSandbox(tokens={GOOD})) as sandbox:
        yield sandbox  # type: ignore[misc]


@pytest.fixture
def server(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[StitchgraphServer]:
    monkeypatch.setenv("SANDBOX_TOKEN", GOOD)
    monkeypatch.setenv("POSTHOG_PERSONAL_KEY", "phx_sandbox")
    with running_server(server_settings(db_url, delivery=FAST)) as handle:
        yield handle


@pytest.fixture
def client(channel: grpc.Channel) -> Client:
    return Client(channel)


@pytest.fixture
def cohorts(channel: grpc.Channel) -> cohort_service_pb2_grpc.CohortServiceStub:
    return cohort_service_pb2_grpc.CohortServiceStub(channel)


def user(i: int) -> str:
    return f"user-{i:05d}"


def sign_up_everyone(client: Client, count: int = PERSONS) -> None:
    """``count`` persons with a user ID, an email and ad consent, through captured events."""
    now = datetime.now(UTC)
    consent = consent_pb2.ConsentSignals(google_consent_mode=consent_pb2.GoogleConsentMode(
        ad_user_data=GRANTED, ad_personalization=GRANTED, analytics_storage=GRANTED))
    for start in range(0, count, 1000):
        client.capture(*[events_pb2.Event(
            event="sign_up", event_id=f"signup-{i}", source="app", occurred_at=ts(now),
            identifiers=[common_pb2.Identifier(type="user_id", value=user(i)),
                         common_pb2.Identifier(type="email", value=f"person{i}@example.com")],
            context=events_pb2.EventContext(consent=consent)) for i in range(start, min(start + 1000, count))])


def posthog_source(cohorts: Any, sandbox: PostHogSandbox, *, page_size: int = 100,
                   guard: cohorts_pb2.SnapshotGuard | None = None) -> str:
    settings = struct_pb2.Struct()
    settings.update({"host": sandbox.url, "project_id": "1", "page_size": page_size})
    source = cohorts_pb2.CohortSource(
        kind=cohorts_pb2.COHORT_SOURCE_KIND_POSTHOG, display_name="PostHog prod", settings=settings,
        credentials_ref="env:POSTHOG_PERSONAL_KEY",
        cohorts=[cohorts_pb2.CohortImport(cohort_key="42", display_name="Power Users")])
    if guard is not None:
        source.snapshot_guard.CopyFrom(guard)
    return cohorts.CreateCohortSource(cpb.CreateCohortSourceRequest(
        cohort_source_id="ph", cohort_source=source)).cohort_source.name


def sync(cohorts: Any, name: str = "cohortSources/ph") -> cohorts_pb2.CohortSnapshot:
    response = cohorts.SyncCohortSource(cpb.SyncCohortSourceRequest(name=name), timeout=120)
    assert len(response.snapshots) == 1
    return response.snapshots[0]


def trait_of(client: Client, user_id: str, key: str) -> Any:
    person = client.identity.LookupPerson(_lookup(user_id)).person.name
    traits = client.events.ListPersonTraits(event_service_pb2.ListPersonTraitsRequest(parent=person, keys=[key]))
    values = {t.key: t for t in traits.traits}
    return values[key].value.bool_value if key in values else None


def _lookup(user_id: str) -> Any:
    from stitchgraph.v1 import identity_service_pb2

    return identity_service_pb2.LookupPersonRequest(identifier=common_pb2.Identifier(type="user_id", value=user_id))


def meta_count(sandbox: MetaSandbox) -> int:
    return len(sandbox.audience_members("2385"))


# -- PostHog -------------------------------------------------------------------------------------

def test_a_paged_posthog_cohort_becomes_traits_and_its_audience_follows_to_meta(
        server: StitchgraphServer, client: Client, cohorts: Any, posthog: PostHogSandbox,
        meta: MetaSandbox) -> None:
    sign_up_everyone(client)
    posthog.set_cohort(42, "Power Users", [[user(i)] for i in range(PERSONS)])
    posthog_source(cohorts, posthog)
    destination = meta_audience(client, meta)
    client.audiences.CreateAudience(audience_service_pb2.CreateAudienceRequest(
        audience_id="power", audience=audiences_pb2.Audience(
            display_name="Power users", rule='cohort("posthog", "Power Users")', destinations=[destination])))

    first = sync(cohorts)
    assert first.status == STATUS.COHORT_SNAPSHOT_STATUS_APPLIED, first.error
    assert (first.member_count, first.added_count, first.removed_count) == (PERSONS, PERSONS, 0)
    assert first.trait_name == "posthog_cohort_power_users"
    assert first.new_identifier_count == 0  # every distinct ID was a known user ID
    assert trait_of(client, user(7), "posthog_cohort_power_users") is True
    wait_for(lambda: meta_count(meta) == PERSONS, timeout=60, what="2,500 adds at Meta")

    left = {user(i) for i in range(0, PERSONS, PERSONS // 100)}
    assert len(left) == 100
    assert posthog.remove_members(42, left) == 100
    second = sync(cohorts)
    assert second.status == STATUS.COHORT_SNAPSHOT_STATUS_APPLIED, second.error
    assert (second.member_count, second.added_count, second.removed_count) == (PERSONS - 100, 0, 100)
    assert trait_of(client, user(0), "posthog_cohort_power_users") is None
    assert trait_of(client, user(1), "posthog_cohort_power_users") is True
    wait_for(lambda: meta_count(meta) == PERSONS - 100, timeout=60, what="100 removals at Meta")
    removals = client.audiences.ListAudienceDeltas(audience_service_pb2.ListAudienceDeltasRequest(
        parent="audiences/power", page_size=1000, kind=audiences_pb2.AUDIENCE_DELTA_KIND_REMOVE)).deltas
    assert len(removals) == 100

    history = cohorts.ListCohortSnapshots(cpb.ListCohortSnapshotsRequest(parent="cohortSources/ph")).snapshots
    assert [s.name for s in history] == [second.name, first.name]
    source = cohorts.GetCohortSource(cpb.GetCohortSourceRequest(name="cohortSources/ph")).cohort_source
    assert source.cohorts[0].last_snapshot == second.name


def test_a_pull_failing_on_page_7_of_25_changes_nothing(
        server: StitchgraphServer, client: Client, cohorts: Any, posthog: PostHogSandbox) -> None:
    sign_up_everyone(client, 300)
    posthog.set_cohort(42, "Power Users", [[user(i)] for i in range(300)])
    posthog_source(cohorts, posthog)
    assert sync(cohorts).status == STATUS.COHORT_SNAPSHOT_STATUS_APPLIED
    # 2,500 members in pages of 100: page 7 is offset 600; it keeps failing.
    posthog.set_cohort(42, "Power Users", [[user(i)] for i in range(100, PERSONS + 100)])
    posthog.fail_page(600, count=100, status=500)
    failed = sync(cohorts)
    assert failed.status == STATUS.COHORT_SNAPSHOT_STATUS_FAILED
    assert "page 7" in failed.error and "500" in failed.error
    assert (failed.added_count, failed.removed_count) == (0, 0)
    assert trait_of(client, user(0), "posthog_cohort_power_users") is True  # not removed
    assert trait_of(client, user(299), "posthog_cohort_power_users") is True
    source = cohorts.GetCohortSource(cpb.GetCohortSourceRequest(name="cohortSources/ph")).cohort_source
    assert source.cohorts[0].last_snapshot != failed.name


def test_an_empty_snapshot_is_held_until_an_operator_confirms_it(
        server: StitchgraphServer, client: Client, cohorts: Any, posthog: PostHogSandbox) -> None:
    sign_up_everyone(client, 150)
    posthog.set_cohort(42, "Power Users", [[user(i)] for i in range(150)])
    posthog_source(cohorts, posthog)
    assert sync(cohorts).status == STATUS.COHORT_SNAPSHOT_STATUS_APPLIED
    posthog.set_cohort(42, "Power Users", [])
    held = sync(cohorts)
    assert held.status == STATUS.COHORT_SNAPSHOT_STATUS_HELD
    assert "empty" in held.error
    assert trait_of(client, user(3), "posthog_cohort_power_users") is True
    confirmed = cohorts.ConfirmCohortSnapshot(cpb.ConfirmCohortSnapshotRequest(
        name=held.name, operator="ops@example.com", reason="the cohort really is empty")).snapshot
    assert confirmed.status == STATUS.COHORT_SNAPSHOT_STATUS_APPLIED
    assert confirmed.removed_count == 150 and confirmed.operator == "ops@example.com"
    assert trait_of(client, user(3), "posthog_cohort_power_users") is None
    with pytest.raises(grpc.RpcError) as caught:
        cohorts.ConfirmCohortSnapshot(cpb.ConfirmCohortSnapshotRequest(name=held.name, operator="ops"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_unknown_distinct_ids_become_posthog_identifiers_that_merge_nothing(
        server: StitchgraphServer, client: Client, cohorts: Any, posthog: PostHogSandbox) -> None:
    sign_up_everyone(client, 2)
    posthog.set_cohort(42, "Power Users", [[user(0)], ["anon-device-9", "ph-user-9"], ["null"]])
    posthog_source(cohorts, posthog)
    snapshot = sync(cohorts)
    assert snapshot.status == STATUS.COHORT_SNAPSHOT_STATUS_APPLIED
    assert (snapshot.added_count, snapshot.new_identifier_count, snapshot.ignored_count) == (2, 1, 1)
    from stitchgraph.v1 import identity_service_pb2

    found = client.identity.LookupPerson(identity_service_pb2.LookupPersonRequest(
        identifier=common_pb2.Identifier(type="posthog_distinct_id", value="anon-device-9"))).person
    assert [i.type for i in found.identifiers] == ["posthog_distinct_id"]


# -- pushed snapshots ------------------------------------------------------------------------------

def push_source(cohorts: Any) -> None:
    source = cohorts_pb2.CohortSource(kind=cohorts_pb2.COHORT_SOURCE_KIND_PUSH, display_name="CRM job",
                                      cohorts=[cohorts_pb2.CohortImport(cohort_key="vip", trait_name="crm_vip")])
    cohorts.CreateCohortSource(cpb.CreateCohortSourceRequest(cohort_source_id="crm", cohort_source=source))


def push(cohorts: Any, snapshot_id: str, members: list[str], *, mode: int = cohorts_pb2.SNAPSHOT_MODE_FULL,
         removals: list[str] = (), expected: int = 0) -> cohorts_pb2.CohortSnapshot:  # type: ignore[assignment]
    def messages() -> Iterator[cpb.ImportCohortSnapshotRequest]:
        yield cpb.ImportCohortSnapshotRequest(header=cpb.CohortSnapshotHeader(
            snapshot_id=snapshot_id, source="cohortSources/crm", cohort="vip", mode=mode,
            expected_member_count=expected))
        for start in range(0, max(len(members), len(removals)), 2):
            yield cpb.ImportCohortSnapshotRequest(chunk=cpb.CohortSnapshotChunk(
                members=[common_pb2.Identifier(type="email", value=m) for m in members[start:start + 2]],
                removals=[common_pb2.Identifier(type="email", value=m) for m in removals[start:start + 2]]))
    return cohorts.ImportCohortSnapshot(messages()).snapshot


def test_a_pushed_snapshot_is_idempotent_by_snapshot_id_and_hashes_emails_at_the_edge(
        server: StitchgraphServer, client: Client, cohorts: Any) -> None:
    push_source(cohorts)
    first = push(cohorts, "s-1", ["A@example.com", "b@example.com", "c@example.com"])
    assert (first.status, first.added_count, first.new_identifier_count) == (
        STATUS.COHORT_SNAPSHOT_STATUS_APPLIED, 3, 3)
    again = push(cohorts, "s-1", ["A@example.com", "b@example.com", "c@example.com"])
    assert again == first
    delta = push(cohorts, "s-2", ["d@example.com"], mode=cohorts_pb2.SNAPSHOT_MODE_DELTA,
                 removals=["a@example.com"])
    assert (delta.added_count, delta.removed_count, delta.member_count) == (1, 1, 3)
    short = push(cohorts, "s-3", ["d@example.com"], expected=5)
    assert short.status == STATUS.COHORT_SNAPSHOT_STATUS_FAILED and "expected 5" in short.error
    with pytest.raises(grpc.RpcError) as caught:
        push(cohorts, "s-1", ["other@example.com"], mode=cohorts_pb2.SNAPSHOT_MODE_DELTA)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bad_member_rejects_the_whole_push_and_stores_nothing(
        server: StitchgraphServer, client: Client, cohorts: Any) -> None:
    push_source(cohorts)
    with pytest.raises(grpc.RpcError) as caught:
        push(cohorts, "bad-1", ["ok@example.com", "not-an-email"])
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert any("members[1].value" in f for f in error.field_violations)
    assert not cohorts.ListCohortSnapshots(cpb.ListCohortSnapshotsRequest(parent="cohortSources/-")).snapshots


def test_invalid_sources_are_refused_with_the_field(server: StitchgraphServer, cohorts: Any) -> None:
    settings = struct_pb2.Struct()
    settings.update({"host": "https://us.i.posthog.com", "project_id": "1", "api_key": "phx_x"})
    with pytest.raises(grpc.RpcError) as caught:
        cohorts.CreateCohortSource(cpb.CreateCohortSourceRequest(cohort_source=cohorts_pb2.CohortSource(
            kind=cohorts_pb2.COHORT_SOURCE_KIND_POSTHOG, display_name="x", settings=settings,
            credentials_ref="env:X", cohorts=[cohorts_pb2.CohortImport(cohort_key="abc", schedule="whenever")])))
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"cohort_source.settings.host", "cohort_source.settings.api_key", "cohort_source.cohorts[0].cohort_key",
            "cohort_source.cohorts[0].schedule"} <= set(error.field_violations)
    assert not cohorts.ListCohortSources(cpb.ListCohortSourcesRequest()).cohort_sources


# -- Heap Segments Sync webhook ---------------------------------------------------------------------

@pytest.fixture
def webhook_server(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[StitchgraphServer]:
    from server.config import WebhookSettings

    monkeypatch.setenv("HEAP_WEBHOOK_SECRET", "heap-signing-secret")
    with running_server(server_settings(db_url, delivery=FAST,
                                        webhooks=WebhookSettings(listen="127.0.0.1:0"))) as handle:
        yield handle


def heap_sender(server: StitchgraphServer, cohorts: Any) -> Any:
    from tests.sandboxes.heap import HeapWebhookSender

    cohorts.CreateCohortSource(cpb.CreateCohortSourceRequest(cohort_source_id="heap", cohort_source=(
        cohorts_pb2.CohortSource(kind=cohorts_pb2.COHORT_SOURCE_KIND_HEAP_WEBHOOK, display_name="Heap",
                                 credentials_ref="env:HEAP_WEBHOOK_SECRET"))))
    return HeapWebhookSender(f"http://127.0.0.1:{server.http_port}/webhooks/heap/heap", "heap-signing-secret")


def heap_snapshots(cohorts: Any) -> list[cohorts_pb2.CohortSnapshot]:
    return list(cohorts.ListCohortSnapshots(cpb.ListCohortSnapshotsRequest(parent="cohortSources/heap")).snapshots)


def test_heap_sync_pages_apply_once_and_forged_or_stale_signatures_change_nothing(
        webhook_server: StitchgraphServer, client: Client, cohorts: Any) -> None:
    sign_up_everyone(client, 5)
    sender = heap_sender(webhook_server, cohorts)
    pages = sender.sync_pages(77, "Trial Users", add=[user(0), user(1), user(2)], page_size=2, sync_task_id="t-1")
    for page in pages:
        status, body = sender.send_payload(page)
        assert status == 200, body
    assert trait_of(client, user(2), "heap_segment_trial_users") is True
    applied = heap_snapshots(cohorts)
    assert len(applied) == 2 and {s.status for s in applied} == {STATUS.COHORT_SNAPSHOT_STATUS_APPLIED}

    # Heap retries a page: the second delivery changes nothing.
    status, body = sender.send_payload(pages[0])
    assert status == 200 and "duplicate" in body
    assert len(heap_snapshots(cohorts)) == 2

    removal = sender.sync_payload(77, "Trial Users", remove=[user(0)], sync_task_id="t-2")
    forged = sender.send_payload(removal, secret="not-the-secret")
    stale = sender.send_payload(removal, ts=int(time.time() * 1000) - 10 * 60 * 1000)
    unsigned = sender.send_raw(b'{"action_type":"segment.users.sync"}', None)
    assert [forged[0], stale[0], unsigned[0]] == [401, 401, 401]
    assert trait_of(client, user(0), "heap_segment_trial_users") is True
    assert len(heap_snapshots(cohorts)) == 2

    status, _ = sender.send_payload(removal)
    assert status == 200
    assert trait_of(client, user(0), "heap_segment_trial_users") is None
    status, _ = sender.send_payload(sender.drain_payload(77, "Trial Users"))
    assert status == 200
    assert trait_of(client, user(1), "heap_segment_trial_users") is None


# -- scheduled pulls ---------------------------------------------------------------------------------

def test_a_posthog_source_is_a_scheduled_job_that_runs_through_the_api(
        server: StitchgraphServer, client: Client, cohorts: Any, posthog: PostHogSandbox,
        channel: grpc.Channel) -> None:
    from stitchgraph.v1 import system_pb2, system_service_pb2, system_service_pb2_grpc

    sign_up_everyone(client, 3)
    posthog.set_cohort(42, "Power Users", [[user(i)] for i in range(3)])
    posthog_source(cohorts, posthog)
    system = system_service_pb2_grpc.SystemServiceStub(channel)
    jobs = {j.name: j for j in system.ListJobs(system_service_pb2.ListJobsRequest(
        kind=system_pb2.JOB_KIND_COHORT_PULL)).jobs}
    assert list(jobs) == ["jobs/cohort-pull-ph"]
    assert jobs["jobs/cohort-pull-ph"].target == "cohortSources/ph"
    assert jobs["jobs/cohort-pull-ph"].schedule == "every 6h"
    run = system.RunJob(system_service_pb2.RunJobRequest(name="jobs/cohort-pull-ph", wait=True), timeout=60).run
    assert run.status == system_pb2.JOB_RUN_STATUS_SUCCEEDED, run.detail
    snapshot = heap_or_ph_latest(cohorts)
    assert snapshot.trigger == cohorts_pb2.COHORT_SNAPSHOT_TRIGGER_SCHEDULED
    assert snapshot.added_count == 3
    cohorts.DeleteCohortSource(cpb.DeleteCohortSourceRequest(name="cohortSources/ph"))
    assert not system.ListJobs(system_service_pb2.ListJobsRequest(kind=system_pb2.JOB_KIND_COHORT_PULL)).jobs


def heap_or_ph_latest(cohorts: Any) -> cohorts_pb2.CohortSnapshot:
    return cohorts.ListCohortSnapshots(cpb.ListCohortSnapshotsRequest(parent="cohortSources/ph")).snapshots[0]
