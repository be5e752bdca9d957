"""Delivery workers: claim outbox rows, batch them per destination up to the platform's
limit, re-check consent and erasure, send through the adapter, and record every attempt.

One round (:meth:`DeliveryEngine.run_once`) is three short steps, none holding a transaction
across the network:

1. **claim** (a write transaction): pick an active, unthrottled destination with due rows
   (round robin), take the oldest due row's batch key and up to ``batch_limit`` due rows with
   that key, and mark them ``IN_FLIGHT`` under a fresh claim token and a lease. PostgreSQL
   uses ``FOR UPDATE SKIP LOCKED`` so several workers and processes claim disjoint rows; on
   SQLite the write lock makes one claimer at a time (sends still overlap).
2. **prepare and send** (reads, then one HTTP request): conversions read the event and the
   person's *current* match keys; consent is resolved from evidence for the destination's
   purposes (denied → ``SKIPPED_NO_CONSENT``; a US opt-out with Limited Data Use available →
   sent in LDU mode); an event whose person was erased is ``CANCELLED``; one past the
   platform's age limit is ``EXPIRED``. Audience additions are sent only while the person
   is still a member there; removals send the keys that were sent, minus keys a current
   member holds.
3. **record** (a write transaction): each row's outcome, if the claim is still ours:
   ``SUCCEEDED``; ``RETRYING`` with exponential backoff and jitter (at least the platform's
   ``Retry-After``), a 429 also pausing the whole destination; ``DEAD_LETTERED`` for
   permanent errors or when attempts run out. One ``delivery_batches`` row per request and
   one ``delivery_attempts`` row per delivery.

A worker that dies mid-send leaves its rows ``IN_FLIGHT``; when the lease runs out they are
claimed again and re-sent — platforms deduplicate conversions by ``event_id`` and audience
adds/removes are idempotent, so a crash costs at most one duplicate request, never a loss.
"""

from __future__ import annotations

import hashlib
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import httpx
from prometheus_client import Counter, Histogram
from sqlalchemy import Table, or_, select, text, update
from sqlalchemy.orm import Session

from audiences.consent.policy import Verdict, destination_consent
from audiences.consent.store import ConsentStore, PersonConsent
from audiences.destinations import ACTIVE, KINDS, DestinationRow, effective_purposes, limited_data_use_enabled
from audiences.destinations.base import (
    PERMANENT,
    RETRYABLE,
    SUCCEEDED,
    THROTTLED,
    AudienceChange,
    BatchResult,
    Conversion,
    CredentialsError,
    DestinationContext,
    PersonKeys,
    RecordOutcome,
    ReplaceSession,
    TraitUpdate,
    redact,
    resolve_credentials,
)
from audiences.destinations.registry import adapter_for, has_adapter
from audiences.models import AudienceDestinationMemberRow, PersonConsentRow
from audiences.outbox import (
    AUDIENCE_ADD,
    AUDIENCE_REMOVE,
    CANCELLED,
    DEAD_LETTERED,
    DELIVERIES,
    ERASE,
    EXPIRED,
    IN_FLIGHT,
    PENDING,
    RETRYING,
    SKIPPED_NO_CONSENT,
    DeliveryAttemptRow,
    DeliveryBatchRow,
    KeyList,
    keys_of_persons,
    now_us,
)
from audiences.outbox import (
    SUCCEEDED as DELIVERED,
)
from identity.events.models import EventRow
from identity.models import ErasureRow, IdentifierRow, PersonRow
from stitchgraph.changes import PersonChangeRow
from stitchgraph.db import Database, in_values

logger = logging.getLogger("stitchgraph.delivery")

__all__ = ["DeliveryEngine", "DeliverySettings", "person_keys"]

DELIVERIES_SETTLED = Counter("stitchgraph_deliveries_total", "Deliveries settled, by destination kind and status",
                             ["kind", "status"])
REQUEST_SECONDS = Histogram("stitchgraph_delivery_request_seconds", "Platform request latency by destination kind",
                            ["kind"])

