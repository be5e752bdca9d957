"""Request IDs and the access log.

Every call gets a request ID: the caller's ``x-request-id`` metadata when it is a
sane value, otherwise a fresh one. It is returned to the caller as trailing metadata
``x-request-id`` (trailers travel with the status, so this costs no extra round of
metadata), stamped on every log record of the call, and put in the
``ErrorInfo`` of any error. One structured access-log line is written per call.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import grpc

from server.interceptors.base import Behavior, WrappingInterceptor
from server.request_context import method_var, principal_var, request_id_var

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

access_log = logging.getLogger("stitchgraph.access")


def incoming_request_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata():
        if key == "x-request-id" and isinstance(value, str) and _SANE_REQUEST_ID.match(value):
            return value
    return os.urandom(16).hex()


class RequestContextInterceptor(WrappingInterceptor):
    """Outermost interceptor: sets the call's context variables and logs the outcome."""

    def wrap(self, behavior: Behavior, method: str, *, response_streaming: bool) -> Behavior:
        def log_outcome(context: grpc.ServicerContext, started: float) -> None:
            if access_log.isEnabledFor(logging.INFO):
                # code() exists since grpcio 1.38; grpc-stubs lacks it.
                code = context.code() or grpc.StatusCode.OK  # type: ignore[attr-defined]
                access_log.info(
                    "rpc finished",
                    extra={"grpc_code": code.name, "duration_ms": round((time.perf_counter() - started) * 1000, 3)},
                )

        def enter(context: grpc.ServicerContext) -> None:
            request_id = incoming_request_id(context)
            request_id_var.set(request_id)
            method_var.set(method)
            principal_var.set("")
            context.set_trailing_metadata((("x-request-id", request_id),))

        if response_streaming:
            def streaming(request: Any, context: grpc.ServicerContext) -> Any:
                enter(context)
                started = time.perf_counter()
                try:
                    yield from behavior(request, context)
                finally:
                    log_outcome(context, started)

            return streaming

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            enter(context)
            started = time.perf_counter()
            try:
                return behavior(request, context)
            finally:
                log_outcome(context, started)

        return unary
