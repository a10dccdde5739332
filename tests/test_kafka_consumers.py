"""The Kafka consumers beside the projector: the search indexer, the lifecycle worker, rebuild.

Against the real Tansu broker, as tests/test_kafka.py:

* the search index (``search_docs`` and the backend's full-text index over it) fed from Kafka
  by two indexer processes on different partitions equals the SQL-fed one: same rows, same
  search results;
* each read model of a database is maintained by one consumer name; the projector and the
  indexer share a database; a second claimant, a changed set of read models and a read model
  without what it reads are refused;
* ``memwarden projections rebuild`` in the distributed mode empties the read models and the
  consumers that maintain them, running ones included, read the topic again from offset 0;
* ``memwarden work`` sweeps the Kafka-fed read models once they have applied the log up to the
  sweep's start: a legal hold placed while the projector was paused is honoured.
"""

from __future__ import annotations

import importlib
import json
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kafka_fixtures import (
    Running,
    bulk_workload,
    distributed,
    finished,
    kafka_projections,
    memwarden_process,
    until,
    workload,
)
from sqlalchemy import Engine, create_engine, func, select, text
from tansu_broker import TansuBroker

from eventstore import EventStore, StoredEvent, utcnow
from eventstore._dialects import dialect_named
from eventstore._kafka import KafkaSettings, ReadModelsBehind, Relay, consumer_offsets
from governance import MemWarden
from governance._cli import cli
from governance._config import ConfigError, Settings
from governance._relay import chosen_projections
from governance._retention import RetentionPolicy, RetentionWorker
from projections import SUBJECT_ERASED, ProjectionRunner, cubes, default_projections
from projections._kafka_projector import (
    READS,
    KafkaFedRunner,
    KafkaProjector,
    ReadModelClaimed,
)
from projections._readmodels import Projection
from projections._retention import RetentionFacts, retention_holds
from projections._search import (
    AccessScope,
    SearchProjection,
    SearchQuery,
    open_search_index,
    search_docs,
)
from projections._tables import metadata as read_model_tables

pytestmark = pytest.mark.usefixtures("kafka_environment")


def digest(store: EventStore, names: set[str]) -> str:
    """The digest of these read models as they are in ``store``'s database."""
    return ProjectionRunner(store, [p for p in default_projections() if p.name in names]).digest()


def search_results(engine: Engine) -> list[list[tuple[str, float]]]:
    """What the database's full-text index answers to a few queries, over every tenant."""
    index = open_search_index(engine)
    scopes = tuple(AccessScope(tenant, "user:0", frozenset({"any"}), frozenset({"any"}))
                   for tenant in ("acme", "globex", "initech"))
    return [[(hit.cube_id, round(hit.score, 6)) for hit in index.search(
        SearchQuery(text=text, scopes=scopes, now=utcnow(), k=50))]
        for text in ("note", "edit", "memory changed", "t3")]


def test_kafka_python_checksums_record_batches_in_c() -> None:
    """Its pure-Python CRC-32C (the fallback without the ``crc32c`` package) checksums a few MB/s:
    it capped the relay and every consumer at about a thousand records a second."""
    from eventstore._kafka import _kafka

    _kafka()
    from kafka.record import util

    assert util._crc32c is not util.crc32c_py
    assert util.calc_crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C


# -- the search indexer -------------------------------------------------------------------------


def test_two_indexer_processes_build_the_search_index_the_sql_log_builds(
        database_url: str, broker: TansuBroker) -> None:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(broker.bootstrap, topic=topic, partitions=3)
    with MemWarden.open(settings=distributed(database_url, broker, topic)) as mw:
        bulk_workload(mw.store, 1200)
        workload(mw.store, 60)  # deletions and restorations too
        head = mw.store.head_position()
        # The SQL-fed index, built here first; the indexers' first claim empties it.
        expected = ProjectionRunner(mw.store, [SearchProjection()])
        expected.create_schema()
        expected.catch_up()
        expected_digest, expected_results = expected.digest(), search_results(mw.store.engine)
        assert any(expected_results) and all(len(r) <= 50 for r in expected_results)
        Relay(mw.store, settings).publish_available()
        indexers = [memwarden_process(database_url, broker, topic, "project", "--source",
                                      "kafka", "--name", "indexer", "--read-model", "search",
                                      *partitions, "--once", "--json")
                    for partitions in (["--partition", "0"],
                                       ["--partition", "1", "--partition", "2"])]
        applied = [json.loads(finished(process, timeout=120))["applied"]
                   for process in indexers]
        assert all(applied) and sum(applied) == head  # each event applied once, by one of them
        assert expected.digest() == expected_digest
        assert search_results(mw.store.engine) == expected_results
        assert KafkaFedRunner(mw.store).consumers() == {"search": "indexer"}


