"""Heap server-side API bodies (``/api/track``, ``/api/add_user_properties`` and their bulk forms)
→ :class:`ParsedPayload`.

Semantic traps this parser handles (sources-and-consent spec §3.1):

* **Two kinds of user id.** ``identity`` is the customer's own id (case-sensitive, often an email
  address) → ``user_id``, or ``email`` when it has the shape of one; ``user_id`` is Heap's numeric
  SDK id → ``heap_user_id``. A track call carries exactly one of them.
* **Endpoint from the body.** The same JSON could be sent to either endpoint; without an explicit
  ``endpoint`` the body decides: ``events`` → bulk track, ``users`` → bulk user properties,
  ``event`` or ``user_id`` → track, anything else → add_user_properties.
* **Overwrite semantics.** Heap user properties overwrite (no set-once, no unset), so they become
  ``trait_set`` only, in the order received.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Protocol

from identity.events.incoming import IncomingEvent, ParsedPayload
from identity.events.sources.common import (
    PayloadRejected,
    add_identifier,
    apply_click_ids,
    as_utc,
    coerce_id,
    event_name,
    load_json,
    looks_like_email,
    not_an_object,
    object_field,
    parse_timestamp,
    pop_event_id,
    reject,
    require_id,
    unpack_batch,
)
from stitchgraph.errors import FieldViolation

MAX_IDENTITY_LENGTH = 255
MAX_EVENT_NAME_LENGTH = 1024

Endpoint = Literal["track", "add_user_properties"]


class _MessageParser(Protocol):
    def __call__(self, raw: dict[str, Any], *, source: str, received_at: datetime) -> IncomingEvent: ...


def parse(payload: str, *, source: str, received_at: datetime, endpoint: Endpoint | None = None) -> ParsedPayload:
    """Parse one Heap body; ``endpoint`` names the API it was sent to when the caller knows it.

    ``app_id`` is required (a payload-level violation otherwise); it is not checked against a
    project here.
    """
    received_at = as_utc(received_at)
    try:
        data = load_json(payload)
        if not isinstance(data, dict):
            reject("", "the payload must be a JSON object", "INVALID_TYPE")
        _check_app_id(data)
        items, parse_message = _unpack(data, endpoint)
    except PayloadRejected as exc:
        return ParsedPayload(violations=exc.violations)
    messages = [
        parse_message(item, source=source, received_at=received_at)
        if isinstance(item, dict)
        else not_an_object(source, received_at)
        for item in items
    ]
    return ParsedPayload(messages=messages)


def _check_app_id(data: dict[str, Any]) -> None:
    violations: list[FieldViolation] = []
    require_id(data.get("app_id"), "app_id", violations)
    if violations:
        raise PayloadRejected(violations)


def _unpack(data: dict[str, Any], endpoint: Endpoint | None) -> tuple[list[Any], _MessageParser]:
    if (endpoint or _detect_endpoint(data)) == "track":
        return unpack_batch(data, "events")[0], parse_track
    return unpack_batch(data, "users")[0], parse_user_properties


def _detect_endpoint(data: dict[str, Any]) -> Endpoint:
    """The API a body without a known endpoint was meant for (see the module docstring)."""
    if "events" in data:
        return "track"
    if "users" in data:
        return "add_user_properties"
    return "track" if "event" in data or "user_id" in data else "add_user_properties"


def parse_track(raw: dict[str, Any], *, source: str, received_at: datetime) -> IncomingEvent:
    """One track event (single body or an element of ``events``)."""
    violations: list[FieldViolation] = []
    name = event_name(raw, violations, max_length=MAX_EVENT_NAME_LENGTH)
    event = IncomingEvent(kind="track", source_event=name, source=source, violations=violations)
    _track_identity(event, raw)
    if raw.get("timestamp") is None:
        event.occurred_at = received_at
    else:
        event.occurred_at = parse_timestamp(raw["timestamp"], "timestamp", violations)
    event.message_id = coerce_id(raw.get("idempotency_key"), "idempotency_key", violations) or ""
    properties = object_field(raw, "properties", "properties", violations)
    event.event_id = pop_event_id(properties)
    apply_click_ids(event.context, [properties], None, event.occurred_at)
    event.properties = properties
    return event


def parse_user_properties(raw: dict[str, Any], *, source: str, received_at: datetime) -> IncomingEvent:
    """One add_user_properties body (or an element of ``users``): traits for ``identity``, set now."""
    violations: list[FieldViolation] = []
    event = IncomingEvent(
        kind="traits",
        source_event="add_user_properties",
        source=source,
        occurred_at=received_at,
        violations=violations,
    )
    _add_identity(event, require_id(raw.get("identity"), "identity", violations, max_length=MAX_IDENTITY_LENGTH))
    if raw.get("properties") is None:
        violations.append(FieldViolation("properties", "properties is required", "REQUIRED"))
    event.trait_set = object_field(raw, "properties", "properties", violations)
    return event


def _track_identity(event: IncomingEvent, raw: dict[str, Any]) -> None:
    """``identity`` XOR ``user_id``; both are still recorded when both are sent (and reported)."""
    violations = event.violations
    has_identity = raw.get("identity") not in (None, "")
    has_user_id = raw.get("user_id") not in (None, "")
    if has_identity and has_user_id:
        violations.append(FieldViolation("user_id", "send either identity or user_id, not both", "MUTUALLY_EXCLUSIVE"))
    elif not has_identity and not has_user_id:
        violations.append(FieldViolation("identity", "identity or user_id is required", "REQUIRED"))
    if has_identity:
        _add_identity(event, require_id(raw["identity"], "identity", violations, max_length=MAX_IDENTITY_LENGTH))
    add_identifier(event, "heap_user_id", coerce_id(raw.get("user_id"), "user_id", violations))


def _add_identity(event: IncomingEvent, identity: str | None) -> None:
    """A Heap ``identity`` is typed ``email`` when it looks like one, else ``user_id``."""
    if identity is not None:
        add_identifier(event, "email" if looks_like_email(identity) else "user_id", identity)
