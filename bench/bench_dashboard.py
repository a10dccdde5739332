"""Dashboard: how long each page's queries take over a large log.

Seeds one tenant with memories that were each written several times and read in batches by many
agents, with some denials: 10,000 memories, about 100,000 events; ``--full`` adds 100,000
memories, about 1,000,000 events, the size issue 8 asks the pages to stay responsive at. The log
is seeded in bulk, straight through the event store (``EventStore.append_many``, 500 memories and
their reads a transaction) with the projector applying each batch in the same transaction, as the
embedded mode does: this benchmark is about reading, and the write path's own speed is measured
by ``python -m bench store``.

Then it times each page's data function (``dashboard._data``) as an auditor and as a compliance
officer would call it, through the SDK and its access policy: the first call (nothing cached
anywhere), the median of the next rounds (database pages warm, dashboard cache bypassed), and a
call through the dashboard's own cache (``st.cache_data``, 15 s per signed-in key), which is what
paging back and forth or switching pages costs. Set ``MEMWARDEN_BENCH_DASHBOARD_DIR`` to keep
the seeded databases there and time them again without seeding.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dashboard import _data, _ui
from eventstore import ANY_VERSION, EventContext, NewEvent, StreamAppend, utcnow
from governance import ApiKeys, Limits, MemCube, MemWarden, Settings
from governance._keys import authenticate

TENANT = "acme"
UPDATES = 4
"""Versions after the first, per memory."""
READS_PER_EVENT = 2
READ_EVENTS_PER_MEMORY = 5
AGENTS = 50
DENIAL_EVERY = 100
"""One AccessDenied per this many memories."""
BATCH = 500
ROUNDS = 5


KEEP_ENV = "MEMWARDEN_BENCH_DASHBOARD_DIR"
"""A folder to keep the seeded databases in and reuse them on the next run (seeding a million
events takes minutes); by default each run seeds a temporary folder."""


def run(console: Console, full: bool) -> None:
    # Outside a Streamlit server the cache works in memory, and says so on every call.
    logging.getLogger("streamlit.runtime.caching.cache_data_api").setLevel(logging.ERROR)
    measured: dict[int, dict[tuple[str, str], Timing]] = {}
    for memories in (10_000, 100_000) if full else (10_000,):
        console.rule(f"[bold]Dashboard[/bold]: page queries over {memories:,} memories")
        with _folder(memories) as folder:
            url = f"sqlite:///{folder / 'memwarden.db'}"
            settings = Settings(db_url=url, data_dir=str(folder), pii_scan=False)
            with MemWarden.open(settings=settings, actor="admin:bench") as operator:
                if operator.store.head_position() < memories:
                    started = time.perf_counter()
                    events = _seed(console, operator, memories)
                    seconds = time.perf_counter() - started
                    console.print(f"seeded {memories:,} memories, {events:,} events in "
                                  f"{seconds:,.0f} s ({events / seconds:,.0f} events/s; SQLite, "
                                  "personal data scan off)")
                else:
                    events = operator.store.head_position()
                    console.print(f"reusing {folder}: {events:,} events")
                keys = ApiKeys(operator)
                auditor = operator.as_principal(authenticate(operator.store.engine, keys.issue(
                    tenant=TENANT, subject="auditor:bench", role="auditor").secret))
                officer = operator.as_principal(authenticate(operator.store.engine, keys.issue(
                    tenant=TENANT, subject="officer:bench", role="compliance_officer").secret))
                timings = _measure(operator, auditor, officer, memories)
                console.print(_table(timings, events))
                measured[events] = timings
    if len(measured) > 1:
        console.print(_comparison(measured))


@contextmanager
def _folder(memories: int) -> Iterator[Path]:
    kept = os.environ.get(KEEP_ENV)
    if kept:
        folder = Path(kept) / f"{memories}-memories"
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="memwarden-bench-dashboard-") as temporary:
        yield Path(temporary)


def _seed(console: Console, mw: MemWarden, memories: int) -> int:
    limits = Limits()
    project = mw.projector.project_new_events
    start = utcnow() - timedelta(days=30)
    with Progress(TextColumn("seeding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("seed", total=memories)
        for first in range(0, memories, BATCH):
            count = min(BATCH, memories - first)
            appends = [_memory(i, limits) for i in range(first, first + count)]
            appends += _reads(first, count, start + timedelta(days=30 * first / memories))
            appends += _denials(first, count)
            mw.store.append_many(appends, then=project)
            progress.advance(task, count)
    return mw.store.head_position()


def _memory(i: int, limits: Limits) -> StreamAppend:
    created = MemCube.create(owner=f"customer:{i % 2000}", kind="plaintext",
                             text=f"Memory {i}: prefers a window seat", reason="learned",
                             metadata={"labels": ["sensitive"] if i % 10 == 0 else ["travel"]},
                             limits=limits)
    content = created[0].payload["content"]
    updates = [NewEvent("MemoryUpdated", {
        "content": {**content, "text": f"Memory {i}: revision {n}"},
        "reason": f"revision {n}"}) for n in range(1, UPDATES + 1)]
    return StreamAppend(f"bench-{i:07d}", [*created, *updates], 0,
                        EventContext(actor=f"agent:{i % AGENTS}", tenant=TENANT))


def _reads(first: int, count: int, at: Any) -> list[StreamAppend]:
    appends = []
    batches = max(1, int(count * READ_EVENTS_PER_MEMORY))
    for b in range(batches):
        reads = [{"cube_id": f"bench-{first + (b * 7 + r * 13) % count:07d}",
                  "version": UPDATES + 1, "at": at.isoformat()} for r in range(READS_PER_EVENT)]
        appends.append(StreamAppend(f"reads:{TENANT}", [NewEvent("MemoryAccessed",
                                                                 {"reads": reads})],
                                    ANY_VERSION,
                                    EventContext(actor=f"agent:{b % AGENTS}", tenant=TENANT)))
    return appends


def _denials(first: int, count: int) -> list[StreamAppend]:
    return [StreamAppend(f"denials:{TENANT}", [NewEvent("AccessDenied", {
        "action": "memory.read_content", "role": "agent", "key_id": None,
        "resource_kind": "memory", "resource_id": f"bench-{i:07d}", "cube_id": f"bench-{i:07d}",
        "denied_because": "no_rule", "reason": "no rule lets role agent read it",
        "policy_revision": 1})], ANY_VERSION,
        EventContext(actor=f"agent:{i % AGENTS}", tenant=TENANT))
        for i in range(first, first + count, DENIAL_EVERY)]


@dataclass(frozen=True, slots=True)
class Timing:
    first_ms: float
    """The first call: nothing cached, neither by the dashboard nor in the database's pages."""
    warm_ms: float
    """Median of the next rounds, the dashboard's cache bypassed."""
    cached_ms: float | None
    """Through the dashboard's cache (``st.cache_data``), as a page shown again within 15 s."""


