"""Read models fed from Kafka instead of the SQL log (the distributed mode, DESIGN.md §8).

A ``KafkaProjector`` applies the records of its partitions to any set of projections, in the
database it is given (by default the store's own). It is the ``KafkaConsumerLoop`` with the
projections as its work: offsets, the versions already applied and the rows each batch writes
commit together, so a projector killed at any point resumes applying each event exactly once,
and several projectors on different partitions of one topic build the state one would.

Events arrive each stream in order, streams interleaved differently than in the log: every
projection given to it must depend only on each stream's own order (the default ones do).
Payloads arrive in their stored form and are decoded by the store's codec (the same keys), so
the projections see exactly what ``read_all`` would give them.

**Who maintains what.** Several consumers can feed one database, each a share of the read
models under its own name: ``memwarden project --source kafka --except search`` (the
``projector``) and ``memwarden project --source kafka --name indexer --read-model search`` (the
search indexer), each scaled out over partitions. Two consumers applying the same read model
would apply its events twice, so each read model is *claimed* by one consumer name
(``kafka_read_models``): a consumer refuses to start on a read model another one claims, and a
consumer claiming read models for the first time empties them and reads the topic from the
beginning. A read model that reads another one's rows (``READS``) must be maintained by the
same consumer, or it would read them ahead of their events.

**Upgrades.** A consumer rebuilds its read models when one of them was built at another
``Projection.revision`` than its release's (``projection_revisions``, see ``_runner``): at its
start it then claims them as for the first time (empties them, tables dropped and re-created,
and reads the topic from the beginning) and records the revisions. The database's own runner
(``KafkaFedRunner``) leaves them to the consumers: opening the database logs the read models
awaiting a consumer of this release, and ``wait_until_applied`` refuses them until then.

**Rebuild** (``KafkaFedRunner.rebuild``, ``memwarden projections rebuild``) empties read models,
drops the offsets and applied versions of the consumers that maintain them and releases their
claims, in one transaction; the consumers' running processes notice at their next batch (the
consumer's generation) and read the topic again from offset 0. A broker that lost its log is
another matter: the relay re-seeds it (``memwarden relay --from-position``).

**Freshness** (``KafkaFedRunner.wait_until_applied``): a reader that must see everything
written before it starts (a retention sweep must see every legal hold) waits until the
consumers of its read models have applied the SQL log up to the head, compared by position.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from sqlalchemy import BigInteger, Column, Connection, Engine, MetaData, String, Table

from eventstore import EventStore, StoredEvent
from eventstore._dialects import dialect_named
from eventstore._driver import DriverConnection, in_list, upsert_sql
from eventstore._gc import collection_paused
from eventstore._kafka import (
    KafkaConsumerLoop,
    KafkaDistributionError,
    KafkaSettings,
    PartitionMark,
    ReadModelsBehind,
    StepResult,
    applied_through,
    reset_consumers,
)
from eventstore._kafka import metadata as kafka_metadata
from eventstore._store import _translated_errors, schema_setup
from projections._readmodels import Projection, default_projections
from projections._runner import (
    ProgressCallback,
    ProjectionRunner,
    record_revisions,
    recorded_revisions,
)
from projections._tables import metadata

logger = logging.getLogger("memwarden.kafka")

READS: dict[str, frozenset[str]] = {"cubes": frozenset({"versions"})}
"""Read models whose ``apply`` reads the rows of others (a recall gives ``cubes`` its text back
from ``versions`` and its cold archive): a consumer maintaining one maintains those too. Checked
against the projections' SQL by tests/test_kafka_consumers.py."""

DEFAULT_WAIT_SECONDS = 60.0

claims_metadata = MetaData()
read_model_claims = Table(
    "kafka_read_models",
    claims_metadata,
    Column("read_model", String(100), primary_key=True),
    Column("consumer", String(100), nullable=False),
)
"""Which Kafka consumer maintains each read model of this database."""

read_model_builds = Table(
    "kafka_read_model_builds",
    claims_metadata,
    Column("consumer", String(100), primary_key=True),
    Column("through_position", BigInteger, nullable=False),
)
"""Consumers building their read models from the beginning of the topic (a first claim, an
upgrade, a rebuild), until they have applied the log through the position it had then: the
API refuses to serve those read models meanwhile (``KafkaFedRunner.refuse_while_building``)."""

