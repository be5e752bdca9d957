"""Migrations bring an empty store to the current schema on both backends."""

from __future__ import annotations

from sqlalchemy import inspect

from stitchgraph import migrations
from stitchgraph.db import Database, DatabaseOptions
from stitchgraph.models import metadata


def test_migrated_store_is_at_head_with_every_table(db: Database) -> None:
    assert migrations.is_up_to_date(db)
    tables = set(inspect(db.engine).get_table_names())
    assert set(metadata.tables) <= tables


def test_upgrading_twice_is_harmless(db: Database) -> None:
    migrations.upgrade(db)
    assert migrations.current_revision(db) == migrations.head_revision()


def test_sqlite_store_runs_in_wal_mode(tmp_path: object) -> None:
    db = Database(DatabaseOptions(url=f"sqlite:///{tmp_path}/wal.db"))
    try:
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        db.dispose()


def test_migrations_create_exactly_what_the_models_declare(db: Database) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, metadata)
    assert differences == []
