"""The cold archive holds a cold memory's text; the hot read models hold none of it (issue 6).

A memory moved to ``cold_archive`` must leave no plaintext in ``cubes``, ``versions`` or the
search documents and their full-text index: every version's text is kept compressed (in
``retention_archive``, and search's own ``search_archive``) until a recall, which gives back
get, history, versions, diffs and as-of exactly as before. Rebuilt read models equal the
incremental ones whether the memory is cold or recalled, however the log is batched, and in
whatever order the streams interleave (Kafka); an erasure drops the archived copies too. Each
test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from retention_fixtures import FakeClock
from sqlalchemy import Engine, select, text

from eventstore import EventStore, StoredEvent
from governance import Diff, MemWarden, Principal, StateConflict
from governance._retention import RetentionPolicy, RetentionWorker
from projections import MemoryState, ProjectionRunner
from projections._archive import retention_archive
from projections._readmodels import CubesProjection, VersionsProjection
from projections._search import SearchProjection, search_archive, search_docs
from projections._tables import cubes, versions

COLD = RetentionPolicy.parse("rules:\n  - name: cold\n    tiers: {cold_archive_after: 10d}\n")
FIRST = "The quartz lighthouse ledger keeps every harbour invoice for the port."
SECOND = "The quartz lighthouse ledger now keeps harbour invoices for the whole coast."
WORDS = ("quartz", "lighthouse", "ledger", "harbour", "invoice")


@pytest.fixture
def mw(database_url: str) -> Iterator[MemWarden]:
    with MemWarden.open(database_url, actor="ops:retention") as handle:
        yield handle


def officer(mw: MemWarden) -> MemWarden:
    return mw.as_principal(Principal("officer:o", "acme", "compliance_officer"))


def send_cold(mw: MemWarden, clock: FakeClock, moved: int | None = 1) -> None:
    """Let the idle memories go cold: a sweep 11 days later (``moved`` of them, if given)."""
    clock.now += timedelta(days=11)
    done = RetentionWorker(mw, COLD, clock=clock).run().counts["cold_archive"]
    assert moved is None or done == moved


def write_history(mw: MemWarden) -> str:
    """A memory with content versions, a metadata change and a rollback."""
    cube_id = mw.add(FIRST, tenant="acme", owner="user:ana", metadata={"labels": ["ops"]}).cube_id
    mw.update(cube_id, text=SECOND, reason="new policy")
    mw.update(cube_id, metadata={"priority": 8}, reason="important")
    mw.rollback(cube_id, 1, reason="the old policy stands")
    return cube_id


@dataclass(frozen=True)
class Readable:
    """What a reader gets of a memory: its text, history, a version, a diff and an as-of."""

    text: str
    history: list[tuple[Any, ...]]
    version: MemoryState
    diff: Diff
    as_of: MemoryState


def everything_readable(mw: MemWarden, cube_id: str, before: int) -> Readable:
    return Readable(
        mw.get(cube_id).text,
        [(v.state.version, v.state.text, v.state.metadata, v.state.changed, v.reason)
         for v in mw.history(cube_id)],
        mw.version(cube_id, 2).state, mw.diff(cube_id, 1, 2),
        mw.as_of(cube_id, position=before))


def hot_text(engine: Engine, cube_id: str) -> list[str]:
    """Every text the hot read models hold of the memory, straight from their tables."""
    with engine.connect() as conn:
        found = list(conn.execute(select(cubes.c.text).where(cubes.c.cube_id == cube_id))
                     .scalars())
        found += conn.execute(select(versions.c.text).where(versions.c.cube_id == cube_id)
                              .order_by(versions.c.version)).scalars().all()
        found += conn.execute(select(search_docs.c.text).where(search_docs.c.cube_id == cube_id)
                              ).scalars().all()
    return [t for t in found if t]


def indexed(engine: Engine, word: str) -> int:
    """Documents the full-text index finds the word in, whatever their tier."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            sql = "SELECT count(*) FROM search_fts WHERE search_fts MATCH :word"
        else:
            sql = "SELECT count(*) FROM search_docs WHERE tsv @@ plainto_tsquery('english', :word)"
        return int(conn.execute(text(sql), {"word": word}).scalar_one())


