"""The HTTP listener for webhook ingress, started with the gRPC server when ``[webhooks] listen`` is set.

Routes (JSON in, JSON out):

* ``POST /webhooks/rudderstack/{environment}`` and ``POST /webhooks/segment/{environment}``: one
  Segment-spec message (a RudderStack Webhook destination sends each event unmodified, one per
  request; so does Segment's Webhooks destination), a ``{"batch": [...]}`` body or a bare array.
  The sender proves itself with the environment's shared secret (see :mod:`server.webhook_auth`).
  Messages go through :func:`server.servicers.events.capture_source_payloads`, the same code as
  ``EventService.CaptureSourcePayloads``, so a payload stores the same events either way.
* ``POST /webhooks/heap/{cohort_source_id}``: a Heap Segments Sync delivery, verified with the
  ``Heap-Hash`` HMAC of the source's webhook secret and handed to the cohort service.
* ``GET /healthz``: 200 while serving, 503 otherwise.

Status codes follow what senders retry: 200 with a summary; 400 for a payload that can never be
accepted (nothing of it stored); 401 for missing or wrong credentials (nothing stored, nothing
said about the secret); 404 for an unknown environment or cohort source; 411/413/415 for a body
that is unframed, too large or not JSON; 503 with ``Retry-After`` when the store is unavailable,
the server is not serving yet or too many requests are in flight, so the sender tries again.

Every response carries ``X-Request-Id`` (the caller's when it is sane), which is also on every
log line of the request. Bodies, headers and secrets are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import Counter
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from audiences.destinations.base import CredentialsError, resolve_credentials
from identity.events.capture import ACCEPTED, DUPLICATE, PARKED, REJECTED, CaptureResult
from server.app import Application
from server.config import ConfigError, WebhookSettings, split_address
from server.request_context import method_var, principal_var, request_id_var
from server.servicers.events import capture_source_payloads
from server.webhook_auth import WebhookAuthError, verify_heap_hash, verify_shared_secret
from stitchgraph import errors

logger = logging.getLogger("stitchgraph.webhooks")
access_log = logging.getLogger("stitchgraph.access")

WEBHOOK_REQUESTS = Counter("stitchgraph_webhook_requests_total", "Webhook HTTP requests, by route and status",
                           ["route", "status"])

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_EVENT_ROUTE = re.compile(r"^/webhooks/(rudderstack|segment)/([A-Za-z0-9_-]{1,64})/?$")
_HEAP_ROUTE = re.compile(r"^/webhooks/heap/([A-Za-z0-9._-]{1,128})/?$")
_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$", re.IGNORECASE)
#: Seconds a sender is asked to wait before retrying after a 503.
RETRY_AFTER_SECONDS = 5
#: Seconds a connection may sit idle or trickle a body before it is closed.
SOCKET_TIMEOUT_SECONDS = 30.0

_STATUS_BY_ERROR: tuple[tuple[type[errors.StitchgraphError], int], ...] = (
    (errors.InvalidArgument, 400),
    (errors.NotFound, 404),
    (errors.AlreadyExists, 409),
    (errors.FailedPrecondition, 409),
    (errors.Aborted, 503),  # a lost race: worth retrying
    (errors.Unauthenticated, 401),
    (errors.PermissionDenied, 403),
    (errors.ResourceExhausted, 429),
    (errors.Unavailable, 503),
    (errors.NotImplementedYet, 501),
)


class HeapCohorts(Protocol):
    """What the Heap route needs of the cohort service."""

    def heap_webhook_secret(self, cohort_source_id: str, /) -> str:
        """The webhook secret of a HEAP_WEBHOOK source; raises :class:`~stitchgraph.errors.NotFound`."""
        ...

    def apply_heap_sync(self, cohort_source_id: str, payload: dict[str, Any], received_us: int, /) -> dict[str, Any]:
        """Apply one verified Segments Sync delivery (idempotent per sync task and page); returns
        a JSON-able summary; raises :class:`~stitchgraph.errors.InvalidArgument` for a bad payload."""
        ...


@dataclass(frozen=True)
class Reply:
    """An HTTP response: status, JSON body and extra headers."""

    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()
    #: Why, for the access log (an error reason; empty on success).
    reason: str = ""


@dataclass(frozen=True)
class Route:
    """A matched route: its template (for logs and metrics), the sender kind and the path key."""

    template: str
    kind: str
    key: str


def error_reply(status: int, reason: str, message: str, *, violations: list[dict[str, Any]] | None = None,
                headers: tuple[tuple[str, str], ...] = (), extra: Mapping[str, Any] | None = None) -> Reply:
    """A JSON error reply: ``{"error": {code, status, reason, message, violations?}, ...extra}``."""
    error: dict[str, Any] = {"code": status, "status": HTTPStatus(status).name, "reason": reason,
                             "message": message}
    if violations:
        error["violations"] = violations
    return Reply(status, {**(extra or {}), "error": error}, headers, reason)


def _unavailable(message: str, reason: str = "UNAVAILABLE") -> Reply:
    return error_reply(503, reason, message, headers=(("Retry-After", str(RETRY_AFTER_SECONDS)),))


def _is_store_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _reply_for_error(exc: errors.StitchgraphError) -> Reply:
    status = next((code for kind, code in _STATUS_BY_ERROR if isinstance(exc, kind)), 500)
    violations = [{"field": v.field, "description": v.description, "reason": v.reason}
                  for v in exc.violations] if isinstance(exc, errors.InvalidArgument) else None
    headers = (("Retry-After", str(RETRY_AFTER_SECONDS)),) if status == 503 else ()
    return error_reply(status, exc.reason, exc.message, violations=violations, headers=headers)


def _result_json(index: int, result: CaptureResult) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": index, "status": result.status, "event_id": result.event_id}
    if result.reason:
        entry["reason"] = result.reason
    if result.violations:
        entry["violations"] = [{"field": v.field, "description": v.description, "reason": v.reason}
                               for v in result.violations]
    return entry


def capture_summary(results: list[CaptureResult]) -> dict[str, Any]:
    """Counts by status and one entry per message, as the webhook reply reports them."""
    counts = {status: 0 for status in (ACCEPTED, DUPLICATE, PARKED, REJECTED)}
    for result in results:
        counts[result.status] += 1
    return {"received": len(results), "accepted": counts[ACCEPTED], "duplicate": counts[DUPLICATE],
            "parked": counts[PARKED], "rejected": counts[REJECTED],
            "results": [_result_json(i, r) for i, r in enumerate(results)]}


@dataclass
class WebhookIngress:
    """Routing and handling, independent of the socket server: what a request gets for its
    route, headers (lower-cased names) and raw body."""

    app: Application
    settings: WebhookSettings
    #: Environment name → resolved shared secret.
    secrets: Mapping[str, str]
    cohorts: HeapCohorts | None = None
    clock: Callable[[], float] = time.time
    serving: threading.Event = field(default_factory=threading.Event)

    def route(self, path: str) -> Route | None:
        path = path.partition("?")[0]
        if path == "/healthz":
            return Route("/healthz", "health", "")
        matched = _EVENT_ROUTE.match(path)
        if matched:
            return Route(f"/webhooks/{matched[1]}/{{environment}}", matched[1], matched[2])
        matched = _HEAP_ROUTE.match(path)
        if matched:
            return Route("/webhooks/heap/{cohort_source_id}", "heap", matched[1])
        return None

    def health(self) -> Reply:
        if self.serving.is_set():
            return Reply(200, {"status": "SERVING"})
        return Reply(503, {"status": "NOT_SERVING"}, (("Retry-After", str(RETRY_AFTER_SECONDS)),), "NOT_SERVING")

    def handle(self, route: Route, headers: Mapping[str, str], body: bytes) -> Reply:
        """The reply to a POST on ``route``. Never raises for a sender's mistake or a store outage."""
        if not self.serving.is_set():
            return _unavailable("the server is not serving yet (or is shutting down); retry later", "NOT_SERVING")
        content_type = headers.get("content-type", "").partition(";")[0].strip()
        if not _JSON_TYPE.match(content_type):
            return error_reply(415, "UNSUPPORTED_MEDIA_TYPE", "send the body as Content-Type: application/json")
        try:
            if route.kind == "heap":
                return self._heap(route.key, headers, body)
            return self._events(route.kind, route.key, headers, body)
        except errors.StitchgraphError as exc:
            return _reply_for_error(exc)
        except Exception as exc:
            if _is_store_unavailable(exc):
                logger.warning("webhook refused: the store is unavailable (%s)", type(exc).__name__)
                return _unavailable("the store is unavailable; retry later")
            raise

    # -- RudderStack / Segment --------------------------------------------------------------------

    def _events(self, kind: str, environment_name: str, headers: Mapping[str, str], body: bytes) -> Reply:
        environment = self.settings.environment(environment_name)
        secret = self.secrets.get(environment_name)
        if environment is None or secret is None:
            return error_reply(404, "UNKNOWN_ENVIRONMENT", f"no webhook environment {environment_name!r}")
        try:
            verify_shared_secret(secret, body, header_secret=headers.get("x-stitchgraph-secret"),
                                 authorization=headers.get("authorization"), signature=headers.get("x-signature"))
        except WebhookAuthError as exc:
            return self._unauthenticated(exc, "Basic")
        principal_var.set(f"webhook:{environment_name}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return error_reply(400, "INVALID_PAYLOAD", "the body is not UTF-8 text",
                               violations=[{"field": "", "description": "the body is not UTF-8 text",
                                            "reason": "INVALID_ENCODING"}])
        payload = capture_source_payloads(self.app, kind, [text], source=environment.source or kind,
                                          batch_field="batch")[0]
        if payload.violations:
            violations = [{"field": v.field, "description": v.description, "reason": v.reason}
                          for v in payload.violations]
            too_large = any(v.reason == "PAYLOAD_TOO_LARGE" for v in payload.violations)
            return error_reply(413 if too_large else 400, "PAYLOAD_TOO_LARGE" if too_large else "INVALID_PAYLOAD",
                               "; ".join(f"{v['field'] or 'body'}: {v['description']}" for v in violations),
                               violations=violations)
        if not payload.results:
            return error_reply(400, "EMPTY_BATCH", "the body holds no messages")
        summary = capture_summary(payload.results)
        if summary["rejected"] == summary["received"]:
            rejected: list[dict[str, Any]] = [{"index": i, **v} for i, entry in enumerate(summary["results"])
                                              for v in entry.get("violations", [])]
            return error_reply(400, "INVALID_EVENTS", "no message of the body can be accepted; nothing was stored",
                               violations=rejected, extra=summary)
        return Reply(200, summary)

    # -- Heap Segments Sync -----------------------------------------------------------------------

    def _heap(self, cohort_source_id: str, headers: Mapping[str, str], body: bytes) -> Reply:
        if self.cohorts is None:
            return error_reply(404, "UNKNOWN_COHORT_SOURCE", f"no Heap webhook cohort source {cohort_source_id!r}")
        try:
            secret = self.cohorts.heap_webhook_secret(cohort_source_id)
        except errors.NotFound:
            secret = ""
        if not secret:
            # An empty key would let anyone compute a valid Heap-Hash: treat the source as absent.
            return error_reply(404, "UNKNOWN_COHORT_SOURCE", f"no Heap webhook cohort source {cohort_source_id!r}")
        now = self.clock()
        try:
            verify_heap_hash(headers.get("heap-hash"), body, secret, now_ms=int(now * 1000),
                             max_age_ms=int(self.settings.heap_max_age_seconds * 1000),
                             max_future_ms=int(self.settings.heap_max_future_seconds * 1000))
        except WebhookAuthError as exc:
            return self._unauthenticated(exc, "Heap-Hash")
        principal_var.set(f"heap:{cohort_source_id}")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            description = exc.msg if isinstance(exc, json.JSONDecodeError) else "the body is not UTF-8 text"
            return error_reply(400, "INVALID_PAYLOAD", f"invalid JSON: {description}",
                               violations=[{"field": "", "description": f"invalid JSON: {description}",
                                            "reason": "INVALID_JSON"}])
        if not isinstance(payload, dict):
            return error_reply(400, "INVALID_PAYLOAD", "the body must be a JSON object",
                               violations=[{"field": "", "description": "must be a JSON object",
                                            "reason": "INVALID_TYPE"}])
        summary = self.cohorts.apply_heap_sync(cohort_source_id, payload, int(now * 1_000_000))
        return Reply(200, {"summary": summary})

    @staticmethod
    def _unauthenticated(exc: WebhookAuthError, scheme: str) -> Reply:
        # Only the reason is told: enough to tell a missing header from a wrong one, nothing about the secret.
        logger.info("webhook refused: %s", exc.reason)
        challenge = (("WWW-Authenticate", 'Basic realm="stitchgraph-webhooks"'),) if scheme == "Basic" else ()
        return error_reply(401, exc.reason, "the request is not authenticated for this endpoint", headers=challenge)


