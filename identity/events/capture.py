"""Capturing events: map, validate, deduplicate, resolve identity and record traits — for
every input path, in one transaction per batch.

Per batch:

1. *prepare* each message without touching the store's write lock: parse problems, mapping
   through the schema registry, typed properties (value, currency, order_id, items),
   validation, identifier normalisation, privacy scrubbing and the event ID;
2. in one write transaction: drop duplicates (stored or earlier in the batch), re-type
   PostHog distinct IDs the graph already knows, resolve identity for every accepted
   message at once (identifiers seen together are link evidence), then store events,
   trait evidence and the incremental per-identifier summaries (trait state, totals).

A result is returned for every message; one bad message never sinks the others, and
"accepted" means committed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import Table, bindparam, delete, insert, select, text, update
from sqlalchemy.orm import Session

from identity.events import traits as trait_rules
from identity.events.currencies import ISO_4217
from identity.events.incoming import IDENTITY_KINDS, IDENTITY_ONLY, IncomingEvent
from identity.events.models import EventRow, EventTotalRow, ParkedEventRow, TraitEvidenceRow, TraitStateRow
from identity.events.money import parse_money
from identity.events.registry import MONEY_EVENTS, MONEY_FIELDS, Mapping_, Resolution, SchemaRegistry
from identity.graph_store import GRAPH_LOCK, SightingResult
from identity.identifiers import Identifier, NormalizedIdentifier
from identity.models import IdentifierRow, PersonRow
from identity.operations import MAX_IDENTIFIERS_PER_CALL, IdentityOperations
from identity.policy import CompiledPolicy
from identity.sightings import Ignored, Sighting, prepare_identifiers, to_micros
from stitchgraph.db import Database, bulk_insert, in_values
from stitchgraph.errors import FieldViolation, InvalidArgument

ACCEPTED = "ACCEPTED"
DUPLICATE = "DUPLICATE"
REJECTED = "REJECTED"
PARKED = "PARKED"

#: Trait keys whose values are contact details: they become identifiers (hashed), never traits.
EMAIL_KEYS = frozenset({"email", "$email", "email_address", "emailAddress", "Email"})
PHONE_KEYS = frozenset({"phone", "$phone", "phone_number", "phoneNumber", "Phone"})
_EMAIL_LIKE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_EMAIL_IN_TEXT = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
#: What an email address inside a free-form string is replaced with.
REDACTED = "[redacted]"
#: Where typed properties are read from when the mapping's property_map does not say.
CONVENTIONS: Mapping[str, tuple[str, ...]] = {
    "value": ("value", "revenue", "total"),
    "currency": ("currency",),
    "order_id": ("order_id", "orderId", "transaction_id"),
}
ITEM_KEYS = ("products", "items")
MIN_OCCURRED = datetime(2000, 1, 1, tzinfo=UTC)
MAX_EVENT_ID = 256
MAX_SOURCE = 64
MAX_TRAIT_KEY = 128
_SOURCE_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_CHUNK = 400
_EVENTS = cast(Table, EventRow.__table__)
_PARKED = cast(Table, ParkedEventRow.__table__)
_EVIDENCE = cast(Table, TraitEvidenceRow.__table__)
_STATES = cast(Table, TraitStateRow.__table__)


@dataclass(frozen=True)
class EventSettings:
    """How events are captured (``[events]`` in the configuration)."""

    max_batch_size: int = 1000
    #: What happens to events without an approved mapping: "park" (kept for review) or "reject".
    unmapped_action: str = "park"
    max_future_skew_seconds: int = 600
    max_properties_bytes: int = 64 * 1024
    custom_events: tuple[str, ...] = ()
    registry_file: str | None = None


@dataclass
class Receipt:
    event_id: str
    person_id: str
    receive_time: datetime
    canonical_event: str
    generated_event_id: bool
    stored_event: bool
    ignored: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CaptureResult:
    index: int
    status: str
    receipt: Receipt | None = None
    violations: list[FieldViolation] = field(default_factory=list)
    reason: str = ""
    event_id: str = ""


@dataclass
class _Prepared:
    index: int
    incoming: IncomingEvent
    canonical: str
    identity_only: bool
    event_id: str
    generated: bool
    occurred_us: int
    normalized: list[NormalizedIdentifier]
    ignored: list[Ignored]
    positions: list[int]
    value: str | None = None
    micros: int | None = None
    currency: str | None = None
    order_id: str | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    properties: dict[str, Any] = field(default_factory=dict)
    traits: list[tuple[str, str, Any]] = field(default_factory=list)  # (op, key, value)
    park_reason: str = ""
    park_detail: str = ""


@dataclass(frozen=True, slots=True)
class EventSignals:
    """The consent signals and jurisdiction of one accepted event, for the consent store."""

    identifier_pk: int
    event_id: str
    occurred_us: int
    consent: Mapping[str, Any]
    jurisdiction: str


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An accepted canonical event with a person, for the hooks that act on new events (the
    delivery outbox). ``action_source`` is the lower-case ActionSource name or ""."""

    event_id: str
    event: str
    occurred_us: int
    person_pk: int | None
    person_id: str
    action_source: str = ""


