"""Google: conversions through the Google Ads API (click conversion uploads, or enhanced
conversions for web as ``ENHANCEMENT`` adjustments) and Customer Match audience membership
through the Data Manager API (``specs/destinations.md`` §2).

**Authorisation.** Both APIs take an OAuth access token. The credentials give one directly
(``access_token``, or a plain secret under ``token``), or an OAuth client and refresh token
(``client_id``, ``client_secret``, ``refresh_token``) that are exchanged at the token endpoint
(setting ``token_url``, else the credentials' ``token_uri`` as in Google's own JSON files,
else :data:`TOKEN_URL`). Access tokens are cached per (token endpoint, client, SHA-256 of the
refresh token) until :data:`TOKEN_EXPIRY_MARGIN_SECONDS` before they expire; one thread
refreshes while the others wait for its token. A 401 on a cached token drops it, refreshes once
and repeats the request once. The token endpoint refusing the client or the refresh token
(``invalid_grant``, ``invalid_client``) is PERMANENT ``INVALID_TOKEN``. The Google Ads API
also needs the ``developer_token`` credential. ``BatchResult.requests`` counts every HTTP
request made, token refreshes included.

**Google Ads conversions** (``GoogleAdsConversionsAdapter``). Settings: ``customer_id``
(dashes allowed), ``conversion_actions`` (canonical event → conversion action ID or resource
name ``customers/{cid}/conversionActions/{id}``; an event without one is not sent, and
``event_names`` does not apply: the conversion action *is* Google's event), ``login_customer_id``
(a manager account acting for the customer), ``upload`` (``click_conversions``, the default,
or ``enhancements``), ``api_version``, ``base_url``.

* ``click_conversions``: ``:uploadClickConversions`` with ``partialFailure``. The order ID is
  the event's ``order_id``, else its ``event_id``: Google keeps one conversion per order ID
  and conversion action, which makes resending safe. A record needs a click ID (``gclid``,
  else one of ``gbraid``/``wbraid``; never both braids) or a hashed email/phone (at most
  five ``userIdentifiers``, Google's email rule and E.164 phones). Consent ``adUserData``
  comes from the record's ``ad_user_data`` grant; without one it is left out (UNSPECIFIED).
  Max age :data:`CLICK_CONVERSION_MAX_AGE_SECONDS` (90 days): the longest click-through
  window Google offers; older events are ``EXPIRED_EVENT`` at best.
* ``enhancements``: ``:uploadConversionAdjustments`` with ``adjustmentType: ENHANCEMENT``,
  matched to the tag's conversion by the order ID (transaction ID), which is therefore
  required (``MISSING_ORDER_ID``; the event ID would match nothing). Only hashed identifiers
  are sent (no click ID: with an order ID Google refuses a ``gclidDateTimePair.gclid``).
  Max age :data:`ENHANCEMENT_MAX_AGE_SECONDS` (24 hours, Google's window for enhancements).

Row errors come back in ``partialFailureError`` (a ``google.rpc.Status`` holding a
``GoogleAdsFailure`` whose errors are located by ``fieldPathElements[0].index``). Errors saying
the platform already holds the conversion (``ORDER_ID_ALREADY_IN_USE``, ``DUPLICATE_ORDER_ID``,
``CLICK_CONVERSION_ALREADY_EXISTS``, ``CONVERSION_ALREADY_ENHANCED`` ...) are SUCCEEDED;
``TOO_RECENT_*``, concurrent modification and internal errors RETRYABLE, quota errors
THROTTLED; the rest PERMANENT with ``platform_error_code`` ``"<category>.<ENUM>"``.
Records of one batch with the same conversion action and order ID are sent once and share
the outcome of that row.

**Data Manager audiences** (``GoogleDataManagerAudienceAdapter``). Settings:
``operating_account_id``, ``operating_account_type`` (default ``GOOGLE_ADS``),
``product_destination_id`` (the user list ID), ``login_account_id``/``login_account_type``,
``api_version``, ``base_url``. Members carry up to ten hex SHA-256 ``emailAddress`` /
``phoneNumber`` identifiers; ingestion states ``CONSENT_GRANTED`` for both purposes, since the
worker only sends people who granted them. The Data Manager API has no full replacement: with
a :class:`ReplaceSession` the batch is simply ingested (removals reach the list as their own
deltas).

**Whole-request errors** (``{"error": {code, message, status, details}}``): 401 is
``INVALID_TOKEN``, 403 ``PERMISSION_DENIED``, 429 THROTTLED (``Retry-After``, else the
``retryDelay`` of a quota error or ``RetryInfo``), 5xx and transient statuses RETRYABLE, any
other 4xx PERMANENT ``INVALID_REQUEST``. When a refused request names the rows at fault
(``conversions[3]``, ``audience_members[7]``), only those fail permanently and the others are
RETRYABLE (``BATCH_REJECTED``), to go out again without them.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from audiences.destinations.base import (
    PERMANENT,
    RETRYABLE,
    SUCCEEDED,
    THROTTLED,
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
)

__all__ = [
    "ADS_API_VERSION",
    "ADS_BASE_URL",
    "CLICK_CONVERSION_MAX_AGE_SECONDS",
    "DATA_MANAGER_API_VERSION",
    "DATA_MANAGER_BASE_URL",
    "ENHANCEMENT_MAX_AGE_SECONDS",
    "TOKEN_EXPIRY_MARGIN_SECONDS",
    "TOKEN_URL",
    "GoogleAdsConversionsAdapter",
    "GoogleDataManagerAudienceAdapter",
    "classify_row_error",
    "clear_token_cache",
]

ADS_BASE_URL = "https://googleads.googleapis.com"
ADS_API_VERSION = "v25"
DATA_MANAGER_BASE_URL = "https://datamanager.googleapis.com"
DATA_MANAGER_API_VERSION = "v1"
TOKEN_URL = "https://oauth2.googleapis.com/token"

#: A cached access token is refreshed this long before Google says it expires.
TOKEN_EXPIRY_MARGIN_SECONDS = 60.0
#: Lifetime assumed when the token endpoint gives no ``expires_in``.
_DEFAULT_TOKEN_LIFETIME = 3600.0

CLICK_CONVERSION_MAX_AGE_SECONDS = 90 * 86_400
ENHANCEMENT_MAX_AGE_SECONDS = 86_400

ADS_BATCH_LIMIT = 2000
DATA_MANAGER_BATCH_LIMIT = 10_000
#: ``userIdentifiers`` per click conversion or adjustment.
ADS_MAX_IDENTIFIERS = 5
#: ``userIdentifiers`` per Data Manager audience member.
DATA_MANAGER_MAX_IDENTIFIERS = 10

CLICK_CONVERSIONS = "click_conversions"
ENHANCEMENTS = "enhancements"
_UPLOADS = (CLICK_CONVERSIONS, ENHANCEMENTS)

_ACCOUNT_TYPES = ("GOOGLE_ADS", "DISPLAY_VIDEO_PARTNER", "DISPLAY_VIDEO_ADVERTISER", "DATA_PARTNER")

_HASH_RE = re.compile(r"[0-9a-f]{64}")
_ACTION_RESOURCE_RE = re.compile(r"customers/(\d+)/conversionActions/(\d+)")
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)s\s*")
_CONVERSION_ROW_RE = re.compile(r"^(?:conversions|conversion_adjustments|conversionAdjustments)\[(\d+)\]")
_MEMBER_ROW_RE = re.compile(r"(?:audience_members|audienceMembers)\[(\d+)\]")

#: Row errors meaning Google already holds this conversion or enhancement: a resend, or a
#: duplicate of a row it kept. In-request duplicates cannot come from this adapter (it sends
#: each (conversion action, order ID) once per request), so they are counted as the same.
_ALREADY_PRESENT = frozenset({
    "conversionUploadError.ORDER_ID_ALREADY_IN_USE",
    "conversionUploadError.DUPLICATE_ORDER_ID",
    "conversionUploadError.CLICK_CONVERSION_ALREADY_EXISTS",
    "conversionUploadError.CALL_CONVERSION_ALREADY_EXISTS",
    "conversionAdjustmentUploadError.CONVERSION_ALREADY_ENHANCED",
    "conversionAdjustmentUploadError.DUPLICATE_ENHANCEMENT_IN_REQUEST",
})
#: Row errors that go away by themselves: the click, call or conversion action is younger than
#: Google's six hours, a concurrent change, Google's own trouble.
_TRANSIENT_ROW_ERRORS = frozenset({
    "conversionUploadError.TOO_RECENT_EVENT",
    "conversionUploadError.TOO_RECENT_CONVERSION_ACTION",
    "conversionUploadError.TOO_RECENT_CALL",
    "conversionAdjustmentUploadError.TOO_RECENT_CONVERSION_ACTION",
    "conversionAdjustmentUploadError.TOO_RECENT_CONVERSION",
    "databaseError.CONCURRENT_MODIFICATION",
    "internalError.INTERNAL_ERROR",
    "internalError.TRANSIENT_ERROR",
    "internalError.DEADLINE_EXCEEDED",
})
_THROTTLING_CATEGORIES = frozenset({"quotaError"})
_EXPIRED_ROW_ERRORS = frozenset({
    "conversionUploadError.EXPIRED_EVENT",
    "conversionUploadError.EXPIRED_CALL",
    "conversionAdjustmentUploadError.CONVERSION_EXPIRED",
})
_TRANSIENT_STATUSES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "ABORTED", "UNKNOWN"})


# -- OAuth access tokens ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Credentials:
    """The secrets a send uses. ``access_token`` alone cannot be refreshed."""

    access_token: str
    client_id: str
    client_secret: str
    refresh_token: str
    developer_token: str
    token_url: str

    @property
    def refreshable(self) -> bool:
        return bool(self.client_id and self.client_secret and self.refresh_token)

    @property
    def cache_key(self) -> tuple[str, str, str]:
        return self.token_url, self.client_id, hashlib.sha256(self.refresh_token.encode()).hexdigest()

    def secrets(self) -> list[str]:
        return [s for s in (self.access_token, self.client_id, self.client_secret, self.refresh_token,
                            self.developer_token) if s]

    def __repr__(self) -> str:  # never show secrets
        return f"_Credentials(refreshable={self.refreshable}, token_url={self.token_url!r})"


def _credentials(destination: DestinationContext) -> _Credentials:
    token_url = str(destination.setting("token_url") or destination.secret("token_uri") or TOKEN_URL)
    return _Credentials(access_token=destination.secret("access_token", "token"),
                        client_id=destination.secret("client_id"),
                        client_secret=destination.secret("client_secret"),
                        refresh_token=destination.secret("refresh_token"),
                        developer_token=destination.secret("developer_token"),
                        token_url=token_url)


class _TokenCache:
    """Access tokens by credentials, with one lock per credentials so that a refresh happens
    once while the other threads wait for its token."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._refresh_locks: dict[tuple[str, str, str], threading.Lock] = {}

    def get(self, key: tuple[str, str, str]) -> str | None:
        with self._lock:
            entry = self._tokens.get(key)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    def put(self, key: tuple[str, str, str], token: str, lifetime: float) -> None:
        margin = min(TOKEN_EXPIRY_MARGIN_SECONDS, lifetime / 10)
        with self._lock:
            self._tokens[key] = (token, time.monotonic() + lifetime - margin)

    def drop(self, key: tuple[str, str, str], token: str) -> None:
        """Forget ``token`` unless another thread already replaced it."""
        with self._lock:
            entry = self._tokens.get(key)
            if entry is not None and entry[0] == token:
                del self._tokens[key]

    def refresh_lock(self, key: tuple[str, str, str]) -> threading.Lock:
        with self._lock:
            return self._refresh_locks.setdefault(key, threading.Lock())

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()


