"""The delivery outbox: every delivery-worthy change becomes a row here *in the same
transaction as the change* (DESIGN §1.3, §8), so nothing acknowledged is lost and nothing is
sent for a change that rolled back.

* a captured canonical event that a conversion destination sends → one ``CONVERSION`` row per
  destination (:func:`enqueue_conversions`, a capture hook);
* an audience membership change at a destination → ``AUDIENCE_ADD`` / ``AUDIENCE_REMOVE``
  (:func:`enqueue_deltas`, called where the engine writes its deltas);
* an erased person → ``ERASE`` rows for every audience destination that holds it, with the
  hashed keys to remove (:func:`enqueue_erasure`, an erase hook that runs before the
  identifiers are deleted).

Rows carry what cannot be read again later: the platform event name, an age limit, and for
removals the hashed keys that were sent (``payload["keys"]``, scrubbed once the removal is
delivered). Everything else — the event, the person's *current* match keys, consent — is
read at send time by :mod:`audiences.delivery`, so a conversion sent a minute after an
identify carries the email learnt there, and a consent withdrawal in between stops it.

The delivery log: ``delivery_batches`` (one row per platform request: HTTP status, latency,
redacted excerpt) and ``delivery_attempts`` (one row per delivery and attempt, pointing at its
batch, with the per-record classification and platform error code).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import JSON, BigInteger, Index, Integer, String, Table, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from audiences.destinations import KINDS, DestinationRow
from audiences.destinations.registry import adapter_for
from identity.events.capture import StoredEvent
from identity.models import PK, IdentifierRow
from stitchgraph.db import Base, in_values

__all__ = [
    "AUDIENCE_ADD",
    "AUDIENCE_REMOVE",
    "CONVERSION",
    "ERASE",
    "FINAL_STATUSES",
    "KEY_TYPES",
    "OPEN_STATUSES",
    "DeliveryAttemptRow",
    "DeliveryBatchRow",
    "DeliveryRow",
    "enqueue_conversions",
    "enqueue_deltas",
    "keys_of_persons",
]

CONVERSION = "CONVERSION"
AUDIENCE_ADD = "AUDIENCE_ADD"
AUDIENCE_REMOVE = "AUDIENCE_REMOVE"
ERASE = "ERASE"
TRAIT_UPDATE = "TRAIT_UPDATE"
KINDS_OF_DELIVERY = (CONVERSION, AUDIENCE_ADD, AUDIENCE_REMOVE, ERASE, TRAIT_UPDATE)

PENDING = "PENDING"
IN_FLIGHT = "IN_FLIGHT"
SUCCEEDED = "SUCCEEDED"
RETRYING = "RETRYING"
DEAD_LETTERED = "DEAD_LETTERED"
EXPIRED = "EXPIRED"
SKIPPED_NO_CONSENT = "SKIPPED_NO_CONSENT"
CANCELLED = "CANCELLED"
STATUSES = (PENDING, IN_FLIGHT, SUCCEEDED, RETRYING, DEAD_LETTERED, EXPIRED, SKIPPED_NO_CONSENT, CANCELLED)
#: Waiting to be sent.
OPEN_STATUSES = (PENDING, IN_FLIGHT, RETRYING)
#: Settled for good (RetryDelivery re-opens DEAD_LETTERED).
FINAL_STATUSES = (SUCCEEDED, DEAD_LETTERED, EXPIRED, SKIPPED_NO_CONSENT, CANCELLED)

#: Identifier types kept as match keys on audience members and removals.
KEY_TYPES = ("email_sha256", "phone_sha256", "user_id")


class DeliveryRow(Base):
    """One unit of work for one destination, and its current state."""

    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_due", "destination_pk", "status", "next_attempt_us"),
        Index("ix_deliveries_batch_due", "destination_pk", "status", "batch_key", "next_attempt_us"),
        Index("ix_deliveries_lease", "status", "lease_until_us"),
        Index("ix_deliveries_event", "event_id"),
        Index("ix_deliveries_person", "person_id"),
        Index("ix_deliveries_person_pk", "person_pk"),
        Index("ix_deliveries_audience", "audience_pk"),
        Index("ix_deliveries_erasure", "erasure_id"),
    )

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    destination_pk: Mapped[int] = mapped_column(BigInteger)
    destination_id: Mapped[str] = mapped_column(String(63))
    kind: Mapped[str] = mapped_column(String(24))
    status: Mapped[str] = mapped_column(String(24))
    status_reason: Mapped[str] = mapped_column(String(64), default="")
    # Deliveries with the same key (and destination) may share a platform request.
    batch_key: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(256), default="")
    platform_event: Mapped[str] = mapped_column(String(256), default="")
    person_pk: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    person_id: Mapped[str] = mapped_column(String(40), default="")
    audience_pk: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    audience_id: Mapped[str] = mapped_column(String(63), default="")
    erasure_id: Mapped[str] = mapped_column(String(40), default="")
    # Removals: {"keys": [[type, value, {platform key: hash}], ...]}; replace sessions: {"session": {...}}.
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_us: Mapped[int] = mapped_column(BigInteger)
    # While IN_FLIGHT: who claimed it and until when (an expired lease is claimable again).
    claim_token: Mapped[str] = mapped_column(String(32), default="")
    lease_until_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    expire_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_us: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)


class DeliveryBatchRow(Base):
    """One platform request (or a batch settled without one)."""

    __tablename__ = "delivery_batches"

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    destination_pk: Mapped[int] = mapped_column(BigInteger)
    time_us: Mapped[int] = mapped_column(BigInteger)
    http_status: Mapped[int] = mapped_column(Integer, default=0)
    latency_us: Mapped[int] = mapped_column(BigInteger, default=0)
    excerpt: Mapped[str] = mapped_column(Text, default="")
    size: Mapped[int] = mapped_column(Integer)


class DeliveryAttemptRow(Base):
    """One attempt of one delivery."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (Index("ix_delivery_attempts_delivery", "delivery_pk", "id"),)

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    delivery_pk: Mapped[int] = mapped_column(BigInteger)
    batch_pk: Mapped[int] = mapped_column(BigInteger)
    classification: Mapped[str] = mapped_column(String(16))
    platform_error_code: Mapped[str] = mapped_column(String(128), default="")
    error: Mapped[str] = mapped_column(String(1024), default="")


