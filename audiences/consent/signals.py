"""Consent signals → per-purpose decisions (DESIGN §6, sources-and-consent spec §4.3, §4.4, §5).

The input is a ``ConsentSignals`` message as ``MessageToDict(..., preserving_proto_field_name=True)`` renders it,
which is how events store their consent context::

    {"google_consent_mode": {"ad_storage": "CONSENT_STATUS_GRANTED", ...},
     "segment": {"category_preferences": {"Advertising": true}},      # {} = present, every category false
     "rudderstack": {"provider": "oneTrust", "allowed_consent_ids": [...], "denied_consent_ids": [...],
                     "resolution_strategy": "and"},
     "gpc": true, "us_privacy": "1YYN", "tcf_string": "CQ...", "gpp_string": "DB...", "gpp_section_ids": [7]}

:func:`interpret` maps each signal onto the configured purposes and returns every decision it implies, several per
purpose when several signals speak about it (the policy resolves them), in a deterministic order: configured
purpose order, then origin in the order of :data:`ORIGINS`. Malformed parts produce warnings, never exceptions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from audiences.consent.settings import SALE_OR_SHARING, ConsentSettings
from audiences.consent.tcf import TcfError, decode, purpose_status

GOOGLE_CONSENT_MODE = "GOOGLE_CONSENT_MODE"
SEGMENT = "SEGMENT"
RUDDERSTACK = "RUDDERSTACK"
GPC = "GPC"
US_PRIVACY = "US_PRIVACY"
TCF = "TCF"
#: Origins of signal decisions, in the order of the ConsentDecisionOrigin enum (decisions are emitted in it).
ORIGINS: tuple[str, ...] = (GOOGLE_CONSENT_MODE, SEGMENT, RUDDERSTACK, GPC, US_PRIVACY, TCF)

#: Google Consent Mode field → purpose. Auxiliary fields (functionality_storage, ...) map to nothing.
GOOGLE_CONSENT_MODE_PURPOSES: Mapping[str, str] = {
    "ad_storage": "ad_storage",
    "analytics_storage": "analytics",
    "ad_user_data": "ad_user_data",
    "ad_personalization": "ad_personalization",
}

_US_PRIVACY_RE = re.compile(r"1[YN-][YN-][YN-]")

GPP_WARNING = "GPP strings are stored but not interpreted"


@dataclass(frozen=True)
class SignalDecision:
    """One decision a signal implies: ``purpose`` granted or denied, by ``origin`` (one of :data:`ORIGINS`).
    ``detail`` says what in the signal decided it; ``opt_out`` marks US opt-out signals (GPC, US Privacy "Y")."""

    purpose: str
    granted: bool
    origin: str
    detail: str
    opt_out: bool = False


@dataclass(frozen=True)
class Interpretation:
    decisions: tuple[SignalDecision, ...]
    warnings: tuple[str, ...]


def interpret(signals: Mapping[str, Any], settings: ConsentSettings) -> Interpretation:
    """The decisions ``signals`` imply under ``settings``, and warnings about the parts that were ignored."""
    decisions: list[SignalDecision] = []
    warnings: list[str] = []
    if not isinstance(signals, Mapping):
        return Interpretation((), (f"consent signals must be an object, not {type(signals).__name__}",))
    configured = set(settings.purposes)

    _google_consent_mode(signals.get("google_consent_mode"), configured, decisions, warnings)
    _segment(signals.get("segment"), settings, decisions, warnings)
    _rudderstack(signals.get("rudderstack"), settings, decisions, warnings)
    _gpc(signals.get("gpc"), configured, decisions, warnings)
    _us_privacy(signals.get("us_privacy"), configured, decisions, warnings)
    _tcf(signals.get("tcf_string"), settings, decisions, warnings)
    if signals.get("gpp_string"):
        warnings.append(GPP_WARNING)

    order = {purpose: index for index, purpose in enumerate(settings.purposes)}
    origin_order = {origin: index for index, origin in enumerate(ORIGINS)}
    decisions.sort(key=lambda d: (order[d.purpose], origin_order[d.origin]))
    return Interpretation(tuple(decisions), tuple(warnings))


# --- Google Consent Mode ---------------------------------------------------------------------------------------


def _google_consent_mode(value: Any, configured: set[str], decisions: list[SignalDecision],
                         warnings: list[str]) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        warnings.append("google_consent_mode ignored: it must be an object")
        return
    for field, purpose in GOOGLE_CONSENT_MODE_PURPOSES.items():
        state = value.get(field)
        status = _consent_status(state)
        if purpose not in configured or status == "unspecified":
            continue
        if status == "invalid":
            warnings.append(f"google_consent_mode.{field} ignored: {state!r} is not a consent status")
        else:
            decisions.append(SignalDecision(purpose, status == "granted", GOOGLE_CONSENT_MODE,
                                            f"Google Consent Mode {field} = {status}"))


def _consent_status(state: Any) -> str:
    """A ConsentStatus value as JSON carries it (enum name, its short form, gtag's lower-case word, or the enum
    number): "granted", "denied", "unspecified" or "invalid"."""
    if state is None:
        return "unspecified"
    if isinstance(state, bool):
        return "invalid"
    if isinstance(state, int):
        return {0: "unspecified", 1: "granted", 2: "denied"}.get(state, "invalid")
    if isinstance(state, str):
        name = state.strip().upper().removeprefix("CONSENT_STATUS_").removeprefix("CONSENT_")
        return {"": "unspecified", "UNSPECIFIED": "unspecified", "GRANTED": "granted", "DENIED": "denied"}.get(
            name, "invalid")
    return "invalid"


# --- Segment (spec §4.4) ---------------------------------------------------------------------------------------


def _segment(value: Any, settings: ConsentSettings, decisions: list[SignalDecision], warnings: list[str]) -> None:
    if value is None:
        return  # no consent object: no enforcement
    if not isinstance(value, Mapping):
        warnings.append("segment consent ignored: it must be an object")
        return
    preferences = value.get("category_preferences", value.get("categoryPreferences"))
    if preferences is None:
        preferences = {}  # MessageToDict omits an empty map: present but empty means every category is false
    if not isinstance(preferences, Mapping):
        warnings.append("segment consent ignored: category_preferences must be an object of category → boolean")
        return
    for category, granted in preferences.items():
        if not isinstance(granted, bool):
            warnings.append(f'segment category "{category}" = {granted!r} is not a boolean; it counts as false')
    for purpose in settings.purposes:
        categories = _categories_for(settings.segment_categories, purpose)
        if not categories:
            continue
        missing = [c for c in categories if c not in preferences]
        false = [c for c in categories if c in preferences and preferences[c] is not True]
        if not missing and not false:
            detail = "Segment " + _listing("category", categories, "true")
            decisions.append(SignalDecision(purpose, True, SEGMENT, detail))
            continue
        parts = []
        if false:
            parts.append("Segment " + _listing("category", false, "false"))
        if missing:
            parts.append(f"Segment {_listing('category', missing)} missing from category_preferences (counts as false)")
        decisions.append(SignalDecision(purpose, False, SEGMENT, "; ".join(parts)))


# --- RudderStack (spec §4.3) -----------------------------------------------------------------------------------


def _rudderstack(value: Any, settings: ConsentSettings, decisions: list[SignalDecision], warnings: list[str]) -> None:
    """Per purpose, over the categories mapped to it: with the "or" strategy the purpose is denied only when all of
    them are denied, otherwise (the "and" default, as in rudder-server) when any is. A purpose that is not denied is
    granted when at least one of its categories is in the allowed IDs, and gets no decision otherwise. For
    ``provider: custom`` rudder-server takes the strategy from the destination's settings; we have none, so the
    event's strategy (default "and") applies to every provider."""
    if value is None:
        return
    if not isinstance(value, Mapping):
        warnings.append("rudderstack consent ignored: it must be an object")
        return
    allowed = _ids(value.get("allowed_consent_ids"), "allowed_consent_ids", warnings)
    denied = _ids(value.get("denied_consent_ids"), "denied_consent_ids", warnings)
    raw_strategy = value.get("resolution_strategy") or ""
    strategy = raw_strategy.strip().lower() if isinstance(raw_strategy, str) else ""
    if strategy not in ("", "and", "or"):
        warnings.append(f'rudderstack resolution_strategy {raw_strategy!r} is not "and" or "or"; using "and"')
    strategy = "or" if strategy == "or" else "and"
    provider = value.get("provider")
    label = f"RudderStack ({provider})" if isinstance(provider, str) and provider else "RudderStack"
    for purpose in settings.purposes:
        categories = _categories_for(settings.rudderstack_categories, purpose)
        if not categories:
            continue
        denied_here = [c for c in categories if c in denied]
        if strategy == "or":
            if len(denied_here) == len(categories):
                detail = f'{label} denied {_listing("category", denied_here)} (strategy "or": all denied)'
                decisions.append(SignalDecision(purpose, False, RUDDERSTACK, detail))
                continue
        elif denied_here:
            detail = f'{label} denied {_listing("category", denied_here)} (strategy "and": any denial)'
            decisions.append(SignalDecision(purpose, False, RUDDERSTACK, detail))
            continue
        allowed_here = [c for c in categories if c in allowed]
        if allowed_here:
            detail = f"{label} allowed {_listing('category', allowed_here)}"
            decisions.append(SignalDecision(purpose, True, RUDDERSTACK, detail))


