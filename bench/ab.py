"""``python -m bench.ab BASE [OTHER]``: two commits' write and rebuild paths, per CPU-second.

Rates measured in separate benchmark runs drift with the machine: between two idle runs of one
afternoon the peer itself moved 10-15%. To tell whether a change made MemWarden faster, this runs
the same workload on two commits in alternation, each time in a fresh process, and counts CPU
seconds (``time.process_time``) rather than wall time, so that waiting on a busy machine drops
out. It prints the median of the runs and their ratio.

``BASE`` and ``OTHER`` are anything ``git`` names a commit by; without ``OTHER``, this working
tree, uncommitted changes included. A commit is checked out in a temporary git worktree and
imported from there with this checkout's virtual environment, so the two must share their
dependencies. The workload is ``bench/_ab_measure.py``'s, on the benchmark's ``MemWardenSubject``
of each commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench._report import median

FIGURES = {
    "add": "single add, full write path",
    "batched": "batched appends, 1,000 per transaction",
    "rebuild": "rebuild, every read model",
    "core": "rebuild, core read models",
}
"""What ``_ab_measure.py`` reports, in events (or commands) per CPU-second."""

_REPOSITORY = Path(__file__).resolve().parent.parent
_MEASURE = Path(__file__).resolve().parent / "_ab_measure.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit to compare against")
    parser.add_argument("other", nargs="?", help="the commit to measure (default: this "
                                                 "working tree, uncommitted changes included)")
    parser.add_argument("--memories", type=int, default=30_000,
                        help="memories in the log before measuring (default 30,000)")
    parser.add_argument("--runs", type=int, default=3,
                        help="alternating runs of each side (default 3)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.memories < 1:
        parser.error("--runs and --memories must be at least 1")
    console = Console()
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memwarden-ab-")))
        base = _checkout(args.base, scratch / "base", stack)
        other = (_REPOSITORY, "working tree") if args.other is None else _checkout(
            args.other, scratch / "other", stack)
        sides = [base, other]
        results: dict[str, list[dict[str, float]]] = {label: [] for _, label in sides}
        with console.status("measuring") as status:
            for run in range(args.runs):
                for root, label in sides:
                    status.update(f"run {run + 1} of {args.runs}: {label}, "
                                  f"{args.memories:,} memories")
                    results[label].append(_measure(root, args.memories))
    console.print(_table(results, [label for _, label in sides], args))
    return 0


def _checkout(revision: str, where: Path, stack: ExitStack) -> tuple[Path, str]:
    """``revision`` in a detached worktree at ``where`` (removed on exit), and its label."""
    commit = _git("rev-parse", "--short", f"{revision}^{{commit}}")
    _git("worktree", "add", "--detach", str(where), commit)
    stack.callback(_git, "worktree", "remove", "--force", str(where))
    return where, f"{revision} ({commit})" if revision != commit else commit


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=_REPOSITORY, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def _measure(root: Path, memories: int) -> dict[str, float]:
    """One run of the workload on the code under ``root``, in a process of its own."""
    done = subprocess.run([sys.executable, str(_MEASURE), str(memories)], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"the workload failed on {root}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(results: dict[str, list[dict[str, float]]], labels: list[str],
           args: argparse.Namespace) -> Table:
    base, other = labels
    runs = f"median of {args.runs} alternating runs" if args.runs > 1 else "one run each"
    table = Table(title=f"per CPU-second, {runs}, {args.memories:,} memories in the log")
    table.add_column("figure")
    table.add_column(base, justify="right")
    table.add_column(other, justify="right")
    table.add_column("ratio", justify="right")
    for key, name in FIGURES.items():
        before = median([run[key] for run in results[base]])
        after = median([run[key] for run in results[other]])
        table.add_row(name, f"{before:,.0f}/s", f"{after:,.0f}/s", f"{after / before:.2f}")
    return table


if __name__ == "__main__":
    sys.exit(main())