def _measure(operator: MemWarden, auditor: MemWarden, officer: MemWarden,
             memories: int) -> dict[tuple[str, str], Timing]:
    middle = f"bench-{memories // 2:07d}"
    second_page = _data.audit_page(auditor, _data.AuditQuery(tenant=TENANT)).older or 0
    month_ago = utcnow().replace(second=0, microsecond=0) - timedelta(days=30)
    pages: list[tuple[str, str, Callable[..., object], MemWarden, tuple[Any, ...]]] = [
        ("Overview", "all time: totals, activity over time", _data.overview, auditor,
         (TENANT,)),
        ("Overview", "last 30 days", _data.overview, auditor, (TENANT, month_ago)),
        ("Audit trail", "first page, no filter", _data.audit_page, auditor,
         (_data.AuditQuery(tenant=TENANT),)),
        ("Audit trail", "next page (cursor)", _data.audit_page, auditor,
         (_data.AuditQuery(tenant=TENANT), second_page)),
        ("Audit trail", "one actor", _data.audit_page, auditor,
         (_data.AuditQuery(tenant=TENANT, actor="agent:7"),)),
        ("Audit trail", "one memory, reads included", _data.audit_page, auditor,
         (_data.AuditQuery(tenant=TENANT, cube_id=middle),)),
        ("Audit trail", "one event type", _data.audit_page, auditor,
         (_data.AuditQuery(tenant=TENANT, types=("AccessDenied",)),)),
        ("Memory detail", "auditor: metadata and timeline", _data.memory_detail, auditor,
         (middle,)),
        ("Memory detail", "officer: content and versions", _data.memory_detail, officer,
         (middle,)),
        ("Memory detail", "memory picker (200 memories)", _data.memory_choices, auditor,
         (TENANT,)),
        ("Access decisions", "readers, sensitive readers, denials", _data.access_decisions,
         auditor, (TENANT,)),
        ("Sensitive data", "findings (scan off: none)", _data.sensitive_data, officer,
         (TENANT,)),
        ("Retention", "rules, report, holds", _data.retention, officer, (TENANT,)),
        ("Erasures", "erasure records", _data.erasures, auditor, (TENANT,)),
        ("Lineage", "artifacts", _data.artifacts, officer, (TENANT,)),
        ("Sidebar", "tenants a platform key may choose", _data.tenants, operator, ()),
    ]
    timings = {}
    for page, query, func, mw, args in pages:
        times = _timed(lambda: func(mw, *args), ROUNDS + 1)  # noqa: B023 (called right here)
        through_cache = _ui.cached(func)
        through_cache(mw, *args)
        cached = statistics.median(_timed(lambda: through_cache(mw, *args), ROUNDS))  # noqa: B023
        timings[(page, query)] = Timing(times[0], statistics.median(times[1:]), cached)
    started = time.perf_counter()
    report = _data.verify(auditor)
    timings[("Integrity", "verify the hash chain (once, with a progress bar)")] = Timing(
        (time.perf_counter() - started) * 1000, float("nan"), None)
    if report.checked < 1 or not report.ok:
        raise RuntimeError(f"the seeded log does not verify: {report}")
    return timings


def _table(timings: dict[tuple[str, str], Timing], events: int) -> Table:
    table = Table("page", "query", "first ms", "warm p50 ms", "cached ms",
                  title=f"Page queries over {events:,} events ({ROUNDS} warm rounds)")
    for (page, query), timing in timings.items():
        table.add_row(page, query, f"{timing.first_ms:,.1f}", _ms(timing.warm_ms),
                      "" if timing.cached_ms is None else f"{timing.cached_ms:,.2f}")
    return table


def _comparison(measured: dict[int, dict[tuple[str, str], Timing]]) -> Table:
    sizes = sorted(measured)
    table = Table("page", "query", *(f"{n:,} events: first / warm ms" for n in sizes),
                  title="Page queries as the log grows")
    for key in measured[sizes[0]]:
        table.add_row(*key, *(f"{measured[n][key].first_ms:,.0f} / {_ms(measured[n][key].warm_ms)}"
                              for n in sizes))
    return table


def _ms(value: float) -> str:
    return "" if math.isnan(value) else f"{value:,.1f}"


def _timed(call: Callable[[], object], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return times
