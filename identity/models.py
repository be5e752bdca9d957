"""Tables of the identity graph.

Evidence (kept, the source of truth):
  * ``identity_links`` — one row per distinct identifier pair ever seen together, keyed
    by its earliest occurrence (time, event ID, rank within the event); later sightings
    only bump ``times_seen``. Only the earliest occurrence can change a decision: the
    components only grow while evidence is replayed in order, so a pair refused or
    redundant at its first sighting stays so at every later one.
  * ``identifiers`` — each identifier with the earliest time it was seen.
  * ``identity_pins`` — operator "never in one person" constraints (pinned splits).
  * ``identity_tombstones`` — hashes of erased identifiers, so old evidence cannot
    bring them back.

Derived (materialised for speed, rebuilt exactly from evidence):
  * ``persons`` — one row per connected component of accepted links, with the counts
    the guards need, the anchor identifier and the public person ID.
  * ``identity_clusters`` — connected components over *all* links, refused ones
    included: the most that one late piece of evidence can affect.
  * ``identity_links.decision`` — how the replay decided each link.

Audit: ``identity_history`` (what happened, in arrival order) and ``identity_erasures``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from stitchgraph.db import Base

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL wants BIGINT.
PK = BigInteger().with_variant(Integer(), "sqlite")


class IdentifierRow(Base):
    __tablename__ = "identifiers"
    __table_args__ = (UniqueConstraint("type", "value"),)

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(256))
    person_pk: Mapped[int] = mapped_column(BigInteger, index=True)
    first_seen_us: Mapped[int] = mapped_column(BigInteger)
    # The public person ID this identifier gives its person when it is the anchor; a
    # person ID that was merged away still resolves through it.
    person_ref: Mapped[str] = mapped_column(String(40), index=True)
    # Re-created after an erasure: ``person_ref`` is salted with the erasure.
    reborn: Mapped[bool] = mapped_column(Boolean, default=False)
    match_keys: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)


class PersonRow(Base):
    __tablename__ = "persons"

    # The pk of one of the person's identifiers (stable while the person only grows).
    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=False)
    person_id: Mapped[str] = mapped_column(String(40), unique=True)
    anchor_pk: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(Integer)
    merges: Mapped[int] = mapped_column(Integer)
    # Counts of identifier types that have a per-person limit, e.g. {"user_id": 1}.
    type_counts: Mapped[dict[str, int]] = mapped_column(JSON)
    # 1 when any identifier of the person is pinned apart from another person (gates loading pins).
    pinned: Mapped[int] = mapped_column(Integer, default=0)
    cluster_pk: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ClusterRow(Base):
    __tablename__ = "identity_clusters"

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=False)
    # Sort key of the latest link in the cluster; -1 when it has none.
    max_us: Mapped[int] = mapped_column(BigInteger)
    max_event: Mapped[str] = mapped_column(String(256))
    max_rank: Mapped[int] = mapped_column(Integer)


class LinkRow(Base):
    __tablename__ = "identity_links"
    __table_args__ = (
        UniqueConstraint("a_pk", "b_pk"),
        Index("ix_identity_links_b_pk", "b_pk"),
    )

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    a_pk: Mapped[int] = mapped_column(BigInteger)
    b_pk: Mapped[int] = mapped_column(BigInteger)
    occurred_us: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(256))
    rank: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(128))
    request_id: Mapped[str] = mapped_column(String(128))
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    operator: Mapped[str] = mapped_column(String(128), default="")
    decision: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
    times_seen: Mapped[int] = mapped_column(Integer, default=1)
    last_seen_us: Mapped[int] = mapped_column(BigInteger)


class PinRow(Base):
    __tablename__ = "identity_pins"
    __table_args__ = (UniqueConstraint("a_pk", "b_pk"), Index("ix_identity_pins_b_pk", "b_pk"))

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    a_pk: Mapped[int] = mapped_column(BigInteger)
    b_pk: Mapped[int] = mapped_column(BigInteger)
    operator: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class HistoryRow(Base):
    __tablename__ = "identity_history"
    __table_args__ = (Index("ix_identity_history_a_pk", "a_pk"), Index("ix_identity_history_b_pk", "b_pk"))

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    occurred_us: Mapped[int] = mapped_column(BigInteger)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    a_pk: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    b_pk: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    person_id: Mapped[str] = mapped_column(String(40), default="")
    related_person_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    reason: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    operator: Mapped[str] = mapped_column(String(128), default="")
    event_id: Mapped[str] = mapped_column(String(256), default="")
    source: Mapped[str] = mapped_column(String(128), default="")
    # For history about something that is not (or no longer) an identifier, e.g. a junk value.
    subject: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class TombstoneRow(Base):
    __tablename__ = "identity_tombstones"

    identifier_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    erased_us: Mapped[int] = mapped_column(BigInteger)
    erasure_id: Mapped[str] = mapped_column(String(40))


class ErasureRow(Base):
    __tablename__ = "identity_erasures"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    person_id: Mapped[str] = mapped_column(String(40), index=True)
    identifier_hashes: Mapped[list[str]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(32))
    operator: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # When the state last changed (None: never since creation).
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Names of the erase deliveries queued for destinations ("destinations/{d}/deliveries/{id}").
    deliveries: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)


class PolicyRow(Base):
    __tablename__ = "identity_policy"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    etag: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CounterRow(Base):
    """Monotonic counters; ``identifier`` hands out identifier primary keys, so a key is
    never reused after its identifier was erased or blocklisted."""

    __tablename__ = "identity_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)
