"""EventService: translate requests into :class:`~identity.events.incoming.IncomingEvent`,
call the :class:`~identity.events.capture.EventLedger`, translate results back."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter
from sqlalchemy.orm import Session

from identity.events import queries
from identity.events.capture import ACCEPTED, DUPLICATE, PARKED, REJECTED, CaptureResult, EventLedger, Receipt
from identity.events.incoming import IncomingEvent
from identity.events.models import EventRow, ParkedEventRow
from identity.events.registry import APPROVED, DRAFT, Mapping_, new_mapping_id
from identity.events.sources import parse as parse_source
from identity.events.traits import TraitValue
from identity.queries import require_person_pk
from server.app import Application
from server.filters import parse_filter
from server.pagination import page_request
from server.servicers.identity import parse_person_name
from server.servicers.timestamps import micros_pb, timestamp_pb
from stitchgraph.errors import Aborted, FieldViolation, InvalidArgument, NotFound
from stitchgraph.idempotency import run_idempotent
from stitchgraph.v1 import (
    common_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    events_pb2,
    identity_pb2,
)

pb = event_service_pb2
R = TypeVar("R", bound=Message)
_SERVICE = "/stitchgraph.v1.EventService/"
MAX_PAYLOADS = 100
MAX_PAYLOAD_BYTES = 5 * 1024 * 1024

EVENTS_CAPTURED = Counter("stitchgraph_events_captured_total", "Events captured, by status and source",
                          ["status", "source"])

_STATUS_PB = {ACCEPTED: events_pb2.CAPTURE_STATUS_ACCEPTED, DUPLICATE: events_pb2.CAPTURE_STATUS_DUPLICATE,
              REJECTED: events_pb2.CAPTURE_STATUS_REJECTED, PARKED: events_pb2.CAPTURE_STATUS_PARKED}
_SOURCE_KINDS = {events_pb2.SOURCE_KIND_POSTHOG: "posthog", events_pb2.SOURCE_KIND_SEGMENT: "segment",
                 events_pb2.SOURCE_KIND_RUDDERSTACK: "rudderstack", events_pb2.SOURCE_KIND_HEAP: "heap",
                 events_pb2.SOURCE_KIND_CANONICAL: "canonical"}
_MAPPING_STATUS = {DRAFT: events_pb2.EVENT_MAPPING_STATUS_DRAFT, APPROVED: events_pb2.EVENT_MAPPING_STATUS_APPROVED}
_MAPPING_STATUS_NAME = {v: k for k, v in _MAPPING_STATUS.items()}
_TRAIT_KIND = {"SET": events_pb2.TRAIT_KIND_SET, "SET_ONCE": events_pb2.TRAIT_KIND_SET_ONCE,
               "COMPUTED": events_pb2.TRAIT_KIND_COMPUTED, "COHORT": events_pb2.TRAIT_KIND_COHORT}
_CONTEXT_FIELDS = tuple(f.name for f in events_pb2.EventContext.DESCRIPTOR.fields if f.name != "consent")


# -- translation: requests -----------------------------------------------------------------------

def _datetime(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _struct_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(struct) if struct.fields else {}


def incoming_from_pb(event: events_pb2.Event) -> IncomingEvent:
    """A canonical ``Event`` message as an :class:`IncomingEvent` (output-only fields ignored)."""
    context = {name: getattr(event.context, name) for name in _CONTEXT_FIELDS if getattr(event.context, name)}
    consent = json_format.MessageToDict(event.context.consent, preserving_proto_field_name=True) \
        if event.context.HasField("consent") else {}
    metadata: dict[str, Any] = {k: getattr(event.metadata, k) for k in ("posthog_session_id", "replay_url", "library")
                                if getattr(event.metadata, k)}
    if event.metadata.HasField("sent_at"):
        metadata["sent_at"] = _datetime(event.metadata.sent_at)
    violations = []
    if not event.event:
        violations.append(FieldViolation("event", "is required: the canonical event name, for example "
                                                  "\"purchase\"", "REQUIRED"))
    items = []
    for item in event.items:
        entry: dict[str, Any] = {k: getattr(item, k) for k in ("item_id", "name", "category", "brand", "variant",
                                                              "price") if getattr(item, k)}
        if item.quantity:
            entry["quantity"] = item.quantity
        entry.update(_struct_dict(item.properties))
        items.append(entry)
    action = events_pb2.ActionSource.Name(event.action_source).removeprefix("ACTION_SOURCE_")
    return IncomingEvent(
        kind="track", source_event=event.event, source=event.source or "grpc",
        identifiers=[(i.type, i.value) for i in event.identifiers],
        occurred_at=_datetime(event.occurred_at) if event.HasField("occurred_at") else None,
        event_id=event.event_id, message_id=event.metadata.source_message_id,
        value=event.value, currency=event.currency, order_id=event.order_id, items=items,
        properties=_struct_dict(event.properties), context=context, consent=consent, metadata=metadata,
        trait_set=_struct_dict(event.trait_updates.set), trait_set_once=_struct_dict(event.trait_updates.set_once),
        trait_unset=list(event.trait_updates.unset), action_source="" if action == "UNSPECIFIED" else action,
        violations=violations,
    )


def _canonical_payload(payload: str, source: str) -> tuple[list[FieldViolation], list[IncomingEvent]]:
    """A SOURCE_KIND_CANONICAL payload: an Event in proto3 JSON, or a JSON array of them."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        return [FieldViolation("", f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                               "INVALID_JSON")], []
    items = data if isinstance(data, list) else [data]
    messages = []
    for item in items:
        event = events_pb2.Event()
        try:
            json_format.ParseDict(item, event)
        except (json_format.ParseError, TypeError) as exc:
            message = IncomingEvent(kind="track", source_event="", source=source,
                                    violations=[FieldViolation("", f"not a canonical Event: {exc}", "INVALID_EVENT")])
            messages.append(message)
            continue
        incoming = incoming_from_pb(event)
        if not event.source:
            incoming.source = source
        messages.append(incoming)
    return [], messages


