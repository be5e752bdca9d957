"""TikTok: conversions through the Events API 2.0 and audience membership through the
Segment API, both on the TikTok API for Business (``specs/destinations.md`` §3).

Both endpoints answer in one envelope, ``{"code", "message", "request_id", "data"}``, and
usually with HTTP 200 even when they refuse the request: the body ``code`` decides (0 is
success), the HTTP status only matters for transport trouble, 429 and 5xx. Codes are
classified by :func:`classify_code`:

* 40100 (request rate over the QPS/QPM/QPD limit) is THROTTLED;
* 40101 and 40103-40199 (the access-token family: 40104 token missing, 40105 incorrect or
  revoked) are PERMANENT ``INVALID_TOKEN``;
* 40001 (no permission for the advertiser or pixel), 40102 and 40007 (the object does not
  exist or the token cannot see it) are PERMANENT ``PERMISSION_DENIED``: all three need
  someone to fix the destination, not the data;
* every other 4xxxx (40002 parameter error above all) is PERMANENT ``INVALID_REQUEST``;
* 5xxxx (50000 internal error, 50002 service busy) is RETRYABLE.

TikTok fails the whole batch for one bad event, so the adapters pre-validate every record
and leave out the ones TikTok would refuse. When TikTok still refuses a batch and its
message names the offending row (``data[3]...``, ``batch_data[7]...``), only that record
fails permanently; the others are RETRYABLE (``BATCH_REJECTED``) and go out again without it.

Choices made where TikTok's documentation is silent or moving:

* Event names follow the standard events unified in May 2025: ``Lead`` (formerly
  ``SubmitForm``) and ``Purchase`` (formerly ``CompletePayment``); TikTok still converts the
  legacy names, so ``event_names`` may send them. ``StartTrial`` is standard since then.
  ``page_view`` is not sent by default: ``Pageview`` is the pixel's automatic page event,
  not a standard event, and page views belong to the pixel (override to send them).
* No age limit is documented for web, app or CRM events; offline events must have occurred
  within the previous 28 days (TikTok partners' documentation of the offline Events API),
  so that window is enforced for ``event_source = offline`` only.
* The Segment API documents no per-request limit: 1,000 persons per request, each person
  at most :data:`MAX_ROWS_PER_PERSON` rows, keeps a request under 10,000 rows.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
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
    sha256_hex,
    transport_outcome,
)

__all__ = [
    "DEFAULT_API_VERSION",
    "DEFAULT_BASE_URL",
    "EVENT_SOURCES",
    "OFFLINE_MAX_AGE_SECONDS",
    "STANDARD_EVENTS",
    "TikTokAudienceAdapter",
    "TikTokEventsAdapter",
    "classify_code",
    "classify_reply",
]

DEFAULT_BASE_URL = "https://business-api.tiktok.com"
DEFAULT_API_VERSION = "v1.3"
BATCH_LIMIT = 1000

#: ``event_source`` values of the Events API; ``web`` when the destination names none.
EVENT_SOURCES = ("web", "app", "offline", "crm")
DEFAULT_EVENT_SOURCE = "web"
#: Offline events older than this are not matched to ads (28-day click-through window).
OFFLINE_MAX_AGE_SECONDS = 28 * 24 * 3600
#: How far ahead of our clock an event time may be before TikTok would refuse the batch.
FUTURE_TOLERANCE_SECONDS = 10 * 60

#: Canonical events and TikTok's standard event names (None: not sent unless overridden).
STANDARD_EVENTS: Mapping[str, str | None] = {
    "sign_up": "CompleteRegistration",
    "lead": "Lead",
    "qualify_lead": None,
    "start_trial": "StartTrial",
    "view_content": "ViewContent",
    "add_to_cart": "AddToCart",
    "begin_checkout": "InitiateCheckout",
    "add_payment_info": "AddPaymentInfo",
    "purchase": "Purchase",
    "refund": None,
    "page_view": None,
    "profile_update": None,
}

#: Segment API identifier slots, in the order every ``batch_data`` row follows.
ID_SCHEMA = ("EMAIL_SHA256", "PHONE_SHA256")
#: Most rows one person contributes to a mapping request (one per email/phone pair).
MAX_ROWS_PER_PERSON = 10

CODE_OK = 0
CODE_RATE_LIMITED = 40100
_PERMISSION_CODES = frozenset({40001, 40007, 40102})

_HASH_RE = re.compile(r"[0-9a-f]{64}")
_CURRENCY_RE = re.compile(r"[A-Za-z]{3}")
_ROW_INDEX_RE = re.compile(r"(?<![A-Za-z_])(?:data|batch_data)\[(\d+)\]")


# -- classification (pure) --------------------------------------------------------------------

def classify_code(code: int, message: str = "") -> RecordOutcome:
    """The outcome of a non-zero TikTok body ``code``; ``message`` (already redacted) goes
    into the error text."""
    text = f"TikTok code {code}" + (f": {message}" if message else "")
    platform_code = str(code)
    if code == CODE_RATE_LIMITED:
        return RecordOutcome(THROTTLED, platform_code, text, "RATE_LIMITED")
    if code in _PERMISSION_CODES:
        return RecordOutcome(PERMANENT, platform_code, text, "PERMISSION_DENIED")
    if 40100 < code < 40200:
        return RecordOutcome(PERMANENT, platform_code, text, "INVALID_TOKEN")
    if 40000 <= code < 50000:
        return RecordOutcome(PERMANENT, platform_code, text, "INVALID_REQUEST")
    if 50000 <= code < 60000:
        return RecordOutcome(RETRYABLE, platform_code, text, "PLATFORM_ERROR")
    return RecordOutcome(PERMANENT, platform_code, text, "PLATFORM_ERROR")


def classify_reply(reply: HttpReply, secrets: Sequence[str] = ()) -> RecordOutcome | None:
    """The outcome of a whole reply, or ``None`` when TikTok accepted the request (HTTP 2xx
    and body code 0). Never raises."""
    failed = transport_outcome(reply)
    body = reply.body if isinstance(reply.body, dict) else {}
    code = body.get("code")
    message = redact(str(body.get("message") or ""), secrets)[:300]
    if failed is not None:
        if reply.status == 429 and isinstance(code, int) and code:
            return RecordOutcome(THROTTLED, str(code), failed.error, "RATE_LIMITED")
        return failed
    if isinstance(code, int) and not isinstance(code, bool):
        if code != CODE_OK:
            return classify_code(code, message)
        if 200 <= reply.status < 300:
            return None
    if reply.status == 401:
        return RecordOutcome(PERMANENT, str(reply.status), "unauthorized (HTTP 401)", "INVALID_TOKEN")
    if reply.status == 403:
        return RecordOutcome(PERMANENT, str(reply.status), "forbidden (HTTP 403)", "PERMISSION_DENIED")
    if 400 <= reply.status < 500:
        return RecordOutcome(PERMANENT, str(reply.status), f"request refused (HTTP {reply.status})",
                             "INVALID_REQUEST")
    # A 2xx without TikTok's envelope: a proxy or an outage page, not TikTok's verdict.
    return RecordOutcome(RETRYABLE, str(reply.status), f"unexpected reply (HTTP {reply.status}) without a "
                                                       "TikTok code", "UNEXPECTED_REPLY")


def _rejected_row(outcome: RecordOutcome, reply: HttpReply) -> int | None:
    """The row index a parameter error names (``data[3].user...``), when there is one."""
    if outcome.status_reason != "INVALID_REQUEST" or not isinstance(reply.body, dict):
        return None
    match = _ROW_INDEX_RE.search(str(reply.body.get("message") or ""))
    return int(match.group(1)) if match else None


def _result(sent: Sequence[int], outcomes: dict[int, RecordOutcome], reply: HttpReply, secrets: Sequence[str],
            row_owners: Sequence[int] | None = None) -> BatchResult:
    """Outcomes for the ``sent`` delivery IDs merged with the pre-validation ``outcomes``.
    ``row_owners`` gives the delivery ID behind each request row (default: one row per sent
    record, in order). A refused batch whose message names one row fails only its record."""
    failure = classify_reply(reply, secrets)
    if failure is None:
        outcomes.update({d: RecordOutcome(SUCCEEDED) for d in sent})
    else:
        owners = sent if row_owners is None else row_owners
        bad = _rejected_row(failure, reply)
        if bad is not None and 0 <= bad < len(owners):
            others = RecordOutcome(RETRYABLE, failure.platform_error_code,
                                   f"batch refused because of another record ({failure.error})", "BATCH_REJECTED")
            outcomes.update({d: others for d in sent})
            outcomes[owners[bad]] = failure
        else:
            outcomes.update({d: failure for d in sent})
    return BatchResult(outcomes, http_status=reply.status, latency_seconds=reply.latency_seconds,
                       response_excerpt=excerpt(reply, secrets), retry_after_seconds=reply.retry_after_seconds)


def _unsent(outcomes: dict[int, RecordOutcome]) -> BatchResult:
    return BatchResult(outcomes, requests=0)


def _unsupported(records: Sequence[Conversion] | Sequence[AudienceChange] | Sequence[TraitUpdate],
                 why: str) -> BatchResult:
    """Every record PERMANENT without a request: the worker asked the wrong kind."""
    return _unsent({r.delivery_id: RecordOutcome(PERMANENT, "", why, "NOT_SUPPORTED") for r in records})


def _hashes(values: Sequence[str]) -> list[str]:
    """The values that are SHA-256 hex digests (lower-cased), de-duplicated in order; anything
    else is dropped, so a raw value can never leave."""
    seen: dict[str, None] = {}
    for value in values:
        folded = value.strip().lower()
        if _HASH_RE.fullmatch(folded):
            seen[folded] = None
    return list(seen)


def _plain(value: Any) -> str | None:
    """A never-hashed field (ip, user agent, ttclid, ttp): a non-empty string that does not
    look like a hash, else ``None`` (TikTok refuses the batch for a hashed one)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or _HASH_RE.fullmatch(text.lower()):
        return None
    return text


