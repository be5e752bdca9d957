"""Heap: computed traits written back as user properties (``HEAP_TRAITS``,
``specs/sources-and-consent.md`` §3.1).

Each batch is one bulk ``POST {host}/api/add_user_properties`` with the environment's
``app_id`` (Heap's only credential for its server-side APIs) and up to 1,000 users::

    {"app_id": "...", "users": [{"identity": "...", "properties": {...}}]}

The host is ``https://heapanalytics.com``, or ``https://c.eu.heap-api.com`` for a project in
Heap's EU data centre (setting ``eu_host: true``); a ``host`` setting overrides both.

Heap stores only strings and numbers, each under 1,024 characters, and overwrites a property
with every write. Values are therefore converted before sending (:func:`heap_value`):

* strings and finite numbers pass through; a string of 1,024 characters or more is cut to
  1,023;
* booleans become ``"true"`` / ``"false"`` (Heap has no boolean type);
* lists become Heap's array form, the items joined with ``||`` (``"a||b"``), cut to 1,023;
* ``None`` and every key in ``unset`` become ``""``: Heap cannot delete a user property, so
  an empty string is the closest to "no value" (a segment on "is not set" will not match it;
  use "is empty" or "is not equal to" in Heap);
* other values (mappings, NaN) cannot be represented and the key is left out.

Keys Heap reserves (any casing of ``id`` and of ``user_id``), empty keys and keys of 1,024
characters or more are left out as well. A record that keeps at least one property is sent
and, once Heap accepts it, SUCCEEDED with a note naming what was left out (status reason
``PROPERTIES_DROPPED``); a record left with nothing is PERMANENT ``NO_PROPERTIES``.

Identities are case-sensitive, at most 255 characters, and must not be a generic value
(``undefined``, ``null``, ``user``, in any casing or quoted): Heap merges every write to
such an identity into one user, irreversibly. Those records are PERMANENT ``INVALID_IDENTITY`` without being sent.

Heap refuses a bulk request as a whole: 200 is success for every user; 400 is PERMANENT
``INVALID_REQUEST``; 401 and 403 are PERMANENT ``INVALID_APP_ID``; 429 is THROTTLED (with
``Retry-After`` when Heap gives one); 408, 5xx and transport failures are RETRYABLE.
Credentials: the app ID as ``app_id`` or ``token``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import httpx

from audiences.destinations.base import (
    PERMANENT,
    RETRYABLE,
    SUCCEEDED,
    AudienceChange,
    BatchResult,
    Conversion,
    DestinationContext,
    HttpReply,
    RecordOutcome,
    ReplaceSession,
    TraitUpdate,
    call,
    excerpt,
    redact,
    transport_outcome,
)

__all__ = [
    "BATCH_LIMIT",
    "EU_HOST",
    "MAX_IDENTITY_LENGTH",
    "MAX_VALUE_LENGTH",
    "US_HOST",
    "HeapTraitsAdapter",
    "classify_reply",
    "heap_value",
    "identity_problem",
]

US_HOST = "https://heapanalytics.com"
EU_HOST = "https://c.eu.heap-api.com"
#: Users per bulk ``add_user_properties`` request.
BATCH_LIMIT = 1000
MAX_IDENTITY_LENGTH = 255
#: Longest key or string value Heap takes ("fewer than 1024 characters").
MAX_VALUE_LENGTH = 1023
ARRAY_SEPARATOR = "||"

_GENERIC_IDENTITIES = frozenset({"undefined", "null", "user"})
_RESERVED_KEYS = frozenset({"id", "user_id"})
#: What :func:`heap_value` returns for a value Heap cannot hold.
_UNREPRESENTABLE = object()


def identity_problem(identity: str) -> str | None:
    """Why Heap must not be sent ``identity`` (``None`` when it may)."""
    if not identity.strip():
        return "the identity is empty"
    if len(identity) > MAX_IDENTITY_LENGTH:
        return f"the identity is {len(identity)} characters long; Heap takes at most {MAX_IDENTITY_LENGTH}"
    if identity.strip().strip("'\"").strip().lower() in _GENERIC_IDENTITIES:
        return "the identity is a generic placeholder (Heap would merge unrelated people into one user)"
    return None


def heap_value(value: Any) -> str | int | float | None:
    """``value`` as Heap stores it (see the module docstring), or ``None`` when it cannot be
    represented. ``None`` itself becomes ``""``."""
    converted = _convert(value)
    return None if converted is _UNREPRESENTABLE else cast("str | int | float", converted)


def _convert(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _UNREPRESENTABLE
    if isinstance(value, str):
        return value[:MAX_VALUE_LENGTH]
    if isinstance(value, (list, tuple)):
        items = [_item_text(v) for v in value]
        if any(i is None for i in items):
            return _UNREPRESENTABLE
        return ARRAY_SEPARATOR.join(i for i in items if i is not None)[:MAX_VALUE_LENGTH]
    return _UNREPRESENTABLE


def _item_text(value: Any) -> str | None:
    """One array item as text (``None`` when it is not a scalar)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def _host(destination: DestinationContext) -> str:
    override = destination.setting("host")
    if override:
        return str(override).strip().rstrip("/")
    return EU_HOST if destination.setting("eu_host") is True else US_HOST


