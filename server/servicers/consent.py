"""ConsentService: record consent decisions (explicit or as raw signals) and read a person's
resolved consent with the evidence behind every verdict."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

import grpc
from google.protobuf import json_format
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from audiences.consent import tcf
from audiences.consent.policy import Decision, DestinationVerdict, Verdict
from audiences.consent.settings import REGION_RE
from audiences.consent.store import PersonConsent, decision_of, decision_rows, insert_decisions, new_decision_id
from audiences.destinations import DestinationRow
from audiences.explain import destination_verdict
from audiences.models import ConsentDecisionRow
from identity.models import IdentifierRow, PersonRow
from identity.operations import RawSighting
from identity.queries import person_pk_by_identifier, require_person_pk
from server.app import Application
from server.pagination import page_request
from server.servicers.identity import parse_person_name
from server.servicers.timestamps import datetime_us, micros_pb, timestamp_pb
from stitchgraph import changes
from stitchgraph.changes import mark_persons
from stitchgraph.errors import FieldViolation, InvalidArgument, NotFound
from stitchgraph.idempotency import run_idempotent
from stitchgraph.v1 import common_pb2, consent_pb2, consent_service_pb2, consent_service_pb2_grpc

pb = consent_service_pb2
_SERVICE = "/stitchgraph.v1.ConsentService/"
MAX_DECISIONS = 50
MAX_SOURCE_LENGTH = 64
MAX_FUTURE_SKEW = timedelta(hours=24)


def _status(granted: bool) -> consent_pb2.ConsentStatus:
    return consent_pb2.CONSENT_STATUS_GRANTED if granted else consent_pb2.CONSENT_STATUS_DENIED


def _identifier_pb(label: str) -> common_pb2.Identifier:
    kind, _, value = label.partition(":")
    return common_pb2.Identifier(type=kind, value=value)


def decision_pb(d: Decision, request_id: str = "") -> consent_pb2.ConsentDecision:
    return consent_pb2.ConsentDecision(
        purpose=d.purpose, state=_status(d.granted), source=d.source, time=micros_pb(d.occurred_us),
        jurisdiction=d.jurisdiction,
        origin=cast(consent_pb2.ConsentDecisionOrigin,
                    consent_pb2.ConsentDecisionOrigin.Value(f"CONSENT_DECISION_ORIGIN_{d.origin}")),
        event_id=d.event_id, identifier=_identifier_pb(d.identifier) if d.identifier else None,
        decision_id=d.decision_id, request_id=request_id)


def verdict_pb(v: Verdict) -> consent_pb2.PurposeVerdict:
    return consent_pb2.PurposeVerdict(
        purpose=v.purpose, state=_status(v.granted),
        resolved_by=cast(consent_pb2.ConsentResolution,
                         consent_pb2.ConsentResolution.Value(f"CONSENT_RESOLUTION_{v.resolved_by}")),
        decision=decision_pb(v.decision) if v.decision is not None else None, explanation=v.explanation,
        decision_count=v.decision_count)


def destination_consent_pb(destination: DestinationRow, verdict: DestinationVerdict) -> consent_pb2.DestinationConsent:
    return consent_pb2.DestinationConsent(
        destination=f"destinations/{destination.destination_id}", allowed=verdict.allowed,
        required_purposes=list(verdict.required_purposes), denied_purposes=list(verdict.denied_purposes),
        limited_data_use=verdict.limited_data_use, explanation=verdict.explanation)


def consent_state_pb(person_id: str, state: PersonConsent, destinations: list[DestinationRow],
                     configured: tuple[str, ...], now: datetime) -> consent_pb2.ConsentState:
    return consent_pb2.ConsentState(
        person=f"persons/{person_id}", jurisdiction=state.jurisdiction, jurisdiction_source=state.jurisdiction_source,
        verdicts=[verdict_pb(v) for v in state.verdicts],
        destinations=[destination_consent_pb(d, destination_verdict(state, d, configured)) for d in destinations],
        resolve_time=timestamp_pb(now))


def load_destinations(session: Session, names: list[str], field: str = "destinations") -> list[DestinationRow]:
    """The named destinations (``destinations/{id}``), or every destination when none is named."""
    if not names:
        return list(session.execute(select(DestinationRow).order_by(DestinationRow.destination_id)).scalars())
    found = []
    for i, name in enumerate(names):
        destination_id = name.removeprefix("destinations/")
        row = session.execute(select(DestinationRow).where(DestinationRow.destination_id == destination_id)).scalar()
        if row is None:
            raise NotFound(f"destination '{destination_id}' not found", reason="DESTINATION_NOT_FOUND",
                           metadata={"field": f"{field}[{i}]"})
        found.append(row)
    return found


class ConsentServicer(consent_service_pb2_grpc.ConsentServiceServicer):
    def __init__(self, app: Application) -> None:
        self._app = app
        self._db = app.db
        self._settings = app.settings.consent

    # -- SetConsent -----------------------------------------------------------------------

    def _validate(self, request: Any, now: datetime) -> list[dict[str, Any]]:
        """Decision rows (without identifier) for the request; raises INVALID_ARGUMENT."""
        violations: list[FieldViolation] = []
        configured = tuple(self._settings.purposes)
        if len(request.decisions) > MAX_DECISIONS:
            raise InvalidArgument.for_field("decisions", f"at most {MAX_DECISIONS} decisions per call",
                                            reason="TOO_MANY_DECISIONS")
        rows: list[dict[str, Any]] = []
        for i, d in enumerate(request.decisions):
            field = f"decisions[{i}]"
            if d.purpose not in configured:
                violations.append(FieldViolation(f"{field}.purpose", f"unknown purpose {d.purpose!r}; configured: "
                                                 + ", ".join(configured), "UNKNOWN_PURPOSE"))
            if d.state not in (consent_pb2.CONSENT_STATUS_GRANTED, consent_pb2.CONSENT_STATUS_DENIED):
                violations.append(FieldViolation(f"{field}.state", "must be GRANTED or DENIED", "MISSING_STATE"))
            if len(d.source) > MAX_SOURCE_LENGTH:
                violations.append(FieldViolation(f"{field}.source", f"at most {MAX_SOURCE_LENGTH} characters",
                                                 "TOO_LONG"))
            jurisdiction = d.jurisdiction.strip().upper()
            if jurisdiction and not REGION_RE.fullmatch(jurisdiction):
                violations.append(FieldViolation(f"{field}.jurisdiction",
                                                 "must be an ISO 3166-1 alpha-2 country (DE) or ISO 3166-2 "
                                                 "subdivision (US-CA)", "INVALID_JURISDICTION"))
            moment = now
            if d.HasField("time"):
                moment = d.time.ToDatetime(tzinfo=UTC)
                if moment > now + MAX_FUTURE_SKEW or moment.year < 2000:
                    violations.append(FieldViolation(f"{field}.time", "must be a real time, not in the future",
                                                     "INVALID_TIME"))
            rows.append({"decision_id": new_decision_id(), "purpose": d.purpose,
                         "granted": d.state == consent_pb2.CONSENT_STATUS_GRANTED, "occurred_us": datetime_us(moment),
                         "origin": "API", "source": d.source or "grpc", "jurisdiction": jurisdiction,
                         "opt_out": False, "event_id": "", "request_id": request.request_id, "detail": "",
                         "recorded_at": now})
        signals = json_format.MessageToDict(request.signals, preserving_proto_field_name=True) \
            if request.HasField("signals") else {}
        if request.HasField("signals"):
            if request.signals.HasField("segment") and "segment" not in signals:
                signals["segment"] = {}
            if signals.get("tcf_string"):
                try:
                    tcf.decode(signals["tcf_string"])
                except tcf.TcfError as exc:
                    violations.append(FieldViolation("signals.tcf_string", str(exc), "INVALID_TCF_STRING"))
            usp = signals.get("us_privacy", "")
            if usp and not (len(usp) == 4 and usp[0] == "1" and all(c in "YN-" for c in usp[1:].upper())):
                violations.append(FieldViolation("signals.us_privacy", "must be a 4-character US Privacy string "
                                                 "like 1YNN", "INVALID_US_PRIVACY"))
        if violations:
            raise InvalidArgument("invalid consent request", violations=violations)
        if signals:
            moment = request.signals_time.ToDatetime(tzinfo=UTC) if request.HasField("signals_time") else now
            if moment > now + MAX_FUTURE_SKEW or moment.year < 2000:
                raise InvalidArgument.for_field("signals_time", "must be a real time, not in the future",
                                                reason="INVALID_TIME")
            signal_rows, _ = decision_rows(0, signals, self._settings, occurred_us=datetime_us(moment), source="grpc",
                                           jurisdiction="", request_id=request.request_id, now=now)
            rows += signal_rows
        if not rows:
            raise InvalidArgument.for_field("decisions", "give at least one decision or a consent signal",
                                            reason="NO_DECISIONS")
        return rows

    def _target(self, session: Session, request: Any, *, create: bool) -> tuple[int, int]:
        """(person pk, identifier pk decisions are recorded against)."""
        target = request.WhichOneof("target")
        if target == "person":
            pk = require_person_pk(session, parse_person_name(request.person, "person"), "person")
            anchor = session.execute(select(PersonRow.anchor_pk).where(PersonRow.id == pk)).scalar_one()
            return pk, int(anchor)
        if target == "identifier":
            message = request.identifier
            if not message.type and not message.value:
                raise InvalidArgument.for_field("identifier", "is required")
            policy = self._app.identity.policy(session)
            identifier = policy.normalizer.normalize(message.type, message.value, field="identifier.value",
                                                     type_field="identifier.type").identifier
            found = person_pk_by_identifier(session, identifier)
            if found is None:
                if not create:
                    raise NotFound("identifier not found", reason="IDENTIFIER_NOT_FOUND",
                                   metadata={"field": "identifier"})
                self._app.identity.identify(session, RawSighting([(message.type, message.value)], None, "consent",
                                                                 "", request.request_id))
                found = person_pk_by_identifier(session, identifier)
                if found is None:
                    raise InvalidArgument.for_field("identifier", "this identifier cannot be recorded (ignored as "
                                                    "junk or erased)", reason="IDENTIFIER_IGNORED")
            ident_pk = session.execute(select(IdentifierRow.id).where(
                IdentifierRow.type == identifier.type, IdentifierRow.value == identifier.value)).scalar_one()
            return found, int(ident_pk)
        raise InvalidArgument.for_field("target", "set person or identifier")

    def SetConsent(self, request: Any, context: grpc.ServicerContext) -> Any:
        now = datetime.now(UTC)
        rows = self._validate(request, now)

        def op(session: Session) -> Any:
            person_pk, identifier_pk = self._target(session, request, create=True)
            for row in rows:
                row["identifier_pk"] = identifier_pk
            insert_decisions(session, rows)
            mark_persons(session, [person_pk], changes.CONSENT)
            state = self._app.consent.resolve_persons(session, [person_pk])[person_pk]
            person_id = session.execute(select(PersonRow.person_id).where(PersonRow.id == person_pk)).scalar_one()
            label = session.execute(select(IdentifierRow.type, IdentifierRow.value).where(
                IdentifierRow.id == identifier_pk)).one()
            recorded = [Decision(decision_id=r["decision_id"], purpose=r["purpose"], granted=r["granted"],
                                 occurred_us=r["occurred_us"], origin=r["origin"], source=r["source"],
                                 jurisdiction=r["jurisdiction"], event_id="", identifier=f"{label[0]}:{label[1]}",
                                 opt_out=r["opt_out"]) for r in rows]
            return pb.SetConsentResponse(
                consent_state=consent_state_pb(person_id, state, load_destinations(session, []),
                                               tuple(self._settings.purposes), now),
                decisions=[decision_pb(d, request.request_id) for d in recorded])

        response = run_idempotent(self._db, _SERVICE + "SetConsent", request, pb.SetConsentResponse, op)
        self._app.after_write()
        return response

    # -- reads ----------------------------------------------------------------------------

    def GetConsentState(self, request: Any, context: grpc.ServicerContext) -> Any:
        now = datetime.now(UTC)
        with self._db.read() as session:
            person_pk, _ = self._target(session, request, create=False)
            destinations = load_destinations(session, list(request.destinations))
            state = self._app.consent.resolve_persons(session, [person_pk])[person_pk]
            person_id = session.execute(select(PersonRow.person_id).where(PersonRow.id == person_pk)).scalar_one()
            return pb.GetConsentStateResponse(consent_state=consent_state_pb(
                person_id, state, destinations, tuple(self._settings.purposes), now))

    def ListConsentDecisions(self, request: Any, context: grpc.ServicerContext) -> Any:
        person_id = parse_person_name(request.parent, "parent")
        if request.purpose and request.purpose not in self._settings.purposes:
            raise InvalidArgument.for_field("purpose", f"unknown purpose {request.purpose!r}")
        query_key = f"{request.parent}\x00{request.purpose}"
        page = page_request(request.page_size, request.page_token, query_key)
        with self._db.read() as session:
            pk = require_person_pk(session, person_id, "parent")
            idents = {r.id: f"{r.type}:{r.value}" for r in session.execute(
                select(IdentifierRow.id, IdentifierRow.type, IdentifierRow.value)
                .where(IdentifierRow.person_pk == pk))}
            query = select(ConsentDecisionRow).where(ConsentDecisionRow.identifier_pk.in_(sorted(idents)))
            if request.purpose:
                query = query.where(ConsentDecisionRow.purpose == request.purpose)
            if page.after:
                us, decision_id = int(page.after[0]), str(page.after[1])
                query = query.where(or_(ConsentDecisionRow.occurred_us < us,
                                        and_(ConsentDecisionRow.occurred_us == us,
                                             ConsentDecisionRow.decision_id < decision_id)))
            rows = list(session.execute(query.order_by(ConsentDecisionRow.occurred_us.desc(),
                                                       ConsentDecisionRow.decision_id.desc())
                                        .limit(page.size + 1)).scalars())
            more = len(rows) > page.size
            rows = rows[:page.size]
            return pb.ListConsentDecisionsResponse(
                decisions=[decision_pb(decision_of(r, idents), r.request_id) for r in rows],
                next_page_token=page.next_token([rows[-1].occurred_us, rows[-1].decision_id], query_key)
                if more else "")