def _number(text: Any) -> float | None:
    try:
        number = Decimal(str(text).strip())
    except (InvalidOperation, ValueError):
        return None
    return float(number) if number.is_finite() else None


def _api(destination: DestinationContext, path: str) -> str:
    base = str(destination.setting("base_url", DEFAULT_BASE_URL)).rstrip("/")
    version = str(destination.setting("api_version", DEFAULT_API_VERSION)).strip("/")
    return f"{base}/open_api/{version}/{path}"


def _token(destination: DestinationContext) -> str:
    return destination.secret("token", "access_token")


def _headers(token: str) -> dict[str, str]:
    return {"Access-Token": token, "Content-Type": "application/json"}


# -- Events API -------------------------------------------------------------------------------

class TikTokEventsAdapter:
    """Conversions to ``POST /open_api/{version}/event/track/``.

    Settings: ``event_source_id`` (pixel code or event set ID, required), ``event_source``
    (``web`` | ``app`` | ``offline`` | ``crm``), ``test_event_code``, ``event_names``
    (canonical -> TikTok name; ``""`` or ``null`` stops an event), ``base_url``,
    ``api_version``. Credentials: ``token`` or ``access_token``. Limited Data Use comes per
    record (the worker applies the ``limited_data_use`` setting).
    """

    kind = "TIKTOK_EVENTS"
    batch_limit = BATCH_LIMIT

    def platform_event(self, event: str, settings: Mapping[str, Any]) -> str | None:
        overrides = settings.get("event_names")
        if isinstance(overrides, Mapping) and event in overrides:
            name = overrides[event]
            return name if isinstance(name, str) and name.strip() else None
        return STANDARD_EVENTS.get(event)

    def max_age_seconds(self, settings: Mapping[str, Any], action_source: str) -> int | None:
        # TikTok's event_source is per request (per destination), so it decides, not the
        # record's action_source.
        source = settings.get("event_source") or DEFAULT_EVENT_SOURCE
        return OFFLINE_MAX_AGE_SECONDS if source == "offline" else None

    def send_conversions(self, client: httpx.Client, destination: DestinationContext,
                         records: Sequence[Conversion]) -> BatchResult:
        outcomes: dict[int, RecordOutcome] = {}
        problem = self._destination_problem(destination)
        if problem is not None:
            return _unsent({r.delivery_id: problem for r in records})
        token = _token(destination)
        settings = destination.settings
        now = time.time()
        max_age = self.max_age_seconds(settings, "")
        sent: list[int] = []
        data: list[dict[str, Any]] = []
        for record in records:
            event, outcome = self._event(record, settings, now, max_age)
            if outcome is not None:
                outcomes[record.delivery_id] = outcome
            else:
                assert event is not None
                sent.append(record.delivery_id)
                data.append(event)
        if not data:
            return _unsent(outcomes)
        body: dict[str, Any] = {
            "event_source": settings.get("event_source") or DEFAULT_EVENT_SOURCE,
            "event_source_id": str(destination.setting("event_source_id")),
            "data": data,
        }
        test_code = destination.setting("test_event_code")
        if test_code:
            body["test_event_code"] = str(test_code)
        reply = call(client, "POST", _api(destination, "event/track/"), secrets=[token],
                     timeout=destination.timeout_seconds, json=body, headers=_headers(token))
        return _result(sent, outcomes, reply, [token])

    def send_audience(self, client: httpx.Client, destination: DestinationContext, action: str,
                      records: Sequence[AudienceChange], session: ReplaceSession | None = None) -> BatchResult:
        return _unsupported(records, "TIKTOK_EVENTS sends conversions; audiences go to TIKTOK_AUDIENCE")

    def send_traits(self, client: httpx.Client, destination: DestinationContext,
                    records: Sequence[TraitUpdate]) -> BatchResult:
        return _unsupported(records, "TIKTOK_EVENTS sends conversions, not traits")

    # -- building -------------------------------------------------------------------------

    def _destination_problem(self, destination: DestinationContext) -> RecordOutcome | None:
        if not destination.setting("event_source_id"):
            return RecordOutcome(PERMANENT, "", "settings.event_source_id is required", "MISSING_SETTING")
        source = destination.settings.get("event_source") or DEFAULT_EVENT_SOURCE
        if source not in EVENT_SOURCES:
            return RecordOutcome(PERMANENT, "", f"settings.event_source must be one of {', '.join(EVENT_SOURCES)}",
                                 "INVALID_SETTING")
        if not _token(destination):
            return RecordOutcome(PERMANENT, "", "no access token in the credentials", "INVALID_TOKEN")
        return None

    def _event(self, record: Conversion, settings: Mapping[str, Any], now: float,
               max_age: int | None) -> tuple[dict[str, Any] | None, RecordOutcome | None]:
        """The TikTok event for ``record``, or the PERMANENT outcome that keeps it out."""
        name = self.platform_event(record.event, settings)
        if name is None:
            return None, RecordOutcome(PERMANENT, "", f"event {record.event!r} is not sent to TikTok",
                                       "EVENT_NOT_MAPPED")
        event_time = record.occurred_us // 1_000_000
        if max_age is not None and now - event_time > max_age:
            return None, RecordOutcome(PERMANENT, "", f"event is older than TikTok accepts ({max_age // 86400} days)",
                                       "EVENT_TOO_OLD")
        if event_time - now > FUTURE_TOLERANCE_SECONDS:
            return None, RecordOutcome(PERMANENT, "", "event time is in the future", "EVENT_TIME_IN_FUTURE")
        if not record.event_id:
            return None, RecordOutcome(PERMANENT, "", "event_id is required for deduplication", "MISSING_EVENT_ID")
        user = self._user(record)
        if user is None:
            return None, RecordOutcome(PERMANENT, "", "no email, phone, user ID, ttclid, ttp or IP with user agent "
                                                      "to match the person on", "NO_MATCH_KEYS")
        properties: dict[str, Any] = {}
        if record.value is not None and record.value != "":
            value = _number(record.value)
            if value is None:
                return None, RecordOutcome(PERMANENT, "", "value is not a number", "INVALID_VALUE")
            properties["value"] = value
        if record.currency:
            if not _CURRENCY_RE.fullmatch(record.currency):
                return None, RecordOutcome(PERMANENT, "", "currency must be a three-letter ISO 4217 code",
                                           "INVALID_CURRENCY")
            properties["currency"] = record.currency.upper()
        if record.order_id:
            properties["order_id"] = str(record.order_id)
        contents = [_content(item) for item in record.items]
        contents = [c for c in contents if c]
        if contents:
            properties["content_type"] = "product"
            properties["contents"] = contents
        event: dict[str, Any] = {"event": name, "event_time": event_time, "event_id": str(record.event_id),
                                 "user": user}
        if properties:
            event["properties"] = properties
        page = {key: str(record.context[field]) for key, field in (("url", "page_url"), ("referrer", "referrer"))
                if record.context.get(field)}
        if page:
            event["page"] = page
        event["limited_data_use"] = bool(record.limited_data_use)
        return event, None

    @staticmethod
    def _user(record: Conversion) -> dict[str, Any] | None:
        """TikTok's ``user`` object, or ``None`` when nothing in it could match the person."""
        keys = record.keys
        user: dict[str, Any] = {}
        emails = _hashes(keys.emails)
        if emails:
            user["email"] = emails
        phones = _hashes(keys.phones_e164)
        if phones:
            user["phone"] = phones
        external_ids = list(dict.fromkeys(sha256_hex(u.strip().lower()) for u in keys.user_ids if u.strip()))
        if external_ids:
            user["external_id"] = external_ids
        for field in ("ttclid", "ttp", "ip", "user_agent"):
            value = _plain(record.context.get(field))
            if value is not None:
                user[field] = value
        if not (emails or phones or external_ids or "ttclid" in user or "ttp" in user
                or ("ip" in user and "user_agent" in user)):
            return None
        locale = record.context.get("locale")
        if isinstance(locale, str) and locale.strip():
            user["locale"] = locale.strip()
        return user