def _search_digest_fed(events: list[StoredEvent], path: Path) -> str:
    """The search read model's digest after applying ``events`` in this order (one batch)."""
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        read_model_tables.create_all(conn)
        SearchProjection().apply(conn, events)
    store = EventStore(engine, dialect_named("sqlite"))
    return ProjectionRunner(store, [SearchProjection()]).digest()


@pytest.fixture
def erased_subject(sqlite_url: str) -> Iterator[tuple[list[StoredEvent], list[str], list[str]]]:
    """A log in which ana's memories are created, her erasure, then new memories of hers: the
    events, the ids of the memories created before and after the erasure."""
    settings = replace(Settings.from_env({}), db_url=sqlite_url, kafka_bootstrap="127.0.0.1:1")
    with MemWarden.open(settings=settings, actor="agent:a") as mw:
        before = [mw.add(f"early ana {n}", tenant="acme", owner="user:ana").cube_id
                  for n in range(2)]
        mw.add("bob's", tenant="acme", owner="user:bob")
        mw.erase_subject("user:ana", tenant="acme", reason="asked")
        after = [mw.add(f"late ana {n}", tenant="acme", owner="user:ana").cube_id
                 for n in range(2)]
        yield mw.store.read_all(0), before, after


def test_a_memory_created_after_an_erasure_keeps_its_text_whichever_arrives_first(
        erased_subject: tuple[list[StoredEvent], list[str], list[str]], tmp_path: Path) -> None:
    """From Kafka, the creation of a memory written after its owner's erasure (another stream)
    can arrive before the erasure: it must not be erased by it."""
    events, _, after = erased_subject
    erasure = next(e for e in events if e.type == SUBJECT_ERASED)
    late_first = [e for e in events if e is not erasure] + [erasure]
    assert _search_digest_fed(late_first, tmp_path / "a.db") == _search_digest_fed(
        events, tmp_path / "b.db")
    with create_engine(f"sqlite:///{tmp_path / 'a.db'}").connect() as conn:
        texts = dict(conn.execute(select(search_docs.c.cube_id, search_docs.c.text)).all())
    assert sorted(texts[c] for c in after) == ["late ana 0", "late ana 1"]


def test_a_memory_created_before_an_erasure_is_erased_whichever_arrives_first(
        erased_subject: tuple[list[StoredEvent], list[str], list[str]], tmp_path: Path) -> None:
    events, before, _ = erased_subject
    early_last = ([e for e in events if e.stream_id not in before]
                  + [e for e in events if e.stream_id in before])
    fed = _search_digest_fed(early_last, tmp_path / "a.db")
    with create_engine(f"sqlite:///{tmp_path / 'a.db'}").connect() as conn:
        texts = dict(conn.execute(select(search_docs.c.cube_id, search_docs.c.text)).all())
    assert [texts[c] for c in before] == ["", ""]  # no erased text, in any order
    assert fed == _search_digest_fed(events, tmp_path / "b.db")


# -- who maintains what -------------------------------------------------------------------------


