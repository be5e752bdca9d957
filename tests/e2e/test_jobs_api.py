"""Scheduled jobs through the server, as a client and an operator meet them: ListJobs and RunJob
over gRPC, ``stitchgraph jobs``, the built-in jobs doing their work, and two server processes on
one PostgreSQL database running each scheduled job once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from sqlalchemy import select

from server.cli import main as cli_main
from server.grpc_server import StitchgraphServer
from stitchgraph.db import Database, DatabaseOptions
from stitchgraph.idempotency import IdempotencyRecord
from stitchgraph.scheduler import JobDefinition, JobRunRow, SchedulerSettings
from stitchgraph.v1 import (
    destinations_pb2,
    system_pb2,
    system_service_pb2,
    system_service_pb2_grpc,
)
from tests.e2e.conftest import ADMIN_TOKEN, READ_TOKEN, bearer
from tests.e2e.test_delivery import FAST, GOOD, Client, create_audience, meta_audience, meta_emails, sha
from tests.sandboxes.base import running
from tests.sandboxes.meta import MetaSandbox
from tests.support.grpc_client import rich_error, running_server, server_settings

spb = system_service_pb2
T = TypeVar("T")
BUILT_IN = ["jobs/audience-evaluation", "jobs/audience-reconciliation", "jobs/maintenance"]


def eventually(condition: Callable[[], T], what: str, timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def stub(channel: grpc.Channel) -> Any:
    return system_service_pb2_grpc.SystemServiceStub(channel)


def jobs(stub: Any, **request: Any) -> list[system_pb2.Job]:
    return list(stub.ListJobs(spb.ListJobsRequest(**request)).jobs)


def job(stub: Any, name: str) -> system_pb2.Job:
    return next(j for j in jobs(stub) if j.name == name)


def run_rows(server: StitchgraphServer, job_id: str) -> list[JobRunRow]:
    with server.app.db.read() as session:
        return list(session.scalars(select(JobRunRow).where(JobRunRow.job_id == job_id).order_by(JobRunRow.id)))


class GatedJob:
    """A job source for one test job whose runs wait until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()

    def definitions(self, session: Any) -> list[JobDefinition]:
        return [JobDefinition("slow-pull", "COHORT_PULL", "", target="cohortSources/slow")]

    def run(self, definition: JobDefinition) -> str:
        self.started.set()
        self.gate.wait(30)
        return "1 snapshot applied"


# -- ListJobs -----------------------------------------------------------------------------------------------------

def test_list_jobs_shows_the_built_in_jobs_ordered_by_name(stub: Any) -> None:
    listed = jobs(stub)
    assert [j.name for j in listed] == BUILT_IN
    evaluation, reconciliation, maintenance = listed
    assert (evaluation.kind, evaluation.schedule) == (system_pb2.JOB_KIND_AUDIENCE_EVALUATION, "every 5m")
    assert (reconciliation.kind, reconciliation.schedule) == (system_pb2.JOB_KIND_AUDIENCE_RECONCILIATION,
                                                              "0 3 * * *")
    assert (maintenance.kind, maintenance.schedule) == (system_pb2.JOB_KIND_MAINTENANCE, "every 1h")
    assert all(j.description and not j.target for j in listed)
    assert not any(j.HasField("last_run_time") for j in listed)
    assert all(j.last_status == system_pb2.JOB_RUN_STATUS_UNSPECIFIED for j in listed)


def test_list_jobs_filters_by_kind_and_pages(stub: Any) -> None:
    assert [j.name for j in jobs(stub, kind=system_pb2.JOB_KIND_MAINTENANCE)] == ["jobs/maintenance"]
    assert jobs(stub, kind=system_pb2.JOB_KIND_COHORT_PULL) == []
    names, token = [], ""
    while True:
        page = stub.ListJobs(spb.ListJobsRequest(page_size=2, page_token=token))
        names.append([j.name for j in page.jobs])
        token = page.next_page_token
        if not token:
            break
    assert names == [BUILT_IN[:2], BUILT_IN[2:]]


