"""Resolving a person's consent from recorded decisions, and destination eligibility (DESIGN §6). Pure.

Per configured purpose:

1. **Explicit**: the latest decision for the purpose wins, whichever of the person's identifiers it is recorded
   against. At equal times a denial beats a grant; among equal decisions the lowest ``decision_id`` is reported,
   so the result never depends on input order.
2. **No decision** for the purpose: the person's jurisdiction decides (:func:`region_kind`).

   * opt-in region (EEA, UK, Switzerland by default): denied (``JURISDICTION_DEFAULT``);
   * opt-out region (everything else that is a well-formed ISO code): granted (``JURISDICTION_DEFAULT``), unless
     the purpose is one of ``opt_out_signal_denies`` and the person's opt-out signal is current, that is the
     winning ``sale_or_sharing`` decision is a denial carried by an opt-out signal (GPC or a US Privacy "Y"):
     then denied, ``resolved_by`` "GPC" or "OPT_OUT_SIGNAL", with that signal as the decision;
   * unknown jurisdiction: ``settings.unknown_jurisdiction`` (``POLICY_DEFAULT``). When that default is "grant",
     a current opt-out signal still denies the ``opt_out_signal_denies`` purposes, as in an opt-out region
     (a fallback that grants should not be more permissive than the opt-out regions it stands in for).

:func:`destination_consent` then decides whether a destination may receive the person's data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from audiences.consent.settings import REGION_RE, SALE_OR_SHARING, ConsentSettings

RegionKind = Literal["opt_in", "opt_out", "unknown"]

EXPLICIT = "EXPLICIT"
JURISDICTION_DEFAULT = "JURISDICTION_DEFAULT"
GPC = "GPC"
OPT_OUT_SIGNAL = "OPT_OUT_SIGNAL"
POLICY_DEFAULT = "POLICY_DEFAULT"
#: Resolutions that mean the person opted out of sale/sharing (as opposed to a regional default).
OPT_OUT_RESOLUTIONS = frozenset({EXPLICIT, GPC, OPT_OUT_SIGNAL})

#: Codes that geolocation services use for "no country" (Cloudflare XX and T1 for Tor, MaxMind's legacy A1, A2,
#: O1, AP) and ISO's "unknown" ZZ: treated as an unknown jurisdiction.
UNKNOWN_COUNTRY_CODES = frozenset({"XX", "ZZ", "T1", "A1", "A2", "O1", "AP"})
#: ISO 3166 exceptionally reserved codes that name a country with another official code.
COUNTRY_ALIASES = {"UK": "GB", "EL": "GR"}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_SHOWN_VALUE = 32


@dataclass(frozen=True)
class Decision:
    """One recorded decision, as stored. ``identifier`` is the "type:value" label of the identifier it is recorded
    against; ``opt_out`` marks denials carried by a US opt-out signal (GPC, US Privacy string)."""

    decision_id: str
    purpose: str
    granted: bool
    occurred_us: int
    origin: str
    source: str
    jurisdiction: str
    event_id: str
    identifier: str
    opt_out: bool = False


@dataclass(frozen=True)
class Verdict:
    """The resolved consent for one purpose. ``resolved_by``: "EXPLICIT", "JURISDICTION_DEFAULT", "GPC",
    "OPT_OUT_SIGNAL" or "POLICY_DEFAULT". ``decision`` is the winning decision (EXPLICIT) or the opt-out signal
    that applied (GPC, OPT_OUT_SIGNAL); ``decision_count`` counts the decisions recorded for the purpose."""

    purpose: str
    granted: bool
    resolved_by: str
    decision: Decision | None
    explanation: str
    decision_count: int


@dataclass(frozen=True)
class DestinationVerdict:
    allowed: bool
    required_purposes: tuple[str, ...]
    denied_purposes: tuple[str, ...]
    limited_data_use: bool
    explanation: str


def normalize_jurisdiction(jurisdiction: str) -> str:
    """Upper-case, trimmed, with "UK"/"EL" read as "GB"/"GR"; "" when it is not an ISO 3166-1 alpha-2 or
    ISO 3166-2 code, or is a placeholder for "no country" (:data:`UNKNOWN_COUNTRY_CODES`)."""
    code = jurisdiction.strip().upper() if isinstance(jurisdiction, str) else ""
    if not REGION_RE.fullmatch(code):
        return ""
    country, _, subdivision = code.partition("-")
    if country in UNKNOWN_COUNTRY_CODES:
        return ""
    country = COUNTRY_ALIASES.get(country, country)
    return f"{country}-{subdivision}" if subdivision else country


def region_kind(jurisdiction: str, settings: ConsentSettings) -> RegionKind:
    """"opt_in" when the jurisdiction, or the country of a subdivision ("US-CA" → "US"), is one of
    ``settings.opt_in_regions``; "unknown" when it is empty or not a usable code; "opt_out" otherwise."""
    code = normalize_jurisdiction(jurisdiction)
    if not code:
        return "unknown"
    country = code.partition("-")[0]
    if code in settings.opt_in_regions or country in settings.opt_in_regions:
        return "opt_in"
    return "opt_out"


def resolve(decisions: Iterable[Decision], jurisdiction: str, settings: ConsentSettings) -> tuple[Verdict, ...]:
    """One verdict per configured purpose, in configuration order. Decisions for purposes that are not configured
    are ignored (except ``sale_or_sharing`` decisions, which carry the opt-out signal)."""
    by_purpose: dict[str, list[Decision]] = {}
    for decision in decisions:
        by_purpose.setdefault(decision.purpose, []).append(decision)
    kind = region_kind(jurisdiction, settings)
    signal = _current_opt_out(by_purpose.get(SALE_OR_SHARING, []))
    verdicts = []
    for purpose in settings.purposes:
        recorded = by_purpose.get(purpose, [])
        if recorded:
            verdicts.append(_explicit(purpose, recorded))
        else:
            verdicts.append(_default(purpose, kind, jurisdiction, signal, settings))
    return tuple(verdicts)


def _winner(decisions: Sequence[Decision]) -> Decision:
    """The latest decision; at equal times a denial; then the lowest decision_id."""
    return min(decisions, key=lambda d: (-d.occurred_us, d.granted, d.decision_id))


def _current_opt_out(sale_decisions: Sequence[Decision]) -> Decision | None:
    if not sale_decisions:
        return None
    winner = _winner(sale_decisions)
    return winner if winner.opt_out and not winner.granted else None


def _explicit(purpose: str, recorded: list[Decision]) -> Verdict:
    winner = _winner(recorded)
    text = f"{_state(winner.granted)} by {_describe(winner)}"
    if any(d.occurred_us == winner.occurred_us and d.granted != winner.granted for d in recorded):
        text += "; granted and denied at the same time; deny wins"
    else:
        opposite = [d for d in recorded if d.granted != winner.granted]
        if opposite:
            latest = _winner(opposite)
            noun = "grant" if latest.granted else "denial"
            text += (f"; it is later than the {noun} at {format_time(latest.occurred_us)} "
                     f"via {_identifier(latest.identifier)}")
        elif len(recorded) > 1:
            others = len(recorded) - 1
            text += f"; {others} earlier decision{'s' if others > 1 else ''} also {_state(winner.granted)} it"
    return Verdict(purpose, winner.granted, EXPLICIT, winner, text, len(recorded))


def _default(purpose: str, kind: RegionKind, jurisdiction: str, signal: Decision | None,
             settings: ConsentSettings) -> Verdict:
    code = normalize_jurisdiction(jurisdiction)
    if kind == "opt_in":
        return Verdict(purpose, False, JURISDICTION_DEFAULT, None,
                       f"no decision; {code} is an opt-in region, so denied by default", 0)
    if kind == "opt_out":
        context, resolution, granted = f"no decision; {code} is an opt-out region", JURISDICTION_DEFAULT, True
    else:
        given = jurisdiction.strip() if isinstance(jurisdiction, str) else ""
        if not given:
            context = "no decision and the jurisdiction is unknown"
        elif REGION_RE.fullmatch(given.upper()):  # a placeholder such as "XX"
            context = f'no decision and the jurisdiction is unknown ("{given}")'
        else:
            context = f'no decision and the jurisdiction "{given}" is not a recognised region code'
        resolution, granted = POLICY_DEFAULT, settings.unknown_jurisdiction == "grant"
    if granted and signal is not None and purpose in settings.opt_out_signal_denies:
        how = "a Global Privacy Control signal" if signal.origin == GPC else "an opt-out signal"
        explanation = (f"{context}, but the person opted out of sale/sharing with {how} "
                       f"({_describe(signal)}), so denied")
        return Verdict(purpose, False, GPC if signal.origin == GPC else OPT_OUT_SIGNAL, signal, explanation, 0)
    if resolution == POLICY_DEFAULT:
        return Verdict(purpose, granted, resolution, None, f"{context}, so {_state(granted)} by the policy default", 0)
    return Verdict(purpose, True, resolution, None, f"{context}, so granted by default", 0)


def destination_consent(verdicts: Sequence[Verdict], required: Sequence[str], *, advertising: bool,
                        limited_data_use_available: bool) -> DestinationVerdict:
    """Whether a destination needing ``required`` purposes may receive the person's data.

    Allowed when every required purpose is granted and, for advertising destinations, the person has not opted
    out of sale/sharing (a ``sale_or_sharing`` denial resolved EXPLICIT, GPC or OPT_OUT_SIGNAL; an opt-in region's
    default denial of sale/sharing is not an opt-out, sale/sharing being a US-law concept). When that opt-out is
    the only obstacle and the destination supports limited data use (Meta LDU, TikTok ``limited_data_use``), the
    data may be sent in that mode. Required purposes that are not configured are ignored, with a note.
    """
    by_purpose = {v.purpose: v for v in verdicts}
    wanted = tuple(dict.fromkeys(required))
    unknown = [p for p in wanted if p not in by_purpose]
    known = [p for p in wanted if p in by_purpose]
    denied = tuple(p for p in known if not by_purpose[p].granted)
    sale = by_purpose.get(SALE_OR_SHARING)
    opted_out = (advertising and sale is not None and not sale.granted
                 and sale.resolved_by in OPT_OUT_RESOLUTIONS)
    # A required sale_or_sharing denied by that opt-out is the opt-out obstacle itself, not a separate one.
    blocking = [p for p in denied if not (opted_out and p == SALE_OR_SHARING)]

    if blocking:
        allowed, ldu = False, False
        text = "not allowed: " + "; ".join(f"{p} is denied ({by_purpose[p].explanation})" for p in blocking)
    elif sale is not None and opted_out:
        reason = f"the person opted out of sale/sharing ({sale.explanation})"
        allowed = ldu = limited_data_use_available
        if ldu:
            text = f"allowed in limited-data-use mode: {reason}"
        else:
            text = f"not allowed: {reason}, and the destination has no limited-data-use mode"
    else:
        allowed, ldu = True, False
        text = (f"allowed: every required purpose is granted ({', '.join(known)})" if known
                else "allowed: the destination requires no configured consent purpose")
    if unknown:
        text += f"; ignored purposes that are not configured: {', '.join(unknown)}"
    return DestinationVerdict(allowed, wanted, denied, ldu, text)


# --- formatting ------------------------------------------------------------------------------------------------


def format_time(occurred_us: int) -> str:
    """RFC 3339 UTC, with a fraction only when there is one: "2024-05-01T10:00:00Z"."""
    moment = _EPOCH + timedelta(microseconds=occurred_us)
    if moment.microsecond == 0:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if moment.microsecond % 1000 == 0:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _state(granted: bool) -> str:
    return "granted" if granted else "denied"


def _describe(decision: Decision) -> str:
    """'cmp:onetrust (SEGMENT) at 2024-05-01T10:00:00Z via anonymous_id:abc'."""
    source = decision.source.strip()
    if not source or source.lower() == decision.origin.lower():
        who = decision.origin or "unknown source"
    else:
        who = f"{source} ({decision.origin})" if decision.origin else source
    return f"{who} at {format_time(decision.occurred_us)} via {_identifier(decision.identifier)}"


def _identifier(label: str) -> str:
    """The identifier label, with long values (hashes) shortened: 'email_sha256:3f2a9c0b1d4e…'."""
    if not label:
        return "an unknown identifier"
    kind, sep, value = label.partition(":")
    if sep and len(value) > _MAX_SHOWN_VALUE:
        return f"{kind}:{value[:12]}…"
    return label
