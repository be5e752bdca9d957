"""The person-change journal: which persons' derived state (traits, consent, audience
membership) must be recomputed.

Every write that can change what a person looks like — new evidence, a merge, a split, an
erase, a consent decision — marks the persons it touched, in the same transaction as the
change. The audience engine drains the journal right after the write commits (and on a
timer), so nothing acknowledged can be missed even if the process dies in between.

A row is ``(person_pk, reason)``: a person may be marked several times and for several
reasons; the reasons explain the resulting membership changes (a person that no longer
exists was ``MERGED`` away, ``SPLIT`` or ``ERASED``).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, Session, mapped_column

from stitchgraph.db import Base, bulk_insert

#: Reasons a person is marked.
EVIDENCE = "EVIDENCE"  # events or traits
IDENTITY = "IDENTITY"  # identifiers added or moved (match keys, merges)
MERGED = "MERGED"  # the person was merged into another (its pk is gone)
SPLIT = "SPLIT"  # the person was split
ERASED = "ERASED"  # the person was erased
CONSENT = "CONSENT"  # a consent decision


class PersonChangeRow(Base):
    __tablename__ = "person_changes"

    person_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    reason: Mapped[str] = mapped_column(String(16), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(256), default="")


_TABLE = PersonChangeRow.__table__


def mark_persons(session: Session, person_pks: Iterable[int], reason: str, event_ids: dict[int, str] | None = None
                 ) -> None:
    """Journal ``person_pks`` as changed for ``reason`` (in the caller's transaction)."""
    rows = [{"person_pk": pk, "reason": reason, "event_id": (event_ids or {}).get(pk, "")}
            for pk in sorted(set(person_pks))]
    for start in range(0, len(rows), 50_000):
        bulk_insert(session, _TABLE, rows[start:start + 50_000], ignore_conflicts=True)
