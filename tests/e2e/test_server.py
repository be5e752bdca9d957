"""The server as a client meets it: health, reflection, honest UNIMPLEMENTED, system info."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.api import SERVICES
from stitchgraph.v1 import system_service_pb2, system_service_pb2_grpc
from tests.support.grpc_client import running_server, server_settings


def test_health_reports_serving_after_start(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    for service in SERVICES:
        response = stub.Check(health_pb2.HealthCheckRequest(service=service.full_name))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_reports_not_serving_when_the_store_is_not_migrated(tmp_path: object) -> None:
    settings = server_settings(f"sqlite:///{tmp_path}/empty.db", migrate_on_start=False)
    with running_server(settings) as handle, grpc.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_every_stitchgraph_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    listed = {s.name for r in responses for s in r.list_services_response.service}
    expected = {f"stitchgraph.v1.{name}" for name in (
        "IdentityService", "EventService", "ConsentService", "AudienceService", "DestinationService",
        "CohortService", "SystemService")}
    assert expected <= listed
    assert "grpc.health.v1.Health" in listed


def test_system_info_lists_features_and_which_have_landed(channel: grpc.Channel) -> None:
    stub = system_service_pb2_grpc.SystemServiceStub(channel)
    info = stub.GetSystemInfo(system_service_pb2.GetSystemInfoRequest())
    features = {f.name: f.implemented for f in info.features}
    assert info.api_version == "v1"
    assert features["system"] is True
    assert features["identity-graph"] is True
    assert features["audiences"] is True
    assert features["cohorts"] is True
    assert all(features.values()), features
    assert info.store_dialect in {"sqlite", "postgresql"}


def test_every_response_carries_a_request_id(channel: grpc.Channel) -> None:
    stub = system_service_pb2_grpc.SystemServiceStub(channel)
    _, call = stub.GetSystemInfo.with_call(system_service_pb2.GetSystemInfoRequest(),
                                           metadata=(("x-request-id", "trace-abc.123"),))
    assert dict(call.trailing_metadata())["x-request-id"] == "trace-abc.123"
    _, call = stub.GetSystemInfo.with_call(system_service_pb2.GetSystemInfoRequest())
    assert len(dict(call.trailing_metadata())["x-request-id"]) == 32


def test_oversized_messages_are_refused(db_url: str) -> None:
    from stitchgraph.v1 import common_pb2, identity_service_pb2, identity_service_pb2_grpc

    settings = server_settings(db_url, max_receive_message_bytes=4096)
    with running_server(settings) as handle, grpc.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
        stub = identity_service_pb2_grpc.IdentityServiceStub(ch)
        big = identity_service_pb2.IdentifyRequest(
            identifiers=[common_pb2.Identifier(type="anonymous_id", value="x" * 200)] * 40)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Identify(big)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_identity_decisions_are_exported_as_metrics(channel: grpc.Channel) -> None:
    from prometheus_client import REGISTRY

    from stitchgraph.v1 import common_pb2, identity_service_pb2, identity_service_pb2_grpc

    def refused() -> float:
        return REGISTRY.get_sample_value("stitchgraph_identity_link_decisions_total",
                                         {"decision": "refused", "reason": "TYPE_LIMIT"}) or 0.0

    stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
    before = refused()
    for user in ("u-1", "u-2"):
        stub.Identify(identity_service_pb2.IdentifyRequest(identifiers=[
            common_pb2.Identifier(type="user_id", value=user),
            common_pb2.Identifier(type="anonymous_id", value="kiosk")]))
    assert refused() == before + 1
