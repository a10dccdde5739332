"""Read models that change shape reach existing databases: ``Projection.revision``.

``metadata.create_all`` only creates what is missing, so a database built by an older release
kept a changed index, and rows in an older stored form, until someone rebuilt them by hand.
Each read model now declares the revision of its form, the database records the one each was
built at, and opening the database rebuilds (tables dropped and re-created, then the log
replayed) those built at another revision, once, whoever opens it concurrently. Here a database
of the release before today's changes is simulated from a current one: the narrow
``retention_schedule_tenant_due`` index and the cold archive's former stored form (a cold
memory's text in the hot read models, one compressed text in ``retention_archive``, no
``search_archive``), and no ``projection_revisions`` table. Each test runs on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Connection, Engine, text

from eventstore import EventContext, EventStore, NewEvent, utcnow
from governance import MemWarden, Principal
from governance._retention import RetentionPolicy, RetentionWorker
from projections import AuditProjection, ProjectionRunner, default_projections
from projections._archive import compress_text, decompress_text, text_as_of, unpack
from projections._runner import recorded_revisions

COLD = RetentionPolicy.parse("rules:\n  - name: cold\n    tiers: {cold_archive_after: 10d}\n")
COLD_TEXT = "The quartz lighthouse ledger keeps every harbour invoice for the port."
BUMPED = ("cubes", "versions", "retention", "search")
"""The read models today's changes gave a revision 2."""
NARROW_INDEX = ("CREATE INDEX retention_schedule_tenant_due "
                "ON retention_schedule (tenant, due_at, cube_id)")


class FakeClock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now


def populate(mw: MemWarden) -> str:
    """Memories of every kind of history, one of them cold (its text archived), one recalled;
    returns the cold one."""
    cold = mw.add(COLD_TEXT, tenant="acme", owner="user:ana", metadata={"labels": ["ops"]}).cube_id
    mw.update(cold, text=COLD_TEXT + " And the coast.", reason="wider")
    mw.rollback(cold, 1, reason="the old policy stands")
    recalled = mw.add("A note about the harbour tides.", tenant="acme", owner="user:bo").cube_id
    clock = FakeClock()
    clock.now += timedelta(days=11)
    assert RetentionWorker(mw, COLD, clock=clock).run().counts["cold_archive"] == 2
    officer = mw.as_principal(Principal("officer:o", "acme", "compliance_officer"))
    officer.recall(recalled, reason="still in use")
    mw.add("A warm note.", tenant="globex", owner="user:cy")
    mw.flush_reads()
    return cold


def settled_digest(url: str) -> str:
    with MemWarden.open(url, actor="agent:test") as mw:
        mw.flush_reads()
        return mw.projector.digest()


def as_the_previous_release_left_it(conn: Connection) -> None:
    """Rewrite a current database into the form the release before today's changes built: no
    recorded revisions, the narrow schedule index, cold texts hot with the old archive rows."""
    conn.execute(text("DROP TABLE projection_revisions"))
    conn.execute(text("DROP INDEX retention_schedule_tenant_due"))
    conn.execute(text(NARROW_INDEX))
    archive = conn.execute(text("SELECT cube_id, compressed FROM retention_archive")).all()
    assert archive, "the workload left no cold memory"
    for cube_id, blob in archive:
        texts = unpack(blob)
        for (version,) in conn.execute(text("SELECT version FROM versions WHERE cube_id = :c"),
                                       {"c": cube_id}).all():
            conn.execute(text("UPDATE versions SET text = :t WHERE cube_id = :c AND version = :v"),
                         {"t": text_as_of(texts, version), "c": cube_id, "v": version})
        latest = texts[max(texts)]
        conn.execute(text("UPDATE cubes SET text = :t WHERE cube_id = :c"),
                     {"t": latest, "c": cube_id})
        conn.execute(text("UPDATE retention_archive SET compressed = :b WHERE cube_id = :c"),
                     {"b": compress_text(latest), "c": cube_id})
    for doc_id, blob in conn.execute(text("SELECT doc_id, compressed FROM search_archive")).all():
        conn.execute(text("UPDATE search_docs SET text = :t WHERE doc_id = :d"),
                     {"t": decompress_text(blob), "d": doc_id})
    conn.execute(text("DROP TABLE search_archive"))


def schedule_index(engine: Engine) -> str:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            sql = "SELECT sql FROM sqlite_master WHERE name = 'retention_schedule_tenant_due'"
        else:
            sql = ("SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() "
                   "AND indexname = 'retention_schedule_tenant_due'")
        return str(conn.execute(text(sql)).scalar_one())


def hot_texts(engine: Engine, cube_id: str) -> set[str]:
    """The texts the hot read models hold of the memory."""
    with engine.connect() as conn:
        return set(conn.execute(text(
            "SELECT text FROM cubes WHERE cube_id = :c UNION ALL "
            "SELECT text FROM versions WHERE cube_id = :c UNION ALL "
            "SELECT text FROM search_docs WHERE cube_id = :c"), {"c": cube_id}).scalars())


def revisions_now(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return recorded_revisions(conn)


def current_revisions() -> dict[str, int]:
    return {p.name: p.revision for p in default_projections()}


def rebuild_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "memwarden.projections" and "rebuilding it from the log" in r.getMessage()]


