"""Consent settings, verdict resolution and destination eligibility (DESIGN §6)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from audiences.consent.policy import (
    Decision,
    DestinationVerdict,
    Verdict,
    destination_consent,
    format_time,
    normalize_jurisdiction,
    region_kind,
    resolve,
)
from audiences.consent.settings import DEFAULT_OPT_IN_REGIONS, DEFAULT_PURPOSES, ConsentSettings

SETTINGS = ConsentSettings()
HASH = "3f2a9c0b1d4e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeeff"


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


MAY_1 = _us(datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC))
APR_1 = _us(datetime(2024, 4, 1, 0, 0, 0, tzinfo=UTC))


def _decision(decision_id: str, purpose: str, granted: bool, occurred_us: int, *, origin: str = "API",
              source: str = "grpc", identifier: str = "anonymous_id:abc", opt_out: bool = False) -> Decision:
    return Decision(decision_id=decision_id, purpose=purpose, granted=granted, occurred_us=occurred_us,
                    origin=origin, source=source, jurisdiction="", event_id="", identifier=identifier,
                    opt_out=opt_out)


def _gpc(decision_id: str = "d-gpc", occurred_us: int = MAY_1) -> Decision:
    return _decision(decision_id, "sale_or_sharing", False, occurred_us, origin="GPC", source="gpc", opt_out=True)


def _by_purpose(verdicts: tuple[Verdict, ...]) -> dict[str, Verdict]:
    return {v.purpose: v for v in verdicts}


# --- settings ------------------------------------------------------------------------------------------------------


def test_default_settings_are_valid() -> None:
    SETTINGS.validate()
    assert SETTINGS.purposes == DEFAULT_PURPOSES
    assert SETTINGS.tcf_purposes == {"ad_storage": (1,), "ad_user_data": (1, 7), "ad_personalization": (1, 3, 4),
                                     "analytics": (1, 8)}
    assert {"DE", "FR", "GR", "IS", "LI", "NO", "GB", "CH"} <= SETTINGS.opt_in_regions
    assert len(DEFAULT_OPT_IN_REGIONS - {"EU"}) == 27 + 5


def test_settings_from_toml_shaped_values() -> None:
    settings = ConsentSettings(
        purposes=["analytics", "ad_user_data", "sale_or_sharing"],  # type: ignore[arg-type]
        segment_categories={"Analytics": ["analytics"], "DataSharing": ["sale_or_sharing"]},  # type: ignore[dict-item]
        rudderstack_categories={},
        tcf_purposes={"ad_user_data": [1, 7]},  # type: ignore[dict-item]
        opt_in_regions=["DE", "US-CA"],  # type: ignore[arg-type]
        opt_out_signal_denies=["sale_or_sharing"],  # type: ignore[arg-type]
        tcf_vendor_id=755,
    )
    settings.validate()
    assert settings.purposes == ("analytics", "ad_user_data", "sale_or_sharing")
    assert settings.segment_categories == {"Analytics": ("analytics",), "DataSharing": ("sale_or_sharing",)}
    assert settings.tcf_purposes == {"ad_user_data": (1, 7)}
    assert settings.opt_in_regions == frozenset({"DE", "US-CA"})
    categories: Any = settings.segment_categories
    with pytest.raises(TypeError):  # read-only
        categories["x"] = ("analytics",)


def test_default_maps_follow_the_configured_purposes() -> None:
    settings = ConsentSettings(purposes=("analytics", "ad_storage"))
    settings.validate()
    assert settings.segment_categories == {"Advertising": ("ad_storage",), "Analytics": ("analytics",)}
    assert settings.rudderstack_categories == {"C0002": ("analytics",), "C0004": ("ad_storage",)}
    assert settings.tcf_purposes == {"ad_storage": (1,), "analytics": (1, 8)}
    assert settings.opt_out_signal_denies == ()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"purposes": ()}, "consent.purposes must be a non-empty list"),
        ({"purposes": ("analytics", "analytics")}, "'analytics' is listed twice"),
        ({"purposes": ("Analytics",)}, "'Analytics' is not a valid purpose name"),
        ({"segment_categories": {"Ads": ("ads",)}}, "consent.segment_categories['Ads']: unknown purpose 'ads'"),
        ({"segment_categories": {"Ads": ()}}, "consent.segment_categories['Ads'] must be a non-empty list"),
        ({"rudderstack_categories": {"": ("analytics",)}}, "category IDs must be non-empty strings"),
        ({"rudderstack_categories": {"C0004": ("ads",)}}, "consent.rudderstack_categories['C0004']: unknown"),
        ({"tcf_purposes": {"ads": (1,)}}, "consent.tcf_purposes: unknown purpose 'ads'"),
        ({"tcf_purposes": {"analytics": (0, 12)}}, "0 is not a TCF purpose ID"),
        ({"tcf_purposes": {"analytics": ()}}, "must be a non-empty list of TCF purpose IDs"),
        ({"tcf_vendor_id": 0}, "consent.tcf_vendor_id must be a GVL vendor ID"),
        ({"tcf_vendor_id": 70000}, "consent.tcf_vendor_id must be a GVL vendor ID"),
        ({"opt_in_regions": frozenset({"de"})}, "'de' is not an upper-case ISO 3166-1 alpha-2"),
        ({"opt_in_regions": frozenset({"DEU"})}, "'DEU' is not"),
        ({"opt_in_regions": frozenset({"US-"})}, "'US-' is not"),
        ({"unknown_jurisdiction": "allow"}, "consent.unknown_jurisdiction must be \"deny\" or \"grant\""),
        ({"opt_out_signal_denies": ("ads",)}, "consent.opt_out_signal_denies: unknown purpose 'ads'"),
    ],
)
def test_invalid_settings(changes: dict[str, Any], message: str) -> None:
    settings = ConsentSettings(**changes)
    with pytest.raises(ValueError, match="invalid consent settings") as caught:
        settings.validate()
    assert message in str(caught.value)


def test_validate_reports_every_problem() -> None:
    settings = ConsentSettings(unknown_jurisdiction="maybe", tcf_vendor_id=-1, opt_in_regions=frozenset({"x"}))
    with pytest.raises(ValueError, match="invalid consent settings") as caught:
        settings.validate()
    assert str(caught.value).count(";") == 2


# --- regions -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jurisdiction", "kind"),
    [
        ("DE", "opt_in"), ("de", "opt_in"), (" FR ", "opt_in"), ("FR-75C", "opt_in"), ("GB", "opt_in"),
        ("UK", "opt_in"), ("GR", "opt_in"), ("EL", "opt_in"), ("NO", "opt_in"), ("CH", "opt_in"), ("EU", "opt_in"),
        ("US", "opt_out"), ("US-CA", "opt_out"), ("BR", "opt_out"), ("JP", "opt_out"),
        ("", "unknown"), ("XX", "unknown"), ("ZZ", "unknown"), ("T1", "unknown"), ("Germany", "unknown"),
        ("DEU", "unknown"), ("US_CA", "unknown"),
    ],
)
def test_region_kind(jurisdiction: str, kind: str) -> None:
    assert region_kind(jurisdiction, SETTINGS) == kind


def test_subdivision_regions() -> None:
    settings = ConsentSettings(opt_in_regions=frozenset({"US-CA", "CA"}))
    assert region_kind("US-CA", settings) == "opt_in"
    assert region_kind("us-ca", settings) == "opt_in"
    assert region_kind("US", settings) == "opt_out"
    assert region_kind("US-NY", settings) == "opt_out"
    assert region_kind("CA-QC", settings) == "opt_in"  # a subdivision matches its country's entry


def test_normalize_jurisdiction() -> None:
    assert normalize_jurisdiction(" us-ca ") == "US-CA"
    assert normalize_jurisdiction("uk") == "GB"
    assert normalize_jurisdiction("UK-ENG") == "GB-ENG"
    assert normalize_jurisdiction("XX-01") == ""


# --- explicit decisions ------------------------------------------------------------------------------------------


def test_one_verdict_per_configured_purpose_in_configuration_order() -> None:
    verdicts = resolve([_decision("d1", "not_configured", True, MAY_1)], "US", SETTINGS)
    assert [v.purpose for v in verdicts] == list(DEFAULT_PURPOSES)
    assert all(v.decision_count == 0 for v in verdicts)


def test_latest_decision_wins_across_identifiers() -> None:
    decisions = [
        _decision("d1", "ad_storage", True, APR_1, origin="SEGMENT", source="segment",
                  identifier=f"email_sha256:{HASH}"),
        _decision("d2", "ad_storage", False, MAY_1, origin="SEGMENT", source="cmp:onetrust"),
    ]
    verdict = _by_purpose(resolve(decisions, "US", SETTINGS))["ad_storage"]
    assert verdict == Verdict(
        purpose="ad_storage", granted=False, resolved_by="EXPLICIT", decision=decisions[1], decision_count=2,
        explanation="denied by cmp:onetrust (SEGMENT) at 2024-05-01T10:00:00Z via anonymous_id:abc; "
                    "it is later than the grant at 2024-04-01T00:00:00Z via email_sha256:3f2a9c0b1d4e…",
    )
    # A later grant wins over an earlier denial just the same.
    regrant = _decision("d3", "ad_storage", True, MAY_1 + 1_000, identifier="user_id:42")
    verdict = _by_purpose(resolve([*decisions, regrant], "DE", SETTINGS))["ad_storage"]
    assert verdict.granted and verdict.decision == regrant and verdict.decision_count == 3
    assert verdict.explanation == ("granted by grpc (API) at 2024-05-01T10:00:00.001Z via user_id:42; "
                                   "it is later than the denial at 2024-05-01T10:00:00Z via anonymous_id:abc")


def test_at_equal_times_deny_wins_whatever_the_order() -> None:
    grant = _decision("a-grant", "analytics", True, MAY_1, identifier="user_id:1")
    deny = _decision("z-deny", "analytics", False, MAY_1, origin="GOOGLE_CONSENT_MODE", source="google_consent_mode",
                     identifier="anonymous_id:abc")
    older = _decision("old", "analytics", True, APR_1)
    for order in itertools.permutations([grant, deny, older]):
        verdict = resolve(order, "US", SETTINGS)[0]
        assert verdict.purpose == "analytics"
        assert not verdict.granted
        assert verdict.decision == deny
        assert verdict.explanation == ("denied by GOOGLE_CONSENT_MODE at 2024-05-01T10:00:00Z via anonymous_id:abc; "
                                       "granted and denied at the same time; deny wins")


def test_equal_decisions_are_reported_deterministically() -> None:
    first = _decision("d-1", "analytics", False, MAY_1, identifier="user_id:1")
    second = _decision("d-2", "analytics", False, MAY_1, identifier="user_id:2")
    for order in ([first, second], [second, first]):
        verdict = resolve(order, "US", SETTINGS)[0]
        assert verdict.decision == first
        assert verdict.explanation.endswith("; 1 earlier decision also denied it")


def test_explicit_decision_beats_the_jurisdiction_default() -> None:
    decisions = [_decision("d1", "ad_user_data", True, MAY_1)]
    verdicts = _by_purpose(resolve(decisions, "DE", SETTINGS))
    assert verdicts["ad_user_data"].granted and verdicts["ad_user_data"].resolved_by == "EXPLICIT"
    assert verdicts["ad_user_data"].explanation == "granted by grpc (API) at 2024-05-01T10:00:00Z via anonymous_id:abc"
    assert not verdicts["ad_personalization"].granted


# --- defaults --------------------------------------------------------------------------------------------------------


def test_opt_in_region_denies_unknown_purposes() -> None:
    for verdict in resolve([], "DE", SETTINGS):
        assert (verdict.granted, verdict.resolved_by, verdict.decision, verdict.decision_count) == \
            (False, "JURISDICTION_DEFAULT", None, 0)
        assert verdict.explanation == "no decision; DE is an opt-in region, so denied by default"


def test_opt_out_region_grants_unknown_purposes() -> None:
    for verdict in resolve([], "us-ny", SETTINGS):
        assert (verdict.granted, verdict.resolved_by, verdict.decision) == (True, "JURISDICTION_DEFAULT", None)
        assert verdict.explanation == "no decision; US-NY is an opt-out region, so granted by default"


def test_gpc_in_california() -> None:
    gpc = _gpc()
    verdicts = _by_purpose(resolve([gpc], "US-CA", SETTINGS))
    assert {p: (v.granted, v.resolved_by) for p, v in verdicts.items()} == {
        "analytics": (True, "JURISDICTION_DEFAULT"),
        "ad_user_data": (True, "JURISDICTION_DEFAULT"),
        "ad_personalization": (False, "GPC"),
        "ad_storage": (True, "JURISDICTION_DEFAULT"),
        "sale_or_sharing": (False, "EXPLICIT"),
    }
    assert verdicts["ad_personalization"].decision == gpc
    assert verdicts["ad_personalization"].decision_count == 0
    assert verdicts["ad_personalization"].explanation == (
        "no decision; US-CA is an opt-out region, but the person opted out of sale/sharing with a Global Privacy "
        "Control signal (GPC at 2024-05-01T10:00:00Z via anonymous_id:abc), so denied")
    assert verdicts["sale_or_sharing"].explanation == "denied by GPC at 2024-05-01T10:00:00Z via anonymous_id:abc"


def test_us_privacy_opt_out_signal() -> None:
    usp = _decision("d-usp", "sale_or_sharing", False, MAY_1, origin="US_PRIVACY", source="us_privacy", opt_out=True)
    verdict = _by_purpose(resolve([usp], "US-VA", SETTINGS))["ad_personalization"]
    assert (verdict.granted, verdict.resolved_by, verdict.decision) == (False, "OPT_OUT_SIGNAL", usp)
    assert "with an opt-out signal (US_PRIVACY at 2024-05-01T10:00:00Z via anonymous_id:abc)" in verdict.explanation


def test_opt_out_signal_only_counts_while_it_is_current() -> None:
    later_grant = _decision("d-api", "sale_or_sharing", True, MAY_1 + 1)
    verdicts = _by_purpose(resolve([_gpc(), later_grant], "US-CA", SETTINGS))
    assert verdicts["sale_or_sharing"].granted
    assert (verdicts["ad_personalization"].granted, verdicts["ad_personalization"].resolved_by) == \
        (True, "JURISDICTION_DEFAULT")
    # A plain denial (no opt-out signal) of sale/sharing is not an opt-out signal for the other purposes.
    plain = _decision("d-api", "sale_or_sharing", False, MAY_1)
    assert _by_purpose(resolve([plain], "US-CA", SETTINGS))["ad_personalization"].granted
    # A GPC signal later than the grant is current again.
    verdicts = _by_purpose(resolve([_gpc(occurred_us=MAY_1 + 2), later_grant], "US-CA", SETTINGS))
    assert verdicts["ad_personalization"].resolved_by == "GPC"


def test_opt_out_signal_does_not_override_an_explicit_decision() -> None:
    grant = _decision("d1", "ad_personalization", True, APR_1)
    verdict = _by_purpose(resolve([_gpc(), grant], "US-CA", SETTINGS))["ad_personalization"]
    assert (verdict.granted, verdict.resolved_by, verdict.decision) == (True, "EXPLICIT", grant)


def test_opt_out_signal_affects_only_the_configured_purposes() -> None:
    settings = ConsentSettings(opt_out_signal_denies=("sale_or_sharing",))
    assert _by_purpose(resolve([_gpc()], "US-CA", settings))["ad_personalization"].granted
    settings = ConsentSettings(opt_out_signal_denies=("sale_or_sharing", "ad_personalization", "ad_user_data"))
    assert not _by_purpose(resolve([_gpc()], "US-CA", settings))["ad_user_data"].granted


def test_gpc_in_an_opt_in_region_changes_nothing_else() -> None:
    verdicts = _by_purpose(resolve([_gpc()], "FR", SETTINGS))
    assert verdicts["ad_personalization"].resolved_by == "JURISDICTION_DEFAULT"
    assert verdicts["sale_or_sharing"].resolved_by == "EXPLICIT"


def test_unknown_jurisdiction_uses_the_policy_default() -> None:
    verdict = resolve([], "", SETTINGS)[0]
    assert (verdict.granted, verdict.resolved_by) == (False, "POLICY_DEFAULT")
    assert verdict.explanation == "no decision and the jurisdiction is unknown, so denied by the policy default"
    verdict = resolve([], "Atlantis", SETTINGS)[0]
    assert verdict.explanation == ('no decision and the jurisdiction "Atlantis" is not a recognised region code, '
                                   "so denied by the policy default")

    granting = ConsentSettings(unknown_jurisdiction="grant")
    verdicts = _by_purpose(resolve([], "XX", granting))
    assert all(v.granted and v.resolved_by == "POLICY_DEFAULT" for v in verdicts.values())
    assert verdicts["analytics"].explanation == (
        'no decision and the jurisdiction is unknown ("XX"), so granted by the policy default')
    # Granting by default still honours a current opt-out signal.
    verdicts = _by_purpose(resolve([_gpc()], "", granting))
    assert (verdicts["ad_personalization"].granted, verdicts["ad_personalization"].resolved_by) == (False, "GPC")
    assert verdicts["ad_user_data"].granted


def test_format_time() -> None:
    assert format_time(MAY_1) == "2024-05-01T10:00:00Z"
    assert format_time(MAY_1 + 250_000) == "2024-05-01T10:00:00.250Z"
    assert format_time(MAY_1 + 7) == "2024-05-01T10:00:00.000007Z"
    assert format_time(0) == "1970-01-01T00:00:00Z"


# --- destinations ---------------------------------------------------------------------------------------------------


def _verdicts(jurisdiction: str, *decisions: Decision) -> tuple[Verdict, ...]:
    return resolve(decisions, jurisdiction, SETTINGS)


def test_destination_allowed_when_every_required_purpose_is_granted() -> None:
    result = destination_consent(_verdicts("US"), ["ad_user_data", "ad_personalization"], advertising=True,
                                 limited_data_use_available=True)
    assert result == DestinationVerdict(
        allowed=True, required_purposes=("ad_user_data", "ad_personalization"), denied_purposes=(),
        limited_data_use=False,
        explanation="allowed: every required purpose is granted (ad_user_data, ad_personalization)")


def test_destination_denied_purposes() -> None:
    result = destination_consent(_verdicts("DE", _decision("d1", "ad_user_data", True, MAY_1)),
                                 ["ad_user_data", "ad_personalization"], advertising=True,
                                 limited_data_use_available=True)
    assert not result.allowed and not result.limited_data_use
    assert result.denied_purposes == ("ad_personalization",)
    assert result.explanation == ("not allowed: ad_personalization is denied (no decision; DE is an opt-in region, "
                                  "so denied by default)")


def test_sale_or_sharing_default_in_an_opt_in_region_is_not_an_opt_out() -> None:
    granted = [_decision(f"d-{p}", p, True, MAY_1) for p in ("ad_user_data", "ad_personalization")]
    verdicts = _verdicts("DE", *granted)
    assert not _by_purpose(verdicts)["sale_or_sharing"].granted
    result = destination_consent(verdicts, ["ad_user_data", "ad_personalization"], advertising=True,
                                 limited_data_use_available=False)
    assert result.allowed and not result.limited_data_use


def test_opt_out_blocks_advertising_destinations_without_ldu() -> None:
    verdicts = _verdicts("US-CA", _gpc())
    result = destination_consent(verdicts, ["ad_user_data"], advertising=True, limited_data_use_available=False)
    assert (result.allowed, result.limited_data_use, result.denied_purposes) == (False, False, ())
    assert result.explanation == (
        "not allowed: the person opted out of sale/sharing (denied by GPC at 2024-05-01T10:00:00Z via "
        "anonymous_id:abc), and the destination has no limited-data-use mode")


def test_opt_out_allows_limited_data_use() -> None:
    verdicts = _verdicts("US-CA", _gpc())
    result = destination_consent(verdicts, ["ad_user_data"], advertising=True, limited_data_use_available=True)
    assert (result.allowed, result.limited_data_use) == (True, True)
    assert result.explanation.startswith("allowed in limited-data-use mode: the person opted out of sale/sharing")


def test_ldu_does_not_rescue_other_denials() -> None:
    verdicts = _verdicts("US-CA", _gpc())  # ad_personalization denied by the GPC signal
    result = destination_consent(verdicts, ["ad_user_data", "ad_personalization"], advertising=True,
                                 limited_data_use_available=True)
    assert (result.allowed, result.limited_data_use, result.denied_purposes) == (False, False,
                                                                                 ("ad_personalization",))


def test_required_sale_or_sharing_denied_by_the_opt_out_can_use_ldu() -> None:
    verdicts = _verdicts("US-CA", _gpc())
    result = destination_consent(verdicts, ["ad_user_data", "sale_or_sharing"], advertising=True,
                                 limited_data_use_available=True)
    assert (result.allowed, result.limited_data_use, result.denied_purposes) == (True, True, ("sale_or_sharing",))
    without = destination_consent(verdicts, ["sale_or_sharing"], advertising=False, limited_data_use_available=True)
    assert (without.allowed, without.limited_data_use) == (False, False)


def test_explicit_sale_or_sharing_denial_is_an_opt_out() -> None:
    verdicts = _verdicts("US", _decision("d1", "sale_or_sharing", False, MAY_1, source="preference_center"))
    result = destination_consent(verdicts, ["ad_user_data"], advertising=True, limited_data_use_available=True)
    assert (result.allowed, result.limited_data_use) == (True, True)


def test_non_advertising_destinations_ignore_the_opt_out() -> None:
    verdicts = _verdicts("US-CA", _gpc())
    result = destination_consent(verdicts, ["analytics"], advertising=False, limited_data_use_available=True)
    assert (result.allowed, result.limited_data_use) == (True, False)


def test_unconfigured_required_purposes_are_ignored_with_a_note() -> None:
    result = destination_consent(_verdicts("US"), ["analytics", "functionality", "analytics"], advertising=False,
                                 limited_data_use_available=False)
    assert result.allowed
    assert result.required_purposes == ("analytics", "functionality")
    assert result.explanation == ("allowed: every required purpose is granted (analytics); "
                                  "ignored purposes that are not configured: functionality")
    nothing = destination_consent(_verdicts("DE"), [], advertising=True, limited_data_use_available=False)
    assert nothing.allowed
    assert nothing.explanation == "allowed: the destination requires no configured consent purpose"


def test_resolution_is_pure() -> None:
    decisions = (_gpc(), _decision("d1", "analytics", True, MAY_1))
    assert resolve(decisions, "US-CA", SETTINGS) == resolve(list(decisions), "US-CA", replace(SETTINGS))
