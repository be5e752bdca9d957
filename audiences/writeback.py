"""Computed traits written back to analytics tools (PostHog, Heap) through the outbox.

A trait destination (kind ``POSTHOG_TRAITS`` / ``HEAP_TRAITS``) names what it receives in
its ``traits`` setting (default ``["audiences"]``):

* ``audiences`` — every active audience's membership, as ``stitchgraph_audience_<id>``
  (``true``/``false``); ``audience:<audience_id>`` — one audience;
* a computed trait key (``lifetime_value``, ``purchase_count``, ``last_purchase_at``, ...,
  ``docs/events.md``), under ``stitchgraph_<key>``; money (``lifetime_value``,
  ``refunded_value``) as one number per currency, ``stitchgraph_lifetime_value_eur``;
* ``match_quality`` — how well the person can be matched on ad platforms:
  ``high`` (email and phone), ``medium`` (one of them), ``low`` (neither);
* ``eligibility`` — for every advertising destination, whether the person's consent allows
  sending to it, as ``stitchgraph_eligible_<destination_id>``; ``eligible:<destination_id>``
  — one destination.

Whenever the audience engine has brought persons up to date (the change journal, window
and full evaluations) it calls :meth:`TraitWriteback.refresh` in the same transaction:
the values are computed, compared with what was last queued for that destination
(``trait_writeback_values``), and only changed keys are queued as one ``TRAIT_UPDATE``
delivery per person. Persons whose consent does not allow the destination's purposes
(``analytics`` by default) are not written, and nothing is recorded as sent, so a later
grant sends every value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import JSON, BigInteger, String, Table, delete, insert, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from audiences.destinations import KINDS, DestinationRow, effective_purposes
from audiences.models import AudienceMemberRow, AudienceRow, PersonConsentRow
from audiences.outbox import DELIVERIES, PENDING, TRAIT_UPDATE, now_us
from identity.events.computed import KEYS as COMPUTED_KEYS
from identity.events.computed import Total, computed_traits
from identity.events.models import EventTotalRow
from identity.models import IdentifierRow, PersonRow
from stitchgraph.db import Base, in_values

__all__ = ["TraitWriteback", "TraitWritebackRow", "trait_keys_problem"]

PREFIX = "stitchgraph_"
_SPEC_RE = re.compile(r"(audiences|eligibility|match_quality|audience:[a-z][a-z0-9-]{0,62}|"
                      r"eligible:[a-z][a-z0-9-]{0,62}|[a-z_]+)")
_CHUNK = 2000


class TraitWritebackRow(Base):
    """The value of one trait last queued for one person at one trait destination."""

    __tablename__ = "trait_writeback_values"

    destination_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    person_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    key: Mapped[str] = mapped_column(String(160), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON, nullable=True)


_VALUES = cast(Table, TraitWritebackRow.__table__)


def trait_keys_problem(specs: Any) -> str:
    """Why a ``traits`` setting is invalid ("" when it is fine)."""
    if specs is None:
        return ""
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs) or len(specs) > 100:
        return "must be a list of at most 100 strings"
    for spec in specs:
        if not _SPEC_RE.fullmatch(spec):
            return f"{spec[:64]!r} is not a trait spec"
        if ":" not in spec and spec not in ("audiences", "eligibility", "match_quality") and spec not in COMPUTED_KEYS:
            return (f"{spec[:64]!r} is not a computed trait; use audiences, audience:<id>, eligibility, "
                    f"eligible:<destination_id>, match_quality or one of {', '.join(COMPUTED_KEYS)}")
    return ""


def audience_trait(audience_id: str) -> str:
    return f"{PREFIX}audience_{audience_id.replace('-', '_')}"


def eligible_trait(destination_id: str) -> str:
    return f"{PREFIX}eligible_{destination_id.replace('-', '_')}"


class TraitWriteback:
    """Computes and queues trait write-back for persons."""

    def refresh(self, session: Session, person_pks: Sequence[int]) -> int:
        """Queue changed traits of ``person_pks`` for every trait destination; returns the
        number of deliveries queued."""
        if not person_pks:
            return 0
        destinations = [d for d in session.execute(select(DestinationRow).order_by(DestinationRow.id)).scalars()
                        if KINDS.get(d.kind) is not None and KINDS[d.kind].traits]
        if not destinations:
            return 0
        persons = sorted(set(person_pks))
        queued = 0
        for start in range(0, len(persons), _CHUNK):
            queued += self._refresh_chunk(session, destinations, persons[start:start + _CHUNK])
        return queued

    def _refresh_chunk(self, session: Session, destinations: list[DestinationRow], persons: list[int]) -> int:
        alive = {pk: pid for pk, pid in session.execute(
            select(PersonRow.id, PersonRow.person_id).where(in_values(session, PersonRow.id, persons)))}
        audiences = list(session.execute(select(AudienceRow.id, AudienceRow.audience_id, AudienceRow.state)
                                         .order_by(AudienceRow.audience_id)))
        members: set[tuple[int, int]] = set(session.execute(
            select(AudienceMemberRow.audience_pk, AudienceMemberRow.person_pk).where(
                in_values(session, AudienceMemberRow.person_pk, persons))).all())
        totals: dict[int, list[Total]] = {}
        for pk, r in session.execute(select(IdentifierRow.person_pk, EventTotalRow).join(
                EventTotalRow, EventTotalRow.identifier_pk == IdentifierRow.id).where(
                in_values(session, IdentifierRow.person_pk, persons))):
            totals.setdefault(pk, []).append(Total(r.event, r.currency, r.count, r.value_micros, r.first_us,
                                                   r.last_us))
        traits = {pk: {t.key: t.value for t in computed_traits(rows)} for pk, rows in totals.items()}
        consent: dict[int, dict[str, bool]] = {}
        for pk, purpose, granted in session.execute(select(PersonConsentRow.person_pk, PersonConsentRow.purpose,
                                                           PersonConsentRow.granted).where(
                in_values(session, PersonConsentRow.person_pk, persons))):
            consent.setdefault(pk, {})[purpose] = bool(granted)
        key_types: dict[int, set[str]] = {}
        for pk, type_ in session.execute(select(IdentifierRow.person_pk, IdentifierRow.type).where(
                in_values(session, IdentifierRow.person_pk, persons))):
            key_types.setdefault(pk, set()).add(type_)
        advertising = [d for d in session.execute(select(DestinationRow).order_by(DestinationRow.destination_id))
                       .scalars() if KINDS.get(d.kind) is not None and KINDS[d.kind].advertising]
        stored: dict[tuple[int, int], dict[str, Any]] = {}
        dest_pks = [d.id for d in destinations]
        for found in session.execute(select(_VALUES).where(
                _VALUES.c.destination_pk.in_(dest_pks), in_values(session, _VALUES.c.person_pk, persons))):
            stored.setdefault((int(found.destination_pk), int(found.person_pk)), {})[str(found.key)] = found.value

        at = now_us()
        deliveries: list[dict[str, Any]] = []
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        removals: list[tuple[int, int]] = []
        for destination in destinations:
            specs = destination.settings.get("traits") or ["audiences"]
            purposes = effective_purposes(destination)
            for person in persons:
                if person not in alive:
                    removals.append((destination.id, person))
                    continue
                person_consent = consent.get(person, {})
                if not all(person_consent.get(p, False) for p in purposes):
                    continue
                values = self._values(specs, person, audiences, members, traits.get(person, {}), person_consent,
                                      key_types.get(person, set()), advertising)
                before = stored.get((destination.id, person), {})
                changed = {k: v for k, v in values.items() if k not in before or before[k] != v}
                unset = sorted(k for k in before if k not in values)
                if not changed and not unset:
                    continue
                for k, v in changed.items():
                    row = {"destination_pk": destination.id, "person_pk": person, "key": k, "value": v}
                    (updates if k in before else inserts).append(row)
                for k in unset:
                    session.execute(delete(_VALUES).where(_VALUES.c.destination_pk == destination.id,
                                                          _VALUES.c.person_pk == person, _VALUES.c.key == k))
                deliveries.append({
                    "destination_pk": destination.id, "destination_id": destination.destination_id,
                    "kind": TRAIT_UPDATE, "status": PENDING, "status_reason": "",
                    "batch_key": f"traits:{destination.id}", "event_id": "", "platform_event": "",
                    "person_pk": person, "person_id": alive[person], "audience_pk": None, "audience_id": "",
                    "erasure_id": "", "payload": {"values": changed, "unset": unset, "at_us": at}, "attempts": 0,
                    "next_attempt_us": at, "claim_token": "", "lease_until_us": None, "expire_us": None,
                    "created_us": at, "updated_us": at})
        if inserts:
            session.execute(insert(_VALUES), inserts)
        for row in updates:
            session.execute(update(_VALUES).where(_VALUES.c.destination_pk == row["destination_pk"],
                                                  _VALUES.c.person_pk == row["person_pk"],
                                                  _VALUES.c.key == row["key"]).values(value=row["value"]))
        for dest, person in removals:
            session.execute(delete(_VALUES).where(_VALUES.c.destination_pk == dest, _VALUES.c.person_pk == person))
        if deliveries:
            session.execute(insert(DELIVERIES), deliveries)
        return len(deliveries)

    @staticmethod
    def _values(specs: Sequence[str], person: int, audiences: Sequence[Any], members: set[tuple[int, int]],
                traits: Mapping[str, Any], consent: Mapping[str, bool], key_types: set[str],
                advertising: Sequence[DestinationRow]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for spec in specs:
            if spec == "audiences" or spec.startswith("audience:"):
                wanted = spec.partition(":")[2]
                for pk, audience_id, state in audiences:
                    # A BUILDING audience is mid-evaluation (its first full pass calls this hook).
                    if (wanted and audience_id != wanted) or (not wanted and state not in ("ACTIVE", "BUILDING")):
                        continue
                    values[audience_trait(audience_id)] = (pk, person) in members
            elif spec == "eligibility" or spec.startswith("eligible:"):
                wanted = spec.partition(":")[2]
                for destination in advertising:
                    if wanted and destination.destination_id != wanted:
                        continue
                    values[eligible_trait(destination.destination_id)] = all(
                        consent.get(p, False) for p in effective_purposes(destination))
            elif spec == "match_quality":
                strong = ("email_sha256" in key_types) + ("phone_sha256" in key_types)
                values[f"{PREFIX}match_quality"] = ("low", "medium", "high")[strong]
            elif isinstance(traits.get(spec), dict):  # money per currency: one trait per currency
                for currency, amount in traits[spec].items():
                    values[f"{PREFIX}{spec}_{currency.lower()}"] = float(amount)
            elif traits.get(spec) is not None:
                values[f"{PREFIX}{spec}"] = traits[spec]
        return values