def _merge_request_consent(messages: list[IncomingEvent], signals: Mapping[str, Any]) -> None:
    if not signals:
        return
    for message in messages:
        for key, value in signals.items():
            message.consent.setdefault(key, value)


def check_batch_size(count: int, field: str, limit: int) -> None:
    """Raise :class:`InvalidArgument` unless ``count`` events fit one capture call of at most ``limit``."""
    if count == 0:
        raise InvalidArgument.for_field(field, "at least one event is required", reason="EMPTY_BATCH")
    if count > limit:
        raise InvalidArgument.for_field(field, f"at most {limit} events per call (got {count}); split the batch",
                                        reason="BATCH_TOO_LARGE")


# -- capture shared by the gRPC servicer and the webhook listener --------------------------------

@dataclass
class PayloadCapture:
    """What became of one source payload: its payload-level violations (then nothing of it was
    captured) or one capture result per message, in order."""

    violations: list[FieldViolation]
    results: list[CaptureResult]


def capture_messages(app: Application, messages: list[IncomingEvent], validate_only: bool) -> list[CaptureResult]:
    """Capture ``messages`` through the ledger, count them by status and source, then bring
    derived state up to date (unless ``validate_only``)."""
    results = app.events.capture(messages, validate_only=validate_only)
    if not validate_only:
        for message, result in zip(messages, results, strict=True):
            EVENTS_CAPTURED.labels(result.status, message.source).inc()
        app.after_write()
    return results


