"""Scheduled cohort pulls as scheduler jobs: one job per pulled source (POSTHOG,
HEAP_CONNECT) and schedule — ``cohort-pull-<source_id>`` when every cohort of the source
shares one schedule (a cohort's own, else ``[scheduler] cohort_pull_schedule``)."""

from __future__ import annotations

import hashlib

from sqlalchemy.orm import Session

from audiences.cohorts.service import SCHEDULED, CohortImports
from audiences.cohorts.snapshots import FAILED
from stitchgraph.scheduler import COHORT_PULL, JobDefinition

__all__ = ["CohortPullJobs"]


class CohortPullJobs:
    """The scheduler's source of COHORT_PULL jobs."""

    def __init__(self, cohorts: CohortImports) -> None:
        self.cohorts = cohorts

    def definitions(self, session: Session) -> list[JobDefinition]:
        groups = self.cohorts.schedules(session)
        per_source: dict[str, int] = {}
        for source_id, _schedule, _keys in groups:
            per_source[source_id] = per_source.get(source_id, 0) + 1
        out = []
        for source_id, schedule, keys in groups:
            job_id = f"cohort-pull-{source_id}"
            if per_source[source_id] > 1 or len(job_id) > 63:
                job_id = f"{job_id[:55]}-{hashlib.sha256(schedule.encode()).hexdigest()[:6]}"
            out.append(JobDefinition(job_id, COHORT_PULL, schedule, target=f"cohortSources/{source_id}",
                                     description=f"Pulls cohort(s) {', '.join(keys)[:200]} of {source_id}"))
        return out

    def run(self, definition: JobDefinition) -> str:
        source_id = definition.target.removeprefix("cohortSources/")
        snapshots = self.cohorts.sync(source_id, trigger=SCHEDULED, schedule=definition.schedule)
        detail = "; ".join(f"{s.cohort_key}: {s.status} +{s.added_count} -{s.removed_count}" for s in snapshots)
        failed = [s for s in snapshots if s.status == FAILED]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(snapshots)} pulls failed: "
                               + "; ".join(f"{s.cohort_key}: {s.error[:200]}" for s in failed))
        return detail or "no cohorts to pull"
