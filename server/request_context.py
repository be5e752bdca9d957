"""Per-call context shared by interceptors, servicers and log records: the request ID
and the authenticated principal, held in context variables so they follow the call
without being threaded through every function."""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("stitchgraph_request_id", default="")
principal_var: ContextVar[str] = ContextVar("stitchgraph_principal", default="")
method_var: ContextVar[str] = ContextVar("stitchgraph_method", default="")


def current_request_id() -> str:
    return request_id_var.get()


def current_principal() -> str:
    """Name of the token that authenticated this call ("local" when auth is off)."""
    return principal_var.get()
