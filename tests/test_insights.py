"""The dashboard's read model (``projections._insights``), on SQLite and PostgreSQL.

The kept counts must give exactly what a ``GROUP BY`` over the trail gives (the ``scan_*``
methods), for every tenant, type filter, window and bucket; must be the same rows whether built
event by event, rebuilt from position 0, or fed in another order (as a Kafka consumer sees
streams interleaved); and must be what the pages read (they still answer when the trail is gone).
The log spans days under a fake clock, so that windows start and end inside days and hours.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete

from eventstore import ANY_VERSION, EventContext, NewEvent, StreamAppend
from governance import MemCube, MemWarden
from governance._memcube import Limits
from projections import AuditFilter, ProjectionRunner, audit, reads
from projections._insights import (
    BUCKETS,
    Insights,
    InsightsProjection,
    activity_counts,
    counted,
)

START = datetime(2026, 3, 1, 22, 58, 30, tzinfo=UTC)
STEPS = [timedelta(0), timedelta(seconds=40), timedelta(minutes=7), timedelta(minutes=50),
         timedelta(hours=3, seconds=5), timedelta(hours=20), timedelta(days=1, hours=2),
         timedelta(seconds=13), timedelta(days=5, minutes=31), timedelta(minutes=30),
         timedelta(hours=1, minutes=1)]
"""Gaps between the transactions of the workload: within a minute, across minutes, hours, days."""
TENANTS = ("acme", "globex")


@dataclass
class Log:
    mw: MemWarden
    clock: list[datetime]

    @property
    def insights(self) -> Insights:
        return Insights(self.mw.store.engine)


def _memory(cube_id: str, tenant: str, n: int) -> StreamAppend:
    labels = ["sensitive"] if n % 3 == 0 else ["travel"]
    events = MemCube.create(owner=f"customer:{n % 4}", kind="plaintext", text=f"note {n}",
                            reason="learned", metadata={"labels": labels}, limits=Limits())
    return StreamAppend(cube_id, events, 0, EventContext(actor=f"agent:{n % 3}", tenant=tenant))


def _update(cube_id: str, tenant: str, n: int) -> StreamAppend:
    content = _memory(cube_id, tenant, n).events[0].payload["content"]
    return StreamAppend(cube_id, [NewEvent("MemoryUpdated", {
        "content": {**content, "text": f"note {n}, revised"}, "reason": "corrected"})],
        ANY_VERSION, EventContext(actor="agent:1", tenant=tenant))


def _reads(tenant: str, actor: str, cube_ids: list[str], at: datetime) -> StreamAppend:
    # The same memory twice in a batch counts once (as in the ``reads`` model).
    reads_ = [{"cube_id": c, "version": 1, "at": (at - timedelta(seconds=i * 25)).isoformat()}
              for i, c in enumerate([*cube_ids, cube_ids[0]])]
    return StreamAppend(f"reads:{tenant}", [NewEvent("MemoryAccessed", {"reads": reads_})],
                        ANY_VERSION, EventContext(actor=actor, tenant=tenant))


def _denial(tenant: str, actor: str, cube_id: str) -> StreamAppend:
    return StreamAppend(f"denials:{tenant}", [NewEvent("AccessDenied", {
        "action": "memory.read_content", "role": "agent", "key_id": None,
        "resource_kind": "memory", "resource_id": cube_id, "cube_id": cube_id,
        "denied_because": "no_rule", "reason": "no rule", "policy_revision": 1})],
        ANY_VERSION, EventContext(actor=actor, tenant=tenant))


@pytest.fixture
def log(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Log]:
    """Memories of two tenants written, updated, read and refused over a week of fake time."""
    monkeypatch.setenv("MEMWARDEN_KEY_FILE", str(tmp_path / "master.key"))
    monkeypatch.setenv("MEMWARDEN_PII_SCAN", "0")
    clock = [START]
    monkeypatch.setattr("eventstore._store.utcnow", lambda: clock[0])
    with MemWarden.open(database_url, actor="admin:root") as mw:
        created: dict[str, list[str]] = {t: [] for t in TENANTS}
        for step, gap in enumerate(STEPS):
            clock[0] += gap
            appends = []
            for tenant in TENANTS[: 1 + step % 2]:
                for i in range(2):
                    cube_id = f"{tenant}-{step}-{i}"
                    appends.append(_memory(cube_id, tenant, step + i))
                    created[tenant].append(cube_id)
                if step % 3 == 1:
                    appends.append(_update(created[tenant][0], tenant, step))
                actor = f"agent:{step % 2}"
                appends.append(_reads(tenant, actor, created[tenant][-3:], clock[0]))
                if step % 4 == 2:
                    appends.append(_denial(tenant, actor, created[tenant][-1]))
            mw.store.append_many(appends, then=mw.projector.project_new_events)
        yield Log(mw, clock)


def _filters() -> Iterator[AuditFilter]:
    day, end = START.replace(hour=0, minute=0, second=0), START + sum(STEPS, timedelta())
    windows = [(None, None), (START + timedelta(minutes=61, seconds=30), None),
               (None, end - timedelta(minutes=29, seconds=13)),
               (day + timedelta(days=1, hours=2, minutes=13), day + timedelta(days=2, hours=1)),
               (START + timedelta(seconds=30), START + timedelta(minutes=5, seconds=30))]
    types = [None, ["MemoryAccessed"], ["MemoryCreated", "AccessDenied"]]
    for tenant, kinds, (since, until) in itertools.product((None, *TENANTS), types, windows):
        since = since.replace(second=0) if since else None
        until = until.replace(second=0) if until else None
        yield AuditFilter(tenant=tenant, types=kinds, since=since, until=until)


def test_kept_counts_equal_a_scan_of_the_trail(log: Log) -> None:
    insights, compared = log.insights, 0
    for where in _filters():
        assert counted(where)
        assert insights.span(where) == insights.scan_span(where), where
        for bucket in BUCKETS:
            counts = insights.activity(where, bucket=bucket)
            assert counts == insights.scan_activity(where, bucket=bucket), (where, bucket)
            assert insights.reads_over_time(where, bucket=bucket) == \
                insights.scan_reads_over_time(where, bucket=bucket), (where, bucket)
            compared += sum(c.count for c in counts)
    assert compared > 1000  # the windows are not all empty
    every = AuditFilter()
    assert insights.span(every).first == START and insights.span(every).last == log.clock[0]
    assert len({c.start for c in insights.activity(every, bucket="day")}) == 4


def test_top_readers_equal_a_scan_of_the_reads(log: Log) -> None:
    insights = log.insights
    for tenant, label in itertools.product((None, *TENANTS), (None, "sensitive", "travel")):
        where = AuditFilter(tenant=tenant)
        kept = insights.readers(where, label=label, limit=5)
        assert kept == insights.scan_readers(where, label=label, limit=5), (tenant, label)
        assert kept and all(r.memories <= r.count for r in kept)


def _insights_digest(log: Log) -> str:
    return ProjectionRunner(log.mw.store, [InsightsProjection()]).digest()


def test_a_rebuild_gives_the_same_rows_as_incremental_application(log: Log) -> None:
    incremental = _insights_digest(log)
    log.mw.projector.rebuild(["insights"], batch_size=7)
    assert _insights_digest(log) == incremental


def test_the_rows_do_not_depend_on_the_order_events_arrive_in(log: Log) -> None:
    """A Kafka consumer keeps each stream's order only: feed streams one after another,
    newest stream first, in small batches."""
    incremental = _insights_digest(log)
    events = log.mw.store.read_all(0, limit=100_000)
    by_stream: dict[str, list] = {}
    for event in events:
        by_stream.setdefault(event.stream_id, []).append(event)
    reordered = [e for stream in reversed(list(by_stream)) for e in by_stream[stream]]
    projection = InsightsProjection()
    with log.mw.store.write_connection() as conn, conn.begin():
        projection.reset(conn)
        for start in range(0, len(reordered), 5):
            projection.apply(conn, reordered[start:start + 5])
    assert _insights_digest(log) == incremental


def test_counted_questions_are_answered_from_the_kept_counts_alone(log: Log) -> None:
    insights, tenant = log.insights, AuditFilter(tenant="acme")
    before = insights.activity(tenant, bucket="hour"), insights.readers(tenant)
    with log.mw.store.write_connection() as conn, conn.begin():
        conn.execute(delete(audit))
        conn.execute(delete(reads))
    assert insights.scan_activity(tenant, bucket="hour") == []
    assert (insights.activity(tenant, bucket="hour"), insights.readers(tenant)) == before
    # Not counted per actor, nor to the second: those are scanned (and the trail is gone).
    for where in (AuditFilter(tenant="acme", actor="agent:1"),
                  AuditFilter(tenant="acme", since=START + timedelta(seconds=1))):
        assert not counted(where)
        assert insights.activity(where, bucket="hour") == []


def test_an_unknown_bucket_is_a_clear_error(log: Log) -> None:
    with pytest.raises(ValueError, match="bucket must be one of"):
        log.insights.activity(AuditFilter(), bucket="week")


def _paged(log: Log, where: AuditFilter, size: int, *, newest_first: bool = True) -> list:
    """Every page, by the dashboard's ``trail`` (newest first) or the SDK's ``audit``."""
    paged, cursor = [], 0
    while True:
        page = (log.insights.trail(where, before=cursor, limit=size) if newest_first
                else log.mw.audit(where, after=cursor, limit=size))
        paged += page
        if len(page) < size:
            return paged
        cursor = page[-1].position


def _matching(log: Log, where: AuditFilter) -> list[int]:
    """The positions ``where`` selects, by a filter in Python over every row (no index walk):
    a memory's events and the batches that read it, then every other condition."""
    with log.mw.store.engine.connect() as conn:
        rows = list(conn.execute(audit.select().order_by(audit.c.position)).mappings())
        read_by = {(row.cube_id, row.position) for row in conn.execute(reads.select())}

    def fits(row: Any) -> bool:
        return ((where.tenant is None or row["tenant"] == where.tenant)
                and (where.actor is None or row["actor"] == where.actor)
                and (where.cube_id is None or row["cube_id"] == where.cube_id
                     or (where.cube_id, row["position"]) in read_by)
                and (not where.types or row["type"] in where.types)
                and (where.since is None or row["recorded_at"] >= where.since)
                and (where.until is None or row["recorded_at"] < where.until))

    return [row["position"] for row in rows if fits(row)]


