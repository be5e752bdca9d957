"""A local Graph API for the Conversions API and customer-list Custom Audiences that
validates requests the way Meta does (``specs/destinations.md`` §1 and §5).

Conversions API (``POST /{version}/{pixel_id}/events``): one invalid event rejects the whole
request with Graph error 100 (HTTP 400) naming the event index, and nothing is recorded.
Accepted events are deduplicated on ``(pixel, event_name, event_id)`` for 48 hours: the first
is kept and later ones only counted (:attr:`MetaSandbox.duplicate_count`), though Meta still
counts them in ``events_received``.

Custom Audiences (``POST``/``DELETE /{version}/{audience_id}/users``, ``POST .../usersreplace``):
structural problems (no payload, a row of the wrong length, more than 10,000 rows, a bad
session) reject the request; a row whose hashed slot is not a SHA-256 hex digest, or whose
slots are all empty, is only counted in ``num_invalid_entries`` (with its index and reason in
``invalid_entry_samples``, never its values). Removal matches a member on any shared key. A
replacement applies when the batch with ``last_batch_flag`` has arrived and every
``batch_seq`` from 1 to it is present; a batch seen twice is taken once. A batch may be empty
(this sandbox's choice; the documentation does not say) so a sender can close a session whose
last batch had nobody left to send.

Tokens travel as ``access_token`` (JSON body, form field or query) or ``Authorization: Bearer``.
A missing token is Graph error 104, an unknown one 190 (``OAuthException``, HTTP 400 with a
``WWW-Authenticate`` header). With ``app_secret`` set, an ``appsecret_proof`` must match it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.sandboxes.base import Reply, Request, Sandbox, SandboxError, json_reply

__all__ = ["AcceptedEvent", "MetaSandbox", "graph_error"]

EVENTS_LIMIT = 1000
ROWS_LIMIT = 10_000
DAY = 86_400
MAX_AGE_SECONDS = 7 * DAY
PHYSICAL_STORE_MAX_AGE_SECONDS = 62 * DAY
DEDUP_WINDOW_SECONDS = 48 * 3600

ACTION_SOURCES = frozenset({"email", "website", "app", "phone_call", "chat", "physical_store", "system_generated",
                            "business_messaging", "other"})
HASHED_KEYS = frozenset({"em", "ph", "fn", "ln", "db", "ge", "ct", "st", "zp", "country"})
NEVER_HASHED_KEYS = frozenset({"client_ip_address", "client_user_agent", "fbc", "fbp"})
PASS_THROUGH_KEYS = frozenset({"external_id", "subscription_id", "fb_login_id", "lead_id", "anon_id", "madid",
                               "page_id", "page_scoped_user_id", "ctwa_clid", "ig_account_id", "ig_sid"})
#: Keys that identify a person on their own; a user agent alone does not.
IDENTIFYING_KEYS = (HASHED_KEYS | NEVER_HASHED_KEYS | PASS_THROUGH_KEYS) - {"client_user_agent"}

SINGLE_KEY_SCHEMAS = {"EMAIL_SHA256": "EMAIL", "PHONE_SHA256": "PHONE", "MOBILE_ADVERTISER_ID": "MADID"}
MULTI_KEY_SCHEMA = frozenset({"EXTERN_ID", "EMAIL", "PHONE", "GEN", "DOBY", "DOBM", "DOBD", "LN", "FN", "FI", "CT",
                              "ST", "ZIP", "MADID", "COUNTRY"})
UNHASHED_COLUMNS = frozenset({"EXTERN_ID", "MADID"})

#: error_subcode of a Conversions API parameter error, as seen in real replies.
SUBCODE_PARAMETER = 2804019
#: Subcodes for event times out of range [unverified: taken from integration reports, not documentation].
SUBCODE_TOO_OLD = 2804003
SUBCODE_IN_FUTURE = 2804004
SUBCODE_UPLOAD_BLOCKED = 1713230

_HASH_RE = re.compile(r"[0-9a-f]{64}")
_LOOKS_HASHED_RE = re.compile(r"[0-9a-fA-F]{32}|[0-9a-fA-F]{64}")
_CURRENCY_RE = re.compile(r"[A-Za-z]{3}")


def graph_error(status: int, code: int, message: str, *, type_: str = "OAuthException", subcode: int | None = None,
                user_title: str = "", user_msg: str = "", is_transient: bool = False,
                headers: dict[str, str] | None = None) -> Reply:
    """A reply carrying the Graph error envelope."""
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    error["is_transient"] = is_transient
    if user_title:
        error["error_user_title"] = user_title
    if user_msg:
        error["error_user_msg"] = user_msg
    error["fbtrace_id"] = _trace_id()
    return Reply(status, {"error": error}, dict(headers or {}))


def _trace_id() -> str:
    return "A" + secrets.token_urlsafe(16)


def _invalid(message: str, *, subcode: int | None = None, title: str = "", index: int | None = None) -> SandboxError:
    """A code-100 rejection of the whole request."""
    user_msg = message if index is None else f"$['data'][{index}]: {message}"
    text = f"Invalid parameter: {user_msg}"
    return SandboxError(graph_error(400, 100, text, subcode=subcode, user_title=title or "Invalid parameter",
                                    user_msg=user_msg))


@dataclass(frozen=True)
class AcceptedEvent:
    """One server event the sandbox kept, with where it was sent."""

    pixel_id: str
    api_version: str
    test_event_code: str | None
    event: dict[str, Any]


@dataclass
class _ReplaceSession:
    batches: dict[int, list[tuple[str, ...]]] = field(default_factory=dict)
    columns: dict[int, tuple[str, ...]] = field(default_factory=dict)
    last_seq: int | None = None
    completed: bool = False


@dataclass
class _Audience:
    #: Member row (as sent) -> its (column, value) pairs with a value.
    members: dict[tuple[str, ...], tuple[tuple[str, str], ...]] = field(default_factory=dict)
    requests: int = 0
    rows_received: int = 0
    sessions: dict[int, _ReplaceSession] = field(default_factory=dict)


class MetaSandbox(Sandbox):
    """The Graph API endpoints the Meta adapters use.

    Accessors: :attr:`accepted_events` (:class:`AcceptedEvent` list), :attr:`duplicate_count`,
    :attr:`events_received`, :meth:`audience_members`, :meth:`audience_requests`,
    :meth:`audience_rows_received`, :meth:`session_completed`; faults beyond the base ones:
    :meth:`inject_error` and :meth:`inject_reply`; :meth:`block_audience` makes an audience
    answer "Audience Upload Blocked" (100/1713230).
    """

    name = "meta"

    def __init__(self, tokens: set[str] | None = None, *, app_secret: str | None = None,
                 future_skew_seconds: float = 600, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.tokens = set(tokens) if tokens is not None else {"sandbox-token"}
        self.app_secret = app_secret
        self.future_skew_seconds = future_skew_seconds
        self.clock = clock
        self._canned: list[list[Any]] = []  # [remaining, path substring, Reply]
        self.blocked_audiences: set[str] = set()
        self._clear()
        self.route("POST", r"/(v\d+\.\d+)/(\d+)/events", self._events)
        self.route("POST", r"/(v\d+\.\d+)/(\d+)/users", lambda r, m: self._audience(r, m, "add"))
        self.route("DELETE", r"/(v\d+\.\d+)/(\d+)/users", lambda r, m: self._audience(r, m, "remove"))
        self.route("POST", r"/(v\d+\.\d+)/(\d+)/usersreplace", lambda r, m: self._audience(r, m, "replace"))

    def _clear(self) -> None:
        self.accepted_events: list[AcceptedEvent] = []
        self.duplicate_count = 0
        self.events_received = 0
        self._first_seen: dict[tuple[str, str, str], float] = {}
        self._audiences: dict[str, _Audience] = {}

    # -- faults and errors -----------------------------------------------------------------

    def error_reply(self, status: int, message: str) -> Reply:
        """Injected failures as Graph reports them: 429 as code 4, 500 as code 1, other 5xx as
        code 2 (both transient), an unknown path as 100/33 with HTTP 400, other 4xx as 100."""
        if status == 429:
            return graph_error(429, 4, "(#4) Application request limit reached", is_transient=True)
        if status >= 500:
            code = 1 if status == 500 else 2
            text = "An unknown error occurred" if code == 1 else \
                "An unexpected error has occurred. Please retry your request later."
            return graph_error(status, code, f"{text} ({message})", is_transient=True)
        if status == 404:
            return graph_error(400, 100, f"Unsupported request: {message}", type_="GraphMethodException", subcode=33)
        return graph_error(status, 100, message)

    def inject_reply(self, status: int, body: Any, *, headers: dict[str, str] | None = None, count: int = 1,
                     path: str = "") -> None:
        """Answer the next ``count`` requests whose path contains ``path`` with ``body`` and
        ``status`` without processing them."""
        with self.lock:
            self._canned.append([count, path, Reply(status, body, dict(headers or {}))])

    def inject_error(self, code: int, *, subcode: int | None = None, status: int = 400, message: str = "",
                     is_transient: bool = False, headers: dict[str, str] | None = None, count: int = 1,
                     path: str = "") -> None:
        """Answer the next ``count`` matching requests with Graph error ``code``."""
        reply = graph_error(status, code, message or f"(#{code}) injected error", subcode=subcode,
                            is_transient=is_transient)
        self.inject_reply(status, reply.body, headers=headers, count=count, path=path)

    def block_audience(self, audience_id: str) -> None:
        with self.lock:
            self.blocked_audiences.add(audience_id)

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

    # -- state -----------------------------------------------------------------------------

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self._canned.clear()
            self.blocked_audiences.clear()
            self._clear()

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "events": [asdict(e) for e in self.accepted_events],
                "events_received": self.events_received,
                "duplicate_count": self.duplicate_count,
                "audiences": {audience_id: {"members": sorted(list(row) for row in audience.members),
                                            "requests": audience.requests, "rows_received": audience.rows_received,
                                            "completed_sessions": sorted(sid for sid, s in audience.sessions.items()
                                                                         if s.completed)}
                              for audience_id, audience in self._audiences.items()},
            }

    def audience_members(self, audience_id: str) -> set[tuple[str, ...]]:
        """The rows currently in the audience, as sent (aligned to the schema they came with)."""
        with self.lock:
            audience = self._audiences.get(audience_id)
            return set(audience.members) if audience else set()

    def audience_requests(self, audience_id: str) -> int:
        with self.lock:
            audience = self._audiences.get(audience_id)
            return audience.requests if audience else 0

    def audience_rows_received(self, audience_id: str) -> int:
        with self.lock:
            audience = self._audiences.get(audience_id)
            return audience.rows_received if audience else 0

    def session_completed(self, audience_id: str, session_id: int) -> bool:
        with self.lock:
            audience = self._audiences.get(audience_id)
            session = audience.sessions.get(session_id) if audience else None
            return bool(session and session.completed)

    # -- requests --------------------------------------------------------------------------

    @staticmethod
    def _params(request: Request) -> dict[str, Any]:
        """Query, form and JSON parameters merged (the body wins); form values holding JSON
        (``data``, ``payload``, ``session``) decoded as Graph does."""
        params: dict[str, Any] = {**request.query, **request.form}
        for key, value in list(params.items()):
            if isinstance(value, str) and value[:1] in ("[", "{"):
                with contextlib.suppress(ValueError):
                    params[key] = json.loads(value)
        if isinstance(request.json, dict):
            params.update(request.json)
        return params

    def _authenticate(self, params: dict[str, Any], request: Request) -> None:
        token = params.get("access_token")
        if not token:
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            token = value.strip() if scheme.lower() in ("bearer", "oauth") else ""
        if not token:
            raise SandboxError(graph_error(400, 104, "An access token is required to request this resource."))
        if token not in self.tokens:
            raise SandboxError(graph_error(
                400, 190, "Invalid OAuth access token - Cannot parse access token",
                headers={"WWW-Authenticate": 'OAuth "Facebook Platform" "invalid_token" "Invalid OAuth access token"'}))
        if self.app_secret:
            proof = params.get("appsecret_proof")
            expected = hmac.new(self.app_secret.encode(), str(token).encode(), hashlib.sha256).hexdigest()
            if proof is not None and not hmac.compare_digest(str(proof), expected):
                raise SandboxError(graph_error(400, 100, "Invalid appsecret_proof provided in the API argument",
                                               type_="GraphMethodException"))

    # -- Conversions API -------------------------------------------------------------------

    def _events(self, request: Request, match: re.Match[str]) -> Reply:
        version, pixel_id = match.groups()
        params = self._params(request)
        self._authenticate(params, request)
        data = params.get("data")
        if not isinstance(data, list) or not data:
            raise _invalid("The parameter data is required and must be a non-empty array")
        if len(data) > EVENTS_LIMIT:
            raise _invalid(f"The parameter data holds {len(data)} events; at most {EVENTS_LIMIT} are allowed")
        test_event_code = params.get("test_event_code")
        if test_event_code is not None and not isinstance(test_event_code, str):
            raise _invalid("The parameter test_event_code must be a string")
        now = self.clock()
        for index, event in enumerate(data):
            _check_event(event, index, now, self.future_skew_seconds)
        with self.lock:
            self.events_received += len(data)
            for event in data:
                event_id = event.get("event_id")
                if event_id not in (None, ""):
                    key = (pixel_id, event["event_name"], str(event_id))
                    first = self._first_seen.get(key)
                    if first is not None and now - first < DEDUP_WINDOW_SECONDS:
                        self.duplicate_count += 1
                        continue
                    self._first_seen[key] = now
                self.accepted_events.append(AcceptedEvent(pixel_id, version, test_event_code or None, event))
        return json_reply(200, {"events_received": len(data), "messages": [], "fbtrace_id": _trace_id()})

    # -- Custom Audiences ------------------------------------------------------------------

    def _audience(self, request: Request, match: re.Match[str], mode: str) -> Reply:
        _version, audience_id = match.groups()
        params = self._params(request)
        self._authenticate(params, request)
        if audience_id in self.blocked_audiences:
            raise SandboxError(graph_error(400, 100, "Audience Upload Blocked", subcode=SUBCODE_UPLOAD_BLOCKED,
                                           user_title="Audience Upload Blocked",
                                           user_msg="This audience cannot be updated (operation_status 471)."))
        payload = params.get("payload")
        if not isinstance(payload, dict):
            raise _invalid("The parameter payload is required")
        columns = _schema_columns(payload.get("schema"))
        data = payload.get("data")
        if not isinstance(data, list):
            raise _invalid("payload.data must be an array")
        if len(data) > ROWS_LIMIT:
            raise _invalid(f"payload.data holds {len(data)} rows; at most {ROWS_LIMIT} are allowed")
        session = _session(params.get("session"), required=mode == "replace")
        if not data and session is None:
            raise _invalid("payload.data must not be empty")
        rows = [_row(raw, len(columns), n) for n, raw in enumerate(data)]
        valid: list[tuple[str, ...]] = []
        samples: dict[str, str] = {}
        for n, row in enumerate(rows):
            problem = _row_problem(row, columns)
            if problem:
                if len(samples) < 10:
                    samples[str(n)] = problem
            else:
                valid.append(row)
        with self.lock:
            audience = self._audiences.setdefault(audience_id, _Audience())
            if mode == "replace":
                assert session is not None
                self._replace(audience, session, columns, valid)
            audience.requests += 1
            audience.rows_received += len(rows)
            if mode == "add":
                for row in valid:
                    audience.members[row] = _pairs(columns, row)
            elif mode == "remove":
                _remove(audience, columns, valid)
        body: dict[str, Any] = {"audience_id": audience_id,
                                "session_id": session["session_id"] if session else secrets.randbits(62),
                                "num_received": len(rows), "num_invalid_entries": len(rows) - len(valid),
                                "invalid_entry_samples": samples}
        return json_reply(200, body)

    @staticmethod
    def _replace(audience: _Audience, session: dict[str, Any], columns: tuple[str, ...],
                 rows: list[tuple[str, ...]]) -> None:
        """Record one batch of a replacement; apply the replacement once every batch is in.
        Raises before changing anything when the batch contradicts the session."""
        session_id, seq, last = session["session_id"], session["batch_seq"], session["last_batch_flag"]
        state = audience.sessions.get(session_id) or _ReplaceSession()
        if seq in state.batches:
            return  # a resent batch: taken once
        if state.completed:
            raise _invalid(f"replace session {session_id} has already finished")
        if state.last_seq is not None and seq > state.last_seq:
            raise _invalid(f"batch_seq {seq} comes after the last batch ({state.last_seq}) of session {session_id}")
        if last and state.batches and max(state.batches) > seq:
            raise _invalid(f"batch_seq {seq} is flagged last but batch {max(state.batches)} was already sent")
        audience.sessions[session_id] = state
        state.batches[seq] = rows
        state.columns[seq] = columns
        if last:
            state.last_seq = seq
        if state.last_seq is not None and all(n in state.batches for n in range(1, state.last_seq + 1)):
            audience.members = {row: _pairs(state.columns[n], row) for n in range(1, state.last_seq + 1)
                                for row in state.batches[n]}
            state.completed = True


def _check_event(event: Any, index: int, now: float, future_skew: float) -> None:
    """Raise the whole-request rejection for the first problem of ``event``."""
    if not isinstance(event, dict):
        raise _invalid("each event must be an object", index=index)

    def bad(message: str, *, subcode: int = SUBCODE_PARAMETER, title: str = "Server-side API parameter error") -> \
            SandboxError:
        return _invalid(message, subcode=subcode, title=title, index=index)

    name = event.get("event_name")
    if not isinstance(name, str) or not name.strip():
        raise bad("['event_name'] is required")
    event_time = event.get("event_time")
    if type(event_time) is not int:
        raise bad("['event_time'] is required and must be an integer of Unix seconds")
    source = event.get("action_source")
    if source not in ACTION_SOURCES:
        raise bad(f"['action_source'] must be one of {', '.join(sorted(ACTION_SOURCES))}")
    limit = PHYSICAL_STORE_MAX_AGE_SECONDS if source == "physical_store" else MAX_AGE_SECONDS
    if now - event_time > limit:
        raise bad(f"['event_time'] is more than {limit // DAY} days in the past", subcode=SUBCODE_TOO_OLD,
                  title="Event Timestamp Too Old")
    if event_time - now > future_skew:
        raise bad("['event_time'] is in the future", subcode=SUBCODE_IN_FUTURE, title="Event Timestamp In Future")
    event_id = event.get("event_id")
    if event_id is not None and not isinstance(event_id, (str, int)):
        raise bad("['event_id'] must be a string")
    user_data = event.get("user_data")
    if not isinstance(user_data, dict) or not user_data:
        raise bad("['user_data'] is required")
    for key, value in user_data.items():
        problem = _user_data_problem(key, value)
        if problem:
            raise bad(f"['user_data']['{key}'] {problem}")
    if not any(user_data.get(key) not in (None, "", []) for key in IDENTIFYING_KEYS):
        raise bad("['user_data'] must contain at least one customer information parameter")
    if source == "website":
        url = event.get("event_source_url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise bad("['event_source_url'] is required for website events")
        if not user_data.get("client_user_agent"):
            raise bad("['user_data']['client_user_agent'] is required for website events")
    custom_data = event.get("custom_data")
    if custom_data is not None and not isinstance(custom_data, dict):
        raise bad("['custom_data'] must be an object")
    custom = custom_data or {}
    if "value" in custom and not _is_number(custom["value"]):
        raise bad("['custom_data']['value'] must be a number")
    currency = custom.get("currency")
    if "currency" in custom and not (isinstance(currency, str) and _CURRENCY_RE.fullmatch(currency)):
        raise bad("['custom_data']['currency'] must be a 3-letter ISO 4217 code")
    if name == "Purchase" and not ("value" in custom and "currency" in custom):
        raise bad("['custom_data'] needs value and currency for Purchase events")
    options = event.get("data_processing_options")
    if options is not None and (not isinstance(options, list) or any(o != "LDU" for o in options)):
        raise bad("['data_processing_options'] must be [] or ['LDU']")
    for key in ("data_processing_options_country", "data_processing_options_state"):
        if key in event and type(event[key]) is not int:
            raise bad(f"['{key}'] must be an integer")
    if "opt_out" in event and not isinstance(event["opt_out"], bool):
        raise bad("['opt_out'] must be a boolean")


def _user_data_problem(key: str, value: Any) -> str:
    if key in HASHED_KEYS:
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) and _HASH_RE.fullmatch(v) for v in values):
            return "must be SHA-256 hashed (64 lower-case hex characters)"
        return ""
    if key in NEVER_HASHED_KEYS:
        if not isinstance(value, str) or not value.strip():
            return "must be a non-empty string"
        if _LOOKS_HASHED_RE.fullmatch(value):
            return "must not be hashed"
        if key == "client_ip_address":
            try:
                ipaddress.ip_address(value)
            except ValueError:
                return "is not a valid IPv4 or IPv6 address"
        return ""
    if key in PASS_THROUGH_KEYS:
        values = value if isinstance(value, list) else [value]
        return "" if all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values) \
            else "must be a string or a list of strings"
    return ""  # Meta ignores keys it does not know


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def _schema_columns(schema: Any) -> tuple[str, ...]:
    if isinstance(schema, str):
        if schema in SINGLE_KEY_SCHEMAS:
            return (SINGLE_KEY_SCHEMAS[schema],)
        if schema in MULTI_KEY_SCHEMA:
            return (schema,)
        raise _invalid(f"payload.schema {schema!r} is not a supported schema")
    if isinstance(schema, list) and schema and all(isinstance(c, str) for c in schema):
        unknown = [c for c in schema if c not in MULTI_KEY_SCHEMA]
        if unknown:
            raise _invalid(f"payload.schema has unknown keys {unknown}")
        if len(set(schema)) != len(schema):
            raise _invalid("payload.schema repeats a key")
        return tuple(schema)
    raise _invalid("The parameter payload.schema is required")


def _row(raw: Any, width: int, n: int) -> tuple[str, ...]:
    if width == 1 and isinstance(raw, str):
        return (raw,)
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise _invalid(f"payload.data[{n}] must be an array of strings")
    if len(raw) != width:
        raise _invalid(f"payload.data[{n}] has {len(raw)} values but the schema has {width} keys")
    return tuple(raw)


def _row_problem(row: tuple[str, ...], columns: tuple[str, ...]) -> str:
    if not any(row):
        return "no value in any key"
    for column, value in zip(columns, row, strict=True):
        if value and column not in UNHASHED_COLUMNS and not _HASH_RE.fullmatch(value):
            return f"{column} is not a SHA-256 hex digest"
    return ""


def _session(raw: Any, *, required: bool) -> dict[str, Any] | None:
    if raw is None:
        if required:
            raise _invalid("The parameter session is required for usersreplace")
        return None
    if not isinstance(raw, dict):
        raise _invalid("session must be an object")

    def integer(key: str, minimum: int, optional: bool = False) -> None:
        value = raw.get(key)
        if value is None and optional:
            return
        if type(value) is not int or value < minimum:
            raise _invalid(f"session.{key} must be an integer >= {minimum}")

    integer("session_id", 1)
    integer("batch_seq", 1)
    integer("estimated_num_total", 0, optional=True)
    if not isinstance(raw.get("last_batch_flag"), bool):
        raise _invalid("session.last_batch_flag must be a boolean")
    return raw


def _pairs(columns: tuple[str, ...], row: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((c, v) for c, v in zip(columns, row, strict=True) if v)


def _remove(audience: _Audience, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Remove every member sharing a key with one of ``rows`` (Meta matches each row to people)."""
    keys = {pair for row in rows for pair in _pairs(columns, row)}
    audience.members = {row: pairs for row, pairs in audience.members.items() if not keys.intersection(pairs)}
