"""What every destination adapter shares: the records the delivery workers hand over, the
outcome an adapter reports, credentials, and one HTTP call with timing, ``Retry-After`` and
a redacted response excerpt.

An adapter (``meta.py``, ``google.py``, ``tiktok.py``) owns its platform's payload shape,
event-name mapping, normalisation quirks, batch limit and error classification. It never
decides identity or consent: the worker gives it records that were re-checked at send time,
with the person's match keys as the identity graph holds them *now* (so a purchase that
carried only a user ID is sent with the email hash learnt at an earlier identify).

Adapters are plain objects without state; one instance serves every destination of its kind.
Nothing here logs: the worker records outcomes in the delivery log, where excerpts are
already redacted (:func:`redact`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol

import httpx

from identity.normalize import sha256_hex

__all__ = [
    "PERMANENT",
    "RETRYABLE",
    "SUCCEEDED",
    "THROTTLED",
    "Adapter",
    "AudienceChange",
    "BatchResult",
    "Conversion",
    "CredentialsError",
    "DestinationContext",
    "HttpReply",
    "PersonKeys",
    "RecordOutcome",
    "ReplaceSession",
    "TraitUpdate",
    "call",
    "excerpt",
    "parse_retry_after",
    "redact",
    "resolve_credentials",
    "sha256_hex",
    "transport_outcome",
    "unix_seconds",
    "whole_batch",
]

SUCCEEDED = "SUCCEEDED"
RETRYABLE = "RETRYABLE"
THROTTLED = "THROTTLED"
PERMANENT = "PERMANENT"

#: Longest response excerpt kept in the delivery log.
EXCERPT_LIMIT = 2048

_HASH_RE = re.compile(r"\b[0-9a-fA-F]{64}\b")
_QUERY_SECRET_RE = re.compile(r"(?i)(access_token|appsecret_proof|client_secret|refresh_token|key)=([^&\s\"']+)")


# -- what the worker hands over -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PersonKeys:
    """A person's match keys as the identity graph holds them, every value already hashed
    the way its platform rule says (``identity.normalize``), except ``user_ids``.

    * ``emails``: SHA-256 of the trimmed, lower-cased address (Meta, TikTok).
    * ``google_emails``: SHA-256 under Google's gmail/googlemail rule (dots and ``+tag``
      removed); the same as ``emails`` for other domains.
    * ``phones_e164``: SHA-256 of E.164 *with* ``+`` (Google, TikTok).
    * ``phones_meta``: SHA-256 of the digits with the country code and no ``+`` (Meta); only
      known when the raw number reached us (a client-hashed phone has no Meta form).
    * ``user_ids``: the advertiser's own user IDs, raw (Meta ``external_id``; TikTok hashes them).
    """

    person_id: str = ""
    emails: tuple[str, ...] = ()
    google_emails: tuple[str, ...] = ()
    phones_e164: tuple[str, ...] = ()
    phones_meta: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not (self.emails or self.google_emails or self.phones_e164 or self.phones_meta or self.user_ids)


@dataclass(frozen=True, slots=True)
class Conversion:
    """One canonical event to send as a conversion.

    ``occurred_us`` is microseconds since the epoch (UTC). ``value`` is the exact decimal
    string as captured; ``context`` holds the event's ``ip``, ``user_agent``, ``fbp``, ``fbc``,
    ``gclid``, ``gbraid``, ``wbraid``, ``ttclid``, ``ttp``, ``page_url``, ``referrer``,
    ``locale`` where present. ``action_source`` is the lower-case ``ActionSource`` name
    (``website``, ``app``, ``crm`` ...) or ``""``. ``limited_data_use``: the person opted out
    of sale/sharing and the destination sends in Limited Data Use mode.
    ``consent`` maps purposes to the resolved grant (``ad_user_data``, ``ad_personalization``).
    """

    delivery_id: int
    event_id: str
    event: str
    occurred_us: int
    keys: PersonKeys
    value: str | None = None
    currency: str | None = None
    order_id: str | None = None
    items: tuple[Mapping[str, Any], ...] = ()
    properties: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)
    action_source: str = ""
    limited_data_use: bool = False
    consent: Mapping[str, bool] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AudienceChange:
    """One person to add to or remove from a platform audience, with the keys to send."""

    delivery_id: int
    keys: PersonKeys


@dataclass(frozen=True, slots=True)
class TraitUpdate:
    """Changed computed traits of one person for an analytics tool (trait write-back).

    ``identity`` is the ID the tool knows the person by: a PostHog ``distinct_id`` or a Heap
    ``identity``. ``values`` maps trait keys to their new value (``str``, ``int``, ``float``
    or ``bool``; the adapter converts to what the tool accepts); ``unset`` lists keys that no
    longer have a value. ``occurred_us`` is when the values changed (microseconds, UTC).
    """

    delivery_id: int
    identity: str
    values: Mapping[str, Any]
    unset: tuple[str, ...] = ()
    occurred_us: int = 0


@dataclass(frozen=True, slots=True)
class ReplaceSession:
    """A full-replacement upload split into batches (Meta ``usersreplace``): the caller-chosen
    ``session_id``, this batch's 1-based ``batch_seq``, whether it is the last, and the total."""

    session_id: int
    batch_seq: int
    last_batch: bool
    estimated_total: int


