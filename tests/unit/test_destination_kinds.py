"""The destination kind catalogue matches the API and the specs (consent defaults from
``specs/sources-and-consent.md`` §5.7, match keys and limits from ``specs/destinations.md``),
and validation refuses secrets without repeating them."""

from __future__ import annotations

import re

import pytest

from audiences.destinations import (
    DEFAULT_PURPOSES,
    KINDS,
    DestinationConfig,
    DestinationRow,
    effective_purposes,
    is_credentials_ref,
    limited_data_use_enabled,
    new_destination_id,
    secret_looking_key,
    validate_destination,
)
from identity.identifiers import BUILTIN_TYPES
from stitchgraph.v1 import destinations_pb2

CONVERSIONS = {"META_CONVERSIONS", "GOOGLE_ADS_CONVERSIONS", "TIKTOK_EVENTS"}
AD_AUDIENCES = {"META_CUSTOM_AUDIENCE", "GOOGLE_DATA_MANAGER_AUDIENCE", "TIKTOK_AUDIENCE"}
TRAITS = {"POSTHOG_TRAITS", "HEAP_TRAITS"}


def valid(kind: str = "META_CONVERSIONS", **changes: object) -> DestinationConfig:
    settings = {"META_CONVERSIONS": {"pixel_id": "123"}, "META_CUSTOM_AUDIENCE": {"audience_id": "9"},
                "POSTHOG_TRAITS": {"host": "https://eu.i.posthog.com"}}.get(kind, {})
    values: dict[str, object] = {"kind": kind, "display_name": "A destination", "credentials_ref": "env:TOKEN",
                                 "settings": settings, **changes}
    return DestinationConfig(**values)  # type: ignore[arg-type]


def reasons(config: DestinationConfig) -> dict[str, str]:
    return {v.field: v.reason for v in validate_destination(config)}


def test_every_kind_of_the_api_is_catalogued_and_nothing_else() -> None:
    names = {n.removeprefix("DESTINATION_KIND_") for n in destinations_pb2.DestinationKind.keys()}  # noqa: SIM118
    assert set(KINDS) == names - {"UNSPECIFIED"}
    assert set(KINDS) == CONVERSIONS | AD_AUDIENCES | TRAITS
    for name, spec in KINDS.items():
        assert spec.kind == name
        assert [spec.audience, spec.conversions, spec.traits].count(True) == 1, name
        assert spec.advertising is not spec.traits, name


@pytest.mark.parametrize(("kinds", "purposes"), [
    (CONVERSIONS, ("ad_user_data",)),
    (AD_AUDIENCES, ("ad_user_data", "ad_personalization")),
    (TRAITS, ("analytics",)),
])
def test_default_purposes_follow_the_consent_mapping(kinds: set[str], purposes: tuple[str, ...]) -> None:
    for kind in kinds:
        assert KINDS[kind].default_purposes == purposes, kind
        assert set(purposes) <= set(DEFAULT_PURPOSES)


def test_match_keys_are_stored_identifier_types_the_platform_accepts() -> None:
    for spec in KINDS.values():
        assert spec.match_key_types and set(spec.match_key_types) <= set(BUILTIN_TYPES), spec.kind
        assert "crm_id" not in spec.match_key_types
    # Google conversion uploads and Data Manager take only hashed email and phone.
    assert KINDS["GOOGLE_ADS_CONVERSIONS"].match_key_types == ("email_sha256", "phone_sha256")
    assert KINDS["GOOGLE_DATA_MANAGER_AUDIENCE"].match_key_types == ("email_sha256", "phone_sha256")
    # Meta and TikTok events also match on the advertiser's own ID (external_id / EXTERN_ID).
    for kind in ("META_CONVERSIONS", "META_CUSTOM_AUDIENCE", "TIKTOK_EVENTS"):
        assert KINDS[kind].match_key_types == ("email_sha256", "phone_sha256", "user_id")
    assert KINDS["TIKTOK_AUDIENCE"].match_key_types == ("email_sha256", "phone_sha256")
    # Write-back goes to the IDs the tool knows: PostHog distinct IDs, Heap's identity.
    assert KINDS["POSTHOG_TRAITS"].match_key_types == ("posthog_distinct_id", "user_id", "anonymous_id")
    assert KINDS["HEAP_TRAITS"].match_key_types == ("user_id",)
    for kind in AD_AUDIENCES | CONVERSIONS:
        assert "anonymous_id" not in KINDS[kind].match_key_types