def test_a_database_of_the_previous_release_is_rebuilt_when_it_opens(
        database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with MemWarden.open(database_url, actor="agent:test") as mw:
        cold = populate(mw)
        expected = mw.projector.digest()
        assert "decay_at" in schedule_index(mw.store.engine)
        with mw.store.engine.begin() as conn:
            as_the_previous_release_left_it(conn)
        assert "decay_at" not in schedule_index(mw.store.engine)
        assert hot_texts(mw.store.engine, cold) != {""}

    caplog.set_level(logging.WARNING, logger="memwarden.projections")
    with MemWarden.open(database_url, actor="agent:test") as mw:
        engine = mw.store.engine
        assert sorted(rebuild_warnings(caplog)) == [
            f"read model {name} was built at revision 1 and this release builds revision 2: "
            "rebuilding it from the log" for name in sorted(BUMPED)]
        assert "decay_at" in schedule_index(engine)
        assert revisions_now(engine) == current_revisions()
        assert mw.projector.digest() == expected
        assert hot_texts(engine, cold) == {""}
        officer = mw.as_principal(Principal("officer:o", "acme", "compliance_officer"))
        assert officer.recall(cold, reason="the auditor asked").text == COLD_TEXT
        assert [r.cube_id for r in mw.search("lighthouse ledger")] == [cold]
        # The schedule was re-created empty: the next sweep plans every memory again, and the
        # three hot ones (the one just recalled too) go cold.
        clock = FakeClock()
        clock.now += timedelta(days=11)
        assert RetentionWorker(mw, COLD, clock=clock).run().counts["cold_archive"] == 3
        mw.flush_reads()
        incremental = mw.projector.digest()
        mw.rebuild_projections()
        assert mw.projector.digest() == incremental


def row_stamps(engine: Engine) -> list[tuple[str, str]]:
    """The transaction that last wrote each revision and checkpoint row (PostgreSQL's xmin)."""
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(
            "SELECT name, xmin::text FROM projection_revisions UNION ALL "
            "SELECT name, xmin::text FROM projection_checkpoints ORDER BY 1, 2"))]


def test_a_database_at_the_current_revisions_opens_without_a_rebuild(
        database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with MemWarden.open(database_url, actor="agent:test") as mw:
        populate(mw)
        assert revisions_now(mw.store.engine) == current_revisions()
        expected = mw.projector.digest()
        postgres = mw.store.engine.dialect.name == "postgresql"
        stamps = row_stamps(mw.store.engine) if postgres else []
    caplog.set_level(logging.WARNING, logger="memwarden.projections")

    with MemWarden.open(database_url, actor="agent:test") as mw:
        assert rebuild_warnings(caplog) == []
        assert mw.projector.digest() == expected
        if postgres:  # not one of those rows written again
            assert row_stamps(mw.store.engine) == stamps


class CountedAudit(AuditProjection):
    """The audit read model at a chosen revision, counting its re-creations."""

    def __init__(self, revision: int) -> None:
        self.revision = revision
        self.recreated = 0

    def recreate(self, conn: Connection) -> None:
        self.recreated += 1
        super().recreate(conn)


def opened(store: EventStore, revision: int) -> CountedAudit:
    projection = CountedAudit(revision)
    runner = ProjectionRunner(store, [projection])
    runner.create_schema()
    runner.catch_up_if_behind()
    return projection


def audited(store: EventStore) -> list[int]:
    with store.engine.connect() as conn:
        return list(conn.execute(text("SELECT position FROM audit ORDER BY position")).scalars())


def test_a_read_model_is_rebuilt_only_when_its_revision_changes(database_url: str) -> None:
    """A new read model is created at the code's revision; reopening at it rebuilds nothing;
    another revision (up, or down: an older release) rebuilds it once and records it."""
    store = EventStore.open(database_url)
    try:
        _append_some(store)
        head = store.head_position()
        assert opened(store, 1).recreated == 0
        assert opened(store, 1).recreated == 0
        assert revisions_now(store.engine)["audit"] == 1
        upgraded = opened(store, 2)
        assert upgraded.recreated == 1
        assert audited(store) == list(range(1, head + 1))
        assert revisions_now(store.engine)["audit"] == 2
        assert opened(store, 2).recreated == 0
        assert opened(store, 1).recreated == 1
        assert audited(store) == list(range(1, head + 1))
    finally:
        store.close()


def _append_some(store: EventStore) -> None:
    for n in range(5):
        store.append(f"note-{n}", [NewEvent("NoteWritten", {"n": n})], expected_version=0,
                     context=EventContext(actor="agent:test", tenant="acme"))


@pytest.mark.parametrize("outdated", [["cubes"], ["versions"], ["search"], ["retention"],
                                      ["cubes", "versions"]])
def test_a_read_model_rebuilt_alone_reads_the_others_as_they_are(
        database_url: str, outdated: Sequence[str]) -> None:
    """``cubes`` reads ``versions``' rows: rebuilt alone it reads them at the head, rebuilt with
    it they are replayed together; either way the rows equal a fresh build's."""
    with MemWarden.open(database_url, actor="agent:test") as mw:
        populate(mw)
        expected = mw.projector.digest()
        with mw.store.engine.begin() as conn:
            for name in outdated:
                conn.execute(text("UPDATE projection_revisions SET revision = 0 WHERE name = :n"),
                             {"n": name})
    with MemWarden.open(database_url, actor="agent:test") as mw:
        assert mw.projector.digest() == expected
        assert revisions_now(mw.store.engine) == current_revisions()


def test_databases_opened_at_the_same_time_rebuild_once(
        database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with MemWarden.open(database_url, actor="agent:test") as mw:
        populate(mw)
        expected = mw.projector.digest()
        with mw.store.engine.begin() as conn:
            as_the_previous_release_left_it(conn)
    caplog.set_level(logging.WARNING, logger="memwarden.projections")
    start = threading.Barrier(2)
    digests: list[str] = []
    failures: list[BaseException] = []

    def open_it() -> None:
        try:
            start.wait()
            with MemWarden.open(database_url, actor="agent:test") as opened:
                digests.append(opened.projector.digest())
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=open_it) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []
    assert digests == [expected, expected]
    assert len(rebuild_warnings(caplog)) == len(BUMPED)

