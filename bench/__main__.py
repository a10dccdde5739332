"""``python -m bench [--full] [SECTION ...]``: run the benchmark sections and print their tables.

A section is a module of this package with ``run(console, full)``; it measures and prints its own
tables. To add one, write the module and list it in ``SECTIONS``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sqlite3
import sys
from importlib.metadata import version

from rich.console import Console

SECTIONS = (
    "bench.bench_store",
    "bench.bench_pii",
    "bench.bench_policy",
    "bench.bench_http",
    "bench.bench_dashboard",
    "bench.bench_conversion",
    "bench.bench_retention",
    "bench.bench_kafka",
    "bench.bench_search",
)

FULL_ENV = "MEMWARDEN_BENCH_FULL"
PIPED_WIDTH = 160


def _short(section: str) -> str:
    return section.rsplit(".", 1)[-1].removeprefix("bench_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help=f"include the slow sizes (10^6 events); or set {FULL_ENV}=1")
    names = [_short(section) for section in SECTIONS]
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"run only these sections: {', '.join(names)}")
    parser.add_argument("--modes", metavar="MODE,...",
                        help="search section: measure only these modes (bm25, semantic, "
                             "hybrid); or set MEMWARDEN_BENCH_SEARCH_MODES")
    args = parser.parse_args(argv)
    if args.modes:
        os.environ["MEMWARDEN_BENCH_SEARCH_MODES"] = args.modes
    unknown = sorted(set(args.sections) - set(names))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(names)}")
    full = args.full or os.environ.get(FULL_ENV, "") not in ("", "0")
    # Piped into a file or a CI log, rich would wrap every table to 80 columns and cut cells short.
    console = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
    _print_machine(console, full)
    for section in SECTIONS:
        if not args.sections or _short(section) in args.sections:
            importlib.import_module(section).run(console, full)
    return 0


def _print_machine(console: Console, full: bool) -> None:
    """What the figures depend on, printed with them: they mean little on another machine."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    console.print(
        f"[bold]MemWarden benchmark[/bold] ({'full' if full else 'default'} run): "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, load average {load}, "
        f"peer eventsourcing {version('eventsourcing')}"
    )


if __name__ == "__main__":
    sys.exit(main())