_SELECT_CLAIMS = "SELECT read_model, consumer FROM kafka_read_models"
_INSERT_CLAIM = "INSERT INTO kafka_read_models (read_model, consumer) VALUES (?, ?)"
_RELEASE_CLAIMS = "DELETE FROM kafka_read_models WHERE consumer IN {keys}"
_SELECT_BUILDS = "SELECT consumer, through_position FROM kafka_read_model_builds"
_SELECT_BUILD = _SELECT_BUILDS + " WHERE consumer = ?"
_END_BUILD = "DELETE FROM kafka_read_model_builds WHERE consumer = ?"
_START_BUILD = upsert_sql("kafka_read_model_builds", ("consumer", "through_position"),
                          key=("consumer",))

BUILD_CHECK_SECONDS = 1.0
"""How long the API trusts what it last read of the builds, and how often a building consumer
asks whether it is done."""


def _start_builds(conn: Connection, consumers: Sequence[str], through: int) -> None:
    DriverConnection(conn).executemany(_START_BUILD, [(c, through) for c in consumers])


class ReadModelClaimed(KafkaDistributionError):
    """A consumer was started on read models that another consumer maintains, or on another set
    of read models than the one it maintains."""


def missing_dependencies(names: Iterable[str]) -> dict[str, set[str]]:
    """For each read model in ``names``, the read models it reads that are not in ``names``."""
    chosen = set(names)
    return {name: set(READS[name] - chosen) for name in chosen
            if name in READS and READS[name] - chosen}


def _claims(conn: Connection) -> dict[str, str]:
    return dict(DriverConnection(conn).execute(_SELECT_CLAIMS).fetchall())


def _create_kafka_tables(conn: Connection) -> None:
    """The consumers' tables and the claims (after ``lock_for_schema_setup``)."""
    kafka_metadata.create_all(conn)
    claims_metadata.create_all(conn)


