"""The catalogue of the public API: which generated modules hold which service, the
feature each service (or method) belongs to, and the scope each method needs as
declared in the protos. Everything here is read from the generated descriptors,
so the protos stay the single source of truth."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

from stitchgraph.v1 import annotations_pb2

PACKAGE = "stitchgraph.v1"


@dataclass(frozen=True)
class ServiceSpec:
    """A service of the public API and the feature its methods belong to by default."""

    name: str
    module: str
    feature: str

    @property
    def full_name(self) -> str:
        return f"{PACKAGE}.{self.name}"

    @property
    def pb2(self) -> ModuleType:
        return importlib.import_module(f"stitchgraph.v1.{self.module}_pb2")

    @property
    def pb2_grpc(self) -> ModuleType:
        return importlib.import_module(f"stitchgraph.v1.{self.module}_pb2_grpc")

    @property
    def descriptor(self) -> Any:
        return self.pb2.DESCRIPTOR.services_by_name[self.name]

    @property
    def generated_servicer(self) -> type:
        return getattr(self.pb2_grpc, f"{self.name}Servicer")  # type: ignore[no-any-return]

    def add_to_server(self, servicer: object, server: Any) -> None:
        getattr(self.pb2_grpc, f"add_{self.name}Servicer_to_server")(servicer, server)


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("IdentityService", "identity_service", "identity-graph"),
    ServiceSpec("EventService", "event_service", "canonical-events"),
    ServiceSpec("ConsentService", "consent_service", "consent"),
    ServiceSpec("AudienceService", "audience_service", "audiences"),
    ServiceSpec("DestinationService", "destination_service", "delivery"),
    ServiceSpec("CohortService", "cohort_service", "cohorts"),
    ServiceSpec("SystemService", "system_service", "system"),
)

# Methods whose feature differs from their service's default.
METHOD_FEATURES: dict[str, str] = {
    f"{PACKAGE}.SystemService.ListJobs": "scheduler",
    f"{PACKAGE}.SystemService.RunJob": "scheduler",
}

_SCOPE_NAMES = {
    annotations_pb2.SCOPE_INGEST: "ingest",
    annotations_pb2.SCOPE_READ: "read",
    annotations_pb2.SCOPE_ADMIN: "admin",
}


def feature_of(service: ServiceSpec, method_name: str) -> str:
    return METHOD_FEATURES.get(f"{service.full_name}.{method_name}", service.feature)


@cache
def method_scopes() -> dict[str, str]:
    """``/stitchgraph.v1.Service/Method`` -> required scope. A method that forgot to
    declare one needs ``admin`` (fail closed)."""
    scopes = {}
    for service in SERVICES:
        for method in service.descriptor.methods:
            scope = method.GetOptions().Extensions[annotations_pb2.required_scope]
            scopes[f"/{service.full_name}/{method.name}"] = _SCOPE_NAMES.get(scope, "admin")
    return scopes
