"""Dependency wiring: builds the domain services from settings, once, the same way
for ``main`` and for tests."""

from __future__ import annotations

from dataclasses import dataclass

from identity.blocklist import BlocklistEntry
from identity.events.capture import EventLedger
from identity.events.registry import SchemaRegistry
from identity.identifiers import IdentifierType
from identity.operations import IdentityOperations
from identity.policy import IdentityPolicy
from server.config import IdentitySettings, Settings
from stitchgraph.db import Database, DatabaseOptions


@dataclass
class Application:
    """Everything a servicer may call, built from one :class:`Settings`."""

    settings: Settings
    db: Database
    identity: IdentityOperations
    events: EventLedger

    def start(self) -> None:
        """Work that needs the migrated store: default event mappings, the registry file."""
        self.events.start()

    def close(self) -> None:
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
    return Application(settings=settings, db=db, identity=identity,
                       events=EventLedger(db, identity, registry, settings.events))


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