def _jurisdiction(context: Mapping[str, Any]) -> str:
    """ISO 3166 code of the event's location: ``US-CA`` from region, else ``DE`` from country."""
    country = str(context.get("country_code") or "").strip().upper()
    region = str(context.get("region_code") or "").strip().upper()
    if region and "-" in region and len(region) <= 8:
        return region
    if len(country) == 2 and country.isalpha():
        return f"{country}-{region}" if region and region.isalnum() and len(region) <= 3 else country
    return ""


class EventLedger:
    """The event use cases over one database."""

    def __init__(self, db: Database, identity: IdentityOperations, registry: SchemaRegistry,
                 settings: EventSettings | None = None) -> None:
        self.db = db
        self.identity = identity
        self.registry = registry
        self.settings = settings or EventSettings()
        identity.erase_hooks.append(erase_evidence)
        #: Called in the capture transaction with the accepted events that carry consent
        #: signals or a jurisdiction (the consent store records them as evidence).
        self.signal_hooks: list[Callable[[Session, list[EventSignals]], None]] = []
        #: Called in the capture transaction with the accepted canonical events that have a
        #: person (the delivery outbox queues conversions from them).
        self.event_hooks: list[Callable[[Session, list[StoredEvent]], object]] = []

    def start(self) -> None:
        """Store the default mappings (once) and load the configured registry file."""
        with self.db.transaction() as session:
            self.registry.seed_defaults(session)
            if self.settings.registry_file:
                self.registry.load_file(session, self.settings.registry_file)

    def record_traits(self, session: Session, *, identifier_pk: int, event_id: str, occurred_us: int, source: str,
                      traits: Mapping[str, Any]) -> None:
        """Record ``traits`` as *set* evidence of one call (IdentityService.Identify) for
        the identifier that answered for it, in the caller's transaction. Raises
        :class:`InvalidArgument` for a bad key; raw contact details are never stored."""
        violations: list[FieldViolation] = []
        evidence = []
        for key, value in traits.items():
            if key in EMAIL_KEYS or key in PHONE_KEYS:
                continue
            if _check_trait_key(key, f"traits.{key[:64]}", violations):
                evidence.append({"identifier_pk": identifier_pk, "key": key, "op": trait_rules.SET,
                                 "value": _json_safe(_scrub(value)), "occurred_us": occurred_us,
                                 "event_id": event_id, "source": source or "grpc"})
        if violations:
            raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations), violations=violations)
        if evidence:
            record_trait_evidence(session, evidence)

    # -- capture ----------------------------------------------------------------------------

    def capture(self, messages: Sequence[IncomingEvent], *, validate_only: bool = False,
                now: datetime | None = None) -> list[CaptureResult]:
        """Capture ``messages``; one result per message, in order."""
        now = now or datetime.now(UTC)
        with self.db.read() as session:
            policy = self.identity.policy(session)
            mappings = self.registry.snapshot(session)
        results: list[CaptureResult | None] = [None] * len(messages)
        prepared: list[_Prepared] = []
        for index, message in enumerate(messages):
            outcome = self._prepare(index, message, policy, mappings, now)
            if isinstance(outcome, CaptureResult):
                results[index] = outcome
            else:
                prepared.append(outcome)
        if validate_only:
            with self.db.read() as session:
                stored = _stored_receipts(session, [p.event_id for p in prepared])
            seen: set[str] = set()
            for p in prepared:
                duplicate = p.event_id in stored or p.event_id in seen
                seen.add(p.event_id)
                status = DUPLICATE if duplicate else (PARKED if p.park_reason else ACCEPTED)
                results[p.index] = CaptureResult(p.index, status, stored.get(p.event_id), reason=p.park_reason,
                                                 event_id=p.event_id, violations=_park_violations(p))
        elif prepared:
            with self.db.transaction() as session:
                for result in self._store(session, prepared, policy, now):
                    results[result.index] = result
        return [r for r in results if r is not None]

    def _store(self, session: Session, prepared: list[_Prepared], policy: CompiledPolicy,
               now: datetime) -> list[CaptureResult]:
        # Dedup against the store and within the batch (the first occurrence wins), under
        # the graph lock so concurrent writers on PostgreSQL cannot both store one event_id.
        self.db.advisory_lock(session, GRAPH_LOCK)
        stored = _stored_receipts(session, [p.event_id for p in prepared if not p.park_reason])
        first_of: dict[str, int] = {}
        fresh: list[_Prepared] = []
        duplicates: list[tuple[_Prepared, str]] = []
        parked: list[_Prepared] = []
        for p in prepared:
            if p.park_reason:
                parked.append(p)
            elif p.event_id in stored or p.event_id in first_of:
                duplicates.append((p, p.event_id))
            else:
                first_of[p.event_id] = p.index
                fresh.append(p)
        results: list[CaptureResult] = []
        if parked:
            self._park(session, parked, now)
            results += [CaptureResult(p.index, PARKED, reason=p.park_reason, event_id=p.event_id,
                                      violations=_park_violations(p)) for p in parked]
        receipts: dict[str, Receipt] = {}
        if fresh:
            self._retype(session, fresh, policy)
            resolving = [p for p in fresh if not p.incoming.personless]
            sightings = [Sighting(tuple(p.normalized), p.occurred_us, p.event_id, p.incoming.source,
                                  ignored=tuple(p.ignored), positions=tuple(p.positions)) for p in resolving]
            outcome: dict[int, SightingResult] = {}
            if sightings:
                graph_results = self.identity.observe_sightings(session, policy, sightings)
                outcome = {p.index: r for p, r in zip(resolving, graph_results, strict=True)}
            person_ids = _person_ids(session, {r.person_pk for r in outcome.values() if r.person_pk is not None})
            rows, evidence, totals = [], [], []
            signals: list[EventSignals] = []
            stored_events: list[StoredEvent] = []
            for p in fresh:
                result = outcome.get(p.index)
                primary = result.primary_pk if result is not None else None
                receipt = Receipt(
                    event_id=p.event_id,
                    person_id=person_ids.get(result.person_pk, "") if result and result.person_pk else "",
                    receive_time=now, canonical_event=p.canonical, generated_event_id=p.generated,
                    stored_event=not p.identity_only,
                    ignored=[{"index": i.index, "type": i.type, "reason": i.reason, "detail": i.detail}
                             for i in (result.ignored if result else p.ignored)],
                    refused=[{"first": [x.first.type, x.first.value], "second": [x.second.type, x.second.value],
                              "reason": x.reason, "detail": x.detail}
                             for x in (result.links if result else []) if x.decision.value == "refused"],
                )
                receipts[p.event_id] = receipt
                rows.append(_event_row(p, primary, receipt, now))
                if primary is not None:
                    evidence += [{"identifier_pk": primary, "key": key, "op": op, "value": value,
                                  "occurred_us": p.occurred_us, "event_id": p.event_id, "source": p.incoming.source}
                                 for op, key, value in p.traits]
                    if not p.identity_only:
                        totals.append((primary, p.canonical, p.currency or "", p.micros or 0, p.occurred_us))
                        if result is not None and result.person_pk is not None:
                            stored_events.append(StoredEvent(p.event_id, p.canonical, p.occurred_us, result.person_pk,
                                                             receipt.person_id, p.incoming.action_source.lower()))
                    jurisdiction = _jurisdiction(p.incoming.context)
                    if p.incoming.consent or jurisdiction:
                        signals.append(EventSignals(primary, p.event_id, p.occurred_us, p.incoming.consent,
                                                    jurisdiction))
                results.append(CaptureResult(p.index, ACCEPTED, receipt, event_id=p.event_id))
            session.execute(insert(_EVENTS), rows)
            if evidence:
                record_trait_evidence(session, evidence)
            if totals:
                _add_totals(session, totals)
            if signals:
                for hook in self.signal_hooks:
                    hook(session, signals)
            if stored_events:
                for event_hook in self.event_hooks:
                    event_hook(session, stored_events)
        for p, event_id in duplicates:
            receipt = stored.get(event_id) or receipts[event_id]
            results.append(CaptureResult(p.index, DUPLICATE, receipt, event_id=event_id))
        return results

    def _retype(self, session: Session, fresh: list[_Prepared], policy: CompiledPolicy) -> None:
        """PostHog distinct IDs are untyped: one whose type the parser had to guess is a
        user ID if the graph knows it as one; an identified one also brings the anonymous
        identifier of the same value it had before it was identified."""
        guessed = {v for p in fresh for v in p.incoming.inferred_anonymous}
        identified = {v for p in fresh for v in p.incoming.identified}
        if not guessed and not identified:
            return
        # Known from the store, or typed with certainty by another message of this batch.
        known_users = {n.identifier.value for p in fresh for n in p.normalized
                       if n.identifier.type == "user_id" and n.identifier.value in guessed}
        known_anonymous = {n.identifier.value for p in fresh for n in p.normalized
                           if n.identifier.type == "anonymous_id" and n.identifier.value in identified
                           and n.identifier.value not in p.incoming.inferred_anonymous}
        values = sorted(guessed | identified)
        for start in range(0, len(values), _CHUNK):
            chunk = values[start:start + _CHUNK]
            for type_, value in session.execute(select(IdentifierRow.type, IdentifierRow.value).where(
                    IdentifierRow.type.in_(("user_id", "anonymous_id")), IdentifierRow.value.in_(chunk))):
                (known_users if type_ == "user_id" else known_anonymous).add(value)
        for p in fresh:
            changed = False
            normalized = list(p.normalized)
            for i, n in enumerate(normalized):
                ident = n.identifier
                if ident.type == "anonymous_id" and ident.value in p.incoming.inferred_anonymous \
                        and ident.value in known_users:
                    normalized[i] = NormalizedIdentifier(Identifier("user_id", ident.value))
                    changed = True
            present = {n.identifier for n in normalized}
            for value in p.incoming.identified:
                extra = Identifier("anonymous_id", value)
                if value in known_anonymous and extra not in present and len(normalized) < MAX_IDENTIFIERS_PER_CALL:
                    normalized.append(NormalizedIdentifier(extra))
                    p.positions.append(-1)
                    changed = True
            if changed:
                unique: dict[Identifier, int] = {}
                for i, n in enumerate(normalized):
                    unique.setdefault(n.identifier, i)
                p.normalized = [normalized[i] for i in unique.values()]
                p.positions = [p.positions[i] if i < len(p.positions) else -1 for i in unique.values()]

    def _park(self, session: Session, parked: list[_Prepared], now: datetime) -> None:
        known = set()
        ids = [p.event_id for p in parked]
        for start in range(0, len(ids), _CHUNK):
            known |= set(session.execute(select(ParkedEventRow.event_id).where(
                ParkedEventRow.event_id.in_(ids[start:start + _CHUNK]))).scalars())
        rows = []
        for p in parked:
            if p.event_id in known:
                continue
            known.add(p.event_id)
            rows.append({"event_id": p.event_id, "source": p.incoming.source,
                         "source_event": p.incoming.source_event[:1024], "reason": p.park_reason,
                         "detail": p.park_detail[:1024], "receive_time": now,
                         "body": dict(_body(p), occurred_us=p.occurred_us, kind=p.incoming.kind)})
        if rows:
            session.execute(insert(_PARKED), rows)

    # -- preparation (pure, no store) -------------------------------------------------------

    def _prepare(self, index: int, message: IncomingEvent, policy: CompiledPolicy,
                 mappings: Mapping[tuple[str, str], Mapping_], now: datetime) -> _Prepared | CaptureResult:
        violations = list(message.violations)
        source = message.source or "grpc"
        message.source = source
        if not _SOURCE_RE.fullmatch(source):
            violations.append(FieldViolation("source", "must be 1 to 64 characters of [a-z0-9_.-], lower case",
                                             "INVALID_FORMAT"))
        occurred_us = 0
        if message.occurred_at is None:
            violations.append(FieldViolation("occurred_at", "is required: when the action happened", "REQUIRED"))
        else:
            occurred = message.occurred_at if message.occurred_at.tzinfo else message.occurred_at.replace(tzinfo=UTC)
            if occurred < MIN_OCCURRED:
                violations.append(FieldViolation("occurred_at", "is not a real event time (before 2000-01-01); "
                                                 "send when the action happened", "TIMESTAMP_OUT_OF_RANGE"))
            elif occurred > now + timedelta(seconds=self.settings.max_future_skew_seconds):
                violations.append(FieldViolation(
                    "occurred_at", f"is in the future by more than the allowed clock skew "
                    f"({self.settings.max_future_skew_seconds} s)", "TIMESTAMP_IN_FUTURE"))
            else:
                occurred_us = to_micros(occurred)
        if len(message.event_id) > MAX_EVENT_ID or not message.event_id.isprintable():
            violations.append(FieldViolation("event_id", f"must be at most {MAX_EVENT_ID} printable characters",
                                             "INVALID_FORMAT"))
        if len(message.message_id) > MAX_EVENT_ID or not message.message_id.isprintable():
            violations.append(FieldViolation("metadata.source_message_id",
                                             f"must be at most {MAX_EVENT_ID} printable characters",
                                             "INVALID_FORMAT"))

        # Contact details asserted as traits are identifiers (hashed), never trait values.
        identifiers = list(message.identifiers)
        trait_set = dict(message.trait_set)
        trait_set_once = dict(message.trait_set_once)
        for traits in (trait_set, trait_set_once):
            for key in [k for k in traits if k in EMAIL_KEYS or k in PHONE_KEYS]:
                value = traits.pop(key)
                if isinstance(value, str) and value.strip():
                    identifiers.append(("email" if key in EMAIL_KEYS else "phone", value))
        if not identifiers:
            violations.append(FieldViolation("identifiers", "at least one identifier is required", "REQUIRED"))
        elif len(identifiers) > MAX_IDENTIFIERS_PER_CALL:
            violations.append(FieldViolation("identifiers", f"at most {MAX_IDENTIFIERS_PER_CALL} identifiers",
                                             "TOO_MANY"))
        normalized: list[NormalizedIdentifier] = []
        ignored: list[Ignored] = []
        positions: list[int] = []
        if identifiers and len(identifiers) <= MAX_IDENTIFIERS_PER_CALL:
            try:
                normalized, ignored, positions = prepare_identifiers(policy, identifiers)
            except InvalidArgument as exc:
                violations += exc.violations

        trait_evidence: list[tuple[str, str, Any]] = []
        for op, values in ((trait_rules.SET, trait_set), (trait_rules.SET_ONCE, trait_set_once)):
            for key, value in values.items():
                if _check_trait_key(key, f"trait_updates.{op}", violations):
                    trait_evidence.append((op, key, _json_safe(_scrub(value))))
        for i, key in enumerate(message.trait_unset):
            if _check_trait_key(key, f"trait_updates.unset[{i}]", violations):
                trait_evidence.append((trait_rules.UNSET, key, None))

        properties = _scrub(dict(message.properties))
        canonical = ""
        identity_only = False
        park_reason = park_detail = ""
        if message.mapped_event == IDENTITY_ONLY:
            resolution = Resolution(reason="IDENTITY_ONLY")
        elif message.mapped_event:
            resolution = Resolution(message.mapped_event)
        else:
            resolution = self.registry.resolve(mappings, source, message.source_event)
        if resolution.reason:
            if message.kind in IDENTITY_KINDS or message.mapped_event == IDENTITY_ONLY:
                identity_only = True
            elif self.settings.unmapped_action == "park":
                park_reason, park_detail = resolution.reason, resolution.detail
            else:
                violations.append(FieldViolation("event", resolution.detail, resolution.reason))
        elif message.kind == "alias":
            identity_only = True  # an alias links identifiers; it is never a business event
        else:
            canonical = resolution.canonical_event

        value, micros, currency, order_id, items = self._typed(message, properties, resolution.mapping, canonical,
                                                               violations)
        if canonical and resolution.mapping is not None:
            for name in resolution.mapping.required_properties:
                if name in MONEY_FIELDS or name == "items":
                    present = bool({"value": value, "currency": currency, "order_id": order_id,
                                    "items": items}[name])
                else:
                    present = _lookup(properties, name) not in (None, "")
                if not present:
                    violations.append(FieldViolation(
                        name if name in (*MONEY_FIELDS, "items") else f"properties.{name}",
                        f"is required for {canonical} by mapping {resolution.mapping.id!r}", "REQUIRED"))
        properties_json = _json_safe(properties)
        if len(json.dumps(properties_json, separators=(",", ":"))) > self.settings.max_properties_bytes:
            violations.append(FieldViolation("properties", f"must be at most {self.settings.max_properties_bytes} "
                                             "bytes serialised", "TOO_LARGE"))
        event_id, generated = message.event_id, False
        if not event_id:
            event_id, generated = derive_event_id(source, canonical or message.source_event, message.message_id,
                                                  order_id, occurred_us, normalized, properties_json, value)
        if violations:
            return CaptureResult(index, REJECTED, violations=_dedupe(violations), reason="INVALID_EVENT",
                                 event_id=event_id)
        return _Prepared(index, message, canonical, identity_only, event_id, generated, occurred_us, normalized,
                         ignored, positions, value, micros, currency, order_id, items, properties_json,
                         trait_evidence, park_reason, park_detail)

    def _typed(self, message: IncomingEvent, properties: dict[str, Any], mapping: Mapping_ | None, canonical: str,
               violations: list[FieldViolation]) -> tuple[str | None, int | None, str | None, str | None,
                                                         list[dict[str, Any]]]:
        """Value, currency, order ID and items: typed fields first, else the mapping's
        property paths, else the conventional property names (consumed from properties)."""
        property_map = dict(mapping.property_map) if mapping is not None else {}
        raw: dict[str, Any] = {"value": message.value or None, "currency": message.currency or None,
                               "order_id": message.order_id or None}
        where: dict[str, str] = {name: name for name in raw}
        for name in MONEY_FIELDS:
            if raw[name] is not None:
                continue
            paths = (property_map[name],) if name in property_map else CONVENTIONS[name]
            for path in paths:
                found = _lookup(properties, path)
                if found not in (None, ""):
                    raw[name] = found
                    where[name] = f"properties.{path}"
                    break
        # A conventional "value"/"revenue"/"total" property of an event that carries no
        # currency is not money (a lead score, a count): it stays a free property.
        if (canonical not in MONEY_EVENTS and raw["currency"] is None and where["value"] != "value"
                and "value" not in property_map):
            raw["value"] = None
            where["value"] = "value"
        for name in MONEY_FIELDS:
            if where[name] != name and raw[name] is not None:
                _remove(properties, where[name].removeprefix("properties."))
        value = micros = None
        if raw["value"] is not None:
            try:
                value, micros = parse_money(raw["value"])
            except ValueError as exc:
                violations.append(FieldViolation(where["value"], str(exc), "INVALID_FORMAT"))
            else:
                if canonical in MONEY_EVENTS and micros < 0:
                    violations.append(FieldViolation(where["value"], f"must not be negative for {canonical} "
                                                     "(refunds are positive amounts)", "INVALID_VALUE"))
        currency = None
        if raw["currency"] is not None:
            text = str(raw["currency"]).strip().upper()
            if text not in ISO_4217:
                violations.append(FieldViolation(where["currency"], "must be an ISO-4217 currency code, for "
                                                 "example \"EUR\"", "INVALID_CURRENCY"))
            else:
                currency = text
        elif value is not None and canonical not in MONEY_EVENTS:
            violations.append(FieldViolation("currency", "is required with a value (ISO-4217, e.g. \"EUR\")",
                                             "REQUIRED"))
        order_id = None
        if raw["order_id"] is not None:
            order_id = str(raw["order_id"]).strip()
            if isinstance(raw["order_id"], (bool, float, dict, list)) or not order_id or len(order_id) > 256:
                violations.append(FieldViolation(where["order_id"], "must be a string of 1 to 256 characters",
                                                 "INVALID_FORMAT"))
                order_id = None
        if canonical in MONEY_EVENTS:
            for name, present in (("value", raw["value"] is not None), ("currency", raw["currency"] is not None),
                                  ("order_id", raw["order_id"] is not None)):
                if not present:
                    hint = {"value": "the amount as a decimal string, e.g. \"19.99\"",
                            "currency": "ISO-4217, e.g. \"EUR\"", "order_id": "the order's ID"}[name]
                    violations.append(FieldViolation(name, f"{canonical} requires {name} ({hint})", "REQUIRED"))
        items = list(message.items)
        if not items:
            for key in ITEM_KEYS:
                candidate = properties.get(key)
                if isinstance(candidate, list) and candidate:
                    items = [i for i in candidate if isinstance(i, dict)]
                    properties.pop(key)
                    break
        return value, micros, currency, order_id, [_item(i, n, violations) for n, i in enumerate(items)]


