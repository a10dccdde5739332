"""The event store contract, run against every backend (``database_url``: SQLite and PostgreSQL).

DESIGN §2: an immutable, hash-chained, gap-free log with optimistic concurrency per stream,
atomic multi-event appends, append-only enforcement by the database itself, and schema evolution
by upcasting on read.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import multiprocessing
import sqlite3
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from log_tampering import delete_event, overwrite_column
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlite_locks import shorten_sqlite_waits, write_lock_held

from eventstore import (
    ANY_VERSION,
    GENESIS_HASH,
    ConcurrencyError,
    EventContext,
    EventStore,
    EventStoreError,
    IntegrityError,
    NewEvent,
    StoredEvent,
    StreamAppend,
    UpcastError,
    Upcasters,
    _store,
    canonical_json,
)
from eventstore._envelope import event_hash
from eventstore._errors import BackendError
from eventstore._gc import collection_paused

CONTEXT = EventContext(actor="agent:test", tenant="acme")


def note(text: str = "a note", *, schema_version: int = 1, **extra: Any) -> NewEvent:
    return NewEvent("NoteTaken", {"text": text, **extra}, schema_version=schema_version)


def positions(events: list[StoredEvent]) -> list[int]:
    return [e.position for e in events]


def fetch_all(store: EventStore) -> list[StoredEvent]:
    return list(store.iter_all())


@pytest.fixture
def store(database_url: str) -> Iterator[EventStore]:
    opened = EventStore.open(database_url)
    yield opened
    opened.close()


@pytest.fixture
def three_notes(store: EventStore) -> list[StoredEvent]:
    return store.append("notes", [note("one"), note("two"), note("three")], expected_version=0,
                        context=CONTEXT)


# -- the envelope --------------------------------------------------------------------------


def test_every_envelope_field_round_trips_through_the_log(store: EventStore) -> None:
    occurred = datetime(2026, 3, 1, 9, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    event_id = uuid.uuid4()
    context = EventContext(actor="agent:planner", tenant="acme", on_behalf_of="user:ana",
                           correlation_id="corr-1", causation_id="cause-1")
    payload = {"text": "Ana prefers aisle seats ✈", "nested": {"tags": ["a", "b"], "n": 3},
               "none": None}
    new = NewEvent("NoteTaken", payload, schema_version=4, occurred_at=occurred,
                   event_id=event_id)

    [appended] = store.append("notes", [new], expected_version=0, context=context)
    [read] = store.read_stream("notes")

    assert read == appended
    assert (read.event_id, read.stream_id, read.stream_version, read.position) == (
        event_id, "notes", 1, 1)
    assert (read.type, read.schema_version, read.payload) == ("NoteTaken", 4, payload)
    assert (read.tenant, read.actor, read.on_behalf_of) == ("acme", "agent:planner", "user:ana")
    assert (read.correlation_id, read.causation_id) == ("corr-1", "cause-1")
    assert read.occurred_at == occurred
    assert read.recorded_at.tzinfo is not None
    assert read.prev_hash == GENESIS_HASH
    assert len(read.hash) == 64 and int(read.hash, 16) >= 0


def test_each_event_chains_the_hash_of_the_one_before(store: EventStore) -> None:
    store.append("a", [note(), note()], expected_version=0, context=CONTEXT)
    store.append("b", [note()], expected_version=0, context=CONTEXT)

    log = fetch_all(store)

    assert positions(log) == [1, 2, 3]
    assert [e.prev_hash for e in log] == [GENESIS_HASH, log[0].hash, log[1].hash]
    assert len({e.hash for e in log}) == 3


def test_new_event_ids_are_uuids_in_the_order_they_were_made() -> None:
    """Version 7 (RFC 9562): an id made a millisecond later sorts after, so new events land at
    the end of the unique index on event_id rather than on a random page of it."""
    first = note().event_id
    time.sleep(0.002)
    later = [note().event_id for _ in range(1000)]
    assert {(i.version, i.variant) for i in [first, *later]} == {(7, uuid.RFC_4122)}
    assert all(str(first) < str(i) for i in later)
    assert len(set(later)) == len(later)
    assert abs((first.int >> 80) - time.time() * 1000) < 60_000  # Unix time in milliseconds


def test_recorded_at_never_goes_backwards(store: EventStore) -> None:
    for n in range(5):
        store.append("notes", [note(str(n))], expected_version=ANY_VERSION, context=CONTEXT)

    recorded = [e.recorded_at for e in fetch_all(store)]

    assert recorded == sorted(recorded)


# -- optimistic concurrency and atomicity ---------------------------------------------------


@pytest.mark.parametrize("stale", [0, 1, 2, 4])
def test_a_stale_expected_version_raises_and_writes_nothing(
        store: EventStore, three_notes: list[StoredEvent], stale: int) -> None:
    with pytest.raises(ConcurrencyError) as raised:
        store.append("notes", [note("late")], expected_version=stale, context=CONTEXT)

    assert (raised.value.stream_id, raised.value.expected_version) == ("notes", stale)
    assert raised.value.actual_version == 3
    assert isinstance(raised.value, EventStoreError)
    assert store.head_position() == 3
    assert store.read_stream("notes") == three_notes


def test_the_current_expected_version_appends_after_it(
        store: EventStore, three_notes: list[StoredEvent]) -> None:
    [fourth] = store.append("notes", [note("four")], expected_version=3, context=CONTEXT)

    assert (fourth.stream_version, fourth.position) == (4, 4)


def test_any_version_appends_wherever_the_stream_is(store: EventStore) -> None:
    first = store.append("reads", [note()], expected_version=ANY_VERSION, context=CONTEXT)
    second = store.append("reads", [note(), note()], expected_version=ANY_VERSION,
                          context=CONTEXT)

    assert [e.stream_version for e in first + second] == [1, 2, 3]
    assert store.stream_version("reads") == 3


def test_events_of_one_append_many_commit_together(store: EventStore) -> None:
    stored = store.append_many([
        StreamAppend("a", [note("a1"), note("a2")], 0, CONTEXT),
        StreamAppend("b", [note("b1")], 0, CONTEXT),
    ])

    assert [(e.stream_id, e.stream_version, e.position) for e in stored] == [
        ("a", 1, 1), ("a", 2, 2), ("b", 1, 3)]
    assert fetch_all(store) == stored


def test_a_stale_stream_in_append_many_leaves_none_of_its_events(
        store: EventStore, three_notes: list[StoredEvent]) -> None:
    with pytest.raises(ConcurrencyError) as raised:
        store.append_many([
            StreamAppend("fresh", [note("f1"), note("f2")], 0, CONTEXT),
            StreamAppend("notes", [note("late")], 1, CONTEXT),
        ])

    assert raised.value.stream_id == "notes"
    assert store.read_stream("fresh") == []
    assert fetch_all(store) == three_notes


def test_a_failure_after_the_insert_rolls_the_whole_append_back(
        store: EventStore, three_notes: list[StoredEvent]) -> None:
    class Crash(Exception):
        pass

    def crash(_conn: object, stored: list[StoredEvent]) -> None:
        assert positions(stored) == [4, 5, 6]
        raise Crash

    with pytest.raises(Crash):
        store.append_many([
            StreamAppend("fresh", [note(), note()], 0, CONTEXT),
            StreamAppend("notes", [note()], 3, CONTEXT),
        ], then=crash)

    assert fetch_all(store) == three_notes
    [next_event] = store.append("fresh", [note()], expected_version=0, context=CONTEXT)
    assert next_event.position == 4


# -- reading ------------------------------------------------------------------------------


@pytest.fixture
def interleaved(store: EventStore) -> list[StoredEvent]:
    """Positions 1-6 alternating between streams a (acme) and b (globex)."""
    other = EventContext(actor="agent:other", tenant="globex")
    stored: list[StoredEvent] = []
    for n in range(3):
        stored += store.append("a", [note(f"a{n}")], expected_version=n, context=CONTEXT)
        stored += store.append("b", [NewEvent("Flagged", {"n": n})], expected_version=n,
                               context=other)
    return stored


def test_read_stream_returns_one_stream_in_version_order(
        store: EventStore, interleaved: list[StoredEvent]) -> None:
    stream = store.read_stream("a")

    assert [(e.stream_version, e.position) for e in stream] == [(1, 1), (2, 3), (3, 5)]
    assert [e.payload["text"] for e in stream] == ["a0", "a1", "a2"]
    assert store.read_stream("missing") == []


def test_read_stream_from_a_version_and_up_to_a_position(
        store: EventStore, interleaved: list[StoredEvent]) -> None:
    assert positions(store.read_stream("a", after_version=1)) == [3, 5]
    assert positions(store.read_stream("a", up_to_position=4)) == [1, 3]


def test_read_all_from_a_position(store: EventStore, interleaved: list[StoredEvent]) -> None:
    assert store.read_all(0) == interleaved
    assert store.read_all(4) == interleaved[4:]
    assert store.read_all(6) == []
    assert positions(store.read_all(1, limit=2)) == [2, 3]
    assert positions(store.read_all(0, up_to_position=3)) == [1, 2, 3]


def test_read_all_filters_by_tenant_and_type(
        store: EventStore, interleaved: list[StoredEvent]) -> None:
    assert positions(store.read_all(0, tenant="globex")) == [2, 4, 6]
    assert positions(store.read_all(0, types=["NoteTaken"])) == [1, 3, 5]
    assert positions(store.read_all(2, tenant="acme", types=["NoteTaken"])) == [3, 5]


def test_iter_all_pages_through_the_whole_log(
        store: EventStore, interleaved: list[StoredEvent]) -> None:
    assert list(store.iter_all(page_size=4)) == interleaved
    assert list(store.iter_all(3, page_size=2)) == interleaved[3:]


def test_position_at_names_the_last_event_recorded_by_then(
        store: EventStore, interleaved: list[StoredEvent]) -> None:
    moment = interleaved[2].recorded_at
    recorded_by_then = [e.position for e in interleaved if e.recorded_at <= moment]

    assert store.position_at(moment) == max(recorded_by_then) >= 3
    assert store.position_at(interleaved[0].recorded_at - timedelta(seconds=1)) == 0
    assert store.position_at(datetime.now(UTC) + timedelta(days=1)) == 6


# -- append-only, enforced by the database -------------------------------------------------


@pytest.mark.parametrize("statement", [
    "UPDATE events SET actor = 'mallory' WHERE position = 2",
    "UPDATE events SET payload = '{}'",
    "DELETE FROM events WHERE position = 3",
    "DELETE FROM events",
])
def test_the_database_rejects_changes_to_stored_events(
        store: EventStore, three_notes: list[StoredEvent], statement: str) -> None:
    with pytest.raises(sa_exc.DBAPIError, match="append-only"), store.engine.begin() as conn:
        conn.execute(text(statement))

    assert fetch_all(store) == three_notes


def test_postgres_rejects_truncate_of_the_events_table(postgres_url: str) -> None:
    store = EventStore.open(postgres_url)
    try:
        store.append("notes", [note()], expected_version=0, context=CONTEXT)
        with pytest.raises(sa_exc.DBAPIError, match="append-only"), store.engine.begin() as conn:
            conn.execute(text("TRUNCATE events"))
        assert store.head_position() == 1
    finally:
        store.close()


def test_an_append_only_trigger_of_another_body_is_replaced_when_the_store_opens(
        database_url: str) -> None:
    """A database whose triggers an older release (or a hand) left permissive gets the current
    ones at the next open: a change to the triggers reaches existing databases."""
    store = EventStore.open(database_url)
    store.append("notes", [note()], expected_version=0, context=CONTEXT)
    with store.engine.begin() as conn:
        if store.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER events_no_update")
            conn.exec_driver_sql("CREATE TRIGGER events_no_update BEFORE UPDATE ON events "
                                 "BEGIN SELECT 1; END")
        else:
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION memwarden_events_append_only() RETURNS trigger "
                "LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$")
            conn.exec_driver_sql("COMMENT ON FUNCTION memwarden_events_append_only() IS NULL")
    store.close()
    with store.engine.begin() as conn:  # (the old body lets an update through)
        conn.exec_driver_sql("UPDATE events SET actor = actor")
    store.engine.dispose()

    reopened = EventStore.open(database_url)
    try:
        with pytest.raises(sa_exc.DBAPIError, match="append-only"), \
                reopened.engine.begin() as conn:
            conn.execute(text("UPDATE events SET actor = 'mallory'"))
        assert reopened.verify().ok
    finally:
        reopened.close()


# -- the hash chain -----------------------------------------------------------------------


@pytest.fixture
def five_events(store: EventStore) -> list[StoredEvent]:
    stored = store.append("a", [note("one"), note("two")], expected_version=0, context=CONTEXT)
    stored += store.append("b", [note("three")], expected_version=0, context=CONTEXT)
    stored += store.append("a", [note("four"), note("five")], expected_version=2,
                           context=CONTEXT)
    return stored


def test_verify_passes_on_a_clean_log(store: EventStore, five_events: list[StoredEvent]) -> None:
    report = store.verify()

    assert report.ok
    assert (report.checked, report.head_position, report.first_break) == (5, 5, None)


def test_verify_passes_on_an_empty_log(store: EventStore) -> None:
    report = store.verify()

    assert report.ok and report.checked == 0


def test_verify_checks_page_by_page_and_reports_progress(
        store: EventStore, five_events: list[StoredEvent]) -> None:
    progress: list[tuple[int, int]] = []

    report = store.verify(page_size=2, on_progress=lambda done, head: progress.append((done, head)))

    assert report.ok and report.checked == 5
    assert progress == [(2, 5), (4, 5), (5, 5)]


@pytest.mark.parametrize(("column", "value"), [
    ("payload", '{"text":"forged"}'),
    ("actor", "agent:mallory"),
    ("stream_version", 7),
    ("prev_hash", "0" * 64),
    ("hash", "f" * 64),
])
def test_verify_names_the_event_whose_stored_row_was_changed(
        store: EventStore, five_events: list[StoredEvent], column: str, value: object) -> None:
    overwrite_column(store.engine, 3, column, value)

    report = store.verify()

    assert not report.ok and report.first_break is not None
    assert report.first_break.position == 3
    assert report.first_break.event_id == str(five_events[2].event_id)
    assert "hash" in report.first_break.reason
    assert report.checked == 2


def test_verify_names_an_event_deleted_from_the_middle(
        store: EventStore, five_events: list[StoredEvent]) -> None:
    delete_event(store.engine, 3)

    report = store.verify()

    assert not report.ok and report.first_break is not None
    assert "position 3 is missing" in report.first_break.reason
    assert report.first_break.position == 4
    assert report.checked == 2


# -- schema evolution ---------------------------------------------------------------------


def note_v1_to_v2(payload: Any) -> dict[str, Any]:
    return {"body": payload["text"], "language": "en"}


def note_v2_to_v3(payload: Any) -> dict[str, Any]:
    return {**payload, "tags": []}


def open_reader(url: str, *steps: tuple[int, Callable[[Any], Any]]) -> EventStore:
    upcasters = Upcasters()
    for from_version, step in steps:
        upcasters.register("NoteTaken", from_version, step)
    return EventStore.open(url, upcasters)


def test_an_old_event_is_read_upcast_to_the_current_schema(
        database_url: str, store: EventStore) -> None:
    store.append("notes", [note("hello")], expected_version=0, context=CONTEXT)
    reader = open_reader(database_url, (1, note_v1_to_v2), (2, note_v2_to_v3))
    try:
        [event] = reader.read_stream("notes")
        assert reader.read_all(0) == [event]
    finally:
        reader.close()

    assert event.schema_version == 3
    assert event.payload == {"body": "hello", "language": "en", "tags": []}


def test_upcasting_never_rewrites_the_stored_event(database_url: str, store: EventStore) -> None:
    [written] = store.append("notes", [note("hello")], expected_version=0, context=CONTEXT)
    reader = open_reader(database_url, (1, note_v1_to_v2))
    try:
        reader.read_stream("notes")
    finally:
        reader.close()

    assert store.read_stream("notes") == [written]
    assert store.verify().ok


def test_an_event_already_at_the_current_schema_is_left_alone(
        database_url: str, store: EventStore) -> None:
    store.append("notes", [NewEvent("NoteTaken", {"body": "hi", "language": "fr"},
                                    schema_version=2)], expected_version=0, context=CONTEXT)
    reader = open_reader(database_url, (1, note_v1_to_v2))
    try:
        [event] = reader.read_stream("notes")
    finally:
        reader.close()

    assert (event.schema_version, event.payload) == (2, {"body": "hi", "language": "fr"})


def test_a_missing_upcaster_step_raises(database_url: str, store: EventStore) -> None:
    store.append("notes", [note("hello")], expected_version=0, context=CONTEXT)
    reader = open_reader(database_url, (2, note_v2_to_v3))
    try:
        with pytest.raises(UpcastError, match="v1 -> v2"):
            reader.read_stream("notes")
    finally:
        reader.close()


def test_an_event_newer_than_the_reader_raises(database_url: str, store: EventStore) -> None:
    store.append("notes", [note("hello", schema_version=5)], expected_version=0, context=CONTEXT)
    reader = open_reader(database_url, (1, note_v1_to_v2))
    try:
        with pytest.raises(UpcastError, match="newer"):
            reader.read_all(0)
    finally:
        reader.close()


def test_an_upcaster_step_can_be_registered_only_once() -> None:
    upcasters = Upcasters()
    upcasters.register("NoteTaken", 1, note_v1_to_v2)

    with pytest.raises(ValueError, match="already registered"):
        upcasters.register("NoteTaken", 1, note_v1_to_v2)
    assert upcasters.current_version("NoteTaken") == 2
    assert upcasters.current_version("Unknown") == 1


# -- concurrent appenders -----------------------------------------------------------------
#
# Every worker opens its own store, then appends to a private stream (strict versions), to a
# shared stream (ANY_VERSION, in one transaction with its private stream) and to a contended
# stream (read the version, append expecting it, retry on ConcurrencyError). Meanwhile the test
# tails the log and fails on the first gap it sees.

EVENTS_PER_ROUND = 5


class StartLine(Protocol):
    """A barrier: every worker and the tailer start together."""

    def wait(self, timeout: float | None = None) -> object: ...

    def abort(self) -> None: ...


def append_as_worker(url: str, worker: int, rounds: int, open_lock: Any, ready: StartLine) -> int:
    # Opening is serialized: concurrent EventStore.open on PostgreSQL is a known bug, see
    # test_stores_opened_concurrently_on_one_postgres_schema_all_work.
    with open_lock:
        store = EventStore.open(url)
    context = EventContext(actor=f"worker:{worker}", tenant="acme")
    private = f"private-{worker}"
    appended = 0
    try:
        ready.wait(timeout=120)
        for n in range(rounds):
            appended += len(store.append(private, [note()], expected_version=2 * n,
                                         context=context))
            appended += len(store.append_many([
                StreamAppend("shared", [note(), note()], ANY_VERSION, context),
                StreamAppend(private, [note()], 2 * n + 1, context),
            ]))
            while True:
                version = store.stream_version("contended")
                try:
                    appended += len(store.append("contended", [note()],
                                                 expected_version=version, context=context))
                    break
                except ConcurrencyError:
                    continue
    finally:
        store.close()
    return appended


def append_in_process(url: str, worker: int, rounds: int, open_lock: Any, ready: StartLine,
                      results: Any) -> None:
    try:
        results.put(("ok", append_as_worker(url, worker, rounds, open_lock, ready)))
    except BaseException:
        ready.abort()
        results.put(("error", traceback.format_exc()))


def tail_without_gaps(store: EventStore, finished: Callable[[], bool]) -> int:
    """Read the log as it grows; every page must continue exactly where the last one ended."""
    seen = 0
    while True:
        done = finished()
        page = store.read_all(seen, limit=200)
        assert positions(page) == list(range(seen + 1, seen + 1 + len(page))), (
            f"gap after position {seen}: {positions(page)[:5]}...")
        if page:
            seen = page[-1].position
        elif done:
            return seen
        else:
            time.sleep(0.001)


def assert_log_of_finished_workers(store: EventStore, workers: int, rounds: int) -> None:
    total = workers * rounds * EVENTS_PER_ROUND
    assert positions(fetch_all(store)) == list(range(1, total + 1))
    assert store.stream_version("shared") == 2 * workers * rounds
    assert [e.stream_version for e in store.read_stream("contended")] == list(
        range(1, workers * rounds + 1))
    for worker in range(workers):
        assert store.stream_version(f"private-{worker}") == 2 * rounds
    assert store.verify().ok


@pytest.mark.parametrize(("workers", "rounds"), [(4, 15)])
def test_positions_stay_gap_free_under_concurrent_threads(
        database_url: str, store: EventStore, workers: int, rounds: int) -> None:
    open_lock, ready = threading.Lock(), threading.Barrier(workers + 1)
    threads_done: list[int] = []
    failures: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            threads_done.append(append_as_worker(database_url, worker, rounds, open_lock, ready))
        except BaseException as error:
            ready.abort()
            failures.append(error)
            threads_done.append(0)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    ready.wait(timeout=120)
    seen = tail_without_gaps(store, lambda: len(threads_done) == workers)
    for thread in threads:
        thread.join()

    assert failures == []
    assert sum(threads_done) == seen == workers * rounds * EVENTS_PER_ROUND
    assert_log_of_finished_workers(store, workers, rounds)


@pytest.mark.parametrize(("workers", "rounds"), [(3, 15)])
def test_positions_stay_gap_free_under_concurrent_processes(
        postgres_url: str, workers: int, rounds: int) -> None:
    store = EventStore.open(postgres_url)
    spawn = multiprocessing.get_context("spawn")
    open_lock, ready, results = spawn.Lock(), spawn.Barrier(workers + 1), spawn.Queue()
    processes = [spawn.Process(target=append_in_process,
                               args=(postgres_url, w, rounds, open_lock, ready, results))
                 for w in range(workers)]
    outcomes: list[tuple[str, Any]] = []

    def all_reported() -> bool:
        while len(outcomes) < workers and not results.empty():
            outcomes.append(results.get())
        return len(outcomes) == workers

    try:
        for process in processes:
            process.start()
        try:
            ready.wait(timeout=120)
        except threading.BrokenBarrierError:
            time.sleep(1)  # a worker that failed is reporting why
            all_reported()
            pytest.fail("the workers did not all start appending:\n"
                        + "\n".join(detail for status, detail in outcomes if status != "ok")
                        + "\nsessions of the database meanwhile:\n"
                        + "\n".join(_postgres_sessions(postgres_url)))
        seen = tail_without_gaps(store, all_reported)
        for process in processes:
            process.join(timeout=60)

        assert [detail for status, detail in outcomes if status != "ok"] == []
        assert sum(count for _, count in outcomes) == seen == workers * rounds * EVENTS_PER_ROUND
        assert_log_of_finished_workers(store, workers, rounds)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
        results.close()
        results.join_thread()
        store.close()


def _postgres_sessions(url: str) -> list[str]:
    """The other sessions of the database: what each runs, waits on, and who blocks it."""
    watcher = create_engine(url)
    try:
        with watcher.connect() as conn:
            return [" | ".join(map(str, row)) for row in conn.execute(text(
                "SELECT pid, state, wait_event_type, wait_event, pg_blocking_pids(pid), "
                "left(query, 160) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"))]
    finally:
        watcher.dispose()


# -- duplicate event ids, stores opened concurrently ---------------------------------------


def test_appending_an_event_id_twice_raises_an_event_store_error(store: EventStore) -> None:
    event = note()
    store.append("a", [event], expected_version=0, context=CONTEXT)

    with pytest.raises(IntegrityError, match="event_id") as raised:
        store.append("b", [event], expected_version=0, context=CONTEXT)

    assert isinstance(raised.value, EventStoreError)
    assert store.head_position() == 1
    assert store.read_stream("b") == []


def test_stores_opened_concurrently_on_one_postgres_schema_all_work(postgres_url: str) -> None:
    first = EventStore.open(postgres_url)
    opened: list[EventStore] = []
    failures: list[str] = []

    def open_second() -> None:
        try:
            opened.append(EventStore.open(postgres_url))
        except Exception as error:
            failures.append(f"{type(error).__name__}: {error}")

    try:
        # Hold the first store's schema set-up open until the second one waits behind it.
        with first.engine.connect() as setup:
            first.dialect.install_append_only_triggers(setup)
            second = threading.Thread(target=open_second)
            second.start()
            _wait_until_blocked_by(postgres_url, setup.execute(text("SELECT pg_backend_pid()"))
                                   .scalar_one())
            setup.commit()
            second.join(timeout=60)
    finally:
        for store in [first, *opened]:
            store.close()
        _collect_connections_leaked_by_failed_opens()

    assert failures == []
    assert len(opened) == 1


def test_a_schema_setup_never_waits_for_one_in_another_schema_of_the_database(
        postgres_url: str, other_postgres_url: str) -> None:
    """Two deployments in one PostgreSQL database: one's long setup (an upgrade's rebuild)
    holds the setup lock of its own schema only."""
    EventStore.open(postgres_url).close()
    upgrading = create_engine(postgres_url)
    appended: list[int] = []

    def open_and_append() -> None:
        other = EventStore.open(other_postgres_url)
        try:
            appended.extend(e.position for e in other.append(
                "s", [note()], expected_version=0, context=CONTEXT))
        finally:
            other.close()

    try:
        with _store.schema_setup(upgrading):
            beside = threading.Thread(target=open_and_append, daemon=True)
            beside.start()
            beside.join(timeout=30)
            assert not beside.is_alive(), "the other schema's store waited for this setup"
    finally:
        upgrading.dispose()
    assert appended == [1]


def test_opening_waits_out_a_sqlite_write_lock_held_past_the_busy_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Another process upgrading the database (a read-model rebuild: minutes at 10^6 events)
    holds SQLite's write lock longer than the busy timeout; a store opened meanwhile waits for
    it, saying so, rather than failing with "database is locked"."""
    path = tmp_path / "memwarden.db"
    EventStore.open(f"sqlite:///{path}").close()
    shorten_sqlite_waits(monkeypatch)
    with write_lock_held(path, seconds=1.5), caplog.at_level(logging.WARNING,
                                                             logger="memwarden.eventstore"):
        started = time.monotonic()
        store = EventStore.open(f"sqlite:///{path}")
    try:
        assert time.monotonic() - started >= 1.0  # it did wait for the lock
        assert "waiting for another process holding the database's write lock" in caplog.text
        store.append("s", [note()], expected_version=0, context=CONTEXT)
        assert store.head_position() == 1
        with store.engine.connect() as conn:  # the pooled connection's own timeout is back
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 300
    finally:
        store.close()


