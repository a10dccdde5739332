"""The write and read paths: MemWarden against pyeventsourcing, both on SQLite files.

At each log size (10^4 and 10^5 events; 10^6 too with ``--full``) every subject is seeded with that
many memories, then measured by the same code (see ``bench._workload``):

- single add/s and update/s, one command per transaction through the full write path (MemWarden:
  validation, access check, sealing the text, append, projection of every read model in the same
  transaction; personal-data scanning off, see ``bench._memwarden``);
- single appends/s to the event log alone, one new memory per transaction (MemWarden: validation,
  sealing, hash chain; no read model): the like-for-like counterpart of the peer's ``app.save``;
- batched appends/s, ``BATCH`` new streams per transaction, event store only;
- get and history latency, p50 and p95;
- rebuild events/s: every read model replayed from the whole log, and the core's four alone.

Rates are the median of ``ROUNDS`` rounds in which the subjects take turns (a different one first
each round), so a burst of load from elsewhere on the machine lands in one round of one subject
instead of deciding a ratio.
"""

from __future__ import annotations

import random
import tempfile
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench._memwarden import MemWardenSubject
from bench._peer import PeerSubject
from bench._report import (
    Figure,
    Target,
    comparison_table,
    formatted,
    latencies,
    median,
    percentile,
    seeding_progress,
    timed,
)
from bench._workload import BATCH, Subject

SIZES = (10_000, 100_000)
FULL_SIZES = (1_000_000,)
HEADLINE_SIZE = 100_000
"""The size whose figures are compared with the targets: 100k memories in the log."""

ROUNDS = 5
COMMANDS_PER_ROUND = 200
HOT_CUBES = 200
"""Memories updated once per round, so their history has ``ROUNDS + 1`` versions."""
GETS_PER_ROUND = 400
HISTORIES_PER_ROUND = 100
BATCHES_PER_ROUND = 4

BATCHED_TARGET = 50_000
REBUILD_TARGET = 50_000
GET_P95_TARGET = 0.002


@dataclass
class Results:
    """What one subject measured at one size; None where it did not take part."""

    add: float | None = None
    append: float | None = None
    update: float | None = None
    batched: float | None = None
    rebuild: float | None = None
    rebuild_core: float | None = None
    rebuilt_events: int = 0
    get: list[float] = field(default_factory=list)
    history: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Measured:
    """One size's results: MemWarden, the peer, and the peer at MemWarden's durability."""

    ours: Results
    peer: Results
    peer_normal: Results


def run(console: Console, full: bool) -> None:
    sizes = SIZES + FULL_SIZES if full else SIZES
    measured: dict[int, Measured] = {}
    for size in sizes:
        # Each size's table as soon as it is measured: the larger sizes take long.
        measured[size] = _measure(console, size)
        console.print(_headline_table(measured[size], size))
    console.print(_scaling_table(measured))


def _measure(console: Console, size: int) -> Measured:
    with tempfile.TemporaryDirectory(prefix="memwarden-bench-") as tmp, ExitStack() as closing:
        subjects: list[Subject] = []
        for make, folder in ((MemWardenSubject, "memwarden"), (PeerSubject, "peer"),
                             (partial(PeerSubject, normal_sync=True), "peer-normal")):
            directory = Path(tmp) / folder
            directory.mkdir()
            subject = make(directory)
            closing.callback(subject.close)
            subjects.append(subject)
        return _measure_subjects(console, size, subjects)


