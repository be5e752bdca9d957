"""Helpers for end-to-end tests: run a real server on a free loopback port and read
the rich error details a client would see."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.config import Settings
from server.grpc_server import StitchgraphServer, create_server
from stitchgraph.scheduler import SchedulerSettings


def server_settings(database_url: str, **overrides: object) -> Settings:
    """Settings for an in-process test server: loopback, free port, no metrics listener, no
    scheduled jobs firing (a test that wants them passes ``scheduler=``)."""
    base = Settings(database_url=database_url, listen_address="127.0.0.1:0", metrics_address=None,
                    sqlite_synchronous="NORMAL", shutdown_grace_seconds=1.0, log_format="text",
                    log_level="WARNING", scheduler=SchedulerSettings(enabled=False))
    return replace(base, **overrides).validate()  # type: ignore[arg-type]


@contextmanager
def running_server(settings: Settings) -> Iterator[StitchgraphServer]:
    handle = create_server(settings)
    handle.start()
    try:
        yield handle
    finally:
        handle.stop(0)


@dataclass
class RichError:
    """What a client sees of a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    field_violations: dict[str, str]


def rich_error(error: grpc.RpcError) -> RichError:
    """Decode the ``google.rpc.Status`` details of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    info = error_details_pb2.ErrorInfo()
    violations: dict[str, str] = {}
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.update({v.field: v.description for v in bad.field_violations})
    return RichError(
        code=error.code(),  # type: ignore[attr-defined]
        message=error.details() or "",  # type: ignore[attr-defined]
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        field_violations=violations,
    )