_TOKENS = _TokenCache()


def clear_token_cache() -> None:
    """Forget every cached access token (tests; rotated credentials)."""
    _TOKENS.clear()


@dataclass
class _Exchange:
    """The HTTP requests one send made: the last reply, how many, their total latency, the
    secrets to keep out of excerpts (access tokens obtained included), and the outcome of a
    failed token refresh, which ends the send before the API request."""

    secrets: list[str]
    reply: HttpReply | None = None
    requests: int = 0
    latency: float = 0.0
    auth_failure: RecordOutcome | None = None

    def record(self, reply: HttpReply) -> HttpReply:
        self.reply = reply
        self.requests += 1
        self.latency += reply.latency_seconds
        return reply


def _refresh(client: httpx.Client, creds: _Credentials, exchange: _Exchange, timeout: float) -> str | None:
    """A new access token from the token endpoint (cached), or ``None`` with
    ``exchange.auth_failure`` saying why."""
    reply = exchange.record(call(client, "POST", creds.token_url, secrets=exchange.secrets, timeout=timeout, data={
        "grant_type": "refresh_token", "client_id": creds.client_id, "client_secret": creds.client_secret,
        "refresh_token": creds.refresh_token}))
    body = reply.body if isinstance(reply.body, Mapping) else {}
    token = body.get("access_token")
    if reply.status == 200 and isinstance(token, str) and token:
        exchange.secrets.append(token)
        lifetime = body.get("expires_in")
        _TOKENS.put(creds.cache_key, token,
                    float(lifetime) if isinstance(lifetime, (int, float)) and lifetime > 0 else _DEFAULT_TOKEN_LIFETIME)
        return token
    exchange.auth_failure = _token_endpoint_failure(reply, body, exchange.secrets)
    return None


