"""Helpers shared by the source parsers: JSON loading, timestamps, ids, click IDs.

Everything is pure. Problems are reported as :class:`FieldViolation` values appended to a list the
caller owns (per message), or raised as :class:`PayloadRejected` when the whole payload is unusable.
Descriptions never quote the offending value: it may be an email address or a phone number.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

from identity.events.incoming import IncomingEvent
from stitchgraph.errors import FieldViolation

#: Click IDs read from a landing-page URL's query string.
URL_CLICK_IDS = ("gclid", "gbraid", "wbraid", "ttclid")
#: Explicit click-ID keys (a field or property) → context key. Cookie names (``_fbp``) map to theirs.
EXPLICIT_CLICK_IDS = {
    "fbp": "fbp",
    "_fbp": "fbp",
    "fbc": "fbc",
    "_fbc": "fbc",
    "gclid": "gclid",
    "gbraid": "gbraid",
    "wbraid": "wbraid",
    "ttclid": "ttclid",
    "ttp": "ttp",
    "_ttp": "ttp",
}

_TIMESTAMP_SHAPE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")
_EMAIL_SHAPE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PayloadRejected(Exception):
    """The payload as a whole is unusable (invalid JSON, no batch array ...): nothing of it is stored."""

    def __init__(self, violations: Iterable[FieldViolation]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(v.description for v in self.violations))


def reject(field: str, description: str, reason: str) -> NoReturn:
    """Raise :class:`PayloadRejected` with one payload-level violation."""
    raise PayloadRejected([FieldViolation(field, description, reason)])


# --- JSON -------------------------------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def load_json(payload: str) -> Any:
    """Decode a JSON payload with numbers as ``int``/``Decimal`` (never ``float``, so money stays
    exact) and ``NaN``/``Infinity`` refused. Raises :class:`PayloadRejected` (field ``""``,
    reason ``INVALID_JSON``)."""
    try:
        return json.loads(payload, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        reject("", f"the payload is not valid JSON ({reason})", "INVALID_JSON")


def unpack_batch(data: Any, key: str) -> tuple[list[Any], dict[str, Any]]:
    """Split a decoded payload into its messages and the batch envelope.

    Accepts one message object, an object with a ``key`` array (the envelope is that object), or a
    bare array of messages (empty envelope). Raises :class:`PayloadRejected` for anything else or
    an empty batch.
    """
    if isinstance(data, list):
        items, envelope = data, {}
    elif isinstance(data, dict) and key in data:
        items, envelope = data[key], data
        if not isinstance(items, list):
            reject(key, f"{key} must be an array of messages", "INVALID_TYPE")
    elif isinstance(data, dict):
        return [data], {}
    else:
        reject("", "the payload must be a JSON object or an array of objects", "INVALID_TYPE")
    if not items:
        reject(key, f"{key} must contain at least one message", "EMPTY_BATCH")
    return items, envelope


def not_an_object(source: str, received_at: datetime) -> IncomingEvent:
    """The message for a batch element that is not a JSON object (reported at its position)."""
    return IncomingEvent(
        kind="track",
        source_event="",
        source=source,
        occurred_at=received_at,
        violations=[FieldViolation("", "each message must be a JSON object", "INVALID_TYPE")],
    )


def object_field(
    container: Mapping[str, Any], key: str, field: str, violations: list[FieldViolation]
) -> dict[str, Any]:
    """``container[key]`` as a fresh dict: ``{}`` when absent or null, a violation when not an object."""
    value = container.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        violations.append(FieldViolation(field, f"{field} must be a JSON object", "INVALID_TYPE"))
        return {}
    return dict(value)


def nested(container: Mapping[str, Any], *keys: str) -> Any:
    """``container[k1][k2]...``, or ``None`` as soon as a level is missing or not an object."""
    value: Any = container
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def text(value: Any) -> str | None:
    """A non-empty string, else ``None`` (for optional descriptive fields: URLs, user agents ...)."""
    return value if isinstance(value, str) and value else None


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` overlaid with ``override``; nested objects merge, ``override`` wins on conflicts."""
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


# --- Timestamps -------------------------------------------------------------------------------


