"""``[webhooks]`` configuration: off by default, easy to turn on, loopback unless auth is configured,
secrets read through references and never kept in settings or error messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.config import ConfigError, WebhookEnvironment, WebhookSettings, load_settings
from server.http_ingress import resolve_webhook_secrets

TOML = '''
[webhooks]
listen = "127.0.0.1:8088"
max_body_bytes = 1048576
heap_max_age_seconds = 30

[webhooks.environments.prod]
secret_ref = "env:RS_PROD_SECRET"

[webhooks.environments.staging]
secret_ref = "file:/run/secrets/rs_staging"
source = "rudderstack-staging"
'''


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stitchgraph.toml"
    path.write_text(text)
    return path


def test_there_is_no_http_listener_by_default() -> None:
    webhooks = load_settings(env={}).webhooks
    assert webhooks.listen == ""
    assert (webhooks.max_body_bytes, webhooks.heap_max_age_seconds, webhooks.heap_max_future_seconds) == \
        (4 * 1024 * 1024, 60.0, 5.0)


def test_the_webhooks_table_configures_the_listener_and_environments(tmp_path: Path) -> None:
    webhooks = load_settings(write(tmp_path, TOML), env={}).webhooks
    assert webhooks.listen == "127.0.0.1:8088"
    assert (webhooks.max_body_bytes, webhooks.heap_max_age_seconds) == (1048576, 30)
    assert webhooks.environments == (WebhookEnvironment("prod", "env:RS_PROD_SECRET"),
                                     WebhookEnvironment("staging", "file:/run/secrets/rs_staging",
                                                        "rudderstack-staging"))
    assert webhooks.environment("staging") is webhooks.environments[1]
    assert webhooks.environment("qa") is None


def test_environment_variables_turn_the_listener_on(tmp_path: Path) -> None:
    webhooks = load_settings(write(tmp_path, TOML), env={
        "STITCHGRAPH_WEBHOOKS_LISTEN": "127.0.0.1:9099",
        "STITCHGRAPH_WEBHOOKS_ENVIRONMENTS": "eu=env:RS_EU; us=file:/run/secrets/us",
        "STITCHGRAPH_WEBHOOKS_HEAP_MAX_FUTURE_SECONDS": "2",
    }).webhooks
    assert webhooks.listen == "127.0.0.1:9099"
    assert [(e.name, e.secret_ref) for e in webhooks.environments] == [("eu", "env:RS_EU"),
                                                                       ("us", "file:/run/secrets/us")]
    assert webhooks.heap_max_future_seconds == 2
    assert webhooks.max_body_bytes == 1048576  # the file's value stays


def test_a_non_loopback_listener_needs_auth() -> None:
    with pytest.raises(ConfigError, match=re.escape("webhooks.listen")):
        load_settings(env={"STITCHGRAPH_WEBHOOKS_LISTEN": "0.0.0.0:8088"})
    with_secrets = load_settings(env={"STITCHGRAPH_WEBHOOKS_LISTEN": "0.0.0.0:8088",
                                      "STITCHGRAPH_WEBHOOKS_ENVIRONMENTS": "prod=env:RS"})
    assert with_secrets.webhooks.listen == "0.0.0.0:8088"
    with_tokens = load_settings(env={"STITCHGRAPH_WEBHOOKS_LISTEN": "0.0.0.0:8088",
                                     "STITCHGRAPH_LISTEN_ADDRESS": "0.0.0.0:50051",
                                     "STITCHGRAPH_AUTH_TOKENS": "ops:admin:t0ken"})
    assert with_tokens.webhooks.listen == "0.0.0.0:8088"


@pytest.mark.parametrize(("text", "message"), [
    ('[webhooks]\nlisten = "nowhere"\n', "webhooks.listen"),
    ('[webhooks]\nmax_body_bytes = 0\n', "webhooks.max_body_bytes"),
    ('[webhooks]\nheap_max_future_seconds = -1\n', "webhooks.heap_max_future_seconds"),
    ('[webhooks]\nport = 80\n', "unknown keys"),
    ('[webhooks.environments.prod]\nsecret = "plain-text"\n', "webhooks.environments.prod"),
    ('[webhooks.environments.prod]\nsecret_ref = "vault:rs"\n', "webhooks.environments.prod.secret_ref"),
    ('[webhooks.environments."prod/eu"]\nsecret_ref = "env:RS"\n', "the name must be"),
])
def test_bad_webhook_settings_name_the_key(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(write(tmp_path, text), env={})


def test_a_malformed_environments_variable_is_refused() -> None:
    with pytest.raises(ConfigError, match="STITCHGRAPH_WEBHOOKS_ENVIRONMENTS"):
        load_settings(env={"STITCHGRAPH_WEBHOOKS_ENVIRONMENTS": "prod"})


def test_secrets_are_read_through_their_references(tmp_path: Path) -> None:
    secret_file = tmp_path / "staging"
    secret_file.write_text("staging-secret\n")
    settings = WebhookSettings(environments=(WebhookEnvironment("prod", "env:RS_PROD"),
                                             WebhookEnvironment("staging", f"file:{secret_file}"),
                                             WebhookEnvironment("json", "env:RS_JSON")))
    secrets = resolve_webhook_secrets(settings, {"RS_PROD": "prod-secret", "RS_JSON": '{"secret": "json-secret"}'})
    assert secrets == {"prod": "prod-secret", "staging": "staging-secret", "json": "json-secret"}
    assert "prod-secret" not in repr(settings)


def test_an_unreadable_secret_stops_the_start_naming_the_environment_only() -> None:
    settings = WebhookSettings(environments=(WebhookEnvironment("prod", "env:RS_PROD"),))
    with pytest.raises(ConfigError, match=re.escape("webhooks.environments.prod.secret_ref")) as caught:
        resolve_webhook_secrets(settings, {})
    assert "RS_PROD" in str(caught.value)
    with pytest.raises(ConfigError, match="no 'secret' member") as caught:
        resolve_webhook_secrets(settings, {"RS_PROD": '{"password": "hunter2"}'})
    assert "hunter2" not in str(caught.value)