def _content(item: Mapping[str, Any]) -> dict[str, Any]:
    """One ``properties.contents`` entry from a canonical item (unusable fields are left out)."""
    content: dict[str, Any] = {}
    for key, field in (("content_id", "item_id"), ("content_name", "name"), ("content_category", "category"),
                       ("brand", "brand")):
        value = item.get(field)
        if value not in (None, ""):
            content[key] = str(value)
    price = _number(item["price"]) if item.get("price") not in (None, "") else None
    if price is not None:
        content["price"] = price
    quantity = item.get("quantity")
    if isinstance(quantity, int) and not isinstance(quantity, bool):
        content["quantity"] = quantity
    return content


# -- Segment API (audiences) ------------------------------------------------------------------

class TikTokAudienceAdapter:
    """Audience membership through ``POST /open_api/{version}/segment/mapping/``.

    Settings: ``advertiser_id`` and ``audience_id`` (required), ``base_url``,
    ``api_version``. Credentials: ``token`` or ``access_token``. Every row follows
    ``id_schema`` ``["EMAIL_SHA256", "PHONE_SHA256"]``; an absent key is sent as ``{}`` so
    rows stay aligned. The Segment API has no replacement upload: with a
    :class:`ReplaceSession` the batch is simply added (members missing from the new list are
    not removed; the engine's remove deltas do that).
    """

    kind = "TIKTOK_AUDIENCE"
    batch_limit = BATCH_LIMIT

    def platform_event(self, event: str, settings: Mapping[str, Any]) -> str | None:
        return None

    def max_age_seconds(self, settings: Mapping[str, Any], action_source: str) -> int | None:
        return None

    def send_conversions(self, client: httpx.Client, destination: DestinationContext,
                         records: Sequence[Conversion]) -> BatchResult:
        return _unsupported(records, "TIKTOK_AUDIENCE holds audience membership; conversions go to TIKTOK_EVENTS")

    def send_traits(self, client: httpx.Client, destination: DestinationContext,
                    records: Sequence[TraitUpdate]) -> BatchResult:
        return _unsupported(records, "TIKTOK_AUDIENCE holds audience membership, not traits")

    def send_audience(self, client: httpx.Client, destination: DestinationContext, action: str,
                      records: Sequence[AudienceChange], session: ReplaceSession | None = None) -> BatchResult:
        token = _token(destination)
        advertiser_id = destination.setting("advertiser_id")
        audience_id = destination.setting("audience_id")
        problem: RecordOutcome | None = None
        if not advertiser_id or not audience_id:
            problem = RecordOutcome(PERMANENT, "", "settings.advertiser_id and settings.audience_id are required",
                                    "MISSING_SETTING")
        elif action not in ("add", "remove"):
            problem = RecordOutcome(PERMANENT, "", f"action must be add or remove, not {action[:32]!r}",
                                    "INVALID_ACTION")
        elif not token:
            problem = RecordOutcome(PERMANENT, "", "no access token in the credentials", "INVALID_TOKEN")
        if problem is not None:
            return _unsent({r.delivery_id: problem for r in records})
        audience_ids = [str(audience_id)]
        outcomes: dict[int, RecordOutcome] = {}
        rows: list[list[dict[str, Any]]] = []
        row_owners: list[int] = []
        sent: list[int] = []
        for record in records:
            emails = _hashes(record.keys.emails)
            phones = _hashes(record.keys.phones_e164)
            if not emails and not phones:
                outcomes[record.delivery_id] = RecordOutcome(PERMANENT, "", "no email or phone hash to match the "
                                                                            "person on", "NO_MATCH_KEYS")
                continue
            sent.append(record.delivery_id)
            for i in range(min(max(len(emails), len(phones)), MAX_ROWS_PER_PERSON)):
                rows.append([{"id": slot[i], "audience_ids": audience_ids} if i < len(slot) else {}
                             for slot in (emails, phones)])
                row_owners.append(record.delivery_id)
        if not rows:
            return _unsent(outcomes)
        body = {"advertiser_ids": [str(advertiser_id)], "action": "add" if action == "add" else "delete",
                "id_schema": list(ID_SCHEMA), "batch_data": rows}
        reply = call(client, "POST", _api(destination, "segment/mapping/"), secrets=[token],
                     timeout=destination.timeout_seconds, json=body, headers=_headers(token))
        return _result(sent, outcomes, reply, [token], row_owners)

