"""The server factory used by ``stitchgraph serve`` and by the tests.

:func:`create_server` wires the application, registers every ``stitchgraph.v1``
service (features that have not landed answer ``UNIMPLEMENTED``), gRPC health
checking and server reflection, and binds the port. :meth:`StitchgraphServer.start`
applies migrations, starts serving and only then reports ``SERVING``.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from server.api import SERVICES, method_scopes
from server.app import Application, build_application
from server.config import ConfigError, Settings, split_address
from server.http_ingress import WebhookListener, create_webhook_listener
from server.interceptors.auth import AuthInterceptor
from server.interceptors.base import LayeredInterceptor
from server.interceptors.context import RequestContextInterceptor
from server.interceptors.errors import ErrorInterceptor
from server.interceptors.metrics import MetricsInterceptor
from server.registry import build_servicer
from stitchgraph import migrations

logger = logging.getLogger("stitchgraph.server")

def default_interceptors(settings: Settings) -> list[grpc.ServerInterceptor[Any, Any]]:
    """The chain, outermost first: context and access log, metrics, errors, auth —
    composed into one interceptor so a call pays for the layers, not the pipeline."""
    return [LayeredInterceptor([
        RequestContextInterceptor(),
        MetricsInterceptor(),
        ErrorInterceptor(),
        AuthInterceptor(settings.tokens, method_scopes()),
    ])]


@dataclass
class StitchgraphServer:
    """A bound, not yet started server. ``port`` is the port actually bound."""

    server: grpc.Server
    port: int
    app: Application
    health: health.HealthServicer
    service_names: tuple[str, ...]
    metrics_port: int | None = None
    #: The webhook HTTP listener, when ``[webhooks] listen`` is set.
    http: WebhookListener | None = None
    _metrics_httpd: Any = field(default=None, repr=False)
    _stopped: threading.Event = field(default_factory=threading.Event, repr=False)

    def start(self) -> None:
        """Apply migrations (unless disabled), start serving, then report SERVING.

        With migrations disabled and the store behind, the server runs but reports
        NOT_SERVING so orchestrators keep traffic away.
        """
        settings = self.app.settings
        if settings.migrate_on_start:
            migrations.upgrade(self.app.db)
        if settings.metrics_address:
            host, port = split_address(settings.metrics_address, "metrics_address")
            started = start_http_server(port, addr=host)
            if isinstance(started, tuple):
                self._metrics_httpd = started[0]
                self.metrics_port = started[0].server_port
            else:
                self.metrics_port = port
        serving = migrations.is_up_to_date(self.app.db)
        if serving:
            self.app.start()
        self.server.start()
        if self.http is not None:
            self.http.start(serving=serving)
            logger.info("webhook listener on %s", self.http.address)
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        if not serving:
            logger.error("the store is not at the current schema; run 'stitchgraph migrate'")
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let calls in flight finish within ``grace`` seconds, close the store."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        grace = self.app.settings.shutdown_grace_seconds if grace is None else grace
        if self.http is not None:
            self.http.set_serving(False)  # new webhooks get 503 and are retried by their senders
        self.server.stop(grace).wait()
        if self.http is not None:
            self.http.stop(grace)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        self.app.close()

    def wait_for_termination(self) -> None:
        self.server.wait_for_termination()

    @property
    def http_port(self) -> int | None:
        """The port the webhook listener bound, or ``None`` without one."""
        return self.http.port if self.http is not None else None


def _credentials(settings: Settings) -> grpc.ServerCredentials:
    assert settings.tls_cert_file and settings.tls_key_file
    key = Path(settings.tls_key_file).read_bytes()
    cert = Path(settings.tls_cert_file).read_bytes()
    ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def create_server(
    settings: Settings,
    *,
    address: str | None = None,
    interceptors: list[grpc.ServerInterceptor[Any, Any]] | None = None,
) -> StitchgraphServer:
    """Build and bind a server for ``settings`` (``address`` overrides the listen address;
    port 0 picks a free port). Raises :class:`ConfigError` when the address cannot be bound
    or is not loopback while no tokens are configured."""
    if address is not None:
        settings = replace(settings, listen_address=address).validate()
    app = build_application(settings)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="stitchgraph-rpc"),
        interceptors=default_interceptors(settings) if interceptors is None else interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            ("grpc.max_send_message_length", settings.max_send_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    for service in SERVICES:
        service.add_to_server(build_servicer(service, app), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = tuple(s.full_name for s in SERVICES)
    for name in ("", *service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    bind = settings.listen_address
    try:
        port = server.add_secure_port(bind, _credentials(settings)) if settings.tls_enabled else \
            server.add_insecure_port(bind)
    except RuntimeError as exc:
        app.close()
        raise ConfigError(f"listen_address: cannot bind {bind}: {exc}") from exc
    if port == 0:
        app.close()
        raise ConfigError(f"listen_address: cannot bind {bind}")
    try:
        http = create_webhook_listener(app)
    except ConfigError:
        server.stop(None)
        app.close()
        raise
    return StitchgraphServer(server=server, port=port, app=app, health=health_servicer,
                             service_names=service_names, http=http)