DELIVERIES = cast(Table, DeliveryRow.__table__)


def now_us() -> int:
    moment = datetime.now(UTC)
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


# -- conversions ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _ConversionTarget:
    pk: int
    destination_id: str
    kind: str
    events: frozenset[str]
    settings: Mapping[str, Any]


def _conversion_targets(session: Session) -> list[_ConversionTarget]:
    kinds = [k for k, spec in KINDS.items() if spec.conversions]
    rows = session.execute(select(DestinationRow.id, DestinationRow.destination_id, DestinationRow.kind,
                                  DestinationRow.events, DestinationRow.settings)
                           .where(DestinationRow.kind.in_(kinds)).order_by(DestinationRow.id)).all()
    return [_ConversionTarget(r.id, r.destination_id, r.kind, frozenset(r.events or ()), dict(r.settings or {}))
            for r in rows]


def enqueue_conversions(session: Session, events: Sequence[StoredEvent], *, at_us: int | None = None) -> int:
    """Capture hook: one CONVERSION row per event and conversion destination that sends it
    (the destination's ``events`` list, else every event its adapter maps). An event already
    past the platform's age limit is recorded EXPIRED straight away. Returns rows written."""
    if not events:
        return 0
    targets = _conversion_targets(session)
    if not targets:
        return 0
    now = now_us() if at_us is None else at_us
    rows: list[dict[str, Any]] = []
    for target in targets:
        adapter = adapter_for(target.kind)
        for e in events:
            if e.person_pk is None or not e.event or (target.events and e.event not in target.events):
                continue
            name = adapter.platform_event(e.event, target.settings)
            if not name:
                continue
            max_age = adapter.max_age_seconds(target.settings, e.action_source)
            expire = e.occurred_us + max_age * 1_000_000 if max_age is not None else None
            expired = expire is not None and expire <= now
            rows.append({
                "destination_pk": target.pk, "destination_id": target.destination_id, "kind": CONVERSION,
                "status": EXPIRED if expired else PENDING, "status_reason": "EVENT_TOO_OLD" if expired else "",
                "batch_key": "conversions", "event_id": e.event_id, "platform_event": name[:256],
                "person_pk": e.person_pk, "person_id": e.person_id, "audience_pk": None, "audience_id": "",
                "erasure_id": "", "payload": None, "attempts": 0, "next_attempt_us": now, "claim_token": "",
                "lease_until_us": None, "expire_us": expire, "created_us": now, "updated_us": now,
            })
    if rows:
        session.execute(DELIVERIES.insert(), rows)
    return len(rows)


# -- audience membership -------------------------------------------------------------------------

