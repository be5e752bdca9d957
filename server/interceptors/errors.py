"""Error translation: the one table from domain exceptions to gRPC status codes.

A :class:`~stitchgraph.errors.StitchgraphError` becomes its status code with a
``google.rpc.Status`` whose details hold one ``ErrorInfo`` (reason, domain
``stitchgraph``, metadata including the request ID) and, for invalid input, a
``BadRequest`` with one field violation per bad field. Any other exception is a
bug: it is logged with its traceback and the client gets ``INTERNAL`` with the
request ID to quote, never the traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.interceptors.base import Behavior, WrappingInterceptor
from server.request_context import current_request_id
from stitchgraph import errors

ERROR_DOMAIN = "stitchgraph"

logger = logging.getLogger("stitchgraph.errors")

# The single mapping table. Order matters only for subclasses (most specific first).
CODE_TABLE: tuple[tuple[type[errors.StitchgraphError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.NotImplementedYet, grpc.StatusCode.UNIMPLEMENTED),
)


def status_code_for(exc: errors.StitchgraphError) -> grpc.StatusCode:
    for exc_type, code in CODE_TABLE:
        if isinstance(exc, exc_type):
            return code
    return grpc.StatusCode.UNKNOWN


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str],
                violations: list[errors.FieldViolation] | None = None) -> grpc.Status:
    """A ``grpc.Status`` carrying ``google.rpc.Status`` details for ``abort_with_status``."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    details = [_packed(info)]
    if violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description,
                                                            reason=v.reason)
                for v in violations
            ]
        )
        details.append(_packed(bad_request))
    proto = status_pb2.Status(code=code.value[0], message=message, details=details)
    status = rpc_status.to_status(proto)
    request_id = metadata.get("request_id")
    if request_id:
        # abort_with_status replaces trailing metadata: keep the request ID header too.
        # to_status returns a namedtuple subclass of grpc.Status; grpc-stubs types it as plain grpc.Status.
        status = status._replace(  # type: ignore[attr-defined]
            trailing_metadata=(*status.trailing_metadata, ("x-request-id", request_id)))
    return status


def status_for(exc: errors.StitchgraphError) -> grpc.Status:
    metadata = dict(exc.metadata)
    request_id = current_request_id()
    if request_id:
        metadata["request_id"] = request_id
    violations = exc.violations if isinstance(exc, errors.InvalidArgument) else None
    return rich_status(status_code_for(exc), exc.message, exc.reason, metadata, violations)


def internal_status() -> grpc.Status:
    request_id = current_request_id()
    return rich_status(
        grpc.StatusCode.INTERNAL,
        f"internal error; quote request_id {request_id} when reporting it",
        "INTERNAL",
        {"request_id": request_id},
    )


assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == code_pb2.INVALID_ARGUMENT


class ErrorInterceptor(WrappingInterceptor):
    """Turns exceptions raised below it into rich gRPC statuses."""

    def wrap(self, behavior: Behavior, method: str, *, response_streaming: bool) -> Behavior:
        def translate(exc: Exception, context: grpc.ServicerContext) -> None:
            # code() exists since grpcio 1.38; grpc-stubs lacks it.
            if context.code() is not None:  # type: ignore[attr-defined]
                raise exc  # the servicer already aborted with a status of its own
            if isinstance(exc, errors.StitchgraphError):
                context.abort_with_status(status_for(exc))
            logger.error("unhandled exception in %s", method, exc_info=exc)
            context.abort_with_status(internal_status())

        if response_streaming:
            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from behavior(request, context)
                except Exception as exc:
                    translate(exc, context)

            return streaming

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(request, context)
            except Exception as exc:
                translate(exc, context)

        return unary
