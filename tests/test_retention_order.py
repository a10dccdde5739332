"""The ``retention`` read model does not depend on how events of different streams interleave.

Kafka keeps each stream's order, not the order between streams (one partition per key), so a
projector fed from it may see a read before the memory's creation, a decay after a later read, or
a subject's erasure before the creation of one of its memories. Here the same log is applied in
log order and in shuffled orders that keep each stream's own order, straight to the projection
(no broker: the Kafka-fed digest test covers the transport); every order must give the same rows.
The planner must then schedule from those rows alike: its pending marks are not order-bound.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from eventstore import (
    ANY_VERSION,
    EventContext,
    EventStore,
    NewEvent,
    StoredEvent,
    utcnow,
)
from governance import Limits, MemCube
from governance._retention import RetentionPolicy, plan
from projections import ProjectionRunner
from projections._readmodels import VersionsProjection
from projections._retention import RetentionProjection, retention_schedule
from projections._state import (
    MEMORY_ACCESSED,
    MEMORY_DECAYED,
    MEMORY_TIER_CHANGED,
    SUBJECT_ERASED,
)

LIMITS = Limits()
POLICY = RetentionPolicy.parse("""
rules:
  - name: everything
    tiers: {long_term_after: 30d}
    decay: {half_life: 20d, threshold: 0.2}
""")


def _read(cube_id: str, version: int, at: str) -> dict[str, object]:
    return {"cube_id": cube_id, "version": version, "at": at}


def write_log(store: EventStore) -> list[StoredEvent]:
    """Creations, reads on the tenant's reads stream, decays before and after reads, a tier move
    and a subject erasure, interleaved as a live system writes them."""
    rng = random.Random(5)
    ctx = EventContext(actor="agent:a", tenant="acme")
    cubes = [f"m-{n:02d}" for n in range(12)]
    for n, cube_id in enumerate(cubes):
        owner = "user:erased" if n % 4 == 0 else f"user:{n % 3}"
        store.append(cube_id, MemCube.create(owner=owner, kind="plaintext", text=f"memo {n}",
                                             metadata={"priority": n % 10}, reason=None,
                                             limits=LIMITS), expected_version=0, context=ctx)
        if n >= 2:
            reads = [_read(c, 1, f"2026-0{1 + n % 9}-01T00:00:00+00:00")
                     for c in rng.sample(cubes[:n], 2)]
            store.append("reads:acme", [NewEvent(MEMORY_ACCESSED, {"reads": reads})],
                         expected_version=ANY_VERSION, context=ctx)
        if n >= 3:  # a decay of an earlier memory: some get read again afterwards, some not
            decayed = cubes[n - 3]
            store.append(decayed, [NewEvent(MEMORY_DECAYED, {"score": 0.1, "rule": "everything",
                                                             "threshold": 0.2})],
                         expected_version=ANY_VERSION, context=ctx)
        if n == 6:
            store.append("subject:user:erased", [NewEvent(SUBJECT_ERASED, {
                "subject": "user:erased", "tenant": "acme", "reason": "request",
                "memories": 2, "versions": 2, "keys_destroyed": 1})],
                expected_version=ANY_VERSION, context=ctx)
    store.append(cubes[5], [NewEvent(MEMORY_TIER_CHANGED, {
        "from_tier": "working", "to_tier": "long_term", "rule": "everything",
        "reason": "idle"})], expected_version=ANY_VERSION, context=ctx)
    return store.read_all(0, limit=10_000)


def shuffled(events: Sequence[StoredEvent], seed: int) -> list[StoredEvent]:
    """The events in a random interleaving of their streams, each stream in its own order."""
    rng = random.Random(seed)
    streams: dict[str, list[StoredEvent]] = {}
    for event in events:
        streams.setdefault(event.stream_id, []).append(event)
    queues = [list(reversed(s)) for s in streams.values()]
    order = []
    while queues:
        queue = rng.choice(queues)
        order.append(queue.pop())
        if not queue:
            queues.remove(queue)
    return order


def fed(tmp_path: Path, name: str, events: Sequence[StoredEvent],
        batch: int) -> tuple[str, list[tuple[object, ...]]]:
    """The digest of retention fed ``events`` in this order, ``batch`` at a time (with versions,
    which it reads); and the schedule the planner makes from them."""
    store = EventStore.open(f"sqlite:///{tmp_path / name}")
    try:
        store.create_schema()
        runner = ProjectionRunner(store, [VersionsProjection(), RetentionProjection()])
        runner.create_schema()
        with store.write_connection() as conn, conn.begin():
            for start in range(0, len(events), batch):
                for projection in runner.projections:
                    projection.apply(conn, events[start:start + batch])
        with store.write_connection() as conn, conn.begin():
            plan(conn, POLICY)
        with store.engine.connect() as conn:
            schedule = [tuple(row) for row in conn.execute(
                retention_schedule.select().order_by(retention_schedule.c.cube_id))]
        # Only retention's rows: this fake SubjectErased destroyed no key, so the versions
        # fed before it keep the text that a real erasure would have made unreadable.
        return ProjectionRunner(store, [RetentionProjection()]).digest(), schedule
    finally:
        store.close()


@pytest.mark.parametrize("seed", range(6))
def test_retention_rows_do_not_depend_on_how_streams_interleave(
        sqlite_url: str, tmp_path: Path, seed: int) -> None:
    store = EventStore.open(sqlite_url)
    try:
        store.create_schema()
        events = write_log(store)
    finally:
        store.close()
    in_log_order = fed(tmp_path, "ordered.db", events, batch=1)
    reordered = shuffled(events, seed)
    assert [e.position for e in reordered] != [e.position for e in events]
    assert fed(tmp_path, f"one-{seed}.db", reordered, batch=1) == in_log_order
    assert fed(tmp_path, f"batched-{seed}.db", reordered, batch=7) == in_log_order


def test_in_log_order_a_decay_read_later_and_an_erased_subject_show(database_url: str) -> None:
    """What the order-free merges must still mean: a decay undone by a later read is not in
    force, an unread one is; the erased subject's memories written before it are erased."""
    store = EventStore.open(database_url)
    try:
        store.create_schema()
        events = write_log(store)
        runner = ProjectionRunner(store, [VersionsProjection(), RetentionProjection()])
        runner.create_schema()
        runner.catch_up()
        with store.engine.connect() as conn:
            rows = {r.cube_id: r for r in conn.execute(
                RetentionProjection.tables[0].select())}
    finally:
        store.close()
    decays = {e.stream_id: e.position for e in events if e.type == MEMORY_DECAYED}
    last_read = {}
    for event in events:
        if event.type == MEMORY_ACCESSED:
            for read in event.payload["reads"]:
                last_read[read["cube_id"]] = event.position
    for cube_id, at in decays.items():
        undone = last_read.get(cube_id, 0) > at
        assert rows[cube_id].decayed == (0 if undone else at), cube_id
    assert {c for c, r in rows.items() if r.erased} == {"m-00", "m-04"}  # m-08: written later
    assert all(r.version > 0 for r in rows.values())
    assert rows["m-05"].tier == "long_term"
    assert utcnow() - rows["m-11"].created_at < timedelta(minutes=5)
