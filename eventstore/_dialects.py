"""What differs between SQLite and PostgreSQL: connection set-up, immutability triggers, locking.

Appends must be serialized so that global positions are gap-free *in commit order* (a reader that
has seen position p never later sees a p' < p appear) and so that each event can chain the hash of
the one before it. SQLite serializes writers with ``BEGIN IMMEDIATE``; PostgreSQL takes an
EXCLUSIVE lock on the events table, which still lets plain SELECTs run.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

APPEND_ONLY_MESSAGE = "events are append-only"

SQLITE_BUSY_TIMEOUT_MS = 60_000
"""How long a SQLite connection waits for another one's write lock before "database is locked"."""

_SCHEMA_SETUP_LOCK_SPACE = 0x6D656D77
"""First key ("memw" in ASCII) of the PostgreSQL advisory lock held while a store sets up its
schema; the second is a hash of the schema's name, so deployments in other schemas of the same
database (another tenant's, a test's) never wait for each other's setup or upgrade."""

_APPEND_ONLY_TRIGGERS = ("events_no_update_or_delete", "events_no_truncate")
_TRIGGER_REVISION = "memwarden append-only triggers, revision 2"
"""Stored as the PostgreSQL trigger function's comment: bump it whenever the triggers change."""


class Dialect:
    name: str

    def create_engine(self, url: str) -> Engine:
        raise NotImplementedError

    def install_append_only_triggers(self, conn: Connection) -> None:
        raise NotImplementedError

    def lock_for_schema_setup(self, conn: Connection) -> None:
        """Called first inside the transaction that creates the schema; may be called again in
        it."""

    def lock_for_append(self, conn: Connection) -> None:
        """Called first inside an append transaction."""

    def driver_sql(self, sql: str) -> str:
        """``sql``, written with ``?`` placeholders, in the driver's own parameter style."""
        return sql

    def gather_statistics(self, conn: Connection, tables: Sequence[str]) -> None:
        """Refresh the planner's statistics of ``tables`` after a bulk load (a rebuild), in its
        transaction. SQLite: nothing; it plans from its indexes without statistics, and as
        MemWarden never gathers any there are none to go stale."""

    def to_db_time(self, value: datetime) -> Any:
        """A timestamp as the driver must receive it for a ``UTCDateTime`` column."""
        raise NotImplementedError

    def from_db_time(self, value: Any) -> datetime:
        """A ``UTCDateTime`` column as the driver returns it, made timezone-aware UTC."""
        raise NotImplementedError


def _require_aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return value