def _measure_subjects(console: Console, size: int, subjects: Sequence[Subject]) -> Measured:
    """``subjects``: MemWarden, the peer, then the peer at MemWarden's durability, which only
    takes part in the single-command figures (the only ones a per-commit fsync changes)."""
    ids = _seed(console, size, subjects)
    writers, readers = subjects, subjects[:2]
    hot = range(0, size, size // HOT_CUBES)
    picks = random.Random(size).choices(range(size), k=ROUNDS * GETS_PER_ROUND)
    results = {subject.name: Results() for subject in subjects}

    def add(subject: Subject, round_: int) -> None:
        first = size + round_ * COMMANDS_PER_ROUND
        for i in range(first, first + COMMANDS_PER_ROUND):
            subject.add(i)

    def append(subject: Subject, round_: int) -> None:
        first = size + (ROUNDS + round_) * COMMANDS_PER_ROUND
        for i in range(first, first + COMMANDS_PER_ROUND):
            subject.append(i)

    def update(subject: Subject, round_: int) -> None:
        for i in hot:
            subject.update(ids[subject.name][i], round_)

    def append_batches(subject: Subject, round_: int) -> None:
        for batch in range(BATCHES_PER_ROUND):
            subject.append_batch(2 * size + (round_ * BATCHES_PER_ROUND + batch) * BATCH, BATCH)

    with console.status(f"[bold]measuring at {size:,} events[/bold]") as status:
        # Updates before the appends to the log alone: those leave MemWarden's read models
        # behind the log, and a command then appends without projecting (its events wait for
        # a catch-up), which is not the full write path the update figure stands for.
        status.update(f"single adds at {size:,} events")
        for name, value in _rates(writers, COMMANDS_PER_ROUND, add).items():
            results[name].add = value
        status.update(f"single updates at {size:,} events")
        for name, value in _rates(writers, len(hot), update).items():
            results[name].update = value
        status.update(f"single appends to the log at {size:,} events")
        for name, value in _rates(writers, COMMANDS_PER_ROUND, append).items():
            results[name].append = value
        status.update(f"gets at {size:,} events")
        for name, samples in _latencies(readers, GETS_PER_ROUND, lambda subject, n: subject.get(
                ids[subject.name][picks[n]])).items():
            results[name].get = samples
        status.update(f"histories at {size:,} events")
        for name, samples in _latencies(readers, HISTORIES_PER_ROUND, lambda subject, n: (
                subject.history(ids[subject.name][hot[n % len(hot)]]))).items():
            results[name].history = samples
        status.update(f"batched appends at {size:,} events")
        for name, value in _rates(readers, BATCHES_PER_ROUND * BATCH, append_batches).items():
            results[name].batched = value
        for subject in readers:
            status.update(f"{subject.name}: rebuild at {size:,} events")
            events, seconds = timed(subject.rebuild)
            results[subject.name].rebuilt_events = events
            results[subject.name].rebuild = events / seconds
            status.update(f"{subject.name}: rebuild of the core read models at {size:,} events")
            events, seconds = timed(partial(subject.rebuild, core_only=True))
            results[subject.name].rebuild_core = events / seconds
    console.log(f"measured at {size:,} events")
    return Measured(*(results[subject.name] for subject in subjects))


def _seed(console: Console, size: int, subjects: Sequence[Subject]) -> dict[str, list[Hashable]]:
    ids: dict[str, list[Hashable]] = {}
    with seeding_progress() as progress:
        for subject in subjects:
            task = progress.add_task(f"seeding {subject.name}", total=size)
            ids[subject.name] = subject.seed(size, partial(progress.advance, task))
    return ids


def _turns(subjects: Sequence[Subject], round_: int) -> list[Subject]:
    """The subjects in the order they take their turn in ``round_``: rotated each round."""
    shift = round_ % len(subjects)
    return [*subjects[shift:], *subjects[:shift]]


def _rates(subjects: Sequence[Subject], per_round: int,
           work: Callable[[Subject, int], None]) -> dict[str, float]:
    """Median over the rounds of ``per_round`` units of ``work(subject, round)`` per second."""
    rates: defaultdict[str, list[float]] = defaultdict(list)
    for round_ in range(ROUNDS):
        for subject in _turns(subjects, round_):
            _, seconds = timed(partial(work, subject, round_))
            rates[subject.name].append(per_round / seconds)
    return {name: median(values) for name, values in rates.items()}


def _latencies(subjects: Sequence[Subject], per_round: int,
               call: Callable[[Subject, int], None]) -> dict[str, list[float]]:
    """Seconds taken by each ``call(subject, n)``, n counting on across rounds."""
    samples: defaultdict[str, list[float]] = defaultdict(list)
    for round_ in range(ROUNDS):
        for subject in _turns(subjects, round_):
            first = round_ * per_round
            samples[subject.name].extend(
                latencies(lambda k, subject=subject, first=first: call(subject, first + k),
                          per_round))
    return samples


def _headline_table(measured: Measured, size: int) -> Table:
    ours, peer, peer_normal = measured.ours, measured.peer, measured.peer_normal
    assert ours.add and ours.append and ours.update and ours.batched and ours.rebuild
    assert ours.rebuild_core and peer.rebuild_core
    assert peer.add and peer.append and peer.update and peer_normal.add and peer_normal.append
    assert peer_normal.update
    figures = [
        Figure("single add, full write path", "/s", ours.add, peer.add,
               Target("≥ peer", ours.add >= peer.add),
               "app.save(new aggregate), SQLite's default synchronous=FULL: fsync per commit"),
        Figure("  vs peer at MemWarden's durability", "/s", ours.add, peer_normal.add,
               peer_means="the same with synchronous=NORMAL, as MemWarden runs"),
        Figure("single append, event log only", "/s", ours.append, peer.append,
               peer_means="app.save(new aggregate): the peer's whole write path, FULL"),
        Figure("  vs peer at MemWarden's durability", "/s", ours.append, peer_normal.append,
               peer_means="the same with synchronous=NORMAL"),
        Figure("single update, full write path", "/s", ours.update, peer.update,
               Target("≥ peer", ours.update >= peer.update),
               "repository.get + update + app.save, synchronous=FULL"),
        Figure("  vs peer at MemWarden's durability", "/s", ours.update, peer_normal.update,
               peer_means="the same with synchronous=NORMAL"),
        Figure(f"batched appends, {BATCH:,} streams per transaction", "/s", ours.batched,
               peer.batched, Target(f"≥ {BATCHED_TARGET:,}/s", ours.batched >= BATCHED_TARGET),
               f"app.save(*{BATCH:,} new aggregates)"),
        Figure(f"rebuild every read model, {ours.rebuilt_events:,} events", "/s",
               ours.rebuild, peer.rebuild,
               Target(f"≥ {REBUILD_TARGET:,}/s", ours.rebuild >= REBUILD_TARGET),
               f"select_notifications pages decoded and folded into a dict, "
               f"{peer.rebuilt_events:,} events; writes no read model"),
        Figure("  the core's read models alone (cubes, versions, audit, usage)", "/s",
               ours.rebuild_core, peer.rebuild_core, peer_means="the same fold"),
        Figure("get p50", "s", percentile(ours.get, 0.5), percentile(peer.get, 0.5),
               peer_means="repository.get (replays the aggregate's events)"),
        Figure("get p95", "s", percentile(ours.get, 0.95), percentile(peer.get, 0.95),
               Target("≤ 2 ms", percentile(ours.get, 0.95) <= GET_P95_TARGET),
               "repository.get"),
        Figure(f"history p50 ({ROUNDS + 1} versions)", "s", percentile(ours.history, 0.5),
               percentile(peer.history, 0.5),
               peer_means="repository.get: the peer keeps no version list"),
        Figure(f"history p95 ({ROUNDS + 1} versions)", "s", percentile(ours.history, 0.95),
               percentile(peer.history, 0.95), peer_means="repository.get"),
    ]
    return comparison_table(
        f"MemWarden vs pyeventsourcing on SQLite, {size:,} memories in the log",
        figures, "peer (eventsourcing)",
        caption=f"Rates: median of {ROUNDS} rounds, subjects taking turns. Latencies: every "
                f"call of every round. For ratios of latencies, lower is better. MemWarden "
                f"runs with personal-data scanning off (MEMWARDEN_PII_SCAN=0: the pii section "
                f"measures it) and seals memory text (AES-GCM) on every write; the peer "
                f"stores plaintext. The issue's targets are for {HEADLINE_SIZE:,} memories.",
    )


def _scaling_table(measured: dict[int, Measured]) -> Table:
    """Each figure at every size, to show whether its cost grows with the log."""
    sizes = sorted(measured)
    table = Table(title="The same figures as the log grows: MemWarden (peer)",
                  title_justify="left",
                  caption=f"last column: MemWarden at {sizes[-1]:,} ÷ at {sizes[0]:,} events; "
                          "1.00 is flat", caption_justify="left")
    table.add_column("figure")
    for size in sizes:
        table.add_column(f"{size:,} events", justify="right")
    table.add_column("largest ÷ smallest", justify="right")
    rows: list[tuple[str, str, Callable[[Results], float | None]]] = [
        ("single add", "/s", lambda r: r.add),
        ("single append, log only", "/s", lambda r: r.append),
        ("single update", "/s", lambda r: r.update),
        ("batched appends", "/s", lambda r: r.batched),
        ("rebuild", "/s", lambda r: r.rebuild),
        ("rebuild, core read models", "/s", lambda r: r.rebuild_core),
        ("get p50", "s", lambda r: percentile(r.get, 0.5)),
        ("get p95", "s", lambda r: percentile(r.get, 0.95)),
        ("history p50", "s", lambda r: percentile(r.history, 0.5)),
        ("history p95", "s", lambda r: percentile(r.history, 0.95)),
    ]
    for label, unit, value in rows:
        cells = [f"{formatted(value(measured[size].ours), unit)} "
                 f"({formatted(value(measured[size].peer), unit)})" for size in sizes]
        first, last = value(measured[sizes[0]].ours), value(measured[sizes[-1]].ours)
        table.add_row(label, *cells, f"{last / first:.2f}" if first and last else "—")
    return table