def test_opening_gives_up_on_a_sqlite_write_lock_held_past_its_patience(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "memwarden.db"
    EventStore.open(f"sqlite:///{path}").close()
    monkeypatch.setattr(_store, "SCHEMA_SETUP_PATIENCE_SECONDS", 0.5)
    monkeypatch.setattr(_store, "SCHEMA_SETUP_ATTEMPT_MS", 100)
    holding = sqlite3.connect(path, isolation_level=None)
    holding.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BackendError, match="database is locked"):
            EventStore.open(f"sqlite:///{path}")
    finally:
        holding.close()
    _collect_connections_leaked_by_failed_opens()


def _collect_connections_leaked_by_failed_opens() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _wait_until_blocked_by(url: str, blocker_pid: int) -> None:
    watcher = create_engine(url)
    try:
        with watcher.connect() as conn:
            for _ in range(3000):
                waiting = conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE :blocker = ANY(pg_blocking_pids(pid))"), {"blocker": blocker_pid}
                ).scalar_one()
                if waiting:
                    return
                conn.rollback()
                time.sleep(0.01)
        raise AssertionError("the second store never waited for the first one's schema set-up")
    finally:
        watcher.dispose()


_TEXTS = st.one_of(st.none(), st.text(max_size=30))


@given(position=st.integers(min_value=0, max_value=2**63 - 1),
       stream_version=st.integers(min_value=1, max_value=2**31),
       schema_version=st.integers(min_value=1, max_value=5),
       stream_id=st.text(min_size=1, max_size=30), type_=st.text(min_size=1, max_size=20),
       tenant=_TEXTS, actor=st.text(min_size=1, max_size=20), on_behalf_of=_TEXTS,
       correlation_id=_TEXTS, causation_id=_TEXTS, payload=st.dictionaries(
           st.text(max_size=8), st.one_of(st.none(), st.integers(), st.text(max_size=20))),
       offset_minutes=st.integers(min_value=-600, max_value=600))
