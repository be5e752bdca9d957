"""Prometheus metrics per RPC: a counter by method and status code, and a latency
histogram by method. Children are bound once per method so a call pays one lookup."""

from __future__ import annotations

import time
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from server.interceptors.base import Behavior, WrappingInterceptor

RPC_TOTAL = Counter(
    "stitchgraph_rpc_total", "RPCs handled, by method and gRPC status code", ["method", "code"]
)
RPC_LATENCY = Histogram(
    "stitchgraph_rpc_latency_seconds",
    "RPC latency by method",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class MetricsInterceptor(WrappingInterceptor):
    """Counts and times every call."""

    def wrap(self, behavior: Behavior, method: str, *, response_streaming: bool) -> Behavior:
        latency = RPC_LATENCY.labels(method)
        counters: dict[grpc.StatusCode, Any] = {}

        def record(context: grpc.ServicerContext, started: float) -> None:
            latency.observe(time.perf_counter() - started)
            # code() exists since grpcio 1.38; grpc-stubs lacks it.
            code = context.code() or grpc.StatusCode.OK  # type: ignore[attr-defined]
            counter = counters.get(code)
            if counter is None:
                counter = counters[code] = RPC_TOTAL.labels(method, code.name)
            counter.inc()

        if response_streaming:
            def streaming(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    yield from behavior(request, context)
                finally:
                    record(context, started)

            return streaming

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                return behavior(request, context)
            finally:
                record(context, started)

        return unary