def test_a_trail_walked_on_the_selective_index_equals_the_sdk_s_trail(log: Log) -> None:
    with log.mw.store.engine.connect() as conn:
        levels = set(conn.execute(activity_counts.select()).scalars())
    assert levels == {"minute", "hour", "day"}
    read_often = "acme-8-1"  # created, then read by two batches
    for where in (AuditFilter(cube_id=read_often), AuditFilter(cube_id=read_often,
                                                               tenant="acme"),
                  AuditFilter(cube_id=read_often, types=["MemoryAccessed"]),
                  AuditFilter(cube_id=read_often, actor="agent:0"),
                  AuditFilter(cube_id="acme-1-0"), AuditFilter(tenant="acme"),
                  AuditFilter(tenant="acme", types=["AccessDenied"]),
                  AuditFilter(types=["MemoryCreated", "AccessDenied", "MemoryCreated"]),
                  AuditFilter(tenant="acme", actor="agent:1"), AuditFilter(),
                  AuditFilter(tenant="acme", since=START + timedelta(hours=2),
                              types=["MemoryAccessed"])):
        expected = log.mw.audit(where, limit=1000, newest_first=True)
        assert expected, where
        assert [e.position for e in expected] == _matching(log, where)[::-1], where
        for size in (2, 7):
            assert _paged(log, where, size) == expected, (where, size)
            assert _paged(log, where, size, newest_first=False) == expected[::-1], (where, size)
    with pytest.raises(ValueError, match="needs a memory"):
        log.insights.memory_trail(AuditFilter())