# -- helpers ---------------------------------------------------------------------------------


def derive_event_id(source: str, name: str, message_id: str, order_id: str | None, occurred_us: int,
                    normalized: Sequence[NormalizedIdentifier], properties: Any, value: str | None) -> tuple[str, bool]:
    """The event ID of an event sent without one (documented in docs/events.md):

    1. the source's own message ID (PostHog ``uuid``/``$insert_id``, Segment/RudderStack
       ``messageId``, Heap ``idempotency_key``, ``metadata.source_message_id``), as is, so the
       same message through any path is one event;
    2. else, for an event with an order ID, a hash of the canonical event and the order ID
       (the business key), so one order captured by several sources is one purchase;
    3. else a hash of the source, event, time, identifiers and properties, so a retry of
       the same content is a duplicate.
    Returns the ID and whether Stitchgraph generated it."""
    if message_id:
        return message_id, False
    if order_id:
        digest = hashlib.sha256(f"order\x00{name}\x00{order_id}".encode()).hexdigest()[:32]
        return f"sg_{digest}", True
    material = json.dumps([source, name, occurred_us, sorted(n.identifier.key for n in normalized), properties,
                           value], sort_keys=True, separators=(",", ":"), default=str)
    return "sg_" + hashlib.sha256(material.encode()).hexdigest()[:32], True


