"""PostHog capture payloads (``/i/v0/e/``, ``/capture/``, ``/batch/``) → :class:`ParsedPayload`.

Semantic traps this parser handles (sources-and-consent spec §1):

* **distinct_ids are untyped.** A ``distinct_id`` may be a device UUID or a user id; the type is
  read from the evidence the event carries (see :func:`_type_distinct_id`). When there is none, it
  is typed ``anonymous_id`` and listed in ``inferred_anonymous`` so the pipeline can re-type it.
* **Alias direction.** ``$create_alias``/``$merge_dangerously`` send ``distinct_id`` = the id whose
  person survives (posthog-python ``alias(previous_id, new_id)`` puts ``previous_id`` there) and
  ``properties.alias`` = the new id. The new id is the identified one (``user_id``, in
  ``identified``); the ``distinct_id`` is typed ``anonymous_id`` (guessed, in
  ``inferred_anonymous``). PostHog's capture doc prose states the direction the other way round;
  its code (and this parser) do not.
* **Identified person.** ``$identify`` marks its ``distinct_id`` as identified and folds
  ``$anon_distinct_id`` into it; without ``$anon_distinct_id`` it only applies ``$set``.
* **Personless events.** Only the literal boolean ``$process_person_profile: false`` makes an event
  personless; PostHog drops identity events sent that way, so they are a violation here.
* **Ingestion order, not timestamp order.** PostHog applies ``$set``/``$set_once``/``$unset`` in the
  order events arrive, whatever their ``timestamp``; the trait fields keep the operations as sent
  and leave ordering to the pipeline.
* **Clock skew.** With both ``timestamp`` and ``sent_at`` (client clock), the event time is
  ``received_at - (sent_at - timestamp)``, as PostHog computes it.
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
    event_name,
    library_label,
    load_json,
    minus_milliseconds,
    not_an_object,
    object_field,
    parse_timestamp,
    pop_event_id,
    reject,
    require_id,
    skew_corrected,
    text,
    unpack_batch,
)
from stitchgraph.errors import FieldViolation

#: Capture caps distinct_id at 200 characters.
MAX_DISTINCT_ID_LENGTH = 200
#: ``$lib`` values of server SDKs: their distinct_ids are the application's user ids.
SERVER_LIBRARIES = frozenset(
    {
        "posthog-python",
        "posthog-node",
        "posthog-ruby",
        "posthog-go",
        "posthog-php",
        "posthog-java",
        "posthog-dotnet",
        "posthog-elixir",
        "posthog-rust",
    }
)
BROWSER_LIBRARIES = frozenset({"web", "posthog-js"})
MOBILE_LIBRARIES = frozenset({"posthog-ios", "posthog-android", "posthog-react-native", "posthog-flutter"})
#: Events PostHog drops when sent with ``$process_person_profile: false``.
IDENTITY_EVENTS = frozenset({"$identify", "$create_alias", "$merge_dangerously", "$groupidentify"})
ALIAS_EVENTS = frozenset({"$create_alias", "$merge_dangerously"})
#: posthog-python ``set()``/``set_once()`` events: trait-only.
SET_EVENTS = frozenset({"$set", "$set_once"})
#: Properties consumed into identifiers, traits or ids (``alias`` only on alias events).
CONSUMED_PROPERTIES = ("distinct_id", "$anon_distinct_id", "$device_id", "$set", "$set_once", "$unset", "$insert_id")


def parse(payload: str, *, source: str, received_at: datetime) -> ParsedPayload:
    """Parse one PostHog payload: a single event, a ``/batch/`` body
    ``{api_key, batch, sent_at?, historical_migration?}`` or a bare array of events.

    Payload-level problems (invalid JSON, bad batch, inconsistent ``api_key``, invalid batch
    ``sent_at``) return no messages; per-event problems are on each message's ``violations``.
    """
    received_at = as_utc(received_at)
    try:
        items, envelope = unpack_batch(load_json(payload), "batch")
        _check_api_keys(items, envelope)
        batch_sent_at = _batch_sent_at(envelope)
    except PayloadRejected as exc:
        return ParsedPayload(violations=exc.violations)
    messages = [
        parse_event(item, source=source, received_at=received_at, batch_sent_at=batch_sent_at)
        if isinstance(item, dict)
        else not_an_object(source, received_at)
        for item in items
    ]
    return ParsedPayload(messages=messages)


def _check_api_keys(items: list[Any], envelope: dict[str, Any]) -> None:
    """PostHog rejects a batch whose events carry different tokens (batch-level included)."""
    keys = [envelope.get("api_key")] + [item.get("api_key") for item in items if isinstance(item, dict)]
    distinct = {key if isinstance(key, str) else repr(key) for key in keys if key is not None}
    if len(distinct) > 1:
        reject("api_key", "all events of a batch must carry the same api_key", "INCONSISTENT_API_KEY")


def _batch_sent_at(envelope: dict[str, Any]) -> datetime | None:
    violations: list[FieldViolation] = []
    sent_at = parse_timestamp(envelope.get("sent_at"), "sent_at", violations)
    if violations:
        raise PayloadRejected(violations)
    return sent_at


def parse_event(
    raw: dict[str, Any], *, source: str, received_at: datetime, batch_sent_at: datetime | None = None
) -> IncomingEvent:
    """One PostHog event object → :class:`IncomingEvent` (violations on the event, never raised)."""
    violations: list[FieldViolation] = []
    properties = object_field(raw, "properties", "properties", violations)
    name = event_name(raw, violations)
    event = IncomingEvent(kind=_kind(name), source_event=name, source=source, violations=violations)
    _apply_time(event, raw, received_at, batch_sent_at)
    _apply_traits(event, raw, properties)
    _apply_identity(event, name, _distinct_id(raw, properties, violations), properties)
    event.message_id = coerce_id(raw.get("uuid"), "uuid", violations) or text(properties.get("$insert_id")) or ""
    event.event_id = pop_event_id(properties)
    _apply_context(event, properties)
    for key in CONSUMED_PROPERTIES:
        properties.pop(key, None)
    if name in ALIAS_EVENTS:
        properties.pop("alias", None)
    event.properties = properties
    return event


def _kind(name: str) -> str:
    if name == "$identify" or name in SET_EVENTS:
        return "identify"
    if name in ALIAS_EVENTS:
        return "alias"
    return {"$pageview": "page", "$screen": "screen"}.get(name, "track")


def _distinct_id(raw: dict[str, Any], properties: dict[str, Any], violations: list[FieldViolation]) -> str | None:
    """Top-level ``distinct_id``, else ``properties.distinct_id``; required, at most 200 characters."""
    if raw.get("distinct_id") not in (None, "") or properties.get("distinct_id") in (None, ""):
        return require_id(raw.get("distinct_id"), "distinct_id", violations, max_length=MAX_DISTINCT_ID_LENGTH)
    return require_id(
        properties["distinct_id"], "properties.distinct_id", violations, max_length=MAX_DISTINCT_ID_LENGTH
    )


# --- Time -------------------------------------------------------------------------------------


def _apply_time(
    event: IncomingEvent, raw: dict[str, Any], received_at: datetime, batch_sent_at: datetime | None
) -> None:
    """``timestamp`` skew-corrected by ``sent_at`` (event-level, else batch-level); else
    ``timestamp``; else ``received_at - offset`` (ms); else ``received_at``."""
    violations = event.violations
    timestamp = parse_timestamp(raw.get("timestamp"), "timestamp", violations)
    sent_at = parse_timestamp(raw.get("sent_at"), "sent_at", violations) or batch_sent_at
    if sent_at is not None:
        event.metadata["sent_at"] = sent_at
    if timestamp is not None:
        corrected = skew_corrected(received_at, sent_at, timestamp) if sent_at is not None else None
        event.occurred_at = corrected or timestamp
    elif raw.get("timestamp") is not None:
        return  # invalid timestamp: reported, time unknown
    elif raw.get("offset") is not None:
        event.occurred_at = _offset_time(raw["offset"], received_at, violations)
    else:
        event.occurred_at = received_at


def _offset_time(offset: Any, received_at: datetime, violations: list[FieldViolation]) -> datetime | None:
    if not isinstance(offset, int) or isinstance(offset, bool):
        violations.append(FieldViolation("offset", "offset must be an integer number of milliseconds", "INVALID_TYPE"))
        return None
    moment = minus_milliseconds(received_at, offset)
    if moment is None:
        violations.append(FieldViolation("offset", "offset is out of range", "OUT_OF_RANGE"))
    return moment


# --- Traits -----------------------------------------------------------------------------------


def _apply_traits(event: IncomingEvent, raw: dict[str, Any], properties: dict[str, Any]) -> None:
    """``$set``/``$set_once`` from ``properties`` (winning) and the top level; ``properties.$unset``."""
    violations = event.violations
    for key, target in (("$set", event.trait_set), ("$set_once", event.trait_set_once)):
        target.update(object_field(raw, key, key, violations))
        target.update(object_field(properties, key, f"properties.{key}", violations))
    event.trait_unset = _unset_names(properties.get("$unset"), violations)


def _unset_names(value: Any, violations: list[FieldViolation]) -> list[str]:
    """``$unset`` is an array of property names; an object is accepted as its keys."""
    if value is None:
        return []
    if isinstance(value, dict):
        return list(value)
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return list(value)
    violations.append(
        FieldViolation("properties.$unset", "properties.$unset must be an array of property names", "INVALID_TYPE")
    )
    return []


# --- Identity ---------------------------------------------------------------------------------


def _apply_identity(event: IncomingEvent, name: str, distinct_id: str | None, properties: dict[str, Any]) -> None:
    personless = properties.get("$process_person_profile") is False
    device_id = coerce_id(properties.get("$device_id"), "properties.$device_id", event.violations)
    if personless and name in IDENTITY_EVENTS:
        event.violations.append(
            FieldViolation(
                "properties.$process_person_profile",
                f"{name} cannot be sent with $process_person_profile false (PostHog drops it)",
                "PERSONLESS_IDENTITY_EVENT",
            )
        )
    if name == "$identify":
        _identify(event, distinct_id, properties)
    elif name in ALIAS_EVENTS:
        _alias(event, distinct_id, properties)
    else:
        _type_distinct_id(event, distinct_id, device_id, properties, personless=personless)
        return
    event.personless = personless
    _add_device(event, device_id)


def _identify(event: IncomingEvent, distinct_id: str | None, properties: dict[str, Any]) -> None:
    """``distinct_id`` is the identified user; ``$anon_distinct_id`` the anonymous id folded in."""
    if distinct_id is not None:
        add_identifier(event, "user_id", distinct_id)
        event.identified = frozenset({distinct_id})
    anon = coerce_id(properties.get("$anon_distinct_id"), "properties.$anon_distinct_id", event.violations)
    if anon is not None and anon != distinct_id:
        add_identifier(event, "anonymous_id", anon)


def _alias(event: IncomingEvent, distinct_id: str | None, properties: dict[str, Any]) -> None:
    """``properties.alias`` is the new (identified) id; ``distinct_id`` the previous one, whose type
    is guessed anonymous (the pipeline re-types it when the graph knows it as a user)."""
    alias = require_id(properties.get("alias"), "properties.alias", event.violations, max_length=MAX_DISTINCT_ID_LENGTH)
    if alias is not None:
        add_identifier(event, "user_id", alias)
        event.identified = frozenset({alias})
    if distinct_id is not None and distinct_id != alias:
        add_identifier(event, "anonymous_id", distinct_id)
        event.inferred_anonymous = frozenset({distinct_id})


def _type_distinct_id(
    event: IncomingEvent,
    distinct_id: str | None,
    device_id: str | None,
    properties: dict[str, Any],
    *,
    personless: bool,
) -> None:
    """Type the ``distinct_id`` of an ordinary event, strongest evidence first.

    1. ``$process_person_profile: false`` → anonymous, personless (and nothing else is linked).
    2. ``$is_identified`` (posthog-js) → ``user_id`` if true, else ``anonymous_id``.
    3. ``$device_id`` → equal to ``distinct_id``: anonymous; different: ``distinct_id`` is a user.
    4. A server SDK (``$is_server`` or a server ``$lib``) → ``user_id``.
    5. Otherwise ``anonymous_id``, guessed (``inferred_anonymous``).

    In cases 2 and 3 a ``$device_id`` different from ``distinct_id`` is added as an ``anonymous_id``.
    """
    event.personless = personless
    if distinct_id is None:
        return
    is_identified = properties.get("$is_identified")
    if personless:
        add_identifier(event, "anonymous_id", distinct_id)
        return
    if isinstance(is_identified, bool):
        add_identifier(event, "user_id" if is_identified else "anonymous_id", distinct_id)
    elif device_id is not None:
        add_identifier(event, "anonymous_id" if device_id == distinct_id else "user_id", distinct_id)
    elif properties.get("$is_server") is True or text(properties.get("$lib")) in SERVER_LIBRARIES:
        add_identifier(event, "user_id", distinct_id)
    else:
        add_identifier(event, "anonymous_id", distinct_id)
        event.inferred_anonymous = frozenset({distinct_id})
    _add_device(event, device_id)


def _add_device(event: IncomingEvent, device_id: str | None) -> None:
    """``$device_id`` as an extra ``anonymous_id`` unless already present under any type."""
    if device_id is not None and all(value != device_id for _, value in event.identifiers):
        add_identifier(event, "anonymous_id", device_id)


# --- Context ----------------------------------------------------------------------------------


def _apply_context(event: IncomingEvent, properties: dict[str, Any]) -> None:
    """Context, click IDs, metadata and action source from ``$``-properties (which stay in
    ``properties``). posthog-js sends ``$referrer: "$direct"`` for no referrer: not a URL, skipped."""
    referrer = text(properties.get("$referrer"))
    country = text(properties.get("$geoip_country_code"))
    subdivision = text(properties.get("$geoip_subdivision_1_code"))
    candidates = {
        "ip": text(properties.get("$ip")),
        "user_agent": text(properties.get("$raw_user_agent")) or text(properties.get("$user_agent")),
        "page_url": text(properties.get("$current_url")),
        "referrer": referrer if referrer != "$direct" else None,
        "locale": text(properties.get("$locale")) or text(properties.get("$browser_language")),
        "country_code": country,
        "region_code": f"{country}-{subdivision}" if country and subdivision else None,
    }
    event.context.update({key: value for key, value in candidates.items() if value})
    apply_click_ids(event.context, [properties], event.context.get("page_url"), event.occurred_at)
    session_id = text(properties.get("$session_id"))
    if session_id:
        event.metadata["posthog_session_id"] = session_id
    library = library_label(properties.get("$lib"), properties.get("$lib_version"))
    if library:
        event.metadata["library"] = library
    lib = text(properties.get("$lib"))
    event.action_source = "WEBSITE" if lib in BROWSER_LIBRARIES else "APP" if lib in MOBILE_LIBRARIES else ""
