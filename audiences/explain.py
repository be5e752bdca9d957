"""Explaining one person against one audience (``CheckEligibility``): the rule clause by
clause with what each clause saw, consent per destination and the match keys available.

Clause results come from the audience's compiled rule itself (each clause evaluated alone
for the person), so the explanation cannot disagree with the membership it explains.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from audiences.consent.policy import DestinationVerdict, destination_consent
from audiences.consent.store import PersonConsent
from audiences.destinations import KINDS, DestinationRow, effective_purposes, limited_data_use_enabled
from audiences.engine import PAUSED, AudienceEngine
from audiences.models import AudienceDestinationMemberRow, AudienceMemberRow, AudienceRow, PersonTraitRow
from audiences.rules import ast, clause_text
from audiences.rules.compiler import CompiledRule
from identity.events.computed import rfc3339
from identity.models import IdentifierRow


@dataclass(frozen=True)
class ClauseReport:
    text: str
    line: int
    column: int
    matched: bool
    observed: str


@dataclass(frozen=True)
class DestinationReport:
    destination: DestinationRow
    eligible: bool
    consent: DestinationVerdict
    match_keys: tuple[str, ...]
    reason: str
    member_at_destination: bool
    explanation: str


@dataclass(frozen=True)
class EligibilityReport:
    rule_matched: bool
    member: bool
    clauses: tuple[ClauseReport, ...]
    destinations: tuple[DestinationReport, ...]


def destination_verdict(state: PersonConsent, destination: DestinationRow,
                        configured: Sequence[str]) -> DestinationVerdict:
    """Whether ``state`` allows sending to ``destination`` (its purposes, LDU option)."""
    spec = KINDS.get(destination.kind)
    return destination_consent(state.verdicts, [p for p in effective_purposes(destination) if p in configured],
                               advertising=bool(spec and spec.advertising),
                               limited_data_use_available=limited_data_use_enabled(destination))


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _observe(session: Session, rule: CompiledRule, atom: ast.Atom, now_us: int, person_pk: int,
             consent: PersonConsent | None) -> str:
    if isinstance(atom, ast.BoolLit):
        return "constant"
    if isinstance(atom, ast.ConsentRef):
        verdict = consent.verdict(atom.purpose) if consent else None
        if verdict is None:
            return f"consent {atom.purpose}: unknown"
        return f"consent {atom.purpose} {'granted' if verdict.granted else 'denied'} ({verdict.explanation})"
    if isinstance(atom, ast.Has):
        count = len(session.execute(select(IdentifierRow.id).where(
            IdentifierRow.person_pk == person_pk, IdentifierRow.type == atom.identifier_type)).all())
        return f"{count} {atom.identifier_type} identifier{'s' if count != 1 else ''}"
    key: str | None = atom.trait_key if isinstance(atom, ast.Cohort) else None
    target = atom.left if isinstance(atom, ast.Compare) else atom.target if isinstance(atom, ast.Exists) else None
    if isinstance(target, ast.TraitRef):
        key = target.key
    if key is not None:
        row = session.execute(select(PersonTraitRow.value).where(PersonTraitRow.person_pk == person_pk,
                                                                 PersonTraitRow.key == key)).first()
        return f"trait {key} absent" if row is None else f"trait {key} = {_show(row[0])}"
    if isinstance(target, ast.EventFact):
        value = rule.value(session, target, now_us, person_pk)
        name = f"{target.kind.value}({target.event})"
        if target.kind is ast.FactKind.COUNT:
            return f"{name} = {value or 0}"
        if target.kind is ast.FactKind.SUM:
            return f"{name} = {(value or 0) / 1_000_000:g}"
        return f"{name} = {rfc3339(value)}" if value is not None else f"{name}: no such event"
    if isinstance(target, ast.ComputedRef):
        value = rule.value(session, target, now_us, person_pk)
        name = f"computed {target.name}" + (f" {target.currency}" if target.currency else "")
        if ast.COMPUTED_TYPES[target.name] is ast.Type.TIME:
            return f"{name} = {rfc3339(value)}" if value is not None else f"{name} absent"
        if target.name in ast.MONEY_COMPUTED:
            return f"{name} = {(value or 0) / 1_000_000:g}"
        return f"{name} = {value or 0}"
    return ""


def explain_person(session: Session, engine: AudienceEngine, audience: AudienceRow, person_pk: int,
                   destinations: Sequence[DestinationRow], now_us: int) -> EligibilityReport:
    rule = engine.compiled(session, audience)
    consent = engine.resolved_consent(session, person_pk)
    clauses = tuple(ClauseReport(
        text=clause_text(audience.rule, atom.span), line=atom.span.line, column=atom.span.column,
        matched=rule.evaluate_atom(session, atom, now_us, person_pk),
        observed=_observe(session, rule, atom, now_us, person_pk, consent)) for atom in rule.atoms)
    matched = person_pk in rule.evaluate(session, now_us, [person_pk])
    member = session.execute(select(AudienceMemberRow.person_pk).where(
        AudienceMemberRow.audience_pk == audience.id, AudienceMemberRow.person_pk == person_pk)).first() is not None
    identifiers = session.execute(select(IdentifierRow.type, IdentifierRow.match_keys)
                                  .where(IdentifierRow.person_pk == person_pk)).all()
    configured = engine.configured_purposes()
    reports = []
    for destination in destinations:
        spec = KINDS.get(destination.kind)
        wanted = spec.match_key_types if spec else ()
        keys = sorted({r.type for r in identifiers if r.type in wanted}
                      | {platform for r in identifiers if r.type in wanted for platform in (r.match_keys or {})})
        verdict = destination_verdict(consent, destination, configured) if consent else DestinationVerdict(
            False, (), (), False, "the person has no identifiers")
        at = session.execute(select(AudienceDestinationMemberRow.person_pk).where(
            AudienceDestinationMemberRow.audience_pk == audience.id,
            AudienceDestinationMemberRow.destination_pk == destination.id,
            AudienceDestinationMemberRow.person_pk == person_pk)).first() is not None
        if audience.state == PAUSED:
            reason, why = "AUDIENCE_PAUSED", "the audience is paused"
        elif destination.state != "ACTIVE":
            reason, why = "DESTINATION_PAUSED", "the destination is paused"
        elif not matched:
            reason, why = "RULE_NOT_MATCHED", "the rule does not match"
        elif not verdict.allowed:
            reason, why = "CONSENT_DENIED", verdict.explanation
        elif not keys:
            reason, why = "NO_MATCH_KEYS", ("the person has none of the identifiers the destination matches on ("
                                            + ", ".join(wanted) + ")")
        else:
            reason, why = "", "eligible: the rule matches, consent allows it and match keys are available" + (
                " (sent with limited data use)" if verdict.limited_data_use else "")
        reports.append(DestinationReport(destination, not reason, verdict, tuple(keys), reason, at, why))
    return EligibilityReport(matched, member, clauses, tuple(reports))