@dataclass(frozen=True)
class DestinationContext:
    """One destination as an adapter sees it: its ID, settings and resolved credentials.

    ``credentials`` are the secret values (``token``, or the keys of a JSON credentials file);
    adapters put them in headers or parameters and nowhere else.
    """

    destination_id: str
    kind: str
    settings: Mapping[str, Any]
    credentials: Mapping[str, str]
    timeout_seconds: float = 10.0

    def setting(self, key: str, default: Any = None) -> Any:
        value = self.settings.get(key)
        return default if value is None or value == "" else value

    def secret(self, *names: str) -> str:
        """The first credential present among ``names`` ("" when none is)."""
        for name in names:
            value = self.credentials.get(name)
            if value:
                return value
        return ""

    def __repr__(self) -> str:  # never show credentials
        return f"DestinationContext({self.destination_id!r}, {self.kind!r})"


# -- what an adapter reports ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RecordOutcome:
    """The fate of one record of a batch: a classification and, for failures, the platform's
    error code and a short human-readable error (no secrets, no hashes)."""

    classification: str
    platform_error_code: str = ""
    error: str = ""
    #: A machine-readable status reason for the delivery log ("INVALID_TOKEN", "EVENT_TOO_OLD").
    status_reason: str = ""


@dataclass(frozen=True)
class BatchResult:
    """What one request did. ``outcomes`` maps each record's ``delivery_id`` to its outcome
    (every record of the batch appears). ``retry_after_seconds`` is the platform's
    ``Retry-After`` (or its equivalent), when it gave one."""

    outcomes: Mapping[int, RecordOutcome]
    http_status: int = 0
    latency_seconds: float = 0.0
    response_excerpt: str = ""
    retry_after_seconds: float | None = None
    requests: int = 1


class Adapter(Protocol):
    """A destination kind's platform client."""

    #: The ``DestinationKind`` name without prefix, e.g. ``META_CONVERSIONS``.
    kind: str
    #: Most records one request may carry.
    batch_limit: int

    def platform_event(self, event: str, settings: Mapping[str, Any]) -> str | None:
        """The platform's name for canonical ``event`` at a destination with ``settings``;
        ``None`` when this destination does not send it (conversion kinds only)."""
        ...

    def max_age_seconds(self, settings: Mapping[str, Any], action_source: str) -> int | None:
        """How old an event may be when sent; ``None`` = no limit (conversion kinds only)."""
        ...

    def send_conversions(self, client: httpx.Client, destination: DestinationContext,
                         records: Sequence[Conversion]) -> BatchResult:
        """Send ``records`` (at most ``batch_limit``) in one request."""
        ...

    def send_audience(self, client: httpx.Client, destination: DestinationContext, action: str,
                      records: Sequence[AudienceChange], session: ReplaceSession | None = None) -> BatchResult:
        """Add (``action="add"``) or remove (``"remove"``) ``records`` in one request;
        with ``session``, add them as one batch of a full replacement."""
        ...

    def send_traits(self, client: httpx.Client, destination: DestinationContext,
                    records: Sequence[TraitUpdate]) -> BatchResult:
        """Write ``records`` (at most ``batch_limit``) in one request (trait kinds only)."""
        ...


# -- credentials ---------------------------------------------------------------------------------

class CredentialsError(Exception):
    """The credentials reference cannot be resolved; the message names the reference kind, never a value."""