@settings(max_examples=300, deadline=None)
def test_the_hash_is_over_the_canonical_json_of_the_envelope(
        position: int, stream_version: int, schema_version: int, stream_id: str, type_: str,
        tenant: str | None, actor: str, on_behalf_of: str | None, correlation_id: str | None,
        causation_id: str | None, payload: dict[str, Any], offset_minutes: int) -> None:
    """The append path writes the hashed JSON by hand, without the dictionary: it must be the
    canonical JSON of that dictionary (what DESIGN §2 specifies and any verifier recomputes)."""
    event_id = uuid.uuid4()
    occurred_at = datetime.now(timezone(timedelta(minutes=offset_minutes)))
    recorded_at = datetime.now(UTC)
    payload_json = canonical_json(payload)
    envelope = {
        "position": position, "event_id": str(event_id), "stream_id": stream_id,
        "stream_version": stream_version, "type": type_, "schema_version": schema_version,
        "occurred_at": occurred_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "recorded_at": recorded_at.isoformat(timespec="microseconds"), "tenant": tenant,
        "actor": actor, "on_behalf_of": on_behalf_of, "correlation_id": correlation_id,
        "causation_id": causation_id, "payload": payload_json, "prev_hash": GENESIS_HASH,
    }
    expected = hashlib.sha256(canonical_json(envelope).encode()).hexdigest()
    assert event_hash(
        position=position, event_id=event_id, stream_id=stream_id,
        stream_version=stream_version, type=type_, schema_version=schema_version,
        occurred_at=occurred_at, recorded_at=recorded_at, tenant=tenant, actor=actor,
        on_behalf_of=on_behalf_of, correlation_id=correlation_id, causation_id=causation_id,
        payload_json=payload_json, prev_hash=GENESIS_HASH) == expected


