"""Which servicer implements which service, and so which features have landed."""

from __future__ import annotations

from collections.abc import Callable

from server.api import SERVICES, ServiceSpec, feature_of
from server.app import Application
from server.servicers.audiences import AudienceServicer
from server.servicers.base import complete_servicer, implemented_methods
from server.servicers.cohorts import CohortServicer
from server.servicers.consent import ConsentServicer
from server.servicers.destinations import DestinationServicer
from server.servicers.events import EventServicer
from server.servicers.identity import IdentityServicer
from server.servicers.system import SystemServicer

# Services with at least one implemented RPC; the others answer UNIMPLEMENTED throughout.
SERVICER_CLASSES: dict[str, Callable[[Application], object]] = {
    "SystemService": SystemServicer,
    "IdentityService": IdentityServicer,
    "EventService": EventServicer,
    "DestinationService": DestinationServicer,
    "ConsentService": ConsentServicer,
    "AudienceService": AudienceServicer,
    "CohortService": CohortServicer,
}


def build_servicer(service: ServiceSpec, app: Application) -> object:
    cls = SERVICER_CLASSES.get(service.name)
    if cls is None:
        return complete_servicer(service)()
    return complete_servicer(service, cls)(app)  # type: ignore[arg-type]


def feature_status() -> list[tuple[str, bool]]:
    """Each feature of the API with whether every one of its RPCs is implemented."""
    status: dict[str, bool] = {}
    for service in SERVICES:
        cls = SERVICER_CLASSES.get(service.name)
        implemented = implemented_methods(service, cls) if isinstance(cls, type) else set()
        for method in service.descriptor.methods:
            feature = feature_of(service, method.name)
            status[feature] = status.get(feature, True) and method.name in implemented
    return sorted(status.items())
