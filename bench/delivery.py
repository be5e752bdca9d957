"""Delivery throughput and audience sync cost, against the Meta sandbox on loopback.

1. **Conversions drain**: 100,000 purchases (10,000 persons with user ID and email) are
   captured through the real capture path into a SQLite store, which queues one Meta
   Conversions API delivery each. The delivery workers then drain the queue to the Meta
   sandbox, run in its own process (``python -m tests.sandboxes meta``), three rounds (the
   rows are re-opened between rounds and the sandbox reset). The reference measured in the
   same run is the sandbox's own ceiling: the same number of client threads posting
   pre-built, valid 1,000-event requests straight at it. Goal: ≥ 10,000 events/s.
2. **Audience delta**: a Meta custom-audience destination with an audience of 1,000,000
   eligible members (bulk-loaded persons with evidence, views and consent; the first build
   runs through the engine, and its 1,000,000 additions are then marked delivered, as after
   a finished first sync). 1 % changes through the real path (trait evidence → journal →
   incremental evaluation → outbox): 5,000 members leave, 5,000 non-members join. The sync
   must send exactly the 10,000 changed rows in the minimum number of requests
   (⌈5,000 / 10,000⌉ adds + ⌈5,000 / 10,000⌉ removes = 2).

Scale: ``STITCHGRAPH_BENCH_DELIVERY_EVENTS`` (100000), ``STITCHGRAPH_BENCH_DELIVERY_MEMBERS``
(1000000), ``STITCHGRAPH_BENCH_DELIVERY_WORKERS`` (2).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx

from bench.report import figure, header, median

TOKEN = "bench-token-0123456789"
PIXEL = "1234567890"
AUDIENCE = "2385000"
ROUNDS = 3


def setting(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class SandboxProcess:
    """The Meta sandbox in its own process (so it does not share this one's GIL)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.sandboxes", "--port", str(self.port), "--token", TOKEN, "meta"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None
        self.process.stdout.readline()  # "meta: http://..."
        self.url = f"http://127.0.0.1:{self.port}"

    def control(self, path: str, method: str = "POST") -> Any:
        request = urllib.request.Request(self.url + path, method=method, data=b"{}" if method == "POST" else None,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"{}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def _server_event(i: int, now: int) -> dict[str, Any]:
    return {"event_name": "Purchase", "event_time": now - 60, "event_id": f"ceiling-{i}",
            "action_source": "system_generated",
            "user_data": {"em": [_sha(f"person{i % 10_000}@example.com")], "external_id": [f"u{i % 10_000}"]},
            "custom_data": {"value": 49.9, "currency": "EUR", "order_id": f"o-{i}"}}


def sandbox_ceiling(sandbox: SandboxProcess, events: int, threads: int) -> float:
    """Events/s the sandbox accepts from ``threads`` clients posting 1,000-event requests."""
    now = int(time.time())
    bodies = [json.dumps({"data": [_server_event(b * 1000 + i, now) for i in range(1000)],
                          "access_token": TOKEN}).encode() for b in range(events // 1000)]
    queue = list(range(len(bodies)))
    lock = threading.Lock()
    errors: list[int] = []

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    n = queue.pop()
                response = http.post(f"{sandbox.url}/v25.0/{PIXEL}/events", content=bodies[n],
                                     headers={"Content-Type": "application/json"})
                if response.status_code != 200:
                    errors.append(response.status_code)

    started = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    assert not errors, errors[:3]
    return events / elapsed


# -- 1. conversions --------------------------------------------------------------------------------

def conversions(events: int, workers: int) -> None:
    from audiences.consent.settings import ConsentSettings
    from audiences.delivery import DeliveryEngine, DeliverySettings
    from audiences.destinations import DestinationConfig, create_destination
    from audiences.outbox import DELIVERIES
    from identity.events.incoming import IncomingEvent
    from server.app import build_application
    from server.config import Settings

    header("delivery — conversions drain", f"{events:,} purchases to the Meta sandbox, {workers} workers, SQLite")
    sandbox = SandboxProcess()
    os.environ["BENCH_META_TOKEN"] = TOKEN
    with TemporaryDirectory() as tmp:
        # Consent: persons without a jurisdiction are granted, so every purchase is sendable.
        settings = Settings(database_url=f"sqlite:///{tmp}/store.db", metrics_address=None,
                            sqlite_synchronous="NORMAL",
                            consent=ConsentSettings(unknown_jurisdiction="grant")).validate()
        app = build_application(settings)
        try:
            from stitchgraph import migrations

            migrations.upgrade(app.db)
            app.start(background=False)
            with app.db.transaction() as session:
                create_destination(session, DestinationConfig(
                    kind="META_CONVERSIONS", display_name="bench", credentials_ref="env:BENCH_META_TOKEN",
                    settings={"pixel_id": PIXEL, "base_url": sandbox.url}), "meta-bench")
            started = time.perf_counter()
            now = datetime.now(UTC) - timedelta(hours=1)
            for start in range(0, events, 1000):
                batch = [IncomingEvent(
                    kind="track", source="bench", source_event="purchase", event_id=f"purchase-{i}",
                    occurred_at=now + timedelta(microseconds=i), value="49.90", currency="EUR", order_id=f"o-{i}",
                    identifiers=[("user_id", f"u{i % 10_000}"), ("email", f"person{i % 10_000}@example.com")],
                    action_source="SYSTEM_GENERATED") for i in range(start, min(events, start + 1000))]
                app.events.capture(batch)
            app.audiences.process_changes()  # as the server does after each write: views current
            figure("setup: purchases captured and queued", time.perf_counter() - started, "s")
            with app.db.read() as session:
                queued = session.execute(DELIVERIES.select().with_only_columns(DELIVERIES.c.id)).all()
            assert len(queued) == events, (len(queued), events)

            engine = DeliveryEngine(app.db, app.consent, DeliverySettings(workers=workers, request_timeout_seconds=60,
                                                                          lease_seconds=300))
            rates: list[float] = []
            for round_ in range(ROUNDS):
                if round_:
                    with app.db.transaction() as session:
                        session.execute(DELIVERIES.update().values(status="PENDING", attempts=0))
                    sandbox.control("/__sandbox/reset")
                started = time.perf_counter()
                threads = [threading.Thread(target=engine.drain) for _ in range(workers)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.perf_counter() - started
                state = sandbox.control("/__sandbox/state", "GET")
                with app.db.read() as session:
                    delivered = session.execute(DELIVERIES.select().with_only_columns(DELIVERIES.c.id).where(
                        DELIVERIES.c.status == "SUCCEEDED")).all()
                assert len(delivered) == events and state["events_received"] == events, \
                    (len(delivered), state["events_received"])
                rates.append(events / elapsed)
                figure(f"round {round_ + 1}: drained", events / elapsed, "events/s")
            engine.close()
            sandbox.control("/__sandbox/reset")
            ceiling = median([sandbox_ceiling(sandbox, events, workers) for _ in range(ROUNDS)])
            figure("drain, median of rounds", median(rates), "events/s", goal="≥ 10,000")
            figure("reference: sandbox ceiling (pre-built requests)", ceiling, "events/s")
            figure("drain / ceiling", median(rates) / ceiling, "ratio")
        finally:
            app.close()
            sandbox.stop()


# -- 2. audience delta -----------------------------------------------------------------------------

def load_members(path: Path, members: int, joiners: int) -> None:
    """Persons 1..members are gold (members), then ``joiners`` silver ones; each has a user ID,
    an email hash, trait evidence and both advertising purposes granted (evidence and views)."""
    from identity.graph import person_id_for

    total = members + joiners
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-1048576"):
        db.execute(f"PRAGMA {pragma}")
    stamp = datetime.now(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    now_us = int(time.time() * 1_000_000) - 86_400_000_000
    db.execute("BEGIN")
    db.executemany("INSERT INTO identifiers (id, type, value, person_pk, first_seen_us, person_ref, reborn, match_keys)"
                   " VALUES (?, ?, ?, ?, ?, ?, 0, NULL)",
                   ((pk, "user_id", f"u{pk}", pk, now_us, person_id_for("user_id", f"u{pk}"))
                    for pk in range(1, total + 1)))
    db.executemany("INSERT INTO identifiers (id, type, value, person_pk, first_seen_us, person_ref, reborn, match_keys)"
                   " VALUES (?, ?, ?, ?, ?, ?, 0, NULL)",
                   ((total + pk, "email_sha256", h, pk, now_us, person_id_for("email_sha256", h))
                    for pk in range(1, total + 1) for h in [_sha(f"person{pk}@example.com")]))
    counts = json.dumps({"email_sha256": 1, "user_id": 1})
    db.executemany("INSERT INTO persons (id, person_id, anchor_pk, size, merges, type_counts, pinned, cluster_pk, "
                   f"created_at, updated_at) VALUES (?, ?, ?, 2, 0, '{counts}', 0, ?, ?, ?)",
                   ((pk, person_id_for("user_id", f"u{pk}"), pk, pk, stamp, stamp) for pk in range(1, total + 1)))
    db.executemany("INSERT INTO identity_clusters (id, max_us, max_event, max_rank) VALUES (?, -1, '', -1)",
                   ((pk,) for pk in range(1, total + 1)))
    db.execute("INSERT INTO identity_counters (name, value) VALUES ('identifier', ?)", (2 * total,))
    tier = lambda pk: "gold" if pk <= members else "silver"  # noqa: E731
    db.executemany("INSERT INTO trait_state (identifier_pk, key, lw_us, lw_event, lw_unset, lw_value, lw_source) "
                   "VALUES (?, 'tier', ?, ?, 0, ?, 'bench')",
                   ((pk, now_us, f"t-{pk}", json.dumps(tier(pk))) for pk in range(1, total + 1)))
    db.executemany("INSERT INTO person_traits (person_pk, key, value, text) VALUES (?, 'tier', ?, ?)",
                   ((pk, json.dumps(tier(pk)), tier(pk)) for pk in range(1, total + 1)))
    for purpose in ("ad_user_data", "ad_personalization"):
        db.executemany("INSERT INTO consent_decisions (decision_id, identifier_pk, purpose, granted, occurred_us, "
                       "origin, source, jurisdiction, opt_out, event_id, request_id, detail, recorded_at) "
                       "VALUES (?, ?, ?, 1, ?, 'EXPLICIT', 'bench', '', 0, '', '', '', ?)",
                       ((f"c-{purpose}-{pk}", pk, purpose, now_us, stamp) for pk in range(1, total + 1)))
    for purpose in ("analytics", "ad_user_data", "ad_personalization", "ad_storage", "sale_or_sharing"):
        granted = purpose in ("ad_user_data", "ad_personalization")
        db.executemany("INSERT INTO person_consent (person_pk, purpose, granted, resolved_by) VALUES (?, ?, ?, ?)",
                       ((pk, purpose, granted, "EXPLICIT" if granted else "JURISDICTION_DEFAULT")
                        for pk in range(1, total + 1)))
    db.execute("COMMIT")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()


def audience_delta(members: int, workers: int) -> None:
    from sqlalchemy import func, select

    from audiences.consent.settings import ConsentSettings
    from audiences.delivery import DeliveryEngine, DeliverySettings
    from audiences.destinations import DestinationConfig, create_destination
    from audiences.models import AudienceDestinationRow, AudienceRow
    from audiences.outbox import DELIVERIES
    from server.app import build_application
    from server.config import Settings
    from stitchgraph import migrations
    from stitchgraph.changes import mark_persons
    from stitchgraph.db import Database, DatabaseOptions

    changed = members // 100
    leavers, joiners = changed // 2, changed - changed // 2
    header("delivery — audience delta", f"{members:,} members, {changed:,} change (1 %), Meta custom audience, "
                                        "SQLite")
    sandbox = SandboxProcess()
    os.environ["BENCH_META_TOKEN"] = TOKEN
    with TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/store.db"
        plain = Database(DatabaseOptions(url=url))
        migrations.upgrade(plain)
        plain.dispose()
        started = time.perf_counter()
        load_members(Path(tmp) / "store.db", members, joiners)
        figure("setup: persons, evidence, views loaded", time.perf_counter() - started, "s")
        settings = Settings(database_url=url, metrics_address=None, sqlite_synchronous="NORMAL",
                            consent=ConsentSettings(unknown_jurisdiction="grant")).validate()
        app = build_application(settings)
        try:
            app.start(background=False)
            started = time.perf_counter()
            with app.db.transaction() as session:
                destination = create_destination(session, DestinationConfig(
                    kind="META_CUSTOM_AUDIENCE", display_name="bench", credentials_ref="env:BENCH_META_TOKEN",
                    settings={"audience_id": AUDIENCE, "base_url": sandbox.url}), "meta-ca-bench")
                audience = AudienceRow(audience_id="gold", display_name="gold", description="",
                                       rule='trait("tier") == "gold"', state="BUILDING", labels={}, etag="bench",
                                       member_count=0, create_time=datetime.now(UTC), update_time=datetime.now(UTC))
                session.add(audience)
                session.flush()
                session.add(AudienceDestinationRow(audience_pk=audience.id, destination_pk=destination.id, position=0))
                session.flush()
                evaluation = app.audiences.evaluate_in(session, audience)
                # The first sync is done: its additions were delivered.
                session.execute(DELIVERIES.update().values(status="SUCCEEDED"))
            assert evaluation.member_count == members, evaluation
            figure("setup: first build (members, keys, deltas, outbox)", time.perf_counter() - started, "s")

            started = time.perf_counter()
            with app.db.transaction() as session:
                moment = int(time.time() * 1_000_000)
                for pk, value in [(pk, "lapsed") for pk in range(1, leavers + 1)] + \
                                 [(pk, "gold") for pk in range(members + 1, members + joiners + 1)]:
                    app.events.record_traits(session, identifier_pk=pk, event_id=f"change-{pk}", occurred_us=moment,
                                             source="bench", traits={"tier": value})
                mark_persons(session, list(range(1, leavers + 1)) + list(range(members + 1, members + joiners + 1)),
                             "EVIDENCE")
            app.audiences.process_changes()
            figure("change: 1 % re-evaluated incrementally", time.perf_counter() - started, "s")
            with app.db.read() as session:
                queued = dict(session.execute(select(DELIVERIES.c.kind, func.count()).where(
                    DELIVERIES.c.status == "PENDING").group_by(DELIVERIES.c.kind)).all())
            print(f"   queued: {queued}", flush=True)

            engine = DeliveryEngine(app.db, app.consent, DeliverySettings(workers=workers, request_timeout_seconds=60,
                                                                          lease_seconds=300))
            started = time.perf_counter()
            engine.drain()
            elapsed = time.perf_counter() - started
            engine.close()
            state = sandbox.control("/__sandbox/state", "GET")["audiences"].get(AUDIENCE, {})
            rows, requests = state.get("rows_received", 0), state.get("requests", 0)
            minimum = -(-leavers // 10_000) + -(-joiners // 10_000)
            figure("sync: rows sent", rows, "rows", goal=f"= {changed:,}")
            figure("sync: requests made", requests, "requests", goal=f"= {minimum} (minimum)")
            figure("sync: time", elapsed, "s")
            verdict = "exactly the changed rows in the minimum requests" if rows == changed and requests == minimum \
                else "NOT the minimum"
            print(f"   {verdict}", flush=True)
        finally:
            app.close()
            sandbox.stop()


def run() -> None:
    events = setting("STITCHGRAPH_BENCH_DELIVERY_EVENTS", 100_000)
    members = setting("STITCHGRAPH_BENCH_DELIVERY_MEMBERS", 1_000_000)
    workers = setting("STITCHGRAPH_BENCH_DELIVERY_WORKERS", 2)
    if events > 0:
        conversions(events, workers)
    if members > 0:
        audience_delta(members, workers)


if __name__ == "__main__":
    run()