def test_batch_limits_and_limited_data_use() -> None:
    limits = {name: spec.batch_limit for name, spec in KINDS.items()}
    assert limits == {"META_CONVERSIONS": 1000, "META_CUSTOM_AUDIENCE": 10_000, "GOOGLE_ADS_CONVERSIONS": 2000,
                      "GOOGLE_DATA_MANAGER_AUDIENCE": 10_000, "TIKTOK_EVENTS": 1000, "TIKTOK_AUDIENCE": 1000,
                      "POSTHOG_TRAITS": 1000, "HEAP_TRAITS": 1000}
    ldu = {name: spec.limited_data_use_setting for name, spec in KINDS.items() if spec.limited_data_use_setting}
    assert ldu == {"META_CONVERSIONS": "limited_data_use", "TIKTOK_EVENTS": "limited_data_use"}


def test_effective_purposes_are_the_destinations_own_else_the_kinds() -> None:
    assert effective_purposes(valid()) == ("ad_user_data",)
    assert effective_purposes(valid("META_CUSTOM_AUDIENCE")) == ("ad_user_data", "ad_personalization")
    assert effective_purposes(valid("HEAP_TRAITS")) == ("analytics",)
    assert effective_purposes(valid(purposes=("ad_user_data", "ad_storage"))) == ("ad_user_data", "ad_storage")
    row = DestinationRow(kind="POSTHOG_TRAITS", purposes=[], settings={})
    assert effective_purposes(row) == ("analytics",)


def test_limited_data_use_needs_a_kind_that_has_it_and_a_boolean_true() -> None:
    assert limited_data_use_enabled(valid(settings={"pixel_id": "1", "limited_data_use": True}))
    assert not limited_data_use_enabled(valid(settings={"pixel_id": "1", "limited_data_use": False}))
    assert not limited_data_use_enabled(valid(settings={"pixel_id": "1", "limited_data_use": "true"}))
    assert not limited_data_use_enabled(valid(settings={"pixel_id": "1"}))
    assert not limited_data_use_enabled(valid("META_CUSTOM_AUDIENCE",
                                              settings={"audience_id": "9", "limited_data_use": True}))


def test_a_complete_destination_of_each_kind_is_valid() -> None:
    for kind in ("META_CONVERSIONS", "META_CUSTOM_AUDIENCE", "POSTHOG_TRAITS", "HEAP_TRAITS"):
        assert validate_destination(valid(kind)) == [], kind
    assert validate_destination(valid(events=("purchase", "lead"), purposes=("ad_user_data", "sale_or_sharing"),
                                      credentials_ref="file:/run/secrets/meta")) == []


def test_required_settings_are_modest_and_checked() -> None:
    assert KINDS["HEAP_TRAITS"].required_settings == ()
    for spec in KINDS.values():
        config = DestinationConfig(kind=spec.kind, display_name="x", credentials_ref="env:T")
        assert set(reasons(config)) == {f"settings.{key}" for key in spec.required_settings}, spec.kind


@pytest.mark.parametrize("ref", ["env:META_CAPI_TOKEN", "env:_X", "env:A1", "file:/run/secrets/meta",
                                 "file:/etc/stitchgraph/google.json"])
def test_credentials_references(ref: str) -> None:
    assert is_credentials_ref(ref)