# -- bulk work and the garbage collector ---------------------------------------------------


@pytest.fixture
def collection_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


@pytest.mark.usefixtures("collection_on")
def test_bulk_work_pauses_cyclic_collection_and_brings_it_back_however_it_ends() -> None:
    with collection_paused():
        assert not gc.isenabled()
        with collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled(), "an inner block ending must not resume it for the outer one"
    assert gc.isenabled()

    with pytest.raises(RuntimeError, match="bulk work failed"), collection_paused():
        raise RuntimeError("bulk work failed")
    assert gc.isenabled()


def test_bulk_work_leaves_collection_off_where_the_program_turned_it_off() -> None:
    was = gc.isenabled()
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled()
    finally:
        if was:
            gc.enable()


@pytest.mark.usefixtures("collection_on")
def test_collection_resumes_when_the_last_of_overlapping_bulk_work_ends() -> None:
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with collection_paused():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    with collection_paused():
        second_in.set()
        first_out.wait(5)
        assert not gc.isenabled(), "the other thread's work ending must not resume it for this"
    thread.join(5)
    assert gc.isenabled()


@pytest.mark.usefixtures("collection_on")
def test_an_append_and_what_runs_in_its_transaction_run_with_collection_paused(
        store: EventStore) -> None:
    seen: list[bool] = []
    store.append("notes", [note()], expected_version=0, context=CONTEXT,
                 then=lambda conn, events: seen.append(gc.isenabled()))
    assert seen == [False]
    assert gc.isenabled()
