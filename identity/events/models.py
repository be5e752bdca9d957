"""Tables of the event ledger, trait evidence and the schema registry.

Evidence (kept, the source of truth, replayable):
  * ``events`` — one row per accepted ``event_id``: the canonical event with its
    identifiers (hashed), typed properties, context and metadata; identity-only messages
    (alias, identify without a mapped event) are rows too, so their retries deduplicate.
    ``identifier_pk`` is the identifier that answers for the event (the strongest one the
    identity graph kept): the event belongs to whichever person holds it now, so merges and
    splits move events without rewriting them.
  * ``trait_evidence`` — one row per trait assertion (set / set_once / unset of a key by an
    event), attached to the same identifier as its event.

Derived (maintained incrementally, keyed by identifier so they survive merges and splits
unchanged; a person's value is the fold over its identifiers, see :mod:`identity.events.traits`):
  * ``trait_state`` — per identifier and key: the latest set/unset and the earliest set_once.
  * ``event_totals`` — per identifier, canonical event and currency: count, value, first and
    last occurrence (purchase count, lifetime value, last seen ...).

Registry: ``event_mappings``; held back: ``parked_events``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from identity.models import PK
from stitchgraph.db import Base


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_person_order", "identifier_pk", "occurred_us", "event_id"),
        Index("ix_events_event_time", "event", "occurred_us"),
    )

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(256), unique=True)
    # Canonical name; "" for identity-only messages.
    event: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(64))
    source_event: Mapped[str] = mapped_column(String(1024))
    occurred_us: Mapped[int] = mapped_column(BigInteger)
    receive_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    identifier_pk: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Exact decimal string as stored; micro-units (10^-6) for sums.
    value: Mapped[str | None] = mapped_column(String(40), nullable=True)
    value_micros: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    currency: Mapped[str | None] = mapped_column(String(3), nullable=True)
    order_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    identity_only: Mapped[bool] = mapped_column(Boolean, default=False)
    generated_event_id: Mapped[bool] = mapped_column(Boolean, default=False)
    # identifiers (hashed), items, properties, context, metadata, trait updates, action source,
    # and what the original receipt reported (ignored identifiers, refused links).
    body: Mapped[dict[str, Any]] = mapped_column(JSON)


class TraitEvidenceRow(Base):
    __tablename__ = "trait_evidence"
    __table_args__ = (
        UniqueConstraint("event_id", "key", "op"),
        Index("ix_trait_evidence_identifier_key", "identifier_pk", "key"),
    )

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    identifier_pk: Mapped[int] = mapped_column(BigInteger)
    key: Mapped[str] = mapped_column(String(128))
    op: Mapped[str] = mapped_column(String(8))  # set | set_once | unset
    value: Mapped[Any] = mapped_column(JSON, nullable=True)
    occurred_us: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(String(64))


class TraitStateRow(Base):
    __tablename__ = "trait_state"

    identifier_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    # Latest set or unset (by time, then event ID; unset after set at a tie).
    lw_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    lw_event: Mapped[str | None] = mapped_column(String(256), nullable=True)
    lw_unset: Mapped[bool] = mapped_column(Boolean, default=False)
    lw_value: Mapped[Any] = mapped_column(JSON, nullable=True)
    lw_source: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Earliest set_once.
    so_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    so_event: Mapped[str | None] = mapped_column(String(256), nullable=True)
    so_value: Mapped[Any] = mapped_column(JSON, nullable=True)
    so_source: Mapped[str | None] = mapped_column(String(64), nullable=True)


class EventTotalRow(Base):
    __tablename__ = "event_totals"

    identifier_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event: Mapped[str] = mapped_column(String(64), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)  # "" without a value
    count: Mapped[int] = mapped_column(BigInteger)
    value_micros: Mapped[int] = mapped_column(BigInteger)
    first_us: Mapped[int] = mapped_column(BigInteger)
    last_us: Mapped[int] = mapped_column(BigInteger)


class EventMappingRow(Base):
    __tablename__ = "event_mappings"
    __table_args__ = (UniqueConstraint("source", "source_event"),)

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    source: Mapped[str] = mapped_column(String(64))
    source_event: Mapped[str] = mapped_column(String(1024))
    canonical_event: Mapped[str] = mapped_column(String(64))
    required_properties: Mapped[list[str]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(String(1024))
    property_map: Mapped[dict[str, str]] = mapped_column(JSON)
    built_in: Mapped[bool] = mapped_column(Boolean, default=False)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    etag: Mapped[str] = mapped_column(String(40))


class ParkedEventRow(Base):
    __tablename__ = "parked_events"
    __table_args__ = (Index("ix_parked_events_receive", "receive_time", "id"),)

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(256), unique=True)
    source: Mapped[str] = mapped_column(String(64))
    source_event: Mapped[str] = mapped_column(String(1024))
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(1024))
    receive_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
