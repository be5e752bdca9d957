"""Segment and RudderStack messages (HTTP API, ``/v1/batch``, RudderStack webhook) → :class:`ParsedPayload`.

Semantic traps this parser handles (sources-and-consent spec §4):

* **Alias direction.** ``previousId`` is the *old* id (an anonymousId or an earlier userId) and
  ``userId`` the new one. ``previousId`` is typed ``anonymous_id`` only when it equals the
  message's ``anonymousId``; otherwise it is an earlier ``user_id``.
* **Traits location.** Only ``identify`` carries traits at the top level (→ ``trait_set``); on other
  messages traits ride in ``context.traits``, from which only ``email``/``phone`` are taken, as
  identifiers (not traits).
* **Event time.** ``timestamp`` is already skew-corrected by Segment
  (``receivedAt - (sentAt - originalTimestamp)``); raw client messages get the same correction
  here. ``sentAt`` is when the batch was sent, never the event time.
* **Consent presence matters.** ``context.consent.categoryPreferences: {}`` means "consent false for
  every category", unlike an absent one (no enforcement), so an empty map is kept. RudderStack
  evaluates only ``deniedConsentIds``; the parser keeps both lists as sent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from identity.events.incoming import IncomingEvent, ParsedPayload
from identity.events.sources.common import (
    PayloadRejected,
    add_identifier,
    apply_click_ids,
    as_utc,
    coerce_id,
    deep_merge,
    event_name,
    library_label,
    load_json,
    nested,
    not_an_object,
    object_field,
    parse_timestamp,
    pop_event_id,
    require_id,
    skew_corrected,
    text,
    unpack_batch,
)
from stitchgraph.errors import FieldViolation

SUPPORTED_TYPES = frozenset({"track", "identify", "page", "screen", "alias"})
#: RudderStack ``channel`` → action source (``server``/``sources`` → none).
CHANNEL_ACTION_SOURCES = {"web": "WEBSITE", "mobile": "APP"}
MOBILE_DEVICE_TYPES = frozenset({"ios", "android"})
BROWSER_LIBRARIES = frozenset({"analytics.js"})


def parse(payload: str, *, source: str, received_at: datetime) -> ParsedPayload:
    """Parse one message, a ``{batch, sentAt?, context?}`` body or a bare array of messages.

    A batch-level ``context`` is merged under each message's own ``context`` (the message wins);
    a batch-level ``sentAt`` applies to messages without their own.
    """
    received_at = as_utc(received_at)
    try:
        items, envelope = unpack_batch(load_json(payload), "batch")
        batch_sent_at, batch_context = _batch_envelope(envelope)
    except PayloadRejected as exc:
        return ParsedPayload(violations=exc.violations)
    messages = [
        parse_message(
            item, source=source, received_at=received_at, batch_sent_at=batch_sent_at, batch_context=batch_context
        )
        if isinstance(item, dict)
        else not_an_object(source, received_at)
        for item in items
    ]
    return ParsedPayload(messages=messages)


def _batch_envelope(envelope: dict[str, Any]) -> tuple[datetime | None, dict[str, Any]]:
    violations: list[FieldViolation] = []
    sent_at = parse_timestamp(envelope.get("sentAt"), "sentAt", violations)
    context = object_field(envelope, "context", "context", violations)
    if violations:
        raise PayloadRejected(violations)
    return sent_at, context


def parse_message(
    raw: dict[str, Any],
    *,
    source: str,
    received_at: datetime,
    batch_sent_at: datetime | None = None,
    batch_context: dict[str, Any] | None = None,
) -> IncomingEvent:
    """One Segment/RudderStack message → :class:`IncomingEvent` (violations on it, never raised)."""
    violations: list[FieldViolation] = []
    context = deep_merge(batch_context or {}, object_field(raw, "context", "context", violations))
    properties = object_field(raw, "properties", "properties", violations)
    message_type = _message_type(raw, violations)
    kind, name = _kind_and_name(raw, message_type, properties, violations)
    event = IncomingEvent(kind=kind, source_event=name, source=source, violations=violations)
    _apply_time(event, raw, received_at, batch_sent_at)
    _apply_identity(event, raw, message_type, context)
    if message_type == "identify":
        event.trait_set = object_field(raw, "traits", "traits", violations)
    event.message_id = coerce_id(raw.get("messageId"), "messageId", violations) or ""
    event.event_id = pop_event_id(properties)
    _apply_context(event, raw, message_type, context, properties)
    event.consent = _consent(context, violations)
    event.properties = properties
    return event


def _message_type(raw: dict[str, Any], violations: list[FieldViolation]) -> str:
    """The lower-cased ``type``; "" (with a violation) when missing, not a string or unsupported."""
    value = raw.get("type")
    if value is None or value == "":
        violations.append(FieldViolation("type", "type is required", "REQUIRED"))
        return ""
    if not isinstance(value, str):
        violations.append(FieldViolation("type", "type must be a string", "INVALID_TYPE"))
        return ""
    if value.lower() not in SUPPORTED_TYPES:
        violations.append(
            FieldViolation(
                "type", "type must be one of track, identify, page, screen, alias", "UNSUPPORTED_MESSAGE_TYPE"
            )
        )
        return ""
    return value.lower()


def _kind_and_name(
    raw: dict[str, Any], message_type: str, properties: dict[str, Any], violations: list[FieldViolation]
) -> tuple[str, str]:
    """(kind, source_event). Unknown types come back as ("track", the type as sent)."""
    if message_type == "track":
        return "track", event_name(raw, violations, missing="event is required for track messages")
    if message_type in ("page", "screen"):
        for key in ("name", "category"):
            if raw.get(key) is not None:
                properties.setdefault(key, raw[key])
        return message_type, message_type
    if message_type in ("identify", "alias"):
        return message_type, message_type
    sent_type = raw.get("type")
    return "track", sent_type if isinstance(sent_type, str) else ""


# --- Time -------------------------------------------------------------------------------------


def _apply_time(
    event: IncomingEvent, raw: dict[str, Any], received_at: datetime, batch_sent_at: datetime | None
) -> None:
    """``timestamp``; else ``originalTimestamp`` skew-corrected by ``sentAt``; else
    ``originalTimestamp``; else ``receivedAt``; else ``received_at``. An invalid candidate that
    would have been chosen leaves the time unknown (it is reported)."""
    violations = event.violations
    times = {key: parse_timestamp(raw.get(key), key, violations) for key in ("timestamp", "originalTimestamp")}
    sent_at = parse_timestamp(raw.get("sentAt"), "sentAt", violations) or batch_sent_at
    received = parse_timestamp(raw.get("receivedAt"), "receivedAt", violations)
    if sent_at is not None:
        event.metadata["sent_at"] = sent_at
    original = times["originalTimestamp"]
    if raw.get("timestamp") is not None:
        event.occurred_at = times["timestamp"]
    elif raw.get("originalTimestamp") is not None:
        corrected = skew_corrected(received_at, sent_at, original) if original and sent_at else None
        event.occurred_at = corrected or original
    elif raw.get("receivedAt") is not None:
        event.occurred_at = received
    else:
        event.occurred_at = received_at


# --- Identity ---------------------------------------------------------------------------------


def _apply_identity(event: IncomingEvent, raw: dict[str, Any], message_type: str, context: dict[str, Any]) -> None:
    if message_type == "alias":
        _alias(event, raw)
        return
    violations = event.violations
    if raw.get("userId") in (None, "") and raw.get("anonymousId") in (None, ""):
        violations.append(FieldViolation("userId", "userId or anonymousId is required", "REQUIRED"))
    add_identifier(event, "user_id", coerce_id(raw.get("userId"), "userId", violations))
    add_identifier(event, "anonymous_id", coerce_id(raw.get("anonymousId"), "anonymousId", violations))
    if message_type != "identify":
        _context_contact_ids(event, context)


def _alias(event: IncomingEvent, raw: dict[str, Any]) -> None:
    """``userId`` (new) → ``user_id``; ``previousId`` (old) → ``anonymous_id`` if it is this
    message's ``anonymousId``, else ``user_id``; a different ``anonymousId`` → extra ``anonymous_id``."""
    violations = event.violations
    previous = require_id(raw.get("previousId"), "previousId", violations)
    user = require_id(raw.get("userId"), "userId", violations)
    anonymous = coerce_id(raw.get("anonymousId"), "anonymousId", violations)
    add_identifier(event, "user_id", user)
    if previous is not None:
        add_identifier(event, "anonymous_id" if previous == anonymous else "user_id", previous)
    if anonymous != previous:
        add_identifier(event, "anonymous_id", anonymous)


