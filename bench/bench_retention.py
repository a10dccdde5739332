"""Retention sweep: 1,000,000 memories of which 10% are due (issue 6); target under 60 s.

Fixture (SQLite file, the embedded default; the fixture is not timed):

- the memories that fall due are written through the real write path: one ``MemoryCreated``
  each, appended ``BATCH`` streams a transaction and projected into every read model; the
  planner then computes their due dates from the rules below (timed on its own);
- the memories NOT due are inserted directly, in bulk, into the ``retention`` read model and its
  ``retention_schedule`` (due dates 1 to 365 days ahead): they never produce an event, and
  writing 900,000 memories through the log would only lengthen the set-up. The output says so.

Then the real sweep runs (``RetentionWorker.run``, clock one year ahead): it reads the due index
range a batch at a time, appends one event per due memory (expire, tier move or decay, a third
each), ``BATCH`` memories to a transaction with their expected versions, projecting them into
every read model, and ends with ``RetentionSweepCompleted``. Printed: seconds, events/s and the
peak growth of the process's resident memory during the sweep (sampled every 5 ms). Then memory
flatness: the same 10,000-memory sweep beside no memories not due and beside 990,000, with the
peak of its Python heap traced (tracemalloc): the second must not need more.
"""

from __future__ import annotations

import gc
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench._report import seeding_progress
from bench._workload import BATCH, TENANT, memory_owner, memory_text
from eventstore import EventContext, StreamAppend, utcnow
from governance import Limits, MemCube, MemWarden, Settings
from governance._retention import RetentionPolicy, RetentionWorker, plan

TOTAL = 1_000_000
DUE_FRACTION = 0.10
TARGET_SECONDS = 60.0
MEMORY_DUE = 10_000
"""Due memories of the memory comparison (its heap is traced, which slows the sweep)."""

POLICY = RetentionPolicy.parse("""
rules:
  - name: bench-expire
    match: {semantic_type: event}
    ttl: 30d
  - name: bench-tiers
    match: {semantic_type: fact}
    tiers: {long_term_after: 30d}
  - name: bench-decay
    match: {semantic_type: preference}
    decay: {half_life: 10d, threshold: 0.2}
""", source="bench policy")
_TYPES = ("event", "fact", "preference")
_SWEEP_AHEAD = timedelta(days=365)


@dataclass(frozen=True, slots=True)
class SweepFigures:
    not_due: int
    due: int
    plan_seconds: float
    seconds: float
    events: int
    peak: int
    """Bytes: the resident set's growth during the sweep, or the traced Python heap's peak."""


class _PeakRss:
    """Samples the process's resident set size in a thread; ``growth`` is peak minus start."""

    def __init__(self, every: float = 0.005) -> None:
        self._every = every
        self._stop = threading.Event()
        self._start = self._peak = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._every):
            self._peak = max(self._peak, _rss())

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss())

    @property
    def growth(self) -> int:
        return self._peak - self._start


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _open(path: Path) -> MemWarden:
    url = f"sqlite:///{path}"
    settings = Settings(db_url=url, data_dir=str(path.parent), pii_scan=False)
    return MemWarden.open(url, actor="ops:retention", settings=settings)


@contextmanager
def _template(due: int, now: datetime) -> Iterator[Path]:
    """A database holding the due memories, written once and copied for each configuration."""
    with tempfile.TemporaryDirectory(prefix="memwarden-bench-retention-") as directory:
        path = Path(directory) / "template.db"
        with _open(path) as mw:
            with mw.store.write_connection() as conn, conn.begin():
                plan(conn, POLICY)  # empty: records the rules digest, so only changes replan
            _seed_due(mw, due)
        with sqlite3.connect(path) as db:  # everything into the file itself, to be copied
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        yield path


def _seed_due(mw: MemWarden, due: int) -> None:
    """The due memories, through the log and every read model, ``BATCH`` per transaction."""
    limits, context = Limits(), EventContext(actor="agent:bench", tenant=TENANT)
    with seeding_progress() as progress:
        task = progress.add_task("memories that will fall due", total=due)
        for start in range(0, due, BATCH):
            appends = [StreamAppend(
                f"due-{i:07d}",
                MemCube.create(owner=memory_owner(i), kind="plaintext", text=memory_text(i),
                               metadata={"semantic_type": _TYPES[i % 3], "priority": i % 10},
                               reason=None, limits=limits),
                0, context) for i in range(start, min(start + BATCH, due))]
            mw.store.append_many(appends, then=mw.projector.project_new_events)
            progress.advance(task, len(appends))


