"""The schema registry: which source events become which canonical events.

A mapping ``(source, source_event) → canonical_event`` carries the properties the event
must have and a review status; only *approved* mappings apply. A mapping for a specific
source wins over a catch-all one (``source = ""``). A canonical name sent as is (for example
``purchase`` from a gRPC producer) needs no mapping.

Built-in defaults are stored once, at first use, and can then be edited like any other
mapping; a registry file (TOML or JSON) given in the configuration is loaded at start-up
and is authoritative for the mappings it names.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from identity.events.models import EventMappingRow
from identity.models import CounterRow
from stitchgraph.db import insert_ignoring_conflicts
from stitchgraph.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound

#: Canonical events every deployment knows (DESIGN §5); more come from configuration.
CANONICAL_EVENTS = (
    "sign_up", "lead", "qualify_lead", "start_trial", "view_content", "add_to_cart", "begin_checkout",
    "add_payment_info", "purchase", "refund", "page_view", "profile_update",
)
#: Canonical events that carry money and need value, currency and order_id.
MONEY_EVENTS = frozenset({"purchase", "refund"})
MONEY_FIELDS = ("value", "currency", "order_id")

APPROVED = "APPROVED"
DRAFT = "DRAFT"
STATUSES = (DRAFT, APPROVED)

_ID_RE = re.compile(r"[a-z][a-z0-9-]{0,62}")
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SOURCE_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_SEEDED = "event_registry_seeded"


@dataclass(frozen=True)
class Mapping_:
    """One registry entry (the trailing underscore keeps it apart from ``typing.Mapping``)."""

    id: str
    source: str
    source_event: str
    canonical_event: str
    required_properties: tuple[str, ...] = ()
    status: str = APPROVED
    description: str = ""
    property_map: Mapping[str, str] = field(default_factory=dict)
    built_in: bool = False
    create_time: datetime | None = None
    update_time: datetime | None = None
    etag: str = ""

    @property
    def approved(self) -> bool:
        return self.status == APPROVED

    def content_etag(self) -> str:
        material = json.dumps([self.source, self.source_event, self.canonical_event, list(self.required_properties),
                               self.status, self.description, dict(sorted(self.property_map.items()))])
        return hashlib.sha256(material.encode()).hexdigest()[:16]


def _default(mapping_id: str, source_event: str, canonical: str, description: str, source: str = "") -> Mapping_:
    return Mapping_(mapping_id, source, source_event, canonical, status=APPROVED, description=description,
                    built_in=True)


#: Shipped defaults: Segment/RudderStack e-commerce and B2B spec names, message types, PostHog names.
DEFAULT_MAPPINGS: tuple[Mapping_, ...] = (
    _default("default-order-completed", "Order Completed", "purchase", "Segment e-commerce spec"),
    _default("default-purchase-completed", "Purchase Completed", "purchase", "common purchase name"),
    _default("default-order-refunded", "Order Refunded", "refund", "Segment e-commerce spec"),
    _default("default-checkout-started", "Checkout Started", "begin_checkout", "Segment e-commerce spec"),
    _default("default-signed-up", "Signed Up", "sign_up", "Segment B2B SaaS spec"),
    _default("default-lead-submitted", "Lead Submitted", "lead", "lead form submitted"),
    _default("default-lead-form-qualified", "Lead Form Qualified", "qualify_lead", "lead qualified"),
    _default("default-product-viewed", "Product Viewed", "view_content", "Segment e-commerce spec"),
    _default("default-product-added", "Product Added", "add_to_cart", "Segment e-commerce spec"),
    _default("default-trial-started", "Trial Started", "start_trial", "Segment B2B SaaS spec"),
    _default("default-payment-info-completed", "Payment Info Completed", "add_payment_info", "payment info"),
    _default("default-payment-info-entered", "Payment Info Entered", "add_payment_info",
             "Segment e-commerce spec name"),
    _default("default-page", "page", "page_view", "Segment/RudderStack page message"),
    _default("default-screen", "screen", "page_view", "Segment/RudderStack screen message (an app's page)"),
    _default("default-identify", "identify", "profile_update", "Segment/RudderStack identify message"),
    _default("default-posthog-pageview", "$pageview", "page_view", "PostHog page view", source="posthog"),
    _default("default-posthog-screen", "$screen", "page_view", "PostHog screen view", source="posthog"),
    _default("default-posthog-identify", "$identify", "profile_update", "PostHog identify", source="posthog"),
)


@dataclass(frozen=True)
class Resolution:
    """How an incoming event name resolves: a canonical event, or why not."""

    canonical_event: str = ""
    mapping: Mapping_ | None = None
    reason: str = ""  # "" when resolved; UNMAPPED_EVENT | MAPPING_NOT_APPROVED
    detail: str = ""


class SchemaRegistry:
    """Mappings in the store, cached per process and refreshed when any mapping changes."""

    def __init__(self, custom_events: Iterable[str] = ()) -> None:
        self.canonical_events = frozenset(CANONICAL_EVENTS) | frozenset(custom_events)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], Mapping_] | None = None
        self._cache_version: tuple[Any, ...] | None = None

    # -- lookup ---------------------------------------------------------------------------

    def snapshot(self, session: Session) -> dict[tuple[str, str], Mapping_]:
        """Every mapping by (source, source_event), cached while the table is unchanged."""
        version = tuple(session.execute(select(func.count(), func.max(EventMappingRow.update_time),
                                               func.max(EventMappingRow.etag))).one())
        with self._lock:
            if self._cache is None or version != self._cache_version:
                rows = session.execute(select(EventMappingRow)).scalars()
                self._cache = {(r.source, r.source_event): _from_row(r) for r in rows}
                self._cache_version = version
            return self._cache

    def resolve(self, mappings: Mapping[tuple[str, str], Mapping_], source: str, name: str) -> Resolution:
        mapping = mappings.get((source, name)) or mappings.get(("", name))
        if mapping is not None:
            if mapping.approved:
                return Resolution(mapping.canonical_event, mapping)
            return Resolution(mapping=mapping, reason="MAPPING_NOT_APPROVED",
                              detail=f"the mapping {mapping.id!r} for {name!r} is a draft; approve it to accept "
                                     "these events")
        if name in self.canonical_events:
            return Resolution(name)
        shown = name if len(name) <= 80 else name[:77] + "..."
        return Resolution(reason="UNMAPPED_EVENT",
                          detail=f"no approved mapping from source {source!r} event {shown!r} to a canonical "
                                 "event; add one with CreateEventMapping (nothing is guessed)")

    # -- seeding and files ------------------------------------------------------------------

    def seed_defaults(self, session: Session) -> None:
        """Store the shipped defaults once (later edits and deletions are respected)."""
        if session.execute(select(CounterRow.value).where(CounterRow.name == _SEEDED)).scalar() is not None:
            return
        now = datetime.now(UTC)
        for mapping in DEFAULT_MAPPINGS:
            taken = session.execute(select(EventMappingRow.id).where(
                (EventMappingRow.id == mapping.id) | ((EventMappingRow.source == mapping.source)
                                                      & (EventMappingRow.source_event == mapping.source_event)))
            ).first()
            if taken is None:
                session.add(_to_row(replace(mapping, create_time=now, update_time=now)))
        session.flush()
        insert_ignoring_conflicts(session, CounterRow.__table__, {"name": _SEEDED, "value": 1})

    def load_file(self, session: Session, path: str | Path) -> int:
        """Upsert the mappings of a registry file (TOML ``[[mappings]]`` or a JSON list);
        return how many. Raises :class:`InvalidArgument` naming the bad entry."""
        mappings = parse_registry_file(path, self.canonical_events)
        now = datetime.now(UTC)
        for mapping in mappings:
            existing = session.get(EventMappingRow, mapping.id)
            clash = session.execute(select(EventMappingRow).where(
                EventMappingRow.source == mapping.source, EventMappingRow.source_event == mapping.source_event,
                EventMappingRow.id != mapping.id)).scalar_one_or_none()
            if clash is not None:
                session.delete(clash)
                session.flush()
            stored = replace(mapping, built_in=True, create_time=existing.create_time if existing else now,
                             update_time=now)
            if existing is None:
                session.add(_to_row(stored))
            else:
                session.execute(update(EventMappingRow).where(EventMappingRow.id == mapping.id)
                                .values(**_row_values(stored)))
        session.flush()
        return len(mappings)

    # -- CRUD -----------------------------------------------------------------------------

    def create(self, session: Session, mapping: Mapping_) -> Mapping_:
        self.check(mapping)
        if session.get(EventMappingRow, mapping.id) is not None:
            raise AlreadyExists(f"event mapping {mapping.id!r} already exists", reason="MAPPING_EXISTS")
        clash = session.execute(select(EventMappingRow.id).where(
            EventMappingRow.source == mapping.source, EventMappingRow.source_event == mapping.source_event)).scalar()
        if clash is not None:
            raise AlreadyExists(f"event mapping {clash!r} already maps this source event",
                                reason="MAPPING_EXISTS", metadata={"existing": f"eventMappings/{clash}"})
        now = datetime.now(UTC)
        stored = replace(mapping, built_in=False, create_time=now, update_time=now)
        session.add(_to_row(stored))
        session.flush()
        return self.get(session, mapping.id)

    def get(self, session: Session, mapping_id: str) -> Mapping_:
        row = session.get(EventMappingRow, mapping_id)
        if row is None:
            raise NotFound(f"event mapping {mapping_id!r} not found", reason="MAPPING_NOT_FOUND")
        return _from_row(row)

    def list(self, session: Session) -> list[Mapping_]:
        rows = session.execute(select(EventMappingRow).order_by(EventMappingRow.source,
                                                                EventMappingRow.source_event)).scalars()
        return [_from_row(r) for r in rows]

    def update(self, session: Session, mapping: Mapping_) -> Mapping_:
        self.check(mapping)
        clash = session.execute(select(EventMappingRow.id).where(
            EventMappingRow.source == mapping.source, EventMappingRow.source_event == mapping.source_event,
            EventMappingRow.id != mapping.id)).scalar()
        if clash is not None:
            raise AlreadyExists(f"event mapping {clash!r} already maps this source event",
                                reason="MAPPING_EXISTS", metadata={"existing": f"eventMappings/{clash}"})
        stored = replace(mapping, update_time=datetime.now(UTC))
        session.execute(update(EventMappingRow).where(EventMappingRow.id == mapping.id)
                        .values(**_row_values(stored)))
        return self.get(session, mapping.id)

    def delete(self, session: Session, mapping_id: str) -> Mapping_:
        mapping = self.get(session, mapping_id)
        session.execute(delete(EventMappingRow).where(EventMappingRow.id == mapping_id))
        return mapping

    def check(self, mapping: Mapping_, field_prefix: str = "event_mapping.") -> None:
        """Raise :class:`InvalidArgument` listing every invalid field of ``mapping``."""
        violations = check_mapping(mapping, self.canonical_events)
        if violations:
            moved = [FieldViolation(field_prefix + v.field, v.description, v.reason) for v in violations]
            raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in moved), violations=moved)


def check_mapping(mapping: Mapping_, canonical_events: frozenset[str]) -> list[FieldViolation]:
    problems: list[FieldViolation] = []
    if not _ID_RE.fullmatch(mapping.id):
        problems.append(FieldViolation("name", "the mapping ID must be 1 to 63 characters of [a-z0-9-] starting "
                                               "with a letter", "INVALID_FORMAT"))
    if mapping.source and not _SOURCE_RE.fullmatch(mapping.source):
        problems.append(FieldViolation("source", "must be empty (every source) or 1 to 64 characters of "
                                                 "[a-z0-9_.-]", "INVALID_FORMAT"))
    if not mapping.source_event.strip():
        problems.append(FieldViolation("source_event", "is required", "REQUIRED"))
    elif len(mapping.source_event) > 1024 or not mapping.source_event.isprintable():
        problems.append(FieldViolation("source_event", "must be at most 1024 printable characters", "INVALID_FORMAT"))
    if not mapping.canonical_event:
        problems.append(FieldViolation("canonical_event", "is required", "REQUIRED"))
    elif mapping.canonical_event not in canonical_events:
        problems.append(FieldViolation("canonical_event", f"{mapping.canonical_event[:64]!r} is not a canonical "
                                                          f"event; known: {', '.join(sorted(canonical_events))}",
                                       "UNKNOWN_CANONICAL_EVENT"))
    for i, name in enumerate(mapping.required_properties):
        if not name or len(name) > 128 or not name.isprintable():
            problems.append(FieldViolation(f"required_properties[{i}]", "must be 1 to 128 printable characters",
                                           "INVALID_FORMAT"))
    if mapping.status not in STATUSES:
        problems.append(FieldViolation("status", "must be DRAFT or APPROVED", "INVALID_VALUE"))
    if len(mapping.description) > 1024:
        problems.append(FieldViolation("description", "must be at most 1024 characters", "TOO_LONG"))
    for target, path in mapping.property_map.items():
        if not target or len(target) > 128 or not path or len(path) > 256:
            problems.append(FieldViolation(f"property_map[{target[:40]!r}]",
                                           "keys and paths must be 1 to 128 / 256 characters", "INVALID_FORMAT"))
    return problems


def parse_registry_file(path: str | Path, canonical_events: frozenset[str]) -> list[Mapping_]:
    """Mappings of a registry file; raises :class:`InvalidArgument` naming the bad entry."""
    path = Path(path)
    try:
        text = path.read_text()
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise InvalidArgument.for_field("registry_file", f"cannot read {path}: {exc}") from exc
    entries = data.get("mappings", []) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise InvalidArgument.for_field("registry_file", "expected a list of mappings (TOML [[mappings]])")
    mappings = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InvalidArgument.for_field(f"mappings[{i}]", "must be a table")
        unknown = set(entry) - {"id", "source", "source_event", "canonical_event", "required_properties", "status",
                                "description", "property_map"}
        if unknown:
            raise InvalidArgument.for_field(f"mappings[{i}]", f"unknown keys {sorted(unknown)}")
        mapping = Mapping_(
            id=str(entry.get("id", "")), source=str(entry.get("source", "")),
            source_event=str(entry.get("source_event", "")), canonical_event=str(entry.get("canonical_event", "")),
            required_properties=tuple(str(p) for p in entry.get("required_properties", [])),
            status=str(entry.get("status", APPROVED)).upper(), description=str(entry.get("description", "")),
            property_map={str(k): str(v) for k, v in dict(entry.get("property_map", {})).items()},
        )
        problems = check_mapping(mapping, canonical_events)
        if problems:
            raise InvalidArgument("; ".join(f"mappings[{i}].{v.field}: {v.description}" for v in problems),
                                  violations=[FieldViolation(f"mappings[{i}].{v.field}", v.description, v.reason)
                                              for v in problems])
        mappings.append(mapping)
    ids = [m.id for m in mappings]
    if len(ids) != len(set(ids)):
        raise InvalidArgument.for_field("registry_file", "mapping IDs must be unique")
    return mappings


def new_mapping_id(source: str, source_event: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", f"{source}-{source_event}".lower()).strip("-")[:40] or "mapping"
    if not slug[0].isalpha():
        slug = "m-" + slug
    digest = hashlib.sha256(f"{source}\x00{source_event}".encode()).hexdigest()[:8]
    return f"{slug}-{digest}"[:63]


def _from_row(row: EventMappingRow) -> Mapping_:
    return Mapping_(row.id, row.source, row.source_event, row.canonical_event, tuple(row.required_properties or ()),
                    row.status, row.description, dict(row.property_map or {}), row.built_in, row.create_time,
                    row.update_time, row.etag)


def _row_values(mapping: Mapping_) -> dict[str, Any]:
    return {"source": mapping.source, "source_event": mapping.source_event,
            "canonical_event": mapping.canonical_event, "required_properties": list(mapping.required_properties),
            "status": mapping.status, "description": mapping.description,
            "property_map": dict(mapping.property_map), "built_in": mapping.built_in,
            "update_time": mapping.update_time, "etag": mapping.content_etag()}


def _to_row(mapping: Mapping_) -> EventMappingRow:
    return EventMappingRow(id=mapping.id, create_time=mapping.create_time, **_row_values(mapping))