def _context_contact_ids(event: IncomingEvent, context: dict[str, Any]) -> None:
    """Raw ``email``/``phone`` from ``context.traits`` as identifiers (hashed later by the pipeline)."""
    for key in ("email", "phone"):
        add_identifier(event, key, text(nested(context, "traits", key)))


# --- Context and consent ----------------------------------------------------------------------


def _apply_context(
    event: IncomingEvent, raw: dict[str, Any], message_type: str, context: dict[str, Any], properties: dict[str, Any]
) -> None:
    """EventContext fields, click IDs, library metadata and action source."""
    is_page = message_type == "page"
    candidates = {
        "ip": text(context.get("ip")),
        "user_agent": text(context.get("userAgent")),
        "locale": text(context.get("locale")),
        "page_url": text(nested(context, "page", "url")) or (text(properties.get("url")) if is_page else None),
        "referrer": text(nested(context, "page", "referrer"))
        or (text(properties.get("referrer")) if is_page else None),
    }
    event.context.update({key: value for key, value in candidates.items() if value})
    apply_click_ids(event.context, [properties, context], event.context.get("page_url"), event.occurred_at)
    library = library_label(nested(context, "library", "name"), nested(context, "library", "version"))
    if library:
        event.metadata["library"] = library
    event.action_source = _action_source(raw, context)


