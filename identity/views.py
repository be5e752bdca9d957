"""Read models of the identity graph: what the API shows of persons, links and history."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from identity.identifiers import Identifier


def from_micros(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)


@dataclass(frozen=True)
class PersonView:
    person_id: str
    identifiers: tuple[Identifier, ...]
    anchor: Identifier
    identifier_counts: dict[str, int]
    merge_count: int
    created_at: datetime
    updated_at: datetime
    match_keys: tuple[tuple[str, str, str], ...] = ()  # (identifier type, platform key, value)
    first_seen_us: int = 0
    last_seen_us: int = 0
    merged_person_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class LinkView:
    first: Identifier
    second: Identifier
    decision: str
    reason: str
    detail: str
    source: str
    occurred_us: int
    event_id: str
    request_id: str
    times_seen: int
    last_seen_us: int
    operator: str
    id: int = 0


@dataclass(frozen=True)
class HistoryView:
    id: int
    kind: str
    occurred_us: int
    person_id: str
    related_person_ids: tuple[str, ...]
    pair: tuple[Identifier | None, Identifier | None]
    reason: str
    detail: str
    operator: str
    event_id: str
    source: str
    subject: dict[str, object] | None = None


@dataclass(frozen=True)
class Explanation:
    same_person: bool
    first_person: str
    second_person: str
    path: tuple[LinkView, ...] = ()
    refusals: tuple[LinkView, ...] = ()
    text: str = ""


@dataclass(frozen=True)
class LinkOutcomeView:
    first: Identifier
    second: Identifier
    decision: str
    reason: str
    detail: str


@dataclass(frozen=True)
class IgnoredView:
    index: int
    type: str
    reason: str
    detail: str


@dataclass(frozen=True)
class IdentifyOutcome:
    person: PersonView | None
    ignored: tuple[IgnoredView, ...] = ()
    decisions: tuple[LinkOutcomeView, ...] = field(default=())
    # The identifier that answers for the call (its person is ``person``) and the call's
    # event ID (given or derived): where trait evidence of the call attaches.
    primary_pk: int | None = None
    event_id: str = ""
    occurred_us: int = 0


@dataclass(frozen=True)
class ErasureView:
    id: str
    person_id: str
    identifier_hashes: tuple[str, ...]
    state: str
    operator: str
    reason: str
    created_at: datetime
    updated_at: datetime | None = None
    #: Names of the erase deliveries queued for destinations that held the person.
    deliveries: tuple[str, ...] = ()