def test_each_read_model_has_one_consumer_and_what_it_reads_goes_with_it(
        sqlite_url: str, broker: TansuBroker, tmp_path: Path) -> None:
    settings = KafkaSettings(broker.bootstrap, topic=f"events-{uuid.uuid4().hex[:8]}",
                             partitions=3)
    core = [p for p in kafka_projections() if p.name != "search"]
    store = EventStore.open(sqlite_url)
    try:
        projector = KafkaProjector(store, settings, projections=core)
        indexer = KafkaProjector(store, settings, projections=[SearchProjection()],
                                 name="indexer")
        with pytest.raises(ReadModelClaimed, match=r"search \(maintained by consumer 'indexer'"):
            KafkaProjector(store, settings, projections=[SearchProjection()], name="other")
        with pytest.raises(ReadModelClaimed, match=r"maintains .*to change what it maintains"):
            KafkaProjector(store, settings, projections=core[:2])  # "projector", another set
        with pytest.raises(ValueError, match="cubes reads versions"):
            KafkaProjector(store, settings, name="worker", projections=[
                p for p in default_projections() if p.name == "cubes"])
        assert KafkaFedRunner(store).consumers() == {
            **{p.name: "projector" for p in core}, "search": "indexer"}
        projector.close()
        indexer.close()
    finally:
        store.close()
    with pytest.raises(ConfigError, match=r"unknown read model.*nonsense"):
        chosen_projections(["nonsense"])
    with pytest.raises(ConfigError, match="cubes reads versions"):
        chosen_projections(excluded=["versions"])
    assert [p.name for p in chosen_projections(excluded=["search"])] == [
        p.name for p in default_projections() if p.name != "search"]


def test_every_read_model_that_reads_another_is_declared() -> None:
    """``READS`` must name every other read model's table a projection's module queries."""
    owner = {table.name: p.name for p in default_projections() for table in p.tables}
    for projection in default_projections():
        source = Path(importlib.import_module(type(projection).__module__).__file__ or "")
        queried = set(re.findall(r"\bFROM (\w+)", source.read_text()))
        others = {owner[t] for t in queried if t in owner} - {projection.name}
        if source.name == "_readmodels.py":  # the module of several read models, each its own
            continue
        assert others <= READS.get(projection.name, frozenset()), (projection.name, others)


# -- rebuild ------------------------------------------------------------------------------------


