"""Normalising and hashing identifiers: platform vectors, validation and error hygiene."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity.identifiers import (
    GOOGLE_EMAIL_SHA256,
    MAX_VALUE_LENGTH,
    META_PHONE_SHA256,
    Identifier,
    IdentifierType,
    IdentifierTypes,
    MatchKey,
)
from identity.normalize import (
    Normalizer,
    google_email,
    meta_phone,
    normalize_email,
    normalize_phone,
    sha256_hex,
)
from stitchgraph.errors import InvalidArgument

# Official Meta vectors (destinations.md §1.3).
META_EM_INPUT = "John_Smith@gmail.com"
META_EM_NORMALIZED = "john_smith@gmail.com"
META_EM_SHA256 = "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
META_PH_INPUT = "(650)555-1212"
META_PH_NORMALIZED = "16505551212"
META_PH_SHA256 = "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"

HEX = "ABCDEF0123456789" * 4  # 64 hex characters, mixed case after lower()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture
def types() -> IdentifierTypes:
    return IdentifierTypes(
        [
            IdentifierType("device_id", max_per_person=3),
            IdentifierType("loyalty_id", max_per_person=1, priority=50),
            IdentifierType("partner_email_sha256", max_per_person=5, hashed=True),
        ]
    )


@pytest.fixture
def normalizer(types: IdentifierTypes) -> Normalizer:
    return Normalizer(types)


def _error(call: object, *args: object, **kwargs: object) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


# --- sha256_hex ---------------------------------------------------------------------------


def test_sha256_hex_is_lowercase_hex_of_utf8() -> None:
    assert sha256_hex("valéry") == "08e1996b5dd49e62a4b4c010d44e4345592a863bb9f8e3976219bac29417149c"


# --- official platform vectors ------------------------------------------------------------


def test_meta_email_vector_normalizes_to_trimmed_lowercase() -> None:
    assert normalize_email(META_EM_INPUT) == META_EM_NORMALIZED


def test_meta_email_vector_hash_is_the_stored_email_sha256(normalizer: Normalizer) -> None:
    result = normalizer.normalize("email", META_EM_INPUT)
    assert result.identifier == Identifier("email_sha256", META_EM_SHA256)


def test_meta_phone_vector_normalizes_to_e164_with_plus() -> None:
    assert normalize_phone(META_PH_INPUT, "US") == "+16505551212"


def test_meta_phone_vector_meta_form_is_digits_without_plus() -> None:
    assert meta_phone(normalize_phone(META_PH_INPUT, "US")) == META_PH_NORMALIZED


def test_meta_phone_vector_hash_is_the_meta_match_key(normalizer: Normalizer) -> None:
    result = normalizer.normalize("phone", META_PH_INPUT)
    assert result.match_keys == (MatchKey("phone_sha256", META_PHONE_SHA256, META_PH_SHA256),)


def test_phone_canonical_hash_is_of_e164_with_plus(normalizer: Normalizer) -> None:
    result = normalizer.normalize("phone", META_PH_INPUT)
    assert result.identifier == Identifier("phone_sha256", _sha("+16505551212"))


def test_data_manager_gmail_example_drops_dots_and_plus_tag() -> None:
    normalized = normalize_email("cloudy.sanfrancisco+shopping@gmail.com")
    assert google_email(normalized) == "cloudysanfrancisco@gmail.com"


def test_data_manager_other_domain_example_keeps_dots_and_plus() -> None:
    normalized = normalize_email("user.name+NYC@Example.com")
    assert normalized == "user.name+nyc@example.com"
    assert google_email(normalized) == "user.name+nyc@example.com"


def test_data_manager_phone_example_is_e164() -> None:
    assert normalize_phone("(800)555-0100", "US") == "+18005550100"


# --- email rules ---------------------------------------------------------------------------


def test_google_email_applies_to_googlemail_domain() -> None:
    assert google_email("j.doe+promo@googlemail.com") == "jdoe@googlemail.com"


def test_google_email_does_not_strip_dots_for_other_domains() -> None:
    # The google-ads-python examples strip dots for every domain; the documented rule does not.
    assert google_email("j.doe@example.org") == "j.doe@example.org"


def test_google_email_keeps_canonical_form_when_local_part_would_be_empty() -> None:
    assert google_email("+tag@gmail.com") == "+tag@gmail.com"


def test_gmail_address_gets_google_match_key(normalizer: Normalizer) -> None:
    result = normalizer.normalize("email", "Cloudy.SanFrancisco+Shopping@Gmail.com")
    assert result.identifier.value == _sha("cloudy.sanfrancisco+shopping@gmail.com")
    assert result.match_keys == (
        MatchKey("email_sha256", GOOGLE_EMAIL_SHA256, _sha("cloudysanfrancisco@gmail.com")),
    )


def test_email_without_google_difference_has_no_match_keys(normalizer: Normalizer) -> None:
    assert normalizer.normalize("email", "user.name+NYC@Example.com").match_keys == ()


def test_meta_email_vector_has_no_google_match_key(normalizer: Normalizer) -> None:
    # john_smith@gmail.com has no dot or +tag, so Google's form equals the canonical one.
    assert normalizer.normalize("email", META_EM_INPUT).match_keys == ()


@pytest.mark.parametrize(
    "raw",
    [
        "plainaddress",
        "two@@example.com",
        "a@b@example.com",
        "@example.com",
        "user@",
        "user@localhost",
        "user@example.",
        "user@.example.com",
        "user@example..com",
        "us er@example.com",
        "user@exa\tmple.com",
        "user\x00@example.com",
        "   ",
    ],
)
def test_malformed_email_is_rejected(raw: str) -> None:
    assert _error(normalize_email, raw).violations[0].field == "value"


def test_overlong_email_is_rejected() -> None:
    _error(normalize_email, "a" * 250 + "@example.com")


@given(st.emails())
def test_raw_email_never_equals_stored_value(email: str) -> None:
    stored = Normalizer(IdentifierTypes()).normalize("email", email).identifier
    assert stored.type == "email_sha256"
    assert stored.value != email
    assert stored.value != email.strip().lower()


# --- phone rules ---------------------------------------------------------------------------


def test_phone_with_00_international_prefix_is_accepted() -> None:
    assert normalize_phone("0044 7911 123456", "US") == "+447911123456"


def test_phone_with_plus_ignores_default_region() -> None:
    assert normalize_phone("+44 7911 123456", "US") == "+447911123456"


def test_national_phone_uses_configured_default_region(types: IdentifierTypes) -> None:
    result = Normalizer(types, default_region="gb").normalize("phone", "07911 123456")
    assert result.identifier.value == _sha("+447911123456")
    assert result.match_keys[0].value == _sha("447911123456")


def test_national_phone_without_default_region_is_rejected() -> None:
    error = _error(normalize_phone, "(650)555-1212", None)
    assert "country code" in error.message


@pytest.mark.parametrize(
    "raw",
    ["+1 555 555 5555", "12", "+999 1234", "not a number", "+", "+1 650 555 121"],
)
def test_invalid_or_impossible_phone_is_rejected(raw: str) -> None:
    assert _error(normalize_phone, raw, "US").violations[0].field == "value"


def test_phone_with_extension_is_rejected() -> None:
    _error(normalize_phone, "650 555 1212 ext. 12", "US")


def test_unknown_default_region_is_rejected(types: IdentifierTypes) -> None:
    assert _error(Normalizer, types, "XX").violations[0].field == "default_region"


def test_meta_phone_rejects_a_value_that_is_not_e164() -> None:
    with pytest.raises(ValueError):
        meta_phone("16505551212")


# --- pre-hashed values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "stored_type"),
    [
        ("email_sha256", "email_sha256"),
        ("phone_sha256", "phone_sha256"),
        ("email", "email_sha256"),
        ("phone", "phone_sha256"),
        ("partner_email_sha256", "partner_email_sha256"),
    ],
)
def test_pre_hashed_value_is_lower_cased_without_match_keys(
    normalizer: Normalizer, type_: str, stored_type: str
) -> None:
    result = normalizer.normalize(type_, f"  {HEX} ")
    assert result.identifier == Identifier(stored_type, HEX.lower())
    assert result.match_keys == ()


def test_raw_email_sent_as_email_sha256_is_rejected_with_hint(normalizer: Normalizer) -> None:
    error = _error(normalizer.normalize, "email_sha256", "jane@example.com")
    assert error.violations[0].field == "value"
    assert "'email'" in error.violations[0].description


def test_short_hex_sent_as_phone_sha256_is_rejected(normalizer: Normalizer) -> None:
    _error(normalizer.normalize, "phone_sha256", HEX[:32])


def test_non_hex_custom_hashed_value_is_rejected(normalizer: Normalizer) -> None:
    _error(normalizer.normalize, "partner_email_sha256", "g" * 64)


# --- unhashed types ------------------------------------------------------------------------


def test_user_id_keeps_case(normalizer: Normalizer) -> None:
    upper = normalizer.normalize("user_id", "Alice").identifier
    lower = normalizer.normalize("user_id", "alice").identifier
    assert upper.value == "Alice"
    assert upper != lower


def test_user_id_is_trimmed(normalizer: Normalizer) -> None:
    assert normalizer.normalize("user_id", "  u-1\n").identifier == Identifier("user_id", "u-1")


def test_custom_type_value_is_kept(normalizer: Normalizer) -> None:
    assert normalizer.normalize("device_id", "Dev-1").identifier == Identifier("device_id", "Dev-1")


def test_unhashed_type_never_gets_match_keys(normalizer: Normalizer) -> None:
    assert normalizer.normalize("crm_id", "0031x00000AbCdE").match_keys == ()


@pytest.mark.parametrize("raw", ["", "   ", "\t\n"])
def test_empty_user_id_is_rejected_on_value_field(normalizer: Normalizer, raw: str) -> None:
    assert _error(normalizer.normalize, "user_id", raw).violations[0].field == "value"


def test_user_id_at_max_length_is_accepted(normalizer: Normalizer) -> None:
    value = "x" * MAX_VALUE_LENGTH
    assert normalizer.normalize("user_id", f" {value} ").identifier.value == value


def test_oversize_user_id_is_rejected_on_value_field(normalizer: Normalizer) -> None:
    error = _error(normalizer.normalize, "user_id", "x" * (MAX_VALUE_LENGTH + 1))
    assert error.violations[0].field == "value"
    assert str(MAX_VALUE_LENGTH) in error.violations[0].description


def test_user_id_with_control_character_is_rejected(normalizer: Normalizer) -> None:
    assert "control character" in _error(normalizer.normalize, "user_id", "a\x00b").message


def test_value_field_path_is_the_one_given(normalizer: Normalizer) -> None:
    error = _error(normalizer.normalize, "crm_id", "", field="identifiers[2].value")
    assert error.violations[0].field == "identifiers[2].value"


# --- types -----------------------------------------------------------------------------------


def test_unknown_type_is_rejected_on_type_field_naming_known_types(normalizer: Normalizer) -> None:
    error = _error(normalizer.normalize, "loyalty", "123")
    assert error.violations[0].field == "type"
    assert "'loyalty'" in error.message
    assert "loyalty_id" in error.message and "email" in error.message


def test_empty_type_is_rejected_on_type_field(normalizer: Normalizer) -> None:
    assert _error(normalizer.normalize, "", "123").violations[0].field == "type"


def test_type_field_path_is_the_one_given(normalizer: Normalizer) -> None:
    error = _error(normalizer.normalize, "nope", "1", type_field="identifiers[0].type")
    assert error.violations[0].field == "identifiers[0].type"


def test_unknown_type_that_is_not_a_type_name_is_not_quoted(normalizer: Normalizer) -> None:
    error = _error(normalizer.normalize, "jane@example.com", "user_id")
    assert "jane@example.com" not in error.message


def test_registry_orders_types_by_priority_then_name(types: IdentifierTypes) -> None:
    assert types.names == (
        "user_id",
        "crm_id",
        "email_sha256",
        "phone_sha256",
        "loyalty_id",
        "device_id",
        "partner_email_sha256",
        "heap_user_id",
        "posthog_distinct_id",
        "anonymous_id",
    )


def test_registry_gives_custom_types_default_priority(types: IdentifierTypes) -> None:
    assert types.priority("device_id") == 100


def test_registry_priority_of_unknown_type_raises_key_error(types: IdentifierTypes) -> None:
    with pytest.raises(KeyError):
        types.priority("nope")


def test_registry_get_returns_none_for_raw_input_names(types: IdentifierTypes) -> None:
    assert types.get("email") is None


@pytest.mark.parametrize(
    "name", ["user_id", "email_sha256", "email", "phone", "Device", "1id", "a-b", "", "x" * 65]
)
def test_registry_rejects_bad_custom_names(name: str) -> None:
    error = _error(IdentifierTypes, [IdentifierType(name, max_per_person=1)])
    assert error.violations[0].field == "identifier_types[0].name"


def test_registry_rejects_duplicate_custom_names() -> None:
    _error(IdentifierTypes, [IdentifierType("device_id", 1), IdentifierType("device_id", 2)])


@pytest.mark.parametrize("limit", [0, -1, True])
def test_registry_rejects_non_positive_limits(limit: int) -> None:
    error = _error(IdentifierTypes, [IdentifierType("device_id", max_per_person=limit)])
    assert error.violations[0].field == "identifier_types[0].max_per_person"


def test_identifier_key_joins_type_and_value() -> None:
    assert Identifier("user_id", "u1").key == "user_id:u1"


def test_identifiers_order_by_type_then_value() -> None:
    ids = [Identifier("user_id", "a"), Identifier("anonymous_id", "z"), Identifier("anonymous_id", "b")]
    assert sorted(ids) == [
        Identifier("anonymous_id", "b"),
        Identifier("anonymous_id", "z"),
        Identifier("user_id", "a"),
    ]


# --- errors never contain raw contact data ---------------------------------------------------

_TWISTS = st.sampled_from(
    [
        "space_inside",
        "double_at",
        "no_dot_domain",
        "control_char",
        "too_long",
        "as_email_sha256",
        "as_phone",
        "as_phone_sha256",
        "as_unknown_type",
        "as_type",
    ]
)


def _twisted_call(email: str, twist: str) -> tuple[str, str, str]:
    """Return (type, value, the raw text that must not leak) for one invalid input."""
    local, _, domain = email.rpartition("@")
    if twist == "space_inside":
        return "email", f"{local} x@{domain}", f"{local} x@{domain}"
    if twist == "double_at":
        return "email", f"{local}@@{domain}", f"{local}@@{domain}"
    if twist == "no_dot_domain":
        bad = f"{local}@{domain.replace('.', '')}"
        return "email", bad, bad
    if twist == "control_char":
        return "email", f"{email}\x07", email
    if twist == "too_long":
        bad = f"{'a' * 250}{email}"
        return "email", bad, bad
    if twist == "as_email_sha256":
        return "email_sha256", email, email
    if twist == "as_phone":
        return "phone", email, email
    if twist == "as_phone_sha256":
        return "phone_sha256", email, email
    if twist == "as_unknown_type":
        return "emial", email, email
    return email, "jane", email  # type and value swapped


@given(email=st.emails(), twist=_TWISTS)
def test_raw_email_never_appears_in_error_message(email: str, twist: str) -> None:
    type_, value, raw = _twisted_call(email, twist)
    with pytest.raises(InvalidArgument) as info:
        Normalizer(IdentifierTypes()).normalize(type_, value)
    error = info.value
    texts = [error.message, str(error), *(v.description for v in error.violations)]
    for text in texts:
        for leaked in {raw, raw.strip(), raw.lower(), email, email.lower()}:
            assert leaked not in text


@given(
    digits=st.text(alphabet="0123456789", min_size=4, max_size=14),
    junk=st.sampled_from(["x", "#", "ext 1", "@"]),
)
def test_raw_phone_never_appears_in_error_message(digits: str, junk: str) -> None:
    raw = f"+{digits}{junk}"
    try:
        Normalizer(IdentifierTypes()).normalize("phone", raw)
    except InvalidArgument as error:
        assert digits not in error.message
        assert all(digits not in v.description for v in error.violations)