_AD_PURPOSES = ("ad_user_data", "ad_personalization")
_EXPLICIT = ("EXPLICIT", "GPC", "OPT_OUT_SIGNAL")
_ATTEMPTS = cast(Table, DeliveryAttemptRow.__table__)
_BATCHES = cast(Table, DeliveryBatchRow.__table__)
_MEMBERS = cast(Table, AudienceDestinationMemberRow.__table__)


@dataclass(frozen=True)
class DeliverySettings:
    """How the workers send (``[delivery]`` in the configuration)."""

    #: Run the delivery workers in the server process.
    enabled: bool = True
    #: Worker threads per process (each sends one batch at a time).
    workers: int = 2
    #: Seconds an idle worker waits before looking for due rows again (new rows wake it sooner).
    poll_interval_seconds: float = 1.0
    #: Seconds a claim lasts; rows of a worker that died are claimed again after it.
    lease_seconds: float = 120.0
    #: Timeout of one platform request.
    request_timeout_seconds: float = 15.0
    #: Attempts before a retryable failure is dead-lettered.
    max_attempts: int = 10
    #: First retry delay; doubled per attempt (with jitter) up to ``backoff_max_seconds``.
    backoff_base_seconds: float = 2.0
    backoff_max_seconds: float = 900.0
    #: Pause of a destination after a 429 that gave no ``Retry-After``.
    throttle_seconds: float = 30.0


@dataclass(frozen=True)
class _Row:
    id: int
    kind: str
    event_id: str
    person_pk: int | None
    person_id: str
    audience_pk: int | None
    erasure_id: str
    payload: Mapping[str, Any] | None
    attempts: int
    expire_us: int | None
    batch_key: str


@dataclass(frozen=True)
class _Destination:
    pk: int
    destination_id: str
    kind: str
    settings: Mapping[str, Any]
    credentials_ref: str
    purposes: tuple[str, ...]
    limited_data_use: bool


@dataclass
class _Claim:
    destination: _Destination
    token: str
    rows: list[_Row]


@dataclass
class _Prepared:
    conversions: list[Conversion] = field(default_factory=list)
    changes: list[AudienceChange] = field(default_factory=list)
    action: str = ""
    session: ReplaceSession | None = None
    traits: list[TraitUpdate] = field(default_factory=list)
    #: Rows settled without sending: id → (status, reason).
    settled: dict[int, tuple[str, str]] = field(default_factory=dict)


def person_keys(person_id: str, keys: KeyList | None) -> PersonKeys:
    """Match keys per platform rule from stored ``[type, value, {platform key: hash}]`` entries."""
    emails: list[str] = []
    google: list[str] = []
    phones: list[str] = []
    meta_phones: list[str] = []
    users: list[str] = []
    for entry in keys or ():
        kind, value = str(entry[0]), str(entry[1])
        platform: Mapping[str, str] = (entry[2] if len(entry) > 2 else None) or {}
        if kind == "email_sha256":
            emails.append(value)
            google.append(platform.get("google_email_sha256", value))
        elif kind == "phone_sha256":
            phones.append(value)
            if platform.get("meta_phone_sha256"):
                meta_phones.append(platform["meta_phone_sha256"])
        elif kind == "user_id":
            users.append(value)
    return PersonKeys(person_id, tuple(emails), tuple(dict.fromkeys(google)), tuple(phones), tuple(meta_phones),
                      tuple(users))


def _skip_reason(consent: PersonConsent | None, required: Sequence[str]) -> str:
    if consent is None:
        return "PERSON_ERASED"
    for verdict in consent.verdicts:
        if not verdict.granted and (verdict.purpose in required or verdict.purpose == "sale_or_sharing") \
                and verdict.resolved_by in _EXPLICIT:
            return "CONSENT_WITHDRAWN"
    return "NO_CONSENT"


