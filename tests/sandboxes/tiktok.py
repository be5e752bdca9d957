"""A local TikTok API for Business: the Events API 2.0 (``/event/track/``) and the Segment
API's audience mapping (``/segment/mapping/``), validated the way TikTok does
(``specs/destinations.md`` §3, §5).

TikTok answers HTTP 200 with ``{"code", "message", "request_id", "data"}`` for its own
verdicts, ``code`` 0 meaning success; a bad or missing ``Access-Token`` is code 40105 /
40104, a parameter error 40002. One bad event refuses the whole batch, with a message that
names the event's index, and nothing of it is recorded. Accepted events are deduplicated
on (event source ID, event, event_id) within 48 hours: the first is kept, later ones are
counted in :attr:`TikTokSandbox.duplicate_count`.

Besides the base class's HTTP faults, :meth:`TikTokSandbox.reject` makes the next requests
fail with a TikTok body code and HTTP 200 (rate limit 40100, internal error 50000 ...), the
way TikTok reports most trouble.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.sandboxes.base import Reply, Request, Sandbox, SandboxError, is_hash, json_reply

__all__ = ["TikTokSandbox"]

MAX_EVENTS = 1000
#: The Segment API documents no row limit; this bound keeps the sandbox honest about size.
MAX_MAPPING_ROWS = 10_000
DEDUP_WINDOW_SECONDS = 48 * 3600
OFFLINE_MAX_AGE_SECONDS = 28 * 24 * 3600
FUTURE_TOLERANCE_SECONDS = 10 * 60
EVENT_SOURCES = frozenset({"web", "app", "offline", "crm"})
ID_SCHEMAS = frozenset({"EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "IDFA_MD5", "GAID_SHA256", "GAID_MD5"})

CODE_OK = 0
CODE_NO_PERMISSION = 40001
CODE_PARAMETER = 40002
CODE_RATE_LIMITED = 40100
CODE_TOKEN_EMPTY = 40104
CODE_TOKEN_INVALID = 40105
CODE_INTERNAL = 50000
CODE_BUSY = 50002

_HASHED_USER_FIELDS = ("email", "phone", "external_id")
_PLAIN_USER_FIELDS = ("ip", "user_agent", "ttclid", "ttp", "locale")
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
_MD5_RE = re.compile(r"[0-9a-f]{32}")


@dataclass
class _Rejection:
    remaining: int
    code: int
    message: str
    path: str


def _request_id() -> str:
    return time.strftime("%Y%m%d%H%M%S") + uuid.uuid4().hex[:18].upper()


def _envelope(code: int, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "request_id": _request_id(), "data": {}}


def _invalid(message: str) -> SandboxError:
    return SandboxError(json_reply(200, _envelope(CODE_PARAMETER, message)))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TikTokSandbox(Sandbox):
    """TikTok's Events API and Segment mapping API on loopback.

    ``tokens`` are the access tokens accepted (default ``{"sandbox-token"}``); ``clock``
    gives the current Unix time (tests move it to cross the dedup window).
    """

    name = "tiktok"

    def __init__(self, tokens: set[str] | None = None, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.tokens = set(tokens) if tokens is not None else {"sandbox-token"}
        self.clock = clock
        #: Every event accepted and kept, in order, with the request's ``event_source``,
        #: ``event_source_id`` and ``test_event_code`` added.
        self.accepted_events: list[dict[str, Any]] = []
        #: Events accepted but dropped as duplicates of one seen within 48 hours.
        self.duplicate_count = 0
        self.event_requests = 0
        self.mapping_requests = 0
        self.mapping_rows = 0
        self._first_seen: dict[tuple[str, str, str], float] = {}
        self._members: dict[str, set[tuple[str, str]]] = {}
        self._rejections: list[_Rejection] = []
        self.route("POST", r"/open_api/v[0-9.]+/event/track/", self._track)
        self.route("POST", r"/open_api/v[0-9.]+/segment/mapping/", self._mapping)

    # -- accessors --------------------------------------------------------------------------

    def audience_members(self, audience_id: str) -> set[tuple[str, str]]:
        """The (id schema, hash) pairs in ``audience_id`` now."""
        with self.lock:
            return set(self._members.get(audience_id, ()))

    def reject(self, count: int, code: int, message: str = "", path: str = "") -> None:
        """Answer the next ``count`` API requests whose path contains ``path`` with HTTP 200
        and TikTok body ``code`` (nothing is processed)."""
        with self.lock:
            self._rejections.append(_Rejection(count, code, message or f"injected error {code}", path))

    def state(self) -> dict[str, Any]:
        with self.lock:
            by_event: dict[str, int] = {}
            for event in self.accepted_events:
                by_event[event["event"]] = by_event.get(event["event"], 0) + 1
            return {"accepted_events": len(self.accepted_events), "events_by_name": by_event,
                    "duplicates": self.duplicate_count, "event_requests": self.event_requests,
                    "mapping_requests": self.mapping_requests, "mapping_rows": self.mapping_rows,
                    "audiences": {a: len(m) for a, m in self._members.items()}}

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self.accepted_events.clear()
            self.duplicate_count = 0
            self.event_requests = self.mapping_requests = self.mapping_rows = 0
            self._first_seen.clear()
            self._members.clear()
            self._rejections.clear()

    def error_reply(self, status: int, message: str) -> Reply:
        if status == 429:
            code = CODE_RATE_LIMITED
        elif status == 504:
            code = CODE_BUSY
        elif status >= 500:
            code = CODE_INTERNAL
        elif status in (401, 403):
            code = CODE_TOKEN_INVALID if status == 401 else CODE_NO_PERMISSION
        else:
            code = 40000
        return json_reply(status, _envelope(code, message))

    # -- shared checks ----------------------------------------------------------------------

    def _authorise(self, request: Request) -> None:
        token = request.headers.get("access-token", "")
        if not token:
            raise SandboxError(json_reply(200, _envelope(CODE_TOKEN_EMPTY, "Access token is null")))
        if token not in self.tokens:
            raise SandboxError(json_reply(200, _envelope(CODE_TOKEN_INVALID,
                                                         "Access token is incorrect or has been revoked.")))

    def _injected(self, path: str) -> None:
        with self.lock:
            for rejection in self._rejections:
                if rejection.remaining > 0 and rejection.path in path:
                    rejection.remaining -= 1
                    if rejection.remaining == 0:
                        self._rejections.remove(rejection)
                    raise SandboxError(json_reply(200, _envelope(rejection.code, rejection.message)))

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        if not isinstance(request.json, dict):
            raise _invalid("The request body must be a JSON object (Content-Type: application/json).")
        return request.json

    # -- Events API -------------------------------------------------------------------------

    def _track(self, request: Request, _match: re.Match[str]) -> Reply:
        self._authorise(request)
        self._injected(request.path)
        body = self._body(request)
        source = body.get("event_source")
        if source not in EVENT_SOURCES:
            raise _invalid(f"event_source: must be one of {', '.join(sorted(EVENT_SOURCES))}.")
        source_id = body.get("event_source_id")
        if not isinstance(source_id, str) or not source_id:
            raise _invalid("event_source_id: required string (pixel code or event set ID).")
        test_code = body.get("test_event_code")
        if test_code is not None and not isinstance(test_code, str):
            raise _invalid("test_event_code: must be a string.")
        data = body.get("data")
        if not isinstance(data, list) or not data:
            raise _invalid("data: required non-empty array of events.")
        if len(data) > MAX_EVENTS:
            raise _invalid(f"data: at most {MAX_EVENTS} events per request, got {len(data)}.")
        now = self.clock()
        oldest = now - OFFLINE_MAX_AGE_SECONDS if source == "offline" else None
        for index, event in enumerate(data):
            problem = _event_problem(event, now, oldest)
            if problem:
                raise _invalid(f"data[{index}].{problem}")
        with self.lock:
            self.event_requests += 1
            for event in data:
                key = (source_id, event["event"], event["event_id"])
                first = self._first_seen.get(key)
                if first is not None and now - first < DEDUP_WINDOW_SECONDS:
                    self.duplicate_count += 1
                    continue
                self._first_seen[key] = now
                self.accepted_events.append({**event, "event_source": source, "event_source_id": source_id,
                                             "test_event_code": test_code})
        return json_reply(200, _envelope(CODE_OK, "OK"))

    # -- Segment API ------------------------------------------------------------------------

    def _mapping(self, request: Request, _match: re.Match[str]) -> Reply:
        self._authorise(request)
        self._injected(request.path)
        body = self._body(request)
        advertisers = body.get("advertiser_ids")
        if not isinstance(advertisers, list) or not advertisers or not all(
                isinstance(a, str) and a for a in advertisers):
            raise _invalid("advertiser_ids: required non-empty array of strings.")
        action = body.get("action")
        if action not in ("add", "delete"):
            raise _invalid("action: must be add or delete.")
        schema = body.get("id_schema")
        if (not isinstance(schema, list) or not schema or len(set(schema)) != len(schema)
                or not all(s in ID_SCHEMAS for s in schema)):
            raise _invalid(f"id_schema: required array of distinct values from {', '.join(sorted(ID_SCHEMAS))}.")
        rows = body.get("batch_data")
        if not isinstance(rows, list) or not rows:
            raise _invalid("batch_data: required non-empty array of rows.")
        if len(rows) > MAX_MAPPING_ROWS:
            raise _invalid(f"batch_data: at most {MAX_MAPPING_ROWS} rows per request, got {len(rows)}.")
        changes: list[tuple[str, str, str]] = []
        for index, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(schema):
                raise _invalid(f"batch_data[{index}]: must be an array with one entry per id_schema item "
                               f"({len(schema)}).")
            filled = 0
            for slot, (kind, entry) in enumerate(zip(schema, row, strict=True)):
                where = f"batch_data[{index}][{slot}]"
                if not isinstance(entry, dict):
                    raise _invalid(f"{where}: must be an object ({{}} when the identifier is absent).")
                if not entry:
                    continue
                identifier = entry.get("id")
                hashed = is_hash(identifier) if kind.endswith("SHA256") else (
                    isinstance(identifier, str) and _MD5_RE.fullmatch(identifier) is not None)
                if not hashed:
                    raise _invalid(f"{where}.id: must be a lower-case {kind.rsplit('_', 1)[1]} hex digest.")
                audience_ids = entry.get("audience_ids")
                if not isinstance(audience_ids, list) or not audience_ids or not all(
                        isinstance(a, str) and a for a in audience_ids):
                    raise _invalid(f"{where}.audience_ids: required non-empty array of strings.")
                changes.extend((a, kind, str(identifier)) for a in audience_ids)
                filled += 1
            if not filled:
                raise _invalid(f"batch_data[{index}]: has no identifier.")
        with self.lock:
            self.mapping_requests += 1
            self.mapping_rows += len(rows)
            for audience_id, kind, identifier in changes:
                members = self._members.setdefault(audience_id, set())
                if action == "add":
                    members.add((kind, identifier))
                else:
                    members.discard((kind, identifier))
        return json_reply(200, _envelope(CODE_OK, "OK"))


def _event_problem(event: Any, now: float, oldest: float | None) -> str:
    """What is wrong with one Events API event ("" when nothing), as ``field: reason``."""
    if not isinstance(event, dict):
        return "event object expected."
    name = event.get("event")
    if not isinstance(name, str) or not name:
        return "event: required string."
    event_time = event.get("event_time")
    if not isinstance(event_time, int) or isinstance(event_time, bool):
        return "event_time: required integer Unix timestamp in seconds."
    if event_time > now + FUTURE_TOLERANCE_SECONDS:
        return "event_time: is in the future (Unix seconds expected, not milliseconds)."
    if oldest is not None and event_time < oldest:
        return "event_time: offline events must have occurred within the last 28 days."
    event_id = event.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        return "event_id: required string."
    user = event.get("user")
    if not isinstance(user, dict) or not user:
        return "user: required object with at least one identifier."
    for field in _HASHED_USER_FIELDS:
        if field in user:
            values = user[field]
            values = values if isinstance(values, list) else [values]
            for i, value in enumerate(values):
                if not is_hash(value):
                    return f"user.{field}[{i}]: must be a lower-case SHA-256 hex digest."
    for field in _PLAIN_USER_FIELDS:
        if field in user:
            value = user[field]
            if not isinstance(value, str) or not value:
                return f"user.{field}: must be a non-empty string."
            if is_hash(value.lower()):
                return f"user.{field}: must not be hashed."
    properties = event.get("properties", {})
    if not isinstance(properties, dict):
        return "properties: must be an object."
    if "value" in properties and not _number(properties["value"]):
        return "properties.value: must be a number."
    if "currency" in properties and not (isinstance(properties["currency"], str)
                                         and _CURRENCY_RE.fullmatch(properties["currency"])):
        return "properties.currency: must be an ISO 4217 code such as USD."
    contents = properties.get("contents", [])
    if not isinstance(contents, list):
        return "properties.contents: must be an array."
    for i, content in enumerate(contents):
        if not isinstance(content, dict):
            return f"properties.contents[{i}]: must be an object."
        if "price" in content and not _number(content["price"]):
            return f"properties.contents[{i}].price: must be a number."
        quantity = content.get("quantity")
        if quantity is not None and (not isinstance(quantity, int) or isinstance(quantity, bool)):
            return f"properties.contents[{i}].quantity: must be an integer."
    page = event.get("page", {})
    if not isinstance(page, dict) or not all(isinstance(page.get(k, ""), str) for k in ("url", "referrer")):
        return "page: must be an object with string url and referrer."
    if "limited_data_use" in event and not isinstance(event["limited_data_use"], bool):
        return "limited_data_use: must be a boolean."
    return ""