class HeapTraitsAdapter:
    """``HEAP_TRAITS``: user properties through bulk ``add_user_properties``."""

    kind = "HEAP_TRAITS"
    batch_limit = BATCH_LIMIT

    def platform_event(self, event: str, settings: Mapping[str, Any]) -> str | None:
        return None

    def max_age_seconds(self, settings: Mapping[str, Any], action_source: str) -> int | None:
        return None

    def send_conversions(self, client: httpx.Client, destination: DestinationContext,
                         records: Sequence[Conversion]) -> BatchResult:
        return _unsupported(records, f"{self.kind} writes user properties, not conversions")

    def send_audience(self, client: httpx.Client, destination: DestinationContext, action: str,
                      records: Sequence[AudienceChange], session: ReplaceSession | None = None) -> BatchResult:
        return _unsupported(records, f"{self.kind} writes user properties, not audience membership")

    def send_traits(self, client: httpx.Client, destination: DestinationContext,
                    records: Sequence[TraitUpdate]) -> BatchResult:
        """Send every record that keeps a property in one bulk request; the others get their own
        outcome and stay out of it.

        Raises :class:`ValueError` for more than :attr:`batch_limit` records.
        """
        if len(records) > self.batch_limit:
            raise ValueError(f"at most {self.batch_limit} users per request, got {len(records)}")
        app_id = destination.secret("app_id", "token")
        if not app_id:
            problem = RecordOutcome(PERMANENT, "", "the credentials hold no app_id", "INVALID_APP_ID")
            return BatchResult({r.delivery_id: problem for r in records}, requests=0)

        outcomes: dict[int, RecordOutcome] = {}
        notes: dict[int, str] = {}
        users: list[dict[str, Any]] = []
        sent: list[int] = []
        for record in records:
            built = _user(record)
            if isinstance(built, RecordOutcome):
                outcomes[record.delivery_id] = built
                continue
            user, note = built
            users.append(user)
            sent.append(record.delivery_id)
            if note:
                notes[record.delivery_id] = note
        if not users:
            return BatchResult(outcomes, requests=0)
        secrets = [v for v in destination.credentials.values() if v]
        reply = call(client, "POST", f"{_host(destination)}/api/add_user_properties",
                     json={"app_id": app_id, "users": users}, secrets=secrets, timeout=destination.timeout_seconds)
        outcome = classify_reply(reply, secrets)
        for delivery_id in sent:
            dropped = notes.get(delivery_id, "")
            outcomes[delivery_id] = RecordOutcome(SUCCEEDED, "", dropped, "PROPERTIES_DROPPED") \
                if dropped and outcome.classification == SUCCEEDED else outcome
        return BatchResult(outcomes, http_status=reply.status, latency_seconds=reply.latency_seconds,
                           response_excerpt=excerpt(reply, secrets), retry_after_seconds=reply.retry_after_seconds)