def test_a_page_token_is_refused_with_another_kind_or_an_unknown_kind(stub: Any) -> None:
    token = stub.ListJobs(spb.ListJobsRequest(page_size=1)).next_page_token
    for request in (spb.ListJobsRequest(page_token=token, kind=system_pb2.JOB_KIND_MAINTENANCE),
                    spb.ListJobsRequest(kind=99)):  # type: ignore[arg-type]
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListJobs(request)
        assert rich_error(caught.value).code == grpc.StatusCode.INVALID_ARGUMENT


# -- RunJob -------------------------------------------------------------------------------------------------------

def test_run_job_with_wait_returns_the_outcome(stub: Any) -> None:
    response = stub.RunJob(spb.RunJobRequest(name="jobs/maintenance", wait=True))
    assert response.run.status == system_pb2.JOB_RUN_STATUS_SUCCEEDED
    assert response.run.detail.startswith("pruned 0 job runs")
    assert response.run.end_time.ToMicroseconds() >= response.run.start_time.ToMicroseconds()
    assert response.job.name == "jobs/maintenance"
    assert response.job.last_status == system_pb2.JOB_RUN_STATUS_SUCCEEDED
    assert response.job.last_run_time == response.run.start_time
    assert job(stub, "jobs/maintenance").last_run_time == response.run.start_time


def test_run_job_without_wait_answers_once_started(stub: Any, server: StitchgraphServer) -> None:
    response = stub.RunJob(spb.RunJobRequest(name="jobs/audience-evaluation"))
    assert response.run.status == system_pb2.JOB_RUN_STATUS_RUNNING
    assert not response.run.HasField("end_time")
    eventually(lambda: job(stub, "jobs/audience-evaluation").last_status == system_pb2.JOB_RUN_STATUS_SUCCEEDED,
               "the run to finish")
    (row,) = run_rows(server, "audience-evaluation")
    assert row.detail == "0 audiences re-evaluated: 0 members added, 0 removed"


def test_run_job_repeated_with_one_request_id_runs_once(stub: Any, server: StitchgraphServer) -> None:
    request = spb.RunJobRequest(request_id="run-maintenance-1", name="jobs/maintenance", wait=True)
    first = stub.RunJob(request)
    second = stub.RunJob(request)
    assert first.run == second.run
    assert first.run.status == system_pb2.JOB_RUN_STATUS_SUCCEEDED
    assert len(run_rows(server, "maintenance")) == 1
    with pytest.raises(grpc.RpcError) as caught:
        stub.RunJob(spb.RunJobRequest(request_id="run-maintenance-1", name="jobs/audience-evaluation"))
    assert rich_error(caught.value).reason == "REQUEST_ID_REUSED"


def test_run_job_while_the_job_runs_is_a_failed_precondition(stub: Any, server: StitchgraphServer) -> None:
    slow = GatedJob()
    server.app.scheduler.add_source(slow)
    try:
        started = stub.RunJob(spb.RunJobRequest(request_id="slow-1", name="jobs/slow-pull"))
        assert started.job.target == "cohortSources/slow"
        assert slow.started.wait(10)
        with pytest.raises(grpc.RpcError) as caught:
            stub.RunJob(spb.RunJobRequest(request_id="slow-2", name="jobs/slow-pull"))
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "JOB_ALREADY_RUNNING")
        # A repeat of the first request is not refused: it answers with the first run.
        assert stub.RunJob(spb.RunJobRequest(request_id="slow-1", name="jobs/slow-pull")).run == started.run
    finally:
        slow.gate.set()
    eventually(lambda: job(stub, "jobs/slow-pull").last_status == system_pb2.JOB_RUN_STATUS_SUCCEEDED,
               "the run to finish")
    (row,) = run_rows(server, "slow-pull")
    assert row.detail == "1 snapshot applied"


