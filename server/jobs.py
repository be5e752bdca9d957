"""The jobs every server has, whatever it is configured with: re-evaluating audiences whose
time windows expire, reconciling every audience with its destinations, and housekeeping.

They are one :class:`~stitchgraph.scheduler.JobSource` wired by :func:`server.app.build_application`;
their schedules come from ``[scheduler]`` in the configuration. Cohort pulls are another
source, one job per cohort source.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Result, delete, select, tuple_
from sqlalchemy.orm import Session

from audiences.delivery import DeliveryEngine
from audiences.destinations import ACTIVE as DESTINATION_ACTIVE
from audiences.destinations import DestinationRow
from audiences.engine import ACTIVE as AUDIENCE_ACTIVE
from audiences.engine import AudienceEngine
from audiences.models import AudienceDestinationRow, AudienceRow
from audiences.outbox import FINAL_STATUSES, DeliveryAttemptRow, DeliveryBatchRow, DeliveryRow, now_us
from audiences.reconcile import reconcile_audience
from stitchgraph.db import Database
from stitchgraph.idempotency import IdempotencyRecord, IdempotencySubject
from stitchgraph.scheduler import (
    AUDIENCE_EVALUATION,
    AUDIENCE_RECONCILIATION,
    MAINTENANCE,
    JobDefinition,
    SchedulerSettings,
    prune_runs,
)

logger = logging.getLogger("stitchgraph.jobs")

AUDIENCE_EVALUATION_JOB = "audience-evaluation"
AUDIENCE_RECONCILIATION_JOB = "audience-reconciliation"
MAINTENANCE_JOB = "maintenance"
_DAY_US = 86_400_000_000


class BuiltinJobs:
    """Audience evaluation, audience reconciliation and maintenance, scheduled per ``settings``."""

    def __init__(self, db: Database, audiences: AudienceEngine, delivery: DeliveryEngine,
                 settings: SchedulerSettings) -> None:
        self.db = db
        self.audiences = audiences
        self.delivery = delivery
        self.settings = settings

    def definitions(self, session: Session) -> list[JobDefinition]:
        s = self.settings
        return [
            JobDefinition(AUDIENCE_EVALUATION_JOB, AUDIENCE_EVALUATION, s.audience_evaluation_schedule,
                          description="Re-evaluates audiences with time windows for the persons whose facts "
                                      "crossed a window boundary"),
            JobDefinition(AUDIENCE_RECONCILIATION_JOB, AUDIENCE_RECONCILIATION, s.audience_reconciliation_schedule,
                          description="Reconciles every active audience with each of its active destinations"),
            JobDefinition(MAINTENANCE_JOB, MAINTENANCE, s.maintenance_schedule,
                          description="Prunes old job runs, delivery log entries and idempotency records"),
        ]

    def run(self, definition: JobDefinition) -> str:
        if definition.kind == AUDIENCE_EVALUATION:
            return self.evaluate_windows()
        if definition.kind == AUDIENCE_RECONCILIATION:
            return self.reconcile_all()
        if definition.kind == MAINTENANCE:
            return self.maintain()
        raise ValueError(f"job {definition.job_id}: kind {definition.kind} is not a built-in job")

    def evaluate_windows(self) -> str:
        """The window pass of the audience engine; returns what it changed."""
        results = self.audiences.expire_windows()
        added = sum(r.added for r in results.values())
        removed = sum(r.removed for r in results.values())
        if results:
            self.delivery.wake()
        return f"{len(results)} audiences re-evaluated: {added} members added, {removed} removed"

    def reconcile_all(self) -> str:
        """Reconcile each active audience with its active destinations, one audience per
        transaction, the way ``ReconcileAudience`` does for one audience."""
        with self.db.read() as session:
            audience_pks = list(session.scalars(select(AudienceRow.id).where(AudienceRow.state == AUDIENCE_ACTIVE)
                                                .order_by(AudienceRow.id)))
        pairs = deliveries = 0
        for audience_pk in audience_pks:
            with self.db.transaction() as session:
                audience = session.get(AudienceRow, audience_pk)
                if audience is None or audience.state != AUDIENCE_ACTIVE:
                    continue  # deleted or paused since it was listed
                attached = session.scalars(select(DestinationRow).join(
                    AudienceDestinationRow, AudienceDestinationRow.destination_pk == DestinationRow.id).where(
                    AudienceDestinationRow.audience_pk == audience.id, DestinationRow.state == DESTINATION_ACTIVE)
                    .order_by(AudienceDestinationRow.position)).all()
                for destination in attached:
                    deliveries += reconcile_audience(session, audience, destination).delivery_count
                    pairs += 1
            self.delivery.wake()
        return f"{pairs} audience destinations reconciled, {deliveries} deliveries queued"

    def maintain(self) -> str:
        """Prune what outlived its retention: finished job runs, the delivery log's requests and
        attempts of finished deliveries, idempotency records."""
        s = self.settings
        now = now_us()
        with self.db.transaction() as session:
            runs = prune_runs(session, now - int(s.run_retention_days * _DAY_US)) if s.run_retention_days else 0
        attempts = batches = 0
        if s.delivery_log_retention_days:
            cutoff = now - int(s.delivery_log_retention_days * _DAY_US)
            with self.db.transaction() as session:
                old_batches = select(DeliveryBatchRow.id).where(DeliveryBatchRow.time_us < cutoff)
                finished = select(DeliveryRow.id).where(DeliveryRow.status.in_(FINAL_STATUSES))
                attempts = _deleted(session.execute(delete(DeliveryAttemptRow).where(
                    DeliveryAttemptRow.batch_pk.in_(old_batches), DeliveryAttemptRow.delivery_pk.in_(finished))))
                # A request some of whose attempts are kept (a delivery still retrying) stays.
                kept = select(DeliveryAttemptRow.batch_pk)
                batches = _deleted(session.execute(delete(DeliveryBatchRow).where(
                    DeliveryBatchRow.time_us < cutoff, DeliveryBatchRow.id.not_in(kept))))
        records = 0
        if s.idempotency_retention_days:
            created_before = datetime.now(UTC) - timedelta(days=s.idempotency_retention_days)
            with self.db.transaction() as session:
                expired = select(IdempotencyRecord.method, IdempotencyRecord.request_id).where(
                    IdempotencyRecord.created_at < created_before)
                session.execute(delete(IdempotencySubject).where(
                    tuple_(IdempotencySubject.method, IdempotencySubject.request_id).in_(expired)))
                records = _deleted(session.execute(delete(IdempotencyRecord).where(
                    IdempotencyRecord.created_at < created_before)))
        return (f"pruned {runs} job runs, {attempts} delivery attempts in {batches} requests, "
                f"{records} idempotency records")


def _deleted(result: Result[Any]) -> int:
    """Rows a DELETE removed."""
    return int(getattr(result, "rowcount", 0) or 0)
