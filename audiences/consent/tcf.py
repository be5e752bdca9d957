"""A small decoder for IAB TCF v2.x TC strings and the TCF 2.2 purpose rules (sources-and-consent spec §5.4).

A TC string is base64url (no padding) segments joined by ".": the core segment first, then optional
DisclosedVendors (segment type 1, mandatory for new strings from TCF 2.3), AllowedVendors (type 2, legacy) and
PublisherTC (type 3) segments, each in the bit layout of the IAB "Transparency and Consent String and Global
Vendor List Format v2" specification. Bits are read most-significant first; each base64url character carries 6
bits, and trailing padding bits are ignored.

:func:`decode` accepts only strings that are valid under TCF 2.2: Version 2, TcfPolicyVersion 4 or later, and
IsServiceSpecific = 1 (globally-scoped strings are deprecated). ``strict=False`` skips the last two checks,
which is useful to inspect older strings; nothing in the consent pipeline uses it.

:func:`allowed_purposes` applies the TCF 2.2 rules to a decoded string: purpose consent, or legitimate interest
only where TCF allows it (never purposes 1, 3, 4, 5 and 6), and, for a given vendor, the vendor's consent or
legitimate-interest bit and the publisher restrictions for that vendor.

No I/O and no Global Vendor List: what a vendor declared in the GVL (which purposes it uses under consent, under
legitimate interest, or flexibly) is not known here; see :func:`purpose_status` for the resulting simplification.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

#: Input longer than this is rejected before decoding (real TC strings are a few kilobytes at most).
MAX_TC_STRING_LENGTH = 65_536
#: Upper bound on the vendor IDs all publisher restrictions may list together, after expanding ranges; a string
#: that asks for more is rejected rather than expanded (a handful of range entries can cover 65,535 vendors each).
MAX_RESTRICTED_VENDORS = 262_144

#: Purposes defined by TCF 2.2.
PURPOSES = range(1, 12)
#: Purposes for which legitimate interest is never a valid legal basis: purpose 1 is consent-only, and TCF 2.2
#: removed legitimate interest for purposes 3-6. A set LI bit for them is ignored.
LI_FORBIDDEN_PURPOSES = frozenset({1, 3, 4, 5, 6})

#: Publisher restriction types.
RESTRICTION_NOT_ALLOWED = 0
RESTRICTION_REQUIRE_CONSENT = 1
RESTRICTION_REQUIRE_LI = 2

CONSENT = "consent"
LEGITIMATE_INTEREST = "legitimate_interest"

SEGMENT_CORE = 0
SEGMENT_DISCLOSED_VENDORS = 1
SEGMENT_ALLOWED_VENDORS = 2
SEGMENT_PUBLISHER_TC = 3

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SEXTETS = {char: index for index, char in enumerate(_ALPHABET)}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TcfError(ValueError):
    """The TC string cannot be used; ``reason`` says why, in a sentence fragment."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PublisherRestriction(NamedTuple):
    """A publisher restriction: ``(purpose_id, restriction_type, vendor_ids)``. Types: 0 = purpose not allowed,
    1 = require consent, 2 = require legitimate interest (3 is undefined and ignored by the rules)."""

    purpose_id: int
    restriction_type: int
    vendor_ids: frozenset[int]


@dataclass(frozen=True)
class PublisherTC:
    """The PublisherTC segment: the publisher's own purposes and custom purposes."""

    purpose_consents: frozenset[int]
    purpose_li: frozenset[int]
    num_custom_purposes: int
    custom_purpose_consents: frozenset[int]
    custom_purpose_li: frozenset[int]


@dataclass(frozen=True)
class TCString:
    """A decoded TC string. Bit sets are the 1-based IDs whose bit is set."""

    version: int
    created: datetime
    last_updated: datetime
    cmp_id: int
    cmp_version: int
    consent_screen: int
    consent_language: str
    vendor_list_version: int
    tcf_policy_version: int
    is_service_specific: bool
    use_non_standard_texts: bool
    special_feature_opt_ins: frozenset[int]
    purpose_consents: frozenset[int]
    purpose_li: frozenset[int]
    purpose_one_treatment: bool
    publisher_cc: str
    vendor_consents: frozenset[int]
    vendor_li: frozenset[int]
    restrictions: tuple[PublisherRestriction, ...] = ()
    #: DisclosedVendors segment, when present.
    disclosed_vendors: frozenset[int] | None = None
    #: AllowedVendors segment (legacy), when present.
    allowed_vendors: frozenset[int] | None = None
    #: PublisherTC segment, when present.
    publisher_tc: PublisherTC | None = None

    def restriction_types(self, purpose_id: int, vendor_id: int) -> frozenset[int]:
        """The restriction types the publisher set for ``vendor_id`` on ``purpose_id``."""
        return frozenset(
            r.restriction_type for r in self.restrictions if r.purpose_id == purpose_id and vendor_id in r.vendor_ids
        )