KeyList = list[list[Any]]


def keys_of_persons(session: Session, person_pks: Iterable[int]) -> dict[int, KeyList]:
    """Each person's match-key identifiers as ``[type, value, {platform key: hash}]``, sorted."""
    wanted = sorted(set(person_pks))
    found: dict[int, KeyList] = {}
    for start in range(0, len(wanted), 20_000):
        chunk = wanted[start:start + 20_000]
        for r in session.execute(select(IdentifierRow.person_pk, IdentifierRow.type, IdentifierRow.value,
                                        IdentifierRow.match_keys)
                                 .where(in_values(session, IdentifierRow.person_pk, chunk),
                                        IdentifierRow.type.in_(KEY_TYPES))):
            found.setdefault(r.person_pk, []).append([r.type, r.value, dict(r.match_keys or {})])
    for keys in found.values():
        keys.sort(key=lambda k: (k[0], k[1]))
    return found


def merge_keys(*lists: KeyList | None) -> KeyList:
    """The union of key lists (by type and value), sorted."""
    seen: dict[tuple[str, str], list[Any]] = {}
    for keys in lists:
        for key in keys or ():
            seen.setdefault((key[0], key[1]), key)
    return [seen[k] for k in sorted(seen)]


def audience_batch_key(audience_pk: int, kind: str) -> str:
    return f"audience:{audience_pk}:{'add' if kind == AUDIENCE_ADD else 'remove'}"


def enqueue_deltas(session: Session, deltas: Sequence[Mapping[str, Any]],
                   removal_keys: Mapping[tuple[int, int], KeyList], *, at_us: int | None = None) -> list[str]:
    """One delivery per audience delta (the engine's delta rows, same transaction).

    ADD rows read the person's keys at send time; REMOVE rows (and ERASE, for reason ERASED)
    carry ``removal_keys[(destination_pk, person_pk)]``, the keys that were sent. Deltas for
    destinations that no longer exist are not queued. Returns the names of the deliveries
    (``destinations/{d}/deliveries/{id}``) when there are at most 100 of them, else ``[]``."""
    if not deltas:
        return []
    now = now_us() if at_us is None else at_us
    live = set(session.execute(select(DestinationRow.id).where(
        DestinationRow.id.in_(sorted({d["destination_pk"] for d in deltas})))).scalars())
    rows: list[dict[str, Any]] = []
    for d in deltas:
        if d["destination_pk"] not in live:
            continue
        if d["kind"] == "ADD":
            kind, payload = AUDIENCE_ADD, None
        else:
            kind = ERASE if d["reason"] == "ERASED" else AUDIENCE_REMOVE
            payload = {"keys": removal_keys.get((d["destination_pk"], d["person_pk"]), []), "reason": d["reason"]}
        rows.append({
            "destination_pk": d["destination_pk"], "destination_id": d["destination_id"], "kind": kind,
            "status": PENDING, "status_reason": "", "batch_key": audience_batch_key(d["audience_pk"], kind),
            "event_id": d.get("event_id", "") or "", "platform_event": "", "person_pk": d["person_pk"],
            "person_id": d["person_id"], "audience_pk": d["audience_pk"], "audience_id": d["audience_id"],
            "erasure_id": d.get("erasure_id", ""), "payload": payload, "attempts": 0, "next_attempt_us": now,
            "claim_token": "", "lease_until_us": None, "expire_us": None, "created_us": now, "updated_us": now,
        })
    if not rows:
        return []
    if len(rows) > 100:
        session.execute(DELIVERIES.insert(), rows)
        return []
    inserted = session.execute(DELIVERIES.insert().returning(DELIVERIES.c.id, DELIVERIES.c.destination_id), rows)
    return [delivery_name(r.destination_id, r.id) for r in inserted]


def delivery_name(destination_id: str, delivery_pk: int) -> str:
    return f"destinations/{destination_id}/deliveries/{delivery_pk}"


def cancel_person_deliveries(session: Session, person_pk: int, reason: str, *, at_us: int | None = None) -> None:
    """Cancel the person's queued conversions and audience additions (removals still go out)."""
    now = now_us() if at_us is None else at_us
    session.execute(DELIVERIES.update().where(
        DELIVERIES.c.person_pk == person_pk, DELIVERIES.c.kind.in_((CONVERSION, AUDIENCE_ADD)),
        DELIVERIES.c.status.in_((PENDING, RETRYING))).values(status=CANCELLED, status_reason=reason, updated_us=now))
