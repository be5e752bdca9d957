"""DestinationService, configuration half: create, read, list, update, delete, pause and
resume destinations. Translates requests into :mod:`audiences.destinations` calls and rows
back into messages; mutations are idempotent by ``request_id``.

The delivery log RPCs (``ListDeliveries``, ``GetDelivery``, ``RetryDelivery``,
``ReconcileAudience``) are in :mod:`server.servicers.deliveries`, mixed in here.
Credentials are only ever a reference; errors and logs never repeat it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from audiences.destinations import (
    ACTIVE,
    DEFAULT_PURPOSES,
    KINDS,
    MAX_PAUSE_REASON_LENGTH,
    PAUSED,
    STATES,
    DestinationConfig,
    DestinationRow,
    check_etag,
    config_of,
    create_destination,
    delete_destination,
    get_destination,
    list_destinations,
    require_valid,
    set_destination_state,
    update_destination,
    validate_destination_id,
)
from audiences.models import AudienceDestinationRow, AudienceRow
from audiences.outbox import CANCELLED, DELIVERIES, OPEN_STATUSES, now_us
from identity.events.registry import CANONICAL_EVENTS
from server.app import Application
from server.filters import parse_filter
from server.pagination import page_request
from server.servicers.deliveries import DeliveryLogMixin, destination_stats, parse_destination_name
from server.servicers.timestamps import timestamp_pb
from stitchgraph.errors import FailedPrecondition, InvalidArgument
from stitchgraph.idempotency import run_idempotent
from stitchgraph.v1 import destination_service_pb2, destination_service_pb2_grpc, destinations_pb2

pb = destination_service_pb2
R = TypeVar("R", bound=Message)
_SERVICE = "/stitchgraph.v1.DestinationService/"
_KIND_PREFIX = "DESTINATION_KIND_"
_STATE_PREFIX = "DESTINATION_STATE_"
#: Fields UpdateDestination may replace, in the order the proto lists them.
MUTABLE_FIELDS = ("display_name", "description", "credentials_ref", "settings", "purposes", "events")
_OUTPUT_ONLY = ("name", "state", "etag", "create_time", "update_time", "stats")
#: Integral numbers in a Struct are doubles; up to 2^53 they are stored as integers.
_MAX_EXACT_INT = 2 ** 53

logger = logging.getLogger("stitchgraph.destinations")


def configured_purposes(app: Application) -> tuple[str, ...]:
    """The consent purposes destinations may name: ``settings.consent.purposes`` when the
    configuration has a consent section, else :data:`~audiences.destinations.DEFAULT_PURPOSES`."""
    consent = getattr(app.settings, "consent", None)
    if consent is None:
        return DEFAULT_PURPOSES
    return tuple(str(p) for p in consent.purposes)


def known_events(app: Application) -> frozenset[str]:
    """The canonical event names: the built-in ones and ``events.custom_events``."""
    return frozenset(CANONICAL_EVENTS) | frozenset(app.settings.events.custom_events)


# -- translation -------------------------------------------------------------------------------

def _kind_name(kind: int) -> str:
    """The stored kind for an enum number: "" when unset, ``<n>`` for a number the proto lacks."""
    if kind == destinations_pb2.DESTINATION_KIND_UNSPECIFIED:
        return ""
    try:
        return destinations_pb2.DestinationKind.Name(kind).removeprefix(_KIND_PREFIX)
    except ValueError:
        return f"<{kind}>"


def _plain(value: Any) -> Any:
    """A Struct value as JSON, with integral doubles (``1234.0``) back as integers."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT_INT:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def settings_from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A settings ``Struct`` as JSON (integral numbers as integers); ``{}`` when empty."""
    return _plain(json_format.MessageToDict(struct)) if struct.fields else {}


def config_from_pb(message: destinations_pb2.Destination) -> DestinationConfig:
    """The configuration a ``Destination`` message carries (output-only fields ignored)."""
    return DestinationConfig(kind=_kind_name(message.kind), display_name=message.display_name,
                             description=message.description, credentials_ref=message.credentials_ref,
                             settings=settings_from_struct(message.settings), purposes=tuple(message.purposes),
                             events=tuple(message.events))


def destination_pb(row: DestinationRow) -> destinations_pb2.Destination:
    """``row`` as a ``Destination`` message; ``stats`` stays zero until deliveries land."""
    message = destinations_pb2.Destination(
        name=f"destinations/{row.destination_id}",
        kind=destinations_pb2.DestinationKind.Value(_KIND_PREFIX + row.kind),  # type: ignore[arg-type]
        display_name=row.display_name, description=row.description, credentials_ref=row.credentials_ref,
        purposes=list(row.purposes or ()), events=list(row.events or ()),
        state=destinations_pb2.DestinationState.Value(_STATE_PREFIX + row.state),  # type: ignore[arg-type]
        etag=row.etag, create_time=timestamp_pb(row.create_time), update_time=timestamp_pb(row.update_time),
        stats=destinations_pb2.DestinationStats())
    if row.settings:
        message.settings.update(row.settings)
    return message