def _check_trait_key(key: str, path: str, violations: list[FieldViolation]) -> bool:
    if not key or len(key) > MAX_TRAIT_KEY or not key.isprintable():
        violations.append(FieldViolation(path, f"trait keys must be 1 to {MAX_TRAIT_KEY} printable characters",
                                         "INVALID_FORMAT"))
        return False
    return True


def _scrub(value: Any) -> Any:
    """Drop raw contact details from free-form values (never stored): keys that name an
    email or phone go, and email addresses inside strings are redacted."""
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in EMAIL_KEYS and k not in PHONE_KEYS}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, str) and "@" in value:
        return _EMAIL_IN_TEXT.sub(REDACTED, value)
    return value


def _json_safe(value: Any) -> Any:
    """JSON-storable form: Decimals become ints when integral, else floats (free-form
    properties and traits; money is typed and kept exact elsewhere)."""
    if isinstance(value, Decimal):
        if value == value.to_integral_value() and abs(value) < 2 ** 63:
            return int(value)
        return float(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _lookup(properties: Mapping[str, Any], path: str) -> Any:
    current: Any = properties
    for part in path.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return None
        current = current[part]
    return current


def _remove(properties: dict[str, Any], path: str) -> None:
    parts = path.split(".")
    current: Any = properties
    for part in parts[:-1]:
        current = current.get(part) if isinstance(current, dict) else None
    if isinstance(current, dict):
        current.pop(parts[-1], None)


def _item(raw: Mapping[str, Any], n: int, violations: list[FieldViolation]) -> dict[str, Any]:
    item: dict[str, Any] = {}
    item_id = raw.get("item_id") or raw.get("product_id") or raw.get("sku") or raw.get("id")
    if item_id not in (None, ""):
        item["item_id"] = str(item_id)[:256]
    for key in ("name", "category", "brand", "variant"):
        if raw.get(key) not in (None, ""):
            item[key] = str(raw[key])[:256]
    quantity = raw.get("quantity")
    if quantity not in (None, ""):
        try:
            item["quantity"] = int(Decimal(str(quantity)))
        except ArithmeticError:
            violations.append(FieldViolation(f"items[{n}].quantity", "must be an integer", "INVALID_FORMAT"))
    price = raw.get("price")
    if price not in (None, ""):
        try:
            item["price"] = parse_money(price)[0]
        except ValueError as exc:
            violations.append(FieldViolation(f"items[{n}].price", str(exc), "INVALID_FORMAT"))
    known = {"item_id", "product_id", "sku", "id", "name", "category", "brand", "variant", "quantity", "price"}
    extra = {k: v for k, v in raw.items() if k not in known}
    if extra:
        item["properties"] = _json_safe(_scrub(extra))
    return item


def _dedupe(violations: list[FieldViolation]) -> list[FieldViolation]:
    seen: dict[tuple[str, str], FieldViolation] = {}
    for v in violations:
        seen.setdefault((v.field, v.description), v)
    return list(seen.values())


def _park_violations(p: _Prepared) -> list[FieldViolation]:
    return [FieldViolation("event", p.park_detail, p.park_reason)] if p.park_reason else []


def _scrub_url(url: Any) -> Any:
    """A URL without query parameters whose values look like contact details."""
    if not isinstance(url, str) or "?" not in url:
        return url
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if not _EMAIL_LIKE.fullmatch(v.strip()) and k not in EMAIL_KEYS and k not in PHONE_KEYS]
    return urlunsplit(parts._replace(query=urlencode(kept)))