def _ids(value: Any, field: str, warnings: list[str]) -> set[str]:
    if value is None:
        return set()
    if not isinstance(value, list | tuple):
        warnings.append(f"rudderstack {field} ignored: it must be a list of category IDs")
        return set()
    return {str(item) for item in value if isinstance(item, str | int) and not isinstance(item, bool)}


# --- US opt-out signals ----------------------------------------------------------------------------------------


def _gpc(value: Any, configured: set[str], decisions: list[SignalDecision], warnings: list[str]) -> None:
    if value is None or value is False:
        return  # false means "no signal", not consent
    if value is not True:
        warnings.append(f"gpc ignored: {value!r} is not a boolean")
        return
    if SALE_OR_SHARING in configured:
        decisions.append(SignalDecision(SALE_OR_SHARING, False, GPC, "Global Privacy Control signal (Sec-GPC: 1)",
                                        opt_out=True))


def _us_privacy(value: Any, configured: set[str], decisions: list[SignalDecision], warnings: list[str]) -> None:
    """IAB US Privacy (CCPA) string: version "1", notice given, opted out of sale, LSPA covered, each Y/N/-.
    Only the third character (opt-out of sale) decides anything."""
    if value is None or value == "":
        return
    text = value.strip().upper() if isinstance(value, str) else None
    if text is None or not _US_PRIVACY_RE.fullmatch(text):
        warnings.append(f"us_privacy ignored: {value!r} is not a US Privacy string (1 followed by three of Y, N, -)")
        return
    if SALE_OR_SHARING not in configured or text[2] == "-":
        return
    if text[2] == "Y":
        decisions.append(SignalDecision(SALE_OR_SHARING, False, US_PRIVACY,
                                        f'US Privacy string "{text}": opted out of sale', opt_out=True))
    else:
        decisions.append(SignalDecision(SALE_OR_SHARING, True, US_PRIVACY,
                                        f'US Privacy string "{text}": not opted out of sale'))


