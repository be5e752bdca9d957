"""The scheduler over a real store (SQLite and PostgreSQL): scheduled fires, one leader among
several schedulers, runs recorded once, manual runs, jobs kept across restarts.

Each :class:`Scheduler` here has its own :class:`Database` (its own engine and connections),
as a separate server process would.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from sqlalchemy import select, text

from stitchgraph.db import Database, DatabaseOptions
from stitchgraph.errors import NotFound
from stitchgraph.scheduler import (
    ABANDONED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    JobAlreadyRunning,
    JobDefinition,
    JobRunRow,
    JobSource,
    Scheduler,
    SchedulerJobRow,
    SchedulerSettings,
    prune_runs,
)

T = TypeVar("T")
CHECK_SECONDS = 0.2


class RecordingSource:
    """Test jobs: each run is recorded; ``failing`` jobs raise; while ``gate`` is set, runs of
    ``gated`` jobs wait for it to open."""

    def __init__(self, *definitions: JobDefinition) -> None:
        self.defined = list(definitions)
        self.runs: list[str] = []
        self.failing: set[str] = set()
        self.gated: set[str] = set()
        self.gate = threading.Event()
        self.started = threading.Event()
        self._lock = threading.Lock()

    def definitions(self, session: Any) -> list[JobDefinition]:
        return list(self.defined)

    def run(self, definition: JobDefinition) -> str:
        with self._lock:
            self.runs.append(definition.job_id)
        if definition.job_id in self.gated:
            self.started.set()
            self.gate.wait(30)
        if definition.job_id in self.failing:
            raise RuntimeError("PostHog 429 after 5 retries")
        return f"{definition.job_id} done"

    def count(self, job_id: str) -> int:
        with self._lock:
            return self.runs.count(job_id)


def eventually(condition: Callable[[], T], what: str, timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def runs_of(db: Database, job_id: str) -> list[JobRunRow]:
    with db.read() as session:
        return list(session.scalars(select(JobRunRow).where(JobRunRow.job_id == job_id).order_by(JobRunRow.id)))


def stored_next_run(db: Database, job_id: str) -> float | None:
    with db.read() as session:
        return session.scalar(select(SchedulerJobRow.next_run_time).where(SchedulerJobRow.id == job_id))


@pytest.fixture
def make_scheduler(db_url: str) -> Iterator[Callable[..., Scheduler]]:
    """Build schedulers on the store under test, each with its own Database; all are closed after the test."""
    made: list[Scheduler] = []

    def make(*sources: JobSource, **settings: Any) -> Scheduler:
        db = Database(DatabaseOptions(url=db_url, sqlite_synchronous="NORMAL"))
        settings.setdefault("leader_check_seconds", CHECK_SECONDS)
        scheduler = Scheduler(db, SchedulerSettings(**settings), sources)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.close()
        scheduler.db.dispose()


def tick(schedule: str = "every 1s") -> JobDefinition:
    return JobDefinition("tick", "MAINTENANCE", schedule, description="a test job")


# -- scheduled fires ---------------------------------------------------------------------------------------------

def test_the_leader_fires_a_scheduled_job_and_records_each_run(make_scheduler: Callable[..., Scheduler]) -> None:
    source = RecordingSource(tick())
    scheduler = make_scheduler(source)
    scheduler.start()
    eventually(lambda: len(runs_of(scheduler.db, "tick")) >= 3 and runs_of(scheduler.db, "tick")[2].end_us,
               "three finished runs")
    runs = runs_of(scheduler.db, "tick")[:3]
    assert [r.status for r in runs] == [SUCCEEDED] * 3
    assert [r.detail for r in runs] == ["tick done"] * 3
    fire_times = [datetime.fromisoformat(r.fire_key) for r in runs]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(fire_times)]
    assert all(gap >= 1 and gap.is_integer() for gap in gaps)  # fires on the schedule's one-second grid

    def listed() -> Any:
        with scheduler.db.read() as session:
            (state,) = scheduler.jobs(session)
        return state

    # The job store moves the next fire time on right after a fire is handed over.
    state = eventually(lambda: (s := listed()).next_run_us is not None and s.next_run_us > runs[-1].start_us and s,
                       "the next fire in the job store")
    assert state.last_run is not None and state.last_run.run_pk >= runs[-1].id


def test_only_one_of_two_schedulers_leads_and_each_fire_runs_once(make_scheduler: Callable[..., Scheduler]) -> None:
    source = RecordingSource(tick())
    first, second = make_scheduler(source), make_scheduler(source)
    first.start()
    second.start()
    eventually(lambda: len(runs_of(first.db, "tick")) >= 4, "four runs")
    assert first.is_leader != second.is_leader
    leader = first if first.is_leader else second
    runs = runs_of(first.db, "tick")
    assert {r.process for r in runs} == {leader.process}
    assert len({r.fire_key for r in runs}) == len(runs)
    eventually(lambda: all(r.end_us for r in runs_of(first.db, "tick")), "the runs to end")
    assert source.count("tick") == len(runs_of(first.db, "tick"))


def test_when_the_leader_stops_another_takes_over_on_the_same_schedule(
        make_scheduler: Callable[..., Scheduler]) -> None:
    source = RecordingSource(tick())
    first, second = make_scheduler(source), make_scheduler(source)
    first.start()
    eventually(lambda: first.is_leader, "the first scheduler to lead")
    second.start()
    eventually(lambda: len(runs_of(first.db, "tick")) >= 2, "runs under the first leader")
    first.close()
    eventually(lambda: second.is_leader, "the second scheduler to take over")
    eventually(lambda: any(r.process == second.process for r in runs_of(second.db, "tick")),
               "a run under the second leader")
    runs = runs_of(second.db, "tick")
    assert {r.process for r in runs} == {first.process, second.process}
    # The job was not re-created on take-over: its fire times stay on the first leader's grid.
    assert len({datetime.fromisoformat(r.fire_key).microsecond for r in runs}) == 1
    assert len({r.fire_key for r in runs}) == len(runs)


def test_a_fire_already_taken_by_another_process_is_skipped(make_scheduler: Callable[..., Scheduler]) -> None:
    source = RecordingSource(tick("every 1h"))
    first, second = make_scheduler(source), make_scheduler(source)
    fire_time = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    run = first.run_scheduled("tick", fire_time)
    assert run is not None and run.status == SUCCEEDED
    assert second.run_scheduled("tick", fire_time) is None
    assert source.count("tick") == 1
    assert [r.fire_key for r in runs_of(first.db, "tick")] == ["2026-01-01T03:00:00+00:00"]


def test_a_fire_of_a_job_no_source_defines_any_more_is_skipped(make_scheduler: Callable[..., Scheduler]) -> None:
    source = RecordingSource(tick("every 1h"))
    scheduler = make_scheduler(source)
    source.defined.clear()
    assert scheduler.run_scheduled("tick", datetime.now(UTC)) is None
    assert source.runs == []


# -- manual runs ---------------------------------------------------------------------------------------------------

def test_a_manual_run_records_success_and_failure(make_scheduler: Callable[..., Scheduler]) -> None:
    source = RecordingSource(tick(), JobDefinition("pull", "COHORT_PULL", "", target="cohortSources/ph"))
    source.failing.add("pull")
    scheduler = make_scheduler(source)
    done = scheduler.run_now("tick")
    assert (done.status, done.detail, done.fire_key[:7]) == (SUCCEEDED, "tick done", "manual:")
    assert done.end_us is not None and done.end_us >= done.start_us
    failed = scheduler.run_now("pull")
    assert (failed.status, failed.detail) == (FAILED, "RuntimeError: PostHog 429 after 5 retries")
    with scheduler.db.read() as session:
        state = scheduler.job(session, "pull")
    assert state.last_run == failed
    assert state.next_run_us is None  # no schedule: runs only when asked


def test_an_unknown_job_is_not_found(make_scheduler: Callable[..., Scheduler]) -> None:
    scheduler = make_scheduler(RecordingSource(tick()))
    with pytest.raises(NotFound):
        scheduler.run_now("nope")
    with pytest.raises(NotFound), scheduler.db.read() as session:
        scheduler.job(session, "nope")


def test_a_job_does_not_start_while_it_runs_anywhere(make_scheduler: Callable[..., Scheduler]) -> None:
    source = RecordingSource(tick("every 1h"))
    source.gated.add("tick")
    first, second = make_scheduler(source), make_scheduler(source)
    started = first.run_now("tick", wait=False)
    assert started.status == RUNNING
    assert source.started.wait(10)
    for scheduler in (first, second):
        with pytest.raises(JobAlreadyRunning) as caught:
            scheduler.run_now("tick")
        assert caught.value.reason == "JOB_ALREADY_RUNNING"
    assert second.run_scheduled("tick", datetime.now(UTC)) is None
    source.gate.set()
    assert first.wait(started.run_pk, timeout=20).status == SUCCEEDED
    assert second.run_now("tick").status == SUCCEEDED
    assert source.count("tick") == 2


def test_a_run_left_running_by_a_dead_process_fails_and_does_not_block(
        make_scheduler: Callable[..., Scheduler]) -> None:
    source = RecordingSource(tick("every 1h"))
    scheduler = make_scheduler(source)
    gone = subprocess.Popen(["true"])
    gone.wait()
    from stitchgraph.scheduler import _HOST

    with scheduler.db.transaction() as session:
        session.add(JobRunRow(job_id="tick", fire_key="manual:left-over", start_us=1, end_us=None, status=RUNNING,
                              detail="", process=f"{_HOST}:{gone.pid}:deadbeef"))
    assert scheduler.run_now("tick").status == SUCCEEDED
    left_over = runs_of(scheduler.db, "tick")[0]
    assert (left_over.status, left_over.detail) == (FAILED, ABANDONED)
    assert left_over.end_us is not None


# -- the job store ------------------------------------------------------------------------------------------------

def test_refresh_adds_reschedules_and_removes_jobs(make_scheduler: Callable[..., Scheduler]) -> None:
    scheduler = make_scheduler(RecordingSource(tick("every 1h")))
    scheduler.start()
    eventually(lambda: stored_next_run(scheduler.db, "tick"), "the job in the store")
    later = RecordingSource(JobDefinition("cohort-pull-ph", "COHORT_PULL", "every 6h"),
                            JobDefinition("by-hand", "MAINTENANCE", ""))
    scheduler.add_source(later)  # as the cohort service does after creating a cohort source
    pull_next = stored_next_run(scheduler.db, "cohort-pull-ph")
    assert pull_next is not None and pull_next > time.time() + 5 * 3600
    assert stored_next_run(scheduler.db, "by-hand") is None
    later.defined[0] = JobDefinition("cohort-pull-ph", "COHORT_PULL", "every 1h")
    scheduler.refresh()
    moved = stored_next_run(scheduler.db, "cohort-pull-ph")
    assert moved is not None and moved < time.time() + 3601
    later.defined.pop(0)
    scheduler.refresh()
    with scheduler.db.read() as session:
        assert set(session.scalars(select(SchedulerJobRow.id))) == {"tick"}
        assert [s.definition.job_id for s in scheduler.jobs(session)] == ["by-hand", "tick"]
        assert [s.definition.job_id for s in scheduler.jobs(session, "COHORT_PULL")] == []


def test_jobs_survive_a_restart(make_scheduler: Callable[..., Scheduler]) -> None:
    first = make_scheduler(RecordingSource(tick("every 1h")))
    first.start()
    before = eventually(lambda: stored_next_run(first.db, "tick"), "the job in the store")
    first.close()
    restarted = make_scheduler(RecordingSource(tick("every 1h")))
    with restarted.db.read() as session:
        (state,) = restarted.jobs(session)  # answered from the store before this process leads
    assert state.next_run_us == round(before * 1_000_000)
    restarted.start()
    eventually(lambda: restarted.is_leader, "the restarted scheduler to lead")
    restarted.refresh()
    assert stored_next_run(restarted.db, "tick") == before


def test_pruning_keeps_each_jobs_latest_run(make_scheduler: Callable[..., Scheduler]) -> None:
    source = RecordingSource(tick("every 1h"), JobDefinition("other", "MAINTENANCE", ""))
    scheduler = make_scheduler(source)
    runs = [scheduler.run_now("tick") for _ in range(3)] + [scheduler.run_now("other")]
    with scheduler.db.transaction() as session:
        assert prune_runs(session, before_us=runs[-1].end_us + 1) == 2  # type: ignore[operator]
    assert [r.id for r in runs_of(scheduler.db, "tick")] == [runs[2].run_pk]
    assert [r.id for r in runs_of(scheduler.db, "other")] == [runs[3].run_pk]


# -- PostgreSQL: a leader that loses its lock connection ------------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_leader_whose_lock_connection_dies_stops_and_competes_again(
        make_scheduler: Callable[..., Scheduler], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="stitchgraph.scheduler")
    scheduler = make_scheduler(RecordingSource(tick()))
    scheduler.start()
    eventually(lambda: scheduler.is_leader and runs_of(scheduler.db, "tick"), "the leader to fire")
    with scheduler.db.engine.connect() as connection:
        killed = connection.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND pid <> pg_backend_pid()"
        )).scalars().all()
    assert killed and all(killed)
    eventually(lambda: "lost the scheduler lock" in caplog.text, "the leader to notice")
    count = len(runs_of(scheduler.db, "tick"))
    eventually(lambda: scheduler.is_leader and len(runs_of(scheduler.db, "tick")) > count,
               "the scheduler to lead and fire again")
