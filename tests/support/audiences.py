"""Shared set-up for audience tests over gRPC."""

from __future__ import annotations

from google.protobuf import struct_pb2

from stitchgraph.v1 import destination_service_pb2, destination_service_pb2_grpc, destinations_pb2


def create_meta_audience_destination(stub: destination_service_pb2_grpc.DestinationServiceStub,
                                     destination_id: str = "meta-ca") -> str:
    """A Meta custom-audience destination; returns its resource name."""
    settings = struct_pb2.Struct()
    settings.update({"audience_id": "23850000000000000", "ad_account_id": "act_1"})
    stub.CreateDestination(destination_service_pb2.CreateDestinationRequest(
        destination_id=destination_id, destination=destinations_pb2.Destination(
            kind=destinations_pb2.DESTINATION_KIND_META_CUSTOM_AUDIENCE, display_name="Meta CA",
            credentials_ref="env:META_TOKEN", settings=settings)))
    return f"destinations/{destination_id}"