# --- TCF -------------------------------------------------------------------------------------------------------


def _tcf(value: Any, settings: ConsentSettings, decisions: list[SignalDecision], warnings: list[str]) -> None:
    if value is None or value == "":
        return
    if not isinstance(value, str):
        warnings.append("tcf_string ignored: it must be a string")
        return
    try:
        tc = decode(value)
    except TcfError as error:
        warnings.append(f"tcf_string ignored: {error.reason}")
        return
    vendor = settings.tcf_vendor_id
    for purpose in settings.purposes:
        tcf_ids = settings.tcf_purposes.get(purpose)
        if not tcf_ids:
            continue
        statuses = [purpose_status(tc, tcf_id, vendor) for tcf_id in tcf_ids]
        refused = [s for s in statuses if s.basis is None]
        if refused:
            detail = "TCF: " + "; ".join(s.reason for s in refused)
            decisions.append(SignalDecision(purpose, False, TCF, detail))
        else:
            bases = ", ".join(f"{s.purpose_id} ({s.basis})" for s in statuses)
            noun = "purposes" if len(statuses) > 1 else "purpose"
            suffix = f" for vendor {vendor}" if vendor is not None else ""
            decisions.append(SignalDecision(purpose, True, TCF, f"TCF {noun} {bases} allowed{suffix}"))


# --- helpers ---------------------------------------------------------------------------------------------------


def _categories_for(mapping: Mapping[str, tuple[str, ...]], purpose: str) -> list[str]:
    return [category for category, purposes in mapping.items() if purpose in purposes]


def _listing(noun: str, names: Iterable[str], value: str | None = None) -> str:
    """'category "A" = false' or 'categories "A", "B" = false'."""
    items = list(names)
    quoted = ", ".join(f'"{name}"' for name in items)
    text = f"{noun if len(items) == 1 else _plural(noun)} {quoted}"
    return f"{text} = {value}" if value is not None else text


def _plural(noun: str) -> str:
    return noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