def _token_endpoint_failure(reply: HttpReply, body: Mapping[str, Any], secrets: Sequence[str]) -> RecordOutcome:
    if reply.transport_failed:
        return RecordOutcome(RETRYABLE, "", f"OAuth token endpoint: {reply.error}", "TRANSPORT_ERROR")
    if reply.status == 429:
        return RecordOutcome(THROTTLED, "429", "OAuth token endpoint rate limited (HTTP 429)", "RATE_LIMITED")
    if reply.status >= 500:
        return RecordOutcome(RETRYABLE, str(reply.status), f"OAuth token endpoint error (HTTP {reply.status})",
                             "SERVER_ERROR")
    code = body.get("error")
    code = code if isinstance(code, str) else str(reply.status)
    if 400 <= reply.status < 500:
        description = body.get("error_description")
        detail = f": {redact(description, secrets)[:200]}" if isinstance(description, str) and description else ""
        return RecordOutcome(PERMANENT, code, f"the OAuth token endpoint refused the credentials ({code}){detail}",
                             "INVALID_TOKEN")
    return RecordOutcome(RETRYABLE, code, f"the OAuth token endpoint answered HTTP {reply.status} without a token",
                         "TOKEN_ENDPOINT_ERROR")


def _access_token(client: httpx.Client, creds: _Credentials, exchange: _Exchange, timeout: float,
                  stale: str | None = None) -> tuple[str | None, bool]:
    """The access token to use and whether it came from the cache. ``stale`` is a token the
    API just refused: a cached token other than it (another thread's refresh) is used, else
    a new one is fetched."""
    if not creds.refreshable:
        return creds.access_token, False
    key = creds.cache_key
    if stale is None:
        cached = _TOKENS.get(key)
        if cached is not None:
            exchange.secrets.append(cached)
            return cached, True
    with _TOKENS.refresh_lock(key):
        cached = _TOKENS.get(key)
        if cached is not None and cached != stale:
            exchange.secrets.append(cached)
            return cached, stale is None
        return _refresh(client, creds, exchange, timeout), False


def _authorized_post(client: httpx.Client, destination: DestinationContext, creds: _Credentials, url: str,
                     body: Mapping[str, Any], headers: Mapping[str, str]) -> _Exchange:
    """POST ``body`` with a bearer token; on a 401 for a cached token, refresh once and repeat once."""
    exchange = _Exchange(secrets=creds.secrets())
    timeout = destination.timeout_seconds
    token, cached = _access_token(client, creds, exchange, timeout)
    if token is None:
        return exchange

    def post(bearer: str) -> HttpReply:
        return exchange.record(call(client, "POST", url, secrets=exchange.secrets, timeout=timeout, json=body,
                                    headers={**headers, "Authorization": f"Bearer {bearer}"}))

    reply = post(token)
    if reply.status == 401 and cached:
        _TOKENS.drop(creds.cache_key, token)
        token, _ = _access_token(client, creds, exchange, timeout, stale=token)
        if token is not None:
            post(token)
    return exchange