class _Bits:
    """Reads big-endian bit fields from a base64url segment."""

    def __init__(self, segment: str, index: int) -> None:
        sextets = []
        for position, char in enumerate(segment):
            sextet = _SEXTETS.get(char)
            if sextet is None:
                raise TcfError(
                    f"segment {index + 1} contains {char!r} at position {position + 1}, which is not base64url"
                )
            sextets.append(sextet)
        self._bits = "".join(f"{sextet:06b}" for sextet in sextets)
        self._position = 0
        self._segment = index

    def _take(self, width: int, name: str) -> str:
        end = self._position + width
        if end > len(self._bits):
            raise TcfError(f"segment {self._segment + 1} is truncated: it ends before {name}")
        chunk = self._bits[self._position:end]
        self._position = end
        return chunk

    def read(self, width: int, name: str) -> int:
        return int(self._take(width, name), 2) if width else 0

    def flag(self, name: str) -> bool:
        return self.read(1, name) == 1

    def bit_set(self, width: int, name: str) -> frozenset[int]:
        """A bitfield of ``width`` bits: the 1-based positions that are set."""
        chunk = self._take(width, name)
        return frozenset(index + 1 for index, bit in enumerate(chunk) if bit == "1")

    def letters(self, name: str) -> str:
        letters = []
        for _ in range(2):
            letter = self.read(6, name)
            if letter > 25:
                raise TcfError(f"{name} is not two letters (letter value {letter} is out of range)")
            letters.append(chr(ord("A") + letter))
        return "".join(letters)

    def deciseconds(self, name: str) -> datetime:
        return _EPOCH + timedelta(milliseconds=100 * self.read(36, name))

    def ranges(self, name: str) -> list[tuple[int, int]]:
        """NumEntries(12) then [IsARange(1), StartOrOnlyVendorId(16), EndVendorId(16) if a range]."""
        entries: list[tuple[int, int]] = []
        for _ in range(self.read(12, f"{name} NumEntries")):
            is_range = self.flag(f"{name} IsARange")
            start = self.read(16, f"{name} StartOrOnlyVendorId")
            end = self.read(16, f"{name} EndVendorId") if is_range else start
            if start < 1:
                raise TcfError(f"{name} lists vendor ID 0")
            if end < start:
                raise TcfError(f"{name} has a range {start}-{end} that ends before it starts")
            entries.append((start, end))
        return entries

    def vendors(self, name: str) -> frozenset[int]:
        """MaxVendorId(16), IsRangeEncoding(1), then a bitfield of MaxVendorId bits or range entries."""
        max_vendor_id = self.read(16, f"{name} MaxVendorId")
        if not self.flag(f"{name} IsRangeEncoding"):
            return self.bit_set(max_vendor_id, f"{name} BitField")
        entries = self.ranges(name)
        for _start, end in entries:
            if end > max_vendor_id:
                raise TcfError(f"{name} lists vendor {end}, above its MaxVendorId {max_vendor_id}")
        return _expand(entries)


def decode(text: str, *, strict: bool = True) -> TCString:
    """Decode a TC string. Surrounding whitespace and base64 ``=`` padding are tolerated; anything else that is not
    a well-formed TCF v2 string raises :class:`TcfError`. With ``strict`` (the default) the string must also be
    valid under TCF 2.2: TcfPolicyVersion at least 4 and IsServiceSpecific = 1."""
    if not isinstance(text, str):
        raise TcfError(f"a TC string must be text, not {type(text).__name__}")
    text = text.strip()
    if not text:
        raise TcfError("the TC string is empty")
    if len(text) > MAX_TC_STRING_LENGTH:
        raise TcfError(f"the TC string is longer than {MAX_TC_STRING_LENGTH} characters")
    segments = [segment.strip().rstrip("=") for segment in text.split(".")]
    for index, segment in enumerate(segments):
        if not segment:
            raise TcfError(f"segment {index + 1} is empty")

    core = _Bits(segments[0], 0)
    version = core.read(6, "Version")
    if version != 2:
        raise TcfError(f"TC string version {version} is not supported (only TCF v2 strings, version 2)")
    tc = _decode_segments(_decode_core(core, version), segments[1:])
    if strict:
        if tc.tcf_policy_version < 4:
            raise TcfError(f"TCF policy version {tc.tcf_policy_version} predates TCF 2.2")
        if not tc.is_service_specific:
            raise TcfError("IsServiceSpecific is 0: globally-scoped TC strings are no longer valid")
    return tc


