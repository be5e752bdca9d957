"""Identifier types and the value objects that carry identifiers through the engine.

An *identifier* is a ``(type, value)`` pair (DESIGN §4). Five types are built in; more can be
configured. Raw emails and phone numbers arrive under the *input* names ``email`` and
``phone`` and are stored only as ``email_sha256`` / ``phone_sha256`` (see
:mod:`identity.normalize`), so ``email`` and ``phone`` are never identifier types themselves.

Nothing here does I/O; everything is immutable and safe to share between threads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from stitchgraph.errors import InvalidArgument

__all__ = [
    "ANONYMOUS_ID",
    "BUILTIN_TYPES",
    "CRM_ID",
    "DEFAULT_CUSTOM_PRIORITY",
    "EMAIL_SHA256",
    "GOOGLE_EMAIL_SHA256",
    "HASHED_VALUE_RE",
    "MAX_VALUE_LENGTH",
    "META_PHONE_SHA256",
    "PHONE_SHA256",
    "RAW_INPUT_TYPES",
    "TYPE_NAME_RE",
    "USER_ID",
    "Identifier",
    "IdentifierType",
    "IdentifierTypes",
    "MatchKey",
    "NormalizedIdentifier",
]

#: Longest stored value (after trimming) of an unhashed identifier type, in characters.
MAX_VALUE_LENGTH = 256

#: Priority given to a configured type when its configuration names none.
DEFAULT_CUSTOM_PRIORITY = 100

#: What an identifier type name must look like (also keeps names safe to quote in errors).
TYPE_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")

#: A SHA-256 digest as sent by a client (any case); stored values are lower-case.
HASHED_VALUE_RE = re.compile(r"[0-9a-fA-F]{64}")

#: Platform keys of the per-platform match keys (see :class:`MatchKey`).
GOOGLE_EMAIL_SHA256 = "google_email_sha256"
META_PHONE_SHA256 = "meta_phone_sha256"


@dataclass(frozen=True, slots=True)
class IdentifierType:
    """How one kind of identifier behaves in the identity graph.

    ``max_per_person`` is the most values of this type one person may hold (``None`` =
    unlimited); a link that would exceed it is refused. ``priority`` orders types when the
    graph breaks ties (lower = stronger anchor, earlier). ``hashed`` types only accept a
    SHA-256 digest (64 hex characters), stored lower-cased.
    """

    name: str
    max_per_person: int | None
    priority: int = DEFAULT_CUSTOM_PRIORITY
    hashed: bool = False


USER_ID = IdentifierType("user_id", max_per_person=1, priority=0)
CRM_ID = IdentifierType("crm_id", max_per_person=1, priority=1)
EMAIL_SHA256 = IdentifierType("email_sha256", max_per_person=5, priority=2, hashed=True)
PHONE_SHA256 = IdentifierType("phone_sha256", max_per_person=5, priority=3, hashed=True)
ANONYMOUS_ID = IdentifierType("anonymous_id", max_per_person=None, priority=1000)

#: Source-specific device-level IDs the source mappings produce: Heap's own user ID (per
#: browser/device until identified) and a PostHog distinct ID of unknown kind (cohort imports).
#: Like anonymous IDs they are unlimited per person and never anchor one ahead of a real ID.
HEAP_USER_ID = IdentifierType("heap_user_id", max_per_person=None, priority=900)
POSTHOG_DISTINCT_ID = IdentifierType("posthog_distinct_id", max_per_person=None, priority=950)

#: The built-in types by name.
BUILTIN_TYPES: Mapping[str, IdentifierType] = MappingProxyType(
    {t.name: t for t in (USER_ID, CRM_ID, EMAIL_SHA256, PHONE_SHA256, ANONYMOUS_ID, HEAP_USER_ID,
                         POSTHOG_DISTINCT_ID)}
)

#: Input-only type names for raw contact data, each mapped to the type it is stored as.
RAW_INPUT_TYPES: Mapping[str, str] = MappingProxyType(
    {"email": EMAIL_SHA256.name, "phone": PHONE_SHA256.name}
)


@dataclass(frozen=True, slots=True, order=True)
class Identifier:
    """A stored identifier: ``type`` is a registered type name, ``value`` its normalised value.

    Instances order by ``(type, value)``, which gives the graph a deterministic order.
    Build them through :class:`identity.normalize.Normalizer` from client input; this class
    does not validate, so rows read back from the store are cheap to rebuild.
    """

    type: str
    value: str

    @property
    def key(self) -> str:
        """Return ``"type:value"``, a single string that identifies this identifier."""
        return f"{self.type}:{self.value}"


@dataclass(frozen=True, slots=True)
class MatchKey:
    """A platform-specific hash of the same raw value, for platforms whose normalisation differs.

    ``identifier_type`` is the canonical type it belongs to (``email_sha256``),
    ``platform_key`` names the platform rule (``google_email_sha256``, ``meta_phone_sha256``),
    ``value`` is the lower-case SHA-256 hex digest.
    """

    identifier_type: str
    platform_key: str
    value: str


@dataclass(frozen=True, slots=True)
class NormalizedIdentifier:
    """The result of normalising one client identifier.

    ``match_keys`` holds only the platform hashes that differ from ``identifier.value``; it is
    empty when the client sent a hash (the raw value, needed to derive them, is unknown).
    """

    identifier: Identifier
    match_keys: tuple[MatchKey, ...] = ()


class IdentifierTypes:
    """The registry of identifier types in force: the built-ins plus configured ones.

    Iteration yields every type ordered by ``(priority, name)``.
    """

    __slots__ = ("_types",)

    def __init__(self, custom: Iterable[IdentifierType] = (), *, field: str = "identifier_types") -> None:
        """Register the built-ins and ``custom``.

        Raises :class:`InvalidArgument` (field ``{field}[i]...``) when a custom type's name is
        malformed, repeated, a built-in or a raw input name (``email``/``phone``), when its
        ``max_per_person`` is below 1, or when its ``priority`` is not an integer.
        """
        types: dict[str, IdentifierType] = dict(BUILTIN_TYPES)
        for index, type_ in enumerate(custom):
            path = f"{field}[{index}]"
            name = type_.name
            if not isinstance(name, str) or not TYPE_NAME_RE.fullmatch(name):
                raise InvalidArgument.for_field(
                    f"{path}.name",
                    "must start with a lower-case letter and contain only a-z, 0-9 and '_' "
                    "(at most 64 characters)",
                )
            if name in RAW_INPUT_TYPES:
                raise InvalidArgument.for_field(
                    f"{path}.name",
                    f"'{name}' is reserved for raw input, which is stored as '{RAW_INPUT_TYPES[name]}'",
                )
            if name in BUILTIN_TYPES:
                raise InvalidArgument.for_field(f"{path}.name", f"'{name}' is a built-in type")
            if name in types:
                raise InvalidArgument.for_field(f"{path}.name", f"'{name}' is configured twice")
            limit = type_.max_per_person
            # bool is an int subclass; True as a limit is a configuration mistake, not 1.
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                raise InvalidArgument.for_field(
                    f"{path}.max_per_person", "must be a positive integer, or unset for unlimited"
                )
            if isinstance(type_.priority, bool) or not isinstance(type_.priority, int):
                raise InvalidArgument.for_field(f"{path}.priority", "must be an integer")
            if not isinstance(type_.hashed, bool):
                raise InvalidArgument.for_field(f"{path}.hashed", "must be true or false")
            types[name] = type_
        # Insert in iteration order once, so __iter__ needs no sort.
        self._types: Mapping[str, IdentifierType] = MappingProxyType(
            {t.name: t for t in sorted(types.values(), key=lambda t: (t.priority, t.name))}
        )

    def get(self, name: str) -> IdentifierType | None:
        """Return the type called ``name``, or ``None`` when no such type is registered."""
        return self._types.get(name)

    def priority(self, name: str) -> int:
        """Return the priority of the type called ``name``; raises ``KeyError`` if unknown."""
        type_ = self._types.get(name)
        if type_ is None:
            raise KeyError(f"unknown identifier type '{name}'")
        return type_.priority

    @property
    def names(self) -> tuple[str, ...]:
        """Return the registered type names, ordered by ``(priority, name)``."""
        return tuple(self._types)

    def __iter__(self) -> Iterator[IdentifierType]:
        return iter(self._types.values())

    def __len__(self) -> int:
        return len(self._types)

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __repr__(self) -> str:
        return f"IdentifierTypes({', '.join(self._types)})"