def resolve_credentials(ref: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The secrets behind ``env:NAME`` or ``file:/path``.

    A value that is a JSON object gives its string members (``{"access_token": ...,
    "developer_token": ...}``); any other value is one secret, under ``token``.
    """
    env = os.environ if environ is None else environ
    if ref.startswith("env:"):
        name = ref[4:]
        raw = env.get(name)
        if raw is None or not raw.strip():
            raise CredentialsError(f"environment variable {name} is not set")
    elif ref.startswith("file:"):
        path = Path(ref[5:])
        try:
            raw = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CredentialsError(f"credentials file {path} cannot be read ({exc.strerror or 'error'})") from None
        if not raw.strip():
            raise CredentialsError(f"credentials file {path} is empty")
    else:
        raise CredentialsError("credentials_ref must be 'env:NAME' or 'file:/path'")
    text = raw.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            raise CredentialsError("the credentials look like JSON but do not parse") from None
        if not isinstance(parsed, dict):
            raise CredentialsError("JSON credentials must be an object")
        return {str(k): str(v) for k, v in parsed.items() if isinstance(v, (str, int))}
    return {"token": text}


# -- one HTTP call -------------------------------------------------------------------------------

@dataclass(frozen=True)
class HttpReply:
    """A finished HTTP exchange, or the transport error that ended it (``status`` 0)."""

    status: int
    body: Any
    text: str
    latency_seconds: float
    retry_after_seconds: float | None
    error: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def transport_failed(self) -> bool:
        return self.status == 0


def call(client: httpx.Client, method: str, url: str, *, secrets: Sequence[str] = (),
         timeout: float = 10.0, **kwargs: Any) -> HttpReply:
    """Make one request and never raise for transport trouble: timeouts and connection
    errors come back as ``status`` 0 with an ``error`` saying what happened. ``body`` is the
    parsed JSON (``None`` when the body is not JSON). ``secrets`` are removed from errors."""
    started = time.perf_counter()
    try:
        response = client.request(method, url, timeout=timeout, **kwargs)
    except httpx.TimeoutException:
        return HttpReply(0, None, "", time.perf_counter() - started, None, error=f"timeout after {timeout:g}s")
    except httpx.TransportError as exc:
        message = redact(f"{type(exc).__name__}: {exc}", secrets)[:300]
        return HttpReply(0, None, "", time.perf_counter() - started, None, error=f"connection failed ({message})")
    latency = time.perf_counter() - started
    text = response.text
    try:
        body = response.json() if text else None
    except ValueError:
        body = None
    return HttpReply(response.status_code, body, text, latency, parse_retry_after(response.headers.get("retry-after")),
                     headers=dict(response.headers))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with every secret, every SHA-256-looking hash and every secret-looking query
    parameter replaced."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    text = _QUERY_SECRET_RE.sub(lambda m: f"{m.group(1)}=[redacted]", text)
    return _HASH_RE.sub("[sha256]", text)


def excerpt(reply: HttpReply, secrets: Sequence[str] = ()) -> str:
    """The start of a reply for the delivery log (at most :data:`EXCERPT_LIMIT` characters), redacted."""
    if reply.transport_failed:
        return redact(reply.error, secrets)[:EXCERPT_LIMIT]
    return redact(reply.text[:EXCERPT_LIMIT * 2], secrets)[:EXCERPT_LIMIT]


def whole_batch(records: Sequence[Conversion] | Sequence[AudienceChange] | Sequence[TraitUpdate],
                outcome: RecordOutcome, reply: HttpReply, secrets: Sequence[str] = ()) -> BatchResult:
    """A result giving every record the same ``outcome``."""
    return BatchResult({r.delivery_id: outcome for r in records}, http_status=reply.status,
                       latency_seconds=reply.latency_seconds, response_excerpt=excerpt(reply, secrets),
                       retry_after_seconds=reply.retry_after_seconds)


def transport_outcome(reply: HttpReply) -> RecordOutcome | None:
    """The outcome every platform gives a transport failure, a 429 or a 5xx (``None`` otherwise)."""
    if reply.transport_failed:
        return RecordOutcome(RETRYABLE, "", reply.error, "TRANSPORT_ERROR")
    if reply.status == 429:
        return RecordOutcome(THROTTLED, "429", "rate limited (HTTP 429)", "RATE_LIMITED")
    if reply.status >= 500:
        return RecordOutcome(RETRYABLE, str(reply.status), f"server error (HTTP {reply.status})", "SERVER_ERROR")
    return None


def unix_seconds(micros: int) -> int:
    return micros // 1_000_000