def _missing_credentials(creds: _Credentials, *, developer_token: bool) -> str:
    """What the credentials lack ("" when they are complete)."""
    if not (creds.refreshable or creds.access_token):
        return ("the credentials need access_token, or client_id, client_secret and refresh_token for the "
                "OAuth refresh-token grant")
    if developer_token and not creds.developer_token:
        return "the credentials need the Google Ads API developer_token"
    return ""


# -- errors -------------------------------------------------------------------------------------

def _error_code(error: Mapping[str, Any]) -> str:
    """``"<category>.<ENUM>"`` of a GoogleAdsError (``"conversionUploadError.CLICK_NOT_FOUND"``)."""
    code = error.get("errorCode")
    if isinstance(code, Mapping):
        for category, value in code.items():
            return f"{category}.{value}"
    return ""


def classify_row_error(code: str, message: str = "") -> RecordOutcome:
    """The outcome of one Google Ads row error ``code`` (``"<category>.<ENUM>"``)."""
    category, _, name = code.partition(".")
    if code in _ALREADY_PRESENT:
        return RecordOutcome(SUCCEEDED, code, "", "ALREADY_RECORDED")
    if code in _TRANSIENT_ROW_ERRORS:
        return RecordOutcome(RETRYABLE, code, message or "transient Google Ads error", name or "TRANSIENT")
    if category in _THROTTLING_CATEGORIES:
        return RecordOutcome(THROTTLED, code, message or "Google Ads quota exhausted", "RATE_LIMITED")
    if code in _EXPIRED_ROW_ERRORS:
        return RecordOutcome(PERMANENT, code, message or "the conversion is too old", "EVENT_TOO_OLD")
    return RecordOutcome(PERMANENT, code, message or "Google Ads refused the row", name or "INVALID_REQUEST")


_SEVERITY = {SUCCEEDED: 0, RETRYABLE: 1, THROTTLED: 2, PERMANENT: 3}


def _worst(a: RecordOutcome | None, b: RecordOutcome) -> RecordOutcome:
    return b if a is None or _SEVERITY[b.classification] > _SEVERITY[a.classification] else a


def _ads_failures(details: Any) -> list[Mapping[str, Any]]:
    """The GoogleAdsError objects of every GoogleAdsFailure in a Status's ``details``."""
    errors: list[Mapping[str, Any]] = []
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, Mapping) and isinstance(detail.get("errors"), list):
            errors.extend(e for e in detail["errors"] if isinstance(e, Mapping))
    return errors


def _row_index(error: Mapping[str, Any], row_fields: frozenset[str]) -> int | None:
    location = error.get("location")
    elements = location.get("fieldPathElements") if isinstance(location, Mapping) else None
    if isinstance(elements, list) and elements and isinstance(elements[0], Mapping):
        first = elements[0]
        index = first.get("index")
        if first.get("fieldName") in row_fields and isinstance(index, int):
            return index
    return None


def _row_outcomes(status: Mapping[str, Any], row_fields: frozenset[str], rows: int,
                  secrets: Sequence[str]) -> dict[int, RecordOutcome]:
    """Per-row outcomes of a ``partialFailureError``; an error that names no row applies to all."""
    outcomes: dict[int, RecordOutcome] = {}
    for error in _ads_failures(status.get("details")):
        message = error.get("message")
        outcome = classify_row_error(_error_code(error) or "UNKNOWN",
                                     redact(message, secrets)[:300] if isinstance(message, str) else "")
        index = _row_index(error, row_fields)
        targets = [index] if index is not None and 0 <= index < rows else range(rows)
        for i in targets:
            outcomes[i] = _worst(outcomes.get(i), outcome)
    return outcomes


def _duration_seconds(value: Any) -> float | None:
    """Seconds of a protobuf JSON Duration (``"30s"``, ``"1.5s"``)."""
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if match:
            return float(match.group(1))
    return None


def _retry_delay(details: Any) -> float | None:
    """The ``retryDelay`` of a ``google.rpc.RetryInfo`` or of a Google Ads quota error."""
    for detail in details if isinstance(details, list) else ():
        if not isinstance(detail, Mapping):
            continue
        delay = _duration_seconds(detail.get("retryDelay"))
        if delay is not None:
            return delay
        for error in detail.get("errors") or ():
            extra = error.get("details") if isinstance(error, Mapping) else None
            quota = extra.get("quotaErrorDetails") if isinstance(extra, Mapping) else None
            delay = _duration_seconds(quota.get("retryDelay")) if isinstance(quota, Mapping) else None
            if delay is not None:
                return delay
    return None


@dataclass(frozen=True)
class _Refusal:
    """A whole-request error: the outcome of every row, the rows it names with their own
    outcome, and the wait Google asked for."""

    outcome: RecordOutcome
    named_rows: Mapping[int, RecordOutcome] = field(default_factory=dict)
    retry_after: float | None = None


