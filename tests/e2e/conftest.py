"""Fixtures for end-to-end tests over real gRPC."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from server.grpc_server import StitchgraphServer
from tests.support.grpc_client import running_server, server_settings

READ_TOKEN = "read-token-0123456789"
INGEST_TOKEN = "ingest-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"


@pytest.fixture
def server(db_url: str) -> Iterator[StitchgraphServer]:
    """A started server without auth (loopback only) on the store under test."""
    with running_server(server_settings(db_url)) as handle:
        yield handle


@pytest.fixture
def channel(server: StitchgraphServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture
def authed_server(db_url: str) -> Iterator[StitchgraphServer]:
    from server.config import parse_env_tokens

    tokens = parse_env_tokens(f"reader:read:{READ_TOKEN};ingester:ingest:{INGEST_TOKEN};ops:admin:{ADMIN_TOKEN}")
    with running_server(server_settings(db_url, tokens=tokens)) as handle:
        yield handle


@pytest.fixture
def authed_channel(authed_server: StitchgraphServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{authed_server.port}") as ch:
        yield ch


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
