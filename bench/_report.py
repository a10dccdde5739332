"""Timing helpers and the rich tables every section prints."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

T = TypeVar("T")


def timed(work: Callable[[], T]) -> tuple[T, float]:
    """What ``work`` returns and the seconds it took, after a garbage collection so that no
    earlier garbage is charged to it."""
    gc.collect()
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def latencies(call: Callable[[int], object], count: int) -> list[float]:
    """Seconds taken by each of ``call(0)`` .. ``call(count - 1)``."""
    gc.collect()
    samples = []
    for k in range(count):
        start = time.perf_counter()
        call(k)
        samples.append(time.perf_counter() - start)
    return samples


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def seeding_progress() -> Progress:
    return Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("events"), TimeElapsedColumn())


@dataclass(frozen=True, slots=True)
class Target:
    text: str
    met: bool


@dataclass(frozen=True, slots=True)
class Figure:
    """One line of a comparison table: a quantity measured on MemWarden and on the peer."""

    label: str
    unit: str
    ours: float
    peer: float | None
    target: Target | None = None
    peer_means: str = ""

    @property
    def ratio(self) -> float | None:
        return self.ours / self.peer if self.peer else None


def rate(value: float) -> str:
    return f"{value:,.0f}/s"


def millis(value: float) -> str:
    return f"{value * 1000:.2f} ms"


def formatted(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return rate(value) if unit == "/s" else millis(value)


def comparison_table(title: str, figures: Sequence[Figure], peer_name: str,
                     caption: str = "") -> Table:
    table = Table(title=title, caption=caption, caption_justify="left", title_justify="left")
    table.add_column("figure")
    table.add_column("MemWarden", justify="right")
    table.add_column(peer_name, justify="right")
    table.add_column("ratio (ours/peer)", justify="right")
    table.add_column("target")
    table.add_column("peer figure means", style="dim")
    for figure in figures:
        table.add_row(
            figure.label,
            formatted(figure.ours, figure.unit),
            formatted(figure.peer, figure.unit),
            "—" if figure.ratio is None else f"{figure.ratio:.2f}",
            _target_cell(figure.target),
            figure.peer_means,
        )
    return table


def _target_cell(target: Target | None) -> str:
    if target is None:
        return ""
    verdict = "[green]met[/green]" if target.met else "[red]missed[/red]"
    return f"{target.text}: {verdict}"
