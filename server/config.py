"""Configuration: the one place that reads it.

Sources, later ones winning: built-in defaults, an optional TOML file (path in
``STITCHGRAPH_CONFIG`` or ``--config``), ``STITCHGRAPH_*`` environment variables,
then command-line flags. Every key is documented in ``docs/configuration.md``.

Secrets (bearer tokens) are kept only as SHA-256 digests once loaded, so a settings
object can be printed or logged without leaking them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from audiences.consent.settings import ConsentSettings
from audiences.delivery import DeliverySettings
from audiences.engine import AudienceSettings
from identity.events.capture import EventSettings
from stitchgraph.scheduler import SchedulerSettings

SCOPES = frozenset({"ingest", "read", "admin"})


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


@dataclass(frozen=True)
class TokenConfig:
    """A bearer token: its owner's name (used in audit and logs), the SHA-256 of the
    token and the scopes it grants. The token itself is never kept."""

    name: str
    token_sha256: str
    scopes: frozenset[str]

    def __repr__(self) -> str:
        return f"TokenConfig(name={self.name!r}, scopes={sorted(self.scopes)!r})"


@dataclass(frozen=True)
class IdentifierTypeConfig:
    """A custom identifier type (``device_id``, ``loyalty_id``, ...)."""

    name: str
    max_per_person: int | None = 5
    priority: int = 100
    hashed: bool = False


@dataclass(frozen=True)
class IdentitySettings:
    """Defaults for the identity graph; the live policy is stored and editable via the API."""

    default_phone_region: str | None = "US"
    custom_types: tuple[IdentifierTypeConfig, ...] = ()
    type_limits: Mapping[str, int | None] = field(default_factory=dict)
    max_identifiers_per_person: int = 1000
    max_merges_per_person: int = 100
    extra_blocklist: tuple[Mapping[str, Any], ...] = ()


_WEBHOOK_ENVIRONMENT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class WebhookEnvironment:
    """A webhook environment (``[webhooks.environments.<name>]``): senders posting to
    ``/webhooks/{rudderstack|segment}/<name>`` prove themselves with the secret behind
    ``secret_ref`` (``env:NAME`` or ``file:/path``, resolved when the listener starts; the
    secret itself is never kept in settings). ``source`` labels the events; empty means the
    sender kind (``rudderstack`` or ``segment``), as for ``CaptureSourcePayloads``."""

    name: str
    secret_ref: str
    source: str = ""


@dataclass(frozen=True)
class WebhookSettings:
    """The HTTP listener for webhook ingress (``[webhooks]``)."""

    #: ``host:port`` of the HTTP listener; empty: no listener. Port 0 picks a free port.
    listen: str = ""
    #: Larger request bodies are refused with 413 before they are read.
    max_body_bytes: int = 4 * 1024 * 1024
    #: Heap-Hash timestamps older than this are refused (replay window).
    heap_max_age_seconds: float = 60.0
    #: Heap-Hash timestamps further ahead than this are refused (tolerated clock skew).
    heap_max_future_seconds: float = 5.0
    #: Requests handled at once; more get 503 with Retry-After.
    max_concurrent_requests: int = 64
    environments: tuple[WebhookEnvironment, ...] = ()

    def environment(self, name: str) -> WebhookEnvironment | None:
        return next((e for e in self.environments if e.name == name), None)


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start."""

    listen_address: str = "127.0.0.1:50051"
    database_url: str = "sqlite:///var/stitchgraph.db"
    sqlite_synchronous: str = "FULL"
    database_pool_size: int = 10
    migrate_on_start: bool = True
    tokens: tuple[TokenConfig, ...] = ()
    metrics_address: str | None = "127.0.0.1:9464"
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    max_receive_message_bytes: int = 8 * 1024 * 1024
    max_send_message_bytes: int = 16 * 1024 * 1024
    max_workers: int = 16
    max_concurrent_rpcs: int = 256
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    log_format: str = "json"
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    events: EventSettings = field(default_factory=EventSettings)
    consent: ConsentSettings = field(default_factory=ConsentSettings)
    audiences: AudienceSettings = field(default_factory=AudienceSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    def validate(self) -> Settings:
        """Return ``self`` if coherent; raise :class:`ConfigError` naming the first bad key."""
        host, _port = split_address(self.listen_address, "listen_address")
        if not self.auth_enabled and not is_loopback_host(host):
            raise ConfigError(
                f"listen_address: {self.listen_address!r} is not a loopback address and no auth tokens "
                "are configured; configure [[auth.tokens]] (or STITCHGRAPH_AUTH_TOKENS) before serving "
                "beyond this machine"
            )
        if self.metrics_address:
            split_address(self.metrics_address, "metrics_address")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        for key in ("max_receive_message_bytes", "max_send_message_bytes", "max_workers", "max_concurrent_rpcs"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive")
        if self.log_format not in {"json", "text"}:
            raise ConfigError("log_format must be 'json' or 'text'")
        events = self.events
        if events.unmapped_action not in {"park", "reject"}:
            raise ConfigError("events.unmapped_action must be 'park' or 'reject'")
        if not 1 <= events.max_batch_size <= 10_000:
            raise ConfigError("events.max_batch_size must be between 1 and 10000")
        if events.max_future_skew_seconds < 0:
            raise ConfigError("events.max_future_skew_seconds must not be negative")
        if events.registry_file and not Path(events.registry_file).is_file():
            raise ConfigError(f"events.registry_file: {events.registry_file!r} is not a readable file")
        try:
            self.consent.validate()
        except ValueError as exc:
            raise ConfigError(f"consent: {exc}") from exc
        if self.audiences.process_interval_seconds < 0 or self.audiences.window_interval_seconds < 0:
            raise ConfigError("audiences: intervals must not be negative (0 turns a timer off)")
        delivery = self.delivery
        if delivery.workers < 0 or delivery.max_attempts < 1:
            raise ConfigError("delivery: workers must not be negative and max_attempts must be at least 1")
        for key in ("poll_interval_seconds", "lease_seconds", "request_timeout_seconds", "backoff_base_seconds",
                    "backoff_max_seconds", "throttle_seconds"):
            if getattr(delivery, key) <= 0:
                raise ConfigError(f"delivery.{key} must be positive")
        if delivery.lease_seconds <= delivery.request_timeout_seconds:
            raise ConfigError("delivery.lease_seconds must be longer than delivery.request_timeout_seconds")
        names = [t.name for t in self.tokens]
        if len(names) != len(set(names)):
            raise ConfigError("auth.tokens: token names must be unique")
        self._validate_webhooks()
        try:
            self.scheduler.validate()
        except ValueError as exc:
            raise ConfigError(f"scheduler: {exc}") from exc
        return self

    def _validate_webhooks(self) -> None:
        webhooks = self.webhooks
        if webhooks.listen:
            host, _port = split_address(webhooks.listen, "webhooks.listen")
            # Like the gRPC rule: beyond loopback only once the deployment has auth configured
            # (webhook secrets, or the tokens that guard the API where Heap webhook secrets are set).
            if not (webhooks.environments or self.auth_enabled) and not is_loopback_host(host):
                raise ConfigError(
                    f"webhooks.listen: {webhooks.listen!r} is not a loopback address and no webhook environment "
                    "secrets or auth tokens are configured; configure [webhooks.environments.<name>] secret_ref "
                    "(or STITCHGRAPH_WEBHOOKS_ENVIRONMENTS) before listening beyond this machine")
        for key in ("max_body_bytes", "heap_max_age_seconds", "max_concurrent_requests"):
            if getattr(webhooks, key) <= 0:
                raise ConfigError(f"webhooks.{key} must be positive")
        if webhooks.heap_max_future_seconds < 0:
            raise ConfigError("webhooks.heap_max_future_seconds must not be negative")
        seen: set[str] = set()
        for environment in webhooks.environments:
            where = f"webhooks.environments.{environment.name[:64]}"
            if not _WEBHOOK_ENVIRONMENT_NAME.match(environment.name):
                raise ConfigError(f"{where}: the name must be 1 to 64 characters of [A-Za-z0-9_-]")
            if environment.name in seen:
                raise ConfigError(f"{where}: defined twice")
            seen.add(environment.name)
            if not environment.secret_ref.startswith(("env:", "file:")) or len(environment.secret_ref) <= 5:
                raise ConfigError(f"{where}.secret_ref: must be 'env:NAME' or 'file:/path'")


def split_address(address: str, key: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) split into host and port; raise :class:`ConfigError`."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{key}: expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _parse_token_entry(entry: Mapping[str, Any], where: str, env: Mapping[str, str]) -> TokenConfig:
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: required")
    scopes = entry.get("scopes")
    if not isinstance(scopes, list) or not scopes or not set(scopes) <= SCOPES:
        raise ConfigError(f"{where}.scopes: a non-empty list of {sorted(SCOPES)}")
    if "token_sha256" in entry:
        digest = str(entry["token_sha256"]).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{where}.token_sha256: must be 64 hex characters")
    elif "token_env" in entry:
        secret = env.get(str(entry["token_env"]))
        if not secret:
            raise ConfigError(f"{where}.token_env: environment variable {entry['token_env']!r} is not set")
        digest = token_digest(secret)
    elif "token" in entry:
        digest = token_digest(str(entry["token"]))
    else:
        raise ConfigError(f"{where}: one of token, token_env or token_sha256 is required")
    return TokenConfig(name=name, token_sha256=digest, scopes=frozenset(scopes))


def parse_env_tokens(value: str) -> tuple[TokenConfig, ...]:
    """Parse ``STITCHGRAPH_AUTH_TOKENS``: ``name:scope+scope:token`` entries separated by ``;``."""
    tokens = []
    for i, raw in enumerate(filter(None, (part.strip() for part in value.split(";")))):
        parts = raw.split(":", 2)
        if len(parts) != 3 or not parts[2]:
            raise ConfigError(f"STITCHGRAPH_AUTH_TOKENS entry {i}: expected name:scope+scope:token")
        entry = {"name": parts[0], "scopes": parts[1].split("+"), "token": parts[2]}
        tokens.append(_parse_token_entry(entry, f"STITCHGRAPH_AUTH_TOKENS entry {i}", {}))
    return tuple(tokens)


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _optional(value: str) -> str | None:
    return value or None


# Flat settings readable from the environment: env name -> (field, parser).
_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "STITCHGRAPH_LISTEN_ADDRESS": ("listen_address", str),
    "STITCHGRAPH_DATABASE_URL": ("database_url", str),
    "STITCHGRAPH_SQLITE_SYNCHRONOUS": ("sqlite_synchronous", str),
    "STITCHGRAPH_DATABASE_POOL_SIZE": ("database_pool_size", int),
    "STITCHGRAPH_MIGRATE_ON_START": ("migrate_on_start", _bool),
    "STITCHGRAPH_METRICS_ADDRESS": ("metrics_address", _optional),
    "STITCHGRAPH_TLS_CERT_FILE": ("tls_cert_file", _optional),
    "STITCHGRAPH_TLS_KEY_FILE": ("tls_key_file", _optional),
    "STITCHGRAPH_TLS_CLIENT_CA_FILE": ("tls_client_ca_file", _optional),
    "STITCHGRAPH_MAX_RECEIVE_MESSAGE_BYTES": ("max_receive_message_bytes", int),
    "STITCHGRAPH_MAX_SEND_MESSAGE_BYTES": ("max_send_message_bytes", int),
    "STITCHGRAPH_MAX_WORKERS": ("max_workers", int),
    "STITCHGRAPH_MAX_CONCURRENT_RPCS": ("max_concurrent_rpcs", int),
    "STITCHGRAPH_SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", float),
    "STITCHGRAPH_LOG_LEVEL": ("log_level", str),
    "STITCHGRAPH_LOG_FORMAT": ("log_format", str),
}

