"""The SQL event store: one class for SQLite and PostgreSQL, chosen by URL.

Every append runs in one serialized transaction: it reads the head of the log, checks each
stream's expected version, assigns stream versions, global positions and chained hashes, inserts,
and commits. So positions are gap-free in commit order and one command's events land together or
not at all.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, RootTransaction, func, select
from sqlalchemy import exc as sa_exc

from eventstore import _dialects
from eventstore._codec import PayloadCodec
from eventstore._dialects import Dialect, dialect_for, dialect_named
from eventstore._driver import DriverConnection, in_list, insert_sql, select_sql
from eventstore._envelope import (
    GENESIS_HASH,
    EventContext,
    NewEvent,
    StoredEvent,
    canonical_json,
    envelope_hash,
    event_hash,
    hashed_timestamp,
    parse_json,
    utcnow,
)
from eventstore._errors import (
    TRANSIENT_SQLSTATES,
    BackendError,
    ConcurrencyError,
    IntegrityError,
    TransientConflict,
)
from eventstore._gc import collection_paused
from eventstore._schema import events, metadata
from eventstore._upcasting import Upcasters

ANY_VERSION = None
"""Pass as ``expected_version`` to append wherever the stream is (e.g. batched access records)."""

_COLUMNS = (
    "position", "event_id", "stream_id", "stream_version", "type", "schema_version",
    "occurred_at", "recorded_at", "tenant", "actor", "on_behalf_of", "correlation_id",
    "causation_id", "payload", "prev_hash", "hash",
)
"""Every column of ``events``, in the order of ``StoredEvent``'s fields."""

# The statements every append and every projector batch runs go straight to the driver
# (see eventstore._driver); rarer ones stay in SQLAlchemy Core.
_SELECT_EVENTS = select_sql("events", _COLUMNS)
_SELECT_HEAD = "SELECT position, hash, recorded_at FROM events ORDER BY position DESC LIMIT 1"
_SELECT_STREAM_VERSIONS = ("SELECT stream_id, MAX(stream_version) FROM events "
                           "WHERE stream_id IN {keys} GROUP BY stream_id")
_SELECT_PAGE = f"{_SELECT_EVENTS} WHERE position > ? ORDER BY position LIMIT ?"
_INSERT_EVENT = insert_sql("events", _COLUMNS)


logger = logging.getLogger("memwarden.eventstore")

SCHEMA_SETUP_PATIENCE_SECONDS = 3600.0
"""How long opening a database waits for another process's schema setup or upgrade."""
SCHEMA_SETUP_ATTEMPT_MS = 5_000
"""SQLite: how long each request for the write lock waits (then a warning, and another)."""


@dataclass(frozen=True, slots=True)
class StreamAppend:
    """Events for one stream, appended only if the stream is at ``expected_version``.

    ``expected_version`` 0 means "the stream must not exist yet"; ``None`` means "anywhere".
    """

    stream_id: str
    events: Sequence[NewEvent]
    expected_version: int | None
    context: EventContext


@dataclass(frozen=True, slots=True)
class ChainBreak:
    position: int
    event_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class VerificationReport:
    checked: int
    head_position: int
    first_break: ChainBreak | None

    @property
    def ok(self) -> bool:
        return self.first_break is None


@contextmanager
def _translated_errors() -> Iterator[None]:
    try:
        yield
    except sa_exc.IntegrityError as error:
        raise IntegrityError(str(error.orig or error)) from error
    except sa_exc.OperationalError as error:
        if getattr(error.orig, "sqlstate", None) in TRANSIENT_SQLSTATES:
            raise TransientConflict(str(error.orig)) from error
        raise BackendError(str(error.orig or error)) from error


