"""A local Heap server API, validated the way Heap documents it
(``specs/sources-and-consent.md`` §3.1), and a sender of Heap's Segments Sync webhooks (§3.2).

**Add user properties** (``POST /api/add_user_properties``): a single
``{app_id, identity, properties}`` or a bulk ``{app_id, users: [{identity, properties}]}`` of
1 to 1,000 users. Every problem refuses the whole request and nothing of it is kept:

* ``app_id`` missing: 400; not one of the sandbox's ``app_ids``: **401** (Heap documents no
  status for a wrong environment ID; its other server APIs answer a wrong one "Unauthorized",
  so the sandbox does too);
* ``identity`` missing, not a string, empty or longer than 255 characters: 400;
* ``properties`` not an object; a key that is empty or 1,024 characters or longer; a value
  that is not a string or a number (booleans, objects, arrays and ``null`` included); a
  string value of 1,024 characters or more; a reserved key (any casing of ``id``, or
  ``user_id``): 400.

Accepted users' properties are overwritten key by key (:meth:`HeapSandbox.user_properties`);
:meth:`HeapSandbox.calls` counts the writes per identity. Single calls are limited to 30
requests per 30 seconds per identity and app ID (429 with ``Retry-After``), as Heap
documents; the bulk form has no documented per-identity limit and none is applied.

**Track** (``POST /api/track``): a single ``{app_id, event, identity | user_id, properties?,
timestamp?, idempotency_key?}`` or a bulk ``{app_id, events: [...]}`` of up to 1,000 events,
with the same property rules except that arrays are taken and stored as Heap stores them
(``"a||b"``, cut to 1,024 characters). Exactly one of ``identity`` and ``user_id``; a
repeated ``idempotency_key`` is accepted and not stored twice.

Errors are answered as ``{"error": "<message>"}``; successes as an empty 200.

:class:`HeapWebhookSender` plays Heap's side of a Segments Sync integration: it builds
``segment.users.sync`` / ``segment.users.drain`` payloads as in Heap's reference app and
webhook specification, signs them with :func:`heap_hash` and posts them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx

from tests.sandboxes.base import Reply, Request, Sandbox, SandboxError, json_reply

__all__ = ["HeapSandbox", "HeapWebhookSender", "heap_hash"]

MAX_USERS = 1000
MAX_EVENTS = 1000
MAX_IDENTITY_LENGTH = 255
#: Keys and string values must be shorter than this.
MAX_TEXT_LENGTH = 1024
SINGLE_CALL_LIMIT = 30
SINGLE_CALL_WINDOW_SECONDS = 30.0
ARRAY_SEPARATOR = "||"


def _error(status: int, message: str, **headers: str) -> Reply:
    return json_reply(status, {"error": message}, **headers)


def _invalid(message: str) -> SandboxError:
    return SandboxError(_error(400, message))


class HeapSandbox(Sandbox):
    """Heap's ``add_user_properties`` and ``track`` on loopback.

    ``app_ids`` are the environment IDs accepted; ``clock`` gives the current Unix time
    (tests move it to refill the per-identity rate limit).
    """

    name = "heap"

    def __init__(self, app_ids: Iterable[str] | None = None, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.app_ids = {str(a) for a in app_ids} if app_ids is not None else {"11111"}
        self.clock = clock
        self._canned: list[list[Any]] = []  # [remaining, path substring, Reply]
        self._clear()
        self.route("POST", r"/api/add_user_properties/?", self._add_user_properties)
        self.route("POST", r"/api/track/?", self._track)

    def _clear(self) -> None:
        #: identity -> its properties now, per app ID.
        self.users: dict[tuple[str, str], dict[str, str | int | float]] = {}
        self._calls: dict[tuple[str, str], int] = {}
        #: Every tracked event kept, in order.
        self.tracked: list[dict[str, Any]] = []
        self.duplicate_count = 0
        self.property_requests = 0
        self._idempotency_keys: set[tuple[str, str]] = set()
        self._windows: dict[tuple[str, str], deque[float]] = {}

    # -- accessors --------------------------------------------------------------------------

    def user_properties(self, identity: str, app_id: str | None = None) -> dict[str, str | int | float]:
        """The properties of ``identity`` now (in ``app_id``, default: the only app ID)."""
        with self.lock:
            return dict(self.users.get((self._app(app_id), identity), {}))

    def calls(self, identity: str, app_id: str | None = None) -> int:
        """How many accepted writes (single calls or bulk entries) touched ``identity``."""
        with self.lock:
            return self._calls.get((self._app(app_id), identity), 0)

    def _app(self, app_id: str | None) -> str:
        if app_id is not None:
            return app_id
        if len(self.app_ids) != 1:
            raise ValueError("name the app_id: the sandbox accepts several")
        return next(iter(self.app_ids))

    def state(self) -> dict[str, Any]:
        with self.lock:
            users: dict[str, dict[str, Any]] = {}
            for (app_id, identity), properties in self.users.items():
                users.setdefault(app_id, {})[identity] = properties
            return {"users": users, "tracked": self.tracked, "duplicate_count": self.duplicate_count,
                    "property_requests": self.property_requests}

    def inject_reply(self, status: int, body: Any, *, headers: Mapping[str, str] | None = None, count: int = 1,
                     path: str = "") -> None:
        """Answer the next ``count`` requests whose path contains ``path`` with ``status`` and
        ``body`` without processing them."""
        with self.lock:
            self._canned.append([count, path, Reply(status, body, dict(headers or {}))])

    def dispatch(self, request: Request) -> Reply:
        if not request.path.startswith("/__sandbox/"):
            with self.lock:
                for canned in self._canned:
                    if canned[0] > 0 and canned[1] in request.path:
                        canned[0] -= 1
                        if canned[0] == 0:
                            self._canned.remove(canned)
                        reply: Reply = canned[2]
                        return Reply(reply.status, reply.body, dict(reply.headers))
        return super().dispatch(request)

    def clear_faults(self) -> None:
        super().clear_faults()
        with self.lock:
            self._canned.clear()

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self._canned.clear()
            self._clear()

    def error_reply(self, status: int, message: str) -> Reply:
        return _error(status, message)

    # -- add_user_properties ----------------------------------------------------------------

    def _add_user_properties(self, request: Request, match: re.Match[str]) -> Reply:
        body = self._body(request)
        app_id = self._app_id(body)
        if "users" in body:
            users = body["users"]
            if not isinstance(users, list) or not users:
                raise _invalid("users must be a non-empty array")
            if len(users) > MAX_USERS:
                raise _invalid(f"at most {MAX_USERS} users per request, got {len(users)}")
            if not all(isinstance(u, dict) for u in users):
                raise _invalid("every entry of users must be an object")
            single = False
        else:
            users = [body]
            single = True
        checked = [(self._identity(u, f"users[{i}]." if not single else ""),
                    self._properties(u.get("properties"), f"users[{i}]." if not single else "", arrays=False))
                   for i, u in enumerate(users)]
        if single:
            self._limit_single_call(app_id, checked[0][0])
        with self.lock:
            self.property_requests += 1
            for identity, properties in checked:
                self.users.setdefault((app_id, identity), {}).update(properties)
                self._calls[(app_id, identity)] = self._calls.get((app_id, identity), 0) + 1
        return Reply(200, None)

    # -- track ------------------------------------------------------------------------------

    def _track(self, request: Request, match: re.Match[str]) -> Reply:
        body = self._body(request)
        app_id = self._app_id(body)
        if "events" in body:
            events = body["events"]
            if not isinstance(events, list) or not events:
                raise _invalid("events must be a non-empty array")
            if len(events) > MAX_EVENTS:
                raise _invalid(f"at most {MAX_EVENTS} events per request, got {len(events)}")
            if not all(isinstance(e, dict) for e in events):
                raise _invalid("every entry of events must be an object")
            single = False
        else:
            events = [body]
            single = True
        kept: list[dict[str, Any]] = []
        for index, event in enumerate(events):
            where = "" if single else f"events[{index}]."
            name = event.get("event")
            if not isinstance(name, str) or not name or len(name) > MAX_TEXT_LENGTH:
                raise _invalid(f"{where}event is required (a string of at most {MAX_TEXT_LENGTH} characters)")
            has_identity, has_user_id = event.get("identity") is not None, event.get("user_id") is not None
            if has_identity == has_user_id:
                raise _invalid(f"{where}exactly one of identity and user_id is required")
            who = self._identity(event, where) if has_identity else str(event["user_id"])
            timestamp = event.get("timestamp")
            if timestamp is not None and not _is_iso(timestamp):
                raise _invalid(f"{where}timestamp must be ISO 8601")
            kept.append({"app_id": app_id, "event": name, "identity" if has_identity else "user_id": who,
                         "properties": self._properties(event.get("properties"), where, arrays=True),
                         "timestamp": timestamp, "idempotency_key": event.get("idempotency_key")})
        if single:
            self._limit_single_call(app_id, kept[0].get("identity") or kept[0]["user_id"])
        with self.lock:
            for event in kept:
                key = event["idempotency_key"]
                if key is not None:
                    if (app_id, str(key)) in self._idempotency_keys:
                        self.duplicate_count += 1
                        continue
                    self._idempotency_keys.add((app_id, str(key)))
                self.tracked.append(event)
        return Reply(200, None)

    # -- validation -------------------------------------------------------------------------

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(request.raw) if request.raw else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _invalid("the body must be a JSON object")
        return body

    def _app_id(self, body: Mapping[str, Any]) -> str:
        app_id = body.get("app_id")
        if app_id is None or app_id == "" or isinstance(app_id, (bool, dict, list)):
            raise _invalid("app_id is required")
        if str(app_id) not in self.app_ids:
            raise SandboxError(_error(401, "Unauthorized: unknown app_id"))
        return str(app_id)

    @staticmethod
    def _identity(entry: Mapping[str, Any], where: str) -> str:
        identity = entry.get("identity")
        if not isinstance(identity, str) or not identity:
            raise _invalid(f"{where}identity is required (a non-empty string)")
        if len(identity) > MAX_IDENTITY_LENGTH:
            raise _invalid(f"{where}identity is limited to {MAX_IDENTITY_LENGTH} characters")
        return identity

    @staticmethod
    def _properties(properties: Any, where: str, *, arrays: bool) -> dict[str, str | int | float]:
        if properties is None:
            return {}
        if not isinstance(properties, dict):
            raise _invalid(f"{where}properties must be an object")
        kept: dict[str, str | int | float] = {}
        for key, value in properties.items():
            if not key or len(key) >= MAX_TEXT_LENGTH:
                raise _invalid(f"{where}properties: keys must be non-empty and shorter than {MAX_TEXT_LENGTH} "
                               "characters")
            if key.lower() == "id" or key == "user_id":
                raise _invalid(f"{where}properties: {key!r} is a reserved property name")
            if arrays and isinstance(value, list) and all(_scalar(v) for v in value):
                # Heap stores an array as one string, cut rather than refused.
                kept[key] = ARRAY_SEPARATOR.join(str(v) for v in value)[:MAX_TEXT_LENGTH]
                continue
            if not _scalar(value):
                raise _invalid(f"{where}properties.{key}: values must be strings or numbers")
            if isinstance(value, str) and len(value) >= MAX_TEXT_LENGTH:
                raise _invalid(f"{where}properties.{key}: values must be shorter than {MAX_TEXT_LENGTH} characters")
            kept[key] = value
        return kept

    def _limit_single_call(self, app_id: str, identity: str) -> None:
        now = self.clock()
        with self.lock:
            window = self._windows.setdefault((app_id, identity), deque())
            while window and window[0] <= now - SINGLE_CALL_WINDOW_SECONDS:
                window.popleft()
            if len(window) >= SINGLE_CALL_LIMIT:
                wait = max(1, math.ceil(SINGLE_CALL_WINDOW_SECONDS - (now - window[0])))
                raise SandboxError(_error(429, f"rate limit of {SINGLE_CALL_LIMIT} requests per "
                                               f"{SINGLE_CALL_WINDOW_SECONDS:g} s per identity exceeded",
                                          **{"Retry-After": str(wait)}))
            window.append(now)


def _scalar(value: Any) -> bool:
    """A string or a finite number (not a boolean): what Heap stores."""
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int))


def _is_iso(value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


# -- Segments Sync webhooks -----------------------------------------------------------------------

def heap_hash(secret: str, ts_ms: int, body: bytes) -> str:
    """The ``Heap-Hash`` header for ``body`` sent at ``ts_ms`` (milliseconds since the epoch):
    ``ts:<ts_ms>,hmac:<base64 of HMAC-SHA256(secret, str(ts_ms) + body)>``."""
    digest = hmac.new(secret.encode(), str(ts_ms).encode() + body, hashlib.sha256).digest()
    return f"ts:{ts_ms},hmac:{base64.b64encode(digest).decode()}"


class HeapWebhookSender:
    """Heap's side of a Segments Sync integration, posting to ``url`` signed with ``secret``.

    ``id_token`` identifies the customer (a UUID, fixed per sender unless given) and
    ``customer_config`` is the integration's configuration echoed in every payload. Each
    ``send_*`` method returns the receiver's ``(status, body text)``; ``ts`` (milliseconds)
    and ``secret`` override the signing time and key, to send stale or forged requests.
    """

    def __init__(self, url: str, secret: str, *, id_token: str | None = None,
                 customer_config: Mapping[str, Any] | None = None, client: httpx.Client | None = None,
                 clock: Callable[[], float] = time.time, timeout: float = 10.0) -> None:
        self.url = url
        self.secret = secret
        self.id_token = id_token or str(uuid.uuid4())
        self.customer_config: dict[str, Any] = dict(customer_config) if customer_config is not None else {
            "fields": [{"field_id": "identity_mapping", "field_display_name": "Identity",
                        "field_type": "identity_mapping", "value": {"id": "identity", "display_name": "Identity"}}]}
        self.client = client
        self.clock = clock
        self.timeout = timeout

    # -- payloads ---------------------------------------------------------------------------

    def sync_payload(self, segment_id: int, name: str, add: Sequence[str] = (), remove: Sequence[str] = (),
                     page_number: int = 1, total_pages: int = 1, sync_task_id: str = "") -> dict[str, Any]:
        """One ``segment.users.sync`` page. ``add``/``remove`` are left out when empty, as in
        Heap's specification examples."""
        data: dict[str, Any] = {
            "segment": {"id": segment_id, "name": name},
            "sync_info": {"page_number": page_number, "total_pages": total_pages,
                          "sync_task_id": sync_task_id or str(uuid.uuid4())},
        }
        if add:
            data["add"] = [{"id": user} for user in add]
        if remove:
            data["remove"] = [{"id": user} for user in remove]
        return {"id_token": self.id_token, "action_type": "segment.users.sync",
                "customer_config": self.customer_config, "data": data}

    def drain_payload(self, segment_id: int, name: str) -> dict[str, Any]:
        """A ``segment.users.drain`` (the segment's sync was turned off: drop the list)."""
        return {"id_token": self.id_token, "action_type": "segment.users.drain",
                "customer_config": self.customer_config, "data": {"segment": {"id": segment_id, "name": name}}}

    def sync_pages(self, segment_id: int, name: str, add: Sequence[str] = (), remove: Sequence[str] = (),
                   page_size: int = 1000, sync_task_id: str | None = None) -> list[dict[str, Any]]:
        """The pages of one sync task carrying ``add`` and ``remove``: at most ``page_size``
        users a page, additions first; one page (maybe empty) when there is nothing to send."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        task = sync_task_id or str(uuid.uuid4())
        changes = [("add", user) for user in add] + [("remove", user) for user in remove]
        chunks = [changes[i:i + page_size] for i in range(0, len(changes), page_size)] or [[]]
        return [self.sync_payload(segment_id, name, [u for a, u in chunk if a == "add"],
                                  [u for a, u in chunk if a == "remove"], number, len(chunks), task)
                for number, chunk in enumerate(chunks, start=1)]

    # -- sending ----------------------------------------------------------------------------

    def send_sync(self, segment_id: int, name: str, add: Sequence[str] = (), remove: Sequence[str] = (),
                  page_number: int = 1, total_pages: int = 1, sync_task_id: str = "", ts: int | None = None,
                  secret: str | None = None) -> tuple[int, str]:
        """Post one sync page."""
        return self.send_payload(self.sync_payload(segment_id, name, add, remove, page_number, total_pages,
                                                   sync_task_id), ts=ts, secret=secret)

    def send_drain(self, segment_id: int, name: str, ts: int | None = None,
                   secret: str | None = None) -> tuple[int, str]:
        """Post a drain."""
        return self.send_payload(self.drain_payload(segment_id, name), ts=ts, secret=secret)

    def send_pages(self, segment_id: int, name: str, add: Sequence[str] = (), remove: Sequence[str] = (),
                   page_size: int = 1000, sync_task_id: str | None = None) -> list[tuple[int, str]]:
        """Post every page of one sync task, in order."""
        return [self.send_payload(page) for page in self.sync_pages(segment_id, name, add, remove, page_size,
                                                                     sync_task_id)]

    def send_payload(self, payload: Mapping[str, Any], ts: int | None = None,
                     secret: str | None = None) -> tuple[int, str]:
        """Post ``payload`` as compact JSON, signed at ``ts`` (default now) with ``secret``."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        when = int(self.clock() * 1000) if ts is None else ts
        return self.send_raw(body, heap_hash(self.secret if secret is None else secret, when, body))

    def send_raw(self, body: bytes, heap_hash_header: str | None) -> tuple[int, str]:
        """Post ``body`` exactly as given with ``heap_hash_header`` (``None``: no header), to send
        a body other than the one signed."""
        headers = {"Content-Type": "application/json"}
        if heap_hash_header is not None:
            headers["Heap-Hash"] = heap_hash_header
        if self.client is not None:
            response = self.client.post(self.url, content=body, headers=headers, timeout=self.timeout)
        else:
            response = httpx.post(self.url, content=body, headers=headers, timeout=self.timeout)
        return response.status_code, response.text