_TOP_LEVEL_KEYS = {f.name for f in fields(Settings)} - {"tokens", "identity", "events", "consent", "audiences",
                                                        "delivery", "webhooks", "scheduler"}

# STITCHGRAPH_EVENTS_* variables: env name -> (EventSettings field, parser).
_EVENTS_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "STITCHGRAPH_EVENTS_MAX_BATCH_SIZE": ("max_batch_size", int),
    "STITCHGRAPH_EVENTS_UNMAPPED_ACTION": ("unmapped_action", str),
    "STITCHGRAPH_EVENTS_MAX_FUTURE_SKEW_SECONDS": ("max_future_skew_seconds", int),
    "STITCHGRAPH_EVENTS_REGISTRY_FILE": ("registry_file", _optional),
}


def parse_env_webhook_environments(value: str) -> tuple[WebhookEnvironment, ...]:
    """Parse ``STITCHGRAPH_WEBHOOKS_ENVIRONMENTS``: ``name=secret_ref`` entries separated by ``;``,
    for example ``prod=env:RS_PROD_SECRET;staging=file:/run/secrets/rs_staging``."""
    environments = []
    for i, raw in enumerate(filter(None, (part.strip() for part in value.split(";")))):
        name, sep, ref = raw.partition("=")
        if not sep or not name.strip() or not ref.strip():
            raise ValueError(f"entry {i}: expected name=env:VARIABLE or name=file:/path")
        environments.append(WebhookEnvironment(name=name.strip(), secret_ref=ref.strip()))
    return tuple(environments)