def _body(p: _Prepared) -> dict[str, Any]:
    m = p.incoming
    context = {k: _scrub_url(v) if k in ("page_url", "referrer") else v for k, v in m.context.items()}
    return {
        "identifiers": [[n.identifier.type, n.identifier.value] for n in p.normalized],
        "items": p.items, "properties": p.properties,
        "context": _json_safe({k: v for k, v in context.items() if v not in (None, "")} |
                              ({"consent": m.consent} if m.consent else {})),
        "metadata": _json_safe({k: v for k, v in m.metadata.items() if v not in (None, "")} |
                               ({"source_message_id": m.message_id} if m.message_id else {})),
        "traits": {"set": {k: v for op, k, v in p.traits if op == trait_rules.SET},
                   "set_once": {k: v for op, k, v in p.traits if op == trait_rules.SET_ONCE},
                   "unset": [k for op, k, _ in p.traits if op == trait_rules.UNSET]},
        "action_source": m.action_source,
        "kind": m.kind,
        "personless": m.personless,
    }


def _event_row(p: _Prepared, primary: int | None, receipt: Receipt, now: datetime) -> dict[str, Any]:
    body = _body(p)
    body["receipt"] = {"ignored": receipt.ignored, "refused": receipt.refused}
    return {
        "event_id": p.event_id, "event": p.canonical, "kind": p.incoming.kind, "source": p.incoming.source,
        "source_event": p.incoming.source_event[:1024], "occurred_us": p.occurred_us, "receive_time": now,
        "identifier_pk": primary, "value": p.value, "value_micros": p.micros, "currency": p.currency,
        "order_id": p.order_id, "identity_only": p.identity_only, "generated_event_id": p.generated, "body": body,
    }