def test_a_rebuild_in_the_distributed_mode_has_the_consumers_read_the_topic_again(
        database_url: str, broker: TansuBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(broker.bootstrap, topic=topic, partitions=3, batch_size=300)
    core = [p for p in kafka_projections() if p.name != "search"]
    names = {p.name for p in core} | {"search"}
    monkeypatch.setenv("MEMWARDEN_KAFKA_BOOTSTRAP", broker.bootstrap)
    monkeypatch.setenv("MEMWARDEN_KAFKA_TOPIC", topic)
    with MemWarden.open(settings=distributed(database_url, broker, topic)) as mw:
        store = mw.store
        bulk_workload(store, 1000)
        sql_fed = ProjectionRunner(store, [*core, SearchProjection()])
        sql_fed.create_schema()
        sql_fed.catch_up()
        expected = digest(store, names)
        Relay(store, settings).publish_available()
        projector = KafkaProjector(store, settings, projections=core)
        indexer = KafkaProjector(store, settings, projections=[SearchProjection()],
                                 name="indexer")

        def converged() -> bool:
            projector.step(0.3)
            indexer.step(0.3)
            return digest(store, names) == expected

        until(converged, what="the first build from Kafka")  # on top of emptied SQL-fed rows

        def rebuild(*args: str) -> dict[str, list[str]]:
            result = CliRunner().invoke(cli, ["--db", database_url, "projections", "rebuild",
                                              *args, "--json"])
            assert result.exit_code == 0, result.output
            return json.loads(result.stdout)  # type: ignore[no-any-return]

        # Only the indexer's read model: the projector keeps its rows and offsets.
        marks = projector.marks()
        assert rebuild("search") == {"emptied": ["search"], "consumers": ["indexer"]}
        assert digest(store, names) != expected
        until(converged, what="the indexer to rebuild the search index")
        assert (indexer.loop.restarts, projector.loop.restarts) == (1, 0)
        assert projector.marks() == marks

        # Everything, with both running: emptied at once, then built again from offset 0.
        applied = projector.loop.totals.applied
        assert rebuild() == {"emptied": sorted(p.name for p in default_projections()),
                             "consumers": ["indexer", "projector"]}
        with store.engine.connect() as conn:
            for table in (cubes, consumer_offsets):
                assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 0
        until(converged, what="both consumers to rebuild from offset 0")
        assert projector.loop.restarts == 1
        assert projector.loop.totals.applied == applied + store.head_position()
        result = CliRunner().invoke(cli, ["--db", database_url, "projections", "rebuild", "nope"])
        assert result.exit_code != 0 and "unknown projections" in result.output
        projector.close()
        indexer.close()


def test_a_consumer_rebuilds_read_models_of_another_revision_from_the_beginning(
        sqlite_url: str, broker: TansuBroker, caplog: pytest.LogCaptureFixture) -> None:
    """An upgrade that bumps a read model's revision (its tables or stored form changed): the
    consumer of the new release claims its read models as for the first time, and until it has,
    a reader waiting for them is refused rather than served the old form."""
    settings = KafkaSettings(broker.bootstrap, topic=f"events-{uuid.uuid4().hex[:8]}",
                             partitions=3)
    core = [p for p in kafka_projections() if p.name != "search"]
    names = {p.name for p in core}
    store = EventStore.open(sqlite_url)
    try:
        workload(store, 60)
        head = store.head_position()
        sql_fed = ProjectionRunner(store, core)
        sql_fed.create_schema()
        sql_fed.catch_up()
        expected = digest(store, names)
        Relay(store, settings).publish_available()

        def converged(projector: KafkaProjector) -> Callable[[], bool]:
            return lambda: not projector.step(0.3).received and digest(store, names) == expected

        first = KafkaProjector(store, settings, projections=core)
        until(converged(first), what="the first build from Kafka")
        first.close()
        with store.engine.begin() as conn:  # as an older release recorded it
            conn.execute(text("UPDATE projection_revisions SET revision = 1 "
                              "WHERE name = 'versions'"))
        fed = KafkaFedRunner(store)
        fed.create_schema()  # opening the database: the SQL side leaves it to the consumer
        assert "read model versions was built at revision 1 and this release reads revision 2: " \
               "its Kafka consumer rebuilds it" in caplog.text
        with pytest.raises(ReadModelsBehind, match=r"versions were built by an older release"):
            fed.wait_until_applied(["cubes", "versions"], timeout=0.1)

        upgraded = KafkaProjector(store, settings, projections=core)
        assert upgraded.building
        assert KafkaFedRunner(store).building() == {"projector": head}
        refused = (r"Kafka consumer 'projector' is building api_keys, audit, .*versions from "
                   r"the beginning of the topic: try again shortly")
        with pytest.raises(ReadModelsBehind, match=refused):
            KafkaFedRunner(store).refuse_while_building()
        with store.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(cubes)).scalar_one() == 0
            assert dict(conn.execute(text("SELECT name, revision FROM projection_revisions"))
                        .all())["versions"] == 2
        until(converged(upgraded), what="the rebuild from the beginning of the topic")
        assert upgraded.loop.totals.applied == head
        assert KafkaFedRunner(store).wait_until_applied(["cubes", "versions"]) == head
        assert KafkaFedRunner(store).building() == {}
        KafkaFedRunner(store).refuse_while_building()  # served again
        upgraded.close()

        again = KafkaProjector(store, settings, projections=core)  # at this release: resumes
        assert not again.building
        again.close()
        assert digest(store, names) == expected
    finally:
        store.close()


# -- the lifecycle worker -----------------------------------------------------------------------