# STITCHGRAPH_WEBHOOKS_* variables: env name -> (WebhookSettings field, parser).
_WEBHOOKS_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "STITCHGRAPH_WEBHOOKS_LISTEN": ("listen", str),
    "STITCHGRAPH_WEBHOOKS_MAX_BODY_BYTES": ("max_body_bytes", int),
    "STITCHGRAPH_WEBHOOKS_HEAP_MAX_AGE_SECONDS": ("heap_max_age_seconds", float),
    "STITCHGRAPH_WEBHOOKS_HEAP_MAX_FUTURE_SECONDS": ("heap_max_future_seconds", float),
    "STITCHGRAPH_WEBHOOKS_MAX_CONCURRENT_REQUESTS": ("max_concurrent_requests", int),
    "STITCHGRAPH_WEBHOOKS_ENVIRONMENTS": ("environments", parse_env_webhook_environments),
}


def _webhooks_from_toml(table: Mapping[str, Any]) -> WebhookSettings:
    known = {f.name for f in fields(WebhookSettings)}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"webhooks: unknown keys {sorted(unknown)}")
    values = dict(table)
    environments = values.pop("environments", {})
    if not isinstance(environments, dict):
        raise ConfigError("webhooks.environments: a table of [webhooks.environments.<name>] tables")
    parsed = []
    for name, entry in environments.items():
        where = f"webhooks.environments.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: a table with secret_ref (and optionally source)")
        extra = set(entry) - {"secret_ref", "source"}
        if extra:
            raise ConfigError(f"{where}: unknown keys {sorted(extra)}")
        if not isinstance(entry.get("secret_ref"), str):
            raise ConfigError(f"{where}.secret_ref: required, 'env:NAME' or 'file:/path'")
        parsed.append(WebhookEnvironment(name=str(name), secret_ref=entry["secret_ref"],
                                         source=str(entry.get("source", ""))))
    try:
        return replace(WebhookSettings(), **values, environments=tuple(parsed))
    except TypeError as exc:
        raise ConfigError(f"webhooks: {exc}") from exc


