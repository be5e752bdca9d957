"""PostHog: computed traits written back as person properties (``POSTHOG_TRAITS``,
``specs/sources-and-consent.md`` §1).

Each batch is one ``POST {host}/batch/`` to the project's *ingestion* host
(``https://us.i.posthog.com``, ``https://eu.i.posthog.com`` or a self-hosted one) with the
public project token (``phc_...``) as the batch-level ``api_key``. Every record becomes one
``$set`` event for its ``distinct_id``, the way posthog-python's ``set()`` sends it::

    {"event": "$set", "distinct_id": "...", "uuid": "...", "timestamp": "...",
     "properties": {"$set": {...}, "$unset": [...], "$geoip_disable": true, "$lib": "stitchgraph"}}

``$set`` and ``$unset`` always travel inside ``properties`` (the v1 capture protocol reads
them only there). A key both set and unset is set: the record's values are the newer word.
The event ``uuid`` is derived from the destination and the delivery ID, so a batch resent
after a timeout carries the same event IDs. ``$geoip_disable`` stops PostHog geolocating the
server's own address onto the person.

PostHog's capture endpoint has no per-record verdicts: it accepts or refuses a request as a
whole, and it silently drops events without a usable ``distinct_id`` while answering 200. So
every record is checked here first (:func:`distinct_id_problem`): an empty ID, one longer
than 200 characters or one of the IDs PostHog never merges (``anonymous``, ``null``, ``0``
...) would either be lost or pile unrelated people's traits onto one shared person, and gets
PERMANENT ``INVALID_DISTINCT_ID`` without being sent. One bad record never holds back the rest.
(The identity blocklist already keeps such values out of the graph; this is PostHog's own
rule, applied where the data leaves.)

Answers (key on the HTTP status only; the body is ``{"status": 1}`` or ``{"status": "Ok"}``
depending on the server generation):

* 2xx: every sent record SUCCEEDED;
* 400: PERMANENT ``INVALID_REQUEST`` for the batch; 401: PERMANENT ``INVALID_TOKEN``;
  413: PERMANENT ``PAYLOAD_TOO_LARGE``; other 4xx: PERMANENT ``INVALID_REQUEST``;
* 429: THROTTLED with ``Retry-After`` (billing quotas and rate limits);
* 408, 5xx and transport failures: RETRYABLE (posthog-python's own retry policy).

Settings read: ``host`` (required; a trailing slash is ignored) and ``historical_migration``
(bool: route the batch through PostHog's historical pipeline, for backfills). Credentials:
the project token as ``token``, ``api_key`` or ``project_api_key``. A personal API key
(``phx_...``) is refused without a request: it is a secret and does not belong on the
public capture endpoint.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

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
    "MAX_DISTINCT_ID_LENGTH",
    "PostHogTraitsAdapter",
    "classify_reply",
    "distinct_id_problem",
    "event_uuid",
]

#: ``/batch/`` has no count limit (only 20 MB a request); 1,000 events keeps requests small.
BATCH_LIMIT = 1000
#: Capture cuts a longer ``distinct_id`` to this length, which would write to another person.
MAX_DISTINCT_ID_LENGTH = 200
LIBRARY = "stitchgraph"

#: IDs PostHog refuses to merge on (plugin-server's illegal distinct IDs): compared without case ...
_ILLEGAL_IDS_ANY_CASE = frozenset({"anonymous", "guest", "distinctid", "distinct_id", "id", "not_authenticated",
                                   "email", "undefined", "true", "false"})
#: ... and exactly.
_ILLEGAL_IDS_EXACT = frozenset({"[object Object]", "NaN", "None", "none", "null", "0"})
#: Namespace of the event UUIDs (a fixed random UUID: only its constancy matters).
_EVENT_NAMESPACE = uuid.UUID("6f1d0c1e-4b0a-4f57-9a52-58a1c4f6b7d2")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: What :func:`_property_value` returns for a value without a JSON form (``None`` is a value there).
_NO_JSON = object()


def distinct_id_problem(distinct_id: str) -> str | None:
    """Why PostHog must not be sent ``distinct_id`` (``None`` when it may).

    Refused: blank IDs, IDs over :data:`MAX_DISTINCT_ID_LENGTH` characters, and PostHog's
    illegal IDs, also when wrapped in quotes (``"null"``, ``'undefined'``).
    """
    stripped = distinct_id.strip()
    if not stripped:
        return "the distinct_id is empty"
    if len(distinct_id) > MAX_DISTINCT_ID_LENGTH:
        return f"the distinct_id is {len(distinct_id)} characters long; PostHog keeps {MAX_DISTINCT_ID_LENGTH}"
    candidates = {stripped}
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        candidates.add(stripped[1:-1].strip())
    for candidate in candidates:
        if not candidate or candidate.lower() in _ILLEGAL_IDS_ANY_CASE or candidate in _ILLEGAL_IDS_EXACT:
            return "the distinct_id is a placeholder PostHog treats as illegal (it would merge unrelated people)"
    return None


def event_uuid(destination_id: str, delivery_id: int) -> str:
    """The ``uuid`` of the ``$set`` event of ``delivery_id`` at a destination: the same for every
    attempt, so a resend is recognisably the same event."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{destination_id}/{delivery_id}"))