def _decode_core(bits: _Bits, version: int) -> TCString:
    # Keyword arguments are evaluated in order, which is the order of the fields in the string.
    tc = TCString(
        version=version,
        created=bits.deciseconds("Created"),
        last_updated=bits.deciseconds("LastUpdated"),
        cmp_id=bits.read(12, "CmpId"),
        cmp_version=bits.read(12, "CmpVersion"),
        consent_screen=bits.read(6, "ConsentScreen"),
        consent_language=bits.letters("ConsentLanguage"),
        vendor_list_version=bits.read(12, "VendorListVersion"),
        tcf_policy_version=bits.read(6, "TcfPolicyVersion"),
        is_service_specific=bits.flag("IsServiceSpecific"),
        use_non_standard_texts=bits.flag("UseNonStandardTexts"),
        special_feature_opt_ins=bits.bit_set(12, "SpecialFeatureOptIns"),
        purpose_consents=bits.bit_set(24, "PurposesConsent"),
        purpose_li=bits.bit_set(24, "PurposesLITransparency"),
        purpose_one_treatment=bits.flag("PurposeOneTreatment"),
        publisher_cc=bits.letters("PublisherCC"),
        vendor_consents=bits.vendors("vendor consent section"),
        vendor_li=bits.vendors("vendor legitimate interest section"),
    )
    # Group entries per (purpose, type): the spec allows one restriction per purpose and vendor, and merging keeps
    # the expansion bounded by the number of distinct pairs rather than the number of entries.
    grouped: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for _ in range(bits.read(12, "NumPubRestrictions")):
        purpose_id = bits.read(6, "publisher restriction PurposeId")
        restriction_type = bits.read(2, "publisher restriction RestrictionType")
        if purpose_id == 0:
            raise TcfError("a publisher restriction names purpose 0")
        grouped.setdefault((purpose_id, restriction_type), []).extend(bits.ranges("publisher restriction"))
    total = 0
    restrictions = []
    for (purpose_id, restriction_type), entries in grouped.items():
        total += _expanded_size(entries)
        if total > MAX_RESTRICTED_VENDORS:
            raise TcfError(f"publisher restrictions list more than {MAX_RESTRICTED_VENDORS} vendors")
        restrictions.append(PublisherRestriction(purpose_id, restriction_type, _expand(entries)))
    return replace(tc, restrictions=tuple(restrictions))


def _decode_segments(tc: TCString, segments: list[str]) -> TCString:
    seen: set[int] = set()
    for offset, segment in enumerate(segments, start=1):
        bits = _Bits(segment, offset)
        segment_type = bits.read(3, "SegmentType")
        if segment_type == SEGMENT_CORE:
            raise TcfError(f"segment {offset + 1} is a second core segment")
        if segment_type > SEGMENT_PUBLISHER_TC:
            raise TcfError(f"segment {offset + 1} has unknown segment type {segment_type}")
        if segment_type in seen:
            raise TcfError(f"segment {offset + 1} repeats segment type {segment_type}")
        seen.add(segment_type)
        if segment_type == SEGMENT_DISCLOSED_VENDORS:
            tc = replace(tc, disclosed_vendors=bits.vendors("DisclosedVendors segment"))
        elif segment_type == SEGMENT_ALLOWED_VENDORS:
            tc = replace(tc, allowed_vendors=bits.vendors("AllowedVendors segment"))
        else:
            purpose_consents = bits.bit_set(24, "PubPurposesConsent")
            purpose_li = bits.bit_set(24, "PubPurposesLITransparency")
            custom = bits.read(6, "NumCustomPurposes")
            publisher_tc = PublisherTC(
                purpose_consents=purpose_consents,
                purpose_li=purpose_li,
                num_custom_purposes=custom,
                custom_purpose_consents=bits.bit_set(custom, "CustomPurposesConsent"),
                custom_purpose_li=bits.bit_set(custom, "CustomPurposesLITransparency"),
            )
            tc = replace(tc, publisher_tc=publisher_tc)
    return tc


