"""DestinationService, delivery half: the delivery log (list, get), retrying a dead-lettered
delivery, and reconciling an audience with its destinations. Domain work lives in
:mod:`audiences.outbox`, :mod:`audiences.delivery` and :mod:`audiences.reconcile`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from audiences.delivery import update_erasures
from audiences.destinations import DestinationRow, get_destination, validate_destination_id
from audiences.models import AudienceDestinationRow
from audiences.outbox import (
    DEAD_LETTERED,
    DELIVERIES,
    IN_FLIGHT,
    KINDS_OF_DELIVERY,
    PENDING,
    RETRYING,
    STATUSES,
    DeliveryAttemptRow,
    DeliveryBatchRow,
    DeliveryRow,
    now_us,
)
from audiences.reconcile import reconcile_audience
from identity.queries import person_pk_by_id
from server.pagination import page_request
from server.servicers.audiences import require_audience
from server.servicers.timestamps import micros_pb
from stitchgraph.errors import FailedPrecondition, InvalidArgument, NotFound
from stitchgraph.v1 import destination_service_pb2, destinations_pb2

pb = destination_service_pb2
_CLASSIFICATIONS = {"SUCCEEDED": destinations_pb2.ATTEMPT_CLASSIFICATION_SUCCEEDED,
                    "RETRYABLE": destinations_pb2.ATTEMPT_CLASSIFICATION_RETRYABLE,
                    "THROTTLED": destinations_pb2.ATTEMPT_CLASSIFICATION_THROTTLED,
                    "PERMANENT": destinations_pb2.ATTEMPT_CLASSIFICATION_PERMANENT}


def parse_destination_name(name: str, field: str = "name") -> str:
    """The destination ID of ``destinations/{id}``; raise :class:`InvalidArgument` on ``field``."""
    destination_id = name.removeprefix("destinations/")
    if not name.startswith("destinations/") or validate_destination_id(destination_id):
        raise InvalidArgument.for_field(field, "must be a destination resource name like "
                                               "'destinations/meta-capi'", reason="INVALID_NAME")
    return destination_id


def parse_delivery_name(name: str, field: str = "name") -> tuple[str, int]:
    """``destinations/{d}/deliveries/{id}`` → (destination ID, delivery primary key)."""
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == "destinations" and parts[2] == "deliveries" and parts[3].isdigit():
        parse_destination_name(f"destinations/{parts[1]}", field)
        return parts[1], int(parts[3])
    raise InvalidArgument.for_field(field, "must be a delivery resource name like "
                                           "'destinations/meta-capi/deliveries/123'", reason="INVALID_NAME")


def _enum_name(enum: Any, value: int, prefix: str, field: str, allowed: Sequence[str]) -> str:
    if value == 0:
        return ""
    try:
        name = str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        name = ""
    if name not in allowed:
        raise InvalidArgument.for_field(field, "is not a known value", reason="INVALID_ENUM")
    return name


def deliveries_pb(session: Session, rows: Sequence[DeliveryRow]) -> list[destinations_pb2.Delivery]:
    """Delivery messages with their attempt logs (one query for every row's attempts)."""
    logs: dict[int, list[destinations_pb2.DeliveryAttempt]] = {}
    ids = [r.id for r in rows]
    if ids:
        query = (select(DeliveryAttemptRow.delivery_pk, DeliveryAttemptRow.batch_pk, DeliveryAttemptRow.classification,
                        DeliveryAttemptRow.platform_error_code, DeliveryAttemptRow.error, DeliveryBatchRow.time_us,
                        DeliveryBatchRow.http_status, DeliveryBatchRow.latency_us, DeliveryBatchRow.excerpt,
                        DeliveryBatchRow.size)
                 .join(DeliveryBatchRow, DeliveryBatchRow.id == DeliveryAttemptRow.batch_pk)
                 .where(DeliveryAttemptRow.delivery_pk.in_(ids)).order_by(DeliveryAttemptRow.id))
        for a in session.execute(query):
            latency = Duration()
            latency.FromMicroseconds(a.latency_us)
            logs.setdefault(a.delivery_pk, []).append(destinations_pb2.DeliveryAttempt(
                time=micros_pb(a.time_us), http_status=a.http_status, platform_error_code=a.platform_error_code,
                classification=_CLASSIFICATIONS.get(a.classification,
                                                    destinations_pb2.ATTEMPT_CLASSIFICATION_UNSPECIFIED),
                response_excerpt=a.excerpt, latency=latency, batch_id=str(a.batch_pk), batch_size=a.size,
                error=a.error))
    messages = []
    for r in rows:
        log = logs.get(r.id, [])
        message = destinations_pb2.Delivery(
            name=f"destinations/{r.destination_id}/deliveries/{r.id}", destination=f"destinations/{r.destination_id}",
            kind=destinations_pb2.DeliveryKind.Value("DELIVERY_KIND_" + r.kind),  # type: ignore[arg-type]
            status=destinations_pb2.DeliveryStatus.Value("DELIVERY_STATUS_" + r.status),  # type: ignore[arg-type]
            attempts=len(log), attempts_log=log, event_id=r.event_id,
            person=f"persons/{r.person_id}" if r.person_id else "", create_time=micros_pb(r.created_us),
            update_time=micros_pb(r.updated_us), audience=f"audiences/{r.audience_id}" if r.audience_id else "",
            erasure=f"erasures/{r.erasure_id}" if r.erasure_id else "", status_reason=r.status_reason,
            platform_event_name=r.platform_event)
        if r.status in (PENDING, RETRYING):
            message.next_attempt_time.CopyFrom(micros_pb(r.next_attempt_us))
        if r.expire_us is not None:
            message.expire_time.CopyFrom(micros_pb(r.expire_us))
        messages.append(message)
    return messages


def destination_stats(session: Session, pks: Sequence[int]) -> dict[int, destinations_pb2.DestinationStats]:
    """Health counters of each destination in ``pks``."""
    stats = {pk: destinations_pb2.DestinationStats() for pk in pks}
    if not pks:
        return stats
    counts = session.execute(select(DeliveryRow.destination_pk, DeliveryRow.status, func.count())
                             .where(DeliveryRow.status.in_((PENDING, IN_FLIGHT, RETRYING, DEAD_LETTERED)),
                                    DeliveryRow.destination_pk.in_(list(pks)))
                             .group_by(DeliveryRow.destination_pk, DeliveryRow.status))
    for pk, status, count in counts:
        if status == DEAD_LETTERED:
            stats[pk].dead_lettered_count += count
        else:
            stats[pk].pending_count += count
    for row in session.execute(select(DestinationRow.id, DestinationRow.last_success_us,
                                      DestinationRow.last_failure_us).where(DestinationRow.id.in_(list(pks)))):
        if row.last_success_us:
            stats[row.id].last_success_time.CopyFrom(micros_pb(row.last_success_us))
        if row.last_failure_us:
            stats[row.id].last_failure_time.CopyFrom(micros_pb(row.last_failure_us))
    return stats


class DeliveryLogMixin:
    """The delivery RPCs of DestinationService (mixed into its servicer)."""

    _app: Any
    _db: Any
    #: The servicer's idempotent mutation runner (``run_idempotent`` under its service name).
    _mutate: Any

    def ListDeliveries(self, request: Any, context: grpc.ServicerContext) -> Any:
        conditions: list[Any] = []
        parent = request.parent
        status = _enum_name(destinations_pb2.DeliveryStatus, request.status, "DELIVERY_STATUS_", "status", STATUSES)
        kind = _enum_name(destinations_pb2.DeliveryKind, request.kind, "DELIVERY_KIND_", "kind", KINDS_OF_DELIVERY)
        if len(request.event_id) > 256:
            raise InvalidArgument.for_field("event_id", "must be at most 256 characters", reason="TOO_LONG")
        query_key = "|".join([parent, status, kind, request.event_id, request.person, request.audience])
        page = page_request(request.page_size, request.page_token, query_key)
        with self._db.read() as session:
            if parent != "destinations/-":
                destination_id = parse_destination_name(parent, "parent")
                conditions.append(DeliveryRow.destination_pk == get_destination(session, destination_id).id)
            if status:
                conditions.append(DeliveryRow.status == status)
            if kind:
                conditions.append(DeliveryRow.kind == kind)
            if request.event_id:
                conditions.append(DeliveryRow.event_id == request.event_id)
            if request.person:
                if not request.person.startswith("persons/"):
                    raise InvalidArgument.for_field("person", "must be 'persons/{person_id}'", reason="INVALID_NAME")
                person_id = request.person.removeprefix("persons/")
                pk = person_pk_by_id(session, person_id)
                conditions.append(or_(DeliveryRow.person_id == person_id, DeliveryRow.person_pk == pk)
                                  if pk is not None else DeliveryRow.person_id == person_id)
            if request.audience:
                conditions.append(DeliveryRow.audience_pk == require_audience(session, request.audience,
                                                                               "audience").id)
            if page.after is not None:
                conditions.append(DeliveryRow.id < int(page.after))
            rows = list(session.execute(select(DeliveryRow).where(*conditions).order_by(DeliveryRow.id.desc())
                                        .limit(page.size + 1)).scalars())
            more = len(rows) > page.size
            rows = rows[:page.size]
            token = page.next_token(rows[-1].id, query_key) if more else ""
            return pb.ListDeliveriesResponse(deliveries=deliveries_pb(session, rows), next_page_token=token)

    def _delivery(self, session: Session, name: str) -> DeliveryRow:
        destination_id, pk = parse_delivery_name(name)
        row = session.get(DeliveryRow, pk)
        if row is None or row.destination_id != destination_id:
            raise NotFound(f"delivery {name!r} not found", reason="DELIVERY_NOT_FOUND")
        return row

    def GetDelivery(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._db.read() as session:
            row = self._delivery(session, request.name)
            return pb.GetDeliveryResponse(delivery=deliveries_pb(session, [row])[0])

    def RetryDelivery(self, request: Any, context: grpc.ServicerContext) -> Any:
        parse_delivery_name(request.name)

        def op(session: Session) -> Any:
            row = self._delivery(session, request.name)
            if row.status != DEAD_LETTERED:
                raise FailedPrecondition(f"only a DEAD_LETTERED delivery can be retried; this one is {row.status}",
                                         reason="DELIVERY_NOT_DEAD_LETTERED", metadata={"status": row.status})
            now = now_us()
            session.execute(update(DELIVERIES).where(DELIVERIES.c.id == row.id, DELIVERIES.c.status == DEAD_LETTERED)
                            .values(status=PENDING, status_reason="RETRY_REQUESTED", attempts=0, next_attempt_us=now,
                                    updated_us=now))
            if row.erasure_id:
                update_erasures(session, [row.erasure_id])
            session.refresh(row)
            return pb.RetryDeliveryResponse(delivery=deliveries_pb(session, [row])[0])

        response = self._mutate("RetryDelivery", request, pb.RetryDeliveryResponse, op)
        self._app.delivery.wake()
        return response

    def ReconcileAudience(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.audience:
            raise InvalidArgument.for_field("audience", "is required", reason="REQUIRED")
        destination_id = parse_destination_name(request.destination, "destination") if request.destination else ""

        def op(session: Session) -> Any:
            audience = require_audience(session, request.audience, "audience")
            attached = list(session.execute(select(DestinationRow).join(
                AudienceDestinationRow, AudienceDestinationRow.destination_pk == DestinationRow.id).where(
                AudienceDestinationRow.audience_pk == audience.id).order_by(AudienceDestinationRow.position)).scalars())
            if destination_id:
                attached = [d for d in attached if d.destination_id == destination_id]
                if not attached:
                    raise FailedPrecondition(f"destination {destination_id!r} is not attached to audience "
                                             f"{audience.audience_id!r}", reason="DESTINATION_NOT_ATTACHED",
                                             metadata={"field": "destination"})
            results = [reconcile_audience(session, audience, d) for d in attached]
            return pb.ReconcileAudienceResponse(reconciliations=[pb.AudienceReconciliation(
                destination=f"destinations/{r.destination_id}", member_count=r.member_count,
                removal_count=r.removal_count, full_replace=r.full_replace, delivery_count=r.delivery_count)
                for r in results])

        response = self._mutate("ReconcileAudience", request, pb.ReconcileAudienceResponse, op)
        self._app.delivery.wake()
        return response
