"""Dependency wiring: builds the domain services from settings, once, the same way
for ``main`` and for tests."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from audiences.cohorts.jobs import CohortPullJobs
from audiences.cohorts.service import CohortImports
from audiences.consent.store import ConsentStore
from audiences.delivery import DeliveryEngine
from audiences.engine import AudienceEngine
from audiences.outbox import enqueue_conversions
from audiences.rules import RuleCatalog
from audiences.writeback import TraitWriteback
from identity.blocklist import BlocklistEntry
from identity.events.capture import EventLedger
from identity.events.models import EventMappingRow
from identity.events.registry import SchemaRegistry
from identity.identifiers import IdentifierType
from identity.operations import IdentityOperations
from identity.policy import IdentityPolicy
from server.config import IdentitySettings, Settings
from server.jobs import BuiltinJobs
from stitchgraph.db import Database, DatabaseOptions
from stitchgraph.scheduler import Scheduler, parse_schedule

logger = logging.getLogger("stitchgraph.app")


@dataclass
class Application:
    """Everything a servicer may call, built from one :class:`Settings`."""

    settings: Settings
    db: Database
    identity: IdentityOperations
    events: EventLedger
    consent: ConsentStore
    audiences: AudienceEngine
    delivery: DeliveryEngine
    scheduler: Scheduler
    cohorts: CohortImports
    _stop: threading.Event = field(default_factory=threading.Event)
    _timers: list[threading.Thread] = field(default_factory=list)

    def start(self, *, background: bool = True) -> None:
        """Work that needs the migrated store: default event mappings, the registry file;
        then the journal timer, the delivery workers and the scheduler (window expiry,
        reconciliation, cohort pulls and housekeeping are scheduled jobs)."""
        self.events.start()
        if not background:
            return
        if self.settings.delivery.enabled and self.settings.delivery.workers > 0:
            self.delivery.start()
        self.scheduler.start()
        interval = self.settings.audiences.process_interval_seconds
        if interval > 0:
            thread = threading.Thread(target=self._every, args=(interval, self.audiences.process_changes),
                                      name="audience-journal", daemon=True)
            thread.start()
            self._timers.append(thread)

    def _every(self, interval: float, job: Callable[[], object]) -> None:
        while not self._stop.wait(interval):
            try:
                job()
            except Exception:  # keep the timer alive; the next run retries
                logger.exception("background job %s failed", threading.current_thread().name)

    def after_write(self) -> None:
        """Bring derived state (views, audience membership) up to date after a committed
        write, when configured to do so inline."""
        if self.settings.audiences.evaluate_inline:
            self.audiences.process_changes()
        self.delivery.wake()

    def close(self) -> None:
        self._stop.set()
        for thread in self._timers:
            thread.join(timeout=30)
        self.scheduler.close()
        self.delivery.close()
        self.db.dispose()


def build_application(settings: Settings) -> Application:
    db = Database(
        DatabaseOptions(
            url=settings.database_url,
            sqlite_synchronous=settings.sqlite_synchronous,
            pool_size=settings.database_pool_size,
        )
    )
    identity = IdentityOperations(db, seed_policy=seed_identity_policy(settings.identity))
    registry = SchemaRegistry(settings.events.custom_events)
    events = EventLedger(db, identity, registry, settings.events)
    consent = ConsentStore(settings.consent)
    events.signal_hooks.append(consent.record_event_signals)
    identity.erase_hooks.append(consent.erase)
    events.event_hooks.append(enqueue_conversions)

    def catalog(session: Session) -> RuleCatalog:
        mapped = set(session.execute(select(EventMappingRow.canonical_event).distinct()).scalars())
        return RuleCatalog(events=frozenset(registry.canonical_events | mapped),
                           purposes=tuple(settings.consent.purposes),
                           identifier_types=frozenset(identity.policy(session).types.names))

    audiences = AudienceEngine(db, consent, catalog, settings.audiences)
    identity.person_erase_hooks.append(audiences.erase_person)
    audiences.person_hooks.append(TraitWriteback().refresh)
    cohorts = CohortImports(db, identity, default_schedule=settings.scheduler.cohort_pull_schedule,
                            parse_schedule=parse_schedule)
    delivery = DeliveryEngine(db, consent, settings.delivery)
    scheduler = Scheduler(db, settings.scheduler, [BuiltinJobs(db, audiences, delivery, settings.scheduler),
                                                   CohortPullJobs(cohorts)])
    cohorts.on_change.append(scheduler.refresh)
    return Application(settings=settings, db=db, identity=identity, events=events, consent=consent,
                       audiences=audiences, delivery=delivery, scheduler=scheduler, cohorts=cohorts)



def seed_identity_policy(settings: IdentitySettings) -> IdentityPolicy:
    """The identity policy configuration provides until an operator stores another."""
    return IdentityPolicy(
        custom_types=tuple(IdentifierType(t.name, t.max_per_person, t.priority, t.hashed)
                           for t in settings.custom_types),
        type_limits=dict(settings.type_limits),
        max_identifiers=settings.max_identifiers_per_person,
        max_merges=settings.max_merges_per_person,
        blocklist=tuple(BlocklistEntry(**entry) for entry in settings.extra_blocklist),
        default_phone_region=settings.default_phone_region,
    )
