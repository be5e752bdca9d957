"""Online identity resolution: links applied through the domain API
(``IdentityOperations.observe_results``) in batches of 1,000, one transaction each,
on SQLite (the embedded default, synchronous=FULL) and on PostgreSQL.

Scale with STITCHGRAPH_BENCH_LINKS (default 1,000,000 links from 200,000 people) and
STITCHGRAPH_BENCH_PG_LINKS for PostgreSQL (default the same). Goal: ≥ 30,000 links/s
on SQLite. The SQLite store is kept at var/bench/identity.db for identity_rebuild.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.population import Population
from bench.report import figure, header, median, peak_rss_mb
from identity.operations import IdentityOperations
from stitchgraph import migrations
from stitchgraph.db import Database, DatabaseOptions

BATCH = 1000
STORE = Path("var/bench/identity.db")


def links_setting(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def apply(db: Database, population: Population) -> tuple[float, list[float]]:
    ops = IdentityOperations(db)
    batch_seconds: list[float] = []
    batch = []
    started = time.perf_counter()
    for sighting in population.sightings():
        batch.append(sighting)
        if len(batch) == BATCH:
            t = time.perf_counter()
            with db.transaction() as session:
                ops.observe_results(session, batch)
            batch_seconds.append(time.perf_counter() - t)
            batch = []
    if batch:
        with db.transaction() as session:
            ops.observe_results(session, batch)
    return time.perf_counter() - started, batch_seconds


def report(label: str, links: int, seconds: float, batch_seconds: list[float]) -> None:
    figure(f"{label}: links applied", links, "links")
    figure(f"{label}: wall time", seconds, "s")
    figure(f"{label}: throughput", links / seconds, "links/s", goal=">= 30,000 (SQLite)")
    figure(f"{label}: median batch of {BATCH}", median(batch_seconds) * 1000, "ms")


def run() -> None:
    links = links_setting("STITCHGRAPH_BENCH_LINKS", 1_000_000)
    people = max(links // 5, 1)
    header("identity_online", f"{links:,} links from {people:,} people, batches of {BATCH}")
    STORE.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{STORE}{suffix}").unlink(missing_ok=True)
    db = Database(DatabaseOptions(url=f"sqlite:///{STORE}"))
    migrations.upgrade(db)
    seconds, batches = apply(db, Population(people, links))
    db.dispose()
    report("SQLite", links, seconds, batches)
    figure("SQLite: peak RSS of the benchmark process", peak_rss_mb(), "MiB")

    pg_links = links_setting("STITCHGRAPH_BENCH_PG_LINKS", links)
    if pg_links <= 0:
        return
    from tests.support.postgres import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer()
        server.start()
    except (PostgresUnavailable, OSError) as exc:
        print(f"   PostgreSQL: skipped ({exc})")
        return
    try:
        db = Database(DatabaseOptions(url=server.url(server.create_database())))
        migrations.upgrade(db)
        seconds, batches = apply(db, Population(max(pg_links // 5, 1), pg_links))
        db.dispose()
        report("PostgreSQL", pg_links, seconds, batches)
    finally:
        server.stop()


if __name__ == "__main__":
    run()
