"""Event capture over gRPC, end to end: a realistic mix of events sent with
``EventService.CaptureBatch`` (batches of 500) and ``EventService.Capture`` to a real
server in its own process, on SQLite (synchronous=FULL, the default) and on PostgreSQL,
compared with a bare gRPC server that only deserialises the batch (the ceiling).

Workload, generated deterministically before timing, spread over the 30 days before now:
60 % anonymous ``page_view`` events, 20 % ``profile_update`` identify events (user_id, raw
email, the person's anonymous_id, traits plan and country), 20 % ``purchase`` events
carrying only the user_id; about one person per ten events. Requests are serialised
before timing.

Scale with STITCHGRAPH_BENCH_EVENTS (default 200,000), STITCHGRAPH_BENCH_UNARY (default
5,000) and STITCHGRAPH_BENCH_PG_EVENTS (default 50,000; 0 skips PostgreSQL). Goals:
≥ 20,000 events/s with CaptureBatch on SQLite, ≥ 2,000 events/s with unary Capture.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from bench.report import figure, header, median

BATCH = 500
BATCH_THREADS = 2
UNARY_THREADS = 8
SEED = 20240301
DAYS = 30
STORE_DIR = Path("var/bench")
CAPTURE_BATCH = "/stitchgraph.v1.EventService/CaptureBatch"
CAPTURE = "/stitchgraph.v1.EventService/Capture"


def setting(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


# ---------------------------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------------------------

def build_events(count: int, seed: int = SEED) -> list:  # type: ignore[type-arg]
    """``count`` events in time order, deterministic for a seed (apart from "now")."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from stitchgraph.v1 import common_pb2, events_pb2

    rng = random.Random(seed)
    people = max(count // 10, 1)
    span_us = DAYS * 86_400 * 1_000_000
    now_us = int((datetime.now(UTC) - timedelta(minutes=1)).timestamp() * 1_000_000)
    plans, countries = ("free", "pro", "team", "enterprise"), ("DE", "FR", "NL", "ES", "IT", "AT", "BE", "PL")
    specs = []
    for n in range(count):
        draw = rng.random()
        kind = "page_view" if draw < 0.6 else "profile_update" if draw < 0.8 else "purchase"
        specs.append((now_us - rng.randrange(span_us), n, kind, rng.randrange(people), rng.random(), rng.random()))
    specs.sort()
    events = []
    for occurred_us, n, kind, person, a, b in specs:
        at = Timestamp(seconds=occurred_us // 1_000_000, nanos=(occurred_us % 1_000_000) * 1000)
        anonymous_id = f"anon-{person:07d}-{(person * 2654435761) % 2**32:08x}"
        user_id = f"user-{person:07d}"
        if kind == "page_view":
            event = events_pb2.Event(
                event="page_view", event_id=f"pv-{n:09d}", occurred_at=at,
                identifiers=[common_pb2.Identifier(type="anonymous_id", value=anonymous_id)],
                context=events_pb2.EventContext(page_url=f"https://shop.example/p/{int(a * 5000)}"))
        elif kind == "profile_update":
            event = events_pb2.Event(
                event="profile_update", occurred_at=at,
                identifiers=[common_pb2.Identifier(type="user_id", value=user_id),
                             common_pb2.Identifier(type="email", value=f"Person.{person}@Example.com"),
                             common_pb2.Identifier(type="anonymous_id", value=anonymous_id)])
            event.trait_updates.set.update({"plan": plans[int(a * len(plans))],
                                            "country": countries[int(b * len(countries))]})
        else:
            event = events_pb2.Event(
                event="purchase", event_id=f"order-{n:09d}", occurred_at=at,
                identifiers=[common_pb2.Identifier(type="user_id", value=user_id)],
                value=f"{5 + a * 195:.2f}", currency="EUR", order_id=f"{n:09d}")
        events.append(event)
    return events


def batch_requests(events: list) -> list[bytes]:  # type: ignore[type-arg]
    from stitchgraph.v1 import event_service_pb2

    return [event_service_pb2.CaptureBatchRequest(events=events[i:i + BATCH]).SerializeToString()
            for i in range(0, len(events), BATCH)]


def unary_requests(events: list) -> list[bytes]:  # type: ignore[type-arg]
    from stitchgraph.v1 import event_service_pb2

    return [event_service_pb2.CaptureRequest(event=e).SerializeToString() for e in events]


# ---------------------------------------------------------------------------------------------------------------
# Servers (child processes)
# ---------------------------------------------------------------------------------------------------------------

def serve_real(database: str) -> None:
    """The real server (full interceptor chain, auth off on loopback, metrics off) until killed."""
    import logging

    from server.config import Settings
    from server.grpc_server import create_server

    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger().addHandler(logging.NullHandler())
    settings = Settings(database_url=database, listen_address="127.0.0.1:0", metrics_address=None,
                        log_level="INFO").validate()
    handle = create_server(settings)
    handle.start()
    print(f"ready {handle.port}", flush=True)
    handle.wait_for_termination()


def serve_bare() -> None:
    """A bare gRPC server with only EventService.CaptureBatch: deserialise, answer one result per event."""
    from concurrent.futures import ThreadPoolExecutor

    from stitchgraph.v1 import event_service_pb2, events_pb2

    def capture_batch(request: event_service_pb2.CaptureBatchRequest,
                      _context: grpc.ServicerContext) -> event_service_pb2.CaptureBatchResponse:
        return event_service_pb2.CaptureBatchResponse(results=[
            events_pb2.EventResult(index=i, status=events_pb2.CAPTURE_STATUS_ACCEPTED)
            for i in range(len(request.events))])

    handler = grpc.method_handlers_generic_handler("stitchgraph.v1.EventService", {
        "CaptureBatch": grpc.unary_unary_rpc_method_handler(
            capture_batch, request_deserializer=event_service_pb2.CaptureBatchRequest.FromString,
            response_serializer=event_service_pb2.CaptureBatchResponse.SerializeToString)})
    server = grpc.server(ThreadPoolExecutor(max_workers=16), handlers=[handler],
                         options=[("grpc.max_receive_message_length", 8 * 1024 * 1024), ("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"ready {port}", flush=True)
    server.wait_for_termination()


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    peak_rss_mb: float = field(default=0.0)

    @classmethod
    def start(cls, *args: str) -> ServerProcess:
        process = subprocess.Popen([sys.executable, "-m", "bench.events_capture", "--serve", *args],
                                   stdout=subprocess.PIPE, text=True, env={**os.environ})
        assert process.stdout is not None
        line = process.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            process.kill()
            process.wait()
            raise RuntimeError(f"server {args} did not start (said {line!r})")
        return cls(process, int(line[1]))

    def stop(self) -> float:
        """Kill the server; return its peak RSS (VmHWM) in MiB."""
        try:
            for row in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if row.startswith("VmHWM:"):
                    self.peak_rss_mb = int(row.split()[1]) / 1024
        except OSError:
            pass
        self.process.kill()
        self.process.wait()
        return self.peak_rss_mb


def fresh_sqlite(name: str) -> tuple[str, Path]:
    STORE_DIR.mkdir(parents=True, exist_ok=True)
    path = STORE_DIR / name
    remove_sqlite(path)
    return f"sqlite:///{path}", path


def remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Drive:
    events: int
    seconds: float
    latencies: list[float]
    statuses: Counter[str]
    errors: list[str]

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def drive(port: int, method: str, requests: list[bytes], threads: int,
          count: Callable[[bytes], tuple[int, Counter[str]]], warmup: bytes) -> Drive:
    """Send ``requests`` from ``threads`` threads (one channel each), each taking the next unsent one."""
    lock = threading.Lock()
    cursor = [0]
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    sent = [0]
    ready = threading.Barrier(threads + 1)

    def worker() -> None:
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_unary(method)  # requests are bytes already; responses are parsed by ``count``
            call(warmup, timeout=60)
            ready.wait()
            mine: list[float] = []
            local: Counter[str] = Counter()
            n = 0
            while True:
                with lock:
                    index = cursor[0]
                    cursor[0] += 1
                if index >= len(requests):
                    break
                t = time.perf_counter()
                try:
                    response = call(requests[index], timeout=120)
                except grpc.RpcError as exc:
                    with lock:
                        errors.append(f"{exc.code()}: {exc.details()}")  # type: ignore[attr-defined]
                    continue
                mine.append(time.perf_counter() - t)
                events, counted = count(response)
                n += events
                local.update(counted)
            with lock:
                latencies.extend(mine)
                statuses.update(local)
                sent[0] += n

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    ready.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    return Drive(sent[0], time.perf_counter() - started, latencies, statuses, errors)


def count_batch(raw: bytes) -> tuple[int, Counter[str]]:
    from stitchgraph.v1 import event_service_pb2, events_pb2

    response = event_service_pb2.CaptureBatchResponse.FromString(raw)
    return len(response.results), Counter(events_pb2.CaptureStatus.Name(r.status) for r in response.results)


def count_unary(raw: bytes) -> tuple[int, Counter[str]]:
    from stitchgraph.v1 import event_service_pb2, events_pb2

    return 1, Counter([events_pb2.CaptureStatus.Name(event_service_pb2.CaptureResponse.FromString(raw).status)])


def batch_warmup(events: list) -> bytes:  # type: ignore[type-arg]
    from stitchgraph.v1 import event_service_pb2

    return event_service_pb2.CaptureBatchRequest(events=events[:10], validate_only=True).SerializeToString()


def unary_warmup(events: list) -> bytes:  # type: ignore[type-arg]
    from stitchgraph.v1 import event_service_pb2

    return event_service_pb2.CaptureRequest(event=events[0], validate_only=True).SerializeToString()


def check(label: str, result: Drive, expected: int) -> None:
    accepted = result.statuses.get("CAPTURE_STATUS_ACCEPTED", 0)
    figure(f"{label}: results ACCEPTED", accepted, f"of {expected:,}")
    if accepted != expected or result.errors:
        others = {k: v for k, v in result.statuses.items() if k != "CAPTURE_STATUS_ACCEPTED"}
        print(f"   FAILURE {label}: {accepted:,} of {expected:,} ACCEPTED; other results {others}; "
              f"{len(result.errors)} failed calls {result.errors[:3]}", flush=True)


def report_batches(label: str, result: Drive, expected: int, *, goal: str = "") -> None:
    figure(f"{label}: events", result.events, "events")
    figure(f"{label}: wall time", result.seconds, "s")
    figure(f"{label}: throughput", result.rate, "events/s", goal=goal)
    if result.latencies:
        figure(f"{label}: median batch of {BATCH} latency", median(result.latencies) * 1000, "ms")
    check(label, result, expected)


def run_real_batches(label: str, database: str, requests: list[bytes], warmup: bytes, threads: int,
                     expected: int, goal: str = "") -> tuple[Drive, float]:
    server = ServerProcess.start("real", "--database", database)
    try:
        result = drive(server.port, CAPTURE_BATCH, requests, threads, count_batch, warmup)
    finally:
        rss = server.stop()
    report_batches(label, result, expected, goal=goal)
    figure(f"{label}: server peak RSS", rss, "MiB")
    return result, rss


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------

def run() -> None:
    total = setting("STITCHGRAPH_BENCH_EVENTS", 200_000)
    unary_total = setting("STITCHGRAPH_BENCH_UNARY", 5_000)
    pg_total = setting("STITCHGRAPH_BENCH_PG_EVENTS", 50_000)
    header("events_capture", f"{total:,} events, ~{max(total // 10, 1):,} people, CaptureBatch of {BATCH}, "
                             f"{BATCH_THREADS} client threads; unary {unary_total:,} x {UNARY_THREADS} threads")
    t = time.perf_counter()
    events = build_events(total)
    requests = batch_requests(events)
    warmup = batch_warmup(events)
    figure("workload built and serialised (not timed below)", time.perf_counter() - t, "s")
    figure("mean serialised batch", sum(map(len, requests)) / len(requests) / 1024, "KiB")

    # Ceiling: a bare server that only deserialises, driven the same way (median of three rounds).
    bare = ServerProcess.start("bare")
    try:
        bare_runs = [drive(bare.port, CAPTURE_BATCH, requests, BATCH_THREADS, count_batch, warmup) for _ in range(3)]
    finally:
        bare_rss = bare.stop()
    bare_rate = median([r.rate for r in bare_runs])
    figure(f"bare server (ceiling), {BATCH_THREADS} threads, median of 3", bare_rate, "events/s")
    figure("bare server: median batch latency", median([median(r.latencies) for r in bare_runs]) * 1000, "ms")
    figure("bare server: peak RSS", bare_rss, "MiB")

    # The real server on SQLite, 2 client threads, then 1.
    database, path = fresh_sqlite("events.db")
    try:
        sqlite2, _ = run_real_batches(f"SQLite, {BATCH_THREADS} threads", database, requests, warmup, BATCH_THREADS,
                                      total, goal=">= 20,000")
    finally:
        remove_sqlite(path)
    figure(f"SQLite, {BATCH_THREADS} threads, as a share of the bare server", sqlite2.rate / bare_rate * 100, "%")
    database, path = fresh_sqlite("events-1t.db")
    try:
        sqlite1, _ = run_real_batches("SQLite, 1 thread", database, requests, warmup, 1, total)
    finally:
        remove_sqlite(path)
    figure(f"SQLite, {BATCH_THREADS} threads / 1 thread", sqlite2.rate / sqlite1.rate, "ratio")

    # Unary Capture on a fresh SQLite store.
    if unary_total > 0:
        unary_events = build_events(unary_total, SEED + 1)
        database, path = fresh_sqlite("events-unary.db")
        server = ServerProcess.start("real", "--database", database)
        try:
            unary = drive(server.port, CAPTURE, unary_requests(unary_events), UNARY_THREADS, count_unary,
                          unary_warmup(unary_events))
        finally:
            rss = server.stop()
            remove_sqlite(path)
        label = f"SQLite unary Capture, {UNARY_THREADS} threads"
        figure(f"{label}: events", unary.events, "events")
        figure(f"{label}: throughput", unary.rate, "events/s", goal=">= 2,000")
        figure(f"{label}: median latency", median(unary.latencies) * 1000 if unary.latencies else 0.0, "ms")
        check(label, unary, len(unary_events))
        figure(f"{label}: server peak RSS", rss, "MiB")

    # PostgreSQL, the way the tests start it.
    if pg_total <= 0:
        print("   PostgreSQL: skipped (STITCHGRAPH_BENCH_PG_EVENTS=0)", flush=True)
        return
    from tests.support.postgres import PostgresServer, PostgresUnavailable

    try:
        postgres = PostgresServer()
        postgres.start()
    except (PostgresUnavailable, OSError) as exc:
        print(f"   PostgreSQL: skipped ({exc})", flush=True)
        return
    try:
        pg_events = build_events(pg_total, SEED + 2)
        pg_requests = batch_requests(pg_events)
        pg, _ = run_real_batches(f"PostgreSQL, {BATCH_THREADS} threads", postgres.url(postgres.create_database()),
                                 pg_requests, warmup, BATCH_THREADS, len(pg_events))
        figure(f"PostgreSQL, {BATCH_THREADS} threads, as a share of the bare server", pg.rate / bare_rate * 100, "%")
    finally:
        postgres.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", choices=["real", "bare"])
    parser.add_argument("--database")
    args = parser.parse_args()
    if args.serve == "real":
        serve_real(args.database)
    elif args.serve == "bare":
        serve_bare()
    else:
        run()