class SQLiteDialect(Dialect):
    name = "sqlite"

    def create_engine(self, url: str) -> Engine:
        database = make_url(url).database
        if database and database != ":memory:":
            from pathlib import Path

            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False,
                                                  "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" hook, not pysqlite, decide how transactions start.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            # A 64 MiB page cache (SQLite's default is 2 MiB): an append touches the events
            # table's five indexes and a projected write the read models' tables, and beyond
            # ~10^5 events their pages no longer fit the default. Allocated as used.
            cursor.execute("PRAGMA cache_size=-65536")
            # Checkpoint the WAL every 10,000 pages (~40 MiB) rather than 1,000: a projected
            # write dirties ~60 pages, so the default checkpointed (two fsyncs, the same hot
            # pages copied again) every ~16 writes.
            cursor.execute("PRAGMA wal_autocheckpoint=10000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            statement = f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}"
            # Straight on the driver: through exec_driver_sql, starting a transaction cost more
            # than an append's INSERT (see eventstore._driver). Errors keep SQLAlchemy's types.
            try:
                conn.connection.dbapi_connection.execute(statement)  # type: ignore[union-attr]
            except sqlite3.Error as error:
                raise sa_exc.DBAPIError.instance(statement, (), error, sqlite3.Error,
                                                 dialect=conn.dialect) from error

        return engine

    def install_append_only_triggers(self, conn: Connection) -> None:
        # Replaced where a database holds another body (an older release's, or one edited by
        # hand), so a change here reaches existing databases; left alone when it matches.
        for action in ("UPDATE", "DELETE"):
            name = f"events_no_{action.lower()}"
            wanted = (f"CREATE TRIGGER {name} BEFORE {action} ON events "
                      f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END")
            stored = conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?",
                (name,)).scalar()
            if stored == wanted:
                continue
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
            conn.exec_driver_sql(wanted)

    # Both conversions are cached: every event of a transaction shares its recorded_at, which
    # the read models copy into several columns, so the same few timestamps recur all the time.

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def to_db_time(value: datetime) -> str:
        # The exact text SQLAlchemy's SQLite DateTime writes, so rows read back through Core
        # (and digests over them) cannot tell which path wrote them.
        utc = _require_aware(value).astimezone(UTC).replace(tzinfo=None)
        return utc.isoformat(" ", "microseconds")

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def from_db_time(value: str) -> datetime:
        return datetime.fromisoformat(value).replace(tzinfo=UTC)


class PostgresDialect(Dialect):
    name = "postgresql"

    def create_engine(self, url: str) -> Engine:
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)

    def lock_for_schema_setup(self, conn: Connection) -> None:
        # Held until the transaction ends. Without it, stores opened at the same moment race:
        # both create the table, or both replace the trigger function ("tuple concurrently
        # updated").
        conn.execute(text("SELECT pg_advisory_xact_lock(:space, "
                          "hashtext(coalesce(current_schema(), '')))"),
                     {"space": _SCHEMA_SETUP_LOCK_SPACE})

    def install_append_only_triggers(self, conn: Connection) -> None:
        self.lock_for_schema_setup(conn)  # again, for a caller that installs only the triggers
        # Only when missing or of another revision: replacing them on every open would lock
        # the events table against appends while a store starts, and take rights over it that
        # appending does not need. The function's comment names the revision installed, so a
        # change here reaches existing databases (bump _TRIGGER_REVISION with it).
        current = conn.execute(text(
            "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid "
            "WHERE t.tgrelid = 'events'::regclass AND t.tgname = ANY(:names) "
            "AND obj_description(p.oid, 'pg_proc') = :revision"
        ), {"names": list(_APPEND_ONLY_TRIGGERS), "revision": _TRIGGER_REVISION}).scalar_one()
        if current == len(_APPEND_ONLY_TRIGGERS):
            return
        conn.execute(text(
            "CREATE OR REPLACE FUNCTION memwarden_events_append_only() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN "
            f"RAISE EXCEPTION '{APPEND_ONLY_MESSAGE}' USING ERRCODE = 'restrict_violation'; "
            "END $$"
        ))
        conn.execute(text(
            f"COMMENT ON FUNCTION memwarden_events_append_only() IS '{_TRIGGER_REVISION}'"))
        conn.execute(text(
            "CREATE OR REPLACE TRIGGER events_no_update_or_delete "
            "BEFORE UPDATE OR DELETE ON events "
            "FOR EACH ROW EXECUTE FUNCTION memwarden_events_append_only()"
        ))
        conn.execute(text(
            "CREATE OR REPLACE TRIGGER events_no_truncate BEFORE TRUNCATE ON events "
            "FOR EACH STATEMENT EXECUTE FUNCTION memwarden_events_append_only()"
        ))

    def lock_for_append(self, conn: Connection) -> None:
        conn.exec_driver_sql("LOCK TABLE events IN EXCLUSIVE MODE")

    def driver_sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def gather_statistics(self, conn: Connection, tables: Sequence[str]) -> None:
        # Autovacuum would analyze the tables some time after the load, or never where it is
        # off; meanwhile the planner guesses (a semantic search at 10^5 memories took seconds
        # in a nested loop). ANALYZE samples a bounded number of rows per table.
        if tables:
            conn.exec_driver_sql(f"ANALYZE {', '.join(tables)}")

    def to_db_time(self, value: datetime) -> datetime:
        return _require_aware(value).astimezone(UTC)

    def from_db_time(self, value: datetime) -> datetime:
        return value.astimezone(UTC)


_DIALECTS: dict[str, Dialect] = {d.name: d for d in (SQLiteDialect(), PostgresDialect())}


def dialect_named(name: str) -> Dialect:
    """The dialect of a SQLAlchemy dialect name (``conn.dialect.name``)."""
    try:
        return _DIALECTS[name]
    except KeyError:
        raise ValueError(f"unsupported database {name!r}: use SQLite or PostgreSQL") from None


def dialect_for(url: str) -> Dialect:
    backend = make_url(url).get_backend_name()
    if backend not in _DIALECTS:
        raise ValueError(
            f"unsupported database URL {url!r}: use sqlite:/// or postgresql+psycopg://")
    return _DIALECTS[backend]
