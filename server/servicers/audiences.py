"""AudienceService: audiences as rules, their preview and explanation, membership and deltas."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message
from sqlalchemy import Table, and_, delete, func, select, true
from sqlalchemy.orm import Session

from audiences.destinations import KINDS, DestinationRow
from audiences.engine import ACTIVE, BUILDING, PAUSED, AudienceEngine, DestinationGate
from audiences.explain import explain_person
from audiences.models import (
    AudienceDeltaRow,
    AudienceDestinationMemberRow,
    AudienceDestinationRow,
    AudienceMemberRow,
    AudienceRow,
)
from audiences.rules import Diagnostic, RuleAnalysis
from audiences.rules.compiler import PersonSet, all_of, count_query, population_query
from identity.models import PersonRow
from identity.queries import person_view, require_person_pk
from server.app import Application
from server.filters import parse_filter
from server.pagination import page_request
from server.servicers.consent import destination_consent_pb, load_destinations
from server.servicers.identity import parse_person_name, person_pb
from server.servicers.timestamps import datetime_us, micros_pb, timestamp_pb
from stitchgraph.errors import Aborted, AlreadyExists, FieldViolation, InvalidArgument, NotFound
from stitchgraph.idempotency import run_idempotent
from stitchgraph.v1 import audience_service_pb2, audience_service_pb2_grpc, audiences_pb2

pb = audience_service_pb2
R = TypeVar("R", bound=Message)
_SERVICE = "/stitchgraph.v1.AudienceService/"
_ID_RE = re.compile(r"[a-z][a-z0-9-]{0,62}")
MAX_RULE_BYTES = 16 * 1024
MUTABLE = ("display_name", "description", "rule", "destinations", "state", "labels")
_STATES = {audiences_pb2.AUDIENCE_STATE_ACTIVE: ACTIVE, audiences_pb2.AUDIENCE_STATE_PAUSED: PAUSED}
_STATE_PB = {ACTIVE: audiences_pb2.AUDIENCE_STATE_ACTIVE, PAUSED: audiences_pb2.AUDIENCE_STATE_PAUSED,
             BUILDING: audiences_pb2.AUDIENCE_STATE_BUILDING}
_KIND_PB = {"ADD": audiences_pb2.AUDIENCE_DELTA_KIND_ADD, "REMOVE": audiences_pb2.AUDIENCE_DELTA_KIND_REMOVE}


def diagnostic_pb(d: Diagnostic) -> audiences_pb2.RuleDiagnostic:
    return audiences_pb2.RuleDiagnostic(
        severity=audiences_pb2.DIAGNOSTIC_SEVERITY_ERROR if d.severity == "ERROR"
        else audiences_pb2.DIAGNOSTIC_SEVERITY_WARNING,
        code=d.code, message=d.message, line=d.span.line, column=d.span.column, end_line=d.span.end_line,
        end_column=d.span.end_column, hint=d.hint)


def rule_error(analysis: RuleAnalysis, field: str) -> InvalidArgument:
    """INVALID_ARGUMENT for a rule that does not parse or type-check, with positions."""
    violations = [FieldViolation(field, f"line {d.span.line}, column {d.span.column}: {d.message}"
                                 + (f" (hint: {d.hint})" if d.hint else ""), d.code) for d in analysis.errors]
    first = analysis.errors[0]
    return InvalidArgument(f"{field}: invalid rule at line {first.span.line}, column {first.span.column}: "
                           f"{first.message}", violations=violations, reason="INVALID_RULE",
                           metadata={"line": str(first.span.line), "column": str(first.span.column),
                                     "code": first.code})


def parse_audience_name(name: str, field: str = "name") -> str:
    audience_id = name.removeprefix("audiences/")
    if not _ID_RE.fullmatch(audience_id):
        raise InvalidArgument.for_field(field, "must be an audience resource name like 'audiences/cart-abandoners'")
    return audience_id


def require_audience(session: Session, name: str, field: str = "name") -> AudienceRow:
    audience_id = parse_audience_name(name, field)
    row = session.execute(select(AudienceRow).where(AudienceRow.audience_id == audience_id)
                          .execution_options(populate_existing=True)).scalar()
    if row is None:
        raise NotFound(f"audience '{audience_id}' not found", reason="AUDIENCE_NOT_FOUND", metadata={"field": field})
    return row


class AudienceServicer(audience_service_pb2_grpc.AudienceServiceServicer):
    def __init__(self, app: Application) -> None:
        self._app = app
        self._db = app.db
        self._engine: AudienceEngine = app.audiences

    # -- helpers --------------------------------------------------------------------------

    def _mutate(self, method: str, request: Any, response_type: type[R], op: Any) -> R:
        self._engine.process_changes()  # evaluate against current views
        response = run_idempotent(self._db, _SERVICE + method, request, response_type, op)
        self._app.after_write()
        return response

    def _destinations_of(self, session: Session, audience_pk: int) -> list[DestinationRow]:
        return list(session.execute(
            select(DestinationRow)
            .join(AudienceDestinationRow, AudienceDestinationRow.destination_pk == DestinationRow.id)
            .where(AudienceDestinationRow.audience_pk == audience_pk).order_by(AudienceDestinationRow.position))
            .scalars())

    def _stats(self, session: Session, audience: AudienceRow) -> list[audiences_pb2.AudienceDestinationStats]:
        members = self._members_set(audience)
        return [self._gate_stats(session, DestinationGate.of(d, self._engine.configured_purposes()), members)
                for d in self._destinations_of(session, audience.id)]

    @staticmethod
    def _members_set(audience: AudienceRow) -> PersonSet:
        table = AudienceMemberRow.__table__
        return PersonSet(True, select(table.c.person_pk).where(table.c.audience_pk == audience.id))

    @staticmethod
    def _gate_stats(session: Session, gate: DestinationGate, members: PersonSet
                    ) -> audiences_pb2.AudienceDestinationStats:
        consent, keys = gate.consent_set(None), gate.key_set(None)
        eligible: int = session.execute(count_query(all_of([members, consent, keys]))).scalar_one()
        no_consent: int = session.execute(count_query(all_of([members, consent.flipped()]))).scalar_one()
        no_keys: int = session.execute(count_query(all_of([members, consent, keys.flipped()]))).scalar_one()
        return audiences_pb2.AudienceDestinationStats(
            destination=f"destinations/{gate.destination_id}", eligible_count=eligible,
            excluded_no_consent_count=no_consent, excluded_no_match_keys_count=no_keys)

    def _audience_pb(self, session: Session, row: AudienceRow, *, stats: bool = True) -> audiences_pb2.Audience:
        destinations = self._destinations_of(session, row.id)
        return audiences_pb2.Audience(
            name=f"audiences/{row.audience_id}", display_name=row.display_name, description=row.description,
            rule=row.rule, destinations=[f"destinations/{d.destination_id}" for d in destinations], etag=row.etag,
            state=_STATE_PB[row.state], member_count=row.member_count, create_time=timestamp_pb(row.create_time),
            update_time=timestamp_pb(row.update_time),
            last_evaluation_time=micros_pb(row.evaluated_us) if row.evaluated_us else None,
            destination_stats=self._stats(session, row) if stats else [], labels=dict(row.labels or {}))

    def _check(self, session: Session, audience: audiences_pb2.Audience, fields: tuple[str, ...],
               prefix: str = "audience") -> tuple[RuleAnalysis | None, list[DestinationRow]]:
        violations: list[FieldViolation] = []
        analysis = None
        if "display_name" in fields and not (1 <= len(audience.display_name) <= 256):
            violations.append(FieldViolation(f"{prefix}.display_name", "1 to 256 characters are required",
                                             "INVALID_DISPLAY_NAME"))
        if "description" in fields and len(audience.description) > 4096:
            violations.append(FieldViolation(f"{prefix}.description", "at most 4096 characters", "TOO_LONG"))
        if "labels" in fields:
            if len(audience.labels) > 64:
                violations.append(FieldViolation(f"{prefix}.labels", "at most 64 labels", "TOO_MANY_LABELS"))
            for key, value in audience.labels.items():
                if not (1 <= len(key) <= 63) or len(value) > 63:
                    violations.append(FieldViolation(f"{prefix}.labels", "label keys 1-63 and values at most 63 "
                                                     "characters", "INVALID_LABEL"))
                    break
        if "state" in fields and audience.state not in (audiences_pb2.AUDIENCE_STATE_UNSPECIFIED, *_STATES):
            violations.append(FieldViolation(f"{prefix}.state", "only ACTIVE or PAUSED can be set", "INVALID_STATE"))
        destinations: list[DestinationRow] = []
        if "destinations" in fields:
            seen = set()
            for i, name in enumerate(audience.destinations):
                destination_id = name.removeprefix("destinations/")
                row = session.execute(select(DestinationRow).where(
                    DestinationRow.destination_id == destination_id)).scalar()
                field = f"{prefix}.destinations[{i}]"
                if row is None:
                    violations.append(FieldViolation(field, f"destination '{destination_id}' does not exist",
                                                     "DESTINATION_NOT_FOUND"))
                elif not (KINDS[row.kind].audience or KINDS[row.kind].traits):
                    violations.append(FieldViolation(field, f"a {row.kind} destination cannot receive audiences",
                                                     "NOT_AN_AUDIENCE_DESTINATION"))
                elif row.id in seen:
                    violations.append(FieldViolation(field, "listed twice", "DUPLICATE_DESTINATION"))
                else:
                    seen.add(row.id)
                    destinations.append(row)
        if "rule" in fields:
            if not audience.rule.strip():
                violations.append(FieldViolation(f"{prefix}.rule", "is required", "EMPTY_RULE"))
            elif len(audience.rule.encode()) > MAX_RULE_BYTES:
                violations.append(FieldViolation(f"{prefix}.rule", "at most 16 KiB", "RULE_TOO_LONG"))
            else:
                analysis = self._engine.analyze(session, audience.rule)
                if not analysis.valid:
                    error = rule_error(analysis, f"{prefix}.rule")
                    if not violations:
                        raise error
                    violations += error.violations
        if violations:
            raise InvalidArgument("invalid audience", violations=violations)
        return analysis, destinations

    @staticmethod
    def _set_destinations(session: Session, audience_pk: int, destinations: list[DestinationRow]) -> None:
        session.execute(delete(AudienceDestinationRow).where(AudienceDestinationRow.audience_pk == audience_pk))
        if destinations:
            session.execute(cast(Table, AudienceDestinationRow.__table__).insert(), [
                {"audience_pk": audience_pk, "destination_pk": d.id, "position": i}
                for i, d in enumerate(destinations)])

    # -- CRUD -----------------------------------------------------------------------------

    def CreateAudience(self, request: Any, context: grpc.ServicerContext) -> Any:
        audience_id = request.audience_id or ""
        if audience_id and not _ID_RE.fullmatch(audience_id):
            raise InvalidArgument.for_field("audience_id", "1 to 63 characters of [a-z0-9-], starting with a letter")
        if not request.HasField("audience"):
            raise InvalidArgument.for_field("audience", "is required")

        def op(session: Session) -> Any:
            _, destinations = self._check(session, request.audience, MUTABLE)
            chosen = audience_id or "aud-" + uuid.uuid4().hex[:12]
            if session.execute(select(AudienceRow.id).where(AudienceRow.audience_id == chosen)).scalar():
                raise AlreadyExists(f"audience '{chosen}' already exists", reason="AUDIENCE_EXISTS",
                                    metadata={"field": "audience_id"})
            now = datetime.now(UTC)
            a = request.audience
            row = AudienceRow(audience_id=chosen, display_name=a.display_name, description=a.description, rule=a.rule,
                              state=PAUSED if a.state == audiences_pb2.AUDIENCE_STATE_PAUSED else BUILDING,
                              labels=dict(a.labels), etag=uuid.uuid4().hex, member_count=0, create_time=now,
                              update_time=now)
            session.add(row)
            session.flush()
            self._set_destinations(session, row.id, destinations)
            if row.state == BUILDING:
                self._engine.evaluate_in(session, row)
            return pb.CreateAudienceResponse(audience=self._audience_pb(session, row))

        return self._mutate("CreateAudience", request, pb.CreateAudienceResponse, op)

    def GetAudience(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._db.read() as session:
            return pb.GetAudienceResponse(audience=self._audience_pb(session, require_audience(session, request.name)))

    def ListAudiences(self, request: Any, context: grpc.ServicerContext) -> Any:
        comparisons = parse_filter(request.filter, ("display_name", "state", "destinations", "labels"))
        page = page_request(request.page_size, request.page_token, request.filter)
        with self._db.read() as session:
            rows = list(session.execute(select(AudienceRow).order_by(AudienceRow.display_name,
                                                                     AudienceRow.audience_id)).scalars())
            kept = []
            for row in rows:
                message = self._audience_pb(session, row, stats=False)
                if all(self._matches(message, c) for c in comparisons):
                    kept.append(row)
            offset = int(page.after or 0)
            chosen = kept[offset:offset + page.size]
            more = offset + page.size < len(kept)
            return pb.ListAudiencesResponse(
                audiences=[self._audience_pb(session, r) for r in chosen],
                next_page_token=page.next_token(offset + len(chosen), request.filter) if more else "")

    @staticmethod
    def _matches(message: audiences_pb2.Audience, c: Any) -> bool:
        if c.field == "display_name":
            return bool(c.apply(message.display_name, c.value))
        if c.field == "state":
            value = c.value.removeprefix("AUDIENCE_STATE_")
            return bool(c.apply(audiences_pb2.AudienceState.Name(message.state).removeprefix("AUDIENCE_STATE_"),
                                value))
        if c.field == "destinations":
            wanted = c.value if c.value.startswith("destinations/") else f"destinations/{c.value}"
            return bool((wanted in message.destinations) == (c.op == "="))
        key, _, value = c.value.partition(":")
        return bool((message.labels.get(key) == value) == (c.op == "="))

    def UpdateAudience(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.HasField("audience"):
            raise InvalidArgument.for_field("audience", "is required")
        a = request.audience
        paths = list(request.update_mask.paths)
        if paths == ["*"]:
            paths = list(MUTABLE)
        elif not paths:
            paths = [f for f in MUTABLE if (getattr(a, f) if f not in ("destinations", "labels")
                                            else len(getattr(a, f)))]
        unknown = [p for p in paths if p not in MUTABLE]
        if unknown:
            raise InvalidArgument.for_field("update_mask", f"cannot update {', '.join(unknown)}; mutable fields: "
                                            + ", ".join(MUTABLE), reason="INVALID_UPDATE_MASK")

        def op(session: Session) -> Any:
            row = require_audience(session, a.name, "audience.name")
            if a.etag and a.etag != row.etag:
                raise Aborted("the audience changed since it was read (stale etag); read it again",
                              reason="ETAG_MISMATCH", metadata={"field": "audience.etag"})
            _, destinations = self._check(session, a, tuple(paths))
            rule_changed = "rule" in paths and a.rule != row.rule
            for f in ("display_name", "description", "rule"):
                if f in paths:
                    setattr(row, f, getattr(a, f))
            if "labels" in paths:
                row.labels = dict(a.labels)
            old_state, new_state = row.state, row.state
            if "state" in paths and a.state in _STATES:
                new_state = _STATES[a.state]
            attached: list[int] = []
            if "destinations" in paths:
                before = {d.id for d in self._destinations_of(session, row.id)}
                after = {d.id for d in destinations}
                if before - after:
                    self._engine.detach(session, row, sorted(before - after), "DESTINATION_DETACHED")
                attached = sorted(after - before)
                self._set_destinations(session, row.id, destinations)
            row.state = new_state if new_state == PAUSED else (ACTIVE if old_state != BUILDING else BUILDING)
            row.etag = uuid.uuid4().hex
            row.update_time = datetime.now(UTC)
            session.flush()
            if row.state != PAUSED and (rule_changed or old_state in (PAUSED, BUILDING)):
                self._engine.evaluate_in(session, row)
            elif row.state != PAUSED and attached:
                self._engine.evaluate_in(session, row, add_reason="DESTINATION_ATTACHED")
            return pb.UpdateAudienceResponse(audience=self._audience_pb(session, row))

        return self._mutate("UpdateAudience", request, pb.UpdateAudienceResponse, op)

    def DeleteAudience(self, request: Any, context: grpc.ServicerContext) -> Any:
        def op(session: Session) -> Any:
            row = require_audience(session, request.name)
            if request.etag and request.etag != row.etag:
                raise Aborted("the audience changed since it was read (stale etag); read it again",
                              reason="ETAG_MISMATCH", metadata={"field": "etag"})
            message = self._audience_pb(session, row)
            if request.clear_destinations:
                self._engine.detach(session, row, [d.id for d in self._destinations_of(session, row.id)],
                                    "AUDIENCE_DELETED")
            for table in (AudienceDestinationMemberRow, AudienceMemberRow, AudienceDestinationRow):
                session.execute(delete(table).where(table.audience_pk == row.id))
            session.delete(row)
            return pb.DeleteAudienceResponse(audience=message)

        return self._mutate("DeleteAudience", request, pb.DeleteAudienceResponse, op)

    # -- rules ----------------------------------------------------------------------------

    def ValidateAudienceRule(self, request: Any, context: grpc.ServicerContext) -> Any:
        if len(request.rule.encode()) > MAX_RULE_BYTES:
            raise InvalidArgument.for_field("rule", "at most 16 KiB", reason="RULE_TOO_LONG")
        with self._db.read() as session:
            analysis = self._engine.analyze(session, request.rule)
        return pb.ValidateAudienceRuleResponse(
            valid=analysis.valid, diagnostics=[diagnostic_pb(d) for d in analysis.diagnostics],
            referenced_traits=list(analysis.traits), referenced_cohorts=list(analysis.cohorts),
            referenced_events=list(analysis.events), referenced_purposes=list(analysis.purposes))

    def PreviewAudience(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.rule and not request.audience:
            raise InvalidArgument.for_field("rule", "give a rule or an audience")
        if len(request.rule.encode()) > MAX_RULE_BYTES:
            raise InvalidArgument.for_field("rule", "at most 16 KiB", reason="RULE_TOO_LONG")
        sample_size = min(max(request.sample_size or 10, 1), 100)
        self._engine.process_changes()
        now = self._engine.clock()
        with self._db.read() as session:
            audience = require_audience(session, request.audience, "audience") if request.audience else None
            text = request.rule or (audience.rule if audience else "")
            compiled, analysis = self._engine.compile_text(session, text)
            if compiled is None:
                raise rule_error(analysis, "rule")
            if request.destinations:
                destinations = load_destinations(session, list(request.destinations))
            else:
                destinations = self._destinations_of(session, audience.id) if audience else []
            matched = compiled.sets(datetime_us(now))
            count: int = session.execute(count_query(matched)).scalar_one()
            sample_ids = list(session.execute(
                select(PersonRow.id).where(PersonRow.id.in_(population_query(matched)))
                .order_by(PersonRow.person_id).limit(sample_size)).scalars())
            stats = [self._gate_stats(session, DestinationGate.of(d, self._engine.configured_purposes()), matched)
                     for d in destinations]
            return pb.PreviewAudienceResponse(
                member_count=count, sample=[person_pb(person_view(session, pk)) for pk in sample_ids],
                destination_stats=stats,
                diagnostics=[diagnostic_pb(d) for d in analysis.diagnostics if d.severity != "ERROR"],
                evaluation_time=timestamp_pb(now))

    def CheckEligibility(self, request: Any, context: grpc.ServicerContext) -> Any:
        person_id = parse_person_name(request.person, "person")
        self._engine.process_changes()
        now = self._engine.clock()
        with self._db.read() as session:
            audience = require_audience(session, request.audience, "audience")
            pk = require_person_pk(session, person_id, "person")
            if request.destinations:
                destinations = load_destinations(session, list(request.destinations))
            else:
                destinations = self._destinations_of(session, audience.id)
            report = explain_person(session, self._engine, audience, pk, destinations, datetime_us(now))
            current_id = session.execute(select(PersonRow.person_id).where(PersonRow.id == pk)).scalar_one()
            return pb.CheckEligibilityResponse(
                person=f"persons/{current_id}", rule_matched=report.rule_matched,
                clauses=[audiences_pb2.RuleClauseResult(text=c.text, line=c.line, column=c.column, matched=c.matched,
                                                        observed=c.observed) for c in report.clauses],
                destinations=[audiences_pb2.DestinationEligibility(
                    destination=f"destinations/{d.destination.destination_id}", eligible=d.eligible,
                    consent=destination_consent_pb(d.destination, d.consent),
                    available_match_keys=list(d.match_keys), reason=d.reason,
                    member_at_destination=d.member_at_destination, explanation=d.explanation)
                    for d in report.destinations],
                member=report.member, evaluation_time=timestamp_pb(now))

    # -- membership -----------------------------------------------------------------------

    def ListAudienceMembers(self, request: Any, context: grpc.ServicerContext) -> Any:
        query_key = f"{request.parent}\x00{request.destination}"
        page = page_request(request.page_size, request.page_token, query_key)
        with self._db.read() as session:
            audience = require_audience(session, request.parent, "parent")
            members = AudienceMemberRow
            conditions = [members.audience_pk == audience.id]
            if request.destination:
                destination_id = request.destination.removeprefix("destinations/")
                dest = session.execute(select(DestinationRow.id).where(
                    DestinationRow.destination_id == destination_id)).scalar()
                if dest is None:
                    raise NotFound(f"destination '{destination_id}' not found", reason="DESTINATION_NOT_FOUND",
                                   metadata={"field": "destination"})
                dm = AudienceDestinationMemberRow
                conditions.append(members.person_pk.in_(select(dm.person_pk).where(
                    dm.audience_pk == audience.id, dm.destination_pk == dest)))
            total = session.execute(select(func.count()).select_from(members).where(*conditions)).scalar_one()
            query = (select(members.person_pk, members.join_us, PersonRow.person_id)
                     .join(PersonRow, PersonRow.id == members.person_pk).where(*conditions))
            if page.after:
                query = query.where(PersonRow.person_id > str(page.after))
            rows = session.execute(query.order_by(PersonRow.person_id).limit(page.size + 1)).all()
            more = len(rows) > page.size
            rows = rows[:page.size]
            pks = [r.person_pk for r in rows]
            at: dict[int, list[str]] = {}
            if pks:
                for r in session.execute(select(AudienceDestinationMemberRow.person_pk, DestinationRow.destination_id)
                                         .join(DestinationRow,
                                               DestinationRow.id == AudienceDestinationMemberRow.destination_pk)
                                         .where(AudienceDestinationMemberRow.audience_pk == audience.id,
                                                AudienceDestinationMemberRow.person_pk.in_(pks))
                                         .order_by(DestinationRow.destination_id)):
                    at.setdefault(r.person_pk, []).append(f"destinations/{r.destination_id}")
            return pb.ListAudienceMembersResponse(
                members=[audiences_pb2.AudienceMember(person=f"persons/{r.person_id}", join_time=micros_pb(r.join_us),
                                                      destinations=at.get(r.person_pk, [])) for r in rows],
                next_page_token=page.next_token(rows[-1].person_id, query_key) if more else "", total_size=total)

    def ListAudienceDeltas(self, request: Any, context: grpc.ServicerContext) -> Any:
        query_key = "\x00".join([request.parent, request.destination, request.person, str(request.kind),
                                 request.start_time.ToJsonString() if request.HasField("start_time") else ""])
        page = page_request(request.page_size, request.page_token, query_key)
        d = AudienceDeltaRow
        with self._db.read() as session:
            conditions: list[Any] = []
            if request.parent != "audiences/-":
                audience_id = parse_audience_name(request.parent, "parent")
                conditions.append(d.audience_id == audience_id)
                if not session.execute(select(AudienceRow.id).where(AudienceRow.audience_id == audience_id)).scalar() \
                        and not session.execute(select(d.id).where(d.audience_id == audience_id).limit(1)).scalar():
                    raise NotFound(f"audience '{audience_id}' not found", reason="AUDIENCE_NOT_FOUND",
                                   metadata={"field": "parent"})
            if request.destination:
                conditions.append(d.destination_id == request.destination.removeprefix("destinations/"))
            if request.person:
                conditions.append(d.person_id == parse_person_name(request.person, "person"))
            if request.kind:
                conditions.append(d.kind == audiences_pb2.AudienceDeltaKind.Name(request.kind).removeprefix(
                    "AUDIENCE_DELTA_KIND_"))
            if request.HasField("start_time"):
                conditions.append(d.created_us >= datetime_us(request.start_time.ToDatetime(tzinfo=UTC)))
            if page.after:
                conditions.append(d.id < int(page.after))
            rows = list(session.execute(select(d).where(and_(true(), *conditions))
                                        .order_by(d.id.desc()).limit(page.size + 1)).scalars())
            more = len(rows) > page.size
            rows = rows[:page.size]
            return pb.ListAudienceDeltasResponse(
                deltas=[audiences_pb2.AudienceDelta(
                    id=str(r.id), audience=f"audiences/{r.audience_id}", destination=f"destinations/{r.destination_id}",
                    person=f"persons/{r.person_id}", kind=_KIND_PB[r.kind], reason=r.reason,
                    create_time=micros_pb(r.created_us), event_id=r.event_id) for r in rows],
                next_page_token=page.next_token(rows[-1].id, query_key) if more else "")

    def EvaluateAudience(self, request: Any, context: grpc.ServicerContext) -> Any:
        def op(session: Session) -> Any:
            row = require_audience(session, request.name)
            if row.state == PAUSED:
                raise InvalidArgument.for_field("name", "the audience is paused; resume it first",
                                                reason="AUDIENCE_PAUSED")
            result = self._engine.evaluate_in(session, row)
            return pb.EvaluateAudienceResponse(
                audience=self._audience_pb(session, row), member_count=result.member_count, added_count=result.added,
                removed_count=result.removed, evaluation_time=micros_pb(result.evaluated_us))

        return self._mutate("EvaluateAudience", request, pb.EvaluateAudienceResponse, op)

