"""CohortService: cohort sources, their pulls, pushed snapshots and snapshot history.

Translates requests into :mod:`audiences.cohorts.service` calls and rows back into
messages. Mutations are idempotent by ``request_id``; a pushed snapshot is idempotent by
its ``snapshot_id``. Pulls and imports run outside any request transaction (a pull writes
its RECEIVING snapshot first, so a failed pull stays in the history).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
from sqlalchemy import select
from sqlalchemy.orm import Session

from audiences.cohorts.models import CohortImportRow, CohortSnapshotRow, CohortSourceRow
from audiences.cohorts.service import KINDS, ImportConfig, SourceConfig
from audiences.cohorts.snapshots import DELTA, FULL, Member
from audiences.outbox import now_us
from identity.sightings import prepare_identifiers
from server.app import Application
from server.filters import parse_filter
from server.pagination import page_request
from server.servicers.destinations import settings_from_struct
from server.servicers.timestamps import timestamp_pb
from stitchgraph.errors import FieldViolation, InvalidArgument
from stitchgraph.idempotency import remember, replay_or_none, run_idempotent
from stitchgraph.v1 import cohort_service_pb2, cohort_service_pb2_grpc, cohorts_pb2

pb = cohort_service_pb2
logger = logging.getLogger("stitchgraph.cohorts")
_SERVICE = "/stitchgraph.v1.CohortService/"
MUTABLE_FIELDS = ("display_name", "description", "settings", "credentials_ref", "cohorts", "snapshot_guard")
_OUTPUT_ONLY = ("name", "etag", "create_time", "update_time")
MAX_CHUNK_IDS = 10_000
MAX_SNAPSHOT_MEMBERS = 5_000_000


def config_from_pb(message: cohorts_pb2.CohortSource) -> SourceConfig:
    kind = ""
    if message.kind:
        try:
            kind = cohorts_pb2.CohortSourceKind.Name(message.kind).removeprefix("COHORT_SOURCE_KIND_")
        except ValueError:
            kind = f"<{message.kind}>"
    settings = settings_from_struct(message.settings)
    return SourceConfig(
        kind=kind, display_name=message.display_name, description=message.description, settings=settings,
        credentials_ref=message.credentials_ref,
        cohorts=tuple(ImportConfig(c.cohort_key, c.trait_name, c.schedule, c.display_name, c.member_identifier_type,
                                   c.disabled) for c in message.cohorts),
        max_removed_percent=message.snapshot_guard.max_removed_percent,
        empty_hold_min_members=message.snapshot_guard.empty_hold_min_members)


def _config_of(row: CohortSourceRow, imports: list[CohortImportRow]) -> SourceConfig:
    return SourceConfig(kind=row.kind, display_name=row.display_name, description=row.description,
                        settings=dict(row.settings or {}), credentials_ref=row.credentials_ref,
                        cohorts=tuple(ImportConfig(c.cohort_key, c.trait_name, c.schedule, c.display_name,
                                                   c.member_identifier_type, c.disabled) for c in imports),
                        max_removed_percent=row.max_removed_percent,
                        empty_hold_min_members=row.empty_hold_min_members)


def source_pb(row: CohortSourceRow, imports: list[CohortImportRow], snapshot_ids: dict[int, str]
              ) -> cohorts_pb2.CohortSource:
    message = cohorts_pb2.CohortSource(
        name=f"cohortSources/{row.source_id}",
        kind=cohorts_pb2.CohortSourceKind.Value("COHORT_SOURCE_KIND_" + row.kind),  # type: ignore[arg-type]
        display_name=row.display_name, description=row.description, credentials_ref=row.credentials_ref,
        etag=row.etag, create_time=timestamp_pb(row.create_time), update_time=timestamp_pb(row.update_time),
        snapshot_guard=cohorts_pb2.SnapshotGuard(max_removed_percent=row.max_removed_percent,
                                                 empty_hold_min_members=row.empty_hold_min_members),
        cohorts=[cohorts_pb2.CohortImport(
            cohort_key=c.cohort_key, trait_name=c.trait_name, schedule=c.schedule, display_name=c.display_name,
            member_identifier_type=c.member_identifier_type, disabled=c.disabled,
            last_snapshot=(f"cohortSources/{row.source_id}/snapshots/{snapshot_ids[c.last_snapshot_pk]}"
                           if c.last_snapshot_pk in snapshot_ids else "")) for c in imports])
    if row.settings:
        message.settings.update(row.settings)
    return message


def snapshot_pb(row: CohortSnapshotRow, source_id: str) -> cohorts_pb2.CohortSnapshot:
    message = cohorts_pb2.CohortSnapshot(
        name=f"cohortSources/{source_id}/snapshots/{row.snapshot_id}", cohort=row.cohort_key,
        mode=cohorts_pb2.SnapshotMode.Value("SNAPSHOT_MODE_" + row.mode),  # type: ignore[arg-type]
        status=cohorts_pb2.CohortSnapshotStatus.Value("COHORT_SNAPSHOT_STATUS_" + row.status),  # type: ignore[arg-type]
        member_count=row.member_count, added_count=row.added_count, removed_count=row.removed_count,
        create_time=timestamp_pb(row.create_time), error=row.error, trait_name=row.trait_name,
        trigger=cohorts_pb2.CohortSnapshotTrigger.Value(  # type: ignore[arg-type]
            "COHORT_SNAPSHOT_TRIGGER_" + row.trigger),
        new_identifier_count=row.new_identifier_count, ignored_count=row.ignored_count, operator=row.operator)
    message.snapshot_time.FromMicroseconds(row.snapshot_us)
    if row.apply_time is not None:
        message.apply_time.CopyFrom(timestamp_pb(row.apply_time))
    return message


def parse_source_name(name: str, field: str = "name") -> str:
    source_id = name.removeprefix("cohortSources/")
    if not name.startswith("cohortSources/") or not source_id or "/" in source_id or len(source_id) > 63:
        raise InvalidArgument.for_field(field, "must be a cohort source name like 'cohortSources/{id}'",
                                        reason="INVALID_NAME")
    return source_id


def parse_snapshot_name(name: str, field: str = "name") -> tuple[str, str]:
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "cohortSources" or parts[2] != "snapshots" or not parts[1] or not parts[3]:
        raise InvalidArgument.for_field(field, "must be a snapshot name like 'cohortSources/{id}/snapshots/{id}'",
                                        reason="INVALID_NAME")
    return parts[1], parts[3]


class CohortServicer(cohort_service_pb2_grpc.CohortServiceServicer):
    def __init__(self, app: Application) -> None:
        self._app = app
        self._db = app.db
        self._cohorts = app.cohorts

    def _mutate(self, method: str, request: Any, response_type: Any, op: Any) -> Any:
        return run_idempotent(self._db, _SERVICE + method, request, response_type, op)

    def _source_pb(self, session: Session, row: CohortSourceRow) -> cohorts_pb2.CohortSource:
        imports = self._cohorts.imports(session, row.id)
        pks = [c.last_snapshot_pk for c in imports if c.last_snapshot_pk is not None]
        ids = dict(session.execute(select(CohortSnapshotRow.id, CohortSnapshotRow.snapshot_id)
                                   .where(CohortSnapshotRow.id.in_(pks))).all()) if pks else {}
        return source_pb(row, imports, ids)

    # -- configuration ---------------------------------------------------------------------------

    def CreateCohortSource(self, request: Any, context: grpc.ServicerContext) -> Any:
        config = config_from_pb(request.cohort_source)
        self._cohorts.validate(config)

        def op(session: Session) -> Any:
            row = self._cohorts.create_source(session, config, request.cohort_source_id)
            logger.info("cohort source %s (%s) created", row.source_id, row.kind)
            return pb.CreateCohortSourceResponse(cohort_source=self._source_pb(session, row))

        response = self._mutate("CreateCohortSource", request, pb.CreateCohortSourceResponse, op)
        self._cohorts.changed()
        return response

    def GetCohortSource(self, request: Any, context: grpc.ServicerContext) -> Any:
        source_id = parse_source_name(request.name)
        with self._db.read() as session:
            row = self._cohorts.get_source(session, source_id)
            return pb.GetCohortSourceResponse(cohort_source=self._source_pb(session, row))

    def ListCohortSources(self, request: Any, context: grpc.ServicerContext) -> Any:
        comparisons = parse_filter(request.filter, ("kind", "display_name"))
        for c in comparisons:
            if c.field == "kind":
                value = c.value.upper().removeprefix("COHORT_SOURCE_KIND_")
                if value not in KINDS:
                    raise InvalidArgument.for_field("filter", f"kind must be one of {', '.join(KINDS)}",
                                                    reason="INVALID_FILTER")
        page = page_request(request.page_size, request.page_token, request.filter)
        with self._db.read() as session:
            rows = list(session.execute(select(CohortSourceRow)).scalars())
            rows = [r for r in rows if all(
                c.apply(getattr(r, c.field), c.value.upper().removeprefix("COHORT_SOURCE_KIND_") if c.field == "kind"
                        else c.value) for c in comparisons)]
            rows.sort(key=lambda r: (r.display_name, r.source_id))
            if page.after is not None:
                after = (str(page.after[0]), str(page.after[1]))
                rows = [r for r in rows if (r.display_name, r.source_id) > after]
            more = len(rows) > page.size
            rows = rows[:page.size]
            token = page.next_token([rows[-1].display_name, rows[-1].source_id], request.filter) if more else ""
            return pb.ListCohortSourcesResponse(cohort_sources=[self._source_pb(session, r) for r in rows],
                                                next_page_token=token)

    def UpdateCohortSource(self, request: Any, context: grpc.ServicerContext) -> Any:
        message = request.cohort_source
        source_id = parse_source_name(message.name, "cohort_source.name")
        paths = list(request.update_mask.paths)
        for i, path in enumerate(paths):
            if path == "kind":
                raise InvalidArgument.for_field(f"update_mask.paths[{i}]", "kind is immutable",
                                                reason="IMMUTABLE_FIELD")
            if path != "*" and path not in MUTABLE_FIELDS:
                raise InvalidArgument.for_field(f"update_mask.paths[{i}]", f"{path[:64]!r} is not a mutable field; "
                                                f"use {', '.join(MUTABLE_FIELDS)} or *", reason="NOT_MUTABLE")
        incoming = config_from_pb(message)
        if "*" in paths:
            fields: tuple[str, ...] = MUTABLE_FIELDS
        elif paths:
            fields = tuple(dict.fromkeys(paths))
        else:
            fields = tuple(f for f in MUTABLE_FIELDS if (
                len(message.settings.fields) if f == "settings" else message.HasField("snapshot_guard")
                if f == "snapshot_guard" else len(getattr(message, f))))

        def op(session: Session) -> Any:
            row = self._cohorts.get_source(session, source_id)
            self._cohorts.check_etag(row, message.etag)
            if incoming.kind and incoming.kind != row.kind:
                raise InvalidArgument.for_field("cohort_source.kind", "is immutable", reason="IMMUTABLE_FIELD")
            current = _config_of(row, self._cohorts.imports(session, row.id))
            changes: dict[str, Any] = {}
            for f in fields:
                if f == "snapshot_guard":
                    changes["max_removed_percent"] = incoming.max_removed_percent
                    changes["empty_hold_min_members"] = incoming.empty_hold_min_members
                else:
                    changes[f] = getattr(incoming, f)
            updated = replace(current, **changes)
            self._cohorts.validate(updated)
            row = self._cohorts.update_source(session, row, updated)
            return pb.UpdateCohortSourceResponse(cohort_source=self._source_pb(session, row))

        response = self._mutate("UpdateCohortSource", request, pb.UpdateCohortSourceResponse, op)
        self._cohorts.changed()
        return response

    def DeleteCohortSource(self, request: Any, context: grpc.ServicerContext) -> Any:
        source_id = parse_source_name(request.name)

        def op(session: Session) -> Any:
            row = self._cohorts.get_source(session, source_id)
            self._cohorts.check_etag(row, request.etag)
            response = pb.DeleteCohortSourceResponse(cohort_source=self._source_pb(session, row))
            self._cohorts.delete_source(session, row, remove_traits=request.remove_traits)
            return response

        response = self._mutate("DeleteCohortSource", request, pb.DeleteCohortSourceResponse, op)
        self._cohorts.changed()
        self._app.after_write()
        return response

    # -- imports -----------------------------------------------------------------------------------

    def SyncCohortSource(self, request: Any, context: grpc.ServicerContext) -> Any:
        source_id = parse_source_name(request.name)

        def op(_session: Session) -> Any:
            rows = self._cohorts.sync(source_id, list(request.cohort_keys))
            return pb.SyncCohortSourceResponse(snapshots=[snapshot_pb(r, source_id) for r in rows])

        # The pull must not run inside the idempotency transaction (it commits on its own).
        response = self._run_outside("SyncCohortSource", request, pb.SyncCohortSourceResponse, op)
        self._app.after_write()
        return response

    def _run_outside(self, method: str, request: Any, response_type: Any, op: Any) -> Any:
        """run_idempotent semantics for an operation that commits its own transactions: a
        repeat of ``request_id`` returns the recorded response; otherwise run, then record."""
        previous = replay_or_none(self._db, _SERVICE + method, request, response_type)
        if previous is not None:
            return previous
        response = op(None)
        remember(self._db, _SERVICE + method, request, response)
        return response

    def ImportCohortSnapshot(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument.for_field("header", "the first message must be the header", reason="REQUIRED")
        header = first.header
        source_id = parse_source_name(header.source, "header.source")
        violations = []
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", header.snapshot_id):
            violations.append(("header.snapshot_id", "must be 1 to 63 characters of [a-z0-9-]"))
        if not header.cohort:
            violations.append(("header.cohort", "is required"))
        if header.mode not in (cohorts_pb2.SNAPSHOT_MODE_FULL, cohorts_pb2.SNAPSHOT_MODE_DELTA):
            violations.append(("header.mode", "must be FULL or DELTA"))
        if header.expected_member_count < 0:
            violations.append(("header.expected_member_count", "must not be negative"))
        if violations:
            raise InvalidArgument("; ".join(f"{f}: {d}" for f, d in violations),
                                  violations=[FieldViolation(f, d, "INVALID_ARGUMENT") for f, d in violations])
        mode = FULL if header.mode == cohorts_pb2.SNAPSHOT_MODE_FULL else DELTA
        with self._db.read() as session:
            policy = self._app.identity.policy(session)
        members: dict[tuple[str, str], Member] = {}
        removals: dict[tuple[str, str], Member] = {}
        ignored = 0
        for index, message in enumerate(request_iterator, start=1):
            if message.WhichOneof("payload") != "chunk":
                raise InvalidArgument.for_field(f"messages[{index}]", "only the first message may be a header",
                                                reason="UNEXPECTED_HEADER")
            chunk = message.chunk
            if len(chunk.members) > MAX_CHUNK_IDS or len(chunk.removals) > MAX_CHUNK_IDS:
                raise InvalidArgument.for_field(f"messages[{index}].chunk", f"at most {MAX_CHUNK_IDS} members and "
                                                f"{MAX_CHUNK_IDS} removals per chunk", reason="CHUNK_TOO_LARGE")
            if chunk.removals and mode == FULL:
                raise InvalidArgument.for_field(f"messages[{index}].chunk.removals", "a FULL snapshot has no "
                                                "removals", reason="NOT_ALLOWED")
            for target, items, name in ((members, chunk.members, "members"), (removals, chunk.removals, "removals")):
                kept, junk, _ = prepare_identifiers(policy, [(i.type, i.value) for i in items],
                                                    field_prefix=f"messages[{index}].chunk.{name}")
                ignored += len(junk)
                for n in kept:
                    target.setdefault((n.identifier.type, n.identifier.value),
                                      Member(((n.identifier.type, n.identifier.value),)))
            if len(members) + len(removals) > MAX_SNAPSHOT_MEMBERS:
                raise InvalidArgument.for_field("chunk", f"a snapshot has at most {MAX_SNAPSHOT_MEMBERS} members",
                                                reason="SNAPSHOT_TOO_LARGE")
        snapshot_us = (header.snapshot_time.ToMicroseconds() if header.HasField("snapshot_time")
                       else None)
        if snapshot_us is None:
            snapshot_us = now_us()
        fingerprint = hashlib.sha256(header.SerializeToString(deterministic=True)).hexdigest()
        row = self._cohorts.import_pushed(
            source_id=source_id, snapshot_id=header.snapshot_id, cohort_key=header.cohort, mode=mode,
            snapshot_us=snapshot_us, expected_count=header.expected_member_count, members=list(members.values()),
            removals=list(removals.values()), fingerprint=fingerprint)
        if ignored and row.ignored_count < ignored:
            row.ignored_count += ignored
        self._app.after_write()
        return pb.ImportCohortSnapshotResponse(snapshot=snapshot_pb(row, source_id))

    # -- history -----------------------------------------------------------------------------------

    def ListCohortSnapshots(self, request: Any, context: grpc.ServicerContext) -> Any:
        source_id = "-" if request.parent == "cohortSources/-" else parse_source_name(request.parent, "parent")
        query_key = f"{request.parent}|{request.cohort}|{request.status}"
        page = page_request(request.page_size, request.page_token, query_key)
        with self._db.read() as session:
            query = select(CohortSnapshotRow, CohortSourceRow.source_id).join(
                CohortSourceRow, CohortSourceRow.id == CohortSnapshotRow.source_pk)
            if source_id != "-":
                query = query.where(CohortSourceRow.id == self._cohorts.get_source(session, source_id).id)
            if request.cohort:
                query = query.where(CohortSnapshotRow.cohort_key == request.cohort)
            if request.status:
                status = cohorts_pb2.CohortSnapshotStatus.Name(request.status).removeprefix(
                    "COHORT_SNAPSHOT_STATUS_")
                query = query.where(CohortSnapshotRow.status == status)
            if page.after is not None:
                query = query.where(CohortSnapshotRow.id < int(page.after))
            rows = session.execute(query.order_by(CohortSnapshotRow.id.desc()).limit(page.size + 1)).all()
        more = len(rows) > page.size
        rows = rows[:page.size]
        token = page.next_token(rows[-1][0].id, query_key) if more else ""
        return pb.ListCohortSnapshotsResponse(snapshots=[snapshot_pb(r, sid) for r, sid in rows],
                                              next_page_token=token)

    def GetCohortSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        source_id, snapshot_id = parse_snapshot_name(request.name)
        with self._db.read() as session:
            return pb.GetCohortSnapshotResponse(snapshot=snapshot_pb(
                self._cohorts.snapshot(session, source_id, snapshot_id), source_id))

    def ConfirmCohortSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        source_id, snapshot_id = parse_snapshot_name(request.name)
        if not request.operator or len(request.operator) > 256:
            raise InvalidArgument.for_field("operator", "is required, at most 256 characters", reason="REQUIRED")
        if len(request.reason) > 1024:
            raise InvalidArgument.for_field("reason", "must be at most 1024 characters", reason="TOO_LONG")

        def op(_session: Session | None) -> Any:
            row = self._cohorts.confirm(source_id, snapshot_id, operator=request.operator, discard=request.discard)
            logger.info("snapshot %s/%s %s by %s: %s", source_id, snapshot_id, row.status, request.operator,
                        request.reason or "(no reason given)")
            return pb.ConfirmCohortSnapshotResponse(snapshot=snapshot_pb(row, source_id))

        response = self._run_outside("ConfirmCohortSnapshot", request, pb.ConfirmCohortSnapshotResponse, op)
        self._app.after_write()
        return response
