"""Cohort snapshot apply: a 1,000,000-member full snapshot into an empty cohort, then a
second snapshot differing by 1 % (5,000 left, 5,000 joined).

The store holds 1,005,000 persons (user ID each, e-mail for 60 %), bulk-loaded the way the
identity graph stores them (``bench.audiences``). Snapshots go through the same
:class:`~audiences.cohorts.snapshots.SnapshotEngine` the gRPC import and the PostHog pull
use: diff on member keys, resolution of new member IDs, trait evidence, trait state,
the change journal — one transaction each. The rows the second snapshot writes are
counted from the tables themselves.

Goals (issue 7): first ≤ 30 s, second ≤ 3 s writing only the 1 % that changed.

Environment: ``STITCHGRAPH_BENCH_COHORT_MEMBERS`` (default 1,000,000),
``STITCHGRAPH_BENCH_COHORT_ROUNDS`` (second-snapshot rounds, default 3; each round swaps a
fresh 1 % so every round changes exactly 10,000 members).
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from bench.audiences import Population, SqliteLoader, identity_rows, remove_sqlite
from bench.report import figure, header, median, peak_rss_mb


def _setting(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _counts(app: object) -> dict[str, int]:
    from audiences.cohorts.models import CohortMemberRow
    from identity.events.models import TraitEvidenceRow, TraitStateRow
    from stitchgraph.changes import PersonChangeRow

    with app.db.read() as session:  # type: ignore[attr-defined]
        return {name: int(session.execute(select(func.count()).select_from(model)).scalar() or 0)
                for name, model in (("trait_evidence", TraitEvidenceRow), ("trait_state", TraitStateRow),
                                    ("cohort_members", CohortMemberRow), ("person_changes", PersonChangeRow))}


def run() -> None:
    from audiences.cohorts.service import ImportConfig, SourceConfig
    from audiences.cohorts.snapshots import FULL, Guard, Member
    from server.app import build_application
    from server.config import Settings
    from stitchgraph import migrations
    from stitchgraph.db import Database, DatabaseOptions

    members = _setting("STITCHGRAPH_BENCH_COHORT_MEMBERS", 1_000_000)
    rounds = _setting("STITCHGRAPH_BENCH_COHORT_ROUNDS", 3)
    change = members // 100
    spare = change // 2 * (rounds + 1)
    persons = members + spare
    header("cohorts — snapshot apply (SQLite)", f"{members:,}-member snapshot into an empty cohort, then "
                                                f"{rounds} snapshots each differing by 1 % ({change:,} members)")
    workdir = Path(tempfile.mkdtemp(prefix="stitchgraph-bench-cohorts-"))
    store = workdir / "store.db"
    url = f"sqlite:///{store}"
    try:
        db = Database(DatabaseOptions(url=url))
        migrations.upgrade(db)
        db.dispose()
        now = datetime.now(UTC)
        started = time.perf_counter()
        pop = Population(persons, int(now.timestamp() * 1_000_000))
        loader = SqliteLoader(store, now)
        try:
            identity_rows(pop, loader)
        finally:
            loader.close()
        figure("build: persons loaded", time.perf_counter() - started, "s")

        app = build_application(Settings(database_url=url, metrics_address=None).validate())
        try:
            app.start(background=False)
            cohorts = app.cohorts
            with app.db.transaction() as session:
                source = cohorts.create_source(session, SourceConfig(
                    kind="PUSH", display_name="bench", cohorts=(ImportConfig("big", "bench_cohort"),)))
                cohort = cohorts.imports(session, source.id)[0]
                source_pk, cohort_pk = source.id, cohort.id
            snapshot_us = int(time.time() * 1_000_000)

            def apply(ids: list[int], number: int) -> tuple[float, object]:
                from audiences.cohorts.models import CohortImportRow, CohortSourceRow

                with app.db.transaction() as session:
                    src = session.get(CohortSourceRow, source_pk)
                    imp = session.get(CohortImportRow, cohort_pk)
                    assert src is not None and imp is not None
                    pk = cohorts._new_snapshot(session, src, imp, FULL, "PUSH",
                                               snapshot_us + number, f"bench-{number}").id
                snapshot = [Member((("user_id", Population.user_id(i)),)) for i in ids]
                began = time.perf_counter()
                outcome = cohorts.engine.apply(pk, snapshot, guard=Guard(), default_type="user_id")
                return time.perf_counter() - began, outcome

            current = list(range(1, members + 1))
            seconds, outcome = apply(current, 0)
            assert outcome.status == "APPLIED" and outcome.added == members, outcome  # type: ignore[attr-defined]
            figure("first snapshot: 1,000,000 members into an empty cohort" if members == 1_000_000 else
                   f"first snapshot: {members:,} members into an empty cohort", seconds, "s", goal="≤ 30 s")
            figure("first snapshot: members per second", members / seconds, "members/s")
            # The journal is drained by the audience engine after the write; it is not part of the apply.
            app.audiences.process_changes()

            timings = []
            next_new = members + 1
            for number in range(1, rounds + 1):
                leaving = set(current[(number - 1) * (change // 2):number * (change // 2)])
                joining = list(range(next_new, next_new + change // 2))
                next_new += change // 2
                current = [i for i in current if i not in leaving] + joining
                before = _counts(app)
                seconds, outcome = apply(current, number)
                after = _counts(app)
                timings.append(seconds)
                written = {k: after[k] - before[k] for k in after}
                assert outcome.status == "APPLIED", outcome  # type: ignore[attr-defined]
                assert (outcome.added, outcome.removed) == (change // 2, change // 2), outcome  # type: ignore
                assert written["trait_evidence"] == change, written
                print(f"   round {number}: {seconds:.2f} s, +{outcome.added:,} -{outcome.removed:,}; rows written: "  # type: ignore[attr-defined]
                      f"trait_evidence {written['trait_evidence']:,}, trait_state +{written['trait_state']:,} "
                      f"(updated in place for the leavers), cohort_members {written['cohort_members']:+,}, "
                      f"person_changes {written['person_changes']:,}", flush=True)
                app.audiences.process_changes()
            figure("second snapshot (1 % different), median of rounds", median(timings), "s", goal="≤ 3 s")
            figure("second snapshot: trait evidence rows written", change, "rows",
                   goal=f"exactly the {change:,} that changed")
            figure("peak RSS", peak_rss_mb(), "MB")
        finally:
            app.close()
    finally:
        remove_sqlite(store)
        for leftover in workdir.iterdir():
            leftover.unlink()
        workdir.rmdir()