def _merge(entries: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(entries):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _expanded_size(entries: list[tuple[int, int]]) -> int:
    return sum(end - start + 1 for start, end in _merge(entries))


def _expand(entries: list[tuple[int, int]]) -> frozenset[int]:
    return frozenset(vendor for start, end in _merge(entries) for vendor in range(start, end + 1))


# --- TCF 2.2 purpose rules -------------------------------------------------------------------------------------


class PurposeStatus(NamedTuple):
    """Whether a TCF purpose is allowed: ``basis`` is "consent", "legitimate_interest" or ``None`` (not allowed);
    ``reason`` explains it in a sentence fragment."""

    purpose_id: int
    basis: str | None
    reason: str


def purpose_status(tc: TCString, purpose_id: int, vendor_id: int | None = None) -> PurposeStatus:
    """Apply the TCF 2.2 rules to one purpose (1-11).

    Without a vendor: allowed on consent when the purpose consent bit is set, else on legitimate interest when
    the purpose LI bit is set and LI is permitted for the purpose (never 1, 3, 4, 5, 6).

    With a vendor, the vendor's own bit is required as well (vendor consent for the consent basis, vendor LI for
    the LI basis), after the publisher restrictions for that vendor and purpose:

    * type 0 (purpose not allowed) blocks the purpose;
    * type 1 (require consent) rules out the LI basis;
    * type 2 (require legitimate interest) rules out the consent basis.

    Simplification: without the Global Vendor List we do not know whether the vendor declared the purpose as
    consent-based, LI-based or flexible, so either basis is accepted when its bits are set (consent first), and a
    type 2 restriction is applied as if the purpose were flexible for the vendor (only LI remains; for purposes
    where LI is forbidden nothing remains). Under the real rules a type 2 restriction on a purpose the vendor may
    only use with consent would also block it, so the result is never more permissive than TCF.
    ``purpose_one_treatment`` is not taken into account: purpose 1 needs its consent bit.
    """
    if purpose_id not in PURPOSES:
        return PurposeStatus(purpose_id, None, f"purpose {purpose_id} is not a TCF 2.2 purpose")
    restrictions = tc.restriction_types(purpose_id, vendor_id) if vendor_id is not None else frozenset[int]()
    vendor = f"vendor {vendor_id}" if vendor_id is not None else ""
    if RESTRICTION_NOT_ALLOWED in restrictions:
        return PurposeStatus(purpose_id, None, f"the publisher does not allow purpose {purpose_id} for {vendor}")
    consent_ok = RESTRICTION_REQUIRE_LI not in restrictions
    li_ok = RESTRICTION_REQUIRE_CONSENT not in restrictions and purpose_id not in LI_FORBIDDEN_PURPOSES

    reasons: list[str] = []
    if purpose_id not in tc.purpose_consents:
        reasons.append(f"no consent for purpose {purpose_id}")
    elif not consent_ok:
        reasons.append(f"the publisher requires legitimate interest for purpose {purpose_id} and {vendor}")
    elif vendor_id is not None and vendor_id not in tc.vendor_consents:
        reasons.append(f"no consent for {vendor}")
    else:
        detail = f" and {vendor}" if vendor_id is not None else ""
        return PurposeStatus(purpose_id, CONSENT, f"consent for purpose {purpose_id}{detail}")

    if purpose_id in LI_FORBIDDEN_PURPOSES:
        if purpose_id in tc.purpose_li:
            reasons.append(f"legitimate interest is not permitted for purpose {purpose_id} under TCF 2.2")
    elif purpose_id not in tc.purpose_li:
        reasons.append(f"no legitimate interest for purpose {purpose_id}")
    elif not li_ok:
        reasons.append(f"the publisher requires consent for purpose {purpose_id} and {vendor}")
    elif vendor_id is not None and vendor_id not in tc.vendor_li:
        reasons.append(f"no legitimate interest for {vendor}")
    else:
        detail = f" and {vendor}" if vendor_id is not None else ""
        return PurposeStatus(purpose_id, LEGITIMATE_INTEREST, f"legitimate interest for purpose {purpose_id}{detail}")
    return PurposeStatus(purpose_id, None, "; ".join(reasons))


def allowed_purposes(tc: TCString, vendor_id: int | None = None) -> dict[int, str]:
    """Purpose (1-11) → "consent" or "legitimate_interest" for every purpose allowed under the TCF 2.2 rules (see
    :func:`purpose_status`), optionally for one vendor."""
    allowed: dict[int, str] = {}
    for purpose_id in PURPOSES:
        status = purpose_status(tc, purpose_id, vendor_id)
        if status.basis is not None:
            allowed[purpose_id] = status.basis
    return allowed