def classify_reply(reply: HttpReply, secrets: Sequence[str] = ()) -> RecordOutcome:
    """The outcome every user of a sent batch shares, from the HTTP status."""
    if 200 <= reply.status < 300:
        return RecordOutcome(SUCCEEDED)
    generic = transport_outcome(reply)
    if generic is not None:
        return generic
    code = str(reply.status)
    detail = _error_detail(reply, secrets)
    if reply.status == 408:
        return RecordOutcome(RETRYABLE, code, "request timeout (HTTP 408)", "SERVER_ERROR")
    if reply.status in (401, 403):
        return RecordOutcome(PERMANENT, code, f"app_id refused (HTTP {reply.status}){detail}", "INVALID_APP_ID")
    if reply.status >= 400:
        return RecordOutcome(PERMANENT, code, f"request refused (HTTP {reply.status}){detail}", "INVALID_REQUEST")
    return RecordOutcome(RETRYABLE, code, f"unexpected reply (HTTP {reply.status})", "UNEXPECTED_REPLY")


def _error_detail(reply: HttpReply, secrets: Sequence[str]) -> str:
    """``": <message>"`` from Heap's error reply (a JSON ``error``/``message`` or plain text), redacted."""
    body = reply.body
    text = ""
    if isinstance(body, dict):
        text = next((str(body[k]) for k in ("error", "message") if body.get(k)), "")
    elif isinstance(body, str):
        text = body
    elif reply.text and body is None:
        text = reply.text
    text = " ".join(text.split())
    return redact(f": {text}", secrets)[:300] if text else ""


def _user(record: TraitUpdate) -> tuple[dict[str, Any], str] | RecordOutcome:
    """The bulk entry for ``record`` and a note on what was left out, or why it cannot be sent."""
    problem = identity_problem(record.identity)
    if problem is not None:
        return RecordOutcome(PERMANENT, "", problem, "INVALID_IDENTITY")
    wanted: dict[str, Any] = {key: None for key in record.unset}
    wanted.update(record.values)  # a key both set and unset is set
    if not wanted:
        return RecordOutcome(SUCCEEDED, "", "nothing to write", "NOTHING_TO_SEND")
    properties: dict[str, str | int | float] = {}
    reserved: list[str] = []
    invalid: list[str] = []
    for key, value in wanted.items():
        if not isinstance(key, str) or not key.strip() or len(key) > MAX_VALUE_LENGTH:
            invalid.append(str(key)[:40])
            continue
        if key.lower() in _RESERVED_KEYS:
            reserved.append(key)
            continue
        converted = _convert(value)
        if converted is _UNREPRESENTABLE:
            invalid.append(key[:40])
            continue
        properties[key] = converted
    notes = []
    if reserved:
        notes.append(f"left out the keys Heap reserves: {', '.join(sorted(reserved))}")
    if invalid:
        notes.append(f"left out keys Heap cannot hold (bad key or a value that is not a string, number, boolean or "
                     f"list): {', '.join(sorted(invalid))}")
    note = "; ".join(notes)
    if not properties:
        return RecordOutcome(PERMANENT, "", note or "no property is left to write", "NO_PROPERTIES")
    return {"identity": record.identity, "properties": properties}, note


def _unsupported(records: Sequence[Conversion] | Sequence[AudienceChange], why: str) -> BatchResult:
    """Every record PERMANENT without a request: the worker asked the wrong kind."""
    return BatchResult({r.delivery_id: RecordOutcome(PERMANENT, "", why, "NOT_SUPPORTED") for r in records},
                       requests=0)