def _iso(micros: int) -> str:
    """RFC 3339 UTC with milliseconds, from microseconds since the epoch (exact, no float)."""
    moment = _EPOCH + timedelta(microseconds=micros)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PostHogTraitsAdapter:
    """``POSTHOG_TRAITS``: person properties through ``$set`` events on ``/batch/``."""

    kind = "POSTHOG_TRAITS"
    batch_limit = BATCH_LIMIT

    def platform_event(self, event: str, settings: Mapping[str, Any]) -> str | None:
        return None

    def max_age_seconds(self, settings: Mapping[str, Any], action_source: str) -> int | None:
        return None

    def send_conversions(self, client: httpx.Client, destination: DestinationContext,
                         records: Sequence[Conversion]) -> BatchResult:
        return _unsupported(records, f"{self.kind} writes person properties, not conversions")

    def send_audience(self, client: httpx.Client, destination: DestinationContext, action: str,
                      records: Sequence[AudienceChange], session: ReplaceSession | None = None) -> BatchResult:
        return _unsupported(records, f"{self.kind} writes person properties, not audience membership")

    def send_traits(self, client: httpx.Client, destination: DestinationContext,
                    records: Sequence[TraitUpdate]) -> BatchResult:
        """Send every valid record as one ``$set`` event in one ``/batch/`` request; invalid ones
        get their own PERMANENT outcome and stay out of it.

        Raises :class:`ValueError` for more than :attr:`batch_limit` records.
        """
        if len(records) > self.batch_limit:
            raise ValueError(f"at most {self.batch_limit} records per request, got {len(records)}")
        token = destination.secret("token", "api_key", "project_api_key")
        host = str(destination.setting("host", "")).strip().rstrip("/")
        problem: RecordOutcome | None = None
        if not token:
            problem = RecordOutcome(PERMANENT, "", "the credentials hold no project token", "INVALID_TOKEN")
        elif token.startswith("phx_"):
            problem = RecordOutcome(PERMANENT, "", "the credentials hold a personal API key (phx_...); trait "
                                    "write-back takes the public project token (phc_...)", "INVALID_TOKEN")
        elif not host:
            problem = RecordOutcome(PERMANENT, "", "the destination has no host setting", "MISSING_SETTING")
        if problem is not None:
            return BatchResult({r.delivery_id: problem for r in records}, requests=0)

        now_us = _now_us()
        outcomes: dict[int, RecordOutcome] = {}
        events: list[dict[str, Any]] = []
        sent: list[int] = []
        for record in records:
            built = _set_event(record, destination.destination_id, now_us)
            if isinstance(built, RecordOutcome):
                outcomes[record.delivery_id] = built
            else:
                events.append(built)
                sent.append(record.delivery_id)
        if not events:
            return BatchResult(outcomes, requests=0)
        body: dict[str, Any] = {"api_key": token, "batch": events, "sent_at": _iso(now_us)}
        if destination.setting("historical_migration") is True:
            body["historical_migration"] = True
        secrets = [v for v in destination.credentials.values() if v]
        reply = call(client, "POST", f"{host}/batch/", json=body, secrets=secrets,
                     timeout=destination.timeout_seconds)
        outcome = classify_reply(reply, secrets)
        outcomes.update({d: outcome for d in sent})
        return BatchResult(outcomes, http_status=reply.status, latency_seconds=reply.latency_seconds,
                           response_excerpt=excerpt(reply, secrets), retry_after_seconds=reply.retry_after_seconds)


