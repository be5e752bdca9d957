"""Bearer tokens with scopes, and the rich error model every client sees."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.interceptors.auth import AuthInterceptor
from server.interceptors.context import RequestContextInterceptor
from server.interceptors.errors import ErrorInterceptor
from stitchgraph.v1 import (
    common_pb2,
    identity_service_pb2,
    identity_service_pb2_grpc,
    system_service_pb2,
    system_service_pb2_grpc,
)
from tests.e2e.conftest import ADMIN_TOKEN, INGEST_TOKEN, READ_TOKEN, bearer
from tests.support.grpc_client import rich_error


def _identify(channel: grpc.Channel, metadata: Any = (), **fields: Any) -> Any:
    stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
    request = identity_service_pb2.IdentifyRequest(
        identifiers=[common_pb2.Identifier(type="user_id", value="u-1")], **fields)
    return stub.Identify(request, metadata=metadata)


def test_a_call_without_a_token_is_unauthenticated(authed_channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _identify(authed_channel)
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == "MISSING_TOKEN"
    assert error.domain == "stitchgraph"


def test_a_wrong_token_is_unauthenticated_and_never_echoed(authed_channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _identify(authed_channel, bearer("not-a-real-token-xyz"))
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == "INVALID_TOKEN"
    assert "not-a-real-token-xyz" not in error.message


def test_a_token_lacking_the_scope_is_permission_denied(authed_channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _identify(authed_channel, bearer(READ_TOKEN))
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "MISSING_SCOPE"
    assert error.metadata["required_scope"] == "ingest"


def test_a_token_with_the_scope_is_served(authed_channel: grpc.Channel) -> None:
    response = _identify(authed_channel, bearer(INGEST_TOKEN))
    assert response.person.person_id.startswith("p_")
    info = system_service_pb2_grpc.SystemServiceStub(authed_channel).GetSystemInfo(
        system_service_pb2.GetSystemInfoRequest(), metadata=bearer(READ_TOKEN))
    assert info.auth_enabled


def test_admin_implies_every_other_scope(authed_channel: grpc.Channel) -> None:
    assert _identify(authed_channel, bearer(ADMIN_TOKEN)).person.person_id


def test_health_checking_needs_no_token(authed_channel: grpc.Channel) -> None:
    status = health_pb2_grpc.HealthStub(authed_channel).Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_invalid_input_is_invalid_argument_with_field_violation_and_error_info(
        authed_channel: grpc.Channel) -> None:
    stub = identity_service_pb2_grpc.IdentityServiceStub(authed_channel)
    request = identity_service_pb2.IdentifyRequest(identifiers=[
        common_pb2.Identifier(type="user_id", value="ok"), common_pb2.Identifier(type="user_id", value="   ")])
    with pytest.raises(grpc.RpcError) as caught:
        stub.Identify(request, metadata=bearer(INGEST_TOKEN))
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.domain == "stitchgraph"
    assert error.reason
    assert "identifiers[1].value" in error.field_violations
    assert error.metadata["request_id"]


def test_an_unexpected_exception_is_internal_with_a_request_id_and_no_traceback() -> None:
    def explode(request: bytes, context: grpc.ServicerContext) -> bytes:
        raise RuntimeError("secret internal detail")

    handler = grpc.method_handlers_generic_handler(
        "test.Exploding", {"Go": grpc.unary_unary_rpc_method_handler(explode)})
    server = grpc.server(ThreadPoolExecutor(2), interceptors=[
        RequestContextInterceptor(), ErrorInterceptor(), AuthInterceptor((), {})])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/test.Exploding/Go")
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", metadata=(("x-request-id", "req-42"),))
    finally:
        server.stop(0)
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.metadata["request_id"] == "req-42"
    assert "req-42" in error.message
    assert "secret internal detail" not in error.message
    assert "Traceback" not in error.message


def test_a_failed_call_still_returns_its_request_id_header(authed_channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _identify(authed_channel, (("x-request-id", "failing-call-1"),))
    assert dict(caught.value.trailing_metadata())["x-request-id"] == "failing-call-1"  # type: ignore[attr-defined]
