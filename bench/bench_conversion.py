"""Parametric and activation memory (issue 10): what converting costs, and what a KV cache saves.

On a fresh embedded database with hot memories of one tenant, over the configured base model
(``MEMWARDEN_BASE_MODEL``; by default the tiny model MemWarden builds itself, so the absolute
figures say little about a real model, the ratios more):

* selection (the dry run), LoRA training (steps per second, end to end with recording), the
  adapter's effect (perplexity of its sources and of unrelated held-out text, before and after)
  and loading it back through the lineage gate (hash check included);
* the KV cache: building it, and the time to first token of a question after the memories,
  with the cache (copy it, run the question) and without (run memories and question), median
  of repeated runs, with the ratio.

    python -m bench conversion [--full]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from governance import MemWarden, Settings, _basemodel

TENANT = "bench-travel"
POLICY = "selection: {min_reads: 1, stable_days: 0}\n"
QUERY = "Question: which seat does the customer prefer, and what do they eat? Answer:"
FACTS = (
    "prefers window seats on long-haul flights", "is vegetarian", "has Gold loyalty status",
    "travels with a folding bicycle", "needs a hotel room on a low floor",
    "books through the corporate travel policy", "likes early morning departures",
    "avoids connections shorter than ninety minutes",
)


def _memories(count: int) -> list[tuple[str, str]]:
    return [(f"customer:{n % 8}", f"Customer {n % 8} {FACTS[n % len(FACTS)]} (note {n}).")
            for n in range(count)]


def _median_seconds(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up: allocator and kernel caches
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def run(console: Console, full: bool) -> None:
    import torch

    from governance._activation import next_token_logits

    count, repeats = (64, 50) if full else (16, 20)
    if not os.environ.get("MEMWARDEN_BASE_MODEL"):
        # Matrices 64 wide gain nothing from intra-op threads, and on a shared machine the
        # threads' spinning costs several times the work itself.
        torch.set_num_threads(1)
    console.rule("[bold]Parametric and activation memory[/bold] (issue 10)")
    with tempfile.TemporaryDirectory(prefix="memwarden-bench-conversion-") as scratch:
        directory = Path(scratch)
        (directory / "conversion.yaml").write_text(POLICY)
        previous = os.environ.get("MEMWARDEN_CONVERSION_POLICY")
        os.environ["MEMWARDEN_CONVERSION_POLICY"] = str(directory / "conversion.yaml")
        settings = Settings(db_url=f"sqlite:///{directory / 'memwarden.db'}",
                            data_dir=str(directory), pii_scan=False)
        try:
            with MemWarden.open(settings=settings, actor="admin:bench") as mw:
                for n, (owner, text) in enumerate(_memories(count)):
                    mw.get(mw.add(text, tenant=TENANT, owner=owner, cube_id=f"bench-{n:03d}")
                           .cube_id)
                mw.flush_reads()
                _parametric(console, mw, count)
                _activation(console, mw, repeats, torch, next_token_logits)
        finally:
            if previous is None:
                os.environ.pop("MEMWARDEN_CONVERSION_POLICY", None)
            else:
                os.environ["MEMWARDEN_CONVERSION_POLICY"] = previous
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
                  f"{'cuda' if torch.cuda.is_available() else 'cpu'}")


def _parametric(console: Console, mw: MemWarden, count: int) -> None:
    import peft  # noqa: F401  (its import, seconds, is not part of a conversion once running)

    started = time.perf_counter()
    base = _basemodel.resolve(mw.settings)  # the tiny default is built here on first use
    _basemodel.load(base)
    first_use_s = time.perf_counter() - started
    started = time.perf_counter()
    plan = mw.conversion_plan(tenant=TENANT)
    selection_s = time.perf_counter() - started
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    started = time.perf_counter()
    result = mw.convert_parametric(tenant=TENANT, on_step=on_step)
    convert_s = time.perf_counter() - started
    started = time.perf_counter()
    mw.load_adapter(result.memory.cube_id)
    load_s = time.perf_counter() - started
    m = result.metrics
    steady = step_times[1:]  # the first step also warms the allocator up
    table = Table("LoRA adapter", "figure", title=f"{len(plan.selected)} of {count} memories "
                  f"selected; base model {base.name}")
    table.add_row("base model: build (first use only) and load", f"{first_use_s:.2f} s")
    table.add_row("selection (dry run)", f"{selection_s * 1000:.1f} ms")
    table.add_row("training", f"{len(step_times)} steps, {len(steady) / sum(steady):.1f} steps/s")
    table.add_row("conversion end to end (load model, measure, train, store, record)",
                  f"{convert_s:.2f} s")
    table.add_row("load through the gate (taint, rights, sha256, base model, PEFT)",
                  f"{load_s * 1000:.0f} ms")
    table.add_row("sources' perplexity before -> after",
                  f"{m['sources_before_perplexity']:.1f} -> {m['sources_after_perplexity']:.1f} "
                  f"(x{m['sources_after_perplexity'] / m['sources_before_perplexity']:.2f})")
    table.add_row("held-out perplexity before -> after",
                  f"{m['held_out_before_perplexity']:.1f} -> {m['held_out_after_perplexity']:.1f} "
                  f"(x{m['held_out_after_perplexity'] / m['held_out_before_perplexity']:.2f})")
    console.print(table)


def _activation(console: Console, mw: MemWarden, repeats: int, torch: object,
                next_token_logits: Callable[..., object]) -> None:
    started = time.perf_counter()
    result = mw.convert_activation(tenant=TENANT)
    build_s = time.perf_counter() - started
    loaded = mw.load_activation(result.memory.cube_id)
    prefix = [s.text for s in result.sources]

    def with_cache() -> int:
        logits = next_token_logits(loaded.base, QUERY, cache=loaded.fresh_cache())
        return int(logits[0, -1].argmax())  # type: ignore[index]

    def without_cache() -> int:
        logits = next_token_logits(loaded.base, QUERY, prefix=prefix)
        return int(logits[0, -1].argmax())  # type: ignore[index]

    assert with_cache() == without_cache()  # the same first token either way
    cached_s = _median_seconds(with_cache, repeats)
    recomputed_s = _median_seconds(without_cache, repeats)
    table = Table("KV cache (activation memory)", "figure",
                  title=f"{len(result.sources)} memories, {result.prefix_tokens} prefix tokens; "
                        f"median of {repeats}")
    table.add_row("build and record the cache", f"{build_s:.2f} s")
    table.add_row("time to first token, with the cache", f"{cached_s * 1000:.2f} ms")
    table.add_row("time to first token, recomputing the memories",
                  f"{recomputed_s * 1000:.2f} ms")
    table.add_row("speed-up", f"x{recomputed_s / cached_s:.2f}")
    console.print(table)
