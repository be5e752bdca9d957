"""Consent signals → decisions (sources-and-consent spec §4.3, §4.4, §5)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format

from audiences.consent.settings import ConsentSettings
from audiences.consent.signals import (
    GPP_WARNING,
    Interpretation,
    SignalDecision,
    interpret,
)
from stitchgraph.v1 import consent_pb2
from tests.unit.test_consent_tcf import encode

SETTINGS = ConsentSettings()


def _decided(signals: dict[str, Any], settings: ConsentSettings = SETTINGS) -> dict[str, list[tuple[bool, str]]]:
    """purpose → [(granted, origin), ...] in emitted order."""
    found: dict[str, list[tuple[bool, str]]] = {}
    for d in interpret(signals, settings).decisions:
        found.setdefault(d.purpose, []).append((d.granted, d.origin))
    return found


def _only(signals: dict[str, Any], settings: ConsentSettings = SETTINGS) -> Interpretation:
    result = interpret(signals, settings)
    assert result.warnings == ()
    return result


def test_no_signals_no_decisions() -> None:
    assert interpret({}, SETTINGS) == Interpretation((), ())


def test_non_object_signals_warn() -> None:
    result = interpret(["gpc"], SETTINGS)  # type: ignore[arg-type]
    assert result.decisions == ()
    assert result.warnings == ("consent signals must be an object, not list",)


# --- Google Consent Mode ------------------------------------------------------------------------------------------


def test_google_consent_mode_maps_its_four_core_fields() -> None:
    result = _only({"google_consent_mode": {
        "ad_storage": "CONSENT_STATUS_GRANTED",
        "analytics_storage": "CONSENT_STATUS_DENIED",
        "ad_user_data": "CONSENT_STATUS_GRANTED",
        "ad_personalization": "CONSENT_STATUS_DENIED",
        "functionality_storage": "CONSENT_STATUS_GRANTED",  # auxiliary: no purpose
        "security_storage": "CONSENT_STATUS_GRANTED",
    }})
    assert result.decisions == (
        SignalDecision("analytics", False, "GOOGLE_CONSENT_MODE", "Google Consent Mode analytics_storage = denied"),
        SignalDecision("ad_user_data", True, "GOOGLE_CONSENT_MODE", "Google Consent Mode ad_user_data = granted"),
        SignalDecision("ad_personalization", False, "GOOGLE_CONSENT_MODE",
                       "Google Consent Mode ad_personalization = denied"),
        SignalDecision("ad_storage", True, "GOOGLE_CONSENT_MODE", "Google Consent Mode ad_storage = granted"),
    )


def test_google_consent_mode_from_the_proto() -> None:
    signals = consent_pb2.ConsentSignals(google_consent_mode=consent_pb2.GoogleConsentMode(
        ad_storage=consent_pb2.CONSENT_STATUS_DENIED, ad_user_data=consent_pb2.CONSENT_STATUS_GRANTED))
    stored = json_format.MessageToDict(signals, preserving_proto_field_name=True)
    assert _decided(stored) == {"ad_user_data": [(True, "GOOGLE_CONSENT_MODE")],
                                "ad_storage": [(False, "GOOGLE_CONSENT_MODE")]}


def test_google_consent_mode_accepts_gtag_words_and_enum_numbers() -> None:
    assert _decided({"google_consent_mode": {"ad_storage": "granted", "analytics_storage": 2,
                                             "ad_user_data": "CONSENT_STATUS_UNSPECIFIED", "ad_personalization": 0}}) \
        == {"analytics": [(False, "GOOGLE_CONSENT_MODE")], "ad_storage": [(True, "GOOGLE_CONSENT_MODE")]}


def test_google_consent_mode_only_decides_configured_purposes() -> None:
    settings = ConsentSettings(purposes=("ad_storage", "sale_or_sharing"), segment_categories={},
                               rudderstack_categories={}, tcf_purposes={"ad_storage": (1,)})
    settings.validate()
    assert _decided({"google_consent_mode": {"ad_storage": "CONSENT_STATUS_DENIED",
                                             "analytics_storage": "CONSENT_STATUS_DENIED"}}, settings) \
        == {"ad_storage": [(False, "GOOGLE_CONSENT_MODE")]}


def test_google_consent_mode_bad_values_warn() -> None:
    result = interpret({"google_consent_mode": {"ad_storage": "maybe", "ad_user_data": True,
                                                "analytics_storage": {"x": 1}}}, SETTINGS)
    assert result.decisions == ()
    assert result.warnings == (
        "google_consent_mode.ad_storage ignored: 'maybe' is not a consent status",
        "google_consent_mode.analytics_storage ignored: {'x': 1} is not a consent status",
        "google_consent_mode.ad_user_data ignored: True is not a consent status",
    )
    assert interpret({"google_consent_mode": "granted"}, SETTINGS).warnings == (
        "google_consent_mode ignored: it must be an object",)


# --- Segment -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("segment", [{}, {"category_preferences": {}}])
def test_segment_present_but_empty_denies_every_mapped_purpose(segment: dict[str, Any]) -> None:
    result = _only({"segment": segment})
    assert [(d.purpose, d.granted) for d in result.decisions] == [
        ("analytics", False), ("ad_user_data", False), ("ad_personalization", False), ("ad_storage", False)]
    assert result.decisions[0].detail == \
        'Segment category "Analytics" missing from category_preferences (counts as false)'


def test_segment_present_but_empty_as_message_to_dict_renders_it() -> None:
    signals = consent_pb2.ConsentSignals()
    signals.segment.SetInParent()
    stored = json_format.MessageToDict(signals, preserving_proto_field_name=True)
    assert stored == {"segment": {}}
    assert {p: v[0][0] for p, v in _decided(stored).items()} == {
        "analytics": False, "ad_user_data": False, "ad_personalization": False, "ad_storage": False}


def test_segment_absent_means_no_enforcement() -> None:
    assert _decided({"google_consent_mode": {}}) == {}


def test_segment_categories() -> None:
    result = _only({"segment": {"category_preferences": {"Advertising": True, "Analytics": False,
                                                         "Functional": True}}})
    assert result.decisions == (
        SignalDecision("analytics", False, "SEGMENT", 'Segment category "Analytics" = false'),
        SignalDecision("ad_user_data", True, "SEGMENT", 'Segment category "Advertising" = true'),
        SignalDecision("ad_personalization", True, "SEGMENT", 'Segment category "Advertising" = true'),
        SignalDecision("ad_storage", True, "SEGMENT", 'Segment category "Advertising" = true'),
    )


def test_segment_purpose_mapped_from_several_categories_needs_all_of_them() -> None:
    settings = ConsentSettings(segment_categories={
        "Advertising": ("ad_user_data", "ad_personalization"),
        "Personalization": ("ad_personalization",),
        "DataSharing": ("sale_or_sharing",),
    })
    settings.validate()
    result = _only({"segment": {"category_preferences": {"Advertising": True}}}, settings)
    assert [(d.purpose, d.granted, d.detail) for d in result.decisions] == [
        ("ad_user_data", True, 'Segment category "Advertising" = true'),
        ("ad_personalization", False,
         'Segment category "Personalization" missing from category_preferences (counts as false)'),
        ("sale_or_sharing", False,
         'Segment category "DataSharing" missing from category_preferences (counts as false)'),
    ]
    both = _only({"segment": {"category_preferences": {"Advertising": True, "Personalization": True,
                                                       "DataSharing": False}}}, settings)
    assert [(d.purpose, d.granted, d.detail) for d in both.decisions] == [
        ("ad_user_data", True, 'Segment category "Advertising" = true'),
        ("ad_personalization", True, 'Segment categories "Advertising", "Personalization" = true'),
        ("sale_or_sharing", False, 'Segment category "DataSharing" = false'),
    ]


def test_segment_non_boolean_preference_counts_as_false() -> None:
    result = interpret({"segment": {"category_preferences": {"Advertising": "yes", "Analytics": True}}}, SETTINGS)
    assert _decided({"segment": {"category_preferences": {"Advertising": "yes", "Analytics": True}}}) == {
        "analytics": [(True, "SEGMENT")], "ad_user_data": [(False, "SEGMENT")],
        "ad_personalization": [(False, "SEGMENT")], "ad_storage": [(False, "SEGMENT")]}
    assert result.warnings == ('segment category "Advertising" = \'yes\' is not a boolean; it counts as false',)


def test_segment_malformed_warns() -> None:
    assert interpret({"segment": []}, SETTINGS).warnings == ("segment consent ignored: it must be an object",)
    result = interpret({"segment": {"category_preferences": ["Advertising"]}}, SETTINGS)
    assert result.decisions == ()
    assert result.warnings == (
        "segment consent ignored: category_preferences must be an object of category → boolean",)


# --- RudderStack -------------------------------------------------------------------------------------------------


def _rudder(allowed: list[str], denied: list[str], strategy: str = "", provider: str = "oneTrust") -> dict[str, Any]:
    return {"rudderstack": {"provider": provider, "allowed_consent_ids": allowed, "denied_consent_ids": denied,
                            "resolution_strategy": strategy}}


RUDDER_SETTINGS = ConsentSettings(rudderstack_categories={
    "C0002": ("analytics",),
    "C0004": ("ad_user_data", "ad_personalization"),
    "C0005": ("ad_personalization",),
})


def test_rudderstack_defaults_to_and_any_denied_category_denies() -> None:
    result = _only(_rudder(["C0002", "C0004"], ["C0005"]), RUDDER_SETTINGS)
    assert [(d.purpose, d.granted, d.detail) for d in result.decisions] == [
        ("analytics", True, 'RudderStack (oneTrust) allowed category "C0002"'),
        ("ad_user_data", True, 'RudderStack (oneTrust) allowed category "C0004"'),
        ("ad_personalization", False, 'RudderStack (oneTrust) denied category "C0005" (strategy "and": any denial)'),
    ]


def test_rudderstack_or_denies_only_when_all_categories_are_denied() -> None:
    result = _only(_rudder(["C0004"], ["C0005"], "or"), RUDDER_SETTINGS)
    assert [(d.purpose, d.granted) for d in result.decisions] == [("ad_user_data", True),
                                                                  ("ad_personalization", True)]
    result = _only(_rudder([], ["C0004", "C0005"], "or", provider="ketch"), RUDDER_SETTINGS)
    assert [(d.purpose, d.granted, d.detail) for d in result.decisions] == [
        ("ad_user_data", False, 'RudderStack (ketch) denied category "C0004" (strategy "or": all denied)'),
        ("ad_personalization", False,
         'RudderStack (ketch) denied categories "C0004", "C0005" (strategy "or": all denied)'),
    ]


def test_rudderstack_without_allowed_or_denied_ids_decides_nothing() -> None:
    assert _only(_rudder([], []), RUDDER_SETTINGS).decisions == ()
    assert _only(_rudder(["C0001", "C0003"], ["C0009"]), RUDDER_SETTINGS).decisions == ()
    # The stored form of an empty RudderStack object (MessageToDict drops empty fields).
    assert _only({"rudderstack": {}}, RUDDER_SETTINGS).decisions == ()


def test_rudderstack_denial_beats_allowance_of_the_same_category() -> None:
    assert _decided(_rudder(["C0002"], ["C0002"]), RUDDER_SETTINGS) == {"analytics": [(False, "RUDDERSTACK")]}


def test_rudderstack_default_onetrust_categories() -> None:
    assert _decided(_rudder(["C0002"], ["C0004"])) == {
        "analytics": [(True, "RUDDERSTACK")], "ad_user_data": [(False, "RUDDERSTACK")],
        "ad_personalization": [(False, "RUDDERSTACK")], "ad_storage": [(False, "RUDDERSTACK")]}


def test_rudderstack_strategy_is_case_insensitive_and_bad_values_warn() -> None:
    assert _decided(_rudder([], ["C0005"], "OR"), RUDDER_SETTINGS) == {}
    result = interpret(_rudder([], ["C0005"], "xor"), RUDDER_SETTINGS)
    assert result.warnings == ('rudderstack resolution_strategy \'xor\' is not "and" or "or"; using "and"',)
    assert [(d.purpose, d.granted) for d in result.decisions] == [("ad_personalization", False)]


def test_rudderstack_malformed_ids_warn() -> None:
    result = interpret({"rudderstack": {"denied_consent_ids": "C0004"}}, RUDDER_SETTINGS)
    assert result.decisions == ()
    assert result.warnings == ("rudderstack denied_consent_ids ignored: it must be a list of category IDs",)
    assert interpret({"rudderstack": 1}, SETTINGS).warnings == ("rudderstack consent ignored: it must be an object",)


# --- GPC and the US Privacy string -----------------------------------------------------------------------------


def test_gpc_denies_sale_or_sharing_as_an_opt_out() -> None:
    assert _only({"gpc": True}).decisions == (
        SignalDecision("sale_or_sharing", False, "GPC", "Global Privacy Control signal (Sec-GPC: 1)", opt_out=True),)


def test_gpc_false_is_no_signal() -> None:
    assert _only({"gpc": False}).decisions == ()


def test_gpc_non_boolean_warns() -> None:
    assert interpret({"gpc": "1"}, SETTINGS) == Interpretation((), ("gpc ignored: '1' is not a boolean",))


def test_gpc_without_sale_or_sharing_configured_decides_nothing() -> None:
    settings = ConsentSettings(purposes=("analytics",), segment_categories={}, rudderstack_categories={},
                               tcf_purposes={}, opt_out_signal_denies=())
    settings.validate()
    assert _only({"gpc": True, "us_privacy": "1YYN"}, settings).decisions == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1YYN", SignalDecision("sale_or_sharing", False, "US_PRIVACY", 'US Privacy string "1YYN": opted out of sale',
                                opt_out=True)),
        ("1NYY", SignalDecision("sale_or_sharing", False, "US_PRIVACY", 'US Privacy string "1NYY": opted out of sale',
                                opt_out=True)),
        ("1YNN", SignalDecision("sale_or_sharing", True, "US_PRIVACY",
                                'US Privacy string "1YNN": not opted out of sale')),
        (" 1yyn ", SignalDecision("sale_or_sharing", False, "US_PRIVACY",
                                  'US Privacy string "1YYN": opted out of sale', opt_out=True)),
        ("1---", None),
        ("1Y-N", None),
    ],
)
def test_us_privacy(value: str, expected: SignalDecision | None) -> None:
    assert _only({"us_privacy": value}).decisions == ((expected,) if expected else ())


@pytest.mark.parametrize("value", ["2YYN", "1YY", "1YYNN", "YYYY", "1XYN", 1])
def test_invalid_us_privacy_warns(value: object) -> None:
    result = interpret({"us_privacy": value}, SETTINGS)
    assert result.decisions == ()
    assert result.warnings == (
        f"us_privacy ignored: {value!r} is not a US Privacy string (1 followed by three of Y, N, -)",)


# --- TCF and GPP -------------------------------------------------------------------------------------------------


def test_tcf_decides_each_mapped_purpose() -> None:
    tc = encode(purpose_consents=[1, 3, 4, 8], purpose_li=[7])
    result = _only({"tcf_string": tc})
    assert [(d.purpose, d.granted, d.detail) for d in result.decisions] == [
        ("analytics", True, "TCF purposes 1 (consent), 8 (consent) allowed"),
        ("ad_user_data", True, "TCF purposes 1 (consent), 7 (legitimate_interest) allowed"),
        ("ad_personalization", True, "TCF purposes 1 (consent), 3 (consent), 4 (consent) allowed"),
        ("ad_storage", True, "TCF purpose 1 (consent) allowed"),
    ]  # sale_or_sharing: not a TCF concept


def test_tcf_denies_when_any_mapped_purpose_is_not_allowed() -> None:
    tc = encode(purpose_consents=[1, 3], purpose_li=[4])  # LI never unlocks purpose 4
    decided = {d.purpose: d for d in _only({"tcf_string": tc}).decisions}
    assert {p: d.granted for p, d in decided.items()} == {
        "analytics": False, "ad_user_data": False, "ad_personalization": False, "ad_storage": True}
    assert decided["ad_personalization"].detail == (
        "TCF: no consent for purpose 4; legitimate interest is not permitted for purpose 4 under TCF 2.2")


def test_tcf_with_a_configured_vendor() -> None:
    settings = ConsentSettings(tcf_vendor_id=755)
    settings.validate()
    tc = encode(purpose_consents=[1, 7, 8], vendor_consents=[755], restrictions=[(8, 0, [(755, 755)])])
    decided = {d.purpose: d for d in _only({"tcf_string": tc}, settings).decisions}
    assert {p: d.granted for p, d in decided.items()} == {
        "analytics": False, "ad_user_data": True, "ad_personalization": False, "ad_storage": True}
    assert decided["ad_user_data"].detail == "TCF purposes 1 (consent), 7 (consent) allowed for vendor 755"
    assert decided["analytics"].detail == "TCF: the publisher does not allow purpose 8 for vendor 755"
    other = encode(purpose_consents=[1, 7, 8], vendor_consents=[1])
    assert {d.purpose: d.granted for d in _only({"tcf_string": other}, settings).decisions} == {
        "analytics": False, "ad_user_data": False, "ad_personalization": False, "ad_storage": False}


@pytest.mark.parametrize(
    ("value", "warning"),
    [
        ("not a tc string", "tcf_string ignored: segment 1 contains ' ' at position 4, which is not base64url"),
        ("CQ", "tcf_string ignored: segment 1 is truncated: it ends before Created"),
        (encode(policy_version=2), "tcf_string ignored: TCF policy version 2 predates TCF 2.2"),
        (7, "tcf_string ignored: it must be a string"),
    ],
)
def test_invalid_tcf_warns(value: object, warning: str) -> None:
    assert interpret({"tcf_string": value}, SETTINGS) == Interpretation((), (warning,))


def test_gpp_is_stored_but_not_interpreted() -> None:
    result = interpret({"gpp_string": "DBABMA~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA", "gpp_section_ids": [2]},
                       SETTINGS)
    assert result == Interpretation((), (GPP_WARNING,))
    assert _only({"gpp_section_ids": [7]}).decisions == ()


# --- several origins at once ---------------------------------------------------------------------------------------


def test_all_origins_are_kept_in_a_deterministic_order() -> None:
    signals: dict[str, Any] = {
        "tcf_string": encode(purpose_consents=[1]),
        "us_privacy": "1YYN",
        "gpc": True,
        "rudderstack": {"allowed_consent_ids": ["C0004"]},
        "segment": {"category_preferences": {"Advertising": False, "Analytics": True}},
        "google_consent_mode": {"ad_storage": "CONSENT_STATUS_GRANTED"},
    }
    result = _only(signals)
    assert [(d.purpose, d.origin, d.granted) for d in result.decisions] == [
        ("analytics", "SEGMENT", True),
        ("analytics", "TCF", False),
        ("ad_user_data", "SEGMENT", False),
        ("ad_user_data", "RUDDERSTACK", True),
        ("ad_user_data", "TCF", False),
        ("ad_personalization", "SEGMENT", False),
        ("ad_personalization", "RUDDERSTACK", True),
        ("ad_personalization", "TCF", False),
        ("ad_storage", "GOOGLE_CONSENT_MODE", True),
        ("ad_storage", "SEGMENT", False),
        ("ad_storage", "RUDDERSTACK", True),
        ("ad_storage", "TCF", True),
        ("sale_or_sharing", "GPC", False),
        ("sale_or_sharing", "US_PRIVACY", False),
    ]
    reordered = dict(reversed(list(signals.items())))
    assert interpret(reordered, SETTINGS) == result


def test_purpose_order_follows_the_settings() -> None:
    settings = ConsentSettings(purposes=("sale_or_sharing", "ad_storage", "analytics", "ad_user_data",
                                         "ad_personalization"))
    settings.validate()
    result = _only({"gpc": True, "google_consent_mode": {"ad_storage": "CONSENT_STATUS_DENIED",
                                                         "analytics_storage": "CONSENT_STATUS_DENIED"}}, settings)
    assert [d.purpose for d in result.decisions] == ["sale_or_sharing", "ad_storage", "analytics"]
