"""Bearer-token authentication with scopes.

Each ``stitchgraph.v1`` method declares the scope it needs in the proto
(``option (stitchgraph.v1.required_scope)``); the map from method path to scope is
read from the descriptors once. A token is looked up by the SHA-256 of the
presented value, compared with ``hmac.compare_digest`` against every configured
token so timing reveals nothing. ``admin`` implies ``read`` and ``ingest``.
Health checking and reflection need no token. Tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import grpc

from server.config import TokenConfig
from server.interceptors.base import Behavior, WrappingInterceptor
from server.request_context import principal_var
from stitchgraph.errors import PermissionDenied, Unauthenticated

LOCAL_PRINCIPAL = "local"


def bearer_token(context: grpc.ServicerContext) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in context.invocation_metadata():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class AuthInterceptor(WrappingInterceptor):
    """Checks the bearer token and its scope before the servicer runs."""

    def __init__(self, tokens: tuple[TokenConfig, ...], method_scopes: Mapping[str, str]) -> None:
        super().__init__()
        self._tokens = tokens
        self._method_scopes = dict(method_scopes)

    def authenticate(self, token: str | None) -> TokenConfig:
        """The configured token matching ``token``; raise :class:`Unauthenticated` otherwise."""
        if token is None:
            raise Unauthenticated(
                "missing credentials: send metadata 'authorization: Bearer <token>'", reason="MISSING_TOKEN"
            )
        digest = hashlib.sha256(token.encode()).hexdigest()
        found: TokenConfig | None = None
        for candidate in self._tokens:  # no early exit: the loop takes the same time for every token
            if hmac.compare_digest(candidate.token_sha256, digest):
                found = candidate
        if found is None:
            raise Unauthenticated("invalid bearer token", reason="INVALID_TOKEN")
        return found

    def wrap(self, behavior: Behavior, method: str, *, response_streaming: bool) -> Behavior:
        scope = self._method_scopes.get(method)
        if scope is None:
            return behavior  # health checking, reflection: public by design
        if not self._tokens:
            def local(request: Any, context: grpc.ServicerContext) -> Any:
                principal_var.set(LOCAL_PRINCIPAL)
                return behavior(request, context)

            return local

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            token = self.authenticate(bearer_token(context))
            if scope not in token.scopes and "admin" not in token.scopes:
                raise PermissionDenied(
                    f"this call needs the '{scope}' scope, which token '{token.name}' does not have",
                    reason="MISSING_SCOPE",
                    metadata={"required_scope": scope},
                )
            principal_var.set(token.name)
            return behavior(request, context)

        return checked