def archived(engine: Engine) -> tuple[list[str], int]:
    with engine.connect() as conn:
        return (list(conn.execute(select(retention_archive.c.cube_id)).scalars()),
                len(conn.execute(select(search_archive.c.doc_id)).all()))


def rebuilt_digests(mw: MemWarden) -> set[str]:
    """The digest after rebuilding each text-holding read model alone, then all of them, then
    all of them one event per batch (cold moves and recalls folded, not set in SQL)."""
    found = set()
    for names in (["versions"], ["cubes"], ["search"], None):
        mw.rebuild_projections(names)
        found.add(mw.projector.digest())
    mw.projector.rebuild(batch_size=1)
    found.add(mw.projector.digest())
    return found


def test_a_cold_memory_leaves_no_text_in_the_hot_read_models_and_a_recall_brings_it_back(
        mw: MemWarden) -> None:
    cube_id = write_history(mw)
    warm = mw.add("A warm note about the quartz harbour.", tenant="acme", owner="user:bo").cube_id
    before = mw.store.head_position()
    readable = everything_readable(mw, cube_id, before)
    clock = FakeClock()
    send_cold(mw, clock, moved=2)
    officer(mw).recall(warm, reason="still in use")  # (at once: the control memory)
    engine = mw.store.engine

    assert hot_text(engine, cube_id) == []
    for word in ("lighthouse", "ledger", "invoice"):
        assert indexed(engine, word) == 0
    assert indexed(engine, "quartz") == 1  # the warm note only
    assert archived(engine) == ([cube_id], 1)
    with pytest.raises(StateConflict, match="cold archive: recall it"):
        mw.history(cube_id)
    mw.flush_reads()
    cold_digest = mw.projector.digest()
    assert rebuilt_digests(mw) == {cold_digest}
    assert hot_text(engine, cube_id) == []

    recalled = officer(mw).recall(cube_id, reason="the auditor asked")
    assert recalled.text == FIRST and recalled.archived_bytes > 0
    after = everything_readable(mw, cube_id, before)
    history = readable.history
    assert after.text == readable.text == FIRST
    assert after.history[:len(history)] == history
    assert [h[1] for h in after.history[len(history):]] == [FIRST, FIRST]  # cold, recall
    assert (after.version, after.diff, after.as_of) == (
        readable.version, readable.diff, readable.as_of)
    assert [r.cube_id for r in mw.search("lighthouse ledger")] == [cube_id]
    assert archived(engine) == ([], 0)
    mw.flush_reads()
    recalled_digest = mw.projector.digest()
    assert rebuilt_digests(mw) == {recalled_digest}

    # Cold again after more history: every version's text goes, and comes back again.
    mw.update(cube_id, text=SECOND, reason="the new policy after all")
    send_cold(mw, clock, moved=2)
    assert hot_text(engine, cube_id) == [] and indexed(engine, "lighthouse") == 0
    mw.flush_reads()
    assert rebuilt_digests(mw) == {mw.projector.digest()}
    officer(mw).recall(cube_id, reason="again")
    texts = [v.state.text for v in mw.history(cube_id)]
    assert texts[:len(history)] == [h[1] for h in history]
    assert texts[len(history):] == [FIRST, FIRST, SECOND, SECOND, SECOND]