def _filter_value(field: str, value: str) -> str:
    """A ``kind`` or ``state`` filter value as stored (prefix optional, any case)."""
    if field == "kind":
        kind = value.upper().removeprefix(_KIND_PREFIX)
        if kind not in KINDS:
            raise InvalidArgument.for_field("filter", f"kind must be one of {', '.join(KINDS)}",
                                            reason="INVALID_FILTER")
        return kind
    if field == "state":
        state = value.upper().removeprefix(_STATE_PREFIX)
        if state not in STATES:
            raise InvalidArgument.for_field("filter", f"state must be one of {', '.join(STATES)}",
                                            reason="INVALID_FILTER")
        return state
    return value


def _update_fields(request: Any) -> tuple[str, ...]:
    """The fields an UpdateDestination request replaces (update_mask semantics of the proto)."""
    paths = list(request.update_mask.paths)
    for i, path in enumerate(paths):
        where = f"update_mask.paths[{i}]"
        if path == "kind":
            raise InvalidArgument.for_field(where, "kind is immutable; create a new destination for another kind",
                                            reason="IMMUTABLE_FIELD")
        if path in _OUTPUT_ONLY:
            raise InvalidArgument.for_field(where, f"{path} is output only; state changes through Pause/"
                                                   "ResumeDestination", reason="NOT_MUTABLE")
        if path != "*" and path not in MUTABLE_FIELDS:
            raise InvalidArgument.for_field(where, f"{path[:64]!r} is not a mutable field; use "
                                                   f"{', '.join(MUTABLE_FIELDS)} or *", reason="NOT_MUTABLE")
    if "*" in paths:
        return MUTABLE_FIELDS
    if paths:
        return tuple(dict.fromkeys(paths))
    message = request.destination
    return tuple(f for f in MUTABLE_FIELDS
                 if (len(message.settings.fields) if f == "settings" else len(getattr(message, f))))


# -- the servicer ------------------------------------------------------------------------------

