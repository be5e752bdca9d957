"""Junk identifier values: placeholders that would merge everyone if they became identifiers.

A junk value never becomes an identifier; the event that carried it still counts
(DESIGN §4). Values are matched after trimming and after stripping surrounding single or
double quotes (``"'null'"`` is as junk as ``null``, as PostHog found). Blank values are
always junk.

Where to apply it, per identifier in a request::

    reason = blocklist.match(type_, raw_value)            # raw trimmed value, before hashing
    if reason is None:
        normalized = normalizer.normalize(type_, raw_value)
        reason = blocklist.match(normalized.identifier.type, normalized.identifier.value)

The first call makes ``"undefined"`` sent as an ``email`` junk rather than an invalid email;
the second catches blocklisted hashes (a shared inbox's ``email_sha256``) of raw input.

Hashed values (64 hex characters under a hashed type, or under ``email``/``phone``) are only
compared with exact 64-hex entries: patterns and word lists never apply to them, so no real
hashed email can be dropped by a default. The defaults do include the SHA-256 of the empty
string, of 64 zeros and of each junk word — what a client produces by hashing a placeholder —
none of which can be the hash of a valid email or E.164 number.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from identity.identifiers import HASHED_VALUE_RE, RAW_INPUT_TYPES, IdentifierTypes
from identity.normalize import sha256_hex
from stitchgraph.errors import InvalidArgument

__all__ = ["DEFAULT_BLOCKLIST", "Blocklist", "BlocklistEntry"]

_QUOTES = ("'", '"')
# Values quoted in reasons are cut to this many characters.
_MAX_QUOTED = 40


@dataclass(frozen=True, slots=True)
class BlocklistEntry:
    """One blocklist rule: an exact ``value`` or a regex ``pattern`` (``re.fullmatch``).

    ``identifier_type`` limits the rule to one input or stored type (``None`` = all types).
    ``case_sensitive`` applies to both values and patterns. ``description``, if given, is shown
    in match reasons instead of the value (used for hashed defaults).
    """

    identifier_type: str | None = None
    value: str | None = None
    pattern: str | None = None
    case_sensitive: bool = False
    description: str | None = None


# Stricter than PostHog on case: PostHog blocks "NaN", "None", "none", "null", "0" and
# "[object Object]" only as cased, so "NULL" (what SQL exports write) would pass. Every default
# here is case-insensitive because a junk value that slips through merges everyone, while a
# wrongly dropped one costs a single identifier no real person would carry.
_JUNK_WORDS: tuple[str, ...] = (
    # PostHog, case-insensitive list
    "anonymous",
    "guest",
    "distinctid",
    "distinct_id",
    "id",
    "not_authenticated",
    "email",
    "undefined",
    "true",
    "false",
    # PostHog, case-sensitive list (made case-insensitive, see above); "nan" is also DESIGN's
    "[object Object]",
    "NaN",
    "None",
    "null",
    "0",
    # Segment's suggestions ("^[0-]*$" is a pattern below)
    "-1",
    "void",
    "abc123",
    # other stringified nulls and placeholders
    "unknown",
    "n/a",
    "nil",
    "<nil>",
    "(null)",
    "(none)",
    "{}",
    "[]",
    "test",
    "user",
    "00000000-0000-0000-0000-000000000000",
)


def _default_entries() -> tuple[BlocklistEntry, ...]:
    words = [BlocklistEntry(value=word) for word in _JUNK_WORDS]
    # Segment's suggested default: any run of zeros and dashes ("000", "0-0", the nil UUID...).
    patterns = [BlocklistEntry(pattern=r"^[0-]*$")]
    # Clients that hash placeholders: hash of "", of each word as sent and lower-cased (platform
    # rules lower-case before hashing), and the all-zero digest some SDKs emit.
    hashed_sources = [""] + [w for word in _JUNK_WORDS for w in dict.fromkeys((word, word.lower()))]
    hashed = [
        BlocklistEntry(value=sha256_hex(source), description=f"blocklisted value: the SHA-256 of '{source}'")
        for source in dict.fromkeys(hashed_sources)
    ]
    hashed.append(BlocklistEntry(value="0" * 64, description="blocklisted value: an all-zero SHA-256"))
    return (*words, *patterns, *hashed)


#: The blocklist every deployment starts from (configured entries are added to it).
DEFAULT_BLOCKLIST: tuple[BlocklistEntry, ...] = _default_entries()


@dataclass(frozen=True, slots=True)
class _Pattern:
    index: int
    identifier_type: str | None
    regex: re.Pattern[str]
    reason: str


def _quote(text: str) -> str:
    return f"'{text}'" if len(text) <= _MAX_QUOTED else f"'{text[:_MAX_QUOTED]}…'"


def _unquote(value: str) -> list[str]:
    """Return the trimmed value followed by each successively unquoted form."""
    current = value.strip()
    forms = [current]
    while len(current) >= 2 and current[0] in _QUOTES and current[-1] == current[0]:
        current = current[1:-1].strip()
        forms.append(current)
    return forms


class Blocklist:
    """A compiled set of :class:`BlocklistEntry` rules; see the module docstring for use."""

    __slots__ = ("_any_exact", "_any_pattern", "_exact_ci", "_exact_cs", "_hashed", "_hashed_types", "_patterns")

    def __init__(
        self,
        entries: Iterable[BlocklistEntry] = DEFAULT_BLOCKLIST,
        *,
        types: IdentifierTypes | None = None,
        field: str = "blocklist",
    ) -> None:
        """Validate and compile ``entries`` (regexes are compiled here, once).

        ``types`` is the registry in force (built-ins only when ``None``); it tells which types
        are hashed and which type names an entry may name. Raises :class:`InvalidArgument`
        with the path ``{field}[i]...`` of the first invalid entry: an unknown type, neither or
        both of value and pattern, a blank value, an invalid regex, or a pattern or non-hex
        value for a hashed type.
        """
        registry = types if types is not None else IdentifierTypes()
        self._hashed_types = frozenset([*RAW_INPUT_TYPES, *(t.name for t in registry if t.hashed)])
        known_types = {*RAW_INPUT_TYPES, *registry.names}
        # Per entry type: matched text -> (entry index, reason). The lowest index wins on ties,
        # so the reason reported never depends on dict or set order.
        self._exact_cs: dict[str | None, dict[str, tuple[int, str]]] = {}
        self._exact_ci: dict[str | None, dict[str, tuple[int, str]]] = {}
        self._hashed: dict[str | None, dict[str, tuple[int, str]]] = {}
        self._patterns: list[_Pattern] = []
        for index, entry in enumerate(entries):
            self._add(index, entry, f"{field}[{index}]", known_types)
        # A coarse filter that lets the common case (not junk) out with one set lookup and
        # one regex: every exact value case-folded, every pattern in one alternation.
        self._any_exact = frozenset(
            key.casefold() for table in (self._exact_cs, self._exact_ci) for values in table.values() for key in values)
        self._any_pattern = re.compile("|".join(f"(?:{p.regex.pattern})" for p in self._patterns),
                                       re.IGNORECASE) if self._patterns else None

    def _add(self, index: int, entry: BlocklistEntry, path: str, known_types: set[str]) -> None:
        type_ = entry.identifier_type
        if type_ is not None and type_ not in known_types:
            raise InvalidArgument.for_field(
                f"{path}.identifier_type",
                f"is not a known identifier type; known: {', '.join(sorted(known_types))}",
            )
        if not isinstance(entry.case_sensitive, bool):
            raise InvalidArgument.for_field(f"{path}.case_sensitive", "must be true or false")
        if (entry.value is None) == (entry.pattern is None):
            raise InvalidArgument.for_field(path, "give exactly one of value and pattern")
        hashed_type = type_ is not None and type_ in self._hashed_types and type_ not in RAW_INPUT_TYPES
        if entry.pattern is not None:
            if not isinstance(entry.pattern, str):
                raise InvalidArgument.for_field(f"{path}.pattern", "must be a string")
            if hashed_type:
                raise InvalidArgument.for_field(
                    f"{path}.pattern", f"{type_} values are hashed: only exact 64-hex values can be blocked"
                )
            try:
                regex = re.compile(entry.pattern, 0 if entry.case_sensitive else re.IGNORECASE)
            except re.error as exc:
                raise InvalidArgument.for_field(
                    f"{path}.pattern", f"is not a valid regular expression: {exc.msg}"
                ) from None
            reason = entry.description or f"matches blocklist pattern {_quote(entry.pattern)}"
            self._patterns.append(_Pattern(index, type_, regex, reason))
            return
        value = entry.value
        if not isinstance(value, str):
            raise InvalidArgument.for_field(f"{path}.value", "must be a string")
        value = value.strip()
        if not value:
            raise InvalidArgument.for_field(f"{path}.value", "is blank (blank values are always junk)")
        is_hash = HASHED_VALUE_RE.fullmatch(value) is not None
        if entry.description:
            reason = entry.description
        elif type_ in RAW_INPUT_TYPES and not is_hash:
            # A raw email or phone from the configuration: reasons get logged and stored with
            # refusals, so name the entry rather than quote the address.
            reason = f"blocklisted {type_} (blocklist entry {index})"
        else:
            reason = f"blocklisted value {_quote(value)}"
        if is_hash:
            # Hashes of raw input are stored under the hashed type; file them there so the check
            # after normalisation finds them too.
            scope = RAW_INPUT_TYPES.get(type_, type_) if type_ is not None else None
            self._hashed.setdefault(scope, {}).setdefault(value.lower(), (index, reason))
        elif hashed_type:
            raise InvalidArgument.for_field(
                f"{path}.value", f"{type_} values are SHA-256 hex digests (64 hex characters)"
            )
        # A 64-hex entry also counts as an ordinary value, for unhashed types such as user_id.
        if entry.case_sensitive:
            self._exact_cs.setdefault(type_, {}).setdefault(value, (index, reason))
        else:
            self._exact_ci.setdefault(type_, {}).setdefault(value.casefold(), (index, reason))

    @classmethod
    def from_config(
        cls,
        entries: Iterable[BlocklistEntry | Mapping[str, Any]],
        *,
        types: IdentifierTypes | None = None,
        include_defaults: bool = True,
        field: str = "blocklist",
    ) -> Blocklist:
        """Return a blocklist of the configured ``entries``, followed by the defaults.

        Each entry is a :class:`BlocklistEntry` or a mapping with its field names
        (``identifier_type``, ``value``, ``pattern``, ``case_sensitive``, ``description``).
        Raises :class:`InvalidArgument` naming ``{field}[i]`` (the index in ``entries``) for
        an unknown key, a wrongly typed field or any error :class:`Blocklist` reports.
        """
        allowed = {f.name for f in fields(BlocklistEntry)}
        parsed: list[BlocklistEntry] = []
        for index, raw in enumerate(entries):
            if isinstance(raw, BlocklistEntry):
                parsed.append(raw)
                continue
            if not isinstance(raw, Mapping):
                raise InvalidArgument.for_field(f"{field}[{index}]", "must be a table of blocklist fields")
            for key in raw:
                if key not in allowed:
                    raise InvalidArgument.for_field(
                        f"{field}[{index}].{key}",
                        f"is not a blocklist field; known: {', '.join(sorted(allowed))}",
                    )
            for key in ("identifier_type", "value", "pattern", "description"):
                if raw.get(key) is not None and not isinstance(raw[key], str):
                    raise InvalidArgument.for_field(f"{field}[{index}].{key}", "must be a string")
            parsed.append(BlocklistEntry(**raw))
        # Configured entries come first so their indices in errors match the configuration.
        return cls([*parsed, *(DEFAULT_BLOCKLIST if include_defaults else ())], types=types, field=field)

    def match(self, type_: str, value: str) -> str | None:
        """Return why ``value`` of type ``type_`` is junk, or ``None`` if it is not.

        ``type_`` is the input type (``email``, ``user_id``...) or a stored type. The reason is
        short and human-readable, e.g. ``"blocklisted value 'null'"``; it quotes blocklist
        entries, never the value itself, so it is safe to log for raw emails and phones.
        """
        forms = _unquote(value)
        if not forms[-1]:
            return "blank value"
        if not (type_ in self._hashed_types and HASHED_VALUE_RE.fullmatch(forms[-1])) and not any(
                f.casefold() in self._any_exact for f in forms) and (
                self._any_pattern is None or not any(self._any_pattern.fullmatch(f) for f in forms)):
            return None
        scopes = (None, type_, RAW_INPUT_TYPES.get(type_, type_))
        if type_ in self._hashed_types and HASHED_VALUE_RE.fullmatch(forms[-1]):
            return self._best(self._hashed, scopes, [forms[-1].lower()])
        best: tuple[int, str] | None = None
        for found in (
            self._best_hit(self._exact_cs, scopes, forms),
            self._best_hit(self._exact_ci, scopes, [f.casefold() for f in forms]),
        ):
            if found is not None and (best is None or found < best):
                best = found
        for pattern in self._patterns:
            if best is not None and pattern.index > best[0]:
                break  # patterns are in index order; nothing later can win
            if pattern.identifier_type in scopes and any(pattern.regex.fullmatch(f) for f in forms):
                best = (pattern.index, pattern.reason)
                break
        return best[1] if best is not None else None

    @staticmethod
    def _best_hit(
        table: dict[str | None, dict[str, tuple[int, str]]], scopes: tuple[str | None, ...], forms: list[str]
    ) -> tuple[int, str] | None:
        hits = [
            hit
            for scope in dict.fromkeys(scopes)
            if (values := table.get(scope))
            for form in forms
            if (hit := values.get(form)) is not None
        ]
        return min(hits) if hits else None

    @classmethod
    def _best(
        cls,
        table: dict[str | None, dict[str, tuple[int, str]]],
        scopes: tuple[str | None, ...],
        forms: list[str],
    ) -> str | None:
        hit = cls._best_hit(table, scopes, forms)
        return hit[1] if hit is not None else None