def _events_from_toml(table: Mapping[str, Any]) -> EventSettings:
    known = {f.name for f in fields(EventSettings)}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"events: unknown keys {sorted(unknown)}")
    values = dict(table)
    if "custom_events" in values:
        values["custom_events"] = tuple(str(e) for e in values["custom_events"])
    try:
        return replace(EventSettings(), **values)
    except TypeError as exc:
        raise ConfigError(f"events: {exc}") from exc


def _section_from_toml(name: str, cls: type[Any], table: Mapping[str, Any]) -> Any:
    """A settings dataclass from its TOML table (unknown keys refused)."""
    known = {f.name for f in fields(cls)}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{name}: unknown keys {sorted(unknown)}")
    try:
        return cls(**table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def _carry_window_interval(data: dict[str, Any]) -> None:
    """``[audiences] window_interval_seconds`` predates the scheduler: when set and
    ``[scheduler] audience_evaluation_schedule`` is not, it becomes that schedule
    (``every <n>s``; 0 = only by hand)."""
    audiences = data.get("audiences") or {}
    scheduler = data.get("scheduler") or {}
    if "window_interval_seconds" not in audiences or "audience_evaluation_schedule" in scheduler:
        return
    seconds = audiences["window_interval_seconds"]
    if not isinstance(seconds, int | float) or seconds < 0:
        raise ConfigError("audiences.window_interval_seconds: must be a non-negative number")
    data["scheduler"] = {**scheduler, "audience_evaluation_schedule": f"every {math.ceil(seconds)}s" if seconds else ""}


def _identity_from_toml(table: Mapping[str, Any]) -> IdentitySettings:
    known = {"default_phone_region", "custom_types", "type_limits", "max_identifiers_per_person",
             "max_merges_per_person", "blocklist"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"identity: unknown keys {sorted(unknown)}")
    custom = []
    for i, entry in enumerate(table.get("custom_types", [])):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"identity.custom_types[{i}]: a table with at least 'name'")
        limit = entry.get("max_per_person", 5)
        custom.append(IdentifierTypeConfig(
            name=str(entry["name"]),
            max_per_person=None if limit in (0, None) else int(limit),
            priority=int(entry.get("priority", 100)),
            hashed=bool(entry.get("hashed", False)),
        ))
    limits = {str(k): (None if v in (0, None) else int(v)) for k, v in table.get("type_limits", {}).items()}
    defaults = IdentitySettings()
    return IdentitySettings(
        default_phone_region=table.get("default_phone_region", defaults.default_phone_region) or None,
        custom_types=tuple(custom),
        type_limits=limits,
        max_identifiers_per_person=int(table.get("max_identifiers_per_person",
                                                 defaults.max_identifiers_per_person)),
        max_merges_per_person=int(table.get("max_merges_per_person", defaults.max_merges_per_person)),
        extra_blocklist=tuple(table.get("blocklist", [])),
    )


