"""A base for interceptors that wrap the behaviour of each RPC handler.

grpc's Python server calls ``intercept_service`` for every call. Building a wrapped
handler each time would dominate the cost of a cheap RPC, so each interceptor
builds it once per method and caches it (handlers are a pure function of the
method name here: nothing in the chain looks at metadata in ``intercept_service``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

Behavior = Callable[..., Any]


# grpc-stubs makes ServerInterceptor generic over request and response types; at runtime it
# is a plain ABC and cannot be subscripted, so the parameterised base exists only for mypy.
if TYPE_CHECKING:
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.ServerInterceptor


class WrappingInterceptor(_ServerInterceptor):
    """Subclasses implement :meth:`wrap`, returning a behaviour with the same signature."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}

    def wrap(self, behavior: Behavior, method: str, *, response_streaming: bool) -> Behavior:
        raise NotImplementedError

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        try:
            return self._handlers[method]
        except KeyError:
            pass
        handler = self._wrap_handler(continuation(handler_call_details), method)
        self._handlers[method] = handler
        return handler

    def _wrap_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any] | None, method: str
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if handler is None:
            return None
        kinds = {
            (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
            (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
            (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
            (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
        }
        attribute, factory = kinds[(handler.request_streaming, handler.response_streaming)]
        behavior = self.wrap(getattr(handler, attribute), method, response_streaming=handler.response_streaming)
        return factory(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class LayeredInterceptor(WrappingInterceptor):
    """Applies several wrapping layers as one interceptor.

    grpc's interceptor pipeline costs a few microseconds per interceptor per call; the
    layers compose once per method instead, so the chain pays only for what each layer
    does. ``layers`` are outermost first.
    """

    def __init__(self, layers: list[WrappingInterceptor]) -> None:
        super().__init__()
        self.layers = layers

    def wrap(self, behavior: Behavior, method: str, *, response_streaming: bool) -> Behavior:
        for layer in reversed(self.layers):
            behavior = layer.wrap(behavior, method, response_streaming=response_streaming)
        return behavior