class EventStore:
    """Append-only, hash-chained event log in a SQL database."""

    def __init__(self, engine: Engine, dialect: Dialect, upcasters: Upcasters | None = None,
                 codec: PayloadCodec | None = None):
        self.engine = engine
        self.dialect = dialect
        self.upcasters = upcasters or Upcasters()
        self.codec = codec

    @classmethod
    def open(cls, url: str, upcasters: Upcasters | None = None, *,
             codec: PayloadCodec | None = None) -> EventStore:
        """Connect to ``url`` and create the events table (and its triggers) if missing.

        ``codec`` (see ``eventstore._codec``) transforms payloads into their stored form and
        back; without one, payloads are stored as written.
        """
        dialect = dialect_for(url)
        store = cls(dialect.create_engine(url), dialect, upcasters, codec)
        store.create_schema()
        return store

    def create_schema(self) -> None:
        # Stores opened at the same moment (worker processes starting together) would otherwise
        # race to create the same table and triggers: serialize them, and create only what is
        # missing.
        with _translated_errors(), self.schema_setup() as conn:
            metadata.create_all(conn)
            self.dialect.install_append_only_triggers(conn)
            if self.codec is not None:
                self.codec.create_schema(conn)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def schema_setup(self) -> Iterator[Connection]:
        """``schema_setup`` (below) on this store's database."""
        with schema_setup(self.engine) as conn:
            yield conn

    # -- writing ---------------------------------------------------------------------------

    def append(
        self,
        stream_id: str,
        new_events: Sequence[NewEvent],
        *,
        expected_version: int | None,
        context: EventContext,
        then: Callable[[Connection, list[StoredEvent]], None] | None = None,
    ) -> list[StoredEvent]:
        return self.append_many([StreamAppend(stream_id, new_events, expected_version, context)],
                                then=then)

    def append_many(
        self,
        appends: Sequence[StreamAppend],
        *,
        then: Callable[[Connection, list[StoredEvent]], None] | None = None,
    ) -> list[StoredEvent]:
        """Append to several streams in one transaction: all of them, or none.

        ``then`` runs inside that transaction after the insert (the embedded mode projects the
        new events there, so they become visible to readers together with their projections).
        """
        if not any(a.events for a in appends):
            return []
        try:
            with (collection_paused(), _translated_errors(), self.write_connection() as conn,
                  conn.begin()):
                self.dialect.lock_for_append(conn)
                stored = self._append_locked(conn, appends)
                if then is not None:
                    then(conn, stored)
                return stored
        except IntegrityError:
            # Either a creation whose stream exists (the unique (stream_id, stream_version)
            # key), which callers must see as the ConcurrencyError it is, or another rule,
            # such as an event_id already in the log.
            self._raise_if_already_created(appends)
            raise

    @contextmanager
    def write_connection(self) -> Iterator[Connection]:
        """A connection whose transactions take the database's write lock when they begin
        (SQLite), so a read-then-write transaction never fails halfway on a busy database."""
        with self.engine.connect() as conn:
            if self.dialect.name == "sqlite":
                conn.execution_options(sqlite_begin="IMMEDIATE")
            yield conn

    def _append_locked(self, conn: Connection,
                       appends: Sequence[StreamAppend]) -> list[StoredEvent]:
        db = DriverConnection(conn, self.dialect)
        position, prev_hash, recorded_at = self._head(db)
        # Creations (expected version 0) are not looked up: the unique (stream_id,
        # stream_version) key rejects one whose stream exists, and append_many turns that
        # into the ConcurrencyError. It spares a query per command and per batched stream.
        versions = _stream_versions(db, sorted({a.stream_id for a in appends
                                                if a.expected_version != 0}))
        drafts: list[StoredEvent] = []
        for request in appends:
            current = versions.get(request.stream_id, 0)
            if request.expected_version is not None and request.expected_version != current:
                raise ConcurrencyError(request.stream_id, request.expected_version, current)
            ctx = request.context
            for new in request.events:
                position += 1
                current += 1
                # Positional, in StoredEvent's field order: a batch builds thousands of them.
                drafts.append(StoredEvent(
                    position, new.event_id, request.stream_id, current, new.type,
                    new.schema_version, new.occurred_at, recorded_at, ctx.tenant, ctx.actor,
                    ctx.on_behalf_of, ctx.correlation_id, ctx.causation_id, new.payload, "", ""))
            versions[request.stream_id] = current
        # The codec sees every event of the append at once (so it can batch its key lookups),
        # and the hash covers the payload as stored: verify needs no keys.
        stored_payloads: Sequence[Mapping[str, Any]] = (
            [d.payload for d in drafts] if self.codec is None
            else self.codec.encode(conn, drafts))
        to_db_time = self.dialect.to_db_time
        recorded_spelled = hashed_timestamp(recorded_at)
        recorded_db = to_db_time(recorded_at)
        stored: list[StoredEvent] = []
        rows: list[tuple[Any, ...]] = []
        for d, stored_payload in zip(drafts, stored_payloads, strict=True):
            payload_json = canonical_json(
                stored_payload if type(stored_payload) is dict else dict(stored_payload))
            event_id = str(d.event_id)
            hash_ = envelope_hash(
                d.position, event_id, d.stream_id, d.stream_version, d.type, d.schema_version,
                hashed_timestamp(d.occurred_at), recorded_spelled, d.tenant, d.actor,
                d.on_behalf_of, d.correlation_id, d.causation_id, payload_json, prev_hash)
            stored.append(StoredEvent(
                d.position, d.event_id, d.stream_id, d.stream_version, d.type, d.schema_version,
                d.occurred_at, recorded_at, d.tenant, d.actor, d.on_behalf_of, d.correlation_id,
                d.causation_id, d.payload, prev_hash, hash_))
            # ``_COLUMNS`` order.
            rows.append((
                d.position, event_id, d.stream_id, d.stream_version, d.type, d.schema_version,
                to_db_time(d.occurred_at), recorded_db, d.tenant, d.actor, d.on_behalf_of,
                d.correlation_id, d.causation_id, payload_json, prev_hash, hash_))
            prev_hash = hash_
        db.executemany(_INSERT_EVENT, rows)
        return stored

    def _head(self, db: DriverConnection) -> tuple[int, str, datetime]:
        """The last position and hash, and the time to record new events at: never earlier than
        the last event's, even if the wall clock went backwards."""
        head = db.execute(_SELECT_HEAD).fetchone()
        if head is None:
            return 0, GENESIS_HASH, utcnow()
        position, hash_, recorded_at = head
        return position, hash_, max(utcnow(), self.dialect.from_db_time(recorded_at))

    def _raise_if_already_created(self, appends: Sequence[StreamAppend]) -> None:
        """After a failed append: raise the ConcurrencyError of a creation whose stream exists."""
        created = sorted({a.stream_id for a in appends if a.expected_version == 0})
        if not created:
            return
        with _translated_errors(), self.engine.connect() as conn:
            versions = _stream_versions(DriverConnection(conn, self.dialect), created)
        for stream_id, version in versions.items():
            raise ConcurrencyError(stream_id, 0, version) from None

    # -- reading ---------------------------------------------------------------------------

    def read_stream(
        self,
        stream_id: str,
        *,
        after_version: int = 0,
        up_to_position: int | None = None,
        decoded: bool = True,
    ) -> list[StoredEvent]:
        """The stream's events in order; ``decoded=False``: payloads as stored (see
        ``eventstore._codec``)."""
        sql = f"{_SELECT_EVENTS} WHERE stream_id = ? AND stream_version > ?"
        params: list[Any] = [stream_id, after_version]
        if up_to_position is not None:
            sql += " AND position <= ?"
            params.append(up_to_position)
        return self._fetch(f"{sql} ORDER BY stream_version", params, decoded=decoded)

    def read_all(
        self,
        after_position: int = 0,
        *,
        limit: int | None = 1000,
        tenant: str | None = None,
        up_to_position: int | None = None,
        types: Sequence[str] | None = None,
        connection: Connection | None = None,
        decoded: bool = True,
    ) -> list[StoredEvent]:
        """Events after ``after_position`` in log order; pass ``connection`` to read inside a
        caller's transaction (projectors do, so the events and their checkpoint agree).

        Payloads come decoded by the store's codec; ``decoded=False`` gives them as stored
        (ciphertext: what the Kafka relay publishes, see ``eventstore._codec``)."""
        conditions, params = ["position > ?"], [after_position]
        if tenant is not None:
            conditions.append("tenant = ?")
            params.append(tenant)
        if up_to_position is not None:
            conditions.append("position <= ?")
            params.append(up_to_position)
        if types is not None:
            types = list(types)
            if not types:
                return []
            conditions.append(f"type IN {in_list(len(types))}")
            params.extend(types)
        sql = f"{_SELECT_EVENTS} WHERE {' AND '.join(conditions)} ORDER BY position"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return self._fetch(sql, params, connection, decoded=decoded)

    def iter_all(self, after_position: int = 0, *, page_size: int = 5000,
                 up_to_position: int | None = None) -> Iterator[StoredEvent]:
        """Every event after ``after_position``, in order, fetched a page at a time."""
        while True:
            page = self.read_all(after_position, limit=page_size, up_to_position=up_to_position)
            yield from page
            if len(page) < page_size:
                return
            after_position = page[-1].position

    def head_position(self, conn: Connection | None = None) -> int:
        query = select(func.coalesce(func.max(events.c.position), 0))
        if conn is not None:
            return int(conn.execute(query).scalar_one())
        with _translated_errors(), self.engine.connect() as own:
            return int(own.execute(query).scalar_one())

    def position_at(self, moment: datetime) -> int:
        """The last position recorded at or before ``moment`` (0 if the log was empty then)."""
        with _translated_errors(), self.engine.connect() as conn:
            return int(conn.execute(
                select(func.coalesce(func.max(events.c.position), 0))
                .where(events.c.recorded_at <= moment)
            ).scalar_one())

    def stream_version(self, stream_id: str) -> int:
        with _translated_errors(), self.engine.connect() as conn:
            versions = _stream_versions(DriverConnection(conn, self.dialect), [stream_id])
        return versions.get(stream_id, 0)

    def decode(self, events: Sequence[StoredEvent], *,
               connection: Connection | None = None) -> list[StoredEvent]:
        """Stored-form events read elsewhere (e.g. from Kafka) as ``read_all`` returns them."""
        if self.codec is None or not events:
            return list(events)
        if connection is not None:
            return self.codec.decode(connection, events)
        with _translated_errors(), self.engine.connect() as conn:
            return self.codec.decode(conn, events)

    def _fetch(self, sql: str, params: Sequence[Any], connection: Connection | None = None,
               *, decoded: bool = True) -> list[StoredEvent]:
        codec = self.codec if decoded else None
        if connection is not None:
            rows = DriverConnection(connection, self.dialect).execute(sql, params).fetchall()
            events = [self._from_row(row) for row in rows]
            return codec.decode(connection, events) if codec and events else events
        with _translated_errors(), self.engine.connect() as conn:
            rows = DriverConnection(conn, self.dialect).execute(sql, params).fetchall()
            events = [self._from_row(row) for row in rows]
            return codec.decode(conn, events) if codec and events else events

    def _from_row(self, row: Sequence[Any]) -> StoredEvent:
        """A row of ``_COLUMNS``, as the driver returns it, as the current schema's event."""
        (position, event_id, stream_id, stream_version, type_, schema_version, occurred_at,
         recorded_at, tenant, actor, on_behalf_of, correlation_id, causation_id, payload,
         prev_hash, hash_) = row
        from_db_time = self.dialect.from_db_time
        return self.upcasters.upcast(StoredEvent(
            position=position,
            event_id=uuid.UUID(event_id),
            stream_id=stream_id,
            stream_version=stream_version,
            type=type_,
            schema_version=schema_version,
            occurred_at=from_db_time(occurred_at),
            recorded_at=from_db_time(recorded_at),
            tenant=tenant,
            actor=actor,
            on_behalf_of=on_behalf_of,
            correlation_id=correlation_id,
            causation_id=causation_id,
            payload=parse_json(payload),
            prev_hash=prev_hash,
            hash=hash_,
        ))

    # -- integrity -------------------------------------------------------------------------

    def verify(
        self,
        *,
        page_size: int = 10_000,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> VerificationReport:
        """Recompute the hash chain from the first event; report the first event that breaks it."""
        head = self.head_position()
        expected_position, prev_hash, checked = 1, GENESIS_HASH, 0
        after = 0
        with collection_paused(), _translated_errors(), self.engine.connect() as conn:
            db = DriverConnection(conn, self.dialect)
            while True:
                rows = [self._as_stored(values)
                        for values in db.execute(_SELECT_PAGE, (after, page_size)).fetchall()]
                for row in rows:
                    problem = _chain_problem(row, expected_position, prev_hash)
                    if problem:
                        brk = ChainBreak(row["position"], row["event_id"], problem)
                        return VerificationReport(checked, head, brk)
                    checked += 1
                    expected_position, prev_hash = row["position"] + 1, row["hash"]
                if on_progress:
                    on_progress(checked, head)
                if len(rows) < page_size:
                    break
                after = rows[-1]["position"]
        return VerificationReport(checked, head, None)

    def _as_stored(self, values: Sequence[Any]) -> dict[str, Any]:
        """A row exactly as stored (payload text, no upcasting), timestamps as datetimes."""
        row = dict(zip(_COLUMNS, values, strict=True))
        row["occurred_at"] = self.dialect.from_db_time(row["occurred_at"])
        row["recorded_at"] = self.dialect.from_db_time(row["recorded_at"])
        return row


@contextmanager
def schema_setup(engine: Engine) -> Iterator[Connection]:
    """A transaction holding the schema-setup lock, for what opening a database creates or
    upgrades (tables, triggers, read models built at another revision, a Kafka consumer's
    offsets and claims).

    It waits for another process's setup as long as that takes, up to
    ``SCHEMA_SETUP_PATIENCE_SECONDS``: the read-model rebuild after an upgrade runs for minutes
    at 10^6 events. PostgreSQL's advisory lock waits without a timeout; SQLite's write lock is
    asked for again each time the busy timeout runs out, with a warning, so a process started
    beside the one upgrading waits for it instead of failing with "database is locked"."""
    dialect = dialect_named(engine.dialect.name)
    deadline = time.monotonic() + SCHEMA_SETUP_PATIENCE_SECONDS
    warned = False
    while True:
        with engine.connect() as conn:
            if dialect.name == "sqlite":
                conn.execution_options(sqlite_begin="IMMEDIATE")
            transaction = _begin_setup(conn, dialect, deadline)
            if transaction is None:
                if not warned:
                    logger.warning("waiting for another process holding the database's write "
                                   "lock (setting it up, or rebuilding read models after an "
                                   "upgrade)")
                    warned = True
                continue
            with transaction:
                dialect.lock_for_schema_setup(conn)
                yield conn
            return


def _begin_setup(conn: Connection, dialect: Dialect, deadline: float) -> RootTransaction | None:
    """``conn.begin()``, or None if SQLite's write lock stayed busy for a whole attempt before
    ``deadline`` (try again)."""
    if dialect.name != "sqlite":
        return conn.begin()
    driver = conn.connection.dbapi_connection
    assert driver is not None
    attempt = min(_dialects.SQLITE_BUSY_TIMEOUT_MS, SCHEMA_SETUP_ATTEMPT_MS)
    driver.execute(f"PRAGMA busy_timeout={attempt}")
    try:
        return conn.begin()
    except sa_exc.OperationalError as error:
        busy = getattr(error.orig, "sqlite_errorname", None) == "SQLITE_BUSY"
        if not busy or time.monotonic() >= deadline:
            raise
        return None
    finally:
        driver.execute(f"PRAGMA busy_timeout={_dialects.SQLITE_BUSY_TIMEOUT_MS}")


def _stream_versions(db: DriverConnection, stream_ids: Sequence[str]) -> dict[str, int]:
    """The current version of each of ``stream_ids`` that exists."""
    return dict(db.fetch_in_chunks(_SELECT_STREAM_VERSIONS, stream_ids))


def _chain_problem(row: Mapping[str, Any], expected_position: int, prev_hash: str) -> str | None:
    if row["position"] != expected_position:
        return (f"position {expected_position} is missing "
                f"(next stored position is {row['position']})")
    if row["prev_hash"] != prev_hash:
        return "prev_hash does not match the hash of the event before it"
    fields = {k: row[k] for k in _HASHED_FIELDS}
    if event_hash(payload_json=row["payload"], **fields) != row["hash"]:
        return "stored hash does not match the event's contents"
    return None


_HASHED_FIELDS = (
    "position", "event_id", "stream_id", "stream_version", "type", "schema_version",
    "occurred_at", "recorded_at", "tenant", "actor", "on_behalf_of", "correlation_id",
    "causation_id", "prev_hash",
)