class DestinationServicer(DeliveryLogMixin, destination_service_pb2_grpc.DestinationServiceServicer):
    def __init__(self, app: Application) -> None:
        self._app = app
        self._db = app.db

    def _mutate(self, method: str, request: Any, response_type: type[R], op: Callable[[Session], R]) -> R:
        return run_idempotent(self._db, _SERVICE + method, request, response_type, op)

    def _pb(self, session: Session, row: DestinationRow) -> destinations_pb2.Destination:
        message = destination_pb(row)
        message.stats.CopyFrom(destination_stats(session, [row.id])[row.id])
        return message

    def _require_valid(self, config: DestinationConfig) -> None:
        require_valid(config, purposes=configured_purposes(self._app), known_events=known_events(self._app))

    def CreateDestination(self, request: Any, context: grpc.ServicerContext) -> Any:
        config = config_from_pb(request.destination)
        violations = validate_destination_id(request.destination_id) if request.destination_id else []
        try:
            self._require_valid(config)
        except InvalidArgument as exc:
            violations = violations + exc.violations
        if violations:
            raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations),
                                  violations=violations, reason="INVALID_DESTINATION")

        def op(session: Session) -> Any:
            row = create_destination(session, config, request.destination_id)
            logger.info("destination %s (%s) created", row.destination_id, row.kind,
                        extra={"destination": row.destination_id, "kind": row.kind})
            return pb.CreateDestinationResponse(destination=destination_pb(row))

        return self._mutate("CreateDestination", request, pb.CreateDestinationResponse, op)

    def GetDestination(self, request: Any, context: grpc.ServicerContext) -> Any:
        destination_id = parse_destination_name(request.name)
        with self._db.read() as session:
            return pb.GetDestinationResponse(destination=self._pb(session, get_destination(session, destination_id)))

    def ListDestinations(self, request: Any, context: grpc.ServicerContext) -> Any:
        comparisons = [(c, _filter_value(c.field, c.value))
                       for c in parse_filter(request.filter, ("kind", "state", "display_name"))]
        page = page_request(request.page_size, request.page_token, request.filter)
        with self._db.read() as session:
            rows = list_destinations(session)
        # Compared in Python, like the order, so both backends agree whatever their collation.
        rows = [r for r in rows if all(c.apply(getattr(r, c.field), value) for c, value in comparisons)]
        if page.after is not None:
            after = (str(page.after[0]), str(page.after[1]))
            rows = [r for r in rows if (r.display_name, r.destination_id) > after]
        more = len(rows) > page.size
        rows = rows[:page.size]
        token = page.next_token([rows[-1].display_name, rows[-1].destination_id], request.filter) if more else ""
        with self._db.read() as session:
            stats = destination_stats(session, [r.id for r in rows])
        messages = []
        for r in rows:
            message = destination_pb(r)
            message.stats.CopyFrom(stats[r.id])
            messages.append(message)
        return pb.ListDestinationsResponse(destinations=messages, next_page_token=token)

    def UpdateDestination(self, request: Any, context: grpc.ServicerContext) -> Any:
        message = request.destination
        destination_id = parse_destination_name(message.name, "destination.name")
        fields = _update_fields(request)
        incoming = config_from_pb(message)

        def op(session: Session) -> Any:
            row = get_destination(session, destination_id)
            check_etag(row, message.etag)
            if incoming.kind and incoming.kind != row.kind:
                raise InvalidArgument.for_field("destination.kind", "is immutable; create a new destination for "
                                                                    "another kind", reason="IMMUTABLE_FIELD")
            updated = replace(config_of(row), **{f: getattr(incoming, f) for f in fields})
            self._require_valid(updated)
            row = update_destination(session, row, updated)
            logger.info("destination %s updated: %s", row.destination_id, ", ".join(fields),
                        extra={"destination": row.destination_id, "fields": list(fields)})
            return pb.UpdateDestinationResponse(destination=self._pb(session, row))

        return self._mutate("UpdateDestination", request, pb.UpdateDestinationResponse, op)

    def DeleteDestination(self, request: Any, context: grpc.ServicerContext) -> Any:
        destination_id = parse_destination_name(request.name)

        def op(session: Session) -> Any:
            row = get_destination(session, destination_id)
            check_etag(row, request.etag)
            users = list(session.execute(
                select(AudienceRow).join(AudienceDestinationRow, AudienceDestinationRow.audience_pk == AudienceRow.id)
                .where(AudienceDestinationRow.destination_pk == row.id).order_by(AudienceRow.audience_id)).scalars())
            if users and not request.force:
                raise FailedPrecondition(
                    f"destination '{destination_id}' is used by audience(s) "
                    + ", ".join(a.audience_id for a in users) + "; detach it or delete with force",
                    reason="DESTINATION_IN_USE", metadata={"field": "force"})
            for audience in users:  # removals for every member delivered there, then detach
                self._app.audiences.detach(session, audience, [row.id], "DESTINATION_DETACHED")
                session.execute(delete(AudienceDestinationRow).where(AudienceDestinationRow.audience_pk == audience.id,
                                                                     AudienceDestinationRow.destination_pk == row.id))
            response = pb.DeleteDestinationResponse(destination=self._pb(session, row))
            now = now_us()
            session.execute(update(DELIVERIES).where(DELIVERIES.c.destination_pk == row.id,
                                                     DELIVERIES.c.status.in_(OPEN_STATUSES))
                            .values(status=CANCELLED, status_reason="DESTINATION_DELETED", claim_token="",
                                    lease_until_us=None, updated_us=now))
            delete_destination(session, row)
            logger.info("destination %s deleted", destination_id, extra={"destination": destination_id})
            return response

        return self._mutate("DeleteDestination", request, pb.DeleteDestinationResponse, op)

    def PauseDestination(self, request: Any, context: grpc.ServicerContext) -> Any:
        destination_id = parse_destination_name(request.name)
        if len(request.reason) > MAX_PAUSE_REASON_LENGTH:
            raise InvalidArgument.for_field("reason", f"must be at most {MAX_PAUSE_REASON_LENGTH} characters",
                                            reason="TOO_LONG")

        def op(session: Session) -> Any:
            row = get_destination(session, destination_id)
            check_etag(row, request.etag)
            if row.state != PAUSED:
                set_destination_state(session, row, PAUSED, request.reason)
                logger.info("destination %s paused: %s", destination_id, request.reason or "(no reason given)",
                            extra={"destination": destination_id, "reason": request.reason})
            return pb.PauseDestinationResponse(destination=self._pb(session, row))

        return self._mutate("PauseDestination", request, pb.PauseDestinationResponse, op)

    def ResumeDestination(self, request: Any, context: grpc.ServicerContext) -> Any:
        destination_id = parse_destination_name(request.name)

        def op(session: Session) -> Any:
            row = get_destination(session, destination_id)
            check_etag(row, request.etag)
            if row.state == PAUSED:
                set_destination_state(session, row, ACTIVE)
                logger.info("destination %s resumed", destination_id, extra={"destination": destination_id})
            return pb.ResumeDestinationResponse(destination=self._pb(session, row))

        response = self._mutate("ResumeDestination", request, pb.ResumeDestinationResponse, op)
        self._app.delivery.wake()
        return response

