"""Scheduled jobs: cohort pulls, time-window audience re-evaluation, reconciliation with
destinations and housekeeping, fired by APScheduler in one server process at a time.

What runs is declared, not stored. Each :class:`JobSource` says which jobs should exist
(:class:`JobDefinition`, read from the configuration or the database) and does the work of
one run. The :class:`Scheduler` keeps APScheduler's persistent job store (the table
``scheduler_jobs``, in the service database) in line with those definitions
(:meth:`Scheduler.refresh`), so a job's next fire time survives restarts, and records every
run in ``job_runs``.

One leader. Only the process holding the scheduler lock runs APScheduler. On PostgreSQL the
lock is a session advisory lock held on a dedicated connection: the others try again every
``leader_check_seconds``, and a leader that finds its connection dead stops firing. On
SQLite it is a lease row the leader renews (several processes on one SQLite file is an edge
case, but it costs nothing to get right). During a hand-over two processes may briefly both
fire (the old leader has not yet noticed it lost the lock), so each scheduled fire is also
claimed by inserting ``(job_id, fire time)`` into ``job_runs`` under a unique constraint:
the first process to insert runs it, any other skips it.

One run of a job at a time, anywhere. On PostgreSQL a run holds an advisory lock named after
its job until it ends; on SQLite the RUNNING row of a live process blocks another start. A
RUNNING row left by a process that died is noticed by the next start and marked FAILED.

Manual runs (the ``RunJob`` RPC, ``stitchgraph jobs run``) execute in the process that was
asked, leader or not: :meth:`Scheduler.claim_run` inside the caller's transaction, then
:meth:`Scheduler.launch` once it committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.executors.base import BaseExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import (
    BigInteger,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from stitchgraph.db import Base, Database
from stitchgraph.errors import FailedPrecondition, NotFound

logger = logging.getLogger("stitchgraph.scheduler")

COHORT_PULL = "COHORT_PULL"
AUDIENCE_EVALUATION = "AUDIENCE_EVALUATION"
AUDIENCE_RECONCILIATION = "AUDIENCE_RECONCILIATION"
MAINTENANCE = "MAINTENANCE"
#: What a job does: the ``JobKind`` names without their prefix.
JOB_KINDS = (COHORT_PULL, AUDIENCE_EVALUATION, AUDIENCE_RECONCILIATION, MAINTENANCE)

RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
#: Outcomes of a run: the ``JobRunStatus`` names without their prefix.
RUN_STATUSES = (RUNNING, SUCCEEDED, FAILED)

#: The table APScheduler's job store uses (declared below so the migrations create it).
JOB_STORE_TABLE = "scheduler_jobs"
MAX_DETAIL_LENGTH = 2000
MIN_INTERVAL_SECONDS = 1
MAX_INTERVAL_SECONDS = 366 * 86400
ABANDONED = "abandoned: the process running it stopped before it finished"
# How long a start waits for the job's lock held by a run that already recorded its outcome.
_LOCK_HANDOVER_SECONDS = 5.0

_JOB_ID_RE = re.compile(r"[a-z0-9-]{1,63}")
_EVERY_RE = re.compile(r"every\s+(\d+)\s*([smhd])", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_LEADER_LOCK = "stitchgraph.scheduler.leader"
# APScheduler stores a text reference to each job's function, resolved when the job is loaded.
_FIRE_REF = "stitchgraph.scheduler:_fire"
_PK = BigInteger().with_variant(Integer(), "sqlite")
_HOST = socket.gethostname()


# -- tables -------------------------------------------------------------------------------------------------------

class SchedulerJobRow(Base):
    """APScheduler's job store: exactly the columns its ``SQLAlchemyJobStore`` declares, so
    the migration creates the table and the store's own ``CREATE ... IF NOT EXISTS`` is a
    no-op. ``next_run_time`` is seconds since the epoch (UTC); ``job_state`` is pickled."""

    __tablename__ = JOB_STORE_TABLE

    id: Mapped[str] = mapped_column(String(191), primary_key=True)
    next_run_time: Mapped[float | None] = mapped_column(Float(25), index=True, nullable=True)
    job_state: Mapped[bytes] = mapped_column(LargeBinary)


class JobRunRow(Base):
    """One run of a job. ``fire_key`` is the scheduled fire time (ISO 8601, UTC) of a scheduled
    run or ``manual:...`` for a run asked for by hand; unique per job, so a scheduled fire is
    taken by one process only. ``process`` names the process that ran it (host:pid:instance)."""

    __tablename__ = "job_runs"
    __table_args__ = (
        UniqueConstraint("job_id", "fire_key"),
        Index("ix_job_runs_job", "job_id", "id"),
        Index("ix_job_runs_job_status", "job_id", "status"),
    )

    id: Mapped[int] = mapped_column(_PK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(63))
    fire_key: Mapped[str] = mapped_column(String(64))
    start_us: Mapped[int] = mapped_column(BigInteger)
    end_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text, default="")
    process: Mapped[str] = mapped_column(String(255))


class SchedulerLeaseRow(Base):
    """Which process leads the scheduler on SQLite, and until when (PostgreSQL uses an
    advisory lock instead)."""

    __tablename__ = "scheduler_leases"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_us: Mapped[int] = mapped_column(BigInteger)


# -- schedules and definitions ------------------------------------------------------------------------------------

def parse_schedule(schedule: str) -> CronTrigger | IntervalTrigger:
    """The APScheduler trigger of ``schedule``: a 5-field cron expression evaluated in UTC
    (``"0 3 * * *"``; day of week 0 or 7 is Sunday, as in crontab) or an interval
    (``"every 30s"``, ``"every 5m"``, ``"every 6h"``, ``"every 1d"``, at least one second).

    Raises :class:`ValueError` with a message fit for an API error otherwise, and for a cron
    expression that restricts both the day of month and the day of week (crontab runs when
    either matches, APScheduler only when both do; rather than pick one, it is refused).
    """
    stripped = schedule.strip()
    every = _EVERY_RE.fullmatch(stripped)
    if every:
        seconds = int(every.group(1)) * _UNIT_SECONDS[every.group(2).lower()]
        if not MIN_INTERVAL_SECONDS <= seconds <= MAX_INTERVAL_SECONDS:
            raise ValueError(f"schedule {schedule!r}: an interval must be between 1 second and 366 days")
        return IntervalTrigger(seconds=seconds, timezone=UTC)
    fields = stripped.split()
    if len(fields) != 5:
        raise ValueError(f"schedule {schedule!r}: expected a 5-field cron expression in UTC such as '0 3 * * *' "
                         "or an interval such as 'every 6h' (units s, m, h, d)")
    minute, hour, day, month, weekday = fields
    if day not in ("*", "?") and weekday not in ("*", "?"):
        raise ValueError(f"schedule {schedule!r}: restrict the day of month or the day of week, not both")
    try:
        return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                           day_of_week=_crontab_weekdays(weekday), timezone=UTC)
    except ValueError as exc:
        raise ValueError(f"schedule {schedule!r}: not a valid cron expression ({exc})") from exc


def _crontab_weekdays(field: str) -> str:
    """A crontab day-of-week field (0 or 7 = Sunday) as APScheduler weekday names, which
    APScheduler 3 needs because it numbers Monday 0."""
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for item in field.split(","):
        part, slash, step_text = item.partition("/")
        if slash and not (step_text.isdigit() and int(step_text) > 0):
            raise ValueError(f"day of week {field!r}: bad step {step_text!r}")
        step = int(step_text) if slash else 1
        if part == "*":
            first, last = 0, 6
        elif "-" in part:
            start, _, end = part.partition("-")
            first, last = _crontab_day(start, field), _crontab_day(end, field)
        else:
            first = _crontab_day(part, field)
            last = 6 if slash else first
        if first > last:
            raise ValueError(f"day of week {field!r}: range {part!r} runs backwards")
        days.update(day % 7 for day in range(first, last + 1, step))
    return ",".join(_CRON_DAYS[day] for day in sorted(days))


def _crontab_day(token: str, field: str) -> int:
    lowered = token.lower()
    if lowered in _CRON_DAYS:
        return _CRON_DAYS.index(lowered)
    if token.isdigit() and int(token) <= 7:
        return int(token)
    raise ValueError(f"day of week {field!r}: {token!r} is not 0-7 or a day name")


def job_id_problem(job_id: str) -> str | None:
    """Why ``job_id`` is not a valid job ID, or None when it is."""
    if not _JOB_ID_RE.fullmatch(job_id):
        return "must be 1-63 characters of a-z, 0-9 and '-'"
    return None


@dataclass(frozen=True)
class JobDefinition:
    """A job that should exist: its ID (``jobs/{job_id}`` in the API), what it does
    (``kind``, one of :data:`JOB_KINDS`), when (``schedule``, see :func:`parse_schedule`;
    empty = only when run by hand), the resource it works on (``target``, for example
    ``cohortSources/ph``; empty for global jobs) and a description for people.

    Raises :class:`ValueError` when the ID, kind or schedule is invalid.
    """

    job_id: str
    kind: str
    schedule: str
    target: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        problem = job_id_problem(self.job_id)
        if problem:
            raise ValueError(f"job_id {self.job_id!r}: {problem}")
        if self.kind not in JOB_KINDS:
            raise ValueError(f"job kind {self.kind!r}: must be one of {', '.join(JOB_KINDS)}")
        if self.schedule:
            parse_schedule(self.schedule)


class JobSource(Protocol):
    """Where jobs come from and how they run.

    ``definitions`` returns the jobs that should exist now (read through ``session``, which
    must not be written to). ``run`` does the work of one run and returns a short
    human-readable result ("3 snapshots applied"); it raises on failure, and the exception's
    message becomes the run's error, so it must not contain secrets.
    """

    def definitions(self, session: Session) -> list[JobDefinition]: ...

    def run(self, definition: JobDefinition) -> str: ...


@dataclass(frozen=True)
class SchedulerSettings:
    """``[scheduler]`` configuration."""

    #: Run scheduled jobs in this server process (one process at a time holds the lock).
    #: Off, jobs are still listed and can be run by hand.
    enabled: bool = True
    #: How often a process that does not lead tries to take the lock, and how often the
    #: leader checks that it still holds it and re-reads the job definitions.
    leader_check_seconds: float = 10.0
    #: A fire more than this late (the server was down, say) is skipped, not run late.
    misfire_grace_seconds: float = 900.0
    #: Default schedule of a cohort source's pull.
    cohort_pull_schedule: str = "every 6h"
    #: Re-evaluation of audiences with time windows (empty = only by hand).
    audience_evaluation_schedule: str = "every 5m"
    #: Reconciliation of every audience with its destinations (empty = only by hand).
    audience_reconciliation_schedule: str = "0 3 * * *"
    #: Housekeeping (empty = only by hand).
    maintenance_schedule: str = "every 1h"
    #: Days housekeeping keeps finished job runs (the last run of each job is always kept).
    run_retention_days: float = 30.0
    #: Days housekeeping keeps the delivery log's requests and attempts (0 = forever).
    delivery_log_retention_days: float = 30.0
    #: Days housekeeping keeps idempotency records, after which a request_id may run again (0 = forever).
    idempotency_retention_days: float = 30.0

    def validate(self) -> None:
        """Raise :class:`ValueError` naming the first bad key."""
        if self.leader_check_seconds <= 0 or self.misfire_grace_seconds <= 0:
            raise ValueError("leader_check_seconds and misfire_grace_seconds must be positive")
        for key in ("run_retention_days", "delivery_log_retention_days", "idempotency_retention_days"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must not be negative (0 keeps everything)")
        if not self.cohort_pull_schedule:
            raise ValueError("cohort_pull_schedule must not be empty")
        for key in ("cohort_pull_schedule", "audience_evaluation_schedule", "audience_reconciliation_schedule",
                    "maintenance_schedule"):
            value = getattr(self, key)
            if value:
                try:
                    parse_schedule(value)
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from exc


# -- what the API shows -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobRun:
    """One run as stored: its outcome is ``status`` with ``detail`` (result or error)."""

    run_pk: int
    job_id: str
    fire_key: str
    start_us: int
    end_us: int | None
    status: str
    detail: str
    process: str

    @classmethod
    def of(cls, row: JobRunRow) -> JobRun:
        return cls(run_pk=row.id, job_id=row.job_id, fire_key=row.fire_key, start_us=row.start_us,
                   end_us=row.end_us, status=row.status, detail=row.detail, process=row.process)


@dataclass(frozen=True)
class JobState:
    """A job as listed: its definition, when it fires next (None when not scheduled, or not
    yet in the job store) and its latest run."""

    definition: JobDefinition
    next_run_us: int | None
    last_run: JobRun | None


class JobAlreadyRunning(FailedPrecondition):
    """A run of the job is in progress (in this or another server process)."""

    default_reason = "JOB_ALREADY_RUNNING"


@dataclass
class RunClaim:
    """A run that has its RUNNING row (committed with the caller's transaction) and, on
    PostgreSQL, the job's lock: hand it to :meth:`Scheduler.launch`."""

    definition: JobDefinition
    source: JobSource
    run_pk: int
    fire_key: str
    start_us: int
    lock: _SessionLock | None


# -- locks --------------------------------------------------------------------------------------------------------

def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class _SessionLock:
    """A PostgreSQL session advisory lock held on a connection of its own, so it outlives
    transactions and goes away with the connection (a process that dies lets go of it)."""

    def __init__(self, db: Database, name: str) -> None:
        self._db = db
        self._key = _lock_key(name)
        self._connection: Connection | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another session holds it (or the store is unreachable)."""
        try:
            connection = self._db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except SQLAlchemyError:
            logger.warning("cannot reach the store to take a scheduler lock", exc_info=True)
            return False
        try:
            taken = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self._key}).scalar())
        except SQLAlchemyError:
            connection.invalidate()
            connection.close()
            return False
        if not taken:
            connection.close()
            return False
        self._connection = connection
        return True

    def alive(self) -> bool:
        """True while the connection holding the lock still works."""
        connection = self._connection
        if connection is None:
            return False
        try:
            connection.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            self._connection = None
            connection.invalidate()
            connection.close()
            return False

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
            connection.close()
        except SQLAlchemyError:
            # A connection in doubt must not go back to the pool still holding the lock.
            connection.invalidate()
            connection.close()


class _Lease:
    """The scheduler lock on SQLite: a row naming the holder until a deadline it keeps
    pushing back. A holder that stops renewing loses it once the deadline passes."""

    def __init__(self, db: Database, holder: str, seconds: float) -> None:
        self._db = db
        self._holder = holder
        self._seconds = seconds

    def acquire(self) -> bool:
        """Take or renew the lease; False while another live holder has it."""
        now = _now_us()
        try:
            with self._db.transaction() as session:
                row = session.get(SchedulerLeaseRow, _LEADER_LOCK)
                expires = now + int(self._seconds * 1_000_000)
                if row is None:
                    session.add(SchedulerLeaseRow(name=_LEADER_LOCK, holder=self._holder, expires_us=expires))
                elif row.holder == self._holder or row.expires_us <= now:
                    row.holder, row.expires_us = self._holder, expires
                else:
                    return False
            return True
        except SQLAlchemyError:
            logger.warning("cannot renew the scheduler lease", exc_info=True)
            return False

    alive = acquire

    def release(self) -> None:
        try:
            with self._db.transaction() as session:
                session.execute(delete(SchedulerLeaseRow).where(SchedulerLeaseRow.name == _LEADER_LOCK,
                                                                SchedulerLeaseRow.holder == self._holder))
        except SQLAlchemyError:
            logger.warning("cannot release the scheduler lease; it expires on its own", exc_info=True)


# -- APScheduler plumbing -----------------------------------------------------------------------------------------

class _SharedEngineJobStore(SQLAlchemyJobStore):  # type: ignore[misc]
    """APScheduler's SQLAlchemy job store on the application's engine, which it must not
    dispose of when the scheduler stops."""

    def shutdown(self) -> None:
        pass


class _FireExecutor(BaseExecutor):  # type: ignore[misc]
    """Runs each due fire on a thread of its own through the :class:`Scheduler`, passing the
    scheduled fire time (APScheduler does not give it to job functions), which is what makes
    a fire claimable once across processes. Fires later than the misfire grace are skipped,
    as APScheduler's own executors do."""

    def __init__(self, owner: Scheduler) -> None:
        super().__init__()
        self._owner = owner

    def _do_submit_job(self, job: Any, run_times: Sequence[datetime]) -> None:
        threading.Thread(target=self._run, args=(job, run_times[-1]), name=f"job-{job.id}", daemon=True).start()

    def _run(self, job: Any, fire_time: datetime) -> None:
        try:
            late = datetime.now(UTC) - fire_time
            if job.misfire_grace_time is not None and late > timedelta(seconds=job.misfire_grace_time):
                logger.warning("job %s: the fire of %s is %s late, past the misfire grace; skipped",
                               job.id, fire_time.isoformat(), late)
                return
            self._owner.run_scheduled(job.id, fire_time)
        except Exception:
            logger.exception("job %s: scheduled run failed to start", job.id)
        finally:
            self._run_job_success(job.id, [])


_LIVE: weakref.WeakSet[Scheduler] = weakref.WeakSet()


def _fire(job_id: str, schedule: str = "") -> None:
    """The function every stored job names. The Scheduler's executor runs fires itself, with
    their scheduled time; this is reached only if some other executor runs a stored job, and
    then runs it on this process's leading scheduler with the current time as the fire time."""
    for scheduler in list(_LIVE):
        if scheduler.is_leader:
            scheduler.run_scheduled(job_id, datetime.now(UTC))
            return
    raise RuntimeError(f"job {job_id}: no leading scheduler in this process")


# -- the scheduler ------------------------------------------------------------------------------------------------

def _now_us() -> int:
    moment = datetime.now(UTC)
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def describe_failure(exc: BaseException) -> str:
    """A run's error text: the exception's class and message, bounded."""
    message = str(exc).strip()
    described = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return described[:MAX_DETAIL_LENGTH]


class Scheduler:
    """The jobs of one server process: definitions from ``sources``, scheduled fires while
    this process leads, manual runs at any time. See the module docstring."""

    def __init__(self, db: Database, settings: SchedulerSettings | None = None,
                 sources: Iterable[JobSource] = ()) -> None:
        self.db = db
        self.settings = settings or SchedulerSettings()
        #: Where jobs come from; append to it (then :meth:`refresh`) or use :meth:`add_source`.
        self.sources: list[JobSource] = list(sources)
        #: Names this scheduler in ``job_runs.process``: host, pid and an instance tag.
        self.process = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._state_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._aps: BackgroundScheduler | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._active: set[int] = set()
        self._run_ended = threading.Condition()
        _LIVE.add(self)

    # -- lifecycle --

    @property
    def is_leader(self) -> bool:
        """True while this process fires the scheduled jobs."""
        return self._aps is not None

    def start(self) -> None:
        """Start competing for the scheduler lock in the background (unless disabled)."""
        if not self.settings.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._lead, name="scheduler-leader", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop firing, give up the lock, and wait up to ``timeout`` seconds for runs in progress."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        self._demote()
        deadline = time.monotonic() + timeout
        with self._run_ended:
            while self._active and time.monotonic() < deadline:
                self._run_ended.wait(deadline - time.monotonic())

    def _lead(self) -> None:
        check = self.settings.leader_check_seconds
        leadership: _SessionLock | _Lease = (_SessionLock(self.db, _LEADER_LOCK) if self.db.is_postgres
                                             else _Lease(self.db, self.process, max(3 * check, check + 5)))
        try:
            while not self._stop.is_set():
                try:
                    if self._aps is None:
                        if leadership.acquire():
                            self._promote()
                    elif not leadership.alive():
                        logger.warning("lost the scheduler lock; this process stops firing scheduled jobs")
                        self._demote()
                    if self._aps is not None:
                        self.refresh()
                except Exception:
                    logger.exception("scheduler leadership check failed; retrying")
                self._stop.wait(check)
        finally:
            self._demote()
            leadership.release()

    def _promote(self) -> None:
        aps = BackgroundScheduler(
            timezone=UTC,
            jobstores={"default": _SharedEngineJobStore(engine=self.db.engine, tablename=JOB_STORE_TABLE)},
            executors={"default": _FireExecutor(self)},
            job_defaults={"coalesce": True, "max_instances": 1,
                          "misfire_grace_time": max(1, int(self.settings.misfire_grace_seconds))},
        )
        aps.start()
        with self._state_lock:
            self._aps = aps
        logger.info("this process now fires the scheduled jobs (%s)", self.process)

    def _demote(self) -> None:
        with self._refresh_lock, self._state_lock:
            aps, self._aps = self._aps, None
        if aps is not None:
            aps.shutdown(wait=False)

    # -- definitions --

    def add_source(self, source: JobSource) -> None:
        """Add a source of jobs and bring the job store in line with it."""
        self.sources.append(source)
        self.refresh()

    def definitions(self, session: Session) -> list[JobDefinition]:
        """Every job that should exist, ordered by ID (the first source to define an ID wins)."""
        return [definition for definition, _source in self._defined(session).values()]

    def _defined(self, session: Session) -> dict[str, tuple[JobDefinition, JobSource]]:
        found: dict[str, tuple[JobDefinition, JobSource]] = {}
        for source in list(self.sources):
            for definition in source.definitions(session):
                if definition.job_id in found:
                    logger.warning("job %s is defined twice; the second definition is ignored", definition.job_id)
                    continue
                found[definition.job_id] = (definition, source)
        return dict(sorted(found.items()))

    def refresh(self) -> None:
        """Bring the job store in line with the definitions: add new scheduled jobs,
        reschedule those whose schedule changed, remove those no source defines (or that lost
        their schedule). Jobs left alone keep their next fire time. Only the leader changes
        the store; elsewhere this does nothing, and the leader catches up within
        ``leader_check_seconds``."""
        with self._refresh_lock:
            aps = self._aps
            if aps is None:
                return
            with self.db.read() as session:
                wanted = {d.job_id: d for d in self.definitions(session) if d.schedule}
            existing = {job.id: job for job in aps.get_jobs()}
            for job_id in existing.keys() - wanted.keys():
                with contextlib.suppress(JobLookupError):  # removed meanwhile: as wanted
                    aps.remove_job(job_id)
                logger.info("job %s removed from the schedule", job_id)
            for job_id, definition in wanted.items():
                job = existing.get(job_id)
                if job is not None and job.kwargs.get("schedule") == definition.schedule:
                    continue
                aps.add_job(_FIRE_REF, trigger=parse_schedule(definition.schedule), args=(job_id,),
                            kwargs={"schedule": definition.schedule}, id=job_id, name=job_id,
                            replace_existing=True)
                logger.info("job %s scheduled: %s", job_id, definition.schedule)

    # -- reading --

    def jobs(self, session: Session, kind: str = "") -> list[JobState]:
        """The jobs (of ``kind``, or all), ordered by ID, with next fire time and latest run."""
        definitions = [d for d in self.definitions(session) if not kind or d.kind == kind]
        return self._states(session, definitions)

    def job(self, session: Session, job_id: str) -> JobState:
        """One job; raises :class:`NotFound` when no source defines it."""
        found = self._defined(session).get(job_id)
        if found is None:
            raise NotFound(f"job {job_id!r} not found", reason="JOB_NOT_FOUND")
        return self._states(session, [found[0]])[0]

    def _states(self, session: Session, definitions: Sequence[JobDefinition]) -> list[JobState]:
        ids = [d.job_id for d in definitions]
        if not ids:
            return []
        # Read the job store's table directly: a process that does not lead has no running
        # APScheduler to ask, and must answer the same.
        next_runs: dict[str, float | None] = {
            job_id: next_run for job_id, next_run in session.execute(
                select(SchedulerJobRow.id, SchedulerJobRow.next_run_time).where(SchedulerJobRow.id.in_(ids)))}
        latest = select(func.max(JobRunRow.id)).where(JobRunRow.job_id.in_(ids)).group_by(JobRunRow.job_id)
        runs = {row.job_id: JobRun.of(row) for row in session.scalars(select(JobRunRow)
                                                                       .where(JobRunRow.id.in_(latest)))}
        states = []
        for definition in definitions:
            next_run = next_runs.get(definition.job_id) if definition.schedule else None
            states.append(JobState(definition=definition,
                                   next_run_us=round(next_run * 1_000_000) if next_run is not None else None,
                                   last_run=runs.get(definition.job_id)))
        return states

    def run(self, session: Session, run_pk: int) -> JobRun | None:
        row = session.get(JobRunRow, run_pk)
        return JobRun.of(row) if row is not None else None

    def find_run(self, session: Session, job_id: str, fire_key: str) -> JobRun | None:
        row = session.scalars(select(JobRunRow).where(JobRunRow.job_id == job_id,
                                                      JobRunRow.fire_key == fire_key)).first()
        return JobRun.of(row) if row is not None else None

    # -- running --

    def run_scheduled(self, job_id: str, fire_time: datetime) -> JobRun | None:
        """Run the fire of ``job_id`` scheduled at ``fire_time`` here, unless another process
        took that fire already or the job is running; returns the finished run, or None when
        skipped."""
        with self.db.read() as session:
            found = self._defined(session).get(job_id)
        if found is None:
            logger.info("job %s fired but no source defines it any more; skipped", job_id)
            return None
        fire_key = fire_time.astimezone(UTC).isoformat()
        claim: RunClaim | None = None
        try:
            with self.db.transaction() as session:
                claim = self._claim(session, found[0], found[1], fire_key)
        except JobAlreadyRunning:
            logger.info("job %s: the fire of %s is skipped, a run is still in progress", job_id, fire_key)
            return None
        except BaseException:
            if claim is not None:  # claimed, but the transaction did not commit
                self.discard(claim)
            raise
        if claim is None:
            logger.debug("job %s: the fire of %s was taken by another process", job_id, fire_key)
            return None
        return self._execute(claim)

    def claim_run(self, session: Session, job_id: str, fire_key: str | None = None) -> RunClaim:
        """Claim a manual run of ``job_id`` in ``session``'s transaction: the RUNNING row is
        written there, so it commits (or not) with the caller's other writes. After commit,
        pass the claim to :meth:`launch`; if the transaction fails, to :meth:`discard`.

        ``fire_key`` defaults to ``manual:<random>``. Raises :class:`NotFound` for an unknown
        job and :class:`JobAlreadyRunning` when a run is in progress anywhere.
        """
        found = self._defined(session).get(job_id)
        if found is None:
            raise NotFound(f"job {job_id!r} not found", reason="JOB_NOT_FOUND")
        key = fire_key or f"manual:{uuid.uuid4().hex}"
        claim = self._claim(session, found[0], found[1], key)
        if claim is None:
            raise JobAlreadyRunning(f"job {job_id!r} already ran for {key!r}", metadata={"job": f"jobs/{job_id}"})
        return claim

    def launch(self, claim: RunClaim) -> threading.Thread:
        """Run a claimed run on a thread of its own; returns the thread."""
        thread = threading.Thread(target=self._execute, args=(claim,), name=f"job-{claim.definition.job_id}",
                                  daemon=True)
        thread.start()
        return thread

    def discard(self, claim: RunClaim) -> None:
        """Let go of a claim whose transaction did not commit."""
        with self._state_lock:
            self._active.discard(claim.run_pk)
        if claim.lock is not None:
            claim.lock.release()

    def settle(self, claims: Iterable[RunClaim]) -> list[RunClaim]:
        """After the transaction that claimed ``claims`` (possibly retried, so possibly
        several) ended: launch those whose row was committed, discard the rest; returns the
        launched ones."""
        launched = []
        for claim in claims:
            with self.db.read() as session:
                row = session.get(JobRunRow, claim.run_pk)
                committed = row is not None and row.fire_key == claim.fire_key and row.process == self.process
            if committed:
                self.launch(claim)
                launched.append(claim)
            else:
                self.discard(claim)
        return launched

    def run_now(self, job_id: str, *, wait: bool = True, timeout: float | None = None) -> JobRun:
        """Run ``job_id`` here now (outside its schedule); return the run, finished when
        ``wait`` (within ``timeout`` seconds, if given), else as started. Raises like
        :meth:`claim_run`."""
        claims: list[RunClaim] = []
        try:
            with self.db.transaction() as session:
                claims.append(self.claim_run(session, job_id))
        finally:
            self.settle(claims)
        return self.wait(claims[0].run_pk, timeout) if wait else self._read_run(claims[0].run_pk)

    def wait(self, run_pk: int, timeout: float | None = None) -> JobRun:
        """The run once it is no longer RUNNING, or as it stands after ``timeout`` seconds.
        Works for runs in other processes too (it polls the store)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self._read_run(run_pk)
            remaining = None if deadline is None else deadline - time.monotonic()
            if run.status != RUNNING or (remaining is not None and remaining <= 0):
                return run
            with self._run_ended:
                self._run_ended.wait(0.25 if remaining is None else min(0.25, remaining))

    def _read_run(self, run_pk: int) -> JobRun:
        with self.db.read() as session:
            run = self.run(session, run_pk)
        if run is None:
            raise NotFound(f"job run {run_pk} not found", reason="JOB_RUN_NOT_FOUND")
        return run

    def _claim(self, session: Session, definition: JobDefinition, source: JobSource,
               fire_key: str) -> RunClaim | None:
        """Take the job's lock (PostgreSQL) and write its RUNNING row in ``session``; None when
        ``fire_key`` was run already. Raises :class:`JobAlreadyRunning`."""
        job_id = definition.job_id
        lock = _SessionLock(self.db, f"stitchgraph.job:{job_id}") if self.db.is_postgres else None
        if lock is not None and not self._take_job_lock(session, lock, job_id):
            raise JobAlreadyRunning(f"job {job_id!r} is already running", metadata={"job": f"jobs/{job_id}"})
        try:
            now = _now_us()
            for row in session.scalars(select(JobRunRow).where(JobRunRow.job_id == job_id,
                                                               JobRunRow.status == RUNNING)):
                # Holding the job's lock, no live process can be running it: the row is left over.
                if lock is not None or self._abandoned(row):
                    row.status, row.end_us, row.detail = FAILED, now, ABANDONED
                else:
                    raise JobAlreadyRunning(f"job {job_id!r} is already running",
                                            metadata={"job": f"jobs/{job_id}"})
            taken = session.scalar(select(JobRunRow.id).where(JobRunRow.job_id == job_id,
                                                              JobRunRow.fire_key == fire_key))
            if taken is not None:
                # The job's lock (PostgreSQL) or BEGIN IMMEDIATE (SQLite) makes this check and
                # the insert below atomic against other processes.
                if lock is not None:
                    lock.release()
                return None
            row = JobRunRow(job_id=job_id, fire_key=fire_key, start_us=now, end_us=None, status=RUNNING,
                            detail="", process=self.process)
            session.add(row)
            session.flush()
            with self._state_lock:
                self._active.add(row.id)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return RunClaim(definition=definition, source=source, run_pk=row.id, fire_key=fire_key, start_us=now,
                        lock=lock)

    def _take_job_lock(self, session: Session, lock: _SessionLock, job_id: str) -> bool:
        """Take the job's lock; False when a run holds it. A holder with no RUNNING row is a
        run that has just recorded its outcome (or a claim about to record its start): it lets
        go within moments, so wait for it rather than refuse a run that would not overlap."""
        deadline = time.monotonic() + _LOCK_HANDOVER_SECONDS
        while not lock.acquire():
            running = session.scalar(select(func.count()).select_from(JobRunRow).where(
                JobRunRow.job_id == job_id, JobRunRow.status == RUNNING))
            if running or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _abandoned(self, row: JobRunRow) -> bool:
        """Whether a RUNNING row on SQLite was left by a process that is gone."""
        if row.process == self.process:
            with self._state_lock:
                return row.id not in self._active
        parts = row.process.rsplit(":", 2)
        host, pid = (parts[0], parts[1]) if len(parts) == 3 else ("", "")
        if host != _HOST or not pid.isdigit():
            return False  # another machine: no way to tell, so assume it is alive
        if int(pid) == os.getpid():
            return False  # another scheduler of this process
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _execute(self, claim: RunClaim) -> JobRun:
        job_id = claim.definition.job_id
        with self._state_lock:
            self._active.add(claim.run_pk)
        try:
            try:
                detail = claim.source.run(claim.definition)
                status = SUCCEEDED
            except Exception as exc:
                logger.exception("job %s failed", job_id)
                detail, status = describe_failure(exc), FAILED
            end = _now_us()
            detail = (detail or "")[:MAX_DETAIL_LENGTH]
            try:
                with self.db.transaction() as session:
                    session.execute(update(JobRunRow).where(JobRunRow.id == claim.run_pk, JobRunRow.status == RUNNING)
                                    .values(status=status, end_us=end, detail=detail))
            except SQLAlchemyError:
                logger.exception("job %s: could not record the outcome of run %s", job_id, claim.run_pk)
            logger.info("job %s %s: %s", job_id, status.lower(), detail)
            return JobRun(run_pk=claim.run_pk, job_id=job_id, fire_key=claim.fire_key, start_us=claim.start_us,
                          end_us=end, status=status, detail=detail, process=self.process)
        finally:
            if claim.lock is not None:
                claim.lock.release()
            with self._state_lock:
                self._active.discard(claim.run_pk)
            with self._run_ended:
                self._run_ended.notify_all()


def prune_runs(session: Session, before_us: int) -> int:
    """Delete finished runs that ended before ``before_us``, keeping each job's latest run;
    returns how many were deleted."""
    latest = select(func.max(JobRunRow.id)).group_by(JobRunRow.job_id).scalar_subquery()
    result = session.execute(delete(JobRunRow).where(JobRunRow.status != RUNNING, JobRunRow.end_us < before_us,
                                                     JobRunRow.id.not_in(latest)))
    return int(getattr(result, "rowcount", 0) or 0)