def _refusal(reply: HttpReply, row_re: re.Pattern[str], row_fields: frozenset[str], rows: int,
             secrets: Sequence[str]) -> _Refusal:
    """Classify a reply that is not a success (transport failure or HTTP error)."""
    if reply.transport_failed:
        return _Refusal(RecordOutcome(RETRYABLE, "", reply.error, "TRANSPORT_ERROR"))
    body: Mapping[str, Any] = reply.body if isinstance(reply.body, Mapping) else {}
    found = body.get("error")
    error: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    status = error.get("status") if isinstance(error.get("status"), str) else ""
    details = error.get("details")
    ads_errors = _ads_failures(details)
    reason = ""  # the first field violation's reason says more than ErrorInfo's INVALID_ARGUMENT
    for detail in details if isinstance(details, list) else ():
        violations = detail.get("fieldViolations") if isinstance(detail, Mapping) else None
        if isinstance(violations, list) and violations and isinstance(violations[0], Mapping) \
                and isinstance(violations[0].get("reason"), str):
            reason = violations[0]["reason"]
            break
    for detail in details if isinstance(details, list) else ():
        if not reason and isinstance(detail, Mapping) and isinstance(detail.get("reason"), str):
            reason = detail["reason"]
    code = (_error_code(ads_errors[0]) if ads_errors else "") or reason or status or str(reply.status)
    raw_message = error.get("message")
    message = redact(raw_message, secrets)[:300] if isinstance(raw_message, str) and raw_message else ""
    what = f"HTTP {reply.status}" + (f" {status}" if status else "")
    text = f"{what}: {message}" if message else what

    if reply.status == 401 or status == "UNAUTHENTICATED":
        return _Refusal(RecordOutcome(PERMANENT, code, text, "INVALID_TOKEN"))
    if reply.status == 403 or status == "PERMISSION_DENIED":
        return _Refusal(RecordOutcome(PERMANENT, code, text, "PERMISSION_DENIED"))
    if reply.status == 429 or status == "RESOURCE_EXHAUSTED":
        wait = reply.retry_after_seconds if reply.retry_after_seconds is not None else _retry_delay(details)
        return _Refusal(RecordOutcome(THROTTLED, code, text, "RATE_LIMITED"), retry_after=wait)
    if reply.status >= 500 or reply.status in (408, 409) or status in _TRANSIENT_STATUSES:
        return _Refusal(RecordOutcome(RETRYABLE, code, text, "SERVER_ERROR"))

    named: dict[int, RecordOutcome] = {}
    for ads_error in ads_errors:
        index = _row_index(ads_error, row_fields)
        if index is not None and 0 <= index < rows:
            row_message = ads_error.get("message")
            named[index] = _worst(named.get(index), RecordOutcome(
                PERMANENT, _error_code(ads_error) or code,
                redact(row_message, secrets)[:300] if isinstance(row_message, str) else text, "INVALID_REQUEST"))
    for detail in details if isinstance(details, list) else ():
        violations = detail.get("fieldViolations") if isinstance(detail, Mapping) else None
        for violation in violations if isinstance(violations, list) else ():
            if not isinstance(violation, Mapping):
                continue
            match = row_re.search(str(violation.get("field", "")))
            if match and int(match.group(1)) < rows:
                why = violation.get("reason") or code
                description = violation.get("description")
                named.setdefault(int(match.group(1)), RecordOutcome(
                    PERMANENT, str(why),
                    redact(description, secrets)[:300] if isinstance(description, str) else text, "INVALID_REQUEST"))
    return _Refusal(RecordOutcome(PERMANENT, code, text, "INVALID_REQUEST"), named_rows=named)


def _finish(outcomes: dict[int, RecordOutcome], row_ids: Sequence[Sequence[int]], exchange: _Exchange,
            row_outcome: Callable[[int], RecordOutcome], retry_after: float | None = None) -> BatchResult:
    for i, ids in enumerate(row_ids):
        outcome = row_outcome(i)
        for delivery_id in ids:
            outcomes[delivery_id] = outcome
    reply = exchange.reply
    return BatchResult(outcomes, http_status=reply.status if reply else 0, latency_seconds=exchange.latency,
                       response_excerpt=excerpt(reply, exchange.secrets) if reply else "",
                       retry_after_seconds=retry_after if retry_after is not None else (
                           reply.retry_after_seconds if reply else None),
                       requests=exchange.requests)


def _send_rows(client: httpx.Client, destination: DestinationContext, creds: _Credentials, url: str,
               body: Mapping[str, Any], headers: Mapping[str, str], outcomes: dict[int, RecordOutcome],
               row_ids: Sequence[Sequence[int]], row_re: re.Pattern[str],
               row_fields: frozenset[str]) -> BatchResult:
    """Send ``body`` and give every record its outcome: per row from a ``partialFailureError``
    on success, from the refusal otherwise."""
    exchange = _authorized_post(client, destination, creds, url, body, headers)
    rows = len(row_ids)
    if exchange.auth_failure is not None:
        failure = exchange.auth_failure
        return _finish(outcomes, row_ids, exchange, lambda _: failure)
    reply = exchange.reply
    assert reply is not None
    if 200 <= reply.status < 300:
        payload = reply.body if isinstance(reply.body, Mapping) else {}
        partial = payload.get("partialFailureError")
        failed = _row_outcomes(partial, row_fields, rows, exchange.secrets) if isinstance(partial, Mapping) else {}
        ok = RecordOutcome(SUCCEEDED)
        return _finish(outcomes, row_ids, exchange, lambda i: failed.get(i, ok))
    refusal = _refusal(reply, row_re, row_fields, rows, exchange.secrets)
    if refusal.named_rows:
        others = RecordOutcome(RETRYABLE, refusal.outcome.platform_error_code,
                               "not processed: Google refused the request for other rows", "BATCH_REJECTED")
        return _finish(outcomes, row_ids, exchange, lambda i: refusal.named_rows.get(i, others))
    return _finish(outcomes, row_ids, exchange, lambda _: refusal.outcome, refusal.retry_after)


