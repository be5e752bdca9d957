"""Tables of consent, the per-person derived views the rule language reads, and audiences.

Evidence (the source of truth):
  * ``consent_decisions`` — one row per recorded decision (purpose granted/denied, time,
    origin, source), attached to an identifier so it follows it through merges and splits.
  * ``consent_jurisdictions`` — per identifier, the latest jurisdiction an event reported.

Derived per person (recomputed from evidence for the persons the change journal names, see
:mod:`stitchgraph.changes`; safe to rebuild at any time):
  * ``person_traits`` — the person's current asserted traits, with typed columns so rules
    compare them in SQL (``text`` for strings, ``num`` for numbers, ``flag`` for booleans,
    ``ts_us`` for strings that are RFC 3339 times); ``person_trait_elements`` — the elements
    of list-valued traits (for ``contains``).
  * ``person_consent`` — the resolved verdict per purpose.

Audiences:
  * ``audiences`` and ``audience_destinations`` — definitions;
  * ``audience_members`` — persons matching the rule; ``audience_destination_members`` —
    members eligible at each destination (rule, consent and match keys);
  * ``audience_deltas`` — every add/remove per destination, recorded for delivery.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from identity.models import PK
from stitchgraph.db import Base


class ConsentDecisionRow(Base):
    __tablename__ = "consent_decisions"
    __table_args__ = (Index("ix_consent_decisions_identifier", "identifier_pk", "purpose"),)

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    decision_id: Mapped[str] = mapped_column(String(40), unique=True)
    identifier_pk: Mapped[int] = mapped_column(BigInteger)
    purpose: Mapped[str] = mapped_column(String(64))
    granted: Mapped[bool] = mapped_column(Boolean)
    occurred_us: Mapped[int] = mapped_column(BigInteger)
    origin: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(64))
    jurisdiction: Mapped[str] = mapped_column(String(8), default="")
    opt_out: Mapped[bool] = mapped_column(Boolean, default=False)
    event_id: Mapped[str] = mapped_column(String(256), default="")
    request_id: Mapped[str] = mapped_column(String(128), default="")
    detail: Mapped[str] = mapped_column(String(512), default="")
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ConsentJurisdictionRow(Base):
    __tablename__ = "consent_jurisdictions"

    identifier_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    jurisdiction: Mapped[str] = mapped_column(String(8))
    occurred_us: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(256))


class PersonTraitRow(Base):
    __tablename__ = "person_traits"
    __table_args__ = (
        Index("ix_person_traits_text", "key", "text"),
        Index("ix_person_traits_num", "key", "num"),
        Index("ix_person_traits_ts", "key", "ts_us"),
    )

    person_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON, nullable=True)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    num: Mapped[float | None] = mapped_column(Float, nullable=True)
    flag: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    ts_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class PersonTraitElementRow(Base):
    __tablename__ = "person_trait_elements"
    __table_args__ = (
        Index("ix_person_trait_elements_person", "person_pk"),
        Index("ix_person_trait_elements_text", "key", "text"),
        Index("ix_person_trait_elements_num", "key", "num"),
    )

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    person_pk: Mapped[int] = mapped_column(BigInteger)
    key: Mapped[str] = mapped_column(String(128))
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    num: Mapped[float | None] = mapped_column(Float, nullable=True)


class PersonConsentRow(Base):
    __tablename__ = "person_consent"
    __table_args__ = (Index("ix_person_consent_purpose", "purpose", "granted"),)

    person_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    purpose: Mapped[str] = mapped_column(String(64), primary_key=True)
    granted: Mapped[bool] = mapped_column(Boolean)
    resolved_by: Mapped[str] = mapped_column(String(32))


class AudienceRow(Base):
    __tablename__ = "audiences"

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    audience_id: Mapped[str] = mapped_column(String(63), unique=True)
    display_name: Mapped[str] = mapped_column(String(256))
    description: Mapped[str] = mapped_column(Text, default="")
    rule: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    labels: Mapped[dict[str, str]] = mapped_column(JSON)
    etag: Mapped[str] = mapped_column(String(40))
    member_count: Mapped[int] = mapped_column(BigInteger, default=0)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    evaluated_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    windows_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class AudienceDestinationRow(Base):
    __tablename__ = "audience_destinations"

    audience_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    destination_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    position: Mapped[int] = mapped_column(Integer)


class AudienceMemberRow(Base):
    __tablename__ = "audience_members"

    audience_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    person_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    person_id: Mapped[str] = mapped_column(String(40))
    join_us: Mapped[int] = mapped_column(BigInteger)


class AudienceDestinationMemberRow(Base):
    __tablename__ = "audience_destination_members"

    audience_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    destination_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    person_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    since_us: Mapped[int] = mapped_column(BigInteger)
    # The match keys the person had when it joined ([type, value, {platform key: hash}], hashed
    # only): what a later removal must take back, even after a merge or an erasure.
    keys: Mapped[list[list[Any]] | None] = mapped_column(JSON, nullable=True)


class AudienceDeltaRow(Base):
    __tablename__ = "audience_deltas"
    __table_args__ = (
        Index("ix_audience_deltas_audience", "audience_pk", "id"),
        Index("ix_audience_deltas_destination", "destination_pk", "id"),
    )

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    audience_pk: Mapped[int] = mapped_column(BigInteger)
    audience_id: Mapped[str] = mapped_column(String(63))
    destination_pk: Mapped[int] = mapped_column(BigInteger)
    destination_id: Mapped[str] = mapped_column(String(63))
    person_pk: Mapped[int] = mapped_column(BigInteger)
    person_id: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(8))  # ADD | REMOVE
    reason: Mapped[str] = mapped_column(String(32))
    event_id: Mapped[str] = mapped_column(String(256), default="")
    created_us: Mapped[int] = mapped_column(BigInteger)
