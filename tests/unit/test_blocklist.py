"""Junk identifier values: defaults, quoting, hashed values and configuration."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity.blocklist import DEFAULT_BLOCKLIST, Blocklist, BlocklistEntry
from identity.identifiers import IdentifierType, IdentifierTypes
from identity.normalize import normalize_email, normalize_phone
from stitchgraph.errors import InvalidArgument

# PostHog's hard-coded illegal distinct ids (identity-anchors.md, feature table).
POSTHOG_CASE_INSENSITIVE = [
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
]
POSTHOG_CASE_SENSITIVE = ["[object Object]", "NaN", "None", "none", "null", "0"]
SEGMENT_SUGGESTED = ["-1", "null", "anonymous", "0", "000", "0-0", "---", "void", "abc123"]
OTHER_DEFAULTS = [
    "nan",
    "unknown",
    "n/a",
    "nil",
    "(null)",
    "{}",
    "[]",
    "test",
    "user",
    "00000000-0000-0000-0000-000000000000",
]

DEFAULTS = Blocklist()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _error(call: object, *args: object, **kwargs: object) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


# --- defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize("word", POSTHOG_CASE_INSENSITIVE)
@pytest.mark.parametrize("case", [str.lower, str.upper, str.title])
def test_posthog_case_insensitive_values_are_junk_in_any_case(word: str, case: object) -> None:
    assert DEFAULTS.match("user_id", case(word)) is not None  # type: ignore[operator]


@pytest.mark.parametrize("word", POSTHOG_CASE_SENSITIVE)
def test_posthog_case_sensitive_values_are_junk_as_cased(word: str) -> None:
    assert DEFAULTS.match("anonymous_id", word) is not None


@pytest.mark.parametrize("word", ["NULL", "Null", "NONE", "nan", "NAN", "[OBJECT OBJECT]"])
def test_null_spellings_are_junk_in_any_case(word: str) -> None:
    # Deliberately stricter than PostHog, which lets "NULL" through.
    assert DEFAULTS.match("user_id", word) is not None


@pytest.mark.parametrize("word", SEGMENT_SUGGESTED)
def test_segment_suggested_values_are_junk(word: str) -> None:
    assert DEFAULTS.match("user_id", word) is not None


@pytest.mark.parametrize("word", OTHER_DEFAULTS)
def test_other_placeholder_values_are_junk(word: str) -> None:
    assert DEFAULTS.match("crm_id", word) is not None


@pytest.mark.parametrize("word", ["", " ", "\t\n ", "''", '""', "' '", "\"''\""])
def test_blank_values_are_junk(word: str) -> None:
    assert DEFAULTS.match("user_id", word) == "blank value"


@pytest.mark.parametrize(
    "raw", ["'null'", '"null"', "\"'undefined'\"", " 'NaN' ", "'[object Object]'", '"0"']
)
def test_quoted_junk_values_are_junk(raw: str) -> None:
    assert DEFAULTS.match("user_id", raw) is not None


@pytest.mark.parametrize("raw", ["'null", "null'", "'null\""])
def test_unbalanced_quotes_are_not_stripped(raw: str) -> None:
    assert DEFAULTS.match("user_id", raw) is None


@pytest.mark.parametrize(
    "value", ["alice", "u_123", "10", "guest42", "nullable", "testuser", "0x1", "-2", "Anonymous Coward"]
)
def test_ordinary_values_are_not_junk(value: str) -> None:
    assert DEFAULTS.match("user_id", value) is None


def test_reason_quotes_the_matching_value() -> None:
    assert DEFAULTS.match("user_id", "NULL") == "blocklisted value 'null'"


def test_reason_quotes_the_matching_pattern() -> None:
    assert DEFAULTS.match("user_id", "0000") == "matches blocklist pattern '^[0-]*$'"


@pytest.mark.parametrize("raw", ["undefined", "null", "'null'", "", "test"])
def test_junk_sent_as_raw_email_is_junk(raw: str) -> None:
    assert DEFAULTS.match("email", raw) is not None


@pytest.mark.parametrize("raw", ["0", "000-000-0000", "-1"])
def test_junk_sent_as_raw_phone_is_junk(raw: str) -> None:
    assert DEFAULTS.match("phone", raw) is not None


@given(st.emails())
def test_defaults_never_block_a_valid_email_or_its_hash(email: str) -> None:
    assert DEFAULTS.match("email", email) is None
    assert DEFAULTS.match("email_sha256", _sha(normalize_email(email))) is None
    assert DEFAULTS.match("email", _sha(normalize_email(email)).upper()) is None


@pytest.mark.parametrize("phone", ["(650)555-1212", "+44 7911 123456", "(800)555-0100"])
def test_defaults_never_block_a_valid_phone_or_its_hash(phone: str) -> None:
    assert DEFAULTS.match("phone", phone) is None
    assert DEFAULTS.match("phone_sha256", _sha(normalize_phone(phone, "US"))) is None


def test_no_default_exact_value_could_be_an_email() -> None:
    assert all("@" not in (entry.value or "") for entry in DEFAULT_BLOCKLIST)


def test_only_default_pattern_is_segments_zeros_and_dashes() -> None:
    patterns = [entry.pattern for entry in DEFAULT_BLOCKLIST if entry.pattern is not None]
    assert patterns == ["^[0-]*$"]


# --- hashed values ---------------------------------------------------------------------------


@pytest.mark.parametrize("type_", ["email_sha256", "phone_sha256", "email", "phone"])
def test_sha256_of_empty_string_is_junk(type_: str) -> None:
    assert DEFAULTS.match(type_, _sha("")) is not None


def test_all_zero_hash_is_junk() -> None:
    assert DEFAULTS.match("email_sha256", "0" * 64) is not None


@pytest.mark.parametrize("word", ["undefined", "null", "nan", "[object object]", "none"])
def test_sha256_of_a_junk_word_is_junk(word: str) -> None:
    assert DEFAULTS.match("email_sha256", _sha(word)) is not None


@pytest.mark.parametrize("type_", ["email_sha256", "phone_sha256"])
def test_placeholder_sent_as_hashed_type_is_junk(type_: str) -> None:
    # Not a hash at all, so the word list applies; the event goes on without the identifier.
    assert DEFAULTS.match(type_, "undefined") is not None


def test_patterns_never_apply_to_hashed_values() -> None:
    blocklist = Blocklist([BlocklistEntry(pattern="[0-9a-f]+")])
    assert blocklist.match("email_sha256", "ab" * 32) is None
    assert blocklist.match("email", "ab" * 32) is None


def test_patterns_apply_to_hex_values_of_unhashed_types() -> None:
    blocklist = Blocklist([BlocklistEntry(pattern="[0-9a-f]+")])
    assert blocklist.match("user_id", "ab" * 32) is not None


def test_exact_hashed_entry_blocks_that_hash_in_any_case() -> None:
    shared_inbox = _sha("team@company.com")
    blocklist = Blocklist.from_config([{"identifier_type": "email_sha256", "value": shared_inbox.upper()}])
    assert blocklist.match("email_sha256", shared_inbox) is not None
    assert blocklist.match("email", shared_inbox.upper()) is not None


def test_exact_hashed_entry_under_raw_type_blocks_the_stored_hash() -> None:
    shared_inbox = _sha("team@company.com")
    blocklist = Blocklist([BlocklistEntry(identifier_type="email", value=shared_inbox)])
    assert blocklist.match("email_sha256", shared_inbox) is not None


def test_exact_hashed_entry_does_not_block_other_hashed_types() -> None:
    shared_inbox = _sha("team@company.com")
    blocklist = Blocklist([BlocklistEntry(identifier_type="email_sha256", value=shared_inbox)])
    assert blocklist.match("phone_sha256", shared_inbox) is None


def test_custom_hashed_type_is_treated_as_hashed() -> None:
    types = IdentifierTypes([IdentifierType("partner_sha256", max_per_person=5, hashed=True)])
    blocklist = Blocklist([BlocklistEntry(pattern="[0-9a-f]+")], types=types)
    assert blocklist.match("partner_sha256", "ab" * 32) is None


# --- configured entries ----------------------------------------------------------------------


def test_type_scoped_entry_applies_only_to_its_type() -> None:
    blocklist = Blocklist([BlocklistEntry(identifier_type="crm_id", value="crm-test")])
    assert blocklist.match("crm_id", "CRM-TEST") is not None
    assert blocklist.match("user_id", "crm-test") is None


def test_case_sensitive_entry_matches_only_exact_case() -> None:
    blocklist = Blocklist([BlocklistEntry(value="QA", case_sensitive=True)])
    assert blocklist.match("user_id", "QA") is not None
    assert blocklist.match("user_id", "qa") is None


def test_case_sensitive_pattern_matches_only_exact_case() -> None:
    blocklist = Blocklist([BlocklistEntry(pattern="QA-[0-9]+", case_sensitive=True)])
    assert blocklist.match("user_id", "QA-1") is not None
    assert blocklist.match("user_id", "qa-1") is None


def test_pattern_must_match_the_whole_value() -> None:
    blocklist = Blocklist([BlocklistEntry(pattern="qa")])
    assert blocklist.match("user_id", "qa-user") is None
    assert blocklist.match("user_id", "QA") is not None


def test_raw_email_entry_reason_does_not_quote_the_address() -> None:
    blocklist = Blocklist([BlocklistEntry(identifier_type="email", value="team@company.com")])
    reason = blocklist.match("email", "Team@Company.com")
    assert reason is not None
    assert "team@company.com" not in reason.lower()


def test_earliest_matching_entry_gives_the_reason() -> None:
    blocklist = Blocklist([BlocklistEntry(pattern="q.*"), BlocklistEntry(value="qa")])
    assert blocklist.match("user_id", "qa") == "matches blocklist pattern 'q.*'"


def test_from_config_adds_defaults_after_configured_entries() -> None:
    blocklist = Blocklist.from_config([{"value": "demo-user"}])
    assert blocklist.match("user_id", "demo-user") is not None
    assert blocklist.match("user_id", "null") is not None


def test_from_config_can_leave_out_defaults() -> None:
    blocklist = Blocklist.from_config([{"value": "demo-user"}], include_defaults=False)
    assert blocklist.match("user_id", "null") is None
    assert blocklist.match("user_id", " ") == "blank value"


def test_invalid_regex_is_rejected_naming_the_entry_index() -> None:
    error = _error(Blocklist.from_config, [{"value": "qa"}, {"pattern": "([a-z"}])
    assert error.violations[0].field == "blocklist[1].pattern"


def test_unknown_config_key_is_rejected() -> None:
    error = _error(Blocklist.from_config, [{"regex": "qa"}])
    assert error.violations[0].field == "blocklist[0].regex"


def test_unknown_identifier_type_is_rejected() -> None:
    error = _error(Blocklist.from_config, [{"identifier_type": "usr_id", "value": "qa"}])
    assert error.violations[0].field == "blocklist[0].identifier_type"


@pytest.mark.parametrize("entry", [{}, {"value": "qa", "pattern": "qa"}])
def test_entry_needs_exactly_one_of_value_and_pattern(entry: dict[str, str]) -> None:
    assert _error(Blocklist.from_config, [entry]).violations[0].field == "blocklist[0]"


def test_blank_entry_value_is_rejected() -> None:
    assert _error(Blocklist.from_config, [{"value": "  "}]).violations[0].field == "blocklist[0].value"


def test_pattern_for_hashed_type_is_rejected() -> None:
    error = _error(Blocklist.from_config, [{"identifier_type": "email_sha256", "pattern": "0+"}])
    assert error.violations[0].field == "blocklist[0].pattern"


def test_non_hex_value_for_hashed_type_is_rejected() -> None:
    error = _error(Blocklist.from_config, [{"identifier_type": "phone_sha256", "value": "+16505551212"}])
    assert error.violations[0].field == "blocklist[0].value"


def test_wrongly_typed_config_field_is_rejected() -> None:
    error = _error(Blocklist.from_config, [{"value": "qa", "case_sensitive": "yes"}])
    assert error.violations[0].field == "blocklist[0].case_sensitive"