def capture_source_payloads(app: Application, kind: str, payloads: Sequence[str], *, source: str = "",
                            request_consent: Mapping[str, Any] | None = None, validate_only: bool = False,
                            batch_field: str = "json_payloads") -> list[PayloadCapture]:
    """Parse ``payloads`` sent by a source of ``kind`` (``posthog``, ``segment``, ``rudderstack``,
    ``heap`` or ``canonical``) and capture the messages of every valid payload in one call.

    This is the one path from a source payload to stored events: ``CaptureSourcePayloads`` and
    the webhook listener both use it, so a payload stores the same events whichever way it
    arrives. ``source`` labels the events (default: the kind; ``grpc`` for canonical payloads);
    ``request_consent`` (ConsentSignals as a dict) fills consent fields a message leaves unset.
    Raises :class:`InvalidArgument` (``BATCH_TOO_LARGE``, naming ``batch_field``) when the
    payloads hold more events than one capture call may.
    """
    source = source or ("grpc" if kind == "canonical" else kind)
    received_at = datetime.now(UTC)
    parsed: list[tuple[list[FieldViolation], list[IncomingEvent]]] = []
    for i, payload in enumerate(payloads):
        if len(payload.encode()) > MAX_PAYLOAD_BYTES:
            parsed.append(([FieldViolation("", f"payload {i} is larger than {MAX_PAYLOAD_BYTES} bytes",
                                           "PAYLOAD_TOO_LARGE")], []))
        elif kind == "canonical":
            parsed.append(_canonical_payload(payload, source))
        else:
            payload_parsed = parse_source(kind, payload, source=source, received_at=received_at)
            parsed.append((payload_parsed.violations, payload_parsed.messages))
    everything = [m for violations, messages in parsed if not violations for m in messages]
    check_batch_size(len(everything) or 1, batch_field, app.settings.events.max_batch_size)
    _merge_request_consent(everything, request_consent or {})
    results = iter(capture_messages(app, everything, validate_only))
    return [PayloadCapture(violations, [] if violations else [next(results) for _ in messages])
            for violations, messages in parsed]


# -- translation: responses ----------------------------------------------------------------------

def receipt_pb(receipt: Receipt) -> events_pb2.EventReceipt:
    return events_pb2.EventReceipt(
        event=f"events/{receipt.event_id}" if receipt.stored_event else "",
        event_id=receipt.event_id,
        person=f"persons/{receipt.person_id}" if receipt.person_id else "",
        receive_time=timestamp_pb(receipt.receive_time),
        canonical_event=receipt.canonical_event,
        generated_event_id=receipt.generated_event_id,
        ignored_identifiers=[identity_pb2.IgnoredIdentifier(index=i["index"], type=i["type"], reason=i["reason"],
                                                            detail=i["detail"]) for i in receipt.ignored],
        refused_links=[identity_pb2.LinkDecision(
            pair=identity_pb2.IdentifierPair(first=common_pb2.Identifier(type=r["first"][0], value=r["first"][1]),
                                             second=common_pb2.Identifier(type=r["second"][0], value=r["second"][1])),
            decision=identity_pb2.LINK_DECISION_KIND_REFUSED, reason=r["reason"], detail=r["detail"])
            for r in receipt.refused],
    )


def _violation_pb(v: FieldViolation) -> common_pb2.FieldViolation:
    return common_pb2.FieldViolation(field=v.field, description=v.description, reason=v.reason)


def result_pb(result: CaptureResult, index: int | None = None) -> events_pb2.EventResult:
    return events_pb2.EventResult(
        index=result.index if index is None else index, status=_STATUS_PB[result.status],
        receipt=receipt_pb(result.receipt) if result.receipt is not None and result.status in (ACCEPTED, DUPLICATE)
        else None,
        violations=[_violation_pb(v) for v in result.violations], reason=result.reason, event_id=result.event_id)


def _summary(results: list[CaptureResult], summary: events_pb2.CaptureSummary | None = None) -> \
        events_pb2.CaptureSummary:
    summary = summary or events_pb2.CaptureSummary()
    summary.received_count += len(results)
    for result in results:
        if result.status == ACCEPTED:
            summary.accepted_count += 1
        elif result.status == DUPLICATE:
            summary.duplicate_count += 1
        elif result.status == REJECTED:
            summary.rejected_count += 1
        else:
            summary.parked_count += 1
    return summary