def load_settings(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build validated :class:`Settings` from defaults, TOML file, environment and overrides.

    Raises :class:`ConfigError` for an unreadable file, an unknown key or a bad value.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_file or env.get("STITCHGRAPH_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        server_table = data.pop("server", {})
        auth_table = data.pop("auth", {})
        identity_table = data.pop("identity", None)
        events_table = data.pop("events", None)
        webhooks_table = data.pop("webhooks", None)
        if webhooks_table is not None:
            values["webhooks"] = _webhooks_from_toml(webhooks_table)
        _carry_window_interval(data)
        for section, cls in (("consent", ConsentSettings), ("audiences", AudienceSettings),
                             ("delivery", DeliverySettings), ("scheduler", SchedulerSettings)):
            section_table = data.pop(section, None)
            if section_table is not None:
                values[section] = _section_from_toml(section, cls, section_table)
        if data:
            raise ConfigError(f"config file {path}: unknown sections {sorted(data)}")
        for key, value in server_table.items():
            if key not in _TOP_LEVEL_KEYS:
                raise ConfigError(f"server.{key}: unknown key")
            values[key] = value
        values["tokens"] = tuple(
            _parse_token_entry(entry, f"auth.tokens[{i}]", env) for i, entry in enumerate(auth_table.get("tokens", []))
        )
        if identity_table is not None:
            values["identity"] = _identity_from_toml(identity_table)
        if events_table is not None:
            values["events"] = _events_from_toml(events_table)
    for name, (key, parse) in _ENV.items():
        if name in env:
            try:
                values[key] = parse(env[name])
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from exc
    events_env = {}
    for name, (key, parse) in _EVENTS_ENV.items():
        if name in env:
            try:
                events_env[key] = parse(env[name])
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from exc
    if events_env:
        values["events"] = replace(values.get("events", EventSettings()), **events_env)
    webhooks_env = {}
    for name, (key, parse) in _WEBHOOKS_ENV.items():
        if name in env:
            try:
                webhooks_env[key] = parse(env[name])
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from exc
    if webhooks_env:
        values["webhooks"] = replace(values.get("webhooks", WebhookSettings()), **webhooks_env)
    if env.get("STITCHGRAPH_AUTH_TOKENS"):
        values["tokens"] = parse_env_tokens(env["STITCHGRAPH_AUTH_TOKENS"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = replace(Settings(), **values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
    return settings.validate()
