"""Full reconciliation of an audience with one destination, to repair drift (a list edited
on the platform, a lost removal, a platform that expired members).

Where the platform can replace a list wholesale (Meta ``usersreplace``), the current
eligible members are queued as one replace session: ``AUDIENCE_ADD`` deliveries grouped
into numbered batches of the platform's limit, the last one flagged, so the platform drops
everyone not sent. Elsewhere every member is queued as an addition (idempotent at the
platform) and every person whose last delivered change there was an addition but who is no
longer a member is queued as a removal.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from audiences.destinations import DestinationRow
from audiences.destinations.registry import adapter_for
from audiences.models import AudienceDestinationMemberRow, AudienceMemberRow, AudienceRow
from audiences.outbox import (
    AUDIENCE_ADD,
    AUDIENCE_REMOVE,
    DELIVERIES,
    ERASE,
    PENDING,
    SUCCEEDED,
    audience_batch_key,
    keys_of_persons,
    merge_keys,
    now_us,
)

__all__ = ["REPLACE_KINDS", "Reconciliation", "reconcile_audience"]

#: Kinds whose platform replaces a list in one session.
REPLACE_KINDS = frozenset({"META_CUSTOM_AUDIENCE"})


@dataclass(frozen=True)
class Reconciliation:
    destination_id: str
    member_count: int
    removal_count: int
    full_replace: bool
    delivery_count: int


def reconcile_audience(session: Session, audience: AudienceRow, destination: DestinationRow) -> Reconciliation:
    """Queue the deliveries that bring ``destination`` in line with ``audience``'s current
    eligible members there (same transaction as the caller)."""
    members_t = AudienceDestinationMemberRow.__table__
    person_ids_t = AudienceMemberRow.__table__
    members = session.execute(
        select(members_t.c.person_pk, members_t.c["keys"], person_ids_t.c.person_id)
        .join(person_ids_t, (person_ids_t.c.audience_pk == members_t.c.audience_pk)
              & (person_ids_t.c.person_pk == members_t.c.person_pk), isouter=True)
        .where(members_t.c.audience_pk == audience.id, members_t.c.destination_pk == destination.id)
        .order_by(members_t.c.person_pk)).all()
    now = now_us()
    base = {"destination_pk": destination.id, "destination_id": destination.destination_id, "status": PENDING,
            "status_reason": "RECONCILE", "event_id": "", "platform_event": "", "audience_pk": audience.id,
            "audience_id": audience.audience_id, "erasure_id": "", "attempts": 0, "next_attempt_us": now,
            "claim_token": "", "lease_until_us": None, "expire_us": None, "created_us": now, "updated_us": now}
    rows: list[dict[str, Any]] = []
    full_replace = destination.kind in REPLACE_KINDS and bool(members)
    if full_replace:
        limit = adapter_for(destination.kind).batch_limit
        session_id = secrets.randbits(62)
        batches = (len(members) + limit - 1) // limit
        for i, m in enumerate(members):
            seq = i // limit + 1
            rows.append(base | {
                "kind": AUDIENCE_ADD, "batch_key": f"replace:{session_id}:{seq}", "person_pk": m.person_pk,
                "person_id": m.person_id or "",
                "payload": {"session": {"session_id": session_id, "batch_seq": seq, "last_batch": seq == batches,
                                        "estimated_total": len(members)}}})
        removals = 0
    else:
        add_key = audience_batch_key(audience.id, AUDIENCE_ADD)
        rows += [base | {"kind": AUDIENCE_ADD, "batch_key": add_key, "person_pk": m.person_pk,
                         "person_id": m.person_id or "", "payload": None} for m in members]
        current = {m.person_pk for m in members}
        last: dict[int, tuple[str, str]] = {}
        for r in session.execute(select(DELIVERIES.c.person_pk, DELIVERIES.c.kind, DELIVERIES.c.person_id).where(
                DELIVERIES.c.audience_pk == audience.id, DELIVERIES.c.destination_pk == destination.id,
                DELIVERIES.c.status == SUCCEEDED, DELIVERIES.c.kind.in_((AUDIENCE_ADD, AUDIENCE_REMOVE, ERASE)))
                .order_by(DELIVERIES.c.id)):
            if r.person_pk is not None:
                last[r.person_pk] = (r.kind, r.person_id)
        stale = sorted(p for p, (kind, _) in last.items() if kind == AUDIENCE_ADD and p not in current)
        keys = keys_of_persons(session, stale)
        remove_key = audience_batch_key(audience.id, AUDIENCE_REMOVE)
        removable = [p for p in stale if keys.get(p)]
        rows += [base | {"kind": AUDIENCE_REMOVE, "batch_key": remove_key, "person_pk": p, "person_id": last[p][1],
                         "payload": {"keys": merge_keys(keys.get(p)), "reason": "RECONCILE"}} for p in removable]
        removals = len(removable)
    for start in range(0, len(rows), 5000):
        session.execute(DELIVERIES.insert(), rows[start:start + 5000])
    return Reconciliation(destination.destination_id, len(members), removals, full_replace, len(rows))
