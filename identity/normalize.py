"""Normalising and hashing identifiers at the edge.

Raw emails and phone numbers are normalised, hashed and forgotten here (DESIGN §1.4, §4):

* ``email`` → ``email_sha256`` = SHA-256 of the trimmed, lower-cased address (Meta, TikTok
  and LinkedIn use exactly this). Google's Data Manager rules differ for gmail.com /
  googlemail.com, so that hash is kept as the match key ``google_email_sha256`` when it differs.
* ``phone`` → ``phone_sha256`` = SHA-256 of E.164 *with* ``+`` (Google, TikTok). Meta wants the
  digits without ``+``, kept as the match key ``meta_phone_sha256``.

One function per rule and platform, nothing duplicated (destinations.md §0 warns against one
shared "hash_phone"). Error messages never contain a raw email or phone number.

Junk values (``"null"``, ``"undefined"``...) are the business of :mod:`identity.blocklist`,
which callers apply to the raw trimmed value *before* calling :meth:`Normalizer.normalize`.
"""

from __future__ import annotations

import hashlib
import unicodedata

import phonenumbers

from identity.identifiers import (
    GOOGLE_EMAIL_SHA256,
    HASHED_VALUE_RE,
    MAX_VALUE_LENGTH,
    META_PHONE_SHA256,
    RAW_INPUT_TYPES,
    TYPE_NAME_RE,
    Identifier,
    IdentifierType,
    IdentifierTypes,
    MatchKey,
    NormalizedIdentifier,
)
from stitchgraph.errors import InvalidArgument

__all__ = [
    "MAX_EMAIL_LENGTH",
    "Normalizer",
    "google_email",
    "meta_phone",
    "normalize_email",
    "normalize_phone",
    "sha256_hex",
]

#: Longest email address accepted (RFC 5321 path limit); longer input is not an address.
MAX_EMAIL_LENGTH = 254

# Data Manager applies its dot / "+tag" rules to these domains only (destinations.md §2.4).
_GOOGLE_CONSUMER_DOMAINS = frozenset({"gmail.com", "googlemail.com"})

# Error reasons clients can switch on (ErrorInfo.reason).
_REASON_EMAIL = "INVALID_EMAIL"
_REASON_PHONE = "INVALID_PHONE"
_REASON_HASH = "INVALID_HASHED_VALUE"
_REASON_TYPE = "UNKNOWN_IDENTIFIER_TYPE"
_REASON_VALUE = "INVALID_IDENTIFIER_VALUE"

_PARSE_ERRORS: dict[int, str] = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "the phone number has no valid country code",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "the phone number is not a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "the phone number is too short",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "the phone number is too short",
    phonenumbers.NumberParseException.TOO_LONG: "the phone number is too long",
}


