"""Database plumbing shared by every package: the declarative base, engine creation
with the right pragmas per dialect, and the unit of work.

SQLite is the embedded default. It runs in WAL mode so readers never block the
writer, and every write transaction starts with ``BEGIN IMMEDIATE`` so two writers
queue on the database lock up front instead of deadlocking on a lock upgrade. In
one process, writers additionally queue on a ``threading.Lock``: SQLite's own busy
handler polls with sleeps, which is far slower than a lock hand-off.

PostgreSQL is the production store. Code that must serialise a critical section
across server processes takes a transaction-scoped advisory lock
(:meth:`Database.advisory_lock`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

# One naming convention so Alembic migrations are identical on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every table; import models before touching ``metadata``."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@dataclass(frozen=True)
class DatabaseOptions:
    """How to open the store. ``url`` is any SQLAlchemy URL (``sqlite:///...``,
    ``postgresql+psycopg://...``); ``sqlite_synchronous`` trades durability on power
    loss for speed (FULL keeps every acknowledged commit)."""

    url: str
    sqlite_synchronous: str = "FULL"
    sqlite_busy_timeout_ms: int = 30_000
    pool_size: int = 10
    echo: bool = False


def _sqlite_engine(options: DatabaseOptions) -> Engine:
    url = make_url(options.url)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        echo=options.echo,
        connect_args={"check_same_thread": False, "timeout": options.sqlite_busy_timeout_ms / 1000},
        pool_size=options.pool_size,
        max_overflow=options.pool_size,
    )
    synchronous = options.sqlite_synchronous.upper()
    if synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValueError(f"sqlite_synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself (pysqlite would
        # otherwise start deferred transactions lazily, behind our back).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(options.sqlite_busy_timeout_ms)}")
        cursor.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache per connection
        cursor.execute("PRAGMA temp_store=MEMORY")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _postgres_engine(options: DatabaseOptions) -> Engine:
    return create_engine(
        options.url,
        echo=options.echo,
        pool_size=options.pool_size,
        max_overflow=options.pool_size,
        pool_pre_ping=True,
    )


class Database:
    """The store: an engine plus unit-of-work helpers.

    ``transaction()`` is the only way to write: it yields a session inside one
    transaction that commits when the block ends without an exception. ``read()``
    yields a session for queries that must see one consistent snapshot.
    """

    def __init__(self, options: DatabaseOptions) -> None:
        self.options = options
        url = make_url(options.url)
        self.dialect = url.get_backend_name()
        if self.dialect == "sqlite":
            self.engine = _sqlite_engine(options)
            self._write_engine: Engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
            self._process_write_lock: threading.Lock | None = threading.Lock()
        elif self.dialect == "postgresql":
            self.engine = _postgres_engine(options)
            self._write_engine = self.engine
            self._process_write_lock = None
        else:
            raise ValueError(f"unsupported database dialect {self.dialect!r}: use sqlite or postgresql")
        # Reads see one snapshot: SQLite's deferred read transaction in WAL mode already
        # does; PostgreSQL needs REPEATABLE READ (READ COMMITTED re-snapshots per statement).
        read_engine = self.engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True) \
            if self.is_postgres else self.engine
        self._read_sessions = sessionmaker(bind=read_engine, expire_on_commit=False, autoflush=False)
        self._write_sessions = sessionmaker(bind=self._write_engine, expire_on_commit=False, autoflush=False)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """Yield a session in a write transaction; commit on success, roll back on error."""
        lock = self._process_write_lock
        if lock is not None:
            lock.acquire()
        try:
            with self._write_sessions() as session, session.begin():
                yield session
        finally:
            if lock is not None:
                lock.release()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """Yield a session for reads; nothing it does is committed."""
        with self._read_sessions() as session, session.begin():
            yield session

    def advisory_lock(self, session: Session, name: str) -> None:
        """Serialise the rest of ``session``'s transaction against every other process
        taking the same named lock. A no-op on SQLite, where ``BEGIN IMMEDIATE``
        already serialises writers."""
        if self.is_postgres:
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    def dispose(self) -> None:
        self.engine.dispose()


def driver_executemany(session: Session, table: Any, sql: str, columns: Sequence[str],
                        rows: Sequence[dict[str, Any]]) -> None:
    """Run ``sql`` (with ``?`` markers, one per column) once per row through the DBAPI's
    executemany. The hot path writes thousands of rows per batch; SQLAlchemy's
    per-parameter processing would cost more than the database does. JSON columns are
    serialised here (and cast on PostgreSQL, where a text parameter is not json)."""
    if not rows:
        return
    from datetime import UTC, datetime

    from sqlalchemy import JSON, DateTime

    connection = session.connection()
    postgres = connection.dialect.name == "postgresql"
    json_columns = {c.name for c in table.columns if isinstance(c.type, JSON)}
    if postgres:
        markers = iter(["%s::json" if c in json_columns else "%s" for c in columns])
        sql = "".join(next(markers) if ch == "?" else ch for ch in sql)
    convert = {c for c in columns if c in json_columns}
    if not postgres:
        # What SQLAlchemy's SQLite DateTime stores (UTC, no offset); sqlite3's own
        # datetime adapter is deprecated.
        convert |= {c for c in columns if isinstance(table.c[c].type, DateTime)}

    def value(item: Any) -> Any:
        if type(item) is bool:  # the most common JSON value of bulk writes (trait flags)
            return "true" if item else "false"
        if isinstance(item, datetime):
            return item.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return json.dumps(item)

    positions = [i for i, c in enumerate(columns) if c in convert]
    params: list[Any] = [tuple(row[c] for c in columns) for row in rows]
    if positions:
        converted = []
        for values in params:
            listed = list(values)
            for i in positions:
                if listed[i] is not None:
                    listed[i] = value(listed[i])
            converted.append(tuple(listed))
        params = converted
    connection.exec_driver_sql(sql, params)


def bulk_insert(session: Session, table: Any, rows: Sequence[dict[str, Any]], *, ignore_conflicts: bool = False
                ) -> None:
    """INSERT ``rows`` (all with the keys of the first) through the driver's executemany; with
    ``ignore_conflicts``, rows whose key exists are skipped. For bulk writes of many
    thousands of rows, where SQLAlchemy's per-parameter processing costs more than the
    database does."""
    if not rows:
        return
    columns = list(rows[0])
    verb = "INSERT"
    tail = ""
    if ignore_conflicts:
        if session.get_bind().dialect.name == "postgresql":
            tail = " ON CONFLICT DO NOTHING"
        else:
            verb = "INSERT OR IGNORE"
    sql = f"{verb} INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}){tail}"
    driver_executemany(session, table, sql, columns, rows)


def insert_ignoring_conflicts(session: Session, table: Any, rows: dict[str, Any] | list[dict[str, Any]]) -> None:
    """INSERT ``rows`` (one row or a list, sent as one executemany), skipping any whose key
    already exists (a concurrent writer's, or an earlier repeat, wins)."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = session.get_bind().dialect.name
    statement = (postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)).on_conflict_do_nothing()
    if isinstance(rows, dict):
        session.execute(statement.values(**rows))
    else:
        session.execute(statement, rows)


def in_values(session: Session, column: Any, values: Iterable[Any]) -> Any:
    """``column IN values`` as one bound parameter however many values there are: a JSON
    array read with ``json_each`` on SQLite, ``= ANY(array)`` on PostgreSQL. Expanding a
    thousand-value IN list costs more to compile than the query costs to run."""
    from sqlalchemy import any_, bindparam, func, literal_column, select
    from sqlalchemy.dialects.postgresql import ARRAY

    listed = list(values)
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, listed, type_=ARRAY(column.type)))
    return column.in_(select(literal_column("value")).select_from(func.json_each(bindparam(None, json.dumps(listed)))))
