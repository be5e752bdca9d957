"""Shared fixtures.

Every test that touches storage takes the ``db_url`` fixture, parametrised over the
embedded SQLite store and a real PostgreSQL server started once per session. Each
test gets a fresh store cloned from one migrated template, so it starts at the
current schema without paying for the migrations again. In CI (``CI=true``) a
PostgreSQL server that cannot start fails the run instead of skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from stitchgraph import migrations
from stitchgraph.db import Database, DatabaseOptions
from tests.support.postgres import PostgresServer, PostgresUnavailable

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
        server.start()
    except (PostgresUnavailable, OSError) as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI and could not start: {exc}")
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> str:
    name = postgres_server.create_database()
    db = Database(DatabaseOptions(url=postgres_server.url(name)))
    try:
        migrations.upgrade(db)
    finally:
        db.dispose()
    return name


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    db = Database(DatabaseOptions(url=f"sqlite:///{path}"))
    try:
        migrations.upgrade(db)
        with db.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.dispose()
    return path


@contextmanager
def _fresh_store(request: pytest.FixtureRequest, backend: str, sqlite_path: Path) -> Iterator[str]:
    """A fresh, migrated store on ``backend``, cloned from the session's template."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        shutil.copyfile(template, sqlite_path)
        yield f"sqlite:///{sqlite_path}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database(template=request.getfixturevalue("postgres_template"))
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, migrated store: SQLite file, then PostgreSQL database."""
    with _fresh_store(request, request.param, tmp_path / "store.db") as url:
        yield url


@pytest.fixture
def second_db_url(db_url: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Another fresh store on the same backend as ``db_url`` (for copies and replays)."""
    with _fresh_store(request, request.node.callspec.params["db_url"], tmp_path / "second.db") as url:
        yield url


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(DatabaseOptions(url=db_url, sqlite_synchronous="NORMAL"))
    try:
        yield database
    finally:
        database.dispose()
