"""The identity policy in force: identifier types, per-type limits, caps and the
blocklist. It is stored in the database (so every server process applies the same
one) and seeded from configuration on first start; operators change it through the
API, after a dry run if they like (:func:`identity.operations.preview_policy`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from identity.blocklist import Blocklist, BlocklistEntry
from identity.graph import Limits
from identity.identifiers import IdentifierType, IdentifierTypes
from identity.normalize import Normalizer
from stitchgraph.errors import InvalidArgument

DEFAULT_MAX_IDENTIFIERS = 1000
DEFAULT_MAX_MERGES = 100


@dataclass(frozen=True)
class IdentityPolicy:
    """A complete, validated policy. ``type_limits`` overrides the ``max_per_person`` of
    any type, built-in or custom (``None`` = unlimited); ``blocklist`` holds the entries
    added to the always-on defaults."""

    custom_types: tuple[IdentifierType, ...] = ()
    type_limits: Mapping[str, int | None] = field(default_factory=dict)
    max_identifiers: int = DEFAULT_MAX_IDENTIFIERS
    max_merges: int = DEFAULT_MAX_MERGES
    blocklist: tuple[BlocklistEntry, ...] = ()
    default_phone_region: str | None = "US"

    def __post_init__(self) -> None:
        types = self.types  # validates custom types
        for name, limit in self.type_limits.items():
            if types.get(name) is None:
                raise InvalidArgument.for_field(f"types[{name}]", "unknown identifier type")
            if limit is not None and limit < 1:
                raise InvalidArgument.for_field(f"types[{name}].max_per_person", "must be positive or 0 (unlimited)")
        if self.max_identifiers < 2:
            raise InvalidArgument.for_field("max_identifiers_per_person", "must be at least 2")
        if self.max_merges < 1:
            raise InvalidArgument.for_field("max_merges_per_person", "must be at least 1")
        Blocklist.from_config(self.blocklist, types=types)  # validates entries

    @property
    def types(self) -> IdentifierTypes:
        return IdentifierTypes(self.custom_types, field="types")

    def limit_of(self, type_name: str) -> int | None:
        if type_name in self.type_limits:
            return self.type_limits[type_name]
        identifier_type = self.types.get(type_name)
        return identifier_type.max_per_person if identifier_type else None

    def limits(self) -> Limits:
        limited = {}
        for identifier_type in self.types:
            limit = self.limit_of(identifier_type.name)
            if limit is not None:
                limited[identifier_type.name] = limit
        return Limits(type_limits=limited, max_identifiers=self.max_identifiers, max_merges=self.max_merges)

    def build_blocklist(self) -> Blocklist:
        return Blocklist.from_config(self.blocklist, types=self.types)

    def build_normalizer(self) -> Normalizer:
        return Normalizer(self.types, self.default_phone_region)

    def to_dict(self) -> dict[str, Any]:
        return {
            "custom_types": [
                {"name": t.name, "max_per_person": t.max_per_person, "priority": t.priority, "hashed": t.hashed}
                for t in self.custom_types
            ],
            "type_limits": dict(sorted(self.type_limits.items())),
            "max_identifiers": self.max_identifiers,
            "max_merges": self.max_merges,
            "blocklist": [
                {k: v for k, v in (("identifier_type", e.identifier_type), ("value", e.value),
                                    ("pattern", e.pattern), ("case_sensitive", e.case_sensitive),
                                    ("description", e.description)) if v not in (None, False)}
                for e in self.blocklist
            ],
            "default_phone_region": self.default_phone_region,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IdentityPolicy:
        return cls(
            custom_types=tuple(
                IdentifierType(t["name"], t.get("max_per_person"), t.get("priority", 100), t.get("hashed", False))
                for t in data.get("custom_types", [])
            ),
            type_limits=dict(data.get("type_limits", {})),
            max_identifiers=int(data.get("max_identifiers", DEFAULT_MAX_IDENTIFIERS)),
            max_merges=int(data.get("max_merges", DEFAULT_MAX_MERGES)),
            blocklist=tuple(BlocklistEntry(**e) for e in data.get("blocklist", [])),
            default_phone_region=data.get("default_phone_region", "US"),
        )

    @property
    def etag(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CompiledPolicy:
    """A policy with its derived helpers built once."""

    policy: IdentityPolicy
    types: IdentifierTypes
    limits: Limits
    blocklist: Blocklist
    normalizer: Normalizer

    @classmethod
    def build(cls, policy: IdentityPolicy) -> CompiledPolicy:
        return cls(policy, policy.types, policy.limits(), policy.build_blocklist(), policy.build_normalizer())

    def priority(self, type_name: str) -> int:
        identifier_type = self.types.get(type_name)
        # A type removed from configuration keeps its stored identifiers; rank it last.
        return identifier_type.priority if identifier_type else 10_000