def _insert_not_due(mw: MemWarden, path: Path, count: int, now: datetime) -> None:
    """Memories not due within the year: straight into the read model and the schedule."""
    if not count:
        return
    to_db = mw.store.dialect.to_db_time
    created = to_db(now - timedelta(days=1))
    db = sqlite3.connect(path)
    try:
        with seeding_progress() as progress:
            task = progress.add_task("memories not due (bulk insert)", total=count)
            for start in range(0, count, 50_000):
                ids = range(start, min(start + 50_000, count))
                db.executemany(
                    "INSERT INTO retention VALUES (?, ?, ?, 'plaintext', 'event', 'user', "
                    "'standard', '[]', '[]', NULL, 5, 'active', 'working', 0, 0, 0, ?, ?, 1, 1, 0)",
                    [(f"idle-{i:07d}", TENANT, memory_owner(i), created, created) for i in ids])
                db.executemany(
                    "INSERT INTO retention_schedule VALUES (?, ?, 'bench-expire', ?, ?, NULL, "
                    "NULL, NULL, NULL)",
                    [(f"idle-{i:07d}", TENANT, due, due) for i in ids
                     for due in [to_db(now + _SWEEP_AHEAD + timedelta(days=1 + i % 365))]])
                db.commit()
                progress.advance(task, len(ids))
    finally:
        db.close()


def measure(template: Path, not_due: int, due: int, now: datetime, *,
            traced: bool) -> SweepFigures:
    """One sweep over a copy of ``template`` beside ``not_due`` memories not due. ``traced``:
    the peak is of the Python heap (tracemalloc; slower), else of the resident set."""
    path = template.with_name(f"beside-{not_due}.db")
    shutil.copyfile(template, path)
    try:
        with _open(path) as mw:
            _insert_not_due(mw, path, not_due, now)
            with mw.store.write_connection() as conn, conn.begin():
                started = time.perf_counter()
                planned = plan(conn, POLICY)
                plan_seconds = time.perf_counter() - started
            assert planned == due, (planned, due)
            worker = RetentionWorker(mw, POLICY, clock=lambda: now + _SWEEP_AHEAD,
                                     batch_size=BATCH)
            gc.collect()
            if traced:
                tracemalloc.start()
                report = worker.run()
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            else:
                with _PeakRss() as memory:
                    report = worker.run()
                peak = memory.growth
            assert report.examined == due and report.counts["conflicts"] == 0, report.counts
            return SweepFigures(not_due, due, plan_seconds, report.seconds, report.events, peak)
    finally:
        path.unlink()


def _table(title: str, peak: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("memories", "not due", "due", "plan due dates", "sweep", "events/s", peak,
                   f"sweep < {TARGET_SECONDS:.0f} s"):
        table.add_column(column, justify="right")
    return table


def _row(table: Table, figures: SweepFigures) -> None:
    table.add_row(f"{figures.not_due + figures.due:,}", f"{figures.not_due:,}",
                  f"{figures.due:,}", f"{figures.plan_seconds:.2f} s", f"{figures.seconds:.2f} s",
                  f"{figures.events / figures.seconds:,.0f}/s",
                  f"{figures.peak / 2**20:.1f} MiB",
                  "[green]met[/green]" if figures.seconds < TARGET_SECONDS else "[red]missed[/red]")


def run(console: Console, full: bool) -> None:
    due = int(TOTAL * DUE_FRACTION)
    console.print(f"\n[bold]Retention sweep[/bold]: {TOTAL:,} memories, {due:,} due "
                  f"(expire / tier move / decay, a third each), SQLite. Fixture: the due "
                  f"memories are written through the log and every read model; the memories "
                  f"not due are bulk-inserted into the retention read model and its schedule "
                  f"(a sweep never touches them), not written as events.")
    now = utcnow()
    with _template(due, now) as template:
        headline = measure(template, TOTAL - due, due, now, traced=False)
    table = _table("Retention sweep (RetentionWorker.run over the due index range)",
                   "peak RSS growth")
    _row(table, headline)
    console.print(table)

    # Memory flat in the memories not due: the same sweep beside none and beside all the rest,
    # its Python heap traced (which slows it: these times are not the headline).
    small = MEMORY_DUE
    with _template(small, now) as template:
        alone = measure(template, 0, small, now, traced=True)
        beside = measure(template, TOTAL - small, small, now, traced=True)
    table = _table(f"The same sweep beside no and beside {TOTAL - small:,} memories not due "
                   "(tracemalloc)", "peak Python heap")
    _row(table, alone)
    _row(table, beside)
    console.print(table)
    console.print(f"peak heap beside {beside.not_due:,} memories not due / beside none: "
                  f"{beside.peak / alone.peak:.2f}x; sweep time: "
                  f"{beside.seconds / alone.seconds:.2f}x")


if __name__ == "__main__":
    import sys

    run(Console(), full="--full" in sys.argv[1:])