def _person_ids(session: Session, pks: set[int]) -> dict[int, str]:
    found: dict[int, str] = {}
    ordered = sorted(pks)
    for start in range(0, len(ordered), _CHUNK):
        found.update((r[0], r[1]) for r in session.execute(select(PersonRow.id, PersonRow.person_id).where(
            PersonRow.id.in_(ordered[start:start + _CHUNK]))).all())
    return found


def _stored_receipts(session: Session, event_ids: Sequence[str]) -> dict[str, Receipt]:
    """Receipts of already stored events among ``event_ids`` (person as resolved now)."""
    rows: list[Any] = []
    ids = sorted(set(event_ids))
    for start in range(0, len(ids), _CHUNK):
        rows += session.execute(
            select(EventRow.event_id, EventRow.event, EventRow.receive_time, EventRow.generated_event_id,
                   EventRow.identity_only, EventRow.body, PersonRow.person_id)
            .outerjoin(IdentifierRow, IdentifierRow.id == EventRow.identifier_pk)
            .outerjoin(PersonRow, PersonRow.id == IdentifierRow.person_pk)
            .where(EventRow.event_id.in_(ids[start:start + _CHUNK]))).all()
    receipts = {}
    for row in rows:
        original = (row.body or {}).get("receipt", {})
        receive_time = row.receive_time if row.receive_time.tzinfo else row.receive_time.replace(tzinfo=UTC)
        receipts[row.event_id] = Receipt(row.event_id, row.person_id or "", receive_time, row.event,
                                         row.generated_event_id, not row.identity_only,
                                         list(original.get("ignored", [])), list(original.get("refused", [])))
    return receipts


