"""SystemService: what this server is and can do, and its scheduled jobs (list them, run
one now). Jobs are defined and run by :mod:`stitchgraph.scheduler`."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.orm import Session

from server.app import Application
from server.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, page_request
from server.servicers.timestamps import micros_pb
from stitchgraph import API_VERSION, __version__
from stitchgraph.errors import InvalidArgument
from stitchgraph.idempotency import run_idempotent
from stitchgraph.scheduler import FAILED, JOB_KINDS, JobRun, JobState, RunClaim, job_id_problem
from stitchgraph.v1 import system_pb2, system_service_pb2, system_service_pb2_grpc

pb = system_service_pb2
_SERVICE = "/stitchgraph.v1.SystemService/"
#: A RunJob with ``wait`` returns this long before the call's deadline, so the answer arrives in time.
_DEADLINE_MARGIN_SECONDS = 0.5

FEATURE_DESCRIPTIONS = {
    "system": "server information",
    "identity-graph": "guarded identity graph: identify, alias, merge, split, erase, explain",
    "canonical-events": "canonical events, source mappings, schema registry, traits",
    "consent": "consent decisions and verdicts per purpose",
    "audiences": "audience rules, eligibility and membership",
    "delivery": "outbox, destination adapters and delivery log",
    "cohorts": "cohort imports from PostHog and Heap",
    "scheduler": "scheduled jobs",
}


def parse_job_name(name: str, field: str = "name") -> str:
    """The job ID of ``jobs/{job_id}``; raise :class:`InvalidArgument` on ``field``."""
    job_id = name.removeprefix("jobs/")
    if not name.startswith("jobs/") or job_id_problem(job_id):
        raise InvalidArgument.for_field(field, "must be a job resource name like 'jobs/audience-evaluation'",
                                        reason="INVALID_NAME")
    return job_id


def job_kind(value: int) -> str:
    """The kind name of a ``JobKind`` filter value ('' for unspecified); raise :class:`InvalidArgument`."""
    if value == system_pb2.JOB_KIND_UNSPECIFIED:
        return ""
    try:
        kind = str(system_pb2.JobKind.Name(value)).removeprefix("JOB_KIND_")
    except ValueError:
        kind = ""
    if kind not in JOB_KINDS:
        raise InvalidArgument.for_field("kind", "is not a known job kind", reason="INVALID_ENUM")
    return kind


def _kind_value(kind: str) -> Any:
    return system_pb2.JobKind.Value("JOB_KIND_" + kind)


def _run_status(status: str) -> Any:
    return system_pb2.JobRunStatus.Value("JOB_RUN_STATUS_" + status)


def job_run_pb(run: JobRun) -> system_pb2.JobRun:
    message = system_pb2.JobRun(start_time=micros_pb(run.start_us), detail=run.detail,
                                status=_run_status(run.status))
    if run.end_us is not None:
        message.end_time.CopyFrom(micros_pb(run.end_us))
    return message


def job_pb(state: JobState) -> system_pb2.Job:
    definition = state.definition
    message = system_pb2.Job(name=f"jobs/{definition.job_id}", schedule=definition.schedule,
                             kind=_kind_value(definition.kind),
                             target=definition.target, description=definition.description)
    if state.next_run_us is not None:
        message.next_run_time.CopyFrom(micros_pb(state.next_run_us))
    last = state.last_run
    if last is not None:
        message.last_run_time.CopyFrom(micros_pb(last.start_us))
        message.last_status = _run_status(last.status)
        if last.status == FAILED:
            message.last_error = last.detail
    return message


def manual_fire_key(request_id: str) -> str | None:
    """The run key of a RunJob: derived from its request_id, so a repeat finds the same run
    (None without one: a fresh key per call)."""
    if not request_id:
        return None
    return "manual:" + hashlib.sha256(request_id.encode()).hexdigest()[:48]


class SystemServicer(system_service_pb2_grpc.SystemServiceServicer):
    def __init__(self, app: Application) -> None:
        self._app = app
        self._started = Timestamp()
        self._started.FromDatetime(datetime.now(UTC))
        self._info: Any = None

    def GetSystemInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._info is None:
            # Feature status is a property of the code, so it is computed once.
            from server.registry import feature_status

            settings = self._app.settings
            self._info = system_service_pb2.GetSystemInfoResponse(
                version=__version__,
                api_version=API_VERSION,
                store_dialect=self._app.db.dialect,
                features=[
                    system_pb2.Feature(name=name, implemented=implemented,
                                       description=FEATURE_DESCRIPTIONS.get(name, ""))
                    for name, implemented in feature_status()
                ],
                limits=system_pb2.ServerLimits(
                    max_receive_message_bytes=settings.max_receive_message_bytes,
                    max_page_size=MAX_PAGE_SIZE,
                    default_page_size=DEFAULT_PAGE_SIZE,
                    max_identifiers_per_request=50,
                ),
                start_time=self._started,
                auth_enabled=settings.auth_enabled,
            )
        return self._info

    def ListJobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        kind = job_kind(request.kind)
        page = page_request(request.page_size, request.page_token, kind)
        with self._app.db.read() as session:
            states = self._app.scheduler.jobs(session, kind)
        if page.after is not None:
            states = [s for s in states if s.definition.job_id > str(page.after)]
        more = len(states) > page.size
        states = states[:page.size]
        token = page.next_token(states[-1].definition.job_id, kind) if more else ""
        return pb.ListJobsResponse(jobs=[job_pb(s) for s in states], next_page_token=token)

    def RunJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Claim the run in the idempotent transaction (so a repeat of the request_id runs
        nothing again), start it once that committed, and with ``wait`` wait for its outcome
        (a repeat with ``wait`` waits for the first call's run)."""
        job_id = parse_job_name(request.name)
        scheduler = self._app.scheduler
        fire_key = manual_fire_key(request.request_id)
        claims: list[RunClaim] = []

        def op(session: Session) -> Any:
            # Called again only after an attempt whose transaction did not commit: let its claim go.
            while claims:
                scheduler.discard(claims.pop())
            claim = scheduler.claim_run(session, job_id, fire_key)
            claims.append(claim)
            return self._run_response(session, job_id, claim.run_pk)

        try:
            response = run_idempotent(self._app.db, _SERVICE + "RunJob", request, pb.RunJobResponse, op)
        finally:
            launched = scheduler.settle(claims)
        if not request.wait:
            return response
        if launched:
            run_pk = launched[0].run_pk
        else:  # a repeat: wait for the run the first call started, wherever it runs
            with self._app.db.read() as session:
                first = scheduler.find_run(session, job_id, fire_key or "")
            if first is None:
                return response
            run_pk = first.run_pk
        remaining = context.time_remaining()
        timeout = None if remaining is None else max(0.0, remaining - _DEADLINE_MARGIN_SECONDS)
        scheduler.wait(run_pk, timeout)
        with self._app.db.read() as session:
            return self._run_response(session, job_id, run_pk)

    def _run_response(self, session: Session, job_id: str, run_pk: int) -> Any:
        scheduler = self._app.scheduler
        run = scheduler.run(session, run_pk)
        return pb.RunJobResponse(job=job_pb(scheduler.job(session, job_id)),
                                 run=job_run_pb(run) if run is not None else None)