def _everyone(records: Sequence[Conversion] | Sequence[AudienceChange] | Sequence[TraitUpdate],
              outcome: RecordOutcome) -> BatchResult:
    """Every record gets ``outcome`` and nothing is sent."""
    return BatchResult({r.delivery_id: outcome for r in records}, requests=0)


# -- shared payload pieces ---------------------------------------------------------------------

def _digits(value: Any) -> str:
    """An account ID as Google wants it: digits only (``123-456-7890`` → ``1234567890``)."""
    return str(value).replace("-", "").strip() if value is not None else ""


def _hashes(values: Sequence[str]) -> list[str]:
    """The well-formed SHA-256 hex digests of ``values``, in order, without repeats."""
    seen: dict[str, None] = {}
    for value in values:
        if isinstance(value, str) and _HASH_RE.fullmatch(value):
            seen.setdefault(value, None)
    return list(seen)


def _identifiers(emails: Sequence[str], phones: Sequence[str], limit: int) -> list[tuple[str, str]]:
    """(kind, hash) pairs alternating email and phone, so both kinds are kept when ``limit`` cuts."""
    pairs: list[tuple[str, str]] = []
    email_list, phone_list = _hashes(emails), _hashes(phones)
    for i in range(max(len(email_list), len(phone_list))):
        if i < len(email_list):
            pairs.append(("email", email_list[i]))
        if i < len(phone_list):
            pairs.append(("phone", phone_list[i]))
    return pairs[:limit]


def _base_url(destination: DestinationContext, default: str) -> str:
    return str(destination.setting("base_url", default)).rstrip("/")


# -- Google Ads conversions --------------------------------------------------------------------

@dataclass(frozen=True)
class _AdsSettings:
    customer_id: str
    login_customer_id: str
    upload: str
    base_url: str
    api_version: str


def _action_resource(value: Any, customer_id: str) -> str | None:
    """``customers/{cid}/conversionActions/{id}`` for an ID or a resource name; ``None`` when
    ``value`` is neither."""
    if isinstance(value, bool) or value is None:
        return None
    text = str(value).strip()
    if text.isdigit():
        return f"customers/{customer_id}/conversionActions/{text}" if customer_id.isdigit() else None
    return text if _ACTION_RESOURCE_RE.fullmatch(text) else None


def _ads_settings(destination: DestinationContext) -> _AdsSettings | str:
    """The Google Ads settings, or what is wrong with them."""
    customer_id = _digits(destination.setting("customer_id"))
    if not customer_id.isdigit():
        return "settings.customer_id must be the Google Ads customer ID (digits, dashes allowed)"
    login = _digits(destination.setting("login_customer_id", ""))
    if login and not login.isdigit():
        return "settings.login_customer_id must be a Google Ads customer ID (digits, dashes allowed)"
    if not isinstance(destination.setting("conversion_actions"), Mapping):
        return "settings.conversion_actions must map canonical events to conversion action IDs"
    upload = str(destination.setting("upload", CLICK_CONVERSIONS))
    if upload not in _UPLOADS:
        return f"settings.upload must be one of {', '.join(_UPLOADS)}"
    return _AdsSettings(customer_id, login, upload, _base_url(destination, ADS_BASE_URL),
                        str(destination.setting("api_version", ADS_API_VERSION)))


