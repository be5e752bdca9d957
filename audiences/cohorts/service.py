"""Cohort sources as configuration and the operations on them: pulls (PostHog, Heap
Connect), pushed snapshots, held-snapshot confirmation, Heap Segments Sync webhooks, and
the scheduled pull jobs.

Every import goes through one path: a snapshot row is recorded (``RECEIVING``) and
committed, so the history shows pulls that fail; the members are gathered completely (every
page, every chunk); only then is the snapshot applied by
:class:`~audiences.cohorts.snapshots.SnapshotEngine` in one transaction — or held, or
failed with nothing applied.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import create_engine, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from audiences.cohorts.models import (
    CohortImportRow,
    CohortMemberRow,
    CohortSnapshotRow,
    CohortSourceRow,
    HeapSyncPageRow,
    HeldMemberRow,
)
from audiences.cohorts.posthog import PostHogCohortClient, PullError
from audiences.cohorts.snapshots import (
    APPLIED,
    DELTA,
    DISCARDED,
    FULL,
    HELD,
    RECEIVING,
    Guard,
    Member,
    SnapshotEngine,
)
from audiences.destinations import is_credentials_ref, secret_looking_key
from audiences.destinations.base import CredentialsError, resolve_credentials
from identity.operations import IdentityOperations
from stitchgraph.db import Database
from stitchgraph.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)

__all__ = [
    "KINDS",
    "CohortImports",
    "ImportConfig",
    "SourceConfig",
    "default_trait_name",
]

logger = logging.getLogger("stitchgraph.cohorts")

POSTHOG = "POSTHOG"
HEAP_WEBHOOK = "HEAP_WEBHOOK"
HEAP_CONNECT = "HEAP_CONNECT"
PUSH = "PUSH"
KINDS = (POSTHOG, HEAP_WEBHOOK, HEAP_CONNECT, PUSH)
PULLED = (POSTHOG, HEAP_CONNECT)

SCHEDULED = "SCHEDULED"
MANUAL = "MANUAL"
PUSHED = "PUSH"
WEBHOOK = "WEBHOOK"

_ID_RE = re.compile(r"[a-z][a-z0-9-]{0,62}")
_TRAIT_RE = re.compile(r"[a-z][a-z0-9_]{0,127}")
_SQL_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_SLUG_RE = re.compile(r"[^a-z0-9]+")
MAX_COHORTS = 200
MAX_KEY_LENGTH = 128
HEAP_ACTIONS = ("segment.users.sync", "segment.users.drain")
MAX_WEBHOOK_IDS = 100_000


@dataclass(frozen=True)
class ImportConfig:
    cohort_key: str
    trait_name: str = ""
    schedule: str = ""
    display_name: str = ""
    member_identifier_type: str = ""
    disabled: bool = False


@dataclass(frozen=True)
class SourceConfig:
    kind: str
    display_name: str
    description: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    credentials_ref: str = ""
    cohorts: tuple[ImportConfig, ...] = ()
    max_removed_percent: int = 0
    empty_hold_min_members: int = 0


def slug(text: str) -> str:
    """``text`` as lower_snake_case (``"Power Users (EU)"`` → ``power_users_eu``)."""
    return _SLUG_RE.sub("_", text.lower()).strip("_")


def default_trait_name(kind: str, cohort_key: str, display_name: str) -> str:
    """``posthog_cohort_<slug>`` / ``heap_segment_<slug>`` / ``cohort_<slug>``, the slug from
    the display name (else the key), at most 128 characters."""
    prefix = {POSTHOG: "posthog_cohort_", HEAP_WEBHOOK: "heap_segment_", HEAP_CONNECT: "heap_segment_"}.get(
        kind, "cohort_")
    return (prefix + (slug(display_name) or slug(cohort_key) or "cohort"))[:128]


def default_member_type(kind: str) -> str:
    """The identifier type unknown member IDs become."""
    return "posthog_distinct_id" if kind == POSTHOG else "user_id"


def validate_source(config: SourceConfig, *, identifier_types: frozenset[str],
                    parse_schedule: Callable[[str], object] | None,
                    hashed_types: frozenset[str] = frozenset({"email_sha256", "phone_sha256"})
                    ) -> list[FieldViolation]:
    """Every problem with ``config`` (field paths under ``cohort_source``)."""
    out: list[FieldViolation] = []
    p = "cohort_source"
    if config.kind not in KINDS:
        out.append(FieldViolation(f"{p}.kind", f"must be one of {', '.join(KINDS)}", "REQUIRED"))
    if not config.display_name.strip() or len(config.display_name) > 256:
        out.append(FieldViolation(f"{p}.display_name", "is required, at most 256 characters", "REQUIRED"))
    if len(config.description) > 4096:
        out.append(FieldViolation(f"{p}.description", "must be at most 4096 characters", "TOO_LONG"))
    for key in config.settings:
        if secret_looking_key(str(key)):
            out.append(FieldViolation(f"{p}.settings.{str(key)[:64]}", "looks like a secret; put secrets behind "
                                      "credentials_ref", "SECRET_IN_SETTINGS"))
    if config.kind == PUSH:
        if config.credentials_ref:
            out.append(FieldViolation(f"{p}.credentials_ref", "PUSH sources take no credentials", "NOT_ALLOWED"))
    elif config.kind in KINDS:
        if not config.credentials_ref:
            out.append(FieldViolation(f"{p}.credentials_ref", "is required for this kind (env:NAME or file:/path)",
                                      "REQUIRED"))
        elif not is_credentials_ref(config.credentials_ref):
            out.append(FieldViolation(f"{p}.credentials_ref", "must be 'env:NAME' or 'file:/absolute/path'",
                                      "INVALID_FORMAT"))
    settings = config.settings
    if config.kind == POSTHOG:
        host = settings.get("host")
        if not isinstance(host, str) or not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", host):
            out.append(FieldViolation(f"{p}.settings.host", "is required: the private API host, for example "
                                      "'https://eu.posthog.com'", "REQUIRED"))
        elif ".i.posthog.com" in host:
            out.append(FieldViolation(f"{p}.settings.host", "is PostHog's ingestion host; cohorts are read from the "
                                      "private API host ('https://us.posthog.com' / 'https://eu.posthog.com')",
                                      "WRONG_HOST"))
        project = settings.get("project_id")
        if not (isinstance(project, int) or (isinstance(project, str) and (project.isdigit()
                                                                          or project == "@current"))):
            out.append(FieldViolation(f"{p}.settings.project_id", "is required: the numeric project ID or "
                                      "'@current'", "REQUIRED"))
        for name, top in (("page_size", 1000), ("query_page_size", 50_000)):
            value = settings.get(name)
            if value is not None and (not isinstance(value, int) or not 1 <= value <= top):
                out.append(FieldViolation(f"{p}.settings.{name}", f"must be an integer from 1 to {top}",
                                          "OUT_OF_RANGE"))
    if config.kind == HEAP_CONNECT:
        table = settings.get("table")
        if not isinstance(table, str) or not all(_SQL_NAME_RE.fullmatch(part.replace("{cohort_key}", "x"))
                                                 for part in table.split(".")) or table.count(".") > 1:
            out.append(FieldViolation(f"{p}.settings.table", "is required: the segment table ('schema.table'; "
                                      "'{cohort_key}' is replaced by the segment)", "REQUIRED"))
        for name in ("identity_column", "segment_column"):
            value = settings.get(name)
            if value is not None and (not isinstance(value, str) or not _SQL_NAME_RE.fullmatch(value)):
                out.append(FieldViolation(f"{p}.settings.{name}", "must be a plain column name", "INVALID_FORMAT"))
    if not 0 <= config.max_removed_percent <= 100:
        out.append(FieldViolation(f"{p}.snapshot_guard.max_removed_percent", "must be 0 to 100", "OUT_OF_RANGE"))
    if config.empty_hold_min_members < 0:
        out.append(FieldViolation(f"{p}.snapshot_guard.empty_hold_min_members", "must not be negative",
                                  "OUT_OF_RANGE"))
    if len(config.cohorts) > MAX_COHORTS:
        out.append(FieldViolation(f"{p}.cohorts", f"at most {MAX_COHORTS} cohorts per source", "TOO_MANY"))
    keys: set[str] = set()
    traits: set[str] = set()
    for i, cohort in enumerate(config.cohorts):
        c = f"{p}.cohorts[{i}]"
        if not cohort.cohort_key or len(cohort.cohort_key) > MAX_KEY_LENGTH or not cohort.cohort_key.isprintable():
            out.append(FieldViolation(f"{c}.cohort_key", f"is required, 1 to {MAX_KEY_LENGTH} printable characters",
                                      "REQUIRED"))
        elif cohort.cohort_key in keys:
            out.append(FieldViolation(f"{c}.cohort_key", "is listed twice", "DUPLICATE"))
        elif config.kind == POSTHOG and not cohort.cohort_key.isdigit():
            out.append(FieldViolation(f"{c}.cohort_key", "must be the numeric PostHog cohort ID", "INVALID_FORMAT"))
        keys.add(cohort.cohort_key)
        if cohort.trait_name and not _TRAIT_RE.fullmatch(cohort.trait_name):
            out.append(FieldViolation(f"{c}.trait_name", "must be lower_snake_case, at most 128 characters",
                                      "INVALID_FORMAT"))
        trait = cohort.trait_name or default_trait_name(config.kind, cohort.cohort_key, cohort.display_name)
        if trait in traits:
            out.append(FieldViolation(f"{c}.trait_name", f"{trait!r} is used by another cohort of this source",
                                      "DUPLICATE"))
        traits.add(trait)
        if len(cohort.display_name) > 256:
            out.append(FieldViolation(f"{c}.display_name", "must be at most 256 characters", "TOO_LONG"))
        if cohort.member_identifier_type and cohort.member_identifier_type not in identifier_types:
            out.append(FieldViolation(f"{c}.member_identifier_type", "is not an identifier type of the identity "
                                      "policy", "UNKNOWN_TYPE"))
        elif cohort.member_identifier_type in hashed_types and config.kind != PUSH:
            # Pulled and webhook IDs are taken as they come: a hashed type would store raw values as hashes.
            out.append(FieldViolation(f"{c}.member_identifier_type", "hashed types are only accepted from PUSH "
                                      "sources, where emails and phones are hashed on arrival", "HASHED_TYPE"))
        if cohort.schedule:
            if config.kind not in PULLED:
                out.append(FieldViolation(f"{c}.schedule", "only pulled sources (POSTHOG, HEAP_CONNECT) have "
                                          "schedules", "NOT_ALLOWED"))
            elif parse_schedule is not None:
                try:
                    parse_schedule(cohort.schedule)
                except ValueError as exc:
                    out.append(FieldViolation(f"{c}.schedule", str(exc), "INVALID_SCHEDULE"))
    return out


def _new_etag() -> str:
    return secrets.token_hex(8)


def _now() -> datetime:
    return datetime.now(UTC)


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def new_snapshot_id(trigger: str) -> str:
    return f"{trigger.lower()}-{_now():%Y%m%dt%H%M%S}-{secrets.token_hex(3)}"


@dataclass
class CohortImports:
    """Cohort sources and their snapshots over one store."""

    db: Database
    identity: IdentityOperations
    default_schedule: str = "every 6h"
    http: Callable[[], httpx.Client] = field(default=lambda: httpx.Client(timeout=30.0))
    environ: Mapping[str, str] | None = None
    parse_schedule: Callable[[str], object] | None = None
    #: Called after sources change (the scheduler re-reads its jobs).
    on_change: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.engine = SnapshotEngine(self.db, self.identity)

    # -- configuration ---------------------------------------------------------------------------

    def validate(self, config: SourceConfig) -> None:
        with self.db.read() as session:
            registry = self.identity.policy(session).types
            types = frozenset(registry.names)
            hashed = frozenset(name for name in types if (t := registry.get(name)) is not None and t.hashed)
        violations = validate_source(config, identifier_types=types, parse_schedule=self.parse_schedule,
                                     hashed_types=hashed)
        if violations:
            raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations),
                                  violations=violations, reason="INVALID_COHORT_SOURCE")

    def create_source(self, session: Session, config: SourceConfig, source_id: str = "") -> CohortSourceRow:
        if source_id and not _ID_RE.fullmatch(source_id):
            raise InvalidArgument.for_field("cohort_source_id", "must be 1 to 63 characters of [a-z0-9-], starting "
                                            "with a letter", reason="INVALID_FORMAT")
        source_id = source_id or f"{config.kind.lower().replace('_', '-')}-{secrets.token_hex(4)}"
        if session.execute(select(CohortSourceRow.id).where(CohortSourceRow.source_id == source_id)).first():
            raise AlreadyExists(f"cohort source '{source_id}' already exists", reason="COHORT_SOURCE_EXISTS")
        now = _now()
        row = CohortSourceRow(source_id=source_id, kind=config.kind, display_name=config.display_name,
                              description=config.description, settings=dict(config.settings),
                              credentials_ref=config.credentials_ref, max_removed_percent=config.max_removed_percent,
                              empty_hold_min_members=config.empty_hold_min_members, etag=_new_etag(),
                              create_time=now, update_time=now)
        session.add(row)
        session.flush()
        self._set_imports(session, row, config.cohorts)
        return row

    def update_source(self, session: Session, row: CohortSourceRow, config: SourceConfig) -> CohortSourceRow:
        row.display_name = config.display_name
        row.description = config.description
        row.settings = dict(config.settings)
        row.credentials_ref = config.credentials_ref
        row.max_removed_percent = config.max_removed_percent
        row.empty_hold_min_members = config.empty_hold_min_members
        row.etag = _new_etag()
        row.update_time = _now()
        self._set_imports(session, row, config.cohorts)
        return row

    def _set_imports(self, session: Session, source: CohortSourceRow, cohorts: Sequence[ImportConfig]) -> None:
        existing = {c.cohort_key: c for c in self.imports(session, source.id)}
        wanted = {c.cohort_key for c in cohorts}
        for key, row in existing.items():
            if key not in wanted:  # the traits stay as last imported; the membership record goes
                session.execute(delete(CohortMemberRow).where(CohortMemberRow.cohort_pk == row.id))
                session.delete(row)
        session.flush()
        for position, cohort in enumerate(cohorts):
            trait = cohort.trait_name or default_trait_name(source.kind, cohort.cohort_key, cohort.display_name)
            found = existing.get(cohort.cohort_key)
            if found is None:
                row = CohortImportRow(source_pk=source.id, cohort_key=cohort.cohort_key, trait_name=trait,
                                      member_count=0)
                session.add(row)
            else:
                row = found
                if row.trait_name != trait:
                    raise InvalidArgument.for_field(
                        f"cohort_source.cohorts[{position}].trait_name", f"is {row.trait_name!r} and cannot change "
                        "(members already carry it); remove the cohort and add it again", reason="IMMUTABLE_FIELD")
            row.schedule = cohort.schedule
            row.display_name = cohort.display_name or row.display_name or ""
            row.member_identifier_type = cohort.member_identifier_type
            row.disabled = cohort.disabled
            row.position = position
        try:
            session.flush()
        except IntegrityError:
            raise AlreadyExists("a cohort trait name is already used by another cohort source",
                                reason="TRAIT_NAME_TAKEN") from None

    def delete_source(self, session: Session, row: CohortSourceRow, *, remove_traits: bool) -> None:
        for cohort in self.imports(session, row.id):
            if remove_traits and cohort.member_count:
                snapshot = self._new_snapshot(session, row, cohort, FULL, MANUAL, _us(_now()))
                session.flush()
                # Applied in this transaction's place: the removals commit with the delete.
                self.engine.apply_in(session, snapshot, cohort, [], default_type=default_member_type(row.kind))
            session.execute(delete(CohortMemberRow).where(CohortMemberRow.cohort_pk == cohort.id))
            session.delete(cohort)
        snapshots = select(CohortSnapshotRow.id).where(CohortSnapshotRow.source_pk == row.id)
        session.execute(delete(HeldMemberRow).where(HeldMemberRow.snapshot_pk.in_(snapshots)))
        session.execute(delete(CohortSnapshotRow).where(CohortSnapshotRow.source_pk == row.id))
        session.execute(delete(HeapSyncPageRow).where(HeapSyncPageRow.source_pk == row.id))
        session.delete(row)

    @staticmethod
    def get_source(session: Session, source_id: str) -> CohortSourceRow:
        row = session.execute(select(CohortSourceRow).where(CohortSourceRow.source_id == source_id)).scalar()
        if row is None:
            raise NotFound(f"cohort source '{source_id[:63]}' not found", reason="COHORT_SOURCE_NOT_FOUND")
        return row

    @staticmethod
    def imports(session: Session, source_pk: int) -> list[CohortImportRow]:
        return list(session.execute(select(CohortImportRow).where(CohortImportRow.source_pk == source_pk)
                                    .order_by(CohortImportRow.position, CohortImportRow.id)).scalars())

    @staticmethod
    def check_etag(row: CohortSourceRow, etag: str) -> None:
        if etag and etag != row.etag:
            raise Aborted(f"cohort source '{row.source_id}' changed since it was read (etag mismatch)",
                          reason="ETAG_MISMATCH")

    def changed(self) -> None:
        for callback in self.on_change:
            try:
                callback()
            except Exception:  # the schedule catches up on its next refresh
                logger.exception("cohort source change callback failed")

    # -- snapshots ---------------------------------------------------------------------------------

    @staticmethod
    def guard_of(source: CohortSourceRow) -> Guard:
        return Guard(max_removed_percent=source.max_removed_percent or 50,
                     empty_hold_min_members=source.empty_hold_min_members or 100)

    def _new_snapshot(self, session: Session, source: CohortSourceRow, cohort: CohortImportRow, mode: str,
                      trigger: str, snapshot_us: int, snapshot_id: str = "", fingerprint: str = ""
                      ) -> CohortSnapshotRow:
        row = CohortSnapshotRow(source_pk=source.id, cohort_pk=cohort.id, snapshot_id=snapshot_id or
                                new_snapshot_id(trigger), cohort_key=cohort.cohort_key, trait_name=cohort.trait_name,
                                mode=mode, status=RECEIVING, trigger=trigger, snapshot_us=snapshot_us,
                                create_time=_now(), fingerprint=fingerprint)
        session.add(row)
        session.flush()
        return row

    def snapshot(self, session: Session, source_id: str, snapshot_id: str) -> CohortSnapshotRow:
        source = self.get_source(session, source_id)
        row = session.execute(select(CohortSnapshotRow).where(CohortSnapshotRow.source_pk == source.id,
                                                              CohortSnapshotRow.snapshot_id == snapshot_id)).scalar()
        if row is None:
            raise NotFound(f"snapshot '{snapshot_id[:63]}' of cohort source '{source_id}' not found",
                           reason="COHORT_SNAPSHOT_NOT_FOUND")
        return row

    def _reload(self, snapshot_pk: int) -> CohortSnapshotRow:
        with self.db.read() as session:
            row = session.get(CohortSnapshotRow, snapshot_pk)
            assert row is not None
            session.expunge(row)
            return row

    # -- pulls -------------------------------------------------------------------------------------

    def sync(self, source_id: str, cohort_keys: Sequence[str] = (), *, trigger: str = MANUAL,
             schedule: str | None = None) -> list[CohortSnapshotRow]:
        """Pull the source's enabled cohorts (those named, else all; with ``schedule``, those on
        it) and apply each; one snapshot row per cohort."""
        with self.db.read() as session:
            source = self.get_source(session, source_id)
            if source.kind not in PULLED:
                raise FailedPrecondition(f"cohort source '{source_id}' is {source.kind}: its snapshots are pushed, "
                                         "not pulled", reason="NOT_PULLED")
            cohorts = self.imports(session, source.id)
            session.expunge_all()
        known = {c.cohort_key for c in cohorts}
        unknown = [k for k in cohort_keys if k not in known]
        if unknown:
            raise InvalidArgument.for_field("cohort_keys", f"not configured on this source: {', '.join(unknown)[:200]}",
                                            reason="UNKNOWN_COHORT")
        chosen = [c for c in cohorts if (c.cohort_key in cohort_keys if cohort_keys else not c.disabled)]
        if schedule is not None:
            chosen = [c for c in chosen if (c.schedule or self.default_schedule) == schedule]
        results = []
        for cohort in chosen:
            results.append(self._pull_one(source, cohort, trigger))
        return results

    def _pull_one(self, source: CohortSourceRow, cohort: CohortImportRow, trigger: str) -> CohortSnapshotRow:
        started = _us(_now())
        with self.db.transaction() as session:
            snapshot_pk = self._new_snapshot(session, source, cohort, FULL, trigger, started).id
        try:
            name, members = self._pull(source, cohort)
        except (PullError, CredentialsError) as exc:
            logger.warning("cohort %s/%s pull failed: %s", source.source_id, cohort.cohort_key, exc)
            self.engine.fail(snapshot_pk, str(exc))
            return self._reload(snapshot_pk)
        except Exception as exc:  # a driver error from a warehouse, say: recorded, never half-applied
            logger.exception("cohort %s/%s pull failed", source.source_id, cohort.cohort_key)
            self.engine.fail(snapshot_pk, f"{type(exc).__name__} while pulling")
            return self._reload(snapshot_pk)
        if name and not cohort.display_name:
            with self.db.transaction() as session:
                row = session.get(CohortImportRow, cohort.id)
                if row is not None and not row.display_name:
                    row.display_name = name[:256]
        outcome = self.engine.apply(snapshot_pk, members, guard=self.guard_of(source),
                                    default_type=cohort.member_identifier_type or default_member_type(source.kind))
        logger.info("cohort %s/%s snapshot %s: %d members, +%d -%d", source.source_id, cohort.cohort_key,
                    outcome.status, outcome.member_count, outcome.added, outcome.removed)
        return self._reload(snapshot_pk)

    def _pull(self, source: CohortSourceRow, cohort: CohortImportRow) -> tuple[str, list[Member]]:
        credentials = resolve_credentials(source.credentials_ref, self.environ)
        if source.kind == POSTHOG:
            settings = source.settings
            with self.http() as client:
                pulled = PostHogCohortClient(
                    client, host=str(settings["host"]), project_id=str(settings["project_id"]),
                    api_key=credentials.get("token") or credentials.get("personal_api_key", ""),
                    page_size=int(settings.get("page_size") or 500),
                    query_page_size=int(settings.get("query_page_size") or 10_000),
                    max_wait_seconds=float(settings.get("max_wait_seconds") or 60.0),
                ).pull(cohort.cohort_key)
            return pulled.name, pulled.members
        return "", self._read_heap_connect(source, cohort, credentials.get("token") or credentials.get("url", ""))

    def _read_heap_connect(self, source: CohortSourceRow, cohort: CohortImportRow, url: str) -> list[Member]:
        """Members of one segment from a Heap Connect table through a SQLAlchemy URL."""
        from sqlalchemy import column, table

        settings = source.settings
        name = str(settings["table"]).replace("{cohort_key}", slug(cohort.cohort_key))
        schema, _, table_name = name.rpartition(".")
        identity_column = str(settings.get("identity_column") or "identity")
        segment_column = settings.get("segment_column")
        query: Any = select(column(identity_column)).select_from(table(table_name, schema=schema or None))
        if segment_column:
            query = query.where(column(str(segment_column)) == cohort.cohort_key)
        member_type = cohort.member_identifier_type or default_member_type(source.kind)
        engine = create_engine(url)
        try:
            with engine.connect() as connection:
                values = {str(v).strip() for (v,) in connection.execute(query) if v is not None and str(v).strip()}
        finally:
            engine.dispose()
        return [Member(((member_type, v),)) for v in sorted(values)]

    # -- pushed snapshots --------------------------------------------------------------------------

    def import_pushed(self, *, source_id: str, snapshot_id: str, cohort_key: str, mode: str, snapshot_us: int,
                      expected_count: int, members: Sequence[Member], removals: Sequence[Member],
                      fingerprint: str) -> CohortSnapshotRow:
        """Apply a snapshot pushed through ImportCohortSnapshot; a repeat of ``snapshot_id``
        with the same header returns the first result."""
        with self.db.transaction() as session:
            source = self.get_source(session, source_id)
            if source.kind != PUSH:
                raise FailedPrecondition(f"cohort source '{source_id}' is {source.kind}; ImportCohortSnapshot needs "
                                         "a PUSH source", reason="NOT_PUSH_SOURCE")
            existing = session.execute(select(CohortSnapshotRow).where(
                CohortSnapshotRow.source_pk == source.id, CohortSnapshotRow.snapshot_id == snapshot_id)).scalar()
            if existing is not None:
                if existing.fingerprint != fingerprint:
                    raise InvalidArgument.for_field("header.snapshot_id", "was already used for a different "
                                                    "snapshot", reason="SNAPSHOT_ID_REUSED")
                session.expunge(existing)
                return existing
            cohort = next((c for c in self.imports(session, source.id) if c.cohort_key == cohort_key), None)
            if cohort is None:
                raise InvalidArgument.for_field("header.cohort", f"{cohort_key[:64]!r} is not a cohort of this "
                                                "source", reason="UNKNOWN_COHORT")
            if cohort.disabled:
                raise FailedPrecondition(f"cohort '{cohort_key[:64]}' is disabled", reason="COHORT_DISABLED")
            snapshot_pk = self._new_snapshot(session, source, cohort, mode, PUSHED, snapshot_us, snapshot_id,
                                             fingerprint).id
            guard = self.guard_of(source)
            default_type = cohort.member_identifier_type or default_member_type(source.kind)
        if mode == FULL and expected_count and expected_count != len(members):
            self.engine.fail(snapshot_pk, f"expected {expected_count} members, received {len(members)}")
        else:
            self.engine.apply(snapshot_pk, members, removals=removals, guard=guard if mode == FULL else None,
                              default_type=default_type)
        return self._reload(snapshot_pk)

    # -- held snapshots ----------------------------------------------------------------------------

    def confirm(self, source_id: str, snapshot_id: str, *, operator: str, discard: bool) -> CohortSnapshotRow:
        with self.db.transaction() as session:
            row = self.snapshot(session, source_id, snapshot_id)
            if row.status != HELD:
                raise FailedPrecondition(f"snapshot '{snapshot_id}' is {row.status}; only HELD snapshots can be "
                                         "confirmed or discarded", reason="SNAPSHOT_NOT_HELD")
            newer = session.execute(select(CohortSnapshotRow.id).where(
                CohortSnapshotRow.cohort_pk == row.cohort_pk, CohortSnapshotRow.id > row.id,
                CohortSnapshotRow.status == APPLIED)).first()
            if newer is not None and not discard:
                raise FailedPrecondition(f"a newer snapshot of cohort '{row.cohort_key}' has been applied since; "
                                         "discard this one", reason="SNAPSHOT_SUPERSEDED")
            row.operator = operator
            snapshot_pk = row.id
            if discard:
                row.status = DISCARDED
                session.execute(delete(HeldMemberRow).where(HeldMemberRow.snapshot_pk == row.id))
            else:
                members = self.engine.held_members(session, row.id)
                source = session.get(CohortSourceRow, row.source_pk)
                cohort = session.get(CohortImportRow, row.cohort_pk)
                assert source is not None
                default_type = (cohort.member_identifier_type if cohort else "") or default_member_type(source.kind)
        if not discard:
            self.engine.apply(snapshot_pk, members, guard=None, default_type=default_type)
        return self._reload(snapshot_pk)

    # -- Heap Segments Sync webhook ----------------------------------------------------------------

    def heap_webhook_secret(self, source_id: str) -> str:
        """The Segments Sync signing secret of HEAP_WEBHOOK source ``source_id``; NotFound otherwise."""
        with self.db.read() as session:
            row = session.execute(select(CohortSourceRow).where(CohortSourceRow.source_id == source_id)).scalar()
        if row is None or row.kind != HEAP_WEBHOOK:
            raise NotFound("no Heap webhook source at this path", reason="COHORT_SOURCE_NOT_FOUND")
        try:
            credentials = resolve_credentials(row.credentials_ref, self.environ)
        except CredentialsError:
            raise NotFound("the Heap webhook source has no usable secret", reason="COHORT_SOURCE_NOT_FOUND") from None
        secret = credentials.get("token") or credentials.get("secret", "")
        if not secret:  # anyone can sign with an empty key
            raise NotFound("the Heap webhook source has no usable secret", reason="COHORT_SOURCE_NOT_FOUND")
        return secret

    def apply_heap_sync(self, source_id: str, payload: Mapping[str, Any], received_us: int) -> dict[str, Any]:
        """Apply one verified Segments Sync delivery: a page of additions and removals
        (``segment.users.sync``, once per sync task and page) or a drain (the segment was
        turned off: every member removed). Returns a JSON-able summary."""
        action, segment_id, segment_name, info, add, remove = _parse_heap_payload(payload)
        with self.db.transaction() as session:
            source = self.get_source(session, source_id)
            if source.kind != HEAP_WEBHOOK:
                raise NotFound("no Heap webhook source at this path", reason="COHORT_SOURCE_NOT_FOUND")
            cohort = next((c for c in self.imports(session, source.id) if c.cohort_key == segment_id), None)
            if cohort is None:
                if source.settings.get("auto_add_segments") is False:
                    return {"status": "ignored", "reason": f"segment {segment_id[:64]} is not configured"}
                cohort = CohortImportRow(source_pk=source.id, cohort_key=segment_id,
                                         trait_name=default_trait_name(HEAP_WEBHOOK, segment_id, segment_name),
                                         display_name=segment_name[:256], member_identifier_type="",
                                         disabled=False, position=len(self.imports(session, source.id)),
                                         member_count=0)
                session.add(cohort)
                try:
                    session.flush()
                except IntegrityError:
                    raise FailedPrecondition("the segment's default trait name is taken by another cohort; "
                                             "configure this segment with its own trait_name",
                                             reason="TRAIT_NAME_TAKEN") from None
            if cohort.disabled:
                return {"status": "ignored", "reason": "the segment is disabled"}
            task, page = (info["sync_task_id"], info["page_number"]) if action == HEAP_ACTIONS[0] else (
                str(info.get("sync_task_id") or f"drain-{received_us}"), 0)
            seen = session.execute(select(HeapSyncPageRow).where(
                HeapSyncPageRow.source_pk == source.id, HeapSyncPageRow.segment_id == segment_id,
                HeapSyncPageRow.sync_task_id == task, HeapSyncPageRow.page_number == page,
                HeapSyncPageRow.action == action)).scalar()
            if seen is not None:
                previous = session.get(CohortSnapshotRow, seen.snapshot_pk)
                if previous is not None and previous.status != RECEIVING:
                    return {"status": "duplicate", "snapshot": previous.snapshot_id}
                snapshot_pk = seen.snapshot_pk
            else:
                mode = DELTA if action == HEAP_ACTIONS[0] else FULL
                digest = hashlib.sha256(f"{segment_id}/{task}/{page}/{action}".encode()).hexdigest()[:24]
                snapshot = self._new_snapshot(session, source, cohort, mode, WEBHOOK, received_us, f"heap-{digest}")
                session.add(HeapSyncPageRow(source_pk=source.id, segment_id=segment_id, sync_task_id=task,
                                            page_number=page, action=action, snapshot_pk=snapshot.id,
                                            received_us=received_us))
                snapshot_pk = snapshot.id
            member_type = cohort.member_identifier_type or default_member_type(HEAP_WEBHOOK)
        adds = [Member(((member_type, v),)) for v in add]
        removes = [Member(((member_type, v),)) for v in remove]
        outcome = self.engine.apply(snapshot_pk, adds, removals=removes, guard=None, default_type=member_type)
        snapshot = self._reload(snapshot_pk)
        return {"status": outcome.status.lower(), "snapshot": snapshot.snapshot_id, "added": outcome.added,
                "removed": outcome.removed, "members": outcome.member_count}

    # -- scheduled jobs ----------------------------------------------------------------------------

    def schedules(self, session: Session) -> list[tuple[str, str, list[str]]]:
        """(source_id, schedule, cohort keys) for every pulled source's enabled cohorts, grouped by schedule."""
        out: list[tuple[str, str, list[str]]] = []
        sources = session.execute(select(CohortSourceRow).where(CohortSourceRow.kind.in_(PULLED))
                                  .order_by(CohortSourceRow.source_id)).scalars()
        for source in sources:
            groups: dict[str, list[str]] = {}
            for cohort in self.imports(session, source.id):
                if not cohort.disabled:
                    groups.setdefault(cohort.schedule or self.default_schedule, []).append(cohort.cohort_key)
            out.extend((source.source_id, schedule, keys) for schedule, keys in groups.items())
        return out