def _value_pb(value: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(value, out)
    return out


def trait_pb(trait: TraitValue) -> events_pb2.Trait:
    return events_pb2.Trait(key=trait.key, value=_value_pb(trait.value), source=trait.source,
                            time=micros_pb(trait.occurred_us) if trait.occurred_us else None, event_id=trait.event_id,
                            kind=_TRAIT_KIND[trait.kind])


def event_pb(row: EventRow | ParkedEventRow, person_id: str = "") -> events_pb2.Event:
    body = row.body or {}
    context = dict(body.get("context", {}))
    consent = context.pop("consent", None)
    metadata = dict(body.get("metadata", {}))
    sent_at = metadata.pop("sent_at", None)
    event = events_pb2.Event(
        identifiers=[common_pb2.Identifier(type=t, value=v) for t, v in body.get("identifiers", [])],
        source=row.source, source_event=row.source_event,
        context=events_pb2.EventContext(**{k: v for k, v in context.items() if k in _CONTEXT_FIELDS}),
        metadata=events_pb2.EventMetadata(**{k: v for k, v in metadata.items()
                                             if k in ("posthog_session_id", "replay_url", "source_message_id",
                                                      "library")}),
        receive_time=timestamp_pb(row.receive_time),
    )
    if consent:
        json_format.ParseDict(consent, event.context.consent, ignore_unknown_fields=True)
    if sent_at:
        event.metadata.sent_at.FromDatetime(datetime.fromisoformat(sent_at))
    properties = body.get("properties") or {}
    if properties:
        event.properties.update(properties)
    for item in body.get("items", []):
        extra = item.get("properties") or {}
        entry = events_pb2.Item(**{k: v for k, v in item.items() if k != "properties"})
        if extra:
            entry.properties.update(extra)
        event.items.append(entry)
    traits = body.get("traits") or {}
    if traits.get("set"):
        event.trait_updates.set.update(traits["set"])
    if traits.get("set_once"):
        event.trait_updates.set_once.update(traits["set_once"])
    event.trait_updates.unset.extend(traits.get("unset", []))
    if body.get("action_source"):
        event.action_source = events_pb2.ActionSource.Value(  # type: ignore[assignment]
            "ACTION_SOURCE_" + body["action_source"])
    if isinstance(row, EventRow):
        event.name = f"events/{row.event_id}"
        event.event = row.event
        event.event_id = row.event_id
        event.occurred_at.CopyFrom(micros_pb(row.occurred_us))
        event.value = row.value or ""
        event.currency = row.currency or ""
        event.order_id = row.order_id or ""
        event.person = f"persons/{person_id}" if person_id else ""
    else:
        event.event_id = row.event_id
        event.occurred_at.CopyFrom(micros_pb(int(body.get("occurred_us", 0))))
    return event


def mapping_pb(mapping: Mapping_) -> events_pb2.EventMapping:
    return events_pb2.EventMapping(
        name=f"eventMappings/{mapping.id}", source=mapping.source, source_event=mapping.source_event,
        canonical_event=mapping.canonical_event, required_properties=list(mapping.required_properties),
        status=_MAPPING_STATUS[mapping.status], description=mapping.description,
        property_map=dict(mapping.property_map),
        create_time=timestamp_pb(mapping.create_time) if mapping.create_time else None,
        update_time=timestamp_pb(mapping.update_time) if mapping.update_time else None,
        etag=mapping.etag, built_in=mapping.built_in)


def _mapping_from_pb(message: events_pb2.EventMapping, mapping_id: str) -> Mapping_:
    status = _MAPPING_STATUS_NAME.get(message.status, DRAFT if message.status == 0 else "")
    return Mapping_(id=mapping_id, source=message.source, source_event=message.source_event,
                    canonical_event=message.canonical_event, required_properties=tuple(message.required_properties),
                    status=status, description=message.description, property_map=dict(message.property_map))


def parse_mapping_name(name: str, field: str = "name") -> str:
    mapping_id = name.removeprefix("eventMappings/")
    if not mapping_id or "/" in mapping_id or len(mapping_id) > 63:
        raise InvalidArgument.for_field(field, "must be a mapping resource name like 'eventMappings/my-mapping'")
    return mapping_id


def _time_us(value: str, field: str = "filter") -> int:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument.for_field(field, f"{value[:40]!r} is not an RFC 3339 time",
                                        reason="INVALID_FILTER") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


class EventServicer(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self, app: Application) -> None:
        self._app = app
        self._db = app.db
        self._ledger: EventLedger = app.events
        self._settings = app.settings.events

    def _mutate(self, method: str, request: Any, response_type: type[R], op: Callable[[Session], R]) -> R:
        return run_idempotent(self._db, _SERVICE + method, request, response_type, op)

    def _capture(self, messages: list[IncomingEvent], validate_only: bool) -> list[CaptureResult]:
        return capture_messages(self._app, messages, validate_only)

    def _check_batch(self, count: int, field: str) -> None:
        check_batch_size(count, field, self._settings.max_batch_size)

    # -- capture ------------------------------------------------------------------------------------

    def Capture(self, request: Any, context: grpc.ServicerContext) -> Any:
        result = self._capture([incoming_from_pb(request.event)], request.validate_only)[0]
        if result.status == REJECTED:
            raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in result.violations),
                                  violations=[FieldViolation(f"event.{v.field}", v.description, v.reason)
                                              for v in result.violations], reason=result.reason)
        return pb.CaptureResponse(
            status=_STATUS_PB[result.status],
            receipt=receipt_pb(result.receipt) if result.receipt is not None and not request.validate_only else None,
            violations=[_violation_pb(v) for v in result.violations])

    def CaptureBatch(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check_batch(len(request.events), "events")
        results = self._capture([incoming_from_pb(e) for e in request.events], request.validate_only)
        return pb.CaptureBatchResponse(results=[result_pb(r) for r in results], summary=_summary(results))

    def CaptureStream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        summary = events_pb2.CaptureSummary()
        kept: list[events_pb2.EventResult] = []
        omit_accepted: bool | None = None
        offset = 0
        for message in request_iterator:
            if omit_accepted is None:
                omit_accepted = message.omit_accepted_results
            self._check_batch(len(message.events), f"events (stream message at event {offset})")
            results = self._capture([incoming_from_pb(e) for e in message.events], False)
            _summary(results, summary)
            for result in results:
                if not (omit_accepted and result.status == ACCEPTED):
                    kept.append(result_pb(result, offset + result.index))
            offset += len(results)
        return pb.CaptureStreamResponse(summary=summary, results=kept)

    def CaptureSourcePayloads(self, request: Any, context: grpc.ServicerContext) -> Any:
        kind = _SOURCE_KINDS.get(request.source_kind)
        if kind is None:
            raise InvalidArgument.for_field("source_kind", "name the payload format (POSTHOG, SEGMENT, RUDDERSTACK, "
                                                           "HEAP or CANONICAL)")
        if not request.json_payloads or len(request.json_payloads) > MAX_PAYLOADS:
            raise InvalidArgument.for_field("json_payloads", f"send 1 to {MAX_PAYLOADS} payloads")
        captured = capture_source_payloads(
            self._app, kind, request.json_payloads, source=request.source,
            request_consent=json_format.MessageToDict(request.request_consent, preserving_proto_field_name=True),
            validate_only=request.validate_only)
        response = pb.CaptureSourcePayloadsResponse()
        all_results: list[CaptureResult] = []
        for index, payload in enumerate(captured):
            payload_result = response.results.add(index=index,
                                                  violations=[_violation_pb(v) for v in payload.violations])
            for position, result in enumerate(payload.results):
                all_results.append(result)
                payload_result.results.append(result_pb(result, position))
        response.summary.CopyFrom(_summary(all_results))
        return response

    # -- reads --------------------------------------------------------------------------------------

    def GetEvent(self, request: Any, context: grpc.ServicerContext) -> Any:
        event_id = request.name.removeprefix("events/")
        if not event_id or len(event_id) > 256:
            raise InvalidArgument.for_field("name", "must be an event resource name like 'events/{event_id}'")
        with self._db.read() as session:
            found = queries.event_with_person(session, event_id)
            if found is None:
                raise NotFound(f"event {event_id[:64]!r} not found", reason="EVENT_NOT_FOUND")
            return pb.GetEventResponse(event=event_pb(*found))

    def ListPersonEvents(self, request: Any, context: grpc.ServicerContext) -> Any:
        person_id = parse_person_name(request.parent, "parent")
        comparisons = parse_filter(request.filter, ("event", "source", "occurred_at"))
        conditions = []
        for c in comparisons:
            if c.field == "occurred_at":
                conditions.append(c.apply(EventRow.occurred_us, _time_us(c.value)))
            else:
                conditions.append(c.apply(getattr(EventRow, c.field), c.value))
        page = page_request(request.page_size, request.page_token, f"{request.parent}\x00{request.filter}")
        with self._db.read() as session:
            pk = require_person_pk(session, person_id)
            after = (int(page.after[0]), str(page.after[1])) if page.after else None
            rows = queries.person_events(session, pk, limit=page.size + 1, after=after, conditions=conditions)
            person = queries.person_ids_of(session, [r.identifier_pk for r in rows if r.identifier_pk])
            more = len(rows) > page.size
            rows = rows[:page.size]
            token = page.next_token([rows[-1].occurred_us, rows[-1].event_id],
                                    f"{request.parent}\x00{request.filter}") if more else ""
            return pb.ListPersonEventsResponse(
                events=[event_pb(r, person.get(r.identifier_pk or 0, "")) for r in rows], next_page_token=token)

    def ListPersonTraits(self, request: Any, context: grpc.ServicerContext) -> Any:
        person_id = parse_person_name(request.parent, "parent")
        query = f"{request.parent}\x00{request.kind}\x00{','.join(request.keys)}"
        page = page_request(request.page_size, request.page_token, query)
        kind = {v: k for k, v in _TRAIT_KIND.items()}.get(request.kind)
        keys = set(request.keys)
        with self._db.read() as session:
            pk = require_person_pk(session, person_id)
            traits = [t for t in queries.person_traits(session, pk)
                      if (kind is None or t.kind == kind) and (not keys or t.key in keys)]
        if page.after is not None:
            traits = [t for t in traits if (t.key, t.kind) > tuple(page.after)]
        more = len(traits) > page.size
        traits = traits[:page.size]
        token = page.next_token([traits[-1].key, traits[-1].kind], query) if more else ""
        return pb.ListPersonTraitsResponse(traits=[trait_pb(t) for t in traits], next_page_token=token)

    # -- schema registry ----------------------------------------------------------------------------

    def CreateEventMapping(self, request: Any, context: grpc.ServicerContext) -> Any:
        message = request.event_mapping
        mapping_id = request.event_mapping_id or new_mapping_id(message.source, message.source_event)
        mapping = _mapping_from_pb(message, mapping_id)
        if request.event_mapping_id:
            self._ledger.registry.check(mapping)

        def op(session: Session) -> Any:
            return pb.CreateEventMappingResponse(event_mapping=mapping_pb(self._ledger.registry.create(session,
                                                                                                       mapping)))

        return self._mutate("CreateEventMapping", request, pb.CreateEventMappingResponse, op)

    def GetEventMapping(self, request: Any, context: grpc.ServicerContext) -> Any:
        mapping_id = parse_mapping_name(request.name)
        with self._db.read() as session:
            return pb.GetEventMappingResponse(event_mapping=mapping_pb(self._ledger.registry.get(session,
                                                                                                 mapping_id)))

    def ListEventMappings(self, request: Any, context: grpc.ServicerContext) -> Any:
        comparisons = parse_filter(request.filter, ("source", "source_event", "canonical_event", "status"))
        page = page_request(request.page_size, request.page_token, request.filter)
        with self._db.read() as session:
            mappings = self._ledger.registry.list(session)

        def keep(m: Mapping_) -> bool:
            for c in comparisons:
                expected: Any = c.value.upper().removeprefix("EVENT_MAPPING_STATUS_") if c.field == "status" \
                    else c.value
                if not c.apply(getattr(m, c.field), expected):
                    return False
            return True

        mappings = [m for m in mappings if keep(m)]
        if page.after is not None:
            mappings = [m for m in mappings if (m.source, m.source_event) > tuple(page.after)]
        more = len(mappings) > page.size
        mappings = mappings[:page.size]
        token = page.next_token([mappings[-1].source, mappings[-1].source_event], request.filter) if more else ""
        return pb.ListEventMappingsResponse(event_mappings=[mapping_pb(m) for m in mappings], next_page_token=token)

    def UpdateEventMapping(self, request: Any, context: grpc.ServicerContext) -> Any:
        message = request.event_mapping
        mapping_id = parse_mapping_name(message.name, "event_mapping.name")
        paths = list(request.update_mask.paths)
        mutable = ("source", "source_event", "canonical_event", "required_properties", "status", "description",
                   "property_map")
        for i, path in enumerate(paths):
            if path != "*" and path not in mutable:
                raise InvalidArgument.for_field(f"update_mask.paths[{i}]", f"{path[:64]!r} is not a mutable field; "
                                                f"use {', '.join(mutable)} or *")

        def op(session: Session) -> Any:
            registry = self._ledger.registry
            current = registry.get(session, mapping_id)
            if message.etag and message.etag != current.etag:
                raise Aborted("the mapping changed since it was read; read it again and retry",
                              reason="STALE_ETAG")
            incoming = _mapping_from_pb(message, mapping_id)
            fields: tuple[str, ...]
            if "*" in paths:
                fields = mutable
            elif paths:
                fields = tuple(paths)
            else:  # every field set to a non-default value
                fields = tuple(f for f in mutable if (len(getattr(message, f)) if f != "status" else message.status))
            changes = {f: getattr(incoming, f) for f in fields}
            updated = Mapping_(**{**current.__dict__, **changes, "built_in": current.built_in})
            return pb.UpdateEventMappingResponse(event_mapping=mapping_pb(registry.update(session, updated)))

        return self._mutate("UpdateEventMapping", request, pb.UpdateEventMappingResponse, op)

    def DeleteEventMapping(self, request: Any, context: grpc.ServicerContext) -> Any:
        mapping_id = parse_mapping_name(request.name)

        def op(session: Session) -> Any:
            registry = self._ledger.registry
            current = registry.get(session, mapping_id)
            if request.etag and request.etag != current.etag:
                raise Aborted("the mapping changed since it was read; read it again and retry", reason="STALE_ETAG")
            return pb.DeleteEventMappingResponse(event_mapping=mapping_pb(registry.delete(session, mapping_id)))

        return self._mutate("DeleteEventMapping", request, pb.DeleteEventMappingResponse, op)

    def ListParkedEvents(self, request: Any, context: grpc.ServicerContext) -> Any:
        comparisons = parse_filter(request.filter, ("source", "source_event", "reason", "receive_time"))
        conditions = []
        for c in comparisons:
            if c.field == "receive_time":
                moment = datetime.fromtimestamp(_time_us(c.value) / 1_000_000, tz=UTC)
                conditions.append(c.apply(ParkedEventRow.receive_time, moment))
            else:
                conditions.append(c.apply(getattr(ParkedEventRow, c.field), c.value))
        page = page_request(request.page_size, request.page_token, request.filter)
        with self._db.read() as session:
            rows = queries.parked_events(session, limit=page.size + 1, after=page.after, conditions=conditions)
        more = len(rows) > page.size
        rows = rows[:page.size]
        token = page.next_token(rows[-1].id, request.filter) if more else ""
        return pb.ListParkedEventsResponse(parked_events=[
            events_pb2.ParkedEvent(name=f"parkedEvents/{r.id}", source=r.source, source_event=r.source_event,
                                   reason=r.reason, detail=r.detail, receive_time=timestamp_pb(r.receive_time),
                                   event=event_pb(r)) for r in rows], next_page_token=token)