@pytest.mark.parametrize(("name", "code", "reason"), [
    ("jobs/nope", grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND"),
    ("maintenance", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME"),
    ("jobs/Maintenance", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME"),
])
def test_run_job_names_a_job_that_exists(stub: Any, name: str, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.RunJob(spb.RunJobRequest(name=name))
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (code, reason)


def test_listing_needs_read_and_running_needs_admin(authed_channel: grpc.Channel) -> None:
    stub = system_service_pb2_grpc.SystemServiceStub(authed_channel)
    assert len(stub.ListJobs(spb.ListJobsRequest(), metadata=bearer(READ_TOKEN)).jobs) == 3
    with pytest.raises(grpc.RpcError) as caught:
        stub.RunJob(spb.RunJobRequest(name="jobs/maintenance"), metadata=bearer(READ_TOKEN))
    assert rich_error(caught.value).code == grpc.StatusCode.PERMISSION_DENIED
    response = stub.RunJob(spb.RunJobRequest(name="jobs/maintenance", wait=True), metadata=bearer(ADMIN_TOKEN))
    assert response.run.status == system_pb2.JOB_RUN_STATUS_SUCCEEDED


# -- the built-in jobs --------------------------------------------------------------------------------------------

def test_the_evaluation_job_fires_on_its_schedule(db_url: str) -> None:
    settings = server_settings(db_url, scheduler=SchedulerSettings(leader_check_seconds=0.2,
                                                                   audience_evaluation_schedule="every 1s"))
    with running_server(settings) as handle, grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        stub = system_service_pb2_grpc.SystemServiceStub(channel)
        # APScheduler moves a job's next fire time on right after handing the fire over, so
        # the listing may briefly still show the fire that is running.
        eventually(lambda: (j := job(stub, "jobs/audience-evaluation")).last_status
                   == system_pb2.JOB_RUN_STATUS_SUCCEEDED
                   and j.next_run_time.ToMicroseconds() > j.last_run_time.ToMicroseconds(),
                   "a scheduled evaluation, and the next one scheduled")
        (first, *_) = run_rows(handle, "audience-evaluation")
        assert not first.fire_key.startswith("manual:")


def test_the_reconciliation_job_repairs_a_drifted_platform_list(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_TOKEN", GOOD)
    with running(MetaSandbox(tokens={GOOD})) as meta, \
            running_server(server_settings(db_url, delivery=FAST)) as handle, \
            grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        client = Client(channel)
        destination = meta_audience(client, meta)
        for name in ("gus", "hal", "ivy"):
            client.identify(name, email=f"{name}@example.com", traits={"plan": "pro"})
            client.grant(name)
        create_audience(client, [destination])
        members = {sha(f"{n}@example.com") for n in ("gus", "hal", "ivy")}
        eventually(lambda: meta_emails(meta) == members, "three adds")
        meta.reset()  # drift: the platform list was emptied

        stub = system_service_pb2_grpc.SystemServiceStub(channel)
        response = stub.RunJob(spb.RunJobRequest(name="jobs/audience-reconciliation", wait=True))
        assert response.run.status == system_pb2.JOB_RUN_STATUS_SUCCEEDED
        assert response.run.detail == "1 audience destinations reconciled, 3 deliveries queued"
        eventually(lambda: meta_emails(meta) == members, "the list replaced")
        reconciled = client.deliveries(destination)
        assert sum(d.kind == destinations_pb2.DELIVERY_KIND_AUDIENCE_ADD for d in reconciled) == 6


def test_the_maintenance_job_forgets_idempotency_records_past_their_retention(
        stub: Any, server: StitchgraphServer) -> None:
    now = datetime.now(UTC)
    with server.app.db.transaction() as session:
        for request_id, age in (("old", timedelta(days=31)), ("recent", timedelta(days=29))):
            session.add(IdempotencyRecord(method="/test/Old", request_id=request_id, fingerprint="0" * 64,
                                          response=b"", created_at=now - age))
    response = stub.RunJob(spb.RunJobRequest(name="jobs/maintenance", wait=True))
    assert response.run.detail.endswith("1 idempotency records")
    with server.app.db.read() as session:
        kept = set(session.scalars(select(IdempotencyRecord.request_id).where(IdempotencyRecord.method == "/test/Old")))
    assert kept == {"recent"}


# -- stitchgraph jobs ---------------------------------------------------------------------------------------------

def test_the_cli_lists_jobs_and_runs_one(server: StitchgraphServer, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{server.port}"
    assert cli_main(["jobs", "list", "--server", address]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:3] == ["JOB", "KIND", "SCHEDULE"]
    assert [line.split()[0] for line in listing[1:]] == ["audience-evaluation", "audience-reconciliation",
                                                         "maintenance"]
    assert "never" in listing[3]

    assert cli_main(["jobs", "run", "maintenance", "--wait", "--server", address]) == 0
    assert capsys.readouterr().out.startswith("jobs/maintenance: succeeded in ")
    assert cli_main(["jobs", "list", "--kind", "maintenance", "--server", address]) == 0
    (_, line) = capsys.readouterr().out.splitlines()
    assert line.split()[0] == "maintenance" and line.rstrip().endswith("SUCCEEDED")

    assert cli_main(["jobs", "run", "jobs/nope", "--server", address]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


# -- two server processes on one PostgreSQL database ----------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pid_of(run: JobRunRow) -> int:
    return int(run.process.rsplit(":", 2)[1])


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_server_processes_on_one_postgresql_database_run_each_scheduled_job_once(
        db_url: str, tmp_path: Path) -> None:
    budget = time.monotonic() + 30  # the whole scenario, start-up included

    def remaining() -> float:
        return max(0.1, budget - time.monotonic())

    config = tmp_path / "stitchgraph.toml"
    config.write_text('[scheduler]\nleader_check_seconds = 0.3\naudience_evaluation_schedule = "every 1s"\n'
                      'audience_reconciliation_schedule = ""\nmaintenance_schedule = ""\n')
    env = {**os.environ, "STITCHGRAPH_DATABASE_URL": db_url, "STITCHGRAPH_METRICS_ADDRESS": "",
           "STITCHGRAPH_LOG_LEVEL": "WARNING", "STITCHGRAPH_CONFIG": str(config)}
    processes: dict[int, tuple[subprocess.Popen[bytes], str]] = {}

    def start(i: int) -> None:
        port = _free_port()
        with (tmp_path / f"server-{i}.log").open("wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--listen", f"127.0.0.1:{port}"],
                                       env=env, stdout=subprocess.DEVNULL, stderr=log)
        processes[process.pid] = (process, f"127.0.0.1:{port}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=remaining())

    db = Database(DatabaseOptions(url=db_url))

    def evaluations() -> list[JobRunRow]:
        with db.read() as session:
            return list(session.scalars(select(JobRunRow).where(JobRunRow.job_id == "audience-evaluation")
                                        .order_by(JobRunRow.id)))

    try:
        # One after the other: start-up seeds the default event mappings, and two processes
        # seeding one empty store at the same instant is not what this test is about.
        start(0)
        start(1)
        # Both serve; let the leader fire for a while (about five seconds).
        before = eventually(lambda: len(evaluations()) >= 5 and evaluations(), "scheduled evaluations",
                            timeout=remaining())
        assert all(not r.fire_key.startswith("manual:") for r in before)
        assert len({r.fire_key for r in before}) == len(before)  # no fire ran twice
        (leader_pid,) = {_pid_of(r) for r in before}  # and one process ran them all
        assert leader_pid in processes
        (follower_pid,) = set(processes) - {leader_pid}
        leader, _ = processes[leader_pid]
        _, follower_address = processes[follower_pid]

        # The process that does not lead runs a job when asked, once.
        with grpc.insecure_channel(follower_address) as channel:
            stub = system_service_pb2_grpc.SystemServiceStub(channel)
            response = stub.RunJob(spb.RunJobRequest(request_id="by-hand-1", name="jobs/maintenance", wait=True),
                                   timeout=remaining())
            assert response.run.status == system_pb2.JOB_RUN_STATUS_SUCCEEDED
            stored_next = job(stub, "jobs/audience-evaluation").next_run_time.ToMicroseconds()
        with db.read() as session:
            (by_hand,) = session.scalars(select(JobRunRow).where(JobRunRow.job_id == "maintenance"))
        assert _pid_of(by_hand) == follower_pid
        assert stored_next > 0  # the job store is answered from the database by a non-leader too

        leader.send_signal(signal.SIGKILL)
        leader.wait(timeout=remaining())
        taken_over = eventually(lambda: [r for r in evaluations() if _pid_of(r) == follower_pid],
                                "the other process to take over", timeout=remaining())
        after = evaluations()
        assert {_pid_of(r) for r in after} == {leader_pid, follower_pid}
        assert len({r.fire_key for r in after}) == len(after)
        # The job survived the leader: the new one fires it on the grid it was scheduled on.
        grid = {datetime.fromisoformat(r.fire_key).microsecond for r in after}
        assert len(grid) == 1
        assert datetime.fromisoformat(taken_over[0].fire_key) > datetime.fromisoformat(before[-1].fire_key)
    finally:
        db.dispose()
        for process, _address in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _address in processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
