"""Destinations as configuration: the catalogue of destination kinds, the ``destinations``
table, validation and the store functions the servicer and the audience engine share.

A destination is one account, pixel or list of one platform (``DestinationKind`` in
``protos/stitchgraph/v1/destinations.proto``). It holds a *reference* to its credentials
(``env:NAME`` or ``file:/path``), never the secret itself; settings that look like secrets
are refused. What a kind needs is declared once, in :data:`KINDS`:

* the consent purposes a person must have granted when the destination names none
  (``specs/sources-and-consent.md`` §5.7: conversions ``ad_user_data``; ad audiences
  ``ad_user_data`` and ``ad_personalization``; trait write-back ``analytics``);
* the stored identifier types the platform matches people on (``specs/destinations.md``);
* the settings key that turns on Limited Data Use, the batch limit per request, and the
  settings without which nothing can be sent.

Nothing here does HTTP; the delivery engine reads :data:`KINDS` and the rows.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, String, Text, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from identity.events.registry import CANONICAL_EVENTS
from identity.models import PK
from stitchgraph.db import Base
from stitchgraph.errors import Aborted, AlreadyExists, FieldViolation, InvalidArgument, NotFound

__all__ = [
    "ACTIVE",
    "DEFAULT_PURPOSES",
    "KINDS",
    "MAX_DESCRIPTION_LENGTH",
    "MAX_DISPLAY_NAME_LENGTH",
    "MAX_PAUSE_REASON_LENGTH",
    "MAX_SETTINGS_BYTES",
    "PAUSED",
    "STATES",
    "DestinationConfig",
    "DestinationRow",
    "KindSpec",
    "check_etag",
    "config_of",
    "create_destination",
    "delete_destination",
    "effective_purposes",
    "get_destination",
    "is_credentials_ref",
    "limited_data_use_enabled",
    "list_destinations",
    "new_destination_id",
    "require_valid",
    "secret_looking_key",
    "set_destination_state",
    "update_destination",
    "validate_destination",
    "validate_destination_id",
]

ACTIVE = "ACTIVE"
PAUSED = "PAUSED"
STATES = (ACTIVE, PAUSED)

#: Consent purposes a deployment knows unless configured otherwise (DESIGN §6).
DEFAULT_PURPOSES = ("analytics", "ad_user_data", "ad_personalization", "ad_storage", "sale_or_sharing")

MAX_DISPLAY_NAME_LENGTH = 256
MAX_DESCRIPTION_LENGTH = 4096
MAX_CREDENTIALS_REF_LENGTH = 1024
MAX_PAUSE_REASON_LENGTH = 1024
#: Largest settings object, as compact JSON.
MAX_SETTINGS_BYTES = 64 * 1024

_ID_RE = re.compile(r"[a-z][a-z0-9-]{0,62}")
#: ``env:NAME``: a portable environment variable name (upper case, digits, underscore). Upper
#: case only on purpose: tokens are mixed case, so a token pasted after ``env:`` is refused.
_ENV_REF_RE = re.compile(r"env:[A-Z_][A-Z0-9_]{0,127}")
#: ``file:/absolute/path`` without whitespace or control characters.
_FILE_REF_RE = re.compile(r"file:/[^\s\x00-\x1f\x7f]{0,1017}")
#: Settings keys that name a secret, compared without case, ``_``, ``-``, ``.`` or spaces.
_SECRET_MARKERS = ("token", "secret", "password", "passwd", "apikey", "accesskey", "privatekey", "credential",
                   "authorization", "bearer")
_KEY_NOISE_RE = re.compile(r"[\s_.\-]")


# -- the kind catalogue ------------------------------------------------------------------------

@dataclass(frozen=True)
class KindSpec:
    """What one destination kind is and needs.

    ``kind`` is the ``DestinationKind`` name without its prefix. ``advertising`` kinds send
    personal data to an ad platform; ``audience`` kinds hold audience membership,
    ``conversions`` kinds send canonical events, ``traits`` kinds write person traits back to
    an analytics tool. ``match_key_types`` are the stored identifier types the platform can
    match a person on, strongest first (a person without any of them cannot be sent).
    ``limited_data_use_setting`` is the settings key (a boolean) that sends with Limited Data
    Use, or ``None`` where the platform offers none. ``batch_limit`` is the most records one
    request may carry. ``required_settings`` must be present and non-empty.
    ``credentials`` says what the credentials reference must resolve to.
    """

    kind: str
    advertising: bool
    audience: bool
    conversions: bool
    traits: bool
    default_purposes: tuple[str, ...]
    match_key_types: tuple[str, ...]
    limited_data_use_setting: str | None
    batch_limit: int
    required_settings: tuple[str, ...]
    credentials: str = ""


_CONVERSION_PURPOSES = ("ad_user_data",)
_AD_AUDIENCE_PURPOSES = ("ad_user_data", "ad_personalization")
_TRAIT_PURPOSES = ("analytics",)


def _conversions(kind: str, match: tuple[str, ...], ldu: str | None, limit: int, required: tuple[str, ...],
                 credentials: str) -> KindSpec:
    return KindSpec(kind, advertising=True, audience=False, conversions=True, traits=False,
                    default_purposes=_CONVERSION_PURPOSES, match_key_types=match, limited_data_use_setting=ldu,
                    batch_limit=limit, required_settings=required, credentials=credentials)


def _ad_audience(kind: str, match: tuple[str, ...], limit: int, required: tuple[str, ...],
                 credentials: str) -> KindSpec:
    return KindSpec(kind, advertising=True, audience=True, conversions=False, traits=False,
                    default_purposes=_AD_AUDIENCE_PURPOSES, match_key_types=match, limited_data_use_setting=None,
                    batch_limit=limit, required_settings=required, credentials=credentials)


def _traits(kind: str, match: tuple[str, ...], limit: int, required: tuple[str, ...], credentials: str) -> KindSpec:
    return KindSpec(kind, advertising=False, audience=False, conversions=False, traits=True,
                    default_purposes=_TRAIT_PURPOSES, match_key_types=match, limited_data_use_setting=None,
                    batch_limit=limit, required_settings=required, credentials=credentials)


#: Every destination kind by name (``specs/destinations.md``, ``specs/sources-and-consent.md``).
KINDS: Mapping[str, KindSpec] = MappingProxyType({spec.kind: spec for spec in (
    # CAPI user_data: em, ph (hashed) and external_id (the advertiser's user ID); fbp/fbc, IP and
    # user agent travel with the event, not as stored identifiers. LDU per event
    # (data_processing_options). 1,000 events per request.
    _conversions("META_CONVERSIONS", ("email_sha256", "phone_sha256", "user_id"), "limited_data_use", 1000,
                 ("pixel_id",), "a Conversions API access token"),
    # Customer list schema EMAIL_SHA256 / PHONE_SHA256 / EXTERN_ID; 10,000 rows per request. LDU
    # exists only for California customer lists, so it is not offered.
    _ad_audience("META_CUSTOM_AUDIENCE", ("email_sha256", "phone_sha256", "user_id"), 10_000, ("audience_id",),
                 "a Marketing API access token"),
    # uploadClickConversions takes only hashedEmail and hashedPhoneNumber as user identifiers
    # (gclid/gbraid/wbraid come with the event); 2,000 conversions per request.
    _conversions("GOOGLE_ADS_CONVERSIONS", ("email_sha256", "phone_sha256"), None, 2000,
                 ("customer_id", "conversion_actions"), "OAuth client, refresh token and developer token"),
    # audienceMembers:ingest matches on emailAddress and phoneNumber (addresses are not stored);
    # 10,000 members per request.
    _ad_audience("GOOGLE_DATA_MANAGER_AUDIENCE", ("email_sha256", "phone_sha256"), 10_000,
                 ("operating_account_id", "product_destination_id"), "OAuth credentials for the Data Manager API"),
    # Events API user: email, phone, external_id (all SHA-256); ttclid/ttp with the event.
    # limited_data_use per event; 1,000 events per request.
    _conversions("TIKTOK_EVENTS", ("email_sha256", "phone_sha256", "user_id"), "limited_data_use", 1000,
                 ("event_source_id",), "an Events API access token"),
    # Segment mapping id_schema EMAIL_SHA256 / PHONE_SHA256 (and mobile ad IDs, not stored). No
    # per-request limit is documented: 1,000 is a conservative choice.
    _ad_audience("TIKTOK_AUDIENCE", ("email_sha256", "phone_sha256"), 1000, ("advertiser_id", "audience_id"),
                 "a Marketing API access token"),
    # $set by distinct_id: a PostHog distinct ID, or our user/anonymous ID (the PostHog source
    # maps distinct IDs to those). /batch/ has no count limit; 1,000 keeps requests small.
    _traits("POSTHOG_TRAITS", ("posthog_distinct_id", "user_id", "anonymous_id"), 1000, ("host",),
            "the project API key (phc_...)"),
    # add_user_properties takes only `identity` (the Heap source maps identity to user_id); the
    # Heap-generated user_id is not accepted there. Bulk: 1,000 users per request.
    _traits("HEAP_TRAITS", ("user_id",), 1000, (), "the environment's app_id"),
)})


# -- the table ---------------------------------------------------------------------------------

class DestinationRow(Base):
    """One configured destination. ``purposes`` and ``events`` are stored as given (empty =
    the kind's default purposes / every event the adapter maps)."""

    __tablename__ = "destinations"

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    destination_id: Mapped[str] = mapped_column(String(63), unique=True)
    kind: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str] = mapped_column(String(MAX_DISPLAY_NAME_LENGTH))
    description: Mapped[str] = mapped_column(Text, default="")
    credentials_ref: Mapped[str] = mapped_column(String(MAX_CREDENTIALS_REF_LENGTH))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    purposes: Mapped[list[str]] = mapped_column(JSON)
    events: Mapped[list[str]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    # Why it was paused (for operators); "" while active.
    pause_reason: Mapped[str] = mapped_column(String(MAX_PAUSE_REASON_LENGTH), default="")
    etag: Mapped[str] = mapped_column(String(40))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Delivery bookkeeping (not configuration, so not part of the etag): nothing is sent before
    # send_after_us (a platform throttled us); the last successful and failed attempts.
    send_after_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_success_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_failure_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


@dataclass(frozen=True)
class DestinationConfig:
    """The mutable configuration of a destination (plus its kind), as a caller gives it."""

    kind: str
    display_name: str
    description: str = ""
    credentials_ref: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    purposes: tuple[str, ...] = ()
    events: tuple[str, ...] = ()


def config_of(row: DestinationRow) -> DestinationConfig:
    """The configuration stored in ``row``."""
    return DestinationConfig(kind=row.kind, display_name=row.display_name, description=row.description,
                             credentials_ref=row.credentials_ref, settings=dict(row.settings or {}),
                             purposes=tuple(row.purposes or ()), events=tuple(row.events or ()))


def effective_purposes(row: DestinationRow | DestinationConfig) -> tuple[str, ...]:
    """The purposes a person must have granted for ``row``: its own, else its kind's defaults."""
    if row.purposes:
        return tuple(row.purposes)
    spec = KINDS.get(row.kind)
    return spec.default_purposes if spec is not None else ()


def limited_data_use_enabled(row: DestinationRow | DestinationConfig) -> bool:
    """True when the kind offers Limited Data Use and the settings turn it on (boolean ``true``)."""
    spec = KINDS.get(row.kind)
    if spec is None or spec.limited_data_use_setting is None:
        return False
    return (row.settings or {}).get(spec.limited_data_use_setting) is True


# -- validation --------------------------------------------------------------------------------

def validate_destination_id(destination_id: str, field_name: str = "destination_id") -> list[FieldViolation]:
    """Violations of a destination ID: 1 to 63 characters of [a-z0-9-] starting with a letter."""
    if _ID_RE.fullmatch(destination_id):
        return []
    return [FieldViolation(field_name, "must be 1 to 63 characters of [a-z0-9-], starting with a letter",
                           "INVALID_FORMAT")]


def is_credentials_ref(value: str) -> bool:
    """True for ``env:NAME`` and ``file:/absolute/path`` references."""
    return len(value) <= MAX_CREDENTIALS_REF_LENGTH and bool(
        _ENV_REF_RE.fullmatch(value) or _FILE_REF_RE.fullmatch(value))


def secret_looking_key(key: str) -> bool:
    """True when a settings key names a secret (``access_token``, ``api-key``, ``clientSecret`` ...)."""
    folded = _KEY_NOISE_RE.sub("", key).lower()
    if folded.endswith(("url", "uri")):  # an endpoint such as token_url names where a secret goes, not the secret
        return False
    return any(marker in folded for marker in _SECRET_MARKERS)


def _secret_keys(value: Any, path: str) -> Iterable[str]:
    """Paths of every secret-looking key in a settings value (nested objects and lists)."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            shown = str(key)[:64]
            here = f"{path}.{shown}"
            if secret_looking_key(str(key)):
                yield here
            else:
                yield from _secret_keys(inner, here)
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from _secret_keys(inner, f"{path}[{i}]")


def _present(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def validate_destination(
    config: DestinationConfig,
    *,
    purposes: Collection[str] = DEFAULT_PURPOSES,
    known_events: Collection[str] = CANONICAL_EVENTS,
) -> list[FieldViolation]:
    """Every problem of ``config`` as field violations (paths relative to the destination).

    ``purposes`` are the consent purposes configured for the deployment, ``known_events`` the
    canonical event names (built-in and configured). Descriptions never repeat the
    credentials reference or a settings value, only key names.
    """
    problems: list[FieldViolation] = []
    spec = KINDS.get(config.kind)
    if not config.kind:
        problems.append(FieldViolation("kind", "is required: the platform and API, for example META_CONVERSIONS",
                                       "REQUIRED"))
    elif spec is None:
        problems.append(FieldViolation("kind", f"is not a known destination kind; known: {', '.join(KINDS)}",
                                       "UNKNOWN_KIND"))

    if not config.display_name.strip():
        problems.append(FieldViolation("display_name", "is required", "REQUIRED"))
    elif len(config.display_name) > MAX_DISPLAY_NAME_LENGTH:
        problems.append(FieldViolation("display_name", f"must be at most {MAX_DISPLAY_NAME_LENGTH} characters",
                                       "TOO_LONG"))
    elif not config.display_name.isprintable():
        problems.append(FieldViolation("display_name", "must not contain control characters", "INVALID_FORMAT"))
    if len(config.description) > MAX_DESCRIPTION_LENGTH:
        problems.append(FieldViolation("description", f"must be at most {MAX_DESCRIPTION_LENGTH} characters",
                                       "TOO_LONG"))

    if not config.credentials_ref:
        problems.append(FieldViolation("credentials_ref", "is required: a reference to the credentials, "
                                                          "'env:NAME' or 'file:/path'", "REQUIRED"))
    elif not is_credentials_ref(config.credentials_ref):
        problems.append(FieldViolation(
            "credentials_ref", "must be a reference to the credentials, never the secret itself: 'env:NAME' (an "
                               "environment variable; upper case, digits and _) or 'file:/absolute/path'. The "
                               "value sent is not repeated here", "NOT_A_CREDENTIALS_REFERENCE"))

    problems.extend(_settings_problems(config, spec))

    allowed = set(purposes)
    seen: set[str] = set()
    for i, purpose in enumerate(config.purposes):
        where = f"purposes[{i}]"
        if purpose not in allowed:
            problems.append(FieldViolation(where, f"{purpose[:64]!r} is not a configured consent purpose; known: "
                                                  f"{', '.join(purposes)}", "UNKNOWN_PURPOSE"))
        elif purpose in seen:
            problems.append(FieldViolation(where, f"{purpose!r} is listed twice", "DUPLICATE"))
        seen.add(purpose)

    if config.events and spec is not None and not spec.conversions:
        problems.append(FieldViolation("events", f"only conversion kinds send events; {spec.kind} sends "
                                                 "audience membership or traits, so leave events empty",
                                       "NOT_APPLICABLE"))
    else:
        events = set(known_events)
        seen = set()
        for i, name in enumerate(config.events):
            where = f"events[{i}]"
            if name not in events:
                problems.append(FieldViolation(where, f"{name[:64]!r} is not a canonical event; known: "
                                                      f"{', '.join(sorted(events))}", "UNKNOWN_CANONICAL_EVENT"))
            elif name in seen:
                problems.append(FieldViolation(where, f"{name!r} is listed twice", "DUPLICATE"))
            seen.add(name)
    return problems


def _settings_problems(config: DestinationConfig, spec: KindSpec | None) -> list[FieldViolation]:
    problems = [FieldViolation(path, "looks like a secret; keep secrets out of settings and point credentials_ref "
                                     "at them", "SECRET_IN_SETTINGS")
                for path in _secret_keys(config.settings, "settings")]
    try:
        size = len(json.dumps(config.settings, separators=(",", ":"), default=str).encode())
    except ValueError:  # a circular structure cannot come from a Struct; refuse it anyway
        size = MAX_SETTINGS_BYTES + 1
    if size > MAX_SETTINGS_BYTES:
        problems.append(FieldViolation("settings", f"must be at most {MAX_SETTINGS_BYTES} bytes as JSON",
                                       "TOO_LARGE"))
    if spec is None:
        return problems
    for key in spec.required_settings:
        if not _present(config.settings.get(key)):
            problems.append(FieldViolation(f"settings.{key}", f"is required for {spec.kind}", "REQUIRED"))
    ldu_keys = {k.limited_data_use_setting for k in KINDS.values() if k.limited_data_use_setting}
    for key in sorted(ldu_keys & set(config.settings)):
        if spec.limited_data_use_setting != key:
            problems.append(FieldViolation(f"settings.{key}", f"Limited Data Use is not available for {spec.kind}",
                                           "NOT_SUPPORTED"))
        elif not isinstance(config.settings[key], bool):
            problems.append(FieldViolation(f"settings.{key}", "must be true or false", "INVALID_VALUE"))
    if spec.traits and "traits" in config.settings:
        from audiences.writeback import trait_keys_problem  # the write-back module imports this one

        problem = trait_keys_problem(config.settings["traits"])
        if problem:
            problems.append(FieldViolation("settings.traits", problem, "INVALID_VALUE"))
    return problems


def require_valid(
    config: DestinationConfig,
    *,
    purposes: Collection[str] = DEFAULT_PURPOSES,
    known_events: Collection[str] = CANONICAL_EVENTS,
    prefix: str = "destination.",
) -> None:
    """Raise :class:`InvalidArgument` listing every problem of ``config``, with each field
    path under ``prefix``; return quietly when it is valid."""
    problems = validate_destination(config, purposes=purposes, known_events=known_events)
    if problems:
        moved = [FieldViolation(prefix + v.field, v.description, v.reason) for v in problems]
        raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in moved), violations=moved,
                              reason="INVALID_DESTINATION")


# -- the store ---------------------------------------------------------------------------------

def _new_etag() -> str:
    return secrets.token_hex(10)


def new_destination_id(kind: str) -> str:
    """A fresh server-chosen ID: the kind in lower case and 8 random hex digits
    (``meta-conversions-3fa2b1c4``)."""
    slug = kind.lower().replace("_", "-") or "destination"
    return f"{slug[:52]}-{secrets.token_hex(4)}"


def get_destination(session: Session, destination_id: str) -> DestinationRow:
    """The destination with this ID; raise :class:`NotFound` (``DESTINATION_NOT_FOUND``)."""
    row = session.execute(select(DestinationRow).where(DestinationRow.destination_id == destination_id)).scalar()
    if row is None:
        raise NotFound(f"destination {destination_id[:63]!r} not found", reason="DESTINATION_NOT_FOUND")
    return row


def list_destinations(session: Session, *conditions: Any) -> list[DestinationRow]:
    """Every destination (matching the SQL ``conditions``), ordered by display name then ID.

    The order is decided in Python (code point order), so both backends agree whatever the
    database collation.
    """
    rows = session.execute(select(DestinationRow).where(*conditions)).scalars().all()
    return sorted(rows, key=lambda r: (r.display_name, r.destination_id))


def check_etag(row: DestinationRow, etag: str) -> None:
    """Raise :class:`Aborted` (``STALE_ETAG``) when ``etag`` is given and is not ``row``'s."""
    if etag and etag != row.etag:
        raise Aborted(f"destination {row.destination_id!r} changed since it was read; read it again and retry",
                      reason="STALE_ETAG")


def create_destination(session: Session, config: DestinationConfig, destination_id: str = "") -> DestinationRow:
    """Store a new, ACTIVE destination; the caller has validated ``config``.

    Without ``destination_id`` one is generated. Raises :class:`AlreadyExists`
    (``DESTINATION_EXISTS``) when the ID is taken.
    """
    chosen = destination_id
    if not chosen:
        for _attempt in range(5):
            chosen = new_destination_id(config.kind)
            if session.execute(select(DestinationRow.id).where(DestinationRow.destination_id == chosen)).first() \
                    is None:
                break
    now = datetime.now(UTC)
    row = DestinationRow(destination_id=chosen, kind=config.kind, display_name=config.display_name,
                         description=config.description, credentials_ref=config.credentials_ref,
                         settings=dict(config.settings), purposes=list(config.purposes), events=list(config.events),
                         state=ACTIVE, pause_reason="", etag=_new_etag(), create_time=now, update_time=now)
    taken = AlreadyExists(f"destination {chosen!r} already exists", reason="DESTINATION_EXISTS",
                          metadata={"existing": f"destinations/{chosen}"})
    if session.execute(select(DestinationRow.id).where(DestinationRow.destination_id == chosen)).first() is not None:
        raise taken
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:  # a concurrent create of the same ID committed first
        raise taken from None
    return row


def update_destination(session: Session, row: DestinationRow, config: DestinationConfig) -> DestinationRow:
    """Replace ``row``'s configuration with ``config``; the caller has validated it and kept the
    kind (immutable: a different one is a :class:`ValueError`). A new etag and update time only
    when something changed."""
    if config.kind != row.kind:
        raise ValueError(f"the kind of destination {row.destination_id!r} is immutable")
    values = {"display_name": config.display_name, "description": config.description,
              "credentials_ref": config.credentials_ref, "settings": dict(config.settings),
              "purposes": list(config.purposes), "events": list(config.events)}
    if all(getattr(row, key) == value for key, value in values.items()):
        return row
    for key, value in values.items():
        setattr(row, key, value)
    _touch(row)
    session.flush()
    return row


def set_destination_state(session: Session, row: DestinationRow, state: str, reason: str = "") -> DestinationRow:
    """Pause or resume ``row``; setting the state it already has changes nothing."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, not {state!r}")
    if row.state == state:
        return row
    row.state = state
    row.pause_reason = reason if state == PAUSED else ""
    _touch(row)
    session.flush()
    return row


def delete_destination(session: Session, row: DestinationRow) -> None:
    """Remove ``row``."""
    session.delete(row)
    session.flush()


def _touch(row: DestinationRow) -> None:
    row.etag = _new_etag()
    row.update_time = datetime.now(UTC)
