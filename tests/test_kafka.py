"""Kafka distribution against a real Kafka-protocol broker (Tansu, started by the tests).

The relay publishes the SQL log; projectors consume it. What is checked, each time by comparing
the Kafka-fed read models with the SQL-fed ones (equal digests, equal state):

* end to end: REST write on ``memwarden up`` (API + relay, distributed mode) -> Kafka ->
  ``memwarden project --source kafka`` in another process -> REST read;
* the broker stops while writes go on and comes back empty: the relay resumes from its
  checkpoint, the consumers recognise the new log and converge; then ``relay --from-position``
  re-seeds an empty broker and both an old and a brand-new consumer converge;
* a projector process killed (SIGKILL) mid-run, and one failing mid-batch, apply every event
  exactly once when resumed;
* two projector processes on different partitions build the state of one, and a batch the
  database aborts to break a deadlock between two consumers is committed again;
* 10,000 events: the Kafka-fed digest equals the SQL-fed one, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from kafka_fixtures import (
    CROSS_STREAM_ORDER_SENSITIVE,
    Running,
    bulk_workload,
    close_clients_left_open,
    consumer_state,
    distributed,
    finished,
    kafka_projections,
    memwarden_process,
    until,
    workload,
)
from pg_statistics import analyzed_tables, estimated_rows
from sqlalchemy import Connection, create_engine, func, select
from sqlite_locks import shorten_sqlite_waits, write_lock_held
from tansu_broker import TansuBroker

from eventstore import EventStore, StoredEvent
from eventstore._kafka import (
    TOPIC_ID_HEADER,
    CorruptRecord,
    KafkaConsumerLoop,
    KafkaEventSource,
    KafkaSettings,
    Relay,
    _kafka,
    create_kafka_schema,
    ensure_topic,
    event_from_record,
    record_value,
    stored_rows,
)
from governance import MemWarden
from governance._cli import cli
from governance._config import Settings
from governance._errors import InvalidCommand, NotFound
from projections import ProjectionRunner, audit, default_projections
from projections._kafka_projector import KafkaProjector
from projections._readmodels import Projection

pytestmark = pytest.mark.usefixtures("kafka_environment")

# -- helpers ----------------------------------------------------------------------------------


def kafka(broker: TansuBroker, **options: Any) -> KafkaSettings:
    return KafkaSettings(broker.bootstrap, topic=f"events-{uuid.uuid4().hex[:8]}",
                         **{"partitions": 3, "batch_size": 200, **options})


def sql_fed_digest(store: EventStore, projections: Sequence[Projection]) -> str:
    runner = ProjectionRunner(store, projections)
    runner.create_schema()
    runner.catch_up()
    return runner.digest()


def other_database(database_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A second, empty database on the same backend as ``database_url``."""
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / f'kafka-fed-{uuid.uuid4().hex[:6]}.db'}"
    return str(request.getfixturevalue("postgres_url"))


def converged(projector: KafkaProjector, expected: str, *, step: float = 0.3) -> bool:
    projector.step(step)
    return projector.digest() == expected


def rebuilt_digest(store: EventStore) -> tuple[str, str]:
    """The digest of the read models as they are, then after rebuilding them from the SQL log."""
    runner = ProjectionRunner(store, kafka_projections())
    runner.create_schema()
    before = runner.digest()
    runner.rebuild()
    return before, runner.digest()


# -- records ----------------------------------------------------------------------------------


def test_a_record_is_the_stored_row_and_carries_its_hash(sqlite_url: str) -> None:
    with MemWarden.open(sqlite_url, actor="agent:a") as mw:
        mw.add("Prefers window seats", tenant="acme", owner="user:ana")
        rows = Relay(mw.store, KafkaSettings("127.0.0.1:1"))._stored_rows(0, 1000)
        events = mw.store.read_all(0, decoded=False)
    assert [event_from_record(record_value(row)) for row in rows] == events
    created = rows[-1]
    value = record_value(created)
    assert json.loads(value)["payload"] == created["payload"]  # the stored text, byte for byte
    assert b"window" not in value  # memory text travels sealed, as stored
    tampered = value.replace(b'"tenant":"acme"', b'"tenant":"acmf"')
    assert tampered != value
    with pytest.raises(CorruptRecord, match="does not match its hash"):
        event_from_record(tampered)
    with pytest.raises(CorruptRecord, match="not a MemWarden event"):
        event_from_record(b'{"position": 1}')