def classify_reply(reply: HttpReply, secrets: Sequence[str] = ()) -> RecordOutcome:
    """The outcome every record of a sent batch shares, from the HTTP status alone."""
    if 200 <= reply.status < 300:
        return RecordOutcome(SUCCEEDED)
    generic = transport_outcome(reply)
    if generic is not None:
        return generic
    detail = _error_detail(reply, secrets)
    code = str(reply.status)
    if reply.status == 408:
        return RecordOutcome(RETRYABLE, code, f"request timeout (HTTP 408){detail}", "SERVER_ERROR")
    if reply.status == 401:
        return RecordOutcome(PERMANENT, code, f"project token refused (HTTP 401){detail}", "INVALID_TOKEN")
    if reply.status == 413:
        return RecordOutcome(PERMANENT, code, f"request or event too large (HTTP 413){detail}", "PAYLOAD_TOO_LARGE")
    if reply.status >= 400:
        return RecordOutcome(PERMANENT, code, f"request refused (HTTP {reply.status}){detail}", "INVALID_REQUEST")
    # 1xx/3xx: not PostHog's verdict (a proxy or a redirect to another host); try again later.
    return RecordOutcome(RETRYABLE, code, f"unexpected reply (HTTP {reply.status})", "UNEXPECTED_REPLY")


def _error_detail(reply: HttpReply, secrets: Sequence[str]) -> str:
    """``": <code>: <detail>"`` from PostHog's error body (``{"type", "code", "detail"}``), redacted."""
    body = reply.body if isinstance(reply.body, dict) else {}
    parts = [str(body[k]) for k in ("code", "detail") if isinstance(body.get(k), str) and body[k]]
    return redact(": " + " - ".join(parts), secrets)[:300] if parts else ""


def _set_event(record: TraitUpdate, destination_id: str, now_us: int) -> dict[str, Any] | RecordOutcome:
    """The ``$set`` event for ``record``, or why it cannot be sent."""
    problem = distinct_id_problem(record.identity)
    if problem is not None:
        return RecordOutcome(PERMANENT, "", problem, "INVALID_DISTINCT_ID")
    to_set: dict[str, Any] = {}
    to_unset: list[str] = []
    for key, value in record.values.items():
        if not isinstance(key, str) or not key:
            return RecordOutcome(PERMANENT, "", "a trait key is empty or not a string", "INVALID_PROPERTY")
        if value is None:  # no value is no property: unset it rather than store a null
            to_unset.append(key)
            continue
        converted = _property_value(value)
        if converted is _NO_JSON:
            return RecordOutcome(PERMANENT, "", f"the value of trait {key[:64]!r} is not a finite JSON value",
                                 "INVALID_PROPERTY")
        to_set[key] = converted
    to_unset.extend(key for key in record.unset if key and key not in record.values)
    to_unset = list(dict.fromkeys(k for k in to_unset if k not in to_set))
    if not to_set and not to_unset:
        return RecordOutcome(SUCCEEDED, "", "nothing to write", "NOTHING_TO_SEND")
    properties: dict[str, Any] = {"$set": to_set}
    if to_unset:
        properties["$unset"] = to_unset
    properties["$geoip_disable"] = True
    properties["$lib"] = LIBRARY
    return {
        "event": "$set",
        "distinct_id": record.identity,
        "uuid": event_uuid(destination_id, record.delivery_id),
        "timestamp": _iso(record.occurred_us or now_us),
        "properties": properties,
    }


def _property_value(value: Any) -> Any:
    """``value`` as PostHog stores it, or :data:`_NO_JSON` when it has no JSON form. Scalars
    pass through; lists and mappings (PostHog stores those too) are converted item by item."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _NO_JSON
    if isinstance(value, (list, tuple)):
        items = [_property_value(v) for v in value]
        return _NO_JSON if any(i is _NO_JSON for i in items) else items
    if isinstance(value, Mapping):
        members = {str(k): _property_value(v) for k, v in value.items()}
        return _NO_JSON if any(m is _NO_JSON for m in members.values()) else members
    return _NO_JSON


def _unsupported(records: Sequence[Conversion] | Sequence[AudienceChange], why: str) -> BatchResult:
    """Every record PERMANENT without a request: the worker asked the wrong kind."""
    return BatchResult({r.delivery_id: RecordOutcome(PERMANENT, "", why, "NOT_SUPPORTED") for r in records},
                       requests=0)


def _now_us() -> int:
    return int((datetime.now(UTC) - _EPOCH) / timedelta(microseconds=1))
