"""Cohort imports: PostHog cohorts, Heap segments and pushed snapshots become person traits.

* :mod:`audiences.cohorts.models` — sources, imports, current members, snapshots.
* :mod:`audiences.cohorts.snapshots` — applying a snapshot (diff, resolution, evidence, guard).
* :mod:`audiences.cohorts.posthog` — reading a PostHog cohort through the private API.
* :mod:`audiences.cohorts.service` — configuration, pulls, pushes, confirmation, Heap webhooks.
"""
