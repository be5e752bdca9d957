"""``stitchgraph serve`` — the process ``make run`` starts — as an operator meets it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.api import SERVICES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(address: str, deadline: float) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "server did not report SERVING in time"
            time.sleep(0.1)


def test_serve_migrates_serves_lists_services_and_stops_gracefully(tmp_path: Path) -> None:
    port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "STITCHGRAPH_DATABASE_URL": f"sqlite:///{tmp_path}/var/store.db",
           "STITCHGRAPH_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}", "STITCHGRAPH_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--listen", f"127.0.0.1:{port}"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_serving(f"127.0.0.1:{port}", time.monotonic() + 60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            listed = {s.name for r in responses for s in r.list_services_response.service}
        assert {s.full_name for s in SERVICES} <= listed
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert "stitchgraph_rpc_total" in metrics
        assert (tmp_path / "var" / "store.db").exists()
        process.send_signal(signal.SIGTERM)
        stdout, _stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    assert f"127.0.0.1:{port}" in stdout
    assert "grpcurl" in stdout


def test_migrate_command_brings_an_empty_store_to_head(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "server", "migrate", "--database-url",
                             f"sqlite:///{tmp_path}/m.db"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    from stitchgraph import migrations

    assert f"-> {migrations.head_revision()}" in result.stdout


def test_configuration_errors_exit_with_a_clear_message() -> None:
    result = subprocess.run([sys.executable, "-m", "server", "serve", "--listen", "0.0.0.0:1"],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "STITCHGRAPH_AUTH_TOKENS": ""})
    assert result.returncode == 2
    assert "loopback" in result.stderr