@pytest.mark.parametrize("ref", ["EAAGm0PX4ZCpsBAKZCuQ7f3jlZBx0ZA", "env:EAAGm0PX4ZCpsBAKZCuQ7f", "env:",
                                 "env:1ABC", "env:A B", "file:", "file:relative/path", "file:/has space",
                                 "Bearer abc", "phc_abcdef", "ENV:TOKEN", "env:TOKEN\n", "file:/" + "a" * 1100])
def test_anything_else_is_not_a_reference_and_is_never_repeated(ref: str) -> None:
    assert not is_credentials_ref(ref)
    problems = validate_destination(valid(credentials_ref=ref))
    assert [(v.field, v.reason) for v in problems] == [("credentials_ref", "NOT_A_CREDENTIALS_REFERENCE")]
    # The same words whatever was sent: the value is never part of them.
    assert problems[0].description == validate_destination(valid(credentials_ref="?"))[0].description
    assert "EAAG" not in problems[0].description and "abc" not in problems[0].description


@pytest.mark.parametrize(("key", "secret"), [
    ("access_token", True), ("accessToken", True), ("api_key", True), ("API-Key", True), ("apikey", True),
    ("client_secret", True), ("app.secret", True), ("password", True), ("private_key", True),
    ("credentials", True), ("authorization", True), ("developer_token", True), ("refresh-token", True),
    ("pixel_id", False), ("test_event_code", False), ("audience_id", False), ("event_source_id", False),
    ("host", False), ("api_version", False), ("limited_data_use", False), ("author", False),
])
def test_secret_looking_settings_keys(key: str, secret: bool) -> None:
    assert secret_looking_key(key) is secret


def test_secrets_in_settings_are_named_by_key_only() -> None:
    config = valid(settings={"pixel_id": "1", "token": "s3cr3t-value", "auth": {"list": [{"password": "hunter2"}]}})
    problems = validate_destination(config)
    assert {v.field: v.reason for v in problems} == {"settings.token": "SECRET_IN_SETTINGS",
                                                     "settings.auth.list[0].password": "SECRET_IN_SETTINGS"}
    assert all("s3cr3t" not in v.description and "hunter2" not in v.description for v in problems)


def test_purposes_and_events_are_checked_against_what_is_configured() -> None:
    assert reasons(valid(purposes=("marketing",))) == {"purposes[0]": "UNKNOWN_PURPOSE"}
    custom = validate_destination(valid(purposes=("marketing",)), purposes=("marketing", "analytics"))
    assert custom == []
    assert reasons(valid(events=("subscribe",))) == {"events[0]": "UNKNOWN_CANONICAL_EVENT"}
    assert validate_destination(valid(events=("subscribe",)), known_events={"subscribe"}) == []
    assert reasons(valid("HEAP_TRAITS", events=("purchase",))) == {"events": "NOT_APPLICABLE"}


def test_lengths_and_kinds() -> None:
    assert reasons(valid(kind="")) == {"kind": "REQUIRED"}
    assert reasons(valid(kind="LINKEDIN_CONVERSIONS")) == {"kind": "UNKNOWN_KIND"}
    assert reasons(valid(display_name="x" * 256)) == {}
    assert reasons(valid(display_name="x" * 257)) == {"display_name": "TOO_LONG"}
    assert reasons(valid(display_name="tab\there")) == {"display_name": "INVALID_FORMAT"}
    assert reasons(valid(description="x" * 4096)) == {}
    assert reasons(valid(description="x" * 4097)) == {"description": "TOO_LONG"}
    assert reasons(valid(settings={"pixel_id": "1", "blob": "x" * 70_000})) == {"settings": "TOO_LARGE"}


def test_generated_ids_are_valid_ids() -> None:
    for kind in KINDS:
        generated = new_destination_id(kind)
        assert re.fullmatch(r"[a-z][a-z0-9-]{0,62}", generated)
        assert generated.startswith(kind.lower().replace("_", "-") + "-")
    assert new_destination_id("META_CONVERSIONS") != new_destination_id("META_CONVERSIONS")