def test_the_worker_sweeps_the_kafka_fed_read_models_once_they_have_applied_the_log(
        postgres_url: str, broker: TansuBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MEMWARDEN_KAFKA_BOOTSTRAP", broker.bootstrap)
    monkeypatch.setenv("MEMWARDEN_KAFKA_TOPIC", topic)
    with MemWarden.open(settings=distributed(postgres_url, broker, topic),
                        actor="ops:test") as mw:
        refused = CliRunner().invoke(cli, ["--db", postgres_url, "work", "--once"])
        assert refused.exit_code != 0
        assert "no Kafka consumer maintains the read model(s) retention" in refused.output

        relay = memwarden_process(postgres_url, broker, topic, "relay")
        projector = memwarden_process(postgres_url, broker, topic, "project", "--source",
                                      "kafka")
        worker = None
        try:
            due = [mw.add(f"short-lived {n}", tenant="acme", owner="user:ana",
                          metadata={"ttl_seconds": 1}).cube_id for n in range(3)]
            held = mw.add("short-lived, held", tenant="acme", owner="user:ana",
                          metadata={"ttl_seconds": 1}).cube_id
            kept = mw.add("lives on", tenant="acme", owner="user:ana").cube_id

            def visible(cube_id: str) -> bool:
                return mw._backend.reads.cube(cube_id) is not None

            until(lambda: all(visible(c) for c in [*due, held, kept]),
                  what="the memories in the Kafka-fed read models")
            # The projector pauses; the hold is in the log only, not in the read models.
            projector.send_signal(signal.SIGSTOP)
            mw.place_hold(reason="litigation", case_id="case-1", memory=held)
            time.sleep(1.2)  # every ttl has run out
            worker = memwarden_process(postgres_url, broker, topic, "work", "--once", "--json")
            time.sleep(3)
            assert worker.poll() is None, "the sweep must wait for the read models"
            projector.send_signal(signal.SIGCONT)
            report = json.loads(finished(worker, timeout=90))["retention"]
            assert report["counts"].get("expired") == len(due)
            assert report["counts"].get("held") == 1

            def state(cube_id: str) -> str | None:
                found = mw._backend.reads.cube(cube_id)
                return None if found is None else found.state

            until(lambda: all(state(c) == "expired" for c in due),
                  what="the expiries to come back through Kafka")
            assert state(held) == "active" and state(kept) == "active"
        finally:
            projector.send_signal(signal.SIGCONT)
            for process in (relay, projector, worker):
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in (relay, projector):
                finished(process)


def test_the_worker_skips_a_sweep_it_cannot_run_and_tries_again(
        sqlite_url: str, broker: TansuBroker) -> None:
    """Scheduled (no --once), a sweep refused because no consumer maintains the read models is
    reported and tried again at the next interval; SIGTERM stops the worker cleanly."""
    topic = f"events-{uuid.uuid4().hex[:8]}"
    with MemWarden.open(settings=distributed(sqlite_url, broker, topic)):
        pass  # the schema, as the api would have made it
    worker = memwarden_process(sqlite_url, broker, topic, "work", "--every", "1")
    assert worker.stderr is not None
    skipped = []
    for line in worker.stderr:
        if "sweep skipped" in line:
            skipped.append(line)
            if len(skipped) == 2:
                break
    worker.send_signal(signal.SIGTERM)
    assert finished(worker) == ""
    assert all("no Kafka consumer maintains the read model(s) retention" in s for s in skipped)


def _caught_up(mw: MemWarden, settings: KafkaSettings, *consumers: KafkaProjector) -> int:
    """Relay the log and step ``consumers`` until each has applied it up to the head now."""
    Relay(mw.store, settings).publish_available()
    head = mw.store.head_position()

    def applied() -> bool:
        for consumer in consumers:
            consumer.step(0.3)
        return all(c.loop.applied_through(head) >= head for c in consumers)

    until(applied, what="the consumers to apply the log")
    return head


SHRED_AFTER_AN_HOUR = RetentionPolicy.parse(
    "version: 1\nrules:\n  - name: shred\n    match: {tenant: acme}\n    erase_after: 1h\n")


@pytest.mark.parametrize("outcome", ["expired", "erased"])
def test_a_hold_placed_during_a_sweep_is_honoured_though_the_read_models_lag(
        postgres_url: str, broker: TansuBroker, outcome: str) -> None:
    """The sweep's re-checks (inside each batch's append; before each erasure) read the holds
    placed since the sweep began from the SQL log: the Kafka-fed holds table has not got them
    (the projector stopped before), and would let the sweep expire or erase a held memory."""
    topic = f"events-{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(broker.bootstrap, topic=topic, partitions=3)
    erasing = outcome == "erased"
    with MemWarden.open(settings=distributed(postgres_url, broker, topic),
                        actor="ops:test") as mw:
        due = [mw.add(f"short-lived {n}", tenant="acme", owner=f"user:{n}",
                      metadata=None if erasing else {"ttl_seconds": 60}).cube_id
               for n in range(4)]
        projector = KafkaProjector(mw.store, settings)
        try:
            _caught_up(mw, settings, projector)  # the projector stops here
            worker = RetentionWorker(mw, SHRED_AFTER_AN_HOUR if erasing else None,
                                     clock=lambda: utcnow() + timedelta(hours=2), batch_size=2)
            batches = worker._due_batches
            placed: list[str] = []

            def placing_holds_meanwhile(*args: Any) -> Iterator[list[RetentionFacts]]:
                for batch in batches(*args):
                    # Decided without it (the holds were read at the start), applied after.
                    placed.append(batch[0].cube_id)
                    mw.place_hold(reason="litigation", case_id=f"case-{len(placed)}",
                                  memory=batch[0].cube_id)
                    yield batch

            worker._due_batches = placing_holds_meanwhile  # type: ignore[method-assign]
            report = worker.run()
        finally:
            projector.close()
        assert len(placed) == 2 and set(placed) < set(due)
        assert report.counts["held"] == 2 and report.counts[outcome] == 2
        with mw.store.engine.connect() as conn:
            holds = conn.execute(select(func.count()).select_from(retention_holds)).scalar_one()
        assert holds == 0, "the Kafka-fed holds table never had them"
        event_type = "MemoryContentErased" if erasing else "MemoryExpired"
        for cube_id in due:
            done = any(e.type == event_type for e in mw.store.read_stream(cube_id))
            assert done == (cube_id not in placed)


def test_projections_status_shows_each_kafka_consumer_and_its_lag(
        sqlite_url: str, broker: TansuBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(broker.bootstrap, topic=topic, partitions=3)
    monkeypatch.setenv("MEMWARDEN_KAFKA_BOOTSTRAP", broker.bootstrap)
    monkeypatch.setenv("MEMWARDEN_KAFKA_TOPIC", topic)

    def status(*options: str) -> Any:
        result = CliRunner().invoke(cli, ["--db", sqlite_url, "projections", "status",
                                          *options])
        assert result.exit_code == 0, result.output
        return json.loads(result.output) if options else result.output

    every = {p.name for p in default_projections()}
    with MemWarden.open(settings=distributed(sqlite_url, broker, topic)) as mw:
        before = status("--json")
        assert before["consumers"] == [] and before["relay"] == {}
        assert set(before["unmaintained"]) == every
        workload(mw.store, 30)
        projector = KafkaProjector(mw.store, settings, projections=[
            p for p in default_projections() if p.name != "search"])
        indexer = KafkaProjector(mw.store, settings, projections=[SearchProjection()],
                                 name="indexer")
        try:
            claimed_at = mw.store.head_position()  # each must apply the log this far
            assert {c["consumer"]: c["building_through"] for c in status("--json")[
                "consumers"]} == {"projector": claimed_at, "indexer": claimed_at}
            assert "until" in status()  # (the table may wrap "until position N")
            head = _caught_up(mw, settings, projector, indexer)
            now = status("--json")
            assert now["head"] == head and now["relay"] == {topic: head}
            assert now["unmaintained"] == []
            consumers = {c["consumer"]: c for c in now["consumers"]}
            assert set(consumers) == {"projector", "indexer"}
            assert consumers["indexer"]["read_models"] == ["search"]
            assert set(consumers["projector"]["read_models"]) == every - {"search"}
            for consumer in consumers.values():
                partitions = consumer["partitions"]
                assert {p["topic"] for p in partitions} == {topic}
                assert {p["partition"] for p in partitions} <= {0, 1, 2}
                # One record per event on a fresh topic: the offsets add up to the log.
                assert sum(p["next_offset"] for p in partitions) == head
                assert (consumer["applied_through"], consumer["behind"]) == (head, 0)
                assert consumer["building_through"] is None
            mw.add("written since", tenant="acme", owner="user:ana")  # in the log only
            later = status("--json")
            new_head = mw.store.head_position()
            assert later["head"] == new_head > head and later["relay"] == {topic: head}
            assert all((c["applied_through"], c["behind"]) == (head, new_head - head)
                       for c in later["consumers"])
            text = status()
            assert "indexer" in text and "projector" in text
            assert f"relay acknowledged: {topic} up to {head} ({new_head - head} behind)" in text
        finally:
            projector.close()
            indexer.close()


@dataclass
class _DistributedApi:
    """A distributed-mode handle, its topic, an admin key's headers, and the REST API on it."""

    mw: MemWarden
    settings: KafkaSettings
    key_id: str
    headers: dict[str, str]
    client: Any

    def consumer(self, name: str, *projections: Projection) -> KafkaProjector:
        return KafkaProjector(self.mw.store, self.settings, projections=list(projections),
                              name=name)


@contextmanager
def _distributed_api(sqlite_url: str, broker: TansuBroker) -> Iterator[_DistributedApi]:
    from fastapi.testclient import TestClient

    from governance import ApiKeys, create_app

    topic = f"events-{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(broker.bootstrap, topic=topic, partitions=3)
    with MemWarden.open(settings=distributed(sqlite_url, broker, topic),
                        actor="ops:test") as mw:
        key = ApiKeys(mw).issue(tenant="*", subject="admin:api", role="admin")
        with TestClient(create_app(mw)) as client:
            yield _DistributedApi(mw, settings, key.record.key_id,
                                  {"Authorization": f"Bearer {key.secret}"}, client)


def test_a_lagging_read_model_is_its_own_problem_in_the_api(
        sqlite_url: str, broker: TansuBroker) -> None:
    """``ReadModelsBehind`` is 503 with Retry-After and names the read model, not "database
    unavailable"."""
    from governance._api import READ_MODELS_RETRY_AFTER_SECONDS
    from projections._keys import ApiKeysProjection

    with _distributed_api(sqlite_url, broker) as api:
        # Only the keys are fed (to authenticate): no consumer maintains retention.
        keys = api.consumer("keys", ApiKeysProjection())
        try:
            _caught_up(api.mw, api.settings, keys)
        finally:
            keys.close()
        answer = api.client.post("/v1/retention/run", json={}, headers=api.headers)
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == str(READ_MODELS_RETRY_AFTER_SECONDS)
    problem = answer.json()
    assert "database is unavailable" not in problem["detail"]
    assert "read models are behind" in problem["detail"] and "retention" in problem["detail"]


@pytest.fixture
def builds_read_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API reads the consumers' builds on every request (no cached view)."""
    from projections import _kafka_projector

    monkeypatch.setattr(_kafka_projector, "BUILD_CHECK_SECONDS", 0.0)


@pytest.mark.usefixtures("builds_read_afresh")
def test_the_api_answers_503_while_a_consumer_builds_its_read_models(
        sqlite_url: str, broker: TansuBroker) -> None:
    """A consumer building read models from the beginning of the topic (its first start, an
    upgrade, a rebuild) has applied part of the log: here the keys, so a valid key would be
    refused as unknown. The API says "not yet" instead, and serves again once it is through."""
    from projections._keys import ApiKeysProjection

    with _distributed_api(sqlite_url, broker) as api:
        keys = api.consumer("keys", ApiKeysProjection())
        try:
            building = api.client.get("/v1/keys", headers=api.headers)
            _caught_up(api.mw, api.settings, keys)
            built = api.client.get("/v1/keys", headers=api.headers)
        finally:
            keys.close()
    assert building.status_code == 503, building.text
    assert building.headers["Retry-After"]
    assert ("Kafka consumer 'keys' is building api_keys from the beginning of the topic"
            in building.json()["detail"])
    assert built.status_code == 200, built.text
    assert api.key_id in [k["id"] for k in built.json()["items"]]


@pytest.mark.usefixtures("builds_read_afresh")
def test_a_search_index_being_built_refuses_searches_only(
        sqlite_url: str, broker: TansuBroker) -> None:
    """The search indexer rebuilding its index (``memwarden projections rebuild search``) takes
    the search route out of service, not the memories and keys the other consumers serve."""
    from projections._keys import ApiKeysProjection

    query = {"query": "anything", "tenant": "acme"}
    with _distributed_api(sqlite_url, broker) as api:
        keys = api.consumer("keys", ApiKeysProjection())
        indexer = api.consumer("indexer", SearchProjection())
        try:
            _caught_up(api.mw, api.settings, keys)
            listed = api.client.get("/v1/keys", headers=api.headers)
            refused = api.client.post("/v1/search", json=query, headers=api.headers)
            _caught_up(api.mw, api.settings, indexer)
            searched = api.client.post("/v1/search", json=query, headers=api.headers)
        finally:
            keys.close()
            indexer.close()
    assert listed.status_code == 200, listed.text
    assert refused.status_code == 503, refused.text
    assert "Kafka consumer 'indexer' is building search" in refused.json()["detail"]
    assert searched.status_code == 200, searched.text


# -- the conversion worker ---------------------------------------------------------------------

CONVERSION_POLICY = """
selection: {min_reads: 1, stable_days: 0, expiry_margin_days: 0}
worker:
  scopes:
    - {tenant: globex-travel, owner: 'customer:aiko', kinds: [activation]}
"""


def test_the_worker_converts_once_the_kafka_fed_read_models_have_applied_the_log(
        sqlite_url: str, broker: TansuBroker, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``memwarden work`` runs the conversion worker too (a real KV cache of the tiny base
    model: one forward pass). A pass waits for the Kafka-fed read models it decides from: one
    started before the projector applied the memories builds from them, not from nothing, and
    the next pass sees the artifact through Kafka and leaves it be."""
    import torch

    from governance import _basemodel
    from governance._conversion_worker import run_conversions

    torch.set_num_threads(1)  # two shared cores: one thread is faster for a model this small
    base = _basemodel.resolve(Settings(data_dir=str(tmp_path / "model")), environ={}).path
    policy = tmp_path / "conversion.yaml"
    policy.write_text(CONVERSION_POLICY)
    topic = f"events-{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(broker.bootstrap, topic=topic, partitions=3)
    for name, value in {"MEMWARDEN_BASE_MODEL": str(base), "MEMWARDEN_CONVERSION_POLICY":
                        str(policy), "MEMWARDEN_KAFKA_BOOTSTRAP": broker.bootstrap,
                        "MEMWARDEN_KAFKA_TOPIC": topic, "MEMWARDEN_DATA_DIR":
                        str(tmp_path / "data")}.items():
        monkeypatch.setenv(name, value)
    work = ["--db", sqlite_url, "work", "--once", "--only", "conversion", "--json"]
    with MemWarden.open(settings=replace(distributed(sqlite_url, broker, topic),
                                         data_dir=str(tmp_path / "data")),
                        actor="ops:test") as mw:
        refused = CliRunner().invoke(cli, work)
        assert refused.exit_code != 0
        assert ("no Kafka consumer maintains the read model(s) cubes, lineage, retention, "
                "usage") in " ".join(refused.output.split())  # (rich wraps lines)
        projector = KafkaProjector(mw.store, settings)
        try:
            _caught_up(mw, settings, projector)  # (claims the read models)
            memories = {mw.add(text, tenant="globex-travel", owner="customer:aiko").cube_id
                        for text in ("Aiko prefers window seats.", "Aiko is vegetarian.")}
            _caught_up(mw, settings, projector)
            for cube_id in memories:  # read once each (min_reads: 1): events the projector
                mw.get(cube_id)       # has not applied when the pass starts
            mw.flush_reads()
            Relay(mw.store, settings).publish_available()
            passes: list[Any] = []
            waiting = Running(lambda stop: passes.append(run_conversions(mw)))
            time.sleep(1.0)
            assert not passes, "the pass must wait for the read models"
            until(lambda: (projector.step(0.3), bool(passes))[1],
                  what="the pass, once the projector has applied the log")
            waiting.join()
            [action] = passes[0]
            assert (action.kind, action.outcome, action.why) == (
                "activation", "built", "no artifact yet")
            _caught_up(mw, settings, projector)  # the artifact, through Kafka
            built = mw.load_activation(action.cube_id).record
            assert {source.cube_id for source in built.sources} == memories
            again = CliRunner().invoke(cli, work)
            assert again.exit_code == 0, again.output
            [action] = json.loads(again.output)["conversion"]
            assert (action["outcome"], action["artifact"]) == ("up to date", None)
        finally:
            projector.close()
