"""Kafka distribution: the relay that publishes the log, and the consumer side that reads it back.

Kafka has no conditional append, so the SQL ``events`` table stays the source of truth and the
outbox. The ``Relay`` tails it by position and publishes every event, *in its stored form*
(payloads as the codec sealed them), keyed by ``stream_id`` so one stream lands on one partition,
in order. It records the last position the broker acknowledged in the database, after the ack:
a crash between the two republishes a batch, which consumers skip.

A record's value is the canonical JSON of the whole stored envelope, hash and payload text
included, so a consumer can recompute the event's hash: a record altered anywhere between the
database and the consumer is refused (``CorruptRecord``), and verifying needs no keys.

Consumers (``KafkaConsumerLoop``) assign partitions manually, store each partition's next offset
in their own database transaction together with what the batch wrote, and skip every event whose
``(stream_id, stream_version)`` they have already applied. Several of them, on different
partitions, build the state one would.

A broker can lose its log (an in-memory broker restarted, a disaster). Every record carries the
id of the topic it was published to, and each consumer checks, before it trusts its stored
offset again, that the record just before it is the event it last applied. A consumer that
finds the log replaced reads its partitions from the beginning, skipping what it has already
applied, so ``Relay(from_position=N)`` can re-seed an empty broker from the SQL log and every
consumer converges. Never ``end_offsets()`` as a completeness check: some brokers (Tansu)
report a batch's base offset + 1 for it; compare positions (``applied_through``).

Each consumer has a *generation* (``kafka_consumers``). Whoever drops a consumer's state (a
rebuild of its read models: ``reset_consumers``) bumps it in the same transaction; every batch
checks it in the transaction that commits the batch, so a running consumer never writes on top
of a reset: it drops the batch and starts again from its stored marks (the beginning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
)

from eventstore._driver import DriverConnection, in_list, select_sql, upsert_sql
from eventstore._envelope import StoredEvent, canonical_json, event_hash
from eventstore._errors import EventStoreError, TransientConflict
from eventstore._schema import UTCDateTime
from eventstore._store import _COLUMNS, EventStore, _translated_errors, schema_setup

logger = logging.getLogger("memwarden.kafka")

DEFAULT_TOPIC = "memwarden.events"
DEFAULT_PARTITIONS = 6
TOPIC_ID_HEADER = "memwarden-topic-id"
"""Header naming the topic incarnation a record was published to (the broker's topic id)."""


class KafkaDistributionError(EventStoreError):
    """The broker refused or lost what the relay or a consumer needs (misconfiguration, not a
    passing outage: outages are retried)."""


class CorruptRecord(KafkaDistributionError):
    """A Kafka record is not a MemWarden event, or its hash does not match its contents."""


class ReadModelsBehind(KafkaDistributionError):
    """The Kafka consumers have not applied the log up to a position in the time allowed (the
    relay or the projectors are stopped or slow), or no consumer maintains a read model."""


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """Where and how the log is distributed."""

    bootstrap: str
    topic: str = DEFAULT_TOPIC
    partitions: int = DEFAULT_PARTITIONS
    batch_size: int = 1000
    client_id: str = "memwarden"
    request_timeout_ms: int = 10_000

    def __post_init__(self) -> None:
        if not self.bootstrap:
            raise ValueError("Kafka bootstrap servers must be given, e.g. localhost:9092")
        if self.partitions < 1 or self.batch_size < 1:
            raise ValueError("partitions and batch size must be positive")


# -- records ---------------------------------------------------------------------------------


def record_value(row: Mapping[str, Any]) -> bytes:
    """The Kafka record of one stored row (``payload`` as its stored JSON text)."""
    envelope = {name: row[name] for name in _COLUMNS}
    envelope["event_id"] = str(envelope["event_id"])
    for name in ("occurred_at", "recorded_at"):
        envelope[name] = envelope[name].isoformat(timespec="microseconds")
    return canonical_json(envelope).encode()


def event_from_record(value: bytes) -> StoredEvent:
    """The stored-form event of a record, after checking its hash."""
    try:
        data = json.loads(value)
        fields = {name: data[name] for name in _COLUMNS}
        fields["occurred_at"] = datetime.fromisoformat(fields["occurred_at"])
        fields["recorded_at"] = datetime.fromisoformat(fields["recorded_at"])
        payload_json = fields.pop("payload")
        expected = fields.pop("hash")
        actual = event_hash(payload_json=payload_json, **fields)
        payload = json.loads(payload_json)
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptRecord(f"not a MemWarden event record: {error}") from None
    if actual != expected:
        raise CorruptRecord(f"event at position {fields['position']} does not match its hash")
    fields["event_id"] = uuid.UUID(fields["event_id"])
    return StoredEvent(**fields, payload=payload, hash=expected)


# -- database tables of the relay and of the consumers ---------------------------------------

metadata = MetaData()

relay_checkpoints = Table(
    "kafka_relay",
    metadata,
    Column("topic", String(249), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)
"""The last position the broker acknowledged, per topic."""

consumer_offsets = Table(
    "kafka_offsets",
    metadata,
    Column("consumer", String(100), nullable=False),
    Column("topic", String(249), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("last_event_id", String(36)),
    Column("topic_id", String(36)),
    PrimaryKeyConstraint("consumer", "topic", "partition"),
)
"""Each consumer's next offset per partition, and the record before it (to recognise the log)."""

consumer_applied = Table(
    "kafka_applied",
    metadata,
    Column("consumer", String(100), nullable=False),
    Column("stream_id", String(200), nullable=False),
    Column("stream_version", Integer, nullable=False),
    Column("position", BigInteger, nullable=False),
    PrimaryKeyConstraint("consumer", "stream_id"),
)
"""The last version of each stream a consumer applied: anything at or below it is a duplicate."""

consumer_generations = Table(
    "kafka_consumers",
    metadata,
    Column("consumer", String(100), primary_key=True),
    Column("generation", BigInteger, nullable=False),
)
"""Bumped whenever a consumer's state is dropped: its running processes start again."""

_SELECT_ROWS = f"{select_sql('events', _COLUMNS)} WHERE position > ? ORDER BY position LIMIT ?"
_SELECT_RELAYED = "SELECT position FROM kafka_relay WHERE topic = ?"
_UPSERT_RELAYED = upsert_sql("kafka_relay", ("topic", "position", "updated_at"), key=("topic",))
_SELECT_OFFSETS = ("SELECT partition, next_offset, last_event_id, topic_id FROM kafka_offsets "
                   "WHERE consumer = ? AND topic = ?")
_UPSERT_OFFSET = upsert_sql(
    "kafka_offsets",
    ("consumer", "topic", "partition", "next_offset", "last_event_id", "topic_id"),
    key=("consumer", "topic", "partition"))
_SELECT_APPLIED = ("SELECT stream_id, stream_version FROM kafka_applied "
                   "WHERE consumer = ? AND stream_id IN {keys}")
_UPSERT_APPLIED = upsert_sql("kafka_applied",
                             ("consumer", "stream_id", "stream_version", "position"),
                             key=("consumer", "stream_id"))
_ENSURE_CONSUMER = ("INSERT INTO kafka_consumers (consumer, generation) VALUES (?, 0) "
                    "ON CONFLICT (consumer) DO NOTHING")
_SELECT_GENERATION = "SELECT generation FROM kafka_consumers WHERE consumer = ?"
# The first event after ``after`` (up to a position) that a consumer has not applied: its
# applied version of that stream is below the event's, or it has none.
_FIRST_UNAPPLIED = (
    "SELECT min(e.position) FROM events e LEFT JOIN kafka_applied a "
    "ON a.consumer = ? AND a.stream_id = e.stream_id "
    "WHERE e.position > ? AND e.position <= ? "
    "AND (a.stream_version IS NULL OR e.stream_version > a.stream_version)")


def reset_consumers(conn: Connection, consumers: Sequence[str]) -> None:
    """Inside the caller's transaction: forget what ``consumers`` applied and where they stand
    (they read their partitions from the beginning again) and bump their generations, so that
    their running processes drop the batch in flight and start over."""
    if not consumers:
        return
    db = DriverConnection(conn)
    keys = in_list(len(consumers))
    # First: on PostgreSQL this waits for the batches in flight (they hold the row FOR SHARE)
    # and holds off the next ones until the caller commits, so whatever the caller deletes next
    # includes every committed batch. Call it before emptying the consumers' read models.
    db.executemany(_ENSURE_CONSUMER, [(name,) for name in consumers])
    db.execute(f"UPDATE kafka_consumers SET generation = generation + 1 WHERE consumer IN {keys}",
               list(consumers))
    for table in ("kafka_offsets", "kafka_applied"):
        db.execute(f"DELETE FROM {table} WHERE consumer IN {keys}", list(consumers))


def applied_through(conn: Connection, consumer: str, after: int, up_to: int) -> int:
    """The highest position ``p <= up_to`` such that ``consumer`` has applied every event of the
    log up to ``p``, given that it had applied everything up to ``after``. A consumer applies
    each stream in order and records the last version it applied, so this compares the SQL log
    with those versions (never broker offsets: see the module docstring)."""
    if after >= up_to:
        return after
    first = DriverConnection(conn).execute(_FIRST_UNAPPLIED, (consumer, after, up_to)).fetchone()
    return up_to if first is None or first[0] is None else int(first[0]) - 1


def create_kafka_schema(engine: Engine) -> None:
    # Processes start together, and one may be rebuilding read models after an upgrade.
    with _translated_errors(), schema_setup(engine) as conn:
        metadata.create_all(conn)


# -- the broker ------------------------------------------------------------------------------


def _kafka() -> Any:
    """kafka-python, imported on first use: the embedded mode never needs it. Its protocol
    schemas load through ``importlib.resources.read_text``, deprecated since Python 3.11; that
    warning is kafka-python's, not a problem of ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".* is deprecated\. Use files\(\) instead",
                                DeprecationWarning)
        import kafka
        import kafka.admin
        import kafka.errors
        import kafka.net.inet
    _close_sockets_of_failed_connections(kafka.net.inet.KafkaNetSocket)
    return kafka


def _close_sockets_of_failed_connections(socket_class: Any) -> None:
    """kafka-python 3.0 does not close the socket of a connection attempt that fails (a broker
    that is down): the relay and consumers retry for as long as an outage lasts, and each
    attempt would hold a file descriptor until the garbage collector finds it. Close it."""
    original = socket_class.sock_connect
    if getattr(original, "closes_on_failure", False):
        return

    async def sock_connect(self: Any, net: Any, sock: Any, sockaddr: Any,
                           timeout_at: float | None = None) -> Any:
        try:
            return await original(self, net, sock, sockaddr, timeout_at=timeout_at)
        except BaseException:
            sock.close()
            raise

    sock_connect.closes_on_failure = True  # type: ignore[attr-defined]
    socket_class.sock_connect = sock_connect


def ensure_topic(settings: KafkaSettings) -> str:
    """Create the topic (infinite retention) if missing; return its id, the incarnation its
    records are stamped with. An existing topic keeps its partition count: changing it would
    move streams to other partitions and break their order."""
    kafka = _kafka()
    admin = kafka.KafkaAdminClient(bootstrap_servers=settings.bootstrap,
                             client_id=f"{settings.client_id}-admin",
                             request_timeout_ms=settings.request_timeout_ms)
    try:
        described = _describe(admin, settings.topic)
        if described is None:
            try:
                admin.create_topics([kafka.admin.NewTopic(
                    settings.topic, settings.partitions, 1, topic_configs=_INFINITE_RETENTION)])
                logger.info("created topic %s with %d partitions and infinite retention",
                            settings.topic, settings.partitions)
            except kafka.errors.TopicAlreadyExistsError:
                pass
            described = _describe(admin, settings.topic)
        if described is None or described["topic_id"] is None:
            raise KafkaDistributionError(f"topic {settings.topic!r} has no topic id after "
                                         "creation (the broker must support topic ids)")
        if len(described["partitions"]) != settings.partitions:
            logger.warning("topic %s has %d partitions, not the %d configured; keeping them",
                           settings.topic, len(described["partitions"]), settings.partitions)
        return str(described["topic_id"])
    finally:
        admin.close()


_INFINITE_RETENTION = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}


def _describe(admin: Any, topic: str) -> dict[str, Any] | None:
    try:
        found = admin.describe_topics([topic])
    except _kafka().errors.UnknownTopicOrPartitionError:
        return None
    for described in found:
        if described["name"] == topic and described["error_code"] == 0:
            return dict(described)
    return None


# -- the relay -------------------------------------------------------------------------------


def stored_rows(store: EventStore, after: int, limit: int) -> list[dict[str, Any]]:
    """Rows of the log after ``after``, exactly as stored (payload text as sealed, never
    upcast: the hash covers these bytes), timestamps as datetimes."""
    with _translated_errors(), store.engine.connect() as conn:
        values = DriverConnection(conn, store.dialect).execute(
            _SELECT_ROWS, (after, limit)).fetchall()
    rows = []
    for value in values:
        row = dict(zip(_COLUMNS, value, strict=True))
        row["occurred_at"] = store.dialect.from_db_time(row["occurred_at"])
        row["recorded_at"] = store.dialect.from_db_time(row["recorded_at"])
        rows.append(row)
    return rows



@dataclass(frozen=True, slots=True)
class RelayProgress:
    position: int
    """The last position the broker acknowledged."""
    head: int
    published: int
    """Events published by this relay since it started."""


class Relay:
    """Publishes the log to Kafka, resuming from the position recorded after each ack."""

    def __init__(self, store: EventStore, settings: KafkaSettings, *,
                 backoff: tuple[float, float] = (0.5, 30.0), poll_interval: float = 0.02) -> None:
        self.store = store
        self.settings = settings
        self.backoff = backoff
        self.poll_interval = poll_interval
        self.published = 0
        self._producer: Any = None
        self._topic_id: str | None = None
        create_kafka_schema(store.engine)

    def position(self) -> int:
        """The last position the broker acknowledged (0: nothing published yet)."""
        with _translated_errors(), self.store.engine.connect() as conn:
            row = DriverConnection(conn, self.store.dialect).execute(
                _SELECT_RELAYED, (self.settings.topic,)).fetchone()
        return int(row[0]) if row else 0

    def reset(self, position: int) -> None:
        """Publish again everything after ``position`` (re-seed an empty or new broker)."""
        if position < 0:
            raise ValueError("a position is 0 or more")
        self._record(position)

    def publish_available(self) -> int:
        """Publish every event not yet acknowledged, a batch at a time; return how many.
        Raises the broker's error on a failure (nothing after the last ack is recorded)."""
        total = 0
        while True:
            count = self._publish_batch()
            total += count
            if count < self.settings.batch_size:
                return total

    def run(self, stop: threading.Event, *,
            on_progress: Callable[[RelayProgress], None] | None = None) -> None:
        """Publish until ``stop`` is set; while the broker is down, retry with backoff and
        resume from the last acknowledged position.

        On PostgreSQL one relay per topic publishes at a time: a second one (another process,
        another machine) waits as a standby and takes over when the first stops."""
        with self._exclusive(stop) as holding:
            if holding:
                self._publish_until(stop, on_progress)

    @contextmanager
    def _exclusive(self, stop: threading.Event) -> Iterator[bool]:
        """Holds the topic's relay lock (PostgreSQL advisory lock) while the block runs;
        yields False if ``stop`` was set before it could be taken."""
        if self.store.dialect.name != "postgresql":
            yield True
            return
        key = int.from_bytes(hashlib.sha256(f"relay:{self.settings.topic}".encode())
                             .digest()[:8], "big", signed=True)
        with self.store.engine.connect() as conn:
            announced = False
            while not conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({key})").scalar_one():
                if not announced:
                    logger.info("relay: another relay publishes %s; standing by",
                                self.settings.topic)
                    announced = True
                conn.commit()
                if stop.wait(1.0):
                    yield False
                    return
            conn.commit()
            try:
                yield True
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({key})")
                conn.commit()

    def _publish_until(self, stop: threading.Event,
                       on_progress: Callable[[RelayProgress], None] | None) -> None:
        delay = self.backoff[0]
        try:
            while not stop.is_set():
                try:
                    count = self.publish_available()
                except Exception as error:
                    if isinstance(error, CorruptRecord | KafkaDistributionError):
                        raise
                    logger.warning("relay: broker unavailable (%s); retrying in %.1fs",
                                   error, delay)
                    self._drop_producer()
                    stop.wait(delay)
                    delay = min(delay * 2, self.backoff[1])
                    continue
                delay = self.backoff[0]
                if count == 0:  # idle: one query per poll (a progress report would add two)
                    stop.wait(self.poll_interval)
                elif on_progress is not None:
                    on_progress(RelayProgress(self.position(), self.store.head_position(),
                                              self.published))
        finally:
            self.close()

    def close(self) -> None:
        self._drop_producer()

    def _publish_batch(self) -> int:
        after = self.position()
        rows = self._stored_rows(after, self.settings.batch_size)
        if not rows:
            return 0
        producer = self._connected_producer()
        headers = [(TOPIC_ID_HEADER, (self._topic_id or "").encode())]
        futures = [producer.send(self.settings.topic, key=row["stream_id"].encode(),
                                 value=record_value(row), headers=headers) for row in rows]
        producer.flush(timeout=self.settings.request_timeout_ms / 1000 * 3)
        for future in futures:
            # Raises the first failure: nothing of this batch is recorded, all of it is sent
            # again (the idempotent producer kept it in order; consumers skip the copies).
            future.get(timeout=self.settings.request_timeout_ms / 1000)
        self._record(rows[-1]["position"])
        self.published += len(rows)
        return len(rows)

    def _stored_rows(self, after: int, limit: int) -> list[dict[str, Any]]:
        return stored_rows(self.store, after, limit)

    def _record(self, position: int) -> None:
        from eventstore._envelope import utcnow

        with _translated_errors(), self.store.engine.begin() as conn:
            db = DriverConnection(conn, self.store.dialect)
            db.execute(_UPSERT_RELAYED, (self.settings.topic, position,
                                         self.store.dialect.to_db_time(utcnow())))

    def _connected_producer(self) -> Any:
        if self._producer is None:
            self._topic_id = ensure_topic(self.settings)
            self._producer = _kafka().KafkaProducer(
                bootstrap_servers=self.settings.bootstrap,
                client_id=f"{self.settings.client_id}-relay",
                acks="all",
                enable_idempotence=True,
                # Never create the topic implicitly: it would get the broker's default partition
                # count and retention instead of ours.
                allow_auto_create_topics=False,
                linger_ms=5,
                batch_size=512 * 1024,
                max_request_size=16 * 1024 * 1024,
                request_timeout_ms=self.settings.request_timeout_ms,
                delivery_timeout_ms=self.settings.request_timeout_ms * 2,
                max_block_ms=self.settings.request_timeout_ms,
                reconnect_backoff_max_ms=1000,
            )
        return self._producer

    def _drop_producer(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                producer.close(timeout=1)
            except Exception:  # closing a producer whose broker is gone may fail; it is gone
                logger.debug("relay: closing the producer failed", exc_info=True)


# -- the consumer side -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionMark:
    """Where a consumer stands in one partition: the next offset to read, and the record before
    it (its event id and topic incarnation), by which a replaced log is recognised."""

    next_offset: int = 0
    last_event_id: str | None = None
    topic_id: str | None = None


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    partition: int
    offset: int
    topic_id: str | None
    event: StoredEvent
    """In stored form (payload as sealed), hash checked."""


@dataclass
class _PartitionState:
    mark: PartitionMark
    verifying_since: float | None = None
    last_activity: float = field(default_factory=time.monotonic)


class KafkaEventSource:
    """The records of the assigned partitions, from each one's stored mark, in order.

    Before it trusts a stored offset again (at start, and after a partition was idle for
    ``verify_after`` seconds) it reads the record just before it: a different event there, or
    none on a reachable broker, means the log was replaced, and the partition is read from the
    beginning. A record stamped with another topic incarnation than the last one means the same.
    """

    def __init__(self, settings: KafkaSettings, marks: Mapping[int, PartitionMark], *,
                 partitions: Sequence[int] | None = None, verify_after: float = 5.0,
                 verify_timeout: float = 2.0) -> None:
        self.settings = settings
        self.verify_after = verify_after
        self.verify_timeout = verify_timeout
        self._stored = dict(marks)
        self._wanted = None if partitions is None else sorted(set(partitions))
        self._consumer: Any = None
        self._states: dict[int, _PartitionState] = {}
        self._discovered_at = 0.0
        self.replacements = 0
        """How many times a replaced log was recognised (each a read from the beginning)."""

    @property
    def partitions(self) -> list[int]:
        return sorted(self._states)

    @property
    def verifying(self) -> bool:
        """Whether a partition's stored offset is still being checked against the log."""
        return any(state.verifying_since is not None for state in self._states.values())

    @property
    def wanted(self) -> list[int] | None:
        """The partitions asked for (None: all of the topic's)."""
        return self._wanted

    def mark(self, partition: int) -> PartitionMark:
        return self._states[partition].mark

    def poll(self, timeout: float) -> list[KafkaRecord]:
        """The next records (possibly none), in offset order within each partition."""
        consumer = self._connected()
        if consumer is None:
            time.sleep(min(timeout, 0.5))
            return []
        self._discover_partitions(consumer)
        self._start_idle_checks()
        TopicPartition = _kafka().TopicPartition
        batches = consumer.poll(timeout_ms=int(timeout * 1000),
                                max_records=self.settings.batch_size)
        accepted: list[KafkaRecord] = []
        for tp, messages in sorted(batches.items(), key=lambda item: item[0].partition):
            state = self._states.get(tp.partition)
            if state is None:
                continue
            state.last_activity = time.monotonic()
            for message in messages:
                record = _record_of(tp.partition, message)
                replaced = _sign_of_replacement(state, record)
                if replaced is not None:
                    self._replaced(consumer, TopicPartition(self.settings.topic, tp.partition),
                                   state, replaced)
                    break
                if state.verifying_since is not None:
                    state.verifying_since = None  # the log is the one we read
                    continue
                state.mark = PartitionMark(record.offset + 1, str(record.event.event_id),
                                           record.topic_id)
                accepted.append(record)
        self._finish_overdue_checks(consumer)
        return accepted

    def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            consumer.close(autocommit=False)

    def _connected(self) -> Any:
        if self._consumer is not None:
            return self._consumer
        kafka = _kafka()
        consumer = kafka.KafkaConsumer(
            bootstrap_servers=self.settings.bootstrap,
            client_id=f"{self.settings.client_id}-consumer",
            group_id=None,  # offsets live in the consumer's database, not in the broker
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            allow_auto_create_topics=False,
            max_poll_records=self.settings.batch_size,
            fetch_max_wait_ms=100,
            metadata_max_age_ms=5000,
            request_timeout_ms=self.settings.request_timeout_ms + 1000,
            reconnect_backoff_max_ms=1000,
        )
        available = consumer.partitions_for_topic(self.settings.topic)
        if not available:
            consumer.close(autocommit=False)
            logger.info("consumer: topic %s does not exist yet; waiting for the relay",
                        self.settings.topic)
            return None
        chosen = sorted(available) if self._wanted is None else self._wanted
        missing = set(chosen) - set(available)
        if missing:
            consumer.close(autocommit=False)
            raise KafkaDistributionError(f"topic {self.settings.topic!r} has no partitions "
                                         f"{sorted(missing)} (it has {len(available)})")
        self._assign(consumer, chosen)
        self._consumer = consumer
        return consumer

    def _assign(self, consumer: Any, partitions: Sequence[int]) -> None:
        tps = [_kafka().TopicPartition(self.settings.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        for tp in tps:
            mark = self._stored.get(tp.partition, PartitionMark())
            state = self._states.get(tp.partition) or _PartitionState(mark)
            self._states[tp.partition] = state
            self._resume(consumer, tp, state)
        self._discovered_at = time.monotonic()

    def _discover_partitions(self, consumer: Any) -> None:
        """Consuming all partitions: take in those the topic gained. A topic recreated on a
        new broker can have more than before (Tansu creates topics it is asked about with its
        default count before the relay can create them with the configured one)."""
        if self._wanted is not None or time.monotonic() - self._discovered_at < 5.0:
            return
        available = consumer.partitions_for_topic(self.settings.topic) or set()
        if set(available) - set(self._states):
            logger.info("consumer: topic %s now has partitions %s", self.settings.topic,
                        sorted(available))
            self._assign(consumer, sorted(set(available) | set(self._states)))
        else:
            self._discovered_at = time.monotonic()

    def _resume(self, consumer: Any, tp: Any, state: _PartitionState) -> None:
        if state.mark.next_offset > 0 and state.mark.last_event_id is not None:
            consumer.seek(tp, state.mark.next_offset - 1)
            state.verifying_since = time.monotonic()
        elif state.mark.next_offset > 0:
            consumer.seek(tp, state.mark.next_offset)
        else:
            consumer.seek_to_beginning(tp)

    def _start_idle_checks(self) -> None:
        TopicPartition = _kafka().TopicPartition
        now = time.monotonic()
        for partition, state in self._states.items():
            if (state.verifying_since is None and state.mark.last_event_id is not None
                    and now - state.last_activity >= self.verify_after):
                state.last_activity = now
                self._resume(self._consumer, TopicPartition(self.settings.topic, partition), state)

    def _finish_overdue_checks(self, consumer: Any) -> None:
        """A check whose record did not come: replaced if the broker answers, else retried."""
        TopicPartition = _kafka().TopicPartition
        now = time.monotonic()
        overdue = [partition for partition, state in self._states.items()
                   if state.verifying_since is not None
                   and now - state.verifying_since > self.verify_timeout]
        if not overdue:
            return
        tps = [TopicPartition(self.settings.topic, p) for p in overdue]
        try:
            consumer.beginning_offsets(tps, timeout_ms=1000)
        except Exception:  # the broker is down: check again once it is back
            for partition in overdue:
                self._states[partition].verifying_since = now
            return
        for tp in tps:
            self._replaced(consumer, tp, self._states[tp.partition],
                           f"offset {self._states[tp.partition].mark.next_offset - 1} is gone")

    def _replaced(self, consumer: Any, tp: Any, state: _PartitionState, why: str) -> None:
        logger.warning("consumer: partition %d of %s was replaced (%s); reading it from the "
                       "beginning and skipping what was applied", tp.partition, tp.topic, why)
        self.replacements += 1
        self._discovered_at = 0.0  # the new log may have other partitions: look again
        state.mark = PartitionMark()
        state.verifying_since = None
        state.last_activity = time.monotonic()
        consumer.seek_to_beginning(tp)


def _sign_of_replacement(state: _PartitionState, record: KafkaRecord) -> str | None:
    """Why ``record`` shows that the partition's log is not the one read up to its mark, or
    None. The incarnation is checked first, on the record a check reads too: a new log can hold
    the very event applied last at the very offset it was read from (a re-seed with another
    partition count, say) while the records before it differ."""
    mark = state.mark
    if (mark.topic_id is not None and record.topic_id is not None
            and record.topic_id != mark.topic_id):
        return f"records now come from topic incarnation {record.topic_id}, not {mark.topic_id}"
    if state.verifying_since is not None and (record.offset != mark.next_offset - 1
                                              or str(record.event.event_id) != mark.last_event_id):
        return f"offset {mark.next_offset - 1} holds another event than the one applied there"
    return None


def _record_of(partition: int, message: Any) -> KafkaRecord:
    topic_id = next((value.decode() for key, value in (message.headers or [])
                     if key == TOPIC_ID_HEADER and value), None)
    return KafkaRecord(partition, message.offset, topic_id, event_from_record(message.value))


_CONFLICT_ATTEMPTS = 5
"""How many times a consumer commits a batch the database keeps aborting before giving up."""


class _GenerationChanged(Exception):
    """The consumer's state was reset since it last read its generation: drop the batch."""


Apply = Callable[[Connection, list[StoredEvent]], None]
"""Applies decoded events (each stream in order, streams interleaved) inside the transaction."""
Decode = Callable[[Connection, list[StoredEvent]], list[StoredEvent]]


@dataclass(frozen=True, slots=True)
class StepResult:
    received: int
    applied: int
    duplicates: int
    gaps: int
    """Events whose stream misses versions before them: not applied (re-seed the broker)."""


class KafkaConsumerLoop:
    """Applies Kafka records to a database: offsets, skipped duplicates and the batch's writes
    commit in one transaction, so a crash at any point applies each event exactly once."""

    def __init__(self, name: str, settings: KafkaSettings, target: Engine, apply: Apply,
                 decode: Decode, *, partitions: Sequence[int] | None = None,
                 verify_after: float = 5.0, verify_timeout: float = 2.0,
                 on_reset: Callable[[], None] | None = None) -> None:
        """``on_reset`` runs when the consumer's state was reset under it (its generation
        changed), before it starts again: the owner of the work re-checks what it maintains."""
        self.name = name
        self.settings = settings
        self.target = target
        self._apply = apply
        self._decode = decode
        self._on_reset = on_reset
        create_kafka_schema(target)
        self.generation = self._current_generation()
        self.source = KafkaEventSource(settings, self._stored_marks(), partitions=partitions,
                                       verify_after=verify_after, verify_timeout=verify_timeout)
        self.totals = StepResult(0, 0, 0, 0)
        self.restarts = 0
        """How many times a reset of this consumer's state made it start over."""
        self.conflicts = 0
        """How many batches the database aborted to break a deadlock, then committed again."""

    def step(self, timeout: float = 1.0) -> StepResult:
        records = self.source.poll(timeout)
        if not records:
            # Idle, nothing commits: look at the generation anyway, or a reset would wait
            # for the next event to be noticed.
            if self._current_generation() != self.generation:
                self._start_over()
            return StepResult(0, 0, 0, 0)
        try:
            result = self._commit(records)
        except _GenerationChanged:
            self._start_over()
            return StepResult(0, 0, 0, 0)
        self.totals = StepResult(*(a + b for a, b in zip(
            (self.totals.received, self.totals.applied, self.totals.duplicates, self.totals.gaps),
            (result.received, result.applied, result.duplicates, result.gaps), strict=True)))
        return result

    def run(self, stop: threading.Event, *, timeout: float = 1.0,
            on_step: Callable[[StepResult], None] | None = None) -> None:
        delay = 0.5
        try:
            while not stop.is_set():
                try:
                    result = self.step(timeout)
                except CorruptRecord:
                    raise
                except EventStoreError:
                    raise
                except Exception as error:  # the broker: retried, the source reconnects
                    logger.warning("consumer %s: %s; retrying in %.1fs", self.name, error, delay)
                    self._reconnect()
                    stop.wait(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                delay = 0.5
                if on_step is not None:
                    on_step(result)
        finally:
            self.close()

    def close(self) -> None:
        self.source.close()

    def marks(self) -> dict[int, PartitionMark]:
        return self._stored_marks()

    def applied_through(self, up_to: int, *, after: int = 0) -> int:
        """The highest position up to ``up_to`` through which this consumer (all its processes,
        on all partitions) has applied the whole log."""
        with _translated_errors(), self.target.connect() as conn:
            return applied_through(conn, self.name, after, up_to)

    def _reconnect(self) -> None:
        """A new source at the stored marks (the in-memory ones may be ahead of a rollback)."""
        self.source.close()
        self.source = KafkaEventSource(
            self.settings, self._stored_marks(), partitions=self.source.wanted,
            verify_after=self.source.verify_after, verify_timeout=self.source.verify_timeout)

    def _start_over(self) -> None:
        logger.warning("consumer %s: its state was reset (a rebuild); reading its partitions "
                       "again from where it now stands", self.name)
        self.restarts += 1
        if self._on_reset is not None:
            self._on_reset()
        self.generation = self._current_generation()
        self._reconnect()

    def _current_generation(self) -> int:
        with _translated_errors(), self.target.begin() as conn:
            db = DriverConnection(conn)
            row = db.execute(_SELECT_GENERATION, (self.name,)).fetchone()
            if row is None:  # a consumer's first start
                db.execute(_ENSURE_CONSUMER, (self.name,))
                row = db.execute(_SELECT_GENERATION, (self.name,)).fetchone()
            return int(row[0])

    def _stored_marks(self) -> dict[int, PartitionMark]:
        with _translated_errors(), self.target.connect() as conn:
            rows = DriverConnection(conn).execute(
                _SELECT_OFFSETS, (self.name, self.settings.topic)).fetchall()
        return {partition: PartitionMark(next_offset, last_event_id, topic_id)
                for partition, next_offset, last_event_id, topic_id in rows}

    def _commit(self, records: list[KafkaRecord]) -> StepResult:
        """Commit the batch, again if the database aborted it to break a deadlock with another
        consumer: those on other partitions update the same rows (a read of memories from
        several partitions counts in each one's ``usage`` row), and PostgreSQL may pick this
        transaction as the victim. Nothing of an aborted attempt was committed."""
        attempt = 1
        while True:
            try:
                return self._commit_once(records)
            except TransientConflict as conflict:
                if attempt == _CONFLICT_ATTEMPTS:
                    raise
                self.conflicts += 1
                attempt += 1
                delay = random.uniform(0.02, 0.1) * attempt  # (jittered: out of step)
                logger.info("consumer %s: %s; committing the batch again in %.2fs (attempt "
                            "%d of %d)", self.name, conflict, delay, attempt, _CONFLICT_ATTEMPTS)
                time.sleep(delay)

    def _commit_once(self, records: list[KafkaRecord]) -> StepResult:
        with _translated_errors(), self.target.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                db = DriverConnection(conn)
                # A reset commits before this reads the generation, or waits for this batch
                # (the row lock on PostgreSQL; SQLite's write lock, taken at BEGIN).
                locking = " FOR SHARE" if conn.dialect.name == "postgresql" else ""
                generation = db.execute(_SELECT_GENERATION + locking, (self.name,)).fetchone()
                if generation is None or int(generation[0]) != self.generation:
                    raise _GenerationChanged
                streams = sorted({r.event.stream_id for r in records})
                applied = self._applied_versions(db, streams)
                fresh: list[StoredEvent] = []
                duplicates = gaps = 0
                for record in records:
                    event = record.event
                    last = applied.get(event.stream_id, 0)
                    if event.stream_version <= last:
                        duplicates += 1
                    elif event.stream_version == last + 1:
                        applied[event.stream_id] = event.stream_version
                        fresh.append(event)
                    else:
                        gaps += 1
                        logger.warning(
                            "consumer %s: %s version %d arrived after version %d; skipped. "
                            "Re-seed the broker: memwarden relay --from-position N, N at most "
                            "the position of that stream's version %d", self.name,
                            event.stream_id, event.stream_version, last, last)
                fresh.sort(key=lambda e: e.position)
                if fresh:
                    self._apply(conn, self._decode(conn, fresh))
                    last_of = {e.stream_id: e for e in fresh}
                    db.executemany(_UPSERT_APPLIED, [
                        (self.name, e.stream_id, e.stream_version, e.position)
                        for e in last_of.values()])
                db.executemany(_UPSERT_OFFSET, [
                    (self.name, self.settings.topic, partition, mark.next_offset,
                     mark.last_event_id, mark.topic_id)
                    for partition, mark in self._marks_of(records).items()])
        return StepResult(len(records), len(fresh), duplicates, gaps)

    def _applied_versions(self, db: DriverConnection, streams: list[str]) -> dict[str, int]:
        applied: dict[str, int] = {}
        for start in range(0, len(streams), 500):
            chunk = streams[start:start + 500]
            applied.update(db.execute(_SELECT_APPLIED.format(keys=in_list(len(chunk))),
                                      [self.name, *chunk]).fetchall())
        return applied

    def _marks_of(self, records: list[KafkaRecord]) -> dict[int, PartitionMark]:
        marks: dict[int, PartitionMark] = {}
        for record in records:
            marks[record.partition] = PartitionMark(record.offset + 1,
                                                    str(record.event.event_id), record.topic_id)
        return marks


__all__ = [
    "DEFAULT_PARTITIONS",
    "DEFAULT_TOPIC",
    "CorruptRecord",
    "KafkaConsumerLoop",
    "KafkaDistributionError",
    "KafkaEventSource",
    "KafkaRecord",
    "KafkaSettings",
    "PartitionMark",
    "ReadModelsBehind",
    "Relay",
    "RelayProgress",
    "StepResult",
    "applied_through",
    "create_kafka_schema",
    "ensure_topic",
    "event_from_record",
    "record_value",
    "reset_consumers",
    "stored_rows",
]
