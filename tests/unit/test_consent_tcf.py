"""TCF v2.x TC string decoding and the TCF 2.2 purpose rules (sources-and-consent spec §5.4)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import pytest

from audiences.consent.tcf import (
    CONSENT,
    LEGITIMATE_INTEREST,
    MAX_RESTRICTED_VENDORS,
    PublisherRestriction,
    TcfError,
    TCString,
    allowed_purposes,
    decode,
    purpose_status,
)

# --- a small encoder, to build test vectors ---------------------------------------------------------------------

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
CREATED = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)

Restriction = tuple[int, int, Sequence[tuple[int, int]]]


def _int(value: int, width: int) -> str:
    assert 0 <= value < 1 << width, (value, width)
    return format(value, f"0{width}b")


def _bitfield(ids: Iterable[int], width: int) -> str:
    wanted = set(ids)
    return "".join("1" if i in wanted else "0" for i in range(1, width + 1))


def _letters(text: str) -> str:
    return "".join(_int(ord(c) - ord("A"), 6) for c in text)


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for vendor in sorted(set(ids)):
        if runs and vendor == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], vendor)
        else:
            runs.append((vendor, vendor))
    return runs


def _range_entries(entries: Sequence[tuple[int, int]]) -> str:
    bits = _int(len(entries), 12)
    for start, end in entries:
        bits += "1" + _int(start, 16) + _int(end, 16) if end != start else "0" + _int(start, 16)
    return bits


def _vendors(ids: Iterable[int], *, ranges: bool = False, max_vendor_id: int | None = None) -> str:
    ids = sorted(set(ids))
    top = max_vendor_id if max_vendor_id is not None else max(ids, default=0)
    if ranges:
        return _int(top, 16) + "1" + _range_entries(_runs(ids))
    return _int(top, 16) + "0" + _bitfield(ids, top)


def _b64(bits: str) -> str:
    bits += "0" * (-len(bits) % 6)
    return "".join(_ALPHABET[int(bits[i:i + 6], 2)] for i in range(0, len(bits), 6))


def _deciseconds(moment: datetime) -> int:
    return round(moment.timestamp() * 10)


def core_bits(
    *,
    version: int = 2,
    created: datetime = CREATED,
    last_updated: datetime | None = None,
    cmp_id: int = 7,
    cmp_version: int = 3,
    consent_screen: int = 1,
    language: str = "EN",
    vendor_list_version: int = 150,
    policy_version: int = 4,
    service_specific: bool = True,
    non_standard_texts: bool = False,
    special_features: Iterable[int] = (),
    purpose_consents: Iterable[int] = (),
    purpose_li: Iterable[int] = (),
    purpose_one_treatment: bool = False,
    publisher_cc: str = "DE",
    vendor_consents: Iterable[int] = (),
    vendor_li: Iterable[int] = (),
    vendor_ranges: bool = False,
    restrictions: Sequence[Restriction] = (),
) -> str:
    bits = (
        _int(version, 6)
        + _int(_deciseconds(created), 36)
        + _int(_deciseconds(last_updated or created), 36)
        + _int(cmp_id, 12)
        + _int(cmp_version, 12)
        + _int(consent_screen, 6)
        + _letters(language)
        + _int(vendor_list_version, 12)
        + _int(policy_version, 6)
        + ("1" if service_specific else "0")
        + ("1" if non_standard_texts else "0")
        + _bitfield(special_features, 12)
        + _bitfield(purpose_consents, 24)
        + _bitfield(purpose_li, 24)
        + ("1" if purpose_one_treatment else "0")
        + _letters(publisher_cc)
        + _vendors(vendor_consents, ranges=vendor_ranges)
        + _vendors(vendor_li, ranges=vendor_ranges)
        + _int(len(restrictions), 12)
    )
    for purpose, kind, entries in restrictions:
        bits += _int(purpose, 6) + _int(kind, 2) + _range_entries(entries)
    return bits


def encode(*segments: str, **core: object) -> str:
    """A TC string: the core segment built from ``core`` (see :func:`core_bits`), then ``segments``."""
    return ".".join([_b64(core_bits(**core)), *segments])  # type: ignore[arg-type]


def vendors_segment(kind: int, ids: Iterable[int], *, ranges: bool = False) -> str:
    return _b64(_int(kind, 3) + _vendors(ids, ranges=ranges))


def publisher_segment(consents: Iterable[int], li: Iterable[int], custom_consents: Iterable[int] = (),
                      custom_li: Iterable[int] = (), num_custom: int = 0) -> str:
    return _b64(_int(3, 3) + _bitfield(consents, 24) + _bitfield(li, 24) + _int(num_custom, 6)
                + _bitfield(custom_consents, num_custom) + _bitfield(custom_li, num_custom))


# --- decoding ---------------------------------------------------------------------------------------------------


def test_decodes_every_core_field() -> None:
    updated = datetime(2024, 5, 2, 8, 30, 15, 300000, tzinfo=UTC)
    tc = decode(encode(
        created=CREATED, last_updated=updated, cmp_id=300, cmp_version=12, consent_screen=5, language="FR",
        vendor_list_version=3000, policy_version=5, non_standard_texts=True, special_features=[1, 2],
        purpose_consents=[1, 2, 7, 10], purpose_li=[2, 9], purpose_one_treatment=True, publisher_cc="IT",
        vendor_consents=[1, 755, 1000], vendor_li=[3, 755],
    ))
    assert tc == TCString(
        version=2, created=CREATED, last_updated=updated, cmp_id=300, cmp_version=12, consent_screen=5,
        consent_language="FR", vendor_list_version=3000, tcf_policy_version=5, is_service_specific=True,
        use_non_standard_texts=True, special_feature_opt_ins=frozenset({1, 2}),
        purpose_consents=frozenset({1, 2, 7, 10}), purpose_li=frozenset({2, 9}), purpose_one_treatment=True,
        publisher_cc="IT", vendor_consents=frozenset({1, 755, 1000}), vendor_li=frozenset({3, 755}),
    )


def test_range_and_bitfield_vendor_encodings_decode_alike() -> None:
    consents = [*range(1, 40), 100, *range(700, 760), 1200]
    li = [5, 6, 7, 755]
    as_bits = decode(encode(vendor_consents=consents, vendor_li=li))
    as_ranges = decode(encode(vendor_consents=consents, vendor_li=li, vendor_ranges=True))
    assert as_bits.vendor_consents == as_ranges.vendor_consents == frozenset(consents)
    assert as_bits.vendor_li == as_ranges.vendor_li == frozenset(li)
    # The range form is the shorter one here.
    assert len(encode(vendor_consents=consents, vendor_ranges=True)) < len(encode(vendor_consents=consents))


def test_empty_vendor_sections() -> None:
    tc = decode(encode())
    assert tc.vendor_consents == tc.vendor_li == frozenset()
    assert tc.restrictions == ()
    assert tc.disclosed_vendors is None and tc.allowed_vendors is None and tc.publisher_tc is None


def test_bitfield_shorter_than_max_vendor_id_is_truncated() -> None:
    bits = core_bits()
    # Replace the empty vendor consent section (MaxVendorId 0, bitfield) by one announcing 2000 vendors.
    head = bits[: len(bits) - 2 * 17 - 12]
    with pytest.raises(TcfError, match="truncated"):
        decode(_b64(head + _int(2000, 16) + "0" + "1" * 50))


def test_publisher_restrictions() -> None:
    tc = decode(encode(restrictions=[
        (2, 0, [(10, 10), (20, 25)]),
        (7, 1, [(755, 755)]),
        (2, 0, [(24, 30)]),  # a second entry for the same purpose and type is merged
        (10, 2, [(1, 3)]),
    ]))
    assert tc.restrictions == (
        PublisherRestriction(2, 0, frozenset({10, *range(20, 31)})),
        PublisherRestriction(7, 1, frozenset({755})),
        PublisherRestriction(10, 2, frozenset({1, 2, 3})),
    )
    purpose, kind, vendors = tc.restrictions[1]  # a plain (purpose, type, vendor ids) tuple too
    assert (purpose, kind, vendors) == (7, 1, frozenset({755}))
    assert tc.restriction_types(2, 22) == {0}
    assert tc.restriction_types(2, 31) == frozenset()


def test_restrictions_expanding_to_too_many_vendors_are_rejected() -> None:
    everyone = [(1, 65535)]
    restrictions: list[Restriction] = [(purpose, kind, everyone) for purpose in range(1, 12) for kind in range(3)]
    assert len(restrictions) * 65535 > MAX_RESTRICTED_VENDORS
    with pytest.raises(TcfError, match="more than"):
        decode(encode(restrictions=restrictions))


def test_additional_segments() -> None:
    text = encode(
        vendors_segment(1, [1, 2, 755, 1000]),
        vendors_segment(2, range(10, 20), ranges=True),
        publisher_segment([1, 2], [7], custom_consents=[2], custom_li=[1, 3], num_custom=3),
    )
    tc = decode(text)
    assert tc.disclosed_vendors == frozenset({1, 2, 755, 1000})
    assert tc.allowed_vendors == frozenset(range(10, 20))
    assert tc.publisher_tc is not None
    assert tc.publisher_tc.purpose_consents == frozenset({1, 2})
    assert tc.publisher_tc.purpose_li == frozenset({7})
    assert tc.publisher_tc.num_custom_purposes == 3
    assert tc.publisher_tc.custom_purpose_consents == frozenset({2})
    assert tc.publisher_tc.custom_purpose_li == frozenset({1, 3})


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        (_b64(_int(0, 3) + "0" * 30), "second core segment"),
        (_b64(_int(5, 3) + "0" * 30), "unknown segment type 5"),
        ("", "segment 2 is empty"),
        ("I", "truncated"),
    ],
)
def test_bad_additional_segments(segment: str, message: str) -> None:
    with pytest.raises(TcfError, match=message):
        decode(encode(segment))


def test_repeated_segment_type_is_rejected() -> None:
    disclosed = vendors_segment(1, [1])
    with pytest.raises(TcfError, match="repeats segment type 1"):
        decode(encode(disclosed, disclosed))


def test_padding_and_surrounding_whitespace_are_tolerated() -> None:
    text = encode(vendors_segment(1, [3]), purpose_consents=[1], vendor_consents=[755])
    core, disclosed = text.split(".")
    padded = f"  {core}{'=' * (-len(core) % 4)}.{disclosed}==\n"
    assert decode(padded) == decode(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("CP+abc", "'\\+' at position 3"),
        ("CPab/c", "'/' at position 5"),
        ("CPabc defgh", "' ' at position 6"),
        ("CPab=cd", "'='"),
        ("COvFyGBOvFyGBAbAAAENAPCAAOAAAAAAAAAAAEEUACCKAAA.IFo!EUQ", "segment 2 contains '!'"),
        ("hello world", "' '"),
        ("Zm9vYmFy", "version 25"),  # base64url of "foobar": Version = 25
        ("A" * 12, "version 0"),
        ("C", "truncated"),
        ("CPz", "truncated: it ends before Created"),
        ("BOEFEAyOEFEAyAHABDENAI4AAAB9vABAASA", "version 1 is not supported"),  # a TCF v1.1 consent string
        ("CQ" + "A" * 500, r"predates TCF 2\.2"),  # zeros after Version: policy version 0
    ],
)
def test_garbage_is_rejected(text: str, message: str) -> None:
    with pytest.raises(TcfError, match=message):
        decode(text)


def test_non_text_is_rejected() -> None:
    with pytest.raises(TcfError, match="must be text"):
        decode(b"CQ" * 20)  # type: ignore[arg-type]


def test_overlong_input_is_rejected_before_decoding() -> None:
    with pytest.raises(TcfError, match="longer than"):
        decode("C" * 70_000)


def test_truncated_strings_are_rejected_at_every_cut() -> None:
    text = encode(purpose_consents=[1, 2], vendor_consents=[1, 2, 3], vendor_li=[4],
                  restrictions=[(2, 1, [(5, 9)])])
    full = core_bits(purpose_consents=[1, 2], vendor_consents=[1, 2, 3], vendor_li=[4],
                     restrictions=[(2, 1, [(5, 9)])])
    assert decode(text).restrictions
    for cut in range(1, len(full) // 6):  # every whole character short of the last field
        with pytest.raises(TcfError, match="truncated"):
            decode(text[:cut])


def test_error_is_a_value_error_with_a_reason() -> None:
    with pytest.raises(ValueError, match="truncated") as caught:
        decode("CQ")
    assert isinstance(caught.value, TcfError)
    assert caught.value.reason.startswith("segment 1 is truncated")


def test_policy_version_before_tcf_2_2_is_rejected() -> None:
    text = encode(policy_version=2, purpose_consents=[1])
    with pytest.raises(TcfError, match=r"^TCF policy version 2 predates TCF 2\.2$"):
        decode(text)
    assert decode(text, strict=False).tcf_policy_version == 2
    assert decode(encode(policy_version=4)).tcf_policy_version == 4
    assert decode(encode(policy_version=5)).tcf_policy_version == 5


def test_globally_scoped_strings_are_rejected() -> None:
    text = encode(service_specific=False)
    with pytest.raises(TcfError, match="IsServiceSpecific is 0"):
        decode(text)
    assert decode(text, strict=False).is_service_specific is False


def test_other_versions_are_rejected_even_when_not_strict() -> None:
    with pytest.raises(TcfError, match="version 3 is not supported"):
        decode(encode(version=3), strict=False)


@pytest.mark.parametrize(
    ("restrictions", "vendors", "message"),
    [
        ([(0, 0, [(1, 1)])], (), "purpose 0"),
        ([(2, 0, [(0, 3)])], (), "vendor ID 0"),
        ([(2, 0, [(9, 3)])], (), "ends before it starts"),
    ],
)
def test_malformed_range_entries(restrictions: list[Restriction], vendors: tuple[int, ...], message: str) -> None:
    with pytest.raises(TcfError, match=message):
        decode(encode(restrictions=restrictions, vendor_consents=vendors))


def test_range_beyond_max_vendor_id_is_rejected() -> None:
    bits = core_bits()
    head = bits[: len(bits) - 2 * 17 - 12]
    consent = _int(10, 16) + "1" + _range_entries([(5, 12)])
    with pytest.raises(TcfError, match="above its MaxVendorId 10"):
        decode(_b64(head + consent + _vendors([]) + _int(0, 12)))


def test_invalid_language_letters_are_rejected() -> None:
    bits = core_bits()
    language_at = 6 + 36 + 36 + 12 + 12 + 6
    broken = bits[:language_at] + _int(40, 6) + bits[language_at + 6:]
    with pytest.raises(TcfError, match="ConsentLanguage is not two letters"):
        decode(_b64(broken))


# --- real strings from public IAB / CMP material ---------------------------------------------------------------
# Expected values come from decoding the bits independently (base64 → bit string → the v2 field table), not from
# the strings' surrounding text. None of these published samples carries TcfPolicyVersion 4, so each is also a
# real-world example of a string that the strict (TCF 2.2) decoder refuses.

# IAB Tech Lab, "Consent string and vendor list formats v2", sample TC string (2025 revision): core + a
# DisclosedVendors segment.
IAB_SAMPLE_2025 = "CQSbk4AQSbk4ANwAAAENAwCgAAAAAAAAAAYgACPAAAAA.IDKQA4AAgAKAGQAygAAA"
# The same document's earlier sample (2020): core + DisclosedVendors, a globally-scoped string.
IAB_SAMPLE_2020 = (
    "COvFyGBOvFyGBAbAAAENAPCAAOAAAAAAAAAAAEEUACCKAAA.IFoEUQQgAIQwgIwQABAEAAAAOIAACAIAAAAQAIAgEAACEAAAAAgAQBAAAAAAAGBAA"
    "gAAAAAAAFAAECAAAgAAQARAEQAAAAAJAAIAAgAAAYQEAAAQmAgBC3ZAYzUw"
)
# Ketch's Android SDK (a registered CMP) TCF test vector: range-encoded vendors and a PublisherTC segment.
KETCH_SAMPLE = "CPhBZtcPhBZtcACABAENCACgAIAAAAAAAAAAH2QAYH0AfYB9kAGB9YH2AAAA.YAAAAAAAAAAA"


def test_iab_2025_sample() -> None:
    with pytest.raises(TcfError, match=r"TCF policy version 2 predates TCF 2\.2"):
        decode(IAB_SAMPLE_2025)
    tc = decode(IAB_SAMPLE_2025, strict=False)
    assert tc.created == tc.last_updated == datetime(2025, 6, 3, tzinfo=UTC)
    assert (tc.cmp_id, tc.cmp_version, tc.consent_screen) == (880, 0, 0)
    assert (tc.consent_language, tc.publisher_cc) == ("EN", "DE")
    assert (tc.vendor_list_version, tc.tcf_policy_version, tc.is_service_specific) == (48, 2, True)
    assert tc.purpose_consents == tc.purpose_li == tc.special_feature_opt_ins == frozenset()
    assert tc.vendor_consents == frozenset({1, 2, 3, 4})
    assert tc.vendor_li == frozenset()
    assert tc.disclosed_vendors == frozenset({1, 2, 3, 4, 5, 100, 404})  # range-encoded: 1-5, 100, 404
    assert allowed_purposes(tc) == {}


def test_iab_2020_sample() -> None:
    with pytest.raises(TcfError, match=r"predates TCF 2\.2"):
        decode(IAB_SAMPLE_2020)
    tc = decode(IAB_SAMPLE_2020, strict=False)
    assert tc.created == datetime(2020, 2, 20, 23, 57, 39, 300000, tzinfo=UTC)
    assert (tc.cmp_id, tc.vendor_list_version, tc.tcf_policy_version) == (27, 15, 2)
    assert tc.is_service_specific is False
    assert (tc.consent_language, tc.publisher_cc) == ("EN", "AA")
    assert tc.purpose_consents == frozenset({1, 2, 3})
    assert tc.vendor_consents == tc.vendor_li == frozenset({2, 6, 8})
    assert tc.disclosed_vendors is not None
    assert len(tc.disclosed_vendors) == 79
    assert min(tc.disclosed_vendors) == 2 and max(tc.disclosed_vendors) == 720
    assert {2, 6, 8, 12, 18, 23, 37, 42, 47, 48} <= tc.disclosed_vendors
    assert allowed_purposes(tc, 6) == {1: CONSENT, 2: CONSENT, 3: CONSENT}
    assert allowed_purposes(tc, 7) == {}


def test_ketch_sample() -> None:
    with pytest.raises(TcfError, match=r"predates TCF 2\.2"):
        decode(KETCH_SAMPLE)
    tc = decode(KETCH_SAMPLE, strict=False)
    assert tc.created == datetime(2022, 10, 17, 13, 44, 54, tzinfo=UTC)
    assert (tc.cmp_id, tc.cmp_version, tc.vendor_list_version) == (2, 1, 128)
    assert tc.purpose_consents == frozenset({1})
    assert tc.vendor_consents == frozenset(range(1000, 1005))
    assert tc.vendor_li == frozenset({1003, 1004})
    assert tc.publisher_tc is not None
    assert tc.publisher_tc.purpose_consents == tc.publisher_tc.purpose_li == frozenset()
    assert tc.publisher_tc.num_custom_purposes == 0
    assert allowed_purposes(tc, 1000) == {1: CONSENT}


# --- TCF 2.2 purpose rules --------------------------------------------------------------------------------------


def _tc(**core: object) -> TCString:
    return decode(encode(**core))


def test_consent_bits_allow_purposes() -> None:
    tc = _tc(purpose_consents=[1, 2, 3, 4, 7])
    assert allowed_purposes(tc) == {1: CONSENT, 2: CONSENT, 3: CONSENT, 4: CONSENT, 7: CONSENT}


def test_legitimate_interest_never_unlocks_purposes_1_and_3_to_6() -> None:
    tc = _tc(purpose_li=range(1, 12), vendor_li=[755])
    expected = {p: LEGITIMATE_INTEREST for p in (2, 7, 8, 9, 10, 11)}
    assert allowed_purposes(tc) == expected
    assert allowed_purposes(tc, 755) == expected
    status = purpose_status(tc, 4, 755)
    assert status.basis is None
    assert "legitimate interest is not permitted for purpose 4 under TCF 2.2" in status.reason


def test_consent_is_preferred_to_legitimate_interest() -> None:
    tc = _tc(purpose_consents=[7], purpose_li=[7])
    assert allowed_purposes(tc) == {7: CONSENT}


def test_vendor_bits_are_required() -> None:
    tc = _tc(purpose_consents=[1, 2, 7], purpose_li=[2, 8], vendor_consents=[755], vendor_li=[99])
    assert allowed_purposes(tc, 755) == {1: CONSENT, 2: CONSENT, 7: CONSENT}
    assert allowed_purposes(tc, 99) == {2: LEGITIMATE_INTEREST, 8: LEGITIMATE_INTEREST}
    assert allowed_purposes(tc, 12) == {}
    assert purpose_status(tc, 7, 12).reason == "no consent for vendor 12; no legitimate interest for purpose 7"


def test_vendor_yes_with_purpose_no_is_no() -> None:
    tc = _tc(purpose_consents=[1], vendor_consents=[755], vendor_li=[755])
    assert allowed_purposes(tc, 755) == {1: CONSENT}


def test_restriction_not_allowed_blocks_the_purpose_for_that_vendor_only() -> None:
    tc = _tc(purpose_consents=[1, 7], vendor_consents=[755, 756], restrictions=[(7, 0, [(755, 755)])])
    assert allowed_purposes(tc, 755) == {1: CONSENT}
    assert allowed_purposes(tc, 756) == {1: CONSENT, 7: CONSENT}
    assert allowed_purposes(tc) == {1: CONSENT, 7: CONSENT}  # restrictions are per vendor
    assert purpose_status(tc, 7, 755).reason == "the publisher does not allow purpose 7 for vendor 755"


def test_restriction_require_consent_rules_out_legitimate_interest() -> None:
    tc = _tc(purpose_li=[2, 9], vendor_li=[755], restrictions=[(2, 1, [(700, 800)])])
    assert allowed_purposes(tc, 755) == {9: LEGITIMATE_INTEREST}
    assert "the publisher requires consent for purpose 2 and vendor 755" in purpose_status(tc, 2, 755).reason
    both = _tc(purpose_consents=[2], purpose_li=[2], vendor_consents=[755], vendor_li=[755],
               restrictions=[(2, 1, [(755, 755)])])
    assert allowed_purposes(both, 755) == {2: CONSENT}


def test_restriction_require_li_rules_out_consent() -> None:
    tc = _tc(purpose_consents=[2, 3, 7], purpose_li=[2], vendor_consents=[755], vendor_li=[755],
             restrictions=[(2, 2, [(755, 755)]), (3, 2, [(755, 755)]), (7, 2, [(755, 755)])])
    # 2: consent refused, LI accepted; 3: LI is forbidden, so nothing remains; 7: no LI bit.
    assert allowed_purposes(tc, 755) == {2: LEGITIMATE_INTEREST}
    assert "requires legitimate interest for purpose 3" in purpose_status(tc, 3, 755).reason
    assert allowed_purposes(tc, 1) == {}  # vendor 1 has no bits
    assert allowed_purposes(tc) == {2: CONSENT, 3: CONSENT, 7: CONSENT}


def test_purpose_status_outside_tcf_purposes() -> None:
    tc = _tc(purpose_consents=[12, 24])
    assert purpose_status(tc, 12).basis is None
    assert allowed_purposes(tc) == {}