class KafkaFedRunner(ProjectionRunner):
    """The SQL projection runner of a database whose read models Kafka consumers maintain: it
    applies nothing itself (two writers of the same rows would apply events twice), keeps what
    reads the read models (``digest``, ``checkpoints``), rebuilds by having the consumers read
    the topic again, and waits for them (``wait_until_applied``)."""

    def __init__(self, store: EventStore, projections: Sequence[Projection] | None = None):
        super().__init__(store, projections)
        self._builds: dict[str, int] = {}
        self._builds_read_at = -BUILD_CHECK_SECONDS

    def create_schema(self) -> None:
        super().create_schema()
        with self.store.schema_setup() as conn:
            _create_kafka_tables(conn)

    def _upgrade(self, conn: Connection, outdated: Mapping[str, int]) -> None:
        """Rebuilds nothing: the consumers do, when this release of them starts (``claim``)."""
        current = {p.name: p.revision for p in self.projections}
        for name, revision in sorted(outdated.items()):
            logger.warning("read model %s was built at revision %d and this release reads "
                           "revision %d: its Kafka consumer rebuilds it when this release of "
                           "it starts (restart `memwarden project --source kafka`)", name,
                           revision, current[name])

    def catch_up(self, *, batch_size: int = 2000,
                 on_progress: ProgressCallback | None = None) -> int:
        return 0

    def catch_up_if_behind(self) -> int:
        """Nothing: the consumers own the read models, so one that lags the log is theirs to
        catch up, and a reader that must see the whole log waits for them
        (``wait_until_applied``)."""
        return 0

    def project_new_events(self, conn: Connection, new_events: Sequence[StoredEvent]) -> None:
        return None

    def rebuild(self, names: Sequence[str] | None = None, *, batch_size: int = 5000,
                on_progress: ProgressCallback | None = None) -> int:
        """Empty the named read models (default: all) and every other read model of the
        consumers that maintain them, drop those consumers' offsets and applied versions and
        release their claims, in one transaction. Replays nothing here: the consumers read the
        topic again from offset 0 (a running one notices at its next batch). Returns 0."""
        self.reset_kafka_fed(names)
        return 0

    def reset_kafka_fed(self, names: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
        """``rebuild``'s work; returns the read models emptied and the consumers reset."""
        known = {p.name: p for p in self.projections}
        unknown = set(names or ()) - set(known)
        if unknown:
            raise ValueError(f"unknown projections: {sorted(unknown)}")
        with _translated_errors(), self.store.write_connection() as conn, conn.begin():
            self.store.dialect.lock_for_schema_setup(conn)  # (serialized with claims)
            _create_kafka_tables(conn)
            claims = _claims(conn)
            chosen = set(names or known)
            consumers = sorted({claims[name] for name in chosen if name in claims})
            emptied = chosen | {name for name, owner in claims.items() if owner in consumers}
            strangers = emptied - set(known)
            if strangers:
                raise ValueError(f"consumers {consumers} also maintain read models unknown here "
                                 f"({sorted(strangers)}): rebuild them where they are known")
            reset_consumers(conn, consumers)  # (first: holds their batches off)
            for name in sorted(emptied):
                known[name].reset(conn)
            if consumers:
                DriverConnection(conn).execute(
                    _RELEASE_CLAIMS.format(keys=in_list(len(consumers))), consumers)
                _start_builds(conn, consumers, self.store.head_position())
        logger.info("rebuild: emptied %s; consumers %s read the topic again from the beginning",
                    sorted(emptied), consumers)
        return sorted(emptied), consumers

    def consumers(self) -> dict[str, str]:
        """Which consumer maintains each read model (those without one are absent)."""
        with _translated_errors(), self.store.engine.connect() as conn:
            return _claims(conn)

    def building(self) -> dict[str, int]:
        """The consumers building their read models from the beginning of the topic, each with
        the position of the log it must apply before they are whole."""
        with _translated_errors(), self.store.engine.connect() as conn:
            return dict(DriverConnection(conn).execute(_SELECT_BUILDS).fetchall())

    def refuse_while_building(self, read_models: Collection[str] | None = None) -> None:
        """Raise ``ReadModelsBehind`` while a consumer builds any of ``read_models`` (default:
        any read model) from the beginning of the topic: until it is through, they hold part of
        the log, and an answer from them would be wrong (a memory missing, a valid API key
        unknown). What was read of the builds is trusted for ``BUILD_CHECK_SECONDS``."""
        now = time.monotonic()
        if now - self._builds_read_at >= BUILD_CHECK_SECONDS:
            self._builds, self._builds_read_at = self.building(), now
        if not self._builds:
            return
        claims = self.consumers()
        building = {consumer: sorted(name for name, owner in claims.items() if owner == consumer)
                    for consumer in self._builds}
        # A consumer whose claims a rebuild released builds read models not known yet: any.
        refusing = sorted(consumer for consumer, names in building.items()
                          if read_models is None or not names or set(names) & set(read_models))
        if refusing:
            # (Not the position it must reach: the caller may not be authenticated yet.)
            raise ReadModelsBehind("; ".join(
                f"Kafka consumer {consumer!r} is building "
                f"{', '.join(building[consumer]) or 'its read models'} from the beginning of "
                "the topic" for consumer in refusing) + ": try again shortly")

    def wait_until_applied(self, names: Sequence[str], *, position: int | None = None,
                           timeout: float = DEFAULT_WAIT_SECONDS, poll: float = 0.05) -> int:
        """Wait until the consumers maintaining the read models ``names`` have applied the log
        up to ``position`` (default: the head now); returns that position. Raises
        ``ReadModelsBehind`` if no consumer maintains one of them, if one was built at another
        revision than this release reads (its consumer has not rebuilt it yet), or after
        ``timeout``."""
        target = self.store.head_position() if position is None else position
        claims = self.consumers()
        unmaintained = sorted(set(names) - set(claims))
        if unmaintained:
            raise ReadModelsBehind(
                f"no Kafka consumer maintains the read model(s) {', '.join(unmaintained)} in "
                "this database: start `memwarden project --source kafka`")
        with _translated_errors(), self.store.engine.connect() as conn:
            built = recorded_revisions(conn)
        current = {p.name: p.revision for p in self.projections}
        stale = sorted(name for name in names
                       if name in current and built.get(name, 1) != current[name])
        if stale:
            raise ReadModelsBehind(
                f"the read model(s) {', '.join(stale)} were built by an older release: restart "
                f"their Kafka consumer(s) ({', '.join(sorted({claims[n] for n in stale}))}) "
                "with this release (`memwarden project --source kafka`), which rebuilds them")
        through = {claims[name]: 0 for name in names}
        deadline = time.monotonic() + timeout
        while True:
            with _translated_errors(), self.store.engine.connect() as conn:
                for consumer, reached in through.items():
                    through[consumer] = applied_through(conn, consumer, reached, target)
            if min(through.values()) >= target:
                return target
            if time.monotonic() >= deadline:
                behind = {c: p for c, p in through.items() if p < target}
                raise ReadModelsBehind(
                    f"after {timeout:.0f} s the Kafka-fed read model(s) {', '.join(names)} have "
                    f"applied the log only up to position {min(behind.values())} of {target} "
                    f"(consumers {sorted(behind)}): are `memwarden relay` and `memwarden "
                    "project --source kafka` running?")
            time.sleep(poll)


class KafkaProjector:
    def __init__(self, store: EventStore, settings: KafkaSettings, *,
                 projections: Sequence[Projection] | None = None, target: Engine | None = None,
                 name: str = "projector", partitions: Sequence[int] | None = None,
                 verify_after: float = 5.0, verify_timeout: float = 2.0) -> None:
        self.store = store
        self.target = target if target is not None else store.engine
        self.projections = list(projections if projections is not None
                                else default_projections())
        self.name = name
        self.building = False
        """Claimed from scratch and not yet caught up with the topic: see ``step``."""
        self._serves_the_api = self.target.url == store.engine.url
        """Whether it writes the read models of the log's own database, which the API reads: only
        there are its builds recorded (and compared with the log)."""
        self._build_through: int | None = None
        """The recorded build's position, until this consumer has applied the log through it."""
        self._build_reached = 0
        self._build_checked_at = -BUILD_CHECK_SECONDS
        missing = missing_dependencies(p.name for p in self.projections)
        if missing:
            raise ValueError("a consumer must maintain the read models its read models read: "
                             + "; ".join(f"{name} reads {', '.join(sorted(needed))}"
                                         for name, needed in sorted(missing.items())))
        self.create_schema()
        self.claim()
        self.loop = KafkaConsumerLoop(name, settings, self.target, self._apply, self._decode,
                                      partitions=partitions, verify_after=verify_after,
                                      verify_timeout=verify_timeout, on_reset=self.claim)

    def create_schema(self) -> None:
        with _translated_errors(), schema_setup(self.target) as conn:
            metadata.create_all(conn)
            for projection in self.projections:
                for table in projection.tables:
                    table.create(conn, checkfirst=True)

    def claim(self) -> None:
        """Claim this consumer's read models, or refuse: see the module docstring. Claiming
        for the first time, or read models built at another revision than this release's,
        re-creates them empty and drops this consumer's offsets, so it builds them from the
        beginning of the topic."""
        mine = {p.name for p in self.projections}
        # What opening does: waits out another process's setup or upgrade rebuild.
        with _translated_errors(), schema_setup(self.target) as conn:
            _create_kafka_tables(conn)
            claims = _claims(conn)
            others = {name: owner for name, owner in claims.items()
                      if name in mine and owner != self.name}
            if others:
                raise ReadModelClaimed(
                    f"consumer {self.name!r} cannot maintain "
                    + ", ".join(f"{name} (maintained by consumer {owner!r})"
                                for name, owner in sorted(others.items()))
                    + ": leave them out (--except), or stop that consumer and run "
                      "`memwarden projections rebuild` on them to release them")
            held = {name for name, owner in claims.items() if owner == self.name}
            if held and held != mine:
                raise ReadModelClaimed(
                    f"consumer {self.name!r} maintains {', '.join(sorted(held))}, not "
                    f"{', '.join(sorted(mine))}: to change what it maintains, stop it and "
                    f"run `memwarden projections rebuild {' '.join(sorted(held))}`, or "
                    "start the new set under another --name")
            if held and not self._outdated(conn):
                self._load_build(conn)  # (one of its processes may have started a build)
                return
            reset_consumers(conn, [self.name])  # (first: holds its batches off)
            for projection in self.projections:
                projection.recreate(conn)
            record_revisions(conn, self.projections)
            if not held:
                DriverConnection(conn).executemany(
                    _INSERT_CLAIM, [(name, self.name) for name in sorted(mine)])
            if self._serves_the_api:
                _start_builds(conn, [self.name], self.store.head_position())
            self._load_build(conn)
        self.building = True
        logger.info("consumer %s now maintains %s, from the beginning of the topic%s",
                    self.name, sorted(mine), "" if self._build_through is None else
                    f" (served once it has applied the log through position "
                    f"{self._build_through})")

    def _outdated(self, conn: Connection) -> bool:
        """Whether a read model it holds was built at another revision (1: before revisions
        were recorded) than this release's; says which in the log."""
        built = recorded_revisions(conn)
        stale = {p.name: (built.get(p.name, 1), p.revision) for p in self.projections
                 if built.get(p.name, 1) != p.revision}
        for name, (was, now) in sorted(stale.items()):
            logger.warning("consumer %s: read model %s was built at revision %d and this "
                           "release builds revision %d: rebuilding its read models from the "
                           "beginning of the topic", self.name, name, was, now)
        return bool(stale)

    def step(self, timeout: float = 1.0) -> StepResult:
        """Poll once and apply what came: one transaction."""
        result = self.loop.step(timeout)
        self._built(result)
        return result

    def run(self, stop: threading.Event, *,
            on_step: Callable[[StepResult], None] | None = None) -> None:
        def stepped(result: StepResult) -> None:
            self._built(result)
            if on_step is not None:
                on_step(result)

        self.loop.run(stop, on_step=stepped)

    def _load_build(self, conn: Connection) -> None:
        """What this consumer must apply before its read models are whole (None: nothing)."""
        row = DriverConnection(conn).execute(_SELECT_BUILD, (self.name,)).fetchone()
        self._build_through = None if row is None else int(row[1])
        self._build_reached = 0
        self._build_checked_at = -BUILD_CHECK_SECONDS

    def _end_build_when_through(self, result: StepResult) -> None:
        """End the recorded build once this consumer (all its processes) has applied the log
        through its position: the API serves the read models again. Asked after a batch short
        of a full one (near the end of the topic), else every ``BUILD_CHECK_SECONDS``: it
        compares the log with what was applied."""
        if self._build_through is None:
            return
        now = time.monotonic()
        if (result.received >= self.loop.settings.batch_size
                and now - self._build_checked_at < BUILD_CHECK_SECONDS):
            return
        self._build_checked_at = now
        self._build_reached = self.loop.applied_through(self._build_through,
                                                        after=self._build_reached)
        if self._build_reached < self._build_through:
            return
        with _translated_errors(), self.target.begin() as conn:
            DriverConnection(conn).execute(_END_BUILD, (self.name,))
        logger.info("consumer %s has built its read models through position %d: they are "
                    "served again", self.name, self._build_through)
        self._build_through = None

    def _built(self, result: StepResult) -> None:
        """After each step: end a recorded build once through (``_end_build_when_through``).
        After a build from scratch (a first claim, a rebuild), once a poll brings nothing
        new: gather the planner's statistics of the read models, as ``ProjectionRunner.rebuild``
        does (PostgreSQL; the tables were filled from empty, batch after batch)."""
        self._end_build_when_through(result)
        if not self.building or result.received or self.loop.source.verifying:
            return
        self.building = False
        if self.loop.totals.applied == 0:
            return  # an empty topic: nothing was built
        with _translated_errors(), self.target.begin() as conn:
            dialect_named(conn.dialect.name).gather_statistics(
                conn, [table.name for p in self.projections for table in p.tables])

    def marks(self) -> dict[int, PartitionMark]:
        return self.loop.marks()

    def close(self) -> None:
        self.loop.close()

    def digest(self) -> str:
        """The digest ``ProjectionRunner.digest`` gives of the same read models."""
        target_store = EventStore(self.target, dialect_named(self.target.dialect.name))
        return ProjectionRunner(target_store, self.projections).digest()

    def _apply(self, conn: Connection, events: list[StoredEvent]) -> None:
        with collection_paused():
            for projection in self.projections:
                projection.apply(conn, events)

    def _decode(self, conn: Connection, events: list[StoredEvent]) -> list[StoredEvent]:
        with collection_paused():
            upcast = [self.store.upcasters.upcast(e) for e in events]
            if self.target is self.store.engine:
                return self.store.decode(upcast, connection=conn)
            return self.store.decode(upcast)