def _date_time(micros: int) -> str:
    """Google's ``yyyy-mm-dd hh:mm:ss+00:00`` in UTC."""
    return datetime.fromtimestamp(micros // 1_000_000, UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")


def _context_text(record: Conversion, key: str) -> str:
    value = record.context.get(key)
    return value.strip() if isinstance(value, str) else ""


def _click_ids(record: Conversion) -> dict[str, str]:
    """The click ID to send: ``gclid``, else one braid (``wbraid`` for web events, ``gbraid``
    otherwise when both are known: Google refuses both at once)."""
    gclid = _context_text(record, "gclid")
    if gclid:
        return {"gclid": gclid}
    gbraid, wbraid = _context_text(record, "gbraid"), _context_text(record, "wbraid")
    if gbraid and wbraid:
        return {"wbraid": wbraid} if record.action_source == "website" else {"gbraid": gbraid}
    if gbraid:
        return {"gbraid": gbraid}
    return {"wbraid": wbraid} if wbraid else {}


def _ads_user_identifiers(record: Conversion) -> list[dict[str, str]]:
    key = {"email": "hashedEmail", "phone": "hashedPhoneNumber"}
    return [{"userIdentifierSource": "FIRST_PARTY", key[kind]: value}
            for kind, value in _identifiers(record.keys.google_emails, record.keys.phones_e164, ADS_MAX_IDENTIFIERS)]


def _money(record: Conversion) -> dict[str, Any] | str:
    """``conversionValue``/``currencyCode`` fields, or what is wrong with the value."""
    money: dict[str, Any] = {}
    if record.value not in (None, ""):
        try:
            value = float(Decimal(str(record.value)))
        except (InvalidOperation, ValueError):
            return "the value is not a number"
        if not math.isfinite(value):
            return "the value is not a finite number"
        money["conversionValue"] = value
        if record.currency:
            currency = record.currency.strip().upper()
            if not _CURRENCY_RE.fullmatch(currency):
                return "the currency is not an ISO 4217 code"
            money["currencyCode"] = currency
    return money


class GoogleAdsConversionsAdapter:
    """Conversions to a Google Ads customer: click conversions, or enhancements for web."""

    kind = "GOOGLE_ADS_CONVERSIONS"
    batch_limit = ADS_BATCH_LIMIT

    def platform_event(self, event: str, settings: Mapping[str, Any]) -> str | None:
        """The conversion action resource name ``event`` is uploaded to; ``None`` without one."""
        actions = settings.get("conversion_actions")
        if not isinstance(actions, Mapping):
            return None
        return _action_resource(actions.get(event), _digits(settings.get("customer_id")))

    def max_age_seconds(self, settings: Mapping[str, Any], action_source: str) -> int | None:
        if settings.get("upload") == ENHANCEMENTS:
            return ENHANCEMENT_MAX_AGE_SECONDS
        return CLICK_CONVERSION_MAX_AGE_SECONDS

    def send_conversions(self, client: httpx.Client, destination: DestinationContext,
                         records: Sequence[Conversion]) -> BatchResult:
        parsed = _ads_settings(destination)
        if isinstance(parsed, str):
            return _everyone(records, RecordOutcome(PERMANENT, "", parsed, "INVALID_SETTINGS"))
        creds = _credentials(destination)
        missing = _missing_credentials(creds, developer_token=True)
        if missing:
            return _everyone(records, RecordOutcome(PERMANENT, "", missing, "MISSING_CREDENTIALS"))

        enhancements = parsed.upload == ENHANCEMENTS
        max_age = ENHANCEMENT_MAX_AGE_SECONDS if enhancements else CLICK_CONVERSION_MAX_AGE_SECONDS
        oldest_us = int((time.time() - max_age) * 1_000_000)
        outcomes: dict[int, RecordOutcome] = {}
        rows: list[dict[str, Any]] = []
        row_ids: list[list[int]] = []
        by_order: dict[tuple[str, str], int] = {}
        for record in records:
            row = self._row(record, destination.settings, enhancements, oldest_us)
            if isinstance(row, RecordOutcome):
                outcomes[record.delivery_id] = row
                continue
            key = (row["conversionAction"], row["orderId"])
            if key in by_order:  # the same conversion twice: Google keeps one, so send one
                row_ids[by_order[key]].append(record.delivery_id)
                continue
            by_order[key] = len(rows)
            rows.append(row)
            row_ids.append([record.delivery_id])
        if not rows:
            return BatchResult(outcomes, requests=0)

        method, rows_field = (("uploadConversionAdjustments", "conversionAdjustments") if enhancements
                              else ("uploadClickConversions", "conversions"))
        url = f"{parsed.base_url}/{parsed.api_version}/customers/{parsed.customer_id}:{method}"
        headers = {"developer-token": creds.developer_token}
        if parsed.login_customer_id:
            headers["login-customer-id"] = parsed.login_customer_id
        body = {rows_field: rows, "partialFailure": True}
        return _send_rows(client, destination, creds, url, body, headers, outcomes, row_ids, _CONVERSION_ROW_RE,
                          frozenset({"conversions", "conversion_adjustments", "conversionAdjustments"}))

    def send_audience(self, client: httpx.Client, destination: DestinationContext, action: str,
                      records: Sequence[AudienceChange], session: ReplaceSession | None = None) -> BatchResult:
        return _everyone(records, RecordOutcome(PERMANENT, "", f"{self.kind} sends conversions, not audiences",
                                                "NOT_SUPPORTED"))

    def send_traits(self, client: httpx.Client, destination: DestinationContext,
                    records: Sequence[TraitUpdate]) -> BatchResult:
        return _everyone(records, RecordOutcome(PERMANENT, "", f"{self.kind} sends conversions, not traits",
                                                "NOT_SUPPORTED"))

    def _row(self, record: Conversion, settings: Mapping[str, Any], enhancements: bool,
             oldest_us: int) -> dict[str, Any] | RecordOutcome:
        """The click conversion or adjustment for ``record``, or why it cannot be sent."""
        action = self.platform_event(record.event, settings)
        if action is None:
            return RecordOutcome(PERMANENT, "", f"no conversion action is configured for event {record.event!r}",
                                 "NO_CONVERSION_ACTION")
        if record.occurred_us < oldest_us:
            return RecordOutcome(PERMANENT, "", "the event is older than Google accepts for this upload",
                                 "EVENT_TOO_OLD")
        identifiers = _ads_user_identifiers(record)
        when = _date_time(record.occurred_us)
        if enhancements:
            if not record.order_id:
                return RecordOutcome(PERMANENT, "", "enhanced conversions for web need the order (transaction) ID "
                                                    "the tag recorded", "MISSING_ORDER_ID")
            if not identifiers:
                return RecordOutcome(PERMANENT, "", "no hashed email or phone for Google", "NO_MATCH_KEYS")
            adjustment: dict[str, Any] = {"adjustmentType": "ENHANCEMENT", "conversionAction": action,
                                          "orderId": record.order_id, "gclidDateTimePair": {
                                              "conversionDateTime": when}, "userIdentifiers": identifiers}
            user_agent = _context_text(record, "user_agent")
            if user_agent:
                adjustment["userAgent"] = user_agent
            return adjustment
        clicks = _click_ids(record)
        if not clicks and not identifiers:
            return RecordOutcome(PERMANENT, "", "no click ID and no hashed email or phone for Google",
                                 "NO_MATCH_KEYS")
        money = _money(record)
        if isinstance(money, str):
            return RecordOutcome(PERMANENT, "", money, "INVALID_VALUE")
        conversion: dict[str, Any] = {"conversionAction": action, "conversionDateTime": when, **money,
                                      "orderId": record.order_id or record.event_id, **clicks}
        if identifiers:
            conversion["userIdentifiers"] = identifiers
        grant = record.consent.get("ad_user_data")
        if grant is not None:
            conversion["consent"] = {"adUserData": "GRANTED" if grant else "DENIED"}
        return conversion


# -- Data Manager audiences --------------------------------------------------------------------

def _product_account(account_type: Any, account_id: Any) -> dict[str, str]:
    kind = str(account_type or "GOOGLE_ADS")
    return {"accountType": kind, "accountId": _digits(account_id) if kind == "GOOGLE_ADS" else str(account_id)}


def _data_manager_destination(destination: DestinationContext) -> dict[str, Any] | str:
    """The request's ``Destination``, or what is wrong with the settings."""
    account_id = destination.setting("operating_account_id")
    list_id = destination.setting("product_destination_id")
    account_type = destination.setting("operating_account_type", "GOOGLE_ADS")
    if account_id is None or list_id is None:
        return "settings.operating_account_id and settings.product_destination_id are required"
    if account_type not in _ACCOUNT_TYPES:
        return f"settings.operating_account_type must be one of {', '.join(_ACCOUNT_TYPES)}"
    result: dict[str, Any] = {"operatingAccount": _product_account(account_type, account_id),
                              "productDestinationId": str(list_id)}
    login_id = destination.setting("login_account_id")
    if login_id is not None:
        login_type = destination.setting("login_account_type", "GOOGLE_ADS")
        if login_type not in _ACCOUNT_TYPES:
            return f"settings.login_account_type must be one of {', '.join(_ACCOUNT_TYPES)}"
        result["loginAccount"] = _product_account(login_type, login_id)
    return result


class GoogleDataManagerAudienceAdapter:
    """Customer Match membership through the Data Manager API."""

    kind = "GOOGLE_DATA_MANAGER_AUDIENCE"
    batch_limit = DATA_MANAGER_BATCH_LIMIT

    def platform_event(self, event: str, settings: Mapping[str, Any]) -> str | None:
        return None

    def max_age_seconds(self, settings: Mapping[str, Any], action_source: str) -> int | None:
        return None

    def send_conversions(self, client: httpx.Client, destination: DestinationContext,
                         records: Sequence[Conversion]) -> BatchResult:
        return _everyone(records, RecordOutcome(PERMANENT, "", f"{self.kind} sends audiences, not conversions",
                                                "NOT_SUPPORTED"))

    def send_traits(self, client: httpx.Client, destination: DestinationContext,
                    records: Sequence[TraitUpdate]) -> BatchResult:
        return _everyone(records, RecordOutcome(PERMANENT, "", f"{self.kind} sends audiences, not traits",
                                                "NOT_SUPPORTED"))

    def send_audience(self, client: httpx.Client, destination: DestinationContext, action: str,
                      records: Sequence[AudienceChange], session: ReplaceSession | None = None) -> BatchResult:
        """Ingest (``add``, also for every batch of a replacement) or remove ``records``."""
        if action not in ("add", "remove"):
            return _everyone(records, RecordOutcome(PERMANENT, "", f"unknown audience action {action!r}",
                                                    "NOT_SUPPORTED"))
        target = _data_manager_destination(destination)
        if isinstance(target, str):
            return _everyone(records, RecordOutcome(PERMANENT, "", target, "INVALID_SETTINGS"))
        creds = _credentials(destination)
        missing = _missing_credentials(creds, developer_token=False)
        if missing:
            return _everyone(records, RecordOutcome(PERMANENT, "", missing, "MISSING_CREDENTIALS"))

        outcomes: dict[int, RecordOutcome] = {}
        members: list[dict[str, Any]] = []
        row_ids: list[list[int]] = []
        key = {"email": "emailAddress", "phone": "phoneNumber"}
        for record in records:
            identifiers = _identifiers(record.keys.google_emails, record.keys.phones_e164,
                                       DATA_MANAGER_MAX_IDENTIFIERS)
            if not identifiers:
                outcomes[record.delivery_id] = RecordOutcome(PERMANENT, "", "no hashed email or phone for Google",
                                                             "NO_MATCH_KEYS")
                continue
            members.append({"userData": {"userIdentifiers": [{key[kind]: value} for kind, value in identifiers]}})
            row_ids.append([record.delivery_id])
        if not members:
            return BatchResult(outcomes, requests=0)

        body: dict[str, Any] = {"destinations": [target], "audienceMembers": members, "encoding": "HEX"}
        if action == "add":
            body["consent"] = {"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_GRANTED"}
        url = (f"{_base_url(destination, DATA_MANAGER_BASE_URL)}/"
               f"{destination.setting('api_version', DATA_MANAGER_API_VERSION)}/audienceMembers:"
               f"{'ingest' if action == 'add' else 'remove'}")
        return _send_rows(client, destination, creds, url, body, {}, outcomes, row_ids, _MEMBER_ROW_RE,
                          frozenset({"audience_members", "audienceMembers"}))