def as_utc(moment: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def parse_timestamp(value: Any, field: str, violations: list[FieldViolation]) -> datetime | None:
    """An ISO-8601 date-time string as an aware UTC datetime; ``None`` when absent or invalid.

    Accepts ``Z`` or numeric offsets and any number of fractional digits (beyond microseconds
    truncated); a value without an offset is taken as UTC. A date without a time, epoch numbers and
    anything else are a violation (reason ``INVALID_TIMESTAMP``).
    """
    if value is None:
        return None
    if isinstance(value, str) and _TIMESTAMP_SHAPE.match(value):
        try:
            return as_utc(datetime.fromisoformat(value))
        except (ValueError, OverflowError):
            pass
    violations.append(
        FieldViolation(
            field, f"{field} must be an ISO-8601 date-time such as 2024-05-01T12:00:00Z", "INVALID_TIMESTAMP"
        )
    )
    return None


def skew_corrected(received_at: datetime, sent_at: datetime, client_time: datetime) -> datetime | None:
    """The event time on the server clock: ``received_at - (sent_at - client_time)``.

    ``sent_at`` and ``client_time`` come from the same (possibly wrong) client clock, so their
    difference is how long before sending the event happened; that delay is trusted, the client
    clock is not. ``None`` if the result is out of range.
    """
    try:
        return received_at - (sent_at - client_time)
    except OverflowError:
        return None


def minus_milliseconds(moment: datetime, milliseconds: int) -> datetime | None:
    """``moment`` minus a millisecond offset; ``None`` if out of range."""
    try:
        return moment - timedelta(milliseconds=milliseconds)
    except OverflowError:
        return None


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch."""
    return (as_utc(moment) - _EPOCH) // timedelta(milliseconds=1)


# --- Ids --------------------------------------------------------------------------------------


def coerce_id(value: Any, field: str, violations: list[FieldViolation]) -> str | None:
    """An identifier-like value as a string: strings as-is, integers in decimal.

    ``None`` when absent, null or the empty string (callers decide whether that is ``REQUIRED``).
    Floats, booleans, objects and arrays are a violation (reason ``INVALID_TYPE``): ``1e3`` or
    ``true`` as an id is a sender bug, not a value to store. Junk values ("undefined", "null")
    are not filtered here: the pipeline does that with its blocklist.
    """
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    violations.append(FieldViolation(field, f"{field} must be a string", "INVALID_TYPE"))
    return None


def require_id(
    value: Any, field: str, violations: list[FieldViolation], *, max_length: int | None = None
) -> str | None:
    """:func:`coerce_id` for a required id: missing is ``REQUIRED``, too long is ``TOO_LONG``.

    A too-long value is still returned so the message keeps its identity for reporting.
    """
    if value is None or value == "":
        violations.append(FieldViolation(field, f"{field} is required", "REQUIRED"))
        return None
    result = coerce_id(value, field, violations)
    if result is not None and max_length is not None and len(result) > max_length:
        violations.append(FieldViolation(field, f"{field} must be at most {max_length} characters", "TOO_LONG"))
    return result


def add_identifier(event: IncomingEvent, id_type: str, value: str | None) -> None:
    """Append ``(id_type, value)`` unless empty or already there."""
    if value and (id_type, value) not in event.identifiers:
        event.identifiers.append((id_type, value))


def looks_like_email(value: str) -> bool:
    """A cheap shape check (one ``@``, a dot in the domain, no spaces); validation happens later."""
    return bool(_EMAIL_SHAPE.match(value))


def pop_event_id(properties: dict[str, Any]) -> str:
    """Take ``properties.event_id`` (a non-empty string) out of the properties; "" otherwise
    (a non-string ``event_id`` stays a plain property)."""
    value = properties.get("event_id")
    if isinstance(value, str) and value:
        del properties["event_id"]
        return value
    return ""


def library_label(name: Any, version: Any) -> str | None:
    """``"name/version"`` (or just ``"name"``) for ``metadata.library``."""
    label = text(name)
    if label is None:
        return None
    version_text = text(version)
    return f"{label}/{version_text}" if version_text else label


# --- Click IDs --------------------------------------------------------------------------------


def event_name(raw: Mapping[str, Any], violations: list[FieldViolation], *, missing: str = "event is required",
               max_length: int | None = None) -> str:
    """``raw["event"]`` as a name, or "" with a violation (``missing`` when absent)."""
    name = raw.get("event")
    if name is None or name == "":
        violations.append(FieldViolation("event", missing, "REQUIRED"))
        return ""
    if not isinstance(name, str):
        violations.append(FieldViolation("event", "event must be a string", "INVALID_TYPE"))
        return ""
    if max_length is not None and len(name) > max_length:
        violations.append(FieldViolation("event", f"event must be at most {max_length} characters", "TOO_LONG"))
    return name


def click_ids_from_url(url: str) -> dict[str, str]:
    """``gclid``/``gbraid``/``wbraid``/``ttclid``/``fbclid`` from a URL's query string (first
    non-empty value of each); ``{}`` for a URL that does not parse."""
    try:
        query = parse_qs(urlsplit(url).query)
    except ValueError:
        return {}
    found: dict[str, str] = {}
    for key in (*URL_CLICK_IDS, "fbclid"):
        values = [v for v in query.get(key, []) if v]
        if values:
            found[key] = values[0]
    return found


def apply_click_ids(
    context: dict[str, Any],
    explicit: Iterable[Mapping[str, Any]],
    page_url: str | None,
    occurred_at: datetime | None,
) -> None:
    """Fill click-ID context keys.

    Explicit values win (``fbp``/``_fbp``, ``fbc``/``_fbc``, ``gclid``, ``gbraid``, ``wbraid``,
    ``ttclid``, ``ttp``/``_ttp``, searched in ``explicit`` in order); missing Google/TikTok IDs are
    read from the page URL. With an ``fbclid`` (property or URL) and no ``fbc``, ``fbc`` is built
    in Meta's documented format ``fb.1.<creation time in ms>.<fbclid>``, the creation time being
    when the click was first seen, i.e. the event time.
    """
    sources = list(explicit)
    for mapping in sources:
        for key, target in EXPLICIT_CLICK_IDS.items():
            value = text(mapping.get(key))
            if value and target not in context:
                context[target] = value
    from_url = click_ids_from_url(page_url) if page_url else {}
    for key in URL_CLICK_IDS:
        if key not in context and key in from_url:
            context[key] = from_url[key]
    fbclid = next((v for v in (text(m.get("fbclid")) for m in sources) if v), None) or from_url.get("fbclid")
    if fbclid and "fbc" not in context and occurred_at is not None:
        context["fbc"] = f"fb.1.{epoch_ms(occurred_at)}.{fbclid}"