# -- the socket server ----------------------------------------------------------------------------

class _BodyError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.reason)
        self.reply = reply


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    ingress: WebhookIngress
    slots: threading.BoundedSemaphore
    idle: threading.Condition
    in_flight: int

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a dropped connection is routine for a listener.
        logger.debug("webhook connection ended with an error", exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stitchgraph-webhooks"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_SECONDS
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes the request line (which may carry a query string) to stderr; the
        # access log below says what is needed without it.
        return

    def _serve(self, method: str) -> None:
        started = time.perf_counter()
        incoming_id = self.headers.get("x-request-id", "")
        request_id = incoming_id if _SANE_REQUEST_ID.match(incoming_id) else os.urandom(16).hex()
        request_id_var.set(request_id)
        principal_var.set("")
        ingress = self.server.ingress
        route = ingress.route(self.path)
        method_var.set(f"{method} {route.template if route else '(unknown)'}")
        reply = self._reply(method, route)
        body = json.dumps({**reply.body, "request_id": request_id}, separators=(",", ":")).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", request_id)
        for name, value in reply.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        template = route.template if route else "(unknown)"
        WEBHOOK_REQUESTS.labels(template, str(reply.status)).inc()
        access_log.info("http request finished", extra={
            "http_method": method, "route": template, "http_status": reply.status,
            "reason": reply.reason, "duration_ms": round((time.perf_counter() - started) * 1000, 3)})

    def _reply(self, method: str, route: Route | None) -> Reply:
        if route is None:
            self._discard_unread_body()
            return error_reply(404, "NOT_FOUND", "no such endpoint")
        if route.kind == "health":
            if method != "GET":
                self._discard_unread_body()
                return error_reply(405, "METHOD_NOT_ALLOWED", "use GET", headers=(("Allow", "GET"),))
            return self.server.ingress.health()
        # RudderStack's Webhook destination and Segment's Webhooks (Actions) can be set to PUT or
        # PATCH; either way the whole event is the JSON body. Heap always POSTs.
        allowed = ("POST",) if route.kind == "heap" else ("POST", "PUT", "PATCH")
        if method not in allowed:
            self._discard_unread_body()
            return error_reply(405, "METHOD_NOT_ALLOWED", f"use {' or '.join(allowed)}",
                               headers=(("Allow", ", ".join(allowed)),))
        if not self.server.slots.acquire(blocking=False):
            self._discard_unread_body()
            return _unavailable("too many webhook requests in flight; retry later", "TOO_MANY_REQUESTS")
        with self.server.idle:
            self.server.in_flight += 1
        try:
            try:
                body = self._read_body(self.server.ingress.settings.max_body_bytes)
            except _BodyError as exc:
                return exc.reply
            try:
                return self.server.ingress.handle(route, {k.lower(): v for k, v in self.headers.items()}, body)
            except Exception:
                logger.exception("webhook request failed")
                return error_reply(500, "INTERNAL",
                                   f"internal error; quote request_id {request_id_var.get()} when reporting it")
        finally:
            self.server.slots.release()
            with self.server.idle:
                self.server.in_flight -= 1
                self.server.idle.notify_all()

    def _discard_unread_body(self) -> None:
        # A body left unread would be parsed as the next request on a kept-alive connection.
        if self.headers.get("Content-Length", "0").strip() not in ("", "0") or \
                "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self.close_connection = True
            raise _BodyError(error_reply(411, "LENGTH_REQUIRED", "send Content-Length (or a chunked body)"))
        if not length_text.strip().isdigit():
            self.close_connection = True
            raise _BodyError(error_reply(400, "INVALID_CONTENT_LENGTH", "Content-Length is not a number"))
        length = int(length_text)
        if length > limit:
            self.close_connection = True
            raise _BodyError(error_reply(413, "PAYLOAD_TOO_LARGE", f"the body is larger than {limit} bytes"))
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise _BodyError(error_reply(408, "REQUEST_TIMEOUT", "the body did not arrive in time")) from None
        if len(body) != length:
            self.close_connection = True
            raise _BodyError(error_reply(400, "TRUNCATED_BODY", "the body ended before Content-Length bytes"))
        return body

    def _read_chunked(self, limit: int) -> bytes:
        try:
            return self._read_chunks(limit)
        except TimeoutError:
            self.close_connection = True
            raise _BodyError(error_reply(408, "REQUEST_TIMEOUT", "the body did not arrive in time")) from None

    def _read_chunks(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                self.close_connection = True
                raise _BodyError(error_reply(400, "INVALID_CHUNK", "malformed chunked body")) from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers, up to the blank line
                    pass
                return b"".join(chunks)
            total += size
            if total > limit:
                self.close_connection = True
                raise _BodyError(error_reply(413, "PAYLOAD_TOO_LARGE", f"the body is larger than {limit} bytes"))
            chunks.append(self.rfile.read(size))
            self.rfile.readline(3)  # the CRLF after the chunk


class WebhookListener:
    """A threaded HTTP/1.1 server around a :class:`WebhookIngress`, bound at construction."""

    def __init__(self, ingress: WebhookIngress, address: str) -> None:
        host, port = split_address(address, "webhooks.listen")
        try:
            server_class = _Server6 if ":" in host else _Server
            server = server_class((host, port), _Handler, bind_and_activate=True)
        except OSError as exc:
            raise ConfigError(f"webhooks.listen: cannot bind {address}: {exc.strerror or exc}") from exc
        server.ingress = ingress
        server.slots = threading.BoundedSemaphore(ingress.settings.max_concurrent_requests)
        server.idle = threading.Condition()
        server.in_flight = 0
        self.ingress = ingress
        self.host = host
        self._server = server
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self, *, serving: bool = True) -> None:
        """Accept connections; webhooks are handled once ``serving`` (else 503 until :meth:`set_serving`)."""
        self.set_serving(serving)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="webhook-listener", daemon=True)
        self._thread.start()

    def set_serving(self, serving: bool) -> None:
        if serving:
            self.ingress.serving.set()
        else:
            self.ingress.serving.clear()

    def stop(self, grace: float = 10.0) -> None:
        """Refuse new webhooks, stop accepting, let requests in flight finish within ``grace`` seconds."""
        self.set_serving(False)
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        server = self._server
        deadline = time.monotonic() + grace
        with server.idle:
            while server.in_flight and (remaining := deadline - time.monotonic()) > 0:
                server.idle.wait(remaining)
        server.server_close()


