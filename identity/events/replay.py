"""Replaying the event evidence log: every stored event (identity-only messages included)
read back as an :class:`~identity.events.incoming.IncomingEvent`, exactly as it was
accepted (identifiers already normalised and hashed, canonical name already mapped), and
captured into another store.

Because identity, traits and computed traits are all functions of the evidence that do
not depend on arrival order, a replay into an empty store gives the same persons (with
the same person IDs), traits and computed traits — in any order and any batching.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from identity.events.capture import CaptureResult, EventLedger
from identity.events.incoming import IDENTITY_ONLY, IncomingEvent
from identity.events.models import EventRow
from stitchgraph.db import Database


def incoming_from_row(row: EventRow) -> IncomingEvent:
    """A stored event as the message that would store it again."""
    body: dict[str, Any] = row.body or {}
    context = dict(body.get("context", {}))
    consent = context.pop("consent", {}) or {}
    metadata = dict(body.get("metadata", {}))
    message_id = metadata.pop("source_message_id", "")
    traits = body.get("traits", {})
    kind = body.get("kind") or row.kind
    return IncomingEvent(
        kind=kind, source_event=row.source_event, source=row.source,
        identifiers=[(t, v) for t, v in body.get("identifiers", [])],
        occurred_at=datetime.fromtimestamp(row.occurred_us / 1_000_000, tz=UTC),
        event_id=row.event_id, message_id=message_id, value=row.value or "", currency=row.currency or "",
        order_id=row.order_id or "", items=list(body.get("items", [])), properties=dict(body.get("properties", {})),
        context=context, consent=consent, metadata=metadata, trait_set=dict(traits.get("set", {})),
        trait_set_once=dict(traits.get("set_once", {})), trait_unset=list(traits.get("unset", [])),
        action_source=body.get("action_source", ""), personless=bool(body.get("personless", False)),
        # The name it was stored under: an identity-only message maps to nothing again.
        mapped_event=IDENTITY_ONLY if row.identity_only else row.event,
    )


def evidence_log(db: Database, *, batch_size: int = 1000) -> Iterator[list[IncomingEvent]]:
    """The stored events in batches, in storage order."""
    last = 0
    while True:
        with db.read() as session:
            rows = list(session.execute(select(EventRow).where(EventRow.id > last).order_by(EventRow.id)
                                        .limit(batch_size)).scalars())
        if not rows:
            return
        last = rows[-1].id
        yield [incoming_from_row(r) for r in rows]


def replay_evidence(source: Database, target: EventLedger, *, batch_size: int = 1000,
                    reverse: bool = False) -> list[CaptureResult]:
    """Capture every event of ``source`` into ``target``; ``reverse`` replays the batches
    newest first (the result is the same: that is the point)."""
    batches = list(evidence_log(source, batch_size=batch_size))
    if reverse:
        batches = [list(reversed(b)) for b in reversed(batches)]
    results: list[CaptureResult] = []
    for batch in batches:
        results += target.capture(batch)
    return results