class DeliveryEngine:
    """Claims, sends and records deliveries over one database."""

    def __init__(self, db: Database, consent: ConsentStore, settings: DeliverySettings | None = None, *,
                 client: httpx.Client | None = None, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], int] | None = None) -> None:
        self.db = db
        self.consent = consent
        self.settings = settings or DeliverySettings()
        self.environ = environ
        self.clock = clock or now_us
        self._own_client = client is None
        self.client = client or httpx.Client(
            limits=httpx.Limits(max_connections=max(4, 2 * self.settings.workers), max_keepalive_connections=8),
            follow_redirects=False, headers={"User-Agent": "stitchgraph-delivery/0.1"})
        self._rotation = 0
        self._last_reclaim = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads (``settings.workers`` of them)."""
        for i in range(self.settings.workers):
            thread = threading.Thread(target=self._loop, name=f"delivery-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """New rows were queued: idle workers look now instead of at their next poll."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=self.settings.request_timeout_seconds + 5)
        if self._own_client:
            self.client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if time.monotonic() - self._last_reclaim >= self.settings.lease_seconds / 4:
                    self._last_reclaim = time.monotonic()
                    self.reclaim_expired()
                settled = self.run_once()
            except Exception:  # keep the worker alive; the rows stay claimable
                logger.exception("delivery round failed")
                settled = 0
            if settled == 0:
                self._wake.wait(self.settings.poll_interval_seconds)
                self._wake.clear()

    def drain(self, *, rounds: int = 1_000_000) -> int:
        """Send everything due now, round after round, until nothing is due (tests, benchmarks,
        the CLI). Rows waiting for a later retry stay queued. Returns deliveries settled."""
        total = 0
        self.reclaim_expired()
        for _ in range(rounds):
            settled = self.run_once()
            if settled == 0:
                break
            total += settled
        return total

    # -- one round -----------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim, send and record one batch. Returns the rows it settled (0: nothing due)."""
        claim = self._claim()
        if claim is None:
            return 0
        now = self.clock()
        prepared, result = self._send(claim, now)
        self._record(claim, prepared, result)
        return len(claim.rows)

    def reclaim_expired(self) -> int:
        """Make rows whose claim lease ran out (their worker died) claimable again."""
        now = self.clock()
        with self.db.transaction() as session:
            result = session.execute(update(DELIVERIES).where(
                DELIVERIES.c.status == IN_FLIGHT, DELIVERIES.c.lease_until_us < now).values(
                status=RETRYING, claim_token="", lease_until_us=None, next_attempt_us=now, updated_us=now,
                status_reason="LEASE_EXPIRED"))
            return int(getattr(result, "rowcount", 0) or 0)

    def _anything_due(self, now: int) -> bool:
        """A cheap read first, so idle workers do not take the write lock every poll."""
        c = DELIVERIES.c
        with self.db.read() as session:
            return session.execute(select(c.id).where(
                c.status.in_((PENDING, RETRYING)), c.next_attempt_us <= now).limit(1)).first() is not None

    def _claim(self) -> _Claim | None:
        postgres = self.db.is_postgres
        if not self._anything_due(self.clock()):
            return None
        with self.db.transaction() as session:
            now = self.clock()
            destinations = [d for d in session.execute(select(DestinationRow).where(
                DestinationRow.state == ACTIVE,
                or_(DestinationRow.send_after_us.is_(None), DestinationRow.send_after_us <= now))
                .order_by(DestinationRow.id)).scalars() if has_adapter(d.kind)]
            if not destinations:
                return None
            self._rotation += 1
            start = self._rotation % len(destinations)
            for row in destinations[start:] + destinations[:start]:
                if postgres and not _try_lock(session, f"stitchgraph.delivery.{row.id}"):
                    continue  # another worker is claiming for this destination right now
                rows = self._claim_rows(session, row.id, adapter_for(row.kind).batch_limit, now, postgres)
                if not rows:
                    continue
                token = secrets.token_hex(12)
                ids = [r.id for r in rows]
                for i in range(0, len(ids), 10_000):
                    chunk = ids[i:i + 10_000]
                    session.execute(update(DELIVERIES).where(in_values(session, DELIVERIES.c.id, chunk)).values(
                        status=IN_FLIGHT, claim_token=token, updated_us=now,
                        lease_until_us=now + int(self.settings.lease_seconds * 1_000_000)))
                destination = _Destination(row.id, row.destination_id, row.kind, dict(row.settings or {}),
                                           row.credentials_ref, effective_purposes(row),
                                           limited_data_use_enabled(row))
                return _Claim(destination, token, rows)
        return None

    @staticmethod
    def _claim_rows(session: Session, destination_pk: int, limit: int, now: int, postgres: bool) -> list[_Row]:
        c = DELIVERIES.c
        oldest: tuple[int, int, str] | None = None
        for status in (PENDING, RETRYING):
            query = select(c.id, c.next_attempt_us, c.batch_key).where(
                c.destination_pk == destination_pk, c.status == status, c.next_attempt_us <= now,
            ).order_by(c.next_attempt_us, c.id).limit(1)
            if postgres:
                query = query.with_for_update(skip_locked=True)
            found = session.execute(query).first()
            if found is not None and (oldest is None or (found.next_attempt_us, found.id) < oldest[:2]):
                oldest = (found.next_attempt_us, found.id, found.batch_key)
        if oldest is None:
            return []
        columns = (c.id, c.kind, c.event_id, c.person_pk, c.person_id, c.audience_pk, c.erasure_id, c.payload,
                   c.attempts, c.expire_us, c.batch_key, c.next_attempt_us)
        picked: list[Any] = []
        for status in (PENDING, RETRYING):
            query = select(*columns).where(
                c.destination_pk == destination_pk, c.status == status, c.batch_key == oldest[2],
                c.next_attempt_us <= now).order_by(c.next_attempt_us, c.id).limit(limit)
            if postgres:
                query = query.with_for_update(skip_locked=True)
            picked += session.execute(query).all()
        picked.sort(key=lambda r: (r.next_attempt_us, r.id))
        return [_Row(r.id, r.kind, r.event_id, r.person_pk, r.person_id, r.audience_pk, r.erasure_id, r.payload,
                     r.attempts, r.expire_us, r.batch_key) for r in picked[:limit]]

    # -- prepare and send ----------------------------------------------------------------

    def _send(self, claim: _Claim, now: int) -> tuple[_Prepared, BatchResult | None]:
        destination = claim.destination
        adapter = adapter_for(destination.kind)
        try:
            credentials = resolve_credentials(destination.credentials_ref, self.environ)
        except CredentialsError as exc:
            outcome = RecordOutcome(PERMANENT, "", str(exc), "CREDENTIALS_UNAVAILABLE")
            return _Prepared(), BatchResult({r.id: outcome for r in claim.rows}, requests=0,
                                            response_excerpt=str(exc))
        with self.db.read() as session:
            prepared = self._prepare(session, claim, now)
        if not prepared.conversions and not prepared.changes and not prepared.traits:
            return prepared, None
        context = DestinationContext(destination.destination_id, destination.kind, destination.settings, credentials,
                                     timeout_seconds=self.settings.request_timeout_seconds)
        try:
            with REQUEST_SECONDS.labels(destination.kind).time():
                if prepared.conversions:
                    result = adapter.send_conversions(self.client, context, prepared.conversions)
                elif prepared.traits:
                    result = adapter.send_traits(self.client, context, prepared.traits)
                else:
                    result = adapter.send_audience(self.client, context, prepared.action, prepared.changes,
                                                   prepared.session)
        except Exception as exc:  # an adapter bug must not lose the rows: retry them
            logger.exception("adapter %s failed for destination %s", destination.kind, destination.destination_id)
            message = redact(f"{type(exc).__name__}: {exc}", list(credentials.values()))[:300]
            outcome = RecordOutcome(RETRYABLE, "", f"adapter error: {message}", "ADAPTER_ERROR")
            ids = ([r.delivery_id for r in prepared.conversions] + [r.delivery_id for r in prepared.changes]
                   + [r.delivery_id for r in prepared.traits])
            result = BatchResult({i: outcome for i in ids}, requests=0)
        return prepared, result

    def _prepare(self, session: Session, claim: _Claim, now: int) -> _Prepared:
        if KINDS[claim.destination.kind].conversions:
            return self._prepare_conversions(session, claim, now)
        if KINDS[claim.destination.kind].traits:
            return self._prepare_traits(session, claim)
        return self._prepare_audience(session, claim)

    def _consents(self, session: Session, persons: Sequence[int]) -> dict[int, PersonConsent]:
        """Each person's consent now. The materialised ``person_consent`` view is exact for a
        person with nothing waiting in the change journal (every consent write journals the
        person in its own transaction); the others are resolved from the evidence."""
        if not persons:
            return {}
        pending = set(session.execute(select(PersonChangeRow.person_pk).where(
            in_values(session, PersonChangeRow.person_pk, persons))).scalars())
        verdicts: dict[int, list[Verdict]] = {}
        for r in session.execute(select(PersonConsentRow.person_pk, PersonConsentRow.purpose, PersonConsentRow.granted,
                                        PersonConsentRow.resolved_by)
                                 .where(in_values(session, PersonConsentRow.person_pk, persons))):
            if r.person_pk not in pending:
                verdicts.setdefault(r.person_pk, []).append(Verdict(r.purpose, bool(r.granted), r.resolved_by, None,
                                                                    "", 0))
        found = {p: PersonConsent("", "VIEW", tuple(v)) for p, v in verdicts.items()}
        exact = [p for p in persons if p not in found]
        if exact:
            found.update(self.consent.resolve_persons(session, exact))
        return found

    def _verdict(self, destination: _Destination, consent: PersonConsent) -> Any:
        return destination_consent(consent.verdicts, destination.purposes,
                                   advertising=KINDS[destination.kind].advertising,
                                   limited_data_use_available=destination.limited_data_use)

    def _prepare_conversions(self, session: Session, claim: _Claim, now: int) -> _Prepared:
        prepared = _Prepared()
        live: list[_Row] = []
        for row in claim.rows:
            if row.expire_us is not None and now >= row.expire_us:
                prepared.settled[row.id] = (EXPIRED, "EVENT_TOO_OLD")
            else:
                live.append(row)
        if not live:
            return prepared
        events = {e.event_id: e for e in session.execute(
            select(EventRow.event_id, EventRow.event, EventRow.occurred_us, EventRow.identifier_pk, EventRow.value,
                   EventRow.currency, EventRow.order_id, EventRow.body)
            .where(in_values(session, EventRow.event_id, sorted({r.event_id for r in live}))))}
        identifier_pks = sorted({e.identifier_pk for e in events.values() if e.identifier_pk is not None})
        person_of = dict(session.execute(select(IdentifierRow.id, IdentifierRow.person_pk)
                                         .where(in_values(session, IdentifierRow.id, identifier_pks))).all()) \
            if identifier_pks else {}
        persons = sorted(set(person_of.values()))
        person_ids = dict(session.execute(select(PersonRow.id, PersonRow.person_id)
                                          .where(in_values(session, PersonRow.id, persons))).all()) if persons else {}
        keys = keys_of_persons(session, persons)
        consents = self._consents(session, persons)
        for row in live:
            event = events.get(row.event_id)
            person = person_of.get(event.identifier_pk) if event is not None and event.identifier_pk else None
            consent = consents.get(person) if person is not None else None
            if event is None or person is None or consent is None:
                prepared.settled[row.id] = (CANCELLED, "PERSON_ERASED")
                continue
            verdict = self._verdict(claim.destination, consent)
            if not verdict.allowed:
                prepared.settled[row.id] = (SKIPPED_NO_CONSENT, _skip_reason(consent, claim.destination.purposes))
                continue
            body = event.body or {}
            context = {k: v for k, v in (body.get("context") or {}).items() if k != "consent"}
            granted = {v.purpose: v.granted for v in consent.verdicts if v.purpose in _AD_PURPOSES}
            prepared.conversions.append(Conversion(
                delivery_id=row.id, event_id=event.event_id, event=event.event, occurred_us=event.occurred_us,
                keys=person_keys(person_ids.get(person, ""), keys.get(person)), value=event.value,
                currency=event.currency, order_id=event.order_id, items=tuple(body.get("items") or ()),
                properties=body.get("properties") or {}, context=context,
                action_source=str(body.get("action_source") or "").lower(),
                limited_data_use=verdict.limited_data_use, consent=granted))
        return prepared

    def _prepare_traits(self, session: Session, claim: _Claim) -> _Prepared:
        """Trait updates, addressed to the ID the analytics tool knows the person by (the
        kind's match key types, strongest first), if consent still allows it."""
        prepared = _Prepared()
        destination = claim.destination
        persons = sorted({r.person_pk for r in claim.rows if r.person_pk is not None})
        types = KINDS[destination.kind].match_key_types
        identity: dict[int, str] = {}
        rank: dict[int, int] = {}
        for person, type_, value in session.execute(
                select(IdentifierRow.person_pk, IdentifierRow.type, IdentifierRow.value).where(
                    in_values(session, IdentifierRow.person_pk, persons), IdentifierRow.type.in_(types))
                .order_by(IdentifierRow.id)):
            position = types.index(type_)
            if person not in rank or position < rank[person]:
                identity[person], rank[person] = value, position
        consents = self._consents(session, persons)
        for row in claim.rows:
            consent = consents.get(row.person_pk) if row.person_pk is not None else None
            payload = row.payload or {}
            if consent is None or row.person_pk is None:
                prepared.settled[row.id] = (CANCELLED, "PERSON_ERASED")
            elif not self._verdict(destination, consent).allowed:
                prepared.settled[row.id] = (SKIPPED_NO_CONSENT, _skip_reason(consent, destination.purposes))
            elif row.person_pk not in identity:
                prepared.settled[row.id] = (CANCELLED, "NO_MATCH_KEYS")
            else:
                prepared.traits.append(TraitUpdate(row.id, identity[row.person_pk], dict(payload.get("values") or {}),
                                                   tuple(payload.get("unset") or ()), int(payload.get("at_us") or 0)))
        return prepared

    def _prepare_audience(self, session: Session, claim: _Claim) -> _Prepared:
        prepared = _Prepared()
        destination = claim.destination
        first = claim.rows[0]
        prepared.action = "add" if first.kind == AUDIENCE_ADD else "remove"
        session_spec = (first.payload or {}).get("session") if first.payload else None
        if session_spec:
            prepared.session = ReplaceSession(int(session_spec["session_id"]), int(session_spec["batch_seq"]),
                                              bool(session_spec["last_batch"]), int(session_spec["estimated_total"]))
        audience_pk = first.audience_pk
        persons = sorted({r.person_pk for r in claim.rows if r.person_pk is not None})
        members: set[int] = set(session.execute(select(_MEMBERS.c.person_pk).where(
            _MEMBERS.c.audience_pk == audience_pk, _MEMBERS.c.destination_pk == destination.pk,
            _MEMBERS.c.person_pk.in_(persons))).scalars()) if persons else set()
        if prepared.action == "add":
            live = []
            for row in claim.rows:
                if row.person_pk not in members:
                    prepared.settled[row.id] = (CANCELLED, "SUPERSEDED")
                else:
                    live.append(row)
            live_persons = sorted({r.person_pk for r in live if r.person_pk is not None})
            consents = self._consents(session, live_persons)
            keys = keys_of_persons(session, live_persons)
            for row in live:
                assert row.person_pk is not None
                consent = consents.get(row.person_pk)
                if consent is None:
                    prepared.settled[row.id] = (CANCELLED, "PERSON_ERASED")
                elif not self._verdict(destination, consent).allowed:
                    prepared.settled[row.id] = (SKIPPED_NO_CONSENT, _skip_reason(consent, destination.purposes))
                elif not keys.get(row.person_pk):
                    prepared.settled[row.id] = (CANCELLED, "NO_MATCH_KEYS")
                else:
                    prepared.changes.append(AudienceChange(row.id, person_keys(row.person_id, keys[row.person_pk])))
            return prepared
        held = self._held_keys(session, claim, audience_pk)
        for row in claim.rows:
            if row.kind == AUDIENCE_REMOVE and row.person_pk in members:
                prepared.settled[row.id] = (CANCELLED, "SUPERSEDED")
                continue
            removal = [k for k in (row.payload or {}).get("keys") or () if (k[0], k[1]) not in held]
            if not removal:
                prepared.settled[row.id] = (CANCELLED, "KEYS_HELD_BY_MEMBERS")
                continue
            prepared.changes.append(AudienceChange(row.id, person_keys(row.person_id, removal)))
        return prepared

    @staticmethod
    def _held_keys(session: Session, claim: _Claim, audience_pk: int | None) -> set[tuple[str, str]]:
        """The removal keys of ``claim`` that a current member of the audience there still holds."""
        wanted: dict[str, set[str]] = {}
        for row in claim.rows:
            for key in (row.payload or {}).get("keys") or ():
                wanted.setdefault(key[0], set()).add(key[1])
        owners: dict[int, list[tuple[str, str]]] = {}
        for kind, values in wanted.items():
            ordered = sorted(values)
            for i in range(0, len(ordered), 1000):
                for r in session.execute(select(IdentifierRow.person_pk, IdentifierRow.value).where(
                        IdentifierRow.type == kind, IdentifierRow.value.in_(ordered[i:i + 1000]))):
                    owners.setdefault(r.person_pk, []).append((kind, r.value))
        if not owners:
            return set()
        members: set[int] = set(session.execute(select(_MEMBERS.c.person_pk).where(
            _MEMBERS.c.audience_pk == audience_pk, _MEMBERS.c.destination_pk == claim.destination.pk,
            _MEMBERS.c.person_pk.in_(sorted(owners)))).scalars())
        return {key for person in members for key in owners[person]}

    # -- record --------------------------------------------------------------------------

    def _delay_us(self, attempts: int, retry_after: float | None, throttled: bool) -> int:
        base = min(self.settings.backoff_max_seconds, self.settings.backoff_base_seconds * 2 ** max(0, attempts - 1))
        delay = base / 2 + random.uniform(0, base / 2)
        if retry_after is not None:
            delay = max(delay, retry_after)
        elif throttled:
            delay = max(delay, self.settings.throttle_seconds)
        return int(delay * 1_000_000)

    def _record(self, claim: _Claim, prepared: _Prepared, result: BatchResult | None) -> None:
        destination = claim.destination
        with self.db.transaction() as session:
            now = self.clock()
            batch_pk: int | None = None
            if result is not None:
                batch_pk = session.execute(_BATCHES.insert().returning(_BATCHES.c.id).values(
                    destination_pk=destination.pk, time_us=now, http_status=result.http_status,
                    latency_us=int(result.latency_seconds * 1_000_000), excerpt=result.response_excerpt[:2048],
                    size=len(result.outcomes))).scalar_one()
            groups: dict[tuple[str, str, int | None, bool], list[int]] = {}
            key: tuple[str, str, int | None, bool]
            attempts: list[dict[str, Any]] = []
            throttled = False
            failed = succeeded = False
            for row in claim.rows:
                if row.id in prepared.settled:
                    status, reason = prepared.settled[row.id]
                    groups.setdefault((status, reason, None, False), []).append(row.id)
                    continue
                outcome = (result.outcomes.get(row.id) if result is not None else None) or RecordOutcome(
                    RETRYABLE, "", "the adapter reported no outcome for this delivery", "NO_OUTCOME")
                if batch_pk is not None:
                    attempts.append({"delivery_pk": row.id, "batch_pk": batch_pk,
                                     "classification": outcome.classification,
                                     "platform_error_code": outcome.platform_error_code[:128],
                                     "error": outcome.error[:1024]})
                made = row.attempts + 1
                if outcome.classification == SUCCEEDED:
                    succeeded = True
                    groups.setdefault((DELIVERED, outcome.status_reason, None, True), []).append(row.id)
                    continue
                failed = True
                if outcome.classification == PERMANENT:
                    key = (DEAD_LETTERED, outcome.status_reason or "PERMANENT_ERROR", None, True)
                elif made >= self.settings.max_attempts:
                    key = (DEAD_LETTERED, "RETRIES_EXHAUSTED", None, True)
                else:
                    is_throttled = outcome.classification == THROTTLED
                    throttled = throttled or is_throttled
                    retry_after = result.retry_after_seconds if result is not None else None
                    key = (RETRYING, outcome.status_reason or outcome.classification,
                           now + self._delay_us(made, retry_after, is_throttled), True)
                groups.setdefault(key, []).append(row.id)
            c = DELIVERIES.c
            for (status, reason, next_us, attempted), ids in groups.items():
                values: dict[str, Any] = {"status": status, "status_reason": reason, "claim_token": "",
                                          "lease_until_us": None, "updated_us": now}
                if attempted:
                    values["attempts"] = c.attempts + 1
                if next_us is not None:
                    values["next_attempt_us"] = next_us
                for i in range(0, len(ids), 10_000):
                    session.execute(update(DELIVERIES).where(
                        in_values(session, c.id, ids[i:i + 10_000]), c.claim_token == claim.token,
                        c.status == IN_FLIGHT).values(**values))
                DELIVERIES_SETTLED.labels(destination.kind, status).inc(len(ids))
            delivered = {i for (status, *_), ids in groups.items() if status == DELIVERED for i in ids}
            delivered_removals = [r.id for r in claim.rows if r.kind in (AUDIENCE_REMOVE, ERASE) and r.id in delivered]
            if delivered_removals:  # the hashes were only kept to be sent
                session.execute(update(DELIVERIES).where(c.id.in_(delivered_removals), c.status == DELIVERED)
                                .values(payload={"keys_sent": True}))
            if attempts:
                session.execute(_ATTEMPTS.insert(), attempts)
            dest_values: dict[str, Any] = {}
            if succeeded:
                dest_values["last_success_us"] = now
            if failed:
                dest_values["last_failure_us"] = now
            if throttled:
                retry_after = result.retry_after_seconds if result is not None else None
                dest_values["send_after_us"] = now + int((retry_after if retry_after is not None
                                                          else self.settings.throttle_seconds) * 1_000_000)
            if dest_values:
                session.execute(update(DestinationRow).where(DestinationRow.id == destination.pk).values(**dest_values))
            erasures = sorted({r.erasure_id for r in claim.rows if r.erasure_id})
            if erasures:
                update_erasures(session, erasures)


def _try_lock(session: Session, name: str) -> bool:
    """Take a transaction-scoped PostgreSQL advisory lock if nobody holds it."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    return bool(session.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": key}).scalar())


def update_erasures(session: Session, erasure_ids: Sequence[str]) -> None:
    """Bring each erasure's state in line with its ERASE deliveries: COMPLETED when every one
    is settled without failure, FAILED when one is dead-lettered, else PROPAGATING. The
    erasure row is locked first, so two workers settling its deliveries at once cannot both
    read the other's as still open."""
    c = DELIVERIES.c
    for erasure_id in erasure_ids:
        session.execute(select(ErasureRow.id).where(ErasureRow.id == erasure_id).with_for_update())
        statuses: set[str] = set(session.execute(select(c.status).where(c.erasure_id == erasure_id, c.kind == ERASE))
                       .scalars())
        if DEAD_LETTERED in statuses:
            state = "FAILED"
        elif statuses & {PENDING, IN_FLIGHT, RETRYING}:
            state = "PROPAGATING"
        else:
            state = "COMPLETED"
        session.execute(update(ErasureRow).where(ErasureRow.id == erasure_id, ErasureRow.state != state)
                        .values(state=state, updated_at=datetime.now(UTC)))