def sha256_hex(text: str) -> str:
    """Return the lower-case hex SHA-256 digest of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_bad_char(char: str) -> bool:
    # Cc: control characters (NUL, newline, DEL...); Cs: lone surrogates, which cannot be
    # encoded as UTF-8 and so could be neither hashed nor stored.
    return unicodedata.category(char) in ("Cc", "Cs")


def normalize_email(raw: str, *, field: str = "value") -> str:
    """Return ``raw`` trimmed and lower-cased, the canonical email form.

    Raises :class:`InvalidArgument` on ``field`` unless the result looks like
    ``local@domain.tld``: exactly one ``@``, a non-empty local part, a domain of non-empty
    dot-separated labels with at least one dot, no whitespace or control characters, at most
    254 characters. The message never contains the address.
    """
    email = raw.strip().lower()
    if not email:
        raise InvalidArgument.for_field(field, "the email is empty", reason=_REASON_EMAIL)
    if len(email) > MAX_EMAIL_LENGTH:
        raise InvalidArgument.for_field(
            field, f"the email is longer than {MAX_EMAIL_LENGTH} characters", reason=_REASON_EMAIL
        )
    if any(c.isspace() or _is_bad_char(c) for c in email):
        raise InvalidArgument.for_field(
            field, "the email contains whitespace or control characters", reason=_REASON_EMAIL
        )
    local, at, domain = email.partition("@")
    labels = domain.split(".")
    if not at or not local or "@" in domain or len(labels) < 2 or not all(labels):
        raise InvalidArgument.for_field(
            field,
            "the email is not a valid address (it needs one '@', a local part and a domain with a dot)",
            reason=_REASON_EMAIL,
        )
    return email


def google_email(normalized: str) -> str:
    """Return the address as Google's Data Manager API hashes it.

    ``normalized`` must come from :func:`normalize_email`. For ``gmail.com`` and
    ``googlemail.com`` every ``.`` and any ``+tag`` are removed from the local part; other
    domains are returned unchanged. (The google-ads-python examples strip ``.`` and ``+`` for
    every domain; that is not the documented rule.) Raises ``ValueError`` if there is no ``@``.
    """
    local, at, domain = normalized.rpartition("@")
    if not at:
        raise ValueError("google_email expects a normalised email address")
    if domain not in _GOOGLE_CONSUMER_DOMAINS:
        return normalized
    stripped = local.split("+", 1)[0].replace(".", "")
    if not stripped:
        # "+tag@gmail.com" or ".@gmail.com" is no Google mailbox. Hashing "@gmail.com" would give
        # every such address one shared key, so keep the canonical form instead.
        return normalized
    return f"{stripped}@{domain}"


def normalize_phone(raw: str, default_region: str | None, *, field: str = "value") -> str:
    """Return ``raw`` as an E.164 number with a leading ``+`` (``+16505551212``).

    A number without a leading ``+`` (or ``00`` international prefix) is read as a national
    number of ``default_region`` (ISO 3166-1 alpha-2, e.g. ``"US"``). Raises
    :class:`InvalidArgument` on ``field`` when the input cannot be parsed, has no country code
    and no default region is given, is not a possible or valid number, or carries an
    extension. The message never contains the number.
    """
    text = raw.strip()
    if not text:
        raise InvalidArgument.for_field(field, "the phone number is empty", reason=_REASON_PHONE)
    if text.startswith("00"):
        # "00" is the international prefix in most of the world but not in the default region's
        # (e.g. the US uses 011), so phonenumbers would read it as part of a national number.
        text = "+" + text[2:]
    if not text.startswith("+") and default_region is None:
        raise InvalidArgument.for_field(
            field,
            "the phone number has no country code (start it with +) and no default region is configured",
            reason=_REASON_PHONE,
        )
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        description = _PARSE_ERRORS.get(exc.error_type, "the phone number could not be parsed")
        # "from None": the parse error is fully described above; no chained context in logs.
        raise InvalidArgument.for_field(field, description, reason=_REASON_PHONE) from None
    if number.extension:
        # E.164 has no extensions; hashing the switchboard number would give everyone behind it
        # one shared identifier.
        raise InvalidArgument.for_field(
            field, "the phone number has an extension; send the direct number", reason=_REASON_PHONE
        )
    if not phonenumbers.is_possible_number(number):
        raise InvalidArgument.for_field(
            field, "the phone number has an impossible length for its country", reason=_REASON_PHONE
        )
    if not phonenumbers.is_valid_number(number):
        raise InvalidArgument.for_field(
            field, "the phone number is not a valid number for its country", reason=_REASON_PHONE
        )
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def meta_phone(e164: str) -> str:
    """Return an E.164 number as Meta hashes it: country code and digits, no ``+``.

    ``e164`` must come from :func:`normalize_phone`; raises ``ValueError`` otherwise.
    """
    if not e164.startswith("+") or not e164[1:].isdigit() or not e164[1:].isascii():
        raise ValueError("meta_phone expects an E.164 number such as +16505551212")
    return e164[1:]


class Normalizer:
    """Turns client ``(type, value)`` pairs into stored identifiers plus platform match keys."""

    __slots__ = ("_default_region", "_types")

    def __init__(self, types: IdentifierTypes, default_region: str | None = "US") -> None:
        """Use ``types`` as the registry and ``default_region`` for phones without ``+``.

        Raises :class:`InvalidArgument` (field ``default_region``) when the region is not a
        region phonenumbers knows.
        """
        if default_region is not None:
            default_region = default_region.upper()
            if default_region not in phonenumbers.SUPPORTED_REGIONS:
                raise InvalidArgument.for_field(
                    "default_region", "must be an ISO 3166-1 alpha-2 region code such as 'US'"
                )
        self._types = types
        self._default_region = default_region

    @property
    def types(self) -> IdentifierTypes:
        """Return the registry this normaliser validates types against."""
        return self._types

    @property
    def default_region(self) -> str | None:
        """Return the region (upper case) used for phone numbers without a country code."""
        return self._default_region

    def normalize(
        self, type_: str, value: str, *, field: str = "value", type_field: str = "type"
    ) -> NormalizedIdentifier:
        """Return the stored identifier and the differing platform match keys for one input.

        * ``email`` / ``phone``: a raw value is normalised and hashed into ``email_sha256`` /
          ``phone_sha256`` with match keys; a 64-hex value is taken as already hashed.
        * hashed types: the value must be 64 hex characters; it is lower-cased.
        * other types: the value is trimmed, case kept.

        Raises :class:`InvalidArgument` on ``type_field`` when the type is empty or unknown,
        and on ``field`` when the value is invalid for its type. Apply the blocklist to the
        raw trimmed value first: a junk value such as ``"undefined"`` is not an error there.
        """
        if not type_:
            raise InvalidArgument.for_field(
                type_field, "the identifier type is required", reason=_REASON_TYPE
            )
        stored_type = RAW_INPUT_TYPES.get(type_)
        if stored_type is not None:
            trimmed = value.strip()
            if HASHED_VALUE_RE.fullmatch(trimmed):
                return NormalizedIdentifier(Identifier(stored_type, trimmed.lower()))
            if type_ == "email":
                return self._email(value, field)
            return self._phone(value, field)
        identifier_type = self._types.get(type_)
        if identifier_type is None:
            raise self._unknown_type(type_, type_field)
        if identifier_type.hashed:
            return NormalizedIdentifier(Identifier(type_, self._hashed(identifier_type, value, field)))
        return NormalizedIdentifier(Identifier(type_, self._plain(type_, value, field)))

    def _email(self, value: str, field: str) -> NormalizedIdentifier:
        email = normalize_email(value, field=field)
        canonical = sha256_hex(email)
        google = google_email(email)
        keys: tuple[MatchKey, ...] = ()
        if google != email:
            keys = (MatchKey(RAW_INPUT_TYPES["email"], GOOGLE_EMAIL_SHA256, sha256_hex(google)),)
        return NormalizedIdentifier(Identifier(RAW_INPUT_TYPES["email"], canonical), keys)

    def _phone(self, value: str, field: str) -> NormalizedIdentifier:
        e164 = normalize_phone(value, self._default_region, field=field)
        stored = RAW_INPUT_TYPES["phone"]
        # Meta's form drops the "+", so its hash always differs from the canonical one.
        keys = (MatchKey(stored, META_PHONE_SHA256, sha256_hex(meta_phone(e164))),)
        return NormalizedIdentifier(Identifier(stored, sha256_hex(e164)), keys)

    @staticmethod
    def _hashed(identifier_type: IdentifierType, value: str, field: str) -> str:
        trimmed = value.strip()
        if HASHED_VALUE_RE.fullmatch(trimmed):
            return trimmed.lower()
        raw_inputs = [raw for raw, stored in RAW_INPUT_TYPES.items() if stored == identifier_type.name]
        hint = (
            f"; send a raw value as type '{raw_inputs[0]}' and it is hashed for you"
            if raw_inputs
            else "; hash the value before sending it"
        )
        # Never quote the value: a raw email sent as email_sha256 is exactly the likely mistake.
        raise InvalidArgument.for_field(
            field,
            f"{identifier_type.name} must be a SHA-256 hex digest (64 hex characters){hint}",
            reason=_REASON_HASH,
        )

    @staticmethod
    def _plain(type_: str, value: str, field: str) -> str:
        trimmed = value.strip()
        if not trimmed:
            raise InvalidArgument.for_field(field, f"the {type_} is empty", reason=_REASON_VALUE)
        if len(trimmed) > MAX_VALUE_LENGTH:
            raise InvalidArgument.for_field(
                field,
                f"the {type_} is {len(trimmed)} characters long; at most {MAX_VALUE_LENGTH} are allowed",
                reason=_REASON_VALUE,
            )
        if trimmed.isprintable():  # C-speed common case; the loop below finds the culprit
            return trimmed
        for position, char in enumerate(trimmed):
            if _is_bad_char(char):
                raise InvalidArgument.for_field(
                    field,
                    f"the {type_} contains a control character (U+{ord(char):04X}) at position {position}",
                    reason=_REASON_VALUE,
                )
        return trimmed

    def _unknown_type(self, type_: str, type_field: str) -> InvalidArgument:
        known = ", ".join([*RAW_INPUT_TYPES, *sorted(self._types.names)])
        # Quote the name only when it looks like one: a client that swapped type and value
        # would otherwise put a raw email into the error.
        what = (
            f"'{type_}' is not a known identifier type"
            if TYPE_NAME_RE.fullmatch(type_)
            else ("the identifier type is not a known type name")
        )
        return InvalidArgument.for_field(type_field, f"{what}; known types: {known}", reason=_REASON_TYPE)
