"""Completing servicers: every RPC of a service that its servicer class does not
implement raises :class:`~stitchgraph.errors.NotImplementedYet` naming the feature,
so clients get an honest ``UNIMPLEMENTED`` instead of grpc's bare default."""

from __future__ import annotations

from typing import Any

from server.api import ServiceSpec, feature_of
from stitchgraph.errors import NotImplementedYet


def _not_implemented(method: str, feature: str) -> Any:
    def rpc(self: object, request: object, context: object) -> Any:
        raise NotImplementedYet(method, feature)

    rpc.__name__ = method.rsplit(".", 1)[-1]
    return rpc


def implemented_methods(service: ServiceSpec, servicer_cls: type) -> set[str]:
    """Names of the service's RPCs that ``servicer_cls`` overrides."""
    generated = service.generated_servicer
    return {
        m.name for m in service.descriptor.methods
        if getattr(servicer_cls, m.name, None) is not getattr(generated, m.name, None)
        and not getattr(getattr(servicer_cls, m.name, None), "_not_implemented", False)
    }


def complete_servicer(service: ServiceSpec, servicer_cls: type | None = None) -> type:
    """A subclass of ``servicer_cls`` (or of the generated base) whose missing RPCs
    raise ``NotImplementedYet``."""
    base = servicer_cls or service.generated_servicer
    implemented = implemented_methods(service, base)
    namespace: dict[str, Any] = {}
    for method in service.descriptor.methods:
        if method.name not in implemented:
            rpc = _not_implemented(f"{service.full_name}.{method.name}", feature_of(service, method.name))
            rpc._not_implemented = True
            namespace[method.name] = rpc
    return type(base.__name__, (base,), namespace)
