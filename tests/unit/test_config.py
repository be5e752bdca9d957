"""Configuration: one loader, clear errors, secrets never kept in the clear."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import ConfigError, load_settings, token_digest


def test_defaults_serve_the_embedded_store_on_loopback() -> None:
    settings = load_settings(env={})
    assert settings.listen_address == "127.0.0.1:50051"
    assert settings.database_url.startswith("sqlite:///")
    assert not settings.auth_enabled


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "stitchgraph.toml"
    config.write_text('[server]\nlisten_address = "127.0.0.1:6000"\nlog_level = "DEBUG"\n')
    settings = load_settings(config, env={"STITCHGRAPH_LISTEN_ADDRESS": "127.0.0.1:7000"})
    assert settings.listen_address == "127.0.0.1:7000"
    assert settings.log_level == "DEBUG"


def test_tokens_from_the_environment_keep_only_a_digest() -> None:
    settings = load_settings(env={"STITCHGRAPH_AUTH_TOKENS": "svc:ingest+read:s3cret-value"})
    (token,) = settings.tokens
    assert token.name == "svc"
    assert token.scopes == {"ingest", "read"}
    assert token.token_sha256 == token_digest("s3cret-value")
    assert "s3cret-value" not in repr(settings)


def test_tokens_from_a_file_can_reference_an_environment_variable(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[auth.tokens]]\nname = "ops"\nscopes = ["admin"]\ntoken_env = "OPS_TOKEN"\n')
    settings = load_settings(config, env={"OPS_TOKEN": "abc"})
    assert settings.tokens[0].token_sha256 == token_digest("abc")


def test_serving_beyond_loopback_without_tokens_is_refused() -> None:
    with pytest.raises(ConfigError, match="listen_address"):
        load_settings(env={"STITCHGRAPH_LISTEN_ADDRESS": "0.0.0.0:50051"})


def test_serving_beyond_loopback_with_tokens_is_allowed() -> None:
    settings = load_settings(env={"STITCHGRAPH_LISTEN_ADDRESS": "0.0.0.0:50051",
                                  "STITCHGRAPH_AUTH_TOKENS": "svc:read:t"})
    assert settings.listen_address == "0.0.0.0:50051"


@pytest.mark.parametrize(("env", "key"), [
    ({"STITCHGRAPH_MAX_WORKERS": "many"}, "STITCHGRAPH_MAX_WORKERS"),
    ({"STITCHGRAPH_AUTH_TOKENS": "svc:superuser:t"}, "STITCHGRAPH_AUTH_TOKENS"),
    ({"STITCHGRAPH_LOG_FORMAT": "xml"}, "log_format"),
])
def test_bad_values_name_their_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings(env=env)


def test_unknown_keys_in_the_file_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[server]\nlisten_adress = \"127.0.0.1:1\"\n")
    with pytest.raises(ConfigError, match="listen_adress"):
        load_settings(config, env={})
