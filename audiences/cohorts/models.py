"""Tables of cohort imports: sources, the cohorts each imports, current membership per
cohort, snapshots (the history), members of held snapshots, and the Heap sync pages seen.

Membership is kept per cohort as *member keys* (the ID the source names a member by: a
PostHog distinct ID, a Heap identity, a pushed ``type:value``) with the identifier each
resolved to. A new full snapshot is diffed on keys, so only additions and removals touch
the identity graph and the trait store: the cost of a snapshot grows with the change.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from identity.models import PK
from stitchgraph.db import Base

__all__ = [
    "CohortImportRow",
    "CohortMemberRow",
    "CohortSnapshotRow",
    "CohortSourceRow",
    "HeapSyncPageRow",
    "HeldMemberRow",
]


class CohortSourceRow(Base):
    """A configured source of cohort membership (``cohortSources/{source_id}``)."""

    __tablename__ = "cohort_sources"

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    source_id: Mapped[str] = mapped_column(String(63), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    display_name: Mapped[str] = mapped_column(String(256))
    description: Mapped[str] = mapped_column(Text, default="")
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    credentials_ref: Mapped[str] = mapped_column(String(1024), default="")
    # Snapshot guard; 0 = the default.
    max_removed_percent: Mapped[int] = mapped_column(Integer, default=0)
    empty_hold_min_members: Mapped[int] = mapped_column(BigInteger, default=0)
    etag: Mapped[str] = mapped_column(String(40))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CohortImportRow(Base):
    """One cohort a source imports, and the trait it becomes. Trait names are unique across
    every source: two cohorts writing one trait would undo each other's snapshots."""

    __tablename__ = "cohort_imports"
    __table_args__ = (UniqueConstraint("source_pk", "cohort_key"), UniqueConstraint("trait_name"))

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    source_pk: Mapped[int] = mapped_column(BigInteger, index=True)
    cohort_key: Mapped[str] = mapped_column(String(128))
    trait_name: Mapped[str] = mapped_column(String(128))
    schedule: Mapped[str] = mapped_column(String(128), default="")
    display_name: Mapped[str] = mapped_column(String(256), default="")
    member_identifier_type: Mapped[str] = mapped_column(String(64), default="")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    position: Mapped[int] = mapped_column(Integer, default=0)
    member_count: Mapped[int] = mapped_column(BigInteger, default=0)
    last_snapshot_pk: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Snapshot time of the last applied snapshot: an older one is refused (it would undo newer facts).
    last_snapshot_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class CohortMemberRow(Base):
    """A current member of one cohort: the source's key for it and the identifier it resolved to."""

    __tablename__ = "cohort_members"
    __table_args__ = (Index("ix_cohort_members_identifier_pk", "identifier_pk"),)

    cohort_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    member_key: Mapped[str] = mapped_column(String(320), primary_key=True)
    identifier_pk: Mapped[int] = mapped_column(BigInteger)


class CohortSnapshotRow(Base):
    """One import of one cohort's membership (``cohortSources/{source}/snapshots/{snapshot_id}``)."""

    __tablename__ = "cohort_snapshots"
    __table_args__ = (
        UniqueConstraint("source_pk", "snapshot_id"),
        Index("ix_cohort_snapshots_cohort", "cohort_pk", "id"),
    )

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    source_pk: Mapped[int] = mapped_column(BigInteger, index=True)
    cohort_pk: Mapped[int] = mapped_column(BigInteger)
    snapshot_id: Mapped[str] = mapped_column(String(63))
    cohort_key: Mapped[str] = mapped_column(String(128))
    trait_name: Mapped[str] = mapped_column(String(128))
    mode: Mapped[str] = mapped_column(String(8))  # FULL | DELTA
    status: Mapped[str] = mapped_column(String(16))
    trigger: Mapped[str] = mapped_column(String(16))
    member_count: Mapped[int] = mapped_column(BigInteger, default=0)
    added_count: Mapped[int] = mapped_column(BigInteger, default=0)
    removed_count: Mapped[int] = mapped_column(BigInteger, default=0)
    new_identifier_count: Mapped[int] = mapped_column(BigInteger, default=0)
    ignored_count: Mapped[int] = mapped_column(BigInteger, default=0)
    snapshot_us: Mapped[int] = mapped_column(BigInteger)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    apply_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    operator: Mapped[str] = mapped_column(String(256), default="")
    # What a repeat of a pushed snapshot_id must match (header fingerprint), "" otherwise.
    fingerprint: Mapped[str] = mapped_column(String(64), default="")


class HeldMemberRow(Base):
    """The members of a HELD full snapshot, kept until an operator confirms or discards it.
    ``candidates`` are the member's IDs as received (``[[type or null, value], ...]``)."""

    __tablename__ = "cohort_held_members"

    snapshot_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    member_key: Mapped[str] = mapped_column(String(320), primary_key=True)
    candidates: Mapped[list[Any]] = mapped_column(JSON)


class HeapSyncPageRow(Base):
    """A Heap Segments Sync page already applied: Heap retries non-2xx replies, so a page is
    applied once per (sync task, page)."""

    __tablename__ = "cohort_heap_sync_pages"
    __table_args__ = (UniqueConstraint("source_pk", "segment_id", "sync_task_id", "page_number", "action",
                                       name="uq_cohort_heap_sync_pages_page"),)

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    source_pk: Mapped[int] = mapped_column(BigInteger)
    segment_id: Mapped[str] = mapped_column(String(128))
    sync_task_id: Mapped[str] = mapped_column(String(128))
    page_number: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(32))
    snapshot_pk: Mapped[int] = mapped_column(BigInteger)
    received_us: Mapped[int] = mapped_column(BigInteger)