def record_trait_evidence(session: Session, evidence: list[dict[str, Any]]) -> None:
    """Store trait evidence (a repeat of the same assertion is ignored) and fold it into
    the per-identifier trait state (folding is idempotent, so a repeat changes nothing).

    Each item has ``identifier_pk, key, op, value, occurred_us, event_id, source``. Only
    the states of the keys named are read, in chunks of one bound parameter, so a bulk
    write of one key (a cohort snapshot) reads no more than it writes."""
    if not evidence:
        return
    bulk_insert(session, _EVIDENCE, evidence, ignore_conflicts=True)
    wanted = {(e["identifier_pk"], e["key"]) for e in evidence}
    keys = sorted({key for _, key in wanted})
    pks = sorted({pk for pk, _ in wanted})
    states: dict[tuple[int, str], trait_rules.TraitState] = {}
    chunk = 50_000
    for start in range(0, len(pks), chunk):
        query = select(_STATES).where(in_values(session, _STATES.c.identifier_pk, pks[start:start + chunk]))
        if len(keys) <= 16:
            query = query.where(_STATES.c.key.in_(keys))
        for row in session.execute(query):
            if (row.identifier_pk, row.key) in wanted:
                states[(row.identifier_pk, row.key)] = _state_of(row)
    existing = set(states)
    before = dict(states)
    for e in evidence:
        slot = (e["identifier_pk"], e["key"])
        current = states.get(slot)
        if current is None and e["op"] != trait_rules.SET_ONCE:  # the common first assertion, built directly
            states[slot] = trait_rules.TraitState(e["occurred_us"], e["event_id"], e["op"] == trait_rules.UNSET,
                                                  None if e["op"] == trait_rules.UNSET else e["value"], e["source"])
            continue
        states[slot] = trait_rules.apply(current, trait_rules.Evidence(
            e["op"], e["key"], e["value"], e["occurred_us"], e["event_id"], e["source"]))
    inserts = [_state_row(slot, state) for slot, state in states.items() if slot not in existing]
    updates = [_state_row(slot, state) | {"b_pk": slot[0], "b_key": slot[1]} for slot, state in states.items()
               if slot in existing and state != before[slot]]
    bulk_insert(session, _STATES, inserts)
    if updates:
        session.execute(update(_STATES).where(_STATES.c.identifier_pk == bindparam("b_pk"),
                                              _STATES.c.key == bindparam("b_key")), updates)


