"""The workload of ``bench.ab``, run as a script in the checkout it measures.

Seeds ``argv[1]`` memories with the benchmark's ``MemWardenSubject`` (the commit's own), then
prints one JSON line of rates per CPU-second: 300 single adds, five batches of 1,000 appends, a
rebuild of every read model and one of the core's (after a first, unmeasured rebuild, which
counts the events and brings every read model up to the log). ``bench.ab`` runs it with the
checkout to measure first on ``PYTHONPATH``, so that it imports that commit's code.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench._memwarden import MemWardenSubject

ADDS = 300
BATCHES = 5
BATCH = 1000


def per_cpu_second(count: int, work: Callable[[], object]) -> float:
    started = time.process_time()
    work()
    return count / (time.process_time() - started)


def measured(subject: MemWardenSubject, memories: int) -> dict[str, float]:
    def adds() -> None:
        for i in range(ADDS):
            subject.add(10 * memories + i)

    def batches() -> None:
        for b in range(BATCHES):
            subject.append_batch(20 * memories + b * BATCH, BATCH)

    rates = {"add": per_cpu_second(ADDS, adds),
             "batched": per_cpu_second(BATCHES * BATCH, batches)}
    # Every event in the log, whatever a commit's adds append besides the memory's creation.
    events = subject.rebuild()
    rates["rebuild"] = per_cpu_second(events, subject.rebuild)
    rates["core"] = per_cpu_second(events, lambda: subject.rebuild(core_only=True))
    return rates


def main() -> None:
    memories = int(sys.argv[1])
    with tempfile.TemporaryDirectory(prefix="memwarden-ab-run-") as directory:
        subject = MemWardenSubject(Path(directory))
        try:
            subject.seed(memories, lambda _: None)
            rates = measured(subject, memories)
        finally:
            subject.close()
    print(json.dumps(rates))


if __name__ == "__main__":
    main()