def _action_source(raw: dict[str, Any], context: dict[str, Any]) -> str:
    """RudderStack ``channel`` first; then a mobile app context; then the analytics.js library."""
    channel = text(raw.get("channel"))
    if channel is not None:
        return CHANNEL_ACTION_SOURCES.get(channel.lower(), "")
    device_type = text(nested(context, "device", "type"))
    if (device_type and device_type.lower() in MOBILE_DEVICE_TYPES) or _has_app(context):
        return "APP"
    if text(nested(context, "library", "name")) in BROWSER_LIBRARIES:
        return "WEBSITE"
    return ""


def _has_app(context: dict[str, Any]) -> bool:
    """Mobile SDKs describe the app (``context.app {name, version, build}``); web and server don't."""
    app = context.get("app")
    return isinstance(app, dict) and bool(app)


def _consent(context: dict[str, Any], violations: list[FieldViolation]) -> dict[str, Any]:
    consent: dict[str, Any] = {}
    segment = _segment_consent(context, violations)
    if segment is not None:
        consent["segment"] = segment
    rudderstack = _rudderstack_consent(context, violations)
    if rudderstack is not None:
        consent["rudderstack"] = rudderstack
    return consent


def _segment_consent(context: dict[str, Any], violations: list[FieldViolation]) -> dict[str, Any] | None:
    """``context.consent.categoryPreferences`` (category id → bool); present-but-empty is kept."""
    preferences = nested(context, "consent", "categoryPreferences")
    if preferences is None:
        return None
    field = "context.consent.categoryPreferences"
    if not isinstance(preferences, dict):
        violations.append(FieldViolation(field, f"{field} must be an object of category id → boolean", "INVALID_TYPE"))
        return None
    valid: dict[str, bool] = {}
    for category, granted in preferences.items():
        if isinstance(granted, bool):
            valid[category] = granted
        else:
            violations.append(
                FieldViolation(f"{field}.{category}", "consent preferences must be booleans", "INVALID_TYPE")
            )
    return {"category_preferences": valid}


def _rudderstack_consent(context: dict[str, Any], violations: list[FieldViolation]) -> dict[str, Any] | None:
    """``context.consentManagement`` → provider, allowed/denied category ids, resolution strategy."""
    management = context.get("consentManagement")
    if management is None:
        return None
    field = "context.consentManagement"
    if not isinstance(management, dict):
        violations.append(FieldViolation(field, f"{field} must be an object", "INVALID_TYPE"))
        return None
    return {
        "provider": text(management.get("provider")) or "",
        "allowed_consent_ids": _consent_ids(
            management.get("allowedConsentIds"), f"{field}.allowedConsentIds", violations
        ),
        "denied_consent_ids": _consent_ids(management.get("deniedConsentIds"), f"{field}.deniedConsentIds", violations),
        "resolution_strategy": text(management.get("resolutionStrategy")) or "",
    }


def _consent_ids(value: Any, field: str, violations: list[FieldViolation]) -> list[str]:
    """An array of category ids (strings; integers accepted). Older RudderStack JS SDKs sent an
    object keyed by category id: its keys are taken."""
    if value is None:
        return []
    if isinstance(value, dict):
        return list(value)
    if isinstance(value, list):
        ids = [coerce_id(item, f"{field}[{index}]", violations) for index, item in enumerate(value)]
        return [item for item in ids if item is not None]
    violations.append(FieldViolation(field, f"{field} must be an array of category ids", "INVALID_TYPE"))
    return []
