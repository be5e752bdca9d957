"""``stitchgraph jobs list`` and ``stitchgraph jobs run JOB_ID [--wait]``: the scheduled jobs of a
running server, over gRPC like any other client (``ListJobs``, ``RunJob``).

``list`` prints one line per job: name, kind, schedule, next fire time, last run and its
outcome. ``run`` starts a run now in the server it talks to (leader or not; once across all
processes) and, with ``--wait``, waits for its outcome: exit code 0 when it succeeded, 1 when it
failed or is still running at ``--timeout``.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from stitchgraph.scheduler import JOB_KINDS
from stitchgraph.v1 import system_pb2, system_service_pb2, system_service_pb2_grpc

DEFAULT_SERVER = "127.0.0.1:50051"


class CliError(Exception):
    """A failure that ends the command with a one-line message and exit code 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``list`` and ``run`` (with their options) to the ``jobs`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=None,
                        help=f"HOST:PORT of the server (default: $STITCHGRAPH_SERVER or {DEFAULT_SERVER})")
    common.add_argument("--token", default=None, help="bearer token (default: $STITCHGRAPH_TOKEN)")
    common.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    common.add_argument("--ca-file", default=None, help="PEM CA certificate to verify the server with (implies --tls)")
    common.add_argument("--timeout", type=float, default=300.0,
                        help="deadline of the call in seconds, which bounds --wait (default 300)")
    sub = parser.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    listing = sub.add_parser("list", parents=[common], help="list the jobs: schedule, next fire, last run")
    listing.add_argument("--kind", choices=[k.lower().replace("_", "-") for k in JOB_KINDS],
                         help="only jobs of this kind")
    run = sub.add_parser("run", parents=[common], help="run a job now (needs the admin scope)")
    run.add_argument("job", metavar="JOB_ID", help="the job as listed, e.g. audience-evaluation")
    run.add_argument("--wait", action="store_true", help="wait for the run to finish and show its outcome")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``stitchgraph jobs ACTION``, printing to ``out`` (standard output); returns the exit code."""
    out = out or sys.stdout
    target = args.server or os.environ.get("STITCHGRAPH_SERVER") or DEFAULT_SERVER
    token = args.token if args.token is not None else os.environ.get("STITCHGRAPH_TOKEN", "")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        with _channel(target, args.tls, args.ca_file) as channel:
            stub: Any = system_service_pb2_grpc.SystemServiceStub(channel)  # type: ignore[no-untyped-call]
            if args.jobs_command == "list":
                return _list(stub, metadata, args, out)
            return _run(stub, metadata, args, out)
    except CliError as exc:
        print(f"stitchgraph jobs: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        call = cast(grpc.Call, exc)
        code = call.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            hint = "; is it running? Set --server HOST:PORT (or $STITCHGRAPH_SERVER), and --tls/--ca-file for TLS"
            print(f"stitchgraph jobs: cannot reach the server at {target} ({_rpc_text(call)}){hint}.", file=sys.stderr)
        elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            print(f"stitchgraph jobs: the server refused the call ({_rpc_text(call)}); pass a token with --token or "
                  "$STITCHGRAPH_TOKEN (run needs the admin scope).", file=sys.stderr)
        else:
            print(f"stitchgraph jobs: {_rpc_text(call)}", file=sys.stderr)
        return 1


def _channel(target: str, tls: bool, ca_file: str | None) -> grpc.Channel:
    if not (tls or ca_file):
        return grpc.insecure_channel(target)
    root = None
    if ca_file:
        try:
            root = Path(ca_file).read_bytes()
        except OSError as exc:
            raise CliError(f"--ca-file {ca_file}: {exc.strerror or exc}") from exc
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root))


def _list(stub: Any, metadata: Any, args: argparse.Namespace, out: TextIO) -> int:
    kind: Any = system_pb2.JobKind.Value("JOB_KIND_" + args.kind.upper().replace("-", "_")) if args.kind else 0
    jobs: list[system_pb2.Job] = []
    token = ""
    while True:
        page = stub.ListJobs(system_service_pb2.ListJobsRequest(page_size=1000, page_token=token, kind=kind),
                             metadata=metadata, timeout=args.timeout)
        jobs.extend(page.jobs)
        token = page.next_page_token
        if not token:
            break
    rows = [("JOB", "KIND", "SCHEDULE", "NEXT RUN (UTC)", "LAST RUN (UTC)", "LAST STATUS")]
    for job in jobs:
        status = _status(job.last_status) if job.HasField("last_run_time") else ""
        rows.append((job.name.removeprefix("jobs/"), _kind(job.kind), job.schedule or "(by hand only)",
                     _time(job.next_run_time) if job.HasField("next_run_time") else "-",
                     _time(job.last_run_time) if job.HasField("last_run_time") else "never", status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)
    for job in jobs:
        if job.last_error:
            print(f"{job.name.removeprefix('jobs/')}: last error: {job.last_error}", file=out)
    return 0


def _run(stub: Any, metadata: Any, args: argparse.Namespace, out: TextIO) -> int:
    name = args.job if args.job.startswith("jobs/") else f"jobs/{args.job}"
    request = system_service_pb2.RunJobRequest(request_id=str(uuid.uuid4()), name=name, wait=args.wait)
    response = stub.RunJob(request, metadata=metadata, timeout=args.timeout)
    run = response.run
    status = _status(run.status)
    if not args.wait:
        print(f"{name}: run started at {_time(run.start_time)} UTC", file=out)
        return 0
    if status == "RUNNING":
        print(f"{name}: still running after {args.timeout:g} s (started {_time(run.start_time)} UTC)", file=out)
        return 1
    took = (run.end_time.ToMicroseconds() - run.start_time.ToMicroseconds()) / 1e6
    print(f"{name}: {status.lower()} in {took:.1f} s: {run.detail}", file=out)
    return 0 if status == "SUCCEEDED" else 1


def _kind(value: int) -> str:
    return str(system_pb2.JobKind.Name(value)).removeprefix("JOB_KIND_").lower().replace("_", "-")


def _status(value: int) -> str:
    return str(system_pb2.JobRunStatus.Name(value)).removeprefix("JOB_RUN_STATUS_")


def _time(timestamp: Timestamp) -> str:
    moment = datetime.fromtimestamp(timestamp.ToMicroseconds() / 1e6, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _rpc_text(call: grpc.Call) -> str:
    """``CODE: details`` of a failed call."""
    code = call.code()
    return f"{code.name if code else 'UNKNOWN'}: {call.details() or ''}".rstrip(": ")