def resolve_webhook_secrets(settings: WebhookSettings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment name → shared secret, read through each ``secret_ref``.

    Raises :class:`ConfigError` naming the environment when a secret cannot be read (the message
    never contains the secret). A JSON credentials value gives its ``secret`` (or ``token``) member.
    """
    secrets = {}
    for environment in settings.environments:
        where = f"webhooks.environments.{environment.name}.secret_ref"
        try:
            credentials = resolve_credentials(environment.secret_ref, environ)
        except CredentialsError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        secret = credentials.get("secret") or credentials.get("token")
        if not secret:
            raise ConfigError(f"{where}: the JSON credentials have no 'secret' member")
        secrets[environment.name] = secret
    return secrets


def create_webhook_listener(app: Application, *, cohorts: HeapCohorts | None = None,
                            environ: Mapping[str, str] | None = None) -> WebhookListener | None:
    """The bound (not yet started) listener for ``app.settings.webhooks``, or ``None`` when ``listen``
    is empty. Raises :class:`ConfigError` when a secret cannot be read or the address cannot be bound.
    ``cohorts`` defaults to the application's cohort service, when it has one."""
    settings = app.settings.webhooks
    if not settings.listen:
        return None
    ingress = WebhookIngress(app=app, settings=settings, secrets=resolve_webhook_secrets(settings, environ),
                             cohorts=cohorts if cohorts is not None else getattr(app, "cohorts", None))
    return WebhookListener(ingress, settings.listen)


__all__ = [
    "HeapCohorts",
    "Reply",
    "Route",
    "WebhookIngress",
    "WebhookListener",
    "capture_summary",
    "create_webhook_listener",
    "resolve_webhook_secrets",
]
