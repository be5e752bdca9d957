"""Consent configuration: the purposes, how CMP categories and TCF purposes map onto them, and the
jurisdiction defaults (DESIGN §6, sources-and-consent spec §4.3, §4.4, §5).

:class:`ConsentSettings` is loaded from the ``[consent]`` table of the configuration file. Every field has a
default, so an empty table is a valid configuration. Sequences and tables read from TOML (lists, dicts, sets)
are normalised to tuples, frozensets and read-only mappings on construction; :meth:`ConsentSettings.validate`
checks the result and reports every problem at once.

Default category maps
---------------------
Category IDs are case-sensitive and CMP-specific, so operators are expected to replace the maps with the IDs
their CMP sends. The defaults are deliberately small because of how the maps are evaluated:

* **Segment** (:attr:`ConsentSettings.segment_categories`): a purpose is granted only when *every* category
  mapped to it is present and true, and a mapped category missing from a present ``categoryPreferences``
  counts as false (Segment's own rule, spec §4.4). Mapping two alternative category names to the same purpose
  (say "Advertising" and "Marketing") would therefore deny that purpose whenever a CMP sends only one of them.
  The defaults use the two category IDs from Segment's consent documentation and examples:
  ``Advertising`` → ``ad_user_data``, ``ad_personalization``, ``ad_storage`` and ``Analytics`` →
  ``analytics``. ``sale_or_sharing`` has no default Segment category: there is no common name for it (Segment's
  example uses ``DataSharing``), and a default that the CMP does not send would record an explicit denial of
  sale/sharing for every event.
* **RudderStack** (:attr:`ConsentSettings.rudderstack_categories`): OneTrust's default cookie-category IDs,
  the most common RudderStack setup: ``C0002`` (performance cookies) → ``analytics`` and ``C0004`` (targeting
  cookies) → ``ad_user_data``, ``ad_personalization``, ``ad_storage``. ``C0001`` (strictly necessary),
  ``C0003`` (functional) and ``C0005`` (social media) gate none of the default purposes.
* **TCF** (:attr:`ConsentSettings.tcf_purposes`): Google's TCF → Consent Mode mapping (spec §5.1):
  ``ad_storage`` needs TCF purpose 1, ``ad_user_data`` 1 and 7, ``ad_personalization`` 1, 3 and 4; ``analytics``
  needs 1 and 8 (measure content performance). ``sale_or_sharing`` is a US-law concept with no TCF purpose.

The default maps (and ``opt_out_signal_denies``) follow :attr:`ConsentSettings.purposes`: when a configuration
changes only the purposes, default entries for purposes it does not configure are dropped. Maps that are given
explicitly must name configured purposes only.

Regions
-------
:attr:`ConsentSettings.opt_in_regions` lists the jurisdictions where an unknown purpose is denied: by default
the EEA (the 27 EU member states plus Iceland, Liechtenstein and Norway), the United Kingdom and Switzerland,
plus ``EU`` (ISO 3166's exceptional reservation for the European Union, which some geolocation databases
return). Entries are ISO 3166-1 alpha-2 codes or ISO 3166-2 subdivision codes ("US-CA"); a subdivision
jurisdiction also matches its country's entry. Every other well-formed jurisdiction is an opt-out region.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: The purposes known out of the box, in their default order (DESIGN §6).
DEFAULT_PURPOSES: tuple[str, ...] = ("analytics", "ad_user_data", "ad_personalization", "ad_storage", "sale_or_sharing")

#: The purpose that US "opt-out" signals (GPC, the US Privacy string) act on.
SALE_OR_SHARING = "sale_or_sharing"

_AD_PURPOSES: tuple[str, ...] = ("ad_user_data", "ad_personalization", "ad_storage")

DEFAULT_SEGMENT_CATEGORIES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "Advertising": _AD_PURPOSES,
    "Analytics": ("analytics",),
})

DEFAULT_RUDDERSTACK_CATEGORIES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "C0002": ("analytics",),  # OneTrust "Performance Cookies"
    "C0004": _AD_PURPOSES,  # OneTrust "Targeting Cookies"
})

DEFAULT_TCF_PURPOSES: Mapping[str, tuple[int, ...]] = MappingProxyType({
    "ad_storage": (1,),
    "ad_user_data": (1, 7),
    "ad_personalization": (1, 3, 4),
    "analytics": (1, 8),
})

DEFAULT_OPT_OUT_SIGNAL_DENIES: tuple[str, ...] = (SALE_OR_SHARING, "ad_personalization")

_PURPOSE_DEFAULTS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "segment_categories": DEFAULT_SEGMENT_CATEGORIES,
    "rudderstack_categories": DEFAULT_RUDDERSTACK_CATEGORIES,
}

#: The 27 EU member states (ISO 3166-1 alpha-2; Greece is "GR", not the EU's "EL").
EU_MEMBER_STATES: frozenset[str] = frozenset({
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IT", "LT", "LU",
    "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
})

DEFAULT_OPT_IN_REGIONS: frozenset[str] = EU_MEMBER_STATES | {"IS", "LI", "NO", "GB", "CH", "EU"}

#: TCF 2.2 defines purposes 1-11.
TCF_PURPOSE_IDS = range(1, 12)

_PURPOSE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: ISO 3166-1 alpha-2, optionally followed by an ISO 3166-2 subdivision suffix ("US-CA", "GB-ENG", "FR-75C").
REGION_RE = re.compile(r"[A-Z]{2}(?:-[A-Z0-9]{1,3})?")


@dataclass(frozen=True)
class ConsentSettings:
    """The ``[consent]`` configuration. See the module docstring for the reasoning behind the defaults."""

    #: Purposes, lower_snake_case, in the order verdicts are reported.
    purposes: tuple[str, ...] = DEFAULT_PURPOSES
    #: Segment ``categoryPreferences`` category ID → the purposes it gates.
    segment_categories: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: DEFAULT_SEGMENT_CATEGORIES)
    #: RudderStack ``consentManagement`` category ID → the purposes it gates.
    rudderstack_categories: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: DEFAULT_RUDDERSTACK_CATEGORIES
    )
    #: Purpose → the TCF purposes (1-11) that must all be allowed for a TC string to grant it.
    tcf_purposes: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: DEFAULT_TCF_PURPOSES)
    #: The GVL vendor ID to check in TC strings (for example 755 for Google). When set, the vendor's consent
    #: (or legitimate-interest) bit is required too and publisher restrictions for the vendor apply.
    tcf_vendor_id: int | None = None
    #: Jurisdictions where a purpose without decisions is denied (see the module docstring).
    opt_in_regions: frozenset[str] = DEFAULT_OPT_IN_REGIONS
    #: "deny" or "grant": the default when the person's jurisdiction is unknown.
    unknown_jurisdiction: str = "deny"
    #: In opt-out regions, purposes without decisions that a current opt-out signal (a sale/sharing denial from
    #: GPC or the US Privacy string) denies.
    opt_out_signal_denies: tuple[str, ...] = DEFAULT_OPT_OUT_SIGNAL_DENIES

    def __post_init__(self) -> None:
        # Normalise what a TOML loader produces (lists, dicts, sets); leave anything else for validate().
        object.__setattr__(self, "purposes", _as_tuple(self.purposes))
        # Defaults left in place follow the configured purposes, so that changing only ``purposes`` works;
        # maps given explicitly are validated strictly.
        purposes = self.purposes if isinstance(self.purposes, tuple) else ()
        for name, default in _PURPOSE_DEFAULTS.items():
            value = getattr(self, name)
            if value is default and isinstance(value, Mapping):
                trimmed = {key: tuple(p for p in item if p in purposes) for key, item in value.items()}
                object.__setattr__(self, name, {key: item for key, item in trimmed.items() if item})
        if self.tcf_purposes is DEFAULT_TCF_PURPOSES:
            tcf = {purpose: ids for purpose, ids in DEFAULT_TCF_PURPOSES.items() if purpose in purposes}
            object.__setattr__(self, "tcf_purposes", tcf)
        if self.opt_out_signal_denies is DEFAULT_OPT_OUT_SIGNAL_DENIES:
            denies = tuple(purpose for purpose in DEFAULT_OPT_OUT_SIGNAL_DENIES if purpose in purposes)
            object.__setattr__(self, "opt_out_signal_denies", denies)
        object.__setattr__(self, "segment_categories", _as_mapping(self.segment_categories))
        object.__setattr__(self, "rudderstack_categories", _as_mapping(self.rudderstack_categories))
        object.__setattr__(self, "tcf_purposes", _as_mapping(self.tcf_purposes))
        object.__setattr__(self, "opt_out_signal_denies", _as_tuple(self.opt_out_signal_denies))
        if isinstance(self.opt_in_regions, list | tuple | set):
            object.__setattr__(self, "opt_in_regions", frozenset(self.opt_in_regions))

    def validate(self) -> None:
        """Check the settings; raise ``ValueError`` listing every problem found."""
        problems: list[str] = []
        purposes = self._check_purposes(problems)
        for name in ("segment_categories", "rudderstack_categories"):
            self._check_category_map(name, purposes, problems)
        self._check_tcf(purposes, problems)
        self._check_regions(problems)
        if self.unknown_jurisdiction not in ("deny", "grant"):
            problems.append(
                f'consent.unknown_jurisdiction must be "deny" or "grant", not {self.unknown_jurisdiction!r}'
            )
        if not isinstance(self.opt_out_signal_denies, tuple):
            problems.append("consent.opt_out_signal_denies must be a list of purposes")
        else:
            for purpose in self.opt_out_signal_denies:
                if purpose not in purposes:
                    problems.append(f"consent.opt_out_signal_denies: unknown purpose {purpose!r}{_known(purposes)}")
        if problems:
            raise ValueError("invalid consent settings: " + "; ".join(problems))

    def _check_purposes(self, problems: list[str]) -> tuple[str, ...]:
        if not isinstance(self.purposes, tuple) or not self.purposes:
            problems.append("consent.purposes must be a non-empty list of purpose names")
            return ()
        seen: set[str] = set()
        for purpose in self.purposes:
            if not isinstance(purpose, str) or not _PURPOSE_RE.fullmatch(purpose):
                problems.append(
                    f"consent.purposes: {purpose!r} is not a valid purpose name "
                    "(lower_snake_case, starting with a letter, at most 64 characters)"
                )
            elif purpose in seen:
                problems.append(f"consent.purposes: {purpose!r} is listed twice")
            seen.add(str(purpose))
        return tuple(p for p in self.purposes if isinstance(p, str))

    def _check_category_map(self, name: str, purposes: tuple[str, ...], problems: list[str]) -> None:
        mapping = getattr(self, name)
        if not isinstance(mapping, Mapping):
            problems.append(f"consent.{name} must be a table of category ID → list of purposes")
            return
        for category, mapped in mapping.items():
            if not isinstance(category, str) or not category:
                problems.append(f"consent.{name}: category IDs must be non-empty strings, not {category!r}")
                continue
            if not isinstance(mapped, tuple) or not mapped:
                problems.append(f"consent.{name}[{category!r}] must be a non-empty list of purposes")
                continue
            for purpose in mapped:
                if purpose not in purposes:
                    problems.append(f"consent.{name}[{category!r}]: unknown purpose {purpose!r}{_known(purposes)}")

    def _check_tcf(self, purposes: tuple[str, ...], problems: list[str]) -> None:
        if not isinstance(self.tcf_purposes, Mapping):
            problems.append("consent.tcf_purposes must be a table of purpose → list of TCF purpose IDs")
        else:
            for purpose, tcf_ids in self.tcf_purposes.items():
                if purpose not in purposes:
                    problems.append(f"consent.tcf_purposes: unknown purpose {purpose!r}{_known(purposes)}")
                if not isinstance(tcf_ids, tuple) or not tcf_ids:
                    problems.append(f"consent.tcf_purposes[{purpose!r}] must be a non-empty list of TCF purpose IDs")
                    continue
                for tcf_id in tcf_ids:
                    if isinstance(tcf_id, bool) or not isinstance(tcf_id, int) or tcf_id not in TCF_PURPOSE_IDS:
                        problems.append(
                            f"consent.tcf_purposes[{purpose!r}]: {tcf_id!r} is not a TCF purpose ID (1-11)"
                        )
        vendor = self.tcf_vendor_id
        if vendor is not None and (isinstance(vendor, bool) or not isinstance(vendor, int) or not 1 <= vendor <= 65535):
            problems.append(f"consent.tcf_vendor_id must be a GVL vendor ID (1-65535), not {vendor!r}")

    def _check_regions(self, problems: list[str]) -> None:
        if not isinstance(self.opt_in_regions, frozenset):
            problems.append("consent.opt_in_regions must be a list of region codes")
            return
        for region in sorted(self.opt_in_regions, key=str):
            if not isinstance(region, str) or not REGION_RE.fullmatch(region):
                problems.append(
                    f"consent.opt_in_regions: {region!r} is not an upper-case ISO 3166-1 alpha-2 country code "
                    'or ISO 3166-2 subdivision code (for example "DE" or "US-CA")'
                )


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _as_mapping(value: Any) -> Any:
    if not isinstance(value, Mapping):
        return value
    return MappingProxyType({key: _as_tuple(item) for key, item in value.items()})


def _known(purposes: tuple[str, ...]) -> str:
    return f" (configured purposes: {', '.join(purposes)})" if purposes else ""