def test_in_the_distributed_mode_writes_only_append_and_the_sql_runner_projects_nothing(
        sqlite_url: str) -> None:
    settings = replace(Settings.from_env({}), db_url=sqlite_url, kafka_bootstrap="127.0.0.1:1")
    with MemWarden.open(settings=settings, actor="agent:a") as mw:
        memory = mw.add("Prefers window seats", tenant="acme", owner="user:ana")
        assert mw.store.read_stream(memory.cube_id)[0].type == "MemoryCreated"
        assert mw.projector.catch_up() == 0
        with pytest.raises(NotFound):  # visible once a Kafka projector has applied it
            mw.get(memory.cube_id)
        assert mw.rebuild_projections() == 0  # replays nothing: Kafka consumers re-read
        with pytest.raises(InvalidCommand, match="unknown projections"):
            mw.rebuild_projections(["no-such-read-model"])


# -- end to end: memwarden up (API + relay) -> Kafka -> projector process -> API -------------


def test_a_rest_write_reaches_the_kafka_fed_projection_of_another_process(
        postgres_url: str, broker: TansuBroker, tmp_path: Path) -> None:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    up = memwarden_process(postgres_url, broker, topic, "up", "--port", "0", "--no-dashboard",
                           env={"MEMWARDEN_DATA_DIR": str(tmp_path)})
    projector: subprocess.Popen[str] | None = None
    try:
        assert up.stdout is not None
        base = ""
        for line in up.stdout:
            if "API" in line and "http://" in line:
                base = line.split()[-1]
                break
        assert base, "memwarden up printed no address"
        # Started once the API has set the database up, as docker-compose.yml orders them.
        projector = memwarden_process(postgres_url, broker, topic, "project", "--source",
                                      "kafka")
        key = (tmp_path / "admin.key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
            # The admin key itself becomes usable once the projector has applied its event.
            until(lambda: client.get("/memories", params={"tenant": "acme"}).status_code == 200,
                  what="the admin key to reach the Kafka-fed api_keys")
            created = client.post("/memories", json={
                "text": "Prefers window seats", "tenant": "acme", "owner": "user:ana"})
            assert created.status_code == 201, created.text
            cube_id = created.json()["id"]
            until(lambda: client.get(f"/memories/{cube_id}").status_code == 200,
                  what="the new memory in the Kafka-fed read model")
            assert client.get(f"/memories/{cube_id}").json()["text"] == "Prefers window seats"
            updated = client.patch(f"/memories/{cube_id}",
                                   json={"text": "Prefers aisle seats", "reason": "corrected"})
            assert updated.status_code == 200, updated.text
            until(lambda: client.get(f"/memories/{cube_id}").json()["version"] == 2,
                  what="version 2 in the Kafka-fed read model")
            history = client.get(f"/memories/{cube_id}/versions").json()
            assert [v["text"] for v in history["items"]] == ["Prefers window seats",
                                                             "Prefers aisle seats"]
    finally:
        processes = [p for p in (up, projector) if p is not None]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        outputs = [finished(process) for process in processes]
    assert "applied" in outputs[1]


# -- outage, loss of the broker's log, re-seeding ---------------------------------------------


def test_the_relay_rides_out_a_broker_outage_and_consumers_converge_after_a_reseed(
        sqlite_url: str, broker: TansuBroker, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = kafka(broker)
    projections = kafka_projections()
    with MemWarden.open(sqlite_url, actor="agent:a") as mw:
        store = mw.store
        workload(store, 60)
        relay = Relay(store, settings, backoff=(0.05, 0.5), poll_interval=0.05)
        relaying = Running(relay.run)
        fed = KafkaProjector(store, settings, projections=projections,
                             target=create_engine(f"sqlite:///{tmp_path / 'fed.db'}"),
                             verify_after=0.5, verify_timeout=0.5)
        until(lambda: converged(fed, sql_fed_digest(store, projections)),
              what="the first convergence")

        # The broker goes away; writes go on; it comes back empty (its log was in memory).
        broker.stop()
        workload(store, 40, seed=8)
        head = store.head_position()
        time.sleep(0.5)
        assert relay.position() < head  # nothing acknowledged while it was down
        broker.start()
        until(lambda: relay.position() == head, what="the relay to resume")
        until(lambda: converged(fed, sql_fed_digest(store, projections)),
              what="convergence after the outage")
        assert fed.loop.source.replacements > 0  # it recognised the new log
        relaying.join()

        # Disaster: the broker loses everything again. Re-seed it from the SQL log.
        broker.restart()
        monkeypatch.setenv("MEMWARDEN_KAFKA_BOOTSTRAP", broker.bootstrap)
        monkeypatch.setenv("MEMWARDEN_KAFKA_TOPIC", settings.topic)
        result = CliRunner().invoke(cli, ["--db", sqlite_url, "relay", "--from-position", "0",
                                          "--once", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["published"] == head
        applied_before, duplicates_before = fed.loop.totals.applied, fed.loop.totals.duplicates
        until(lambda: fed.step(0.3).received >= 0
              and fed.loop.totals.duplicates - duplicates_before >= head,
              what="the old consumer to read the re-seeded log",
              state=lambda: consumer_state(fed))
        assert fed.loop.totals.applied == applied_before  # everything was a duplicate
        assert fed.digest() == sql_fed_digest(store, projections)
        fresh = KafkaProjector(store, settings, projections=projections,
                               target=create_engine(f"sqlite:///{tmp_path / 'fresh.db'}"))
        until(lambda: converged(fresh, sql_fed_digest(store, projections)),
              what="a new consumer to build everything from the re-seeded broker")
        fed.close()
        fresh.close()


def _publish(settings: KafkaSettings, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` of the log into partition 0 of the topic, in this order, stamped as the relay
    stamps them. (A consumer asking about a missing topic makes Tansu create it with its own
    partition count, so only partition 0 is sure to exist.)"""
    headers = [(TOPIC_ID_HEADER, ensure_topic(settings).encode())]
    producer = _kafka().KafkaProducer(bootstrap_servers=settings.bootstrap)
    try:
        for row in rows:
            producer.send(settings.topic, key=row["stream_id"].encode(), partition=0,
                          value=record_value(row), headers=headers).get(timeout=10)
    finally:
        producer.close()


def _event_ids(source: KafkaEventSource, count: int, what: str) -> list[str]:
    """The ids of the next ``count`` events ``source`` gives."""
    got: list[str] = []

    def read() -> bool:
        got.extend(str(record.event.event_id) for record in source.poll(0.2))
        return len(got) >= count

    until(read, what=what, state=lambda: (got, source.replacements))
    return got


def test_a_new_log_holding_the_last_event_read_at_its_offset_is_still_read_from_the_start(
        sqlite_url: str, broker: TansuBroker) -> None:
    """The consumer checks the record before its mark when it has been idle. In a re-seeded
    log that record can be the very event it applied there while the records before it are
    others it never saw: it must tell the logs apart by their incarnation, or skip those."""
    settings = kafka(broker, partitions=1)
    with MemWarden.open(sqlite_url, actor="agent:a") as mw:
        for n in range(3):
            mw.add(f"first {n}", tenant="acme", owner="user:ana")
        first = stored_rows(mw.store, 0, 100)
        _publish(settings, first)
        source = KafkaEventSource(settings, {}, verify_after=0.3, verify_timeout=5.0)
        try:
            _event_ids(source, len(first), "the first log to be read")

            broker.restart()
            for n in range(len(first)):
                mw.add(f"later {n}", tenant="acme", owner="user:bo")
            unseen = stored_rows(mw.store, first[-1]["position"], 100)[:len(first) - 1]
            second = [*unseen, first[-1]]  # the last event read, at the offset it was read at
            _publish(settings, second)

            again = _event_ids(source, len(second), "the new log to be read whole")
        finally:
            source.close()
    assert again == [str(row["event_id"]) for row in second]
    assert source.replacements == 1


def test_a_consumer_skips_a_stream_whose_earlier_versions_the_broker_lost(
        sqlite_url: str, broker: TansuBroker, tmp_path: Path) -> None:
    """Re-seeding from too late a position leaves holes: nothing is applied out of order."""
    settings = kafka(broker)
    projections = kafka_projections()
    with MemWarden.open(sqlite_url, actor="agent:a") as mw:
        first = mw.add("v1", tenant="acme", owner="user:ana")
        mw.update(first.cube_id, text="v2")
        relay = Relay(mw.store, settings)
        relay.reset(first.position)  # re-seeded from too late: v1 never reaches Kafka
        relay.publish_available()
        fed = KafkaProjector(mw.store, settings, projections=projections,
                             target=create_engine(f"sqlite:///{tmp_path / 'fed.db'}"))
        until(lambda: fed.step(0.3).received == 0 and fed.loop.totals.received > 0,
              what="the consumer to read the topic")
        assert fed.loop.totals.gaps >= 1
        with fed.target.connect() as conn:
            assert conn.execute(select(func.count()).select_from(audit).where(
                audit.c.stream_id == first.cube_id)).scalar_one() == 0
        relay.reset(0)
        relay.publish_available()
        until(lambda: converged(fed, sql_fed_digest(mw.store, projections)),
              what="convergence once the broker has the whole stream")
        fed.close()


# -- crashes ----------------------------------------------------------------------------------


def test_a_projector_process_killed_mid_run_resumes_applying_each_event_once(
        sqlite_url: str, broker: TansuBroker) -> None:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(broker.bootstrap, topic=topic, partitions=3, batch_size=50)
    with MemWarden.open(settings=distributed(sqlite_url, broker, topic)) as mw:
        bulk_workload(mw.store, 1500)
        head = mw.store.head_position()
        Relay(mw.store, settings).publish_available()
        create_kafka_schema(mw.store.engine)
        killed = memwarden_process(sqlite_url, broker, topic, "project", "--source", "kafka",
                                   "--batch-size", "50")
        # Look at the offsets only while holding SQLite's write lock: the projector cannot
        # commit while the test looks, so once it has committed a first batch of ~30, it is
        # killed with the rest still to apply, blocked inside its next transaction.
        writer = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=60,
                                 isolation_level=None)
        deadline = time.monotonic() + 60
        try:
            while True:
                writer.execute("BEGIN IMMEDIATE")
                applied = writer.execute(
                    "SELECT coalesce(sum(next_offset), 0) FROM kafka_offsets").fetchone()[0]
                if applied > 0:
                    killed.kill()  # SIGKILL: no clean-up, its transaction half done
                    killed.communicate()
                    break
                writer.execute("ROLLBACK")
                assert time.monotonic() < deadline, "the projector committed no first batch"
                time.sleep(0.02)
        finally:
            writer.close()  # (closing rolls the open read back)
        assert 0 < applied < head, "the kill should land mid-run"
        finished(memwarden_process(sqlite_url, broker, topic, "project", "--source", "kafka",
                                   "--once"))
        with mw.store.engine.connect() as conn:
            positions = list(conn.execute(select(audit.c.position)).scalars())
        assert sorted(positions) == list(range(1, head + 1))  # each event once, none missing
        incremental, rebuilt = rebuilt_digest(mw.store)
        assert incremental == rebuilt


class FailsOnce(Projection):
    """Wraps a projection and raises once, in the middle of the Nth batch it is given."""

    def __init__(self, inner: Projection, fail_on_batch: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.tables = inner.tables
        self.extra_tables = inner.extra_tables
        self.revision = inner.revision  # (another one would have the next consumer rebuild)
        self.batches = 0
        self.fail_on_batch = fail_on_batch

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        self.batches += 1
        self.inner.apply(conn, events[: len(events) // 2])
        if self.batches == self.fail_on_batch:
            raise RuntimeError("crash in the middle of a batch")
        self.inner.apply(conn, events[len(events) // 2:])


def test_a_batch_that_fails_halfway_leaves_nothing_behind(
        sqlite_url: str, broker: TansuBroker, tmp_path: Path) -> None:
    settings = kafka(broker, batch_size=40)
    with MemWarden.open(sqlite_url, actor="agent:a") as mw:
        workload(mw.store, 120)
        Relay(mw.store, settings).publish_available()
        target = create_engine(f"sqlite:///{tmp_path / 'fed.db'}")
        crashing = [FailsOnce(p, fail_on_batch=3) for p in kafka_projections()]
        projector = KafkaProjector(mw.store, settings, projections=crashing, target=target)
        with pytest.raises(RuntimeError, match="crash in the middle"):
            for _ in range(50):
                projector.step(0.5)
        marks_at_crash = projector.marks()
        projector.close()
        resumed = KafkaProjector(mw.store, settings, projections=kafka_projections(),
                                 target=target)
        assert resumed.marks() == marks_at_crash  # the failed batch moved no offset
        until(lambda: converged(resumed, sql_fed_digest(mw.store, kafka_projections())),
              what="the resumed projector to converge")
        resumed.close()


# -- scaling out ------------------------------------------------------------------------------


def test_two_projector_processes_on_different_partitions_build_the_state_of_one(
        postgres_url: str, broker: TansuBroker) -> None:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(broker.bootstrap, topic=topic, partitions=3)
    with MemWarden.open(settings=distributed(postgres_url, broker, topic)) as mw:
        bulk_workload(mw.store, 1000)
        Relay(mw.store, settings).publish_available()
        first = memwarden_process(postgres_url, broker, topic, "project", "--source", "kafka",
                                  "--partition", "0", "--partition", "1", "--once", "--json")
        second = memwarden_process(postgres_url, broker, topic, "project", "--source", "kafka",
                                   "--partition", "2", "--once", "--json")
        applied = [json.loads(finished(p))["applied"] for p in (first, second)]
        assert all(applied) and sum(applied) == mw.store.head_position()
        incremental, rebuilt = rebuilt_digest(mw.store)
        assert incremental == rebuilt


def test_a_consumer_gathers_the_statistics_of_the_read_models_it_built_from_scratch(
        postgres_url: str, broker: TansuBroker) -> None:
    """As ``ProjectionRunner.rebuild`` does: the planner must not query read models filled from
    empty without statistics (the test server runs without autovacuum)."""
    settings = kafka(broker)
    projections = kafka_projections()
    store = EventStore.open(postgres_url)
    try:
        bulk_workload(store, 600)
        Relay(store, settings).publish_available()
        projector = KafkaProjector(store, settings, projections=projections)
        assert projector.building  # claimed for the first time: emptied, read from offset 0
        until(lambda: projector.step(0.3).received == 0 and not projector.building,
              what="the projector to drain the topic")
        projector.close()
        with store.engine.connect() as conn:
            analyzed = analyzed_tables(conn)
            estimated = estimated_rows(conn, "audit")
        assert {table.name for p in projections for table in p.tables} <= analyzed
        assert estimated == store.head_position()  # one audit row per event
        resumed = KafkaProjector(store, settings, projections=projections)
        assert not resumed.building  # its claim stands: nothing to build
        resumed.close()
    finally:
        store.close()


def test_a_batch_aborted_to_break_a_deadlock_is_committed_again(
        postgres_url: str, broker: TansuBroker) -> None:
    """Consumers on different partitions update shared rows (one read counts in the usage rows
    of memories on several partitions). Here two of them lock the same two rows in opposite
    orders, so PostgreSQL must abort one batch: that consumer commits it again, and nothing of
    the aborted attempt stays behind."""
    settings = kafka(broker, partitions=2)
    store = EventStore.open(postgres_url)
    try:
        bulk_workload(store, 600)
        Relay(store, settings).publish_available()
        with store.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE shared_counters (k text PRIMARY KEY, n int)")
            conn.exec_driver_sql("INSERT INTO shared_counters VALUES ('a', 0), ('b', 0)")
        both_hold_one_row = threading.Barrier(2, timeout=20)
        attempts = {"one": 0, "two": 0}

        def locking(name: str, first: str, second: str) -> Callable[..., None]:
            def apply(conn: Connection, events: list[StoredEvent]) -> None:
                attempts[name] += 1
                bump = "UPDATE shared_counters SET n = n + 1 WHERE k = %s"
                conn.exec_driver_sql(bump, (first,))
                if attempts[name] == 1:
                    both_hold_one_row.wait()
                conn.exec_driver_sql(bump, (second,))
            return apply

        loops = [KafkaConsumerLoop(name, settings, store.engine, locking(name, *rows),
                                   lambda conn, events: events, partitions=[partition])
                 for name, rows, partition in (("one", "ab", 0), ("two", "ba", 1))]
        failures: list[BaseException] = []

        def drain(loop: KafkaConsumerLoop) -> None:
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if loop.step(1.0).received == 0 and loop.totals.received > 0:
                        return
                raise AssertionError(f"consumer {loop.name} did not drain its partition")
            except BaseException as error:  # reported by the test's thread
                failures.append(error)

        threads = [threading.Thread(target=drain, args=(loop,)) for loop in loops]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for loop in loops:  # (a consumer left open would go on reconnecting)
                loop.close()
        assert not failures, failures
        # The first batches deadlock by design; later ones, which lock the two rows in opposite
        # orders too, may by chance. Every victim is committed again.
        aborted = sum(loop.conflicts for loop in loops)
        assert aborted >= 1
        assert sum(loop.totals.applied for loop in loops) == store.head_position()
        commits = sum(attempts.values()) - aborted
        with store.engine.connect() as conn:
            counters = dict(conn.exec_driver_sql("SELECT k, n FROM shared_counters").fetchall())
        assert counters == {"a": commits, "b": commits}  # aborted attempts left nothing
    finally:
        store.close()


# -- 10,000 events ----------------------------------------------------------------------------


def test_ten_thousand_events_fed_from_kafka_give_the_sql_fed_digest(
        sqlite_url: str, broker: TansuBroker, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """On SQLite only, for time: PostgreSQL's Kafka-fed state is compared with its SQL-fed
    rebuild by the end-to-end and two-projector tests."""
    database_url = sqlite_url
    settings = kafka(broker, partitions=4, batch_size=1000)
    projections = kafka_projections()
    store = EventStore.open(database_url)
    try:
        bulk_workload(store, 10_000)
        assert store.head_position() >= 10_000
        expected = sql_fed_digest(store, projections)
        relay = Relay(store, settings)
        assert relay.publish_available() == store.head_position()
        target = create_engine(other_database(database_url, tmp_path, request))
        fed = KafkaProjector(store, settings, projections=projections, target=target)
        until(lambda: fed.step(1.0).received == 0 and fed.loop.totals.received > 0,
              seconds=180, what="the consumer to drain the topic")
        assert fed.loop.totals.applied == store.head_position()
        assert fed.digest() == expected
        fed.close()
        target.dispose()
    finally:
        store.close()


def test_a_read_model_fed_from_kafka_must_not_depend_on_cross_stream_order(
        sqlite_url: str, broker: TansuBroker, tmp_path: Path) -> None:
    settings = kafka(broker, partitions=4)
    store = EventStore.open(sqlite_url)
    try:
        bulk_workload(store, 2000)
        # With versions too, as the projector maintains them together.
        order_sensitive = [p for p in default_projections()
                           if p.name in CROSS_STREAM_ORDER_SENSITIVE | {"versions"}]
        expected = sql_fed_digest(store, order_sensitive)
        Relay(store, settings).publish_available()
        fed = KafkaProjector(store, settings, projections=order_sensitive,
                             target=create_engine(f"sqlite:///{tmp_path / 'fed.db'}"))
        try:
            until(lambda: fed.step(1.0).received == 0 and fed.loop.totals.received > 0,
                  what="the consumer to drain the topic")
            assert fed.digest() == expected
        finally:
            fed.close()  # its client's I/O thread must not outlive the test
    finally:
        store.close()


@pytest.mark.parametrize("starting", ["consumer", "offsets' tables"])
def test_a_kafka_process_started_during_another_ones_upgrade_waits_for_it(
        tmp_path: Path, broker: TansuBroker, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, starting: str) -> None:
    """Another process holds SQLite's write lock longer than the busy timeout (an upgrade's
    read-model rebuild: minutes at 10^6 events). A consumer started meanwhile (its read models'
    tables, its claim, its offsets' tables) waits for it as opening a store does, rather than
    failing with "database is locked"."""
    path = tmp_path / "memwarden.db"
    shorten_sqlite_waits(monkeypatch)
    store = EventStore.open(f"sqlite:///{path}")
    try:
        with write_lock_held(path, seconds=1.5), caplog.at_level(logging.WARNING,
                                                                 logger="memwarden.eventstore"):
            started = time.monotonic()
            if starting == "consumer":
                KafkaProjector(store, kafka(broker), projections=kafka_projections()).close()
            else:
                create_kafka_schema(store.engine)
        assert time.monotonic() - started >= 1.0  # it did wait for the lock
        assert "waiting for another process holding the database's write lock" in caplog.text
    finally:
        store.close()


# -- the tests' own hygiene ---------------------------------------------------------------------


def test_a_client_a_failed_test_left_open_is_closed_with_its_io_thread(
        broker: TansuBroker) -> None:
    """What the ``broker`` fixture does after every test: a client left open would reconnect
    for the rest of the run from its IO thread (and break later Hypothesis tests, see
    ``close_clients_left_open``)."""
    consumer = _kafka().KafkaConsumer(bootstrap_servers=broker.bootstrap, client_id="left-open")
    consumer.topics()  # connected: its IO thread runs

    def io_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "kafka-io-left-open"]

    assert io_threads()
    assert close_clients_left_open() == ["KafkaConsumer"]
    until(lambda: not io_threads(), seconds=10, what="the client's IO thread to end")
    assert close_clients_left_open() == []
