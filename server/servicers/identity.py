"""IdentityService: translate requests, call :class:`identity.operations.IdentityOperations`,
translate results. Mutations are idempotent by ``request_id``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.orm import Session

from identity.blocklist import BlocklistEntry
from identity.events.capture import EMAIL_KEYS, PHONE_KEYS
from identity.graph_store import GRAPH_LOCK, identifier_hash
from identity.identifiers import BUILTIN_TYPES, Identifier, IdentifierType
from identity.models import ErasureRow, PersonRow
from identity.operations import IdentityOperations, RawSighting
from identity.policy import IdentityPolicy
from identity.queries import (
    erasure_view,
    explain,
    list_history,
    list_links,
    person_pk_by_identifier,
    person_view,
    require_person_pk,
)
from identity.views import ErasureView, HistoryView, IdentifyOutcome, LinkView, PersonView
from server.app import Application
from server.pagination import page_request
from server.request_context import current_principal
from server.servicers.timestamps import micros_pb, timestamp_pb
from stitchgraph.errors import Aborted, FieldViolation, InvalidArgument, NotFound
from stitchgraph.idempotency import run_idempotent
from stitchgraph.v1 import common_pb2, identity_pb2, identity_service_pb2, identity_service_pb2_grpc

pb = identity_service_pb2
R = TypeVar("R", bound=Message)

LINK_DECISIONS = Counter("stitchgraph_identity_link_decisions_total",
                         "Links decided on ingest, by decision and refusal reason", ["decision", "reason"])
IDENTIFIERS_IGNORED = Counter("stitchgraph_identity_identifiers_ignored_total",
                              "Identifiers ignored on ingest (junk, erased), by reason", ["reason"])


def count_outcome(outcome: IdentifyOutcome) -> None:
    """Metrics of one executed Identify/Alias (replays of stored responses are not counted)."""
    for decision in outcome.decisions:
        LINK_DECISIONS.labels(decision.decision, decision.reason).inc()
    for ignored in outcome.ignored:
        IDENTIFIERS_IGNORED.labels(ignored.reason).inc()

MAX_FUTURE_SKEW = timedelta(hours=24)
_SERVICE = "/stitchgraph.v1.IdentityService/"

_DECISION_TO_PB = {
    "accepted": identity_pb2.LINK_DECISION_KIND_ACCEPTED,
    "redundant": identity_pb2.LINK_DECISION_KIND_REDUNDANT,
    "refused": identity_pb2.LINK_DECISION_KIND_REFUSED,
    "forced": identity_pb2.LINK_DECISION_KIND_FORCED,
}
_PB_TO_DECISION = {v: k for k, v in _DECISION_TO_PB.items()}
_ERASURE_STATES = {"PENDING": identity_pb2.ERASURE_STATE_PENDING,
                   "PROPAGATING": identity_pb2.ERASURE_STATE_PROPAGATING,
                   "COMPLETED": identity_pb2.ERASURE_STATE_COMPLETED,
                   "FAILED": identity_pb2.ERASURE_STATE_FAILED}


# -- translation ------------------------------------------------------------------------------

def _identifier_pb(identifier: Identifier | None) -> common_pb2.Identifier:
    if identifier is None:
        return common_pb2.Identifier()
    return common_pb2.Identifier(type=identifier.type, value=identifier.value)


def person_pb(person: PersonView) -> identity_pb2.Person:
    return identity_pb2.Person(
        name=f"persons/{person.person_id}",
        person_id=person.person_id,
        identifiers=[_identifier_pb(i) for i in person.identifiers],
        anchor=_identifier_pb(person.anchor),
        identifier_counts=person.identifier_counts,
        merge_count=person.merge_count,
        create_time=micros_pb(person.first_seen_us),
        update_time=timestamp_pb(person.updated_at),
        match_keys=[identity_pb2.MatchKey(identifier_type=t, platform_key=k, value=v) for t, k, v in person.match_keys],
        merged_person_ids=person.merged_person_ids,
        last_seen_time=micros_pb(person.last_seen_us),
    )


def _pair_pb(first: Identifier | None, second: Identifier | None) -> identity_pb2.IdentifierPair:
    return identity_pb2.IdentifierPair(first=_identifier_pb(first), second=_identifier_pb(second))


def link_pb(link: LinkView) -> identity_pb2.Link:
    return identity_pb2.Link(
        pair=_pair_pb(link.first, link.second),
        decision=_DECISION_TO_PB.get(link.decision, identity_pb2.LINK_DECISION_KIND_UNSPECIFIED), reason=link.reason,
        detail=link.detail, source=link.source, occurred_at=micros_pb(link.occurred_us), event_id=link.event_id,
        request_id=link.request_id, times_seen=link.times_seen, last_seen_time=micros_pb(link.last_seen_us),
        operator=link.operator,
    )


def history_pb(entry: HistoryView) -> identity_pb2.HistoryEntry:
    subject = entry.subject or {}
    detail = entry.detail
    if entry.kind == "IDENTIFIER_IGNORED" and subject:
        shown = f" value {subject['value']!r}" if subject.get("value") else ""
        detail = f"ignored {subject.get('type')}{shown}: {entry.detail}"
    # Value() is typed as returning a plain int; the generated stubs declare the field as the enum type.
    kind = cast(identity_pb2.HistoryEntryKind, identity_pb2.HistoryEntryKind.Value(f"HISTORY_ENTRY_KIND_{entry.kind}"))
    return identity_pb2.HistoryEntry(
        id=str(entry.id), kind=kind,
        time=micros_pb(entry.occurred_us), person_id=entry.person_id, related_person_ids=entry.related_person_ids,
        pair=_pair_pb(*entry.pair), reason=entry.reason, detail=detail, operator=entry.operator,
        event_id=entry.event_id, source=entry.source,
    )


def erasure_pb(view: ErasureView) -> identity_pb2.Erasure:
    return identity_pb2.Erasure(
        name=f"erasures/{view.id}", person_id=view.person_id, identifier_hashes=view.identifier_hashes,
        state=_ERASURE_STATES.get(view.state, identity_pb2.ERASURE_STATE_UNSPECIFIED),
        create_time=timestamp_pb(view.created_at),
        update_time=timestamp_pb(view.updated_at or view.created_at), operator=view.operator, reason=view.reason,
        identifier_count=len(view.identifier_hashes), deliveries=list(view.deliveries),
    )


def policy_pb(policy: IdentityPolicy) -> identity_pb2.IdentityPolicy:
    types = {}
    for identifier_type in policy.types:
        limit = policy.limit_of(identifier_type.name)
        types[identifier_type.name] = identity_pb2.IdentifierTypePolicy(
            max_per_person=limit or 0, priority=identifier_type.priority, hashed=identifier_type.hashed,
            built_in=identifier_type.name in BUILTIN_TYPES)
    from identity.blocklist import DEFAULT_BLOCKLIST

    def entry_pb(e: BlocklistEntry) -> identity_pb2.BlocklistEntry:
        return identity_pb2.BlocklistEntry(identifier_type=e.identifier_type or "", value=e.value or "",
                                           pattern=e.pattern or "", case_sensitive=e.case_sensitive,
                                           description=e.description or "")

    return identity_pb2.IdentityPolicy(
        types=types, max_identifiers_per_person=policy.max_identifiers, max_merges_per_person=policy.max_merges,
        blocklist=[entry_pb(e) for e in policy.blocklist], etag=policy.etag,
        default_blocklist=[entry_pb(e) for e in DEFAULT_BLOCKLIST],
        default_phone_region=policy.default_phone_region or "",
    )


def policy_from_pb(message: identity_pb2.IdentityPolicy, current: IdentityPolicy) -> IdentityPolicy:
    """A full policy from the request; fields left unset keep the current value."""
    custom: list[IdentifierType] = []
    limits: dict[str, int | None] = {}
    for name, type_policy in sorted(message.types.items()):
        limit = type_policy.max_per_person or None
        if name in BUILTIN_TYPES:
            if limit != BUILTIN_TYPES[name].max_per_person:
                limits[name] = limit
        else:
            custom.append(IdentifierType(name, limit, type_policy.priority or 100, type_policy.hashed))
    if not message.types:
        custom, limits = list(current.custom_types), dict(current.type_limits)
    blocklist = tuple(BlocklistEntry(e.identifier_type or None, e.value or None, e.pattern or None,
                                     e.case_sensitive, e.description or None) for e in message.blocklist)
    return IdentityPolicy(
        custom_types=tuple(custom), type_limits=limits,
        max_identifiers=message.max_identifiers_per_person or current.max_identifiers,
        max_merges=message.max_merges_per_person or current.max_merges,
        blocklist=blocklist,
        default_phone_region=message.default_phone_region or current.default_phone_region,
    )


def _outcome_fields(outcome: IdentifyOutcome) -> dict[str, Any]:
    return {
        "person": person_pb(outcome.person) if outcome.person else None,
        "ignored": [identity_pb2.IgnoredIdentifier(index=i.index, type=i.type, reason=i.reason, detail=i.detail)
                    for i in outcome.ignored],
        "decisions": [identity_pb2.LinkDecision(pair=_pair_pb(d.first, d.second),
                                                decision=_DECISION_TO_PB[d.decision], reason=d.reason,
                                                detail=d.detail) for d in outcome.decisions],
    }


def identifier_subjects(response: Message) -> set[str]:
    """Tombstone hashes of every identifier a stored response mentions (persons,
    decisions), so erasing one of them forgets the response (see ``forget_subjects``)."""
    found: set[str] = set()

    def walk(message: Message) -> None:
        if isinstance(message, common_pb2.Identifier):
            if message.type:
                found.add(identifier_hash(message.type, message.value))
            return
        for _field, value in message.ListFields():
            if isinstance(value, Message):
                walk(value)
            elif not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
                for item in value.values() if hasattr(value, "values") else value:
                    if isinstance(item, Message):
                        walk(item)

    walk(response)
    return found


def parse_person_name(name: str, field: str = "name") -> str:
    """The person ID of ``persons/{id}`` (a bare ID is accepted too)."""
    person_id = name.removeprefix("persons/")
    if not person_id or "/" in person_id or len(person_id) > 64:
        raise InvalidArgument.for_field(field, "must be a person resource name like 'persons/p_...'")
    return person_id


def _occurred_at(message: Any, field: str = "occurred_at") -> datetime | None:
    if not message.HasField(field):
        return None
    moment: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    if moment > datetime.now(UTC) + MAX_FUTURE_SKEW:
        raise InvalidArgument.for_field(field, "is more than 24 hours in the future")
    if moment.year < 2000:
        raise InvalidArgument.for_field(field, "is before the year 2000; send the real time of the evidence")
    return moment


def _require_identifier(message: common_pb2.Identifier, field: str) -> tuple[str, str]:
    if not message.type and not message.value:
        raise InvalidArgument.for_field(field, "is required")
    return message.type, message.value


# -- the servicer ---------------------------------------------------------------------------

class IdentityServicer(identity_service_pb2_grpc.IdentityServiceServicer):
    def __init__(self, app: Application) -> None:
        self._app = app
        self._db = app.db
        self._ops: IdentityOperations = app.identity

    def _mutate(self, method: str, request: Any, response_type: type[R], op: Callable[[Session], R]) -> R:
        response = run_idempotent(self._db, _SERVICE + method, request, response_type, op,
                                  subjects=identifier_subjects)
        self._app.after_write()
        return response

    def _operator(self, requested: str) -> str:
        return requested or current_principal() or "unknown"

    def _normalize(self, session: Session, message: common_pb2.Identifier, field: str) -> Identifier:
        policy = self._ops.policy(session)
        return policy.normalizer.normalize(message.type, message.value, field=f"{field}.value",
                                           type_field=f"{field}.type").identifier

    def Identify(self, request: Any, context: grpc.ServicerContext) -> Any:
        traits = json_format.MessageToDict(request.traits) if request.HasField("traits") else {}
        identifiers = [(i.type, i.value) for i in request.identifiers]
        # Contact details among the traits are identifiers of the person (hashed), not traits.
        identifiers += [("email" if key in EMAIL_KEYS else "phone", value) for key, value in traits.items()
                        if (key in EMAIL_KEYS or key in PHONE_KEYS) and isinstance(value, str) and value.strip()]
        sighting = RawSighting(identifiers, _occurred_at(request), request.source, request.event_id,
                               request.request_id)

        def op(session: Session) -> Any:
            outcome = self._ops.identify(session, sighting)
            if traits and outcome.primary_pk is not None:
                self._app.events.record_traits(session, identifier_pk=outcome.primary_pk, event_id=outcome.event_id,
                                               occurred_us=outcome.occurred_us, source=request.source,
                                               traits=traits)
            count_outcome(outcome)
            return pb.IdentifyResponse(**_outcome_fields(outcome))

        return self._mutate("Identify", request, pb.IdentifyResponse, op)

    def Alias(self, request: Any, context: grpc.ServicerContext) -> Any:
        violations = [FieldViolation(f, "is required") for f in ("previous_identifier", "identifier")
                      if not request.HasField(f)]
        if violations:
            raise InvalidArgument("previous_identifier and identifier are required", violations=violations)
        raw = [(request.previous_identifier.type, request.previous_identifier.value),
               (request.identifier.type, request.identifier.value)]
        sighting = RawSighting(raw, _occurred_at(request), request.source, request.event_id, request.request_id)

        def op(session: Session) -> Any:
            try:
                outcome = self._ops.identify(session, sighting)
            except InvalidArgument as exc:
                # Report paths of the Alias message, not of the internal identifier list.
                raise InvalidArgument(exc.message, reason=exc.reason, violations=[
                    FieldViolation(v.field.replace("identifiers[0]", "previous_identifier")
                                   .replace("identifiers[1]", "identifier"), v.description)
                    for v in exc.violations]) from None
            count_outcome(outcome)
            return pb.AliasResponse(**_outcome_fields(outcome))

        return self._mutate("Alias", request, pb.AliasResponse, op)

    def GetPerson(self, request: Any, context: grpc.ServicerContext) -> Any:
        person_id = parse_person_name(request.name)
        with self._db.read() as session:
            pk = require_person_pk(session, person_id)
            return pb.GetPersonResponse(person=person_pb(person_view(session, pk)), requested_name=request.name)

    def LookupPerson(self, request: Any, context: grpc.ServicerContext) -> Any:
        _require_identifier(request.identifier, "identifier")
        with self._db.read() as session:
            identifier = self._normalize(session, request.identifier, "identifier")
            pk = person_pk_by_identifier(session, identifier)
            if pk is None:
                raise NotFound("no person holds this identifier", reason="IDENTIFIER_NOT_FOUND",
                               metadata={"field": "identifier"})
            return pb.LookupPersonResponse(person=person_pb(person_view(session, pk)))

    def ExplainIdentifiers(self, request: Any, context: grpc.ServicerContext) -> Any:
        _require_identifier(request.first, "first")
        _require_identifier(request.second, "second")
        with self._db.read() as session:
            first = self._normalize(session, request.first, "first")
            second = self._normalize(session, request.second, "second")
            result = explain(session, first, second)
            return pb.ExplainIdentifiersResponse(
                same_person=result.same_person, first_person=f"persons/{result.first_person}",
                second_person=f"persons/{result.second_person}", path=[link_pb(link) for link in result.path],
                refusals=[link_pb(link) for link in result.refusals], explanation=result.text)

    def ListPersonLinks(self, request: Any, context: grpc.ServicerContext) -> Any:
        person_id = parse_person_name(request.parent, "parent")
        decision = _PB_TO_DECISION.get(request.decision)
        query = f"links|{person_id}|{decision}"
        page = page_request(request.page_size, request.page_token, query)
        with self._db.read() as session:
            pk = require_person_pk(session, person_id, "parent")
            links = list_links(session, pk, decision=decision, after=page.after, limit=page.size + 1)
        more = len(links) > page.size
        links = links[:page.size]
        last = links[-1] if links else None
        return pb.ListPersonLinksResponse(
            links=[link_pb(link) for link in links],
            next_page_token=page.next_token([last.occurred_us, last.event_id, last.id], query)
            if more and last else "")

    def ListPersonHistory(self, request: Any, context: grpc.ServicerContext) -> Any:
        person_id = parse_person_name(request.parent, "parent")
        kind = identity_pb2.HistoryEntryKind.Name(request.kind).removeprefix("HISTORY_ENTRY_KIND_") \
            if request.kind else None
        query = f"history|{person_id}|{kind}"
        page = page_request(request.page_size, request.page_token, query)
        with self._db.read() as session:
            pk = require_person_pk(session, person_id, "parent")
            entries = list_history(session, pk, kind=kind, after=page.after, limit=page.size + 1)
        more = len(entries) > page.size
        entries = entries[:page.size]
        return pb.ListPersonHistoryResponse(
            entries=[history_pb(e) for e in entries],
            next_page_token=page.next_token(entries[-1].id, query) if more else "")

    def MergePersons(self, request: Any, context: grpc.ServicerContext) -> Any:
        ids = [parse_person_name(n, f"names[{i}]") for i, n in enumerate(request.names)]
        operator = self._operator(request.operator)
        return self._mutate("MergePersons", request, pb.MergePersonsResponse, lambda s: pb.MergePersonsResponse(
            person=person_pb(self._ops.merge(s, ids, operator=operator, reason=request.reason,
                                             override_pins=request.override_pins, request_id=request.request_id))))

    def SplitPerson(self, request: Any, context: grpc.ServicerContext) -> Any:
        person_id = parse_person_name(request.name)
        operator = self._operator(request.operator)

        def op(session: Session) -> Any:
            detach = [self._normalize(session, m, f"detach_identifiers[{i}]")
                      for i, m in enumerate(request.detach_identifiers)]
            pairs = [(self._normalize(session, p.first, f"remove_links[{i}].first"),
                      self._normalize(session, p.second, f"remove_links[{i}].second"))
                     for i, p in enumerate(request.remove_links)]
            persons = self._ops.split(session, person_id, detach=detach, remove_links=pairs,
                                      allow_remerge=request.allow_remerge, operator=operator, reason=request.reason)
            return pb.SplitPersonResponse(persons=[person_pb(p) for p in persons])

        return self._mutate("SplitPerson", request, pb.SplitPersonResponse, op)

    def ErasePerson(self, request: Any, context: grpc.ServicerContext) -> Any:
        target = request.WhichOneof("target")
        if target is None:
            raise InvalidArgument.for_field("name", "name the person (or set identifier) to erase")
        operator = self._operator(request.operator)

        def op(session: Session) -> Any:
            person_id = parse_person_name(request.name) if target == "name" else None
            identifier = self._normalize(session, request.identifier, "identifier") if target == "identifier" else None
            view = self._ops.erase(session, person_id=person_id, identifier=identifier, operator=operator,
                                   reason=request.reason)
            return pb.ErasePersonResponse(erasure=erasure_pb(view))

        return self._mutate("ErasePerson", request, pb.ErasePersonResponse, op)

    def GetErasure(self, request: Any, context: grpc.ServicerContext) -> Any:
        erasure_id = request.name.removeprefix("erasures/")
        with self._db.read() as session:
            row = session.get(ErasureRow, erasure_id)
            if row is None:
                raise NotFound(f"erasure '{request.name}' not found", reason="ERASURE_NOT_FOUND")
            return pb.GetErasureResponse(erasure=erasure_pb(erasure_view(row)))

    def ListErasures(self, request: Any, context: grpc.ServicerContext) -> Any:
        state = identity_pb2.ErasureState.Name(request.state).removeprefix("ERASURE_STATE_") if request.state else None
        query = f"erasures|{state}"
        page = page_request(request.page_size, request.page_token, query)
        with self._db.read() as session:
            stmt = select(ErasureRow).order_by(ErasureRow.created_at, ErasureRow.id)
            if state:
                stmt = stmt.where(ErasureRow.state == state)
            offset = int(page.after or 0)
            rows = session.execute(stmt.offset(offset).limit(page.size + 1)).scalars().all()
        more = len(rows) > page.size
        rows = rows[:page.size]
        return pb.ListErasuresResponse(erasures=[erasure_pb(erasure_view(r)) for r in rows],
                                       next_page_token=page.next_token(offset + len(rows), query) if more else "")

    def GetIdentityPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._db.transaction() as session:
            return pb.GetIdentityPolicyResponse(policy=policy_pb(self._ops.policy(session).policy))

    def UpdateIdentityPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.HasField("policy"):
            raise InvalidArgument.for_field("policy", "is required")
        operator = self._operator("")

        def op(session: Session) -> Any:
            self._db.advisory_lock(session, GRAPH_LOCK)  # fill unset fields from the policy in force now
            current = self._ops.policy(session).policy
            policy = self._policy_with_prefix(request.policy, current)
            etag = request.etag or request.policy.etag
            stored, stats = self._ops.update_policy(session, policy, etag=etag, operator=operator)
            return pb.UpdateIdentityPolicyResponse(policy=policy_pb(stored), persons_changed=stats.persons_changed)

        return self._mutate("UpdateIdentityPolicy", request, pb.UpdateIdentityPolicyResponse, op)

    def PreviewIdentityPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.HasField("policy"):
            raise InvalidArgument.for_field("policy", "is required")
        with self._db.transaction() as session:
            current = self._ops.policy(session).policy
            preview = self._ops.preview_policy(session, self._policy_with_prefix(request.policy, current))
            session.rollback()
        kinds = {"SPLIT": identity_pb2.PERSON_CHANGE_KIND_SPLIT,
                 "IDENTIFIERS_REMOVED": identity_pb2.PERSON_CHANGE_KIND_IDENTIFIERS_REMOVED,
                 "CHANGED": identity_pb2.PERSON_CHANGE_KIND_MERGED}
        sample_size = request.sample_size or 20
        return pb.PreviewIdentityPolicyResponse(
            persons_evaluated=preview.persons_evaluated, persons_split=preview.persons_split,
            persons_changed=preview.persons_changed, identifiers_newly_ignored=preview.identifiers_newly_ignored,
            sample=[identity_pb2.PersonChange(person_id=c.person_id, kind=kinds[c.kind],
                                              resulting_person_ids=c.resulting_person_ids)
                    for c in preview.sample[:sample_size]])

    def RebuildIdentityGraph(self, request: Any, context: grpc.ServicerContext) -> Any:
        started = datetime.now(UTC)

        def op(session: Session) -> Any:
            before = session.execute(select(PersonRow.id)).scalars().all()
            stats = self._ops.rebuild(session)
            return pb.RebuildIdentityGraphResponse(
                links_processed=stats.links, persons_before=len(before), persons_after=stats.persons,
                persons_changed=stats.persons_changed, start_time=timestamp_pb(started),
                end_time=timestamp_pb(datetime.now(UTC)))

        return self._mutate("RebuildIdentityGraph", request, pb.RebuildIdentityGraphResponse, op)

    @staticmethod
    def _policy_with_prefix(message: Any, current: IdentityPolicy) -> IdentityPolicy:
        try:
            return policy_from_pb(message, current)
        except InvalidArgument as exc:
            raise exc.prefixed("policy") from None


__all__ = ["Aborted", "IdentityServicer"]