def _parse_heap_payload(payload: Mapping[str, Any]) -> tuple[str, str, str, dict[str, Any], list[str], list[str]]:
    """(action, segment id, segment name, sync info, added IDs, removed IDs) of a Segments Sync
    body; :class:`InvalidArgument` naming the field otherwise."""
    if not isinstance(payload, Mapping):
        raise InvalidArgument.for_field("body", "must be a JSON object", reason="INVALID_PAYLOAD")
    action = payload.get("action_type")
    if action not in HEAP_ACTIONS:
        raise InvalidArgument.for_field("action_type", f"must be one of {', '.join(HEAP_ACTIONS)}",
                                        reason="UNKNOWN_ACTION")
    data = payload.get("data")
    if not isinstance(data, Mapping):
        raise InvalidArgument.for_field("data", "is required", reason="REQUIRED")
    segment = data.get("segment")
    if not isinstance(segment, Mapping) or not isinstance(segment.get("id"), (str, int)) or segment.get("id") == "":
        raise InvalidArgument.for_field("data.segment.id", "is required", reason="REQUIRED")
    segment_id = str(segment["id"])[:MAX_KEY_LENGTH]
    name = str(segment.get("name") or "")
    info: dict[str, Any] = {}
    raw_info = data.get("sync_info")
    if action == HEAP_ACTIONS[0]:
        if not isinstance(raw_info, Mapping):
            raise InvalidArgument.for_field("data.sync_info", "is required", reason="REQUIRED")
        task = raw_info.get("sync_task_id")
        page = raw_info.get("page_number")
        if not isinstance(task, (str, int)) or str(task) == "":
            raise InvalidArgument.for_field("data.sync_info.sync_task_id", "is required", reason="REQUIRED")
        if not isinstance(page, int) or isinstance(page, bool) or page < 0:
            raise InvalidArgument.for_field("data.sync_info.page_number", "must be a non-negative integer",
                                            reason="INVALID_FORMAT")
        info = {"sync_task_id": str(task)[:128], "page_number": page, "total_pages": raw_info.get("total_pages")}
    elif isinstance(raw_info, Mapping):
        info = {"sync_task_id": str(raw_info.get("sync_task_id") or "")[:128]}
    lists: list[list[str]] = []
    for name_ in ("add", "remove"):
        items = data.get(name_) or []
        if not isinstance(items, list) or len(items) > MAX_WEBHOOK_IDS:
            raise InvalidArgument.for_field(f"data.{name_}", f"must be a list of at most {MAX_WEBHOOK_IDS} users",
                                            reason="INVALID_FORMAT")
        ids = []
        for i, item in enumerate(items):
            value = item.get("id") if isinstance(item, Mapping) else None
            if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
                raise InvalidArgument.for_field(f"data.{name_}[{i}].id", "is required", reason="REQUIRED")
            if len(str(value)) > 255:
                raise InvalidArgument.for_field(f"data.{name_}[{i}].id", "must be at most 255 characters",
                                                reason="TOO_LONG")
            ids.append(str(value).strip())
        lists.append(ids)
    if action == HEAP_ACTIONS[1] and (lists[0] or lists[1]):
        raise InvalidArgument.for_field("data", "a drain carries no users", reason="INVALID_PAYLOAD")
    return str(action), segment_id, name, info, lists[0], lists[1]
