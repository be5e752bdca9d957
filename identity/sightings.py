"""Turning what a caller sent into graph input: normalise each identifier, drop junk,
de-duplicate, and derive the links of one call.

A call that names several identifiers links them as a *star* from its strongest
identifier (lowest type priority, then type, then value), strongest partners first.
The star keeps a call's evidence about *whose* call it was: an event carrying
``user_id=B``, a device and a shared inbox links the device and the inbox to B, never
the device to the inbox, so a refusal of the inbox cannot drag the device elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from identity.identifiers import MAX_VALUE_LENGTH, RAW_INPUT_TYPES, Identifier, NormalizedIdentifier
from identity.policy import CompiledPolicy
from stitchgraph.errors import InvalidArgument

# Values of these input types are personal data: never echo them back or store them in history.
_PRIVATE_INPUT_TYPES = frozenset(RAW_INPUT_TYPES) | frozenset(RAW_INPUT_TYPES.values())


@dataclass(frozen=True, slots=True)
class Ignored:
    """An identifier of the request that did not become one, and why."""

    index: int
    type: str
    reason: str
    detail: str
    value: str | None  # only for non-personal types, for history


@dataclass(frozen=True)
class Sighting:
    """Identifiers seen together in one call, with the evidence's provenance."""

    identifiers: tuple[NormalizedIdentifier, ...]
    occurred_us: int
    event_id: str
    source: str
    request_id: str = ""
    forced: bool = False
    operator: str = ""
    ignored: tuple[Ignored, ...] = field(default=())
    # Position of each identifier in the caller's request (for reporting), parallel to ``identifiers``.
    positions: tuple[int, ...] = field(default=())
    # Identifiers erased after this evidence: they shape the star but link nothing.
    erased: frozenset[Identifier] = frozenset()

    def kept(self) -> list[NormalizedIdentifier]:
        return [n for n in self.identifiers if n.identifier not in self.erased]

    def ordered(self, priority_of: dict[str, int]) -> list[Identifier]:
        """The call's identifiers, strongest first."""
        return sorted({n.identifier for n in self.identifiers},
                      key=lambda i: (priority_of.get(i.type, 10_000), i.type, i.value))

    def star(self, priority_of: dict[str, int]) -> list[tuple[Identifier, Identifier, int]]:
        """The call's links as (strong, partner, rank) in rank order. The star is drawn
        over every identifier the call named; links touching an erased one are left out,
        so the remaining identifiers are never linked to each other instead."""
        ids = self.ordered(priority_of)
        if not ids:
            return []
        primary = ids[0]
        return [(primary, other, rank) for rank, other in enumerate(ids[1:])
                if primary not in self.erased and other not in self.erased]


def to_micros(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def derived_event_id(source: str, occurred_us: int, identifiers: Sequence[Identifier]) -> str:
    """The event ID of evidence that came without one: a hash of what it says, so a
    retry of the same call maps to the same evidence."""
    material = "\x00".join([source, str(occurred_us), *sorted(i.key for i in identifiers)])
    return "sg_" + hashlib.sha256(material.encode()).hexdigest()[:32]


def prepare_identifiers(
    policy: CompiledPolicy,
    raw: Sequence[tuple[str, str]],
    *,
    field_prefix: str = "identifiers",
) -> tuple[list[NormalizedIdentifier], list[Ignored], list[int]]:
    """Normalise ``raw`` (type, value) pairs under ``policy``.

    Returns the distinct identifiers, the ones ignored as junk, and each kept identifier's
    position in ``raw``. Raises
    :class:`InvalidArgument` naming ``{field_prefix}[i].type`` or ``.value`` for the first
    invalid one (so nothing of a bad request is stored).
    """
    kept: dict[Identifier, NormalizedIdentifier] = {}
    positions: dict[Identifier, int] = {}  # first position of each identifier in the request
    ignored: list[Ignored] = []
    violations = []
    for index, (type_, value) in enumerate(raw):
        path = f"{field_prefix}[{index}]"
        shown = None if type_ in _PRIVATE_INPUT_TYPES else value[:64]
        # Junk is only recognised in an otherwise valid identifier: an unknown type or an
        # oversize value is an error even when it spells "null".
        known_type = type_ in RAW_INPUT_TYPES or policy.types.get(type_) is not None
        if known_type and value.strip() and len(value.strip()) <= MAX_VALUE_LENGTH:
            reason = policy.blocklist.match(type_, value)
            if reason is not None:
                ignored.append(Ignored(index, type_, "JUNK_VALUE", reason, shown))
                continue
        try:
            normalized = policy.normalizer.normalize(type_, value, field=f"{path}.value", type_field=f"{path}.type")
        except InvalidArgument as exc:
            violations.extend(exc.violations)
            continue
        reason = policy.blocklist.match(normalized.identifier.type, normalized.identifier.value)
        if reason is not None:
            ignored.append(Ignored(index, normalized.identifier.type, "JUNK_VALUE", reason, shown))
            continue
        previous = kept.get(normalized.identifier)
        if previous is None or (not previous.match_keys and normalized.match_keys):
            kept[normalized.identifier] = normalized
        positions.setdefault(normalized.identifier, index)
    if violations:
        raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations), violations=violations)
    return [kept[i] for i in positions], ignored, [positions[i] for i in positions]
