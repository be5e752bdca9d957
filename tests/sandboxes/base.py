"""The shared machinery of the platform sandboxes: a threaded HTTP/1.1 server on loopback,
routing, fault injection and a record of what was accepted.

A sandbox is a local stand-in for one platform's API that validates requests the way the
platform does (``specs/destinations.md`` §5) and records what it accepted, so tests assert
on what the platform would have seen. Faults are injected per route pattern:

* ``fail(n, status=503)``: the next ``n`` matching requests get that status (with the
  platform's error envelope where it has one);
* ``throttle(n, retry_after=1)``: the next ``n`` get 429 with ``Retry-After``;
* ``stall(n, seconds)``: the next ``n`` are held ``seconds`` before being *processed*
  normally (a client that times out first never sees the answer, but the platform did
  accept the data: the case dedup by ``event_id`` exists for);
* ``drop(n, seconds)``: the next ``n`` are held and then answered 504 without being processed.

The same controls are served over HTTP under ``/__sandbox/`` (``POST /__sandbox/faults``
with ``{"kind": "fail"|"throttle"|"stall"|"drop", "count": n, "status": ..., "seconds": ...,
"path": "substring"}``, ``GET /__sandbox/state``, ``POST /__sandbox/reset``) for a sandbox
run in another process (``python -m tests.sandboxes``).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["Fault", "Reply", "Request", "Sandbox", "SandboxError", "json_reply", "running"]

HASH_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Request:
    """An incoming request: method, path (no query), query parameters (first value of
    each), headers (lower-case names), the raw body and its JSON (``None`` if not JSON)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw: bytes
    json: Any
    form: dict[str, str]


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, body: Any, **headers: str) -> Reply:
    return Reply(status, body, dict(headers))


class SandboxError(Exception):
    """Raised by a route handler to answer with the platform's error envelope."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply.body))
        self.reply = reply


@dataclass
class Fault:
    kind: str  # fail | throttle | stall | drop
    remaining: int
    status: int = 503
    seconds: float = 1.0
    path: str = ""


Handler = Callable[[Request, re.Match[str]], Reply]


class Sandbox:
    """Base class: subclasses register routes in ``__init__`` with :meth:`route` and
    override :meth:`error_reply` (the platform's envelope for injected failures) and
    :meth:`state` (what they accepted, for ``GET /__sandbox/state``)."""

    name = "sandbox"

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._faults: list[Fault] = []
        #: Every request seen, as (method, path, status answered).
        self.requests: list[tuple[str, str, int]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- routing --------------------------------------------------------------------------

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern), handler))

    def dispatch(self, request: Request) -> Reply:
        if request.path.startswith("/__sandbox/"):
            return self._control(request)
        fault = self._take_fault(request.path)
        if fault is not None:
            if fault.kind == "throttle":
                reply = self.error_reply(429, "rate limited")
                reply.headers.setdefault("Retry-After", f"{fault.seconds:g}")
                return reply
            if fault.kind == "fail":
                return self.error_reply(fault.status, "injected failure")
            time.sleep(fault.seconds)
            if fault.kind == "drop":
                return self.error_reply(504, "injected timeout")
            # stall: fall through and process normally, late
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match and method == request.method:
                try:
                    return handler(request, match)
                except SandboxError as exc:
                    return exc.reply
        return self.error_reply(404, f"unknown path {request.method} {request.path}")

    def error_reply(self, status: int, message: str) -> Reply:
        """The platform's error envelope for an HTTP-level failure (override)."""
        return json_reply(status, {"error": {"message": message, "code": status}})

    # -- faults ----------------------------------------------------------------------------

    def fail(self, count: int, status: int = 503, path: str = "") -> None:
        self._add_fault(Fault("fail", count, status=status, path=path))

    def throttle(self, count: int, retry_after: float = 1.0, path: str = "") -> None:
        self._add_fault(Fault("throttle", count, seconds=retry_after, path=path))

    def stall(self, count: int, seconds: float, path: str = "") -> None:
        self._add_fault(Fault("stall", count, seconds=seconds, path=path))

    def drop(self, count: int, seconds: float, path: str = "") -> None:
        self._add_fault(Fault("drop", count, seconds=seconds, path=path))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def _add_fault(self, fault: Fault) -> None:
        with self.lock:
            self._faults.append(fault)

    def _take_fault(self, path: str) -> Fault | None:
        with self.lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.path in path:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    # -- state -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What the sandbox accepted, as JSON (override)."""
        return {}

    def reset(self) -> None:
        """Forget everything accepted (override and call super)."""
        with self.lock:
            self._faults.clear()
            self.requests.clear()

    def _control(self, request: Request) -> Reply:
        if request.path == "/__sandbox/state" and request.method == "GET":
            return json_reply(200, self.state())
        if request.path == "/__sandbox/reset" and request.method == "POST":
            self.reset()
            return json_reply(200, {})
        if request.path == "/__sandbox/faults" and request.method == "POST":
            spec = request.json or {}
            kind = spec.get("kind")
            if kind not in ("fail", "throttle", "stall", "drop"):
                return json_reply(400, {"error": "kind must be fail, throttle, stall or drop"})
            self._add_fault(Fault(kind, int(spec.get("count", 1)), status=int(spec.get("status", 503)),
                                  seconds=float(spec.get("seconds", spec.get("retry_after", 1.0))),
                                  path=str(spec.get("path", ""))))
            return json_reply(200, {})
        return json_reply(404, {"error": "unknown control path"})

    # -- serving ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "the sandbox is not running"
        host, port = self._server.server_address[:2]
        shown = host.decode() if isinstance(host, bytes) else host
        return f"http://{shown}:{port}"

    def start(self, host: str = "127.0.0.1", port: int = 0) -> Sandbox:
        sandbox = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
                headers = {k.lower(): v for k, v in self.headers.items()}
                body: Any = None
                form: dict[str, str] = {}
                content_type = headers.get("content-type", "")
                if raw and "json" in content_type:
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = None
                elif raw and "x-www-form-urlencoded" in content_type:
                    form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace"),
                                                          keep_blank_values=True).items()}
                request = Request(self.command, parts.path, query, headers, raw, body, form)
                reply = sandbox.dispatch(request)
                with sandbox.lock:
                    sandbox.requests.append((self.command, parts.path, reply.status))
                payload = b"" if reply.body is None else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = do_PUT = _handle

        class _Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that timed out during a stalled reply is expected; stay quiet.
                pass

        server = _Server((host, port), _Handler)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{self.name}-sandbox", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@contextmanager
def running(sandbox: Sandbox) -> Iterator[Sandbox]:
    """Serve ``sandbox`` on a free loopback port for the duration of the block."""
    sandbox.start()
    try:
        yield sandbox
    finally:
        sandbox.stop()


def is_hash(value: Any) -> bool:
    """True for a lower-case SHA-256 hex digest."""
    return isinstance(value, str) and HASH_RE.fullmatch(value) is not None
