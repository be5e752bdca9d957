"""Alembic migrations of the Stitchgraph store, applied with :func:`upgrade`.

The Alembic environment is configured in code (no ``alembic.ini``): the CLI
(``stitchgraph migrate``) and the server at start-up both call :func:`upgrade`.
Each feature adds its own revision under ``versions/``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from stitchgraph.db import Database

_HERE = Path(__file__).parent


def alembic_config(db: Database) -> Config:
    """An Alembic configuration bound to ``db``'s engine."""
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.set_main_option("sqlalchemy.url", db.engine.url.render_as_string(hide_password=False))
    config.attributes["engine"] = db.engine
    return config


def upgrade(db: Database, revision: str = "head") -> None:
    """Apply every migration up to ``revision`` (idempotent; safe from several processes on PostgreSQL)."""
    config = alembic_config(db)
    with db.engine.begin() as connection:
        if db.is_postgres:
            # Two server processes starting together must not both run a migration.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7423001)")
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def head_revision() -> str:
    """The newest revision this code knows."""
    script = ScriptDirectory.from_config(_config_without_db())
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(db: Database) -> str | None:
    """The revision the store is at, or ``None`` for an empty store."""
    with db.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def is_up_to_date(db: Database) -> bool:
    """True when the store is at this code's head revision."""
    return current_revision(db) == head_revision()


def _config_without_db() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    return config