def test_export_gives_a_cold_memory_s_text_and_erasure_drops_the_archive(
        mw: MemWarden) -> None:
    kept = mw.add(FIRST, tenant="acme", owner="user:ana").cube_id
    gone = mw.add(SECOND, tenant="acme", owner="user:ana").cube_id
    shredded = mw.add("A harbour note to be shredded.", tenant="acme", owner="user:bo").cube_id
    send_cold(mw, FakeClock(), moved=3)
    export = mw.export_subject("user:ana", tenant="acme")
    texts = {m["id"]: (m["text"], [v["text"] for v in m["versions"]])
             for m in export["memories"]}
    assert texts == {kept: (FIRST, [FIRST, FIRST]), gone: (SECOND, [SECOND, SECOND])}

    mw.erase_memory_content(shredded, reason="erase-after")
    mw.erase_subject("user:ana", tenant="acme", reason="GDPR Art. 17")
    assert archived(mw.store.engine) == ([], 0)
    with pytest.raises(StateConflict, match="no archived content"):
        officer(mw).recall(kept, reason="too late")
    mw.flush_reads()
    assert rebuilt_digests(mw) == {mw.projector.digest()}


def test_today_s_code_would_have_kept_the_text_hot(mw: MemWarden) -> None:
    """The regression this issue fixes, stated plainly: after the sweep, the text is nowhere in
    the rows of the hot read models."""
    cube_id = mw.add(FIRST, tenant="acme", owner="user:ana").cube_id
    send_cold(mw, FakeClock())
    with mw.store.engine.connect() as conn:
        rows = [repr(tuple(row)) for table in ("cubes", "versions", "search_docs")
                for row in conn.execute(text(f"SELECT * FROM {table}"))]
    assert cube_id in " ".join(rows) and not any(word in " ".join(rows) for word in WORDS)


# -- Kafka: streams in another interleaving ----------------------------------------------------


def _shuffled(events: Sequence[StoredEvent], seed: int) -> list[StoredEvent]:
    """The events in a random interleaving of their streams, each stream in its own order."""
    rng = random.Random(seed)
    queues: dict[str, list[StoredEvent]] = {}
    for event in events:
        queues.setdefault(event.stream_id, []).append(event)
    order = []
    while queues:
        stream = rng.choice(sorted(queues))
        order.append(queues[stream].pop(0))
        if not queues[stream]:
            del queues[stream]
    return order


def _fed(path: Path, events: Sequence[StoredEvent], batch: int) -> str:
    store = EventStore.open(f"sqlite:///{path}")
    try:
        runner = ProjectionRunner(store, [CubesProjection(), VersionsProjection(),
                                          SearchProjection()])
        runner.create_schema()
        with store.write_connection() as conn, conn.begin():
            for start in range(0, len(events), batch):
                for projection in runner.projections:
                    projection.apply(conn, events[start:start + batch])
        return runner.digest()
    finally:
        store.close()


@pytest.mark.parametrize("seed", range(4))
def test_the_archive_does_not_depend_on_how_streams_interleave(
        sqlite_url: str, tmp_path: Path, seed: int) -> None:
    """Fed from Kafka, a memory's cold move and recall can arrive before or after a subject's
    erasure and other memories' events: the text-holding read models must not care."""
    with MemWarden.open(sqlite_url, actor="ops:retention") as mw:
        clock = FakeClock()
        ids = [mw.add(f"{word} note number {n}", tenant="acme",
                      owner="user:ana" if n % 2 else "user:bo").cube_id
               for n, word in enumerate(WORDS)]
        mw.update(ids[0], text="an updated quartz note", reason="more")
        send_cold(mw, clock, moved=5)
        officer(mw).recall(ids[0], reason="needed")
        officer(mw).recall(ids[1], reason="needed")
        mw.update(ids[0], text="quartz, once more", reason="again")
        mw.erase_subject("user:ana", tenant="acme", reason="asked")
        send_cold(mw, clock, moved=None)
        events = mw.store.read_all(0, limit=None)
    expected = _fed(tmp_path / "log-order.db", events, len(events))
    # In log order too, in batches that part a cold move from the recall and update after it.
    assert _fed(tmp_path / "batched.db", events, 2 + seed) == expected
    assert _fed(tmp_path / "shuffled.db", _shuffled(events, seed), 7) == expected
