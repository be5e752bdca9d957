"""Cost of the interceptor chain: calls per second of a no-op authenticated RPC
(``SystemService.GetSystemInfo``, whose answer is cached) through the full chain —
request context and access log, metrics, errors, bearer-token auth — against the same
servicer on a bare server with no interceptors. Each server runs in its own process;
the client drives it from several threads; the two are measured alternately in rounds
and the medians compared. Goal: the chain costs under 15 %.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import grpc

from bench.report import figure, header, median

TOKEN = "bench-token-0123456789"
CLIENT_THREADS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(kind: str, port: int, database: str) -> None:
    """Run a server until killed (child process entry point)."""
    import logging

    from server.config import Settings, parse_env_tokens
    from server.grpc_server import create_server

    settings = Settings(database_url=database, listen_address=f"127.0.0.1:{port}", metrics_address=None,
                        tokens=parse_env_tokens(f"bench:read:{TOKEN}"), log_level="INFO")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger().addHandler(logging.NullHandler())
    handle = create_server(replace(settings), interceptors=[] if kind == "bare" else None)
    handle.start()
    print("ready", flush=True)
    handle.wait_for_termination()


def _drive(port: int, seconds: float) -> float:
    from stitchgraph.v1 import system_service_pb2, system_service_pb2_grpc

    metadata = (("authorization", f"Bearer {TOKEN}"),)
    counts = [0] * CLIENT_THREADS
    stop = time.monotonic() + seconds

    def worker(index: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = system_service_pb2_grpc.SystemServiceStub(channel)
            request = system_service_pb2.GetSystemInfoRequest()
            stub.GetSystemInfo(request, metadata=metadata)  # connect and warm up
            n = 0
            while time.monotonic() < stop:
                stub.GetSystemInfo(request, metadata=metadata)
                n += 1
            counts[index] = n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENT_THREADS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def run(rounds: int = 5, seconds: float = 3.0) -> None:
    header("rpc_overhead", f"no-op authenticated RPC, {CLIENT_THREADS} client threads, {rounds} rounds x {seconds}s")
    with TemporaryDirectory() as tmp:
        database = f"sqlite:///{Path(tmp) / 'bench.db'}"
        servers = {}
        try:
            for kind in ("chain", "bare"):
                port = _free_port()
                process = subprocess.Popen([sys.executable, "-m", "bench.rpc_overhead", "--serve", kind,
                                            "--port", str(port), "--database", database],
                                           stdout=subprocess.PIPE, text=True, env={**os.environ})
                assert process.stdout is not None
                assert process.stdout.readline().strip() == "ready"
                servers[kind] = (process, port)
            rates: dict[str, list[float]] = {"chain": [], "bare": []}
            for _ in range(rounds):
                for kind in ("bare", "chain"):
                    rates[kind].append(_drive(servers[kind][1], seconds))
        finally:
            for process, _port in servers.values():
                process.kill()
                process.wait()
    chain, bare = median(rates["chain"]), median(rates["bare"])
    figure("bare server (reference), median", bare, "calls/s")
    figure("full interceptor chain, median", chain, "calls/s")
    figure("chain / bare", chain / bare, "ratio")
    figure("cost of the chain", (1 - chain / bare) * 100, "%", goal="< 15 %")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", choices=["chain", "bare"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--database")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.database)
    else:
        run()
