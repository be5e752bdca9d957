"""Alembic environment: runs migrations on the connection handed in by
:func:`stitchgraph.migrations.upgrade`, or on a fresh engine for ``alembic`` CLI use."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from stitchgraph.models import metadata

config = context.config


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as fresh:
        _run(fresh)


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things in place
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