def _state_of(row: Any) -> trait_rules.TraitState:
    return trait_rules.TraitState(row.lw_us, row.lw_event, bool(row.lw_unset), row.lw_value, row.lw_source,
                                  row.so_us, row.so_event, row.so_value, row.so_source)


def _state_row(slot: tuple[int, str], state: trait_rules.TraitState) -> dict[str, Any]:
    return {"identifier_pk": slot[0], "key": slot[1], "lw_us": state.lw_us, "lw_event": state.lw_event,
            "lw_unset": state.lw_unset, "lw_value": state.lw_value, "lw_source": state.lw_source,
            "so_us": state.so_us, "so_event": state.so_event, "so_value": state.so_value,
            "so_source": state.so_source}


def _add_totals(session: Session, totals: list[tuple[int, str, str, int, int]]) -> None:
    """Fold accepted events into per-identifier totals (count, value, first and last time)."""
    merged: dict[tuple[int, str, str], list[int]] = {}
    for pk, event, currency, micros, us in totals:
        slot = (pk, event, currency)
        current = merged.get(slot)
        if current is None:
            merged[slot] = [1, micros, us, us]
        else:
            current[0] += 1
            current[1] += micros
            current[2] = min(current[2], us)
            current[3] = max(current[3], us)
    # One upsert statement for the batch: totals only ever grow by addition, min and max.
    session.execute(_TOTALS_UPSERT, [
        {"pk": pk, "event": event, "currency": currency, "count": count, "micros": micros, "first": first,
         "last": last} for (pk, event, currency), (count, micros, first, last) in merged.items()])


_TOTALS_UPSERT = text(
    "INSERT INTO event_totals (identifier_pk, event, currency, count, value_micros, first_us, last_us) "
    "VALUES (:pk, :event, :currency, :count, :micros, :first, :last) "
    "ON CONFLICT (identifier_pk, event, currency) DO UPDATE SET "
    "count = event_totals.count + excluded.count, "
    "value_micros = event_totals.value_micros + excluded.value_micros, "
    "first_us = CASE WHEN excluded.first_us < event_totals.first_us THEN excluded.first_us "
    "ELSE event_totals.first_us END, "
    "last_us = CASE WHEN excluded.last_us > event_totals.last_us THEN excluded.last_us "
    "ELSE event_totals.last_us END")


def erase_evidence(session: Session, identifier_pks: Sequence[int]) -> None:
    """Erase hook: events, trait evidence and summaries of erased identifiers go with them."""
    chunk = list(identifier_pks)
    session.execute(delete(EventRow).where(EventRow.identifier_pk.in_(chunk)))
    session.execute(delete(TraitEvidenceRow).where(TraitEvidenceRow.identifier_pk.in_(chunk)))
    session.execute(delete(TraitStateRow).where(TraitStateRow.identifier_pk.in_(chunk)))
    session.execute(delete(EventTotalRow).where(EventTotalRow.identifier_pk.in_(chunk)))
