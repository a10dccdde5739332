"""What the REST API costs over the in-process SDK: ``add`` and ``get`` on SQLite (issue #3).

The API runs in a real uvicorn server, its own process (``bench._serve``) on a free loopback port,
over a temporary SQLite file; clients authenticate with an ``agent`` key issued through
``ApiKeys``. The SDK side is ``MemWarden.add`` / ``MemWarden.get`` in this process, on its own file
and as the principal of its own agent key (``MemWarden.open(key=...)``), so both sides pass the
same access policy; each file is seeded with memories that agent added. At concurrency 1 and 8,
each worker a thread (with its own keep-alive ``httpx.Client`` on the HTTP side): requests/s over
the whole run, and p50/p95 latency of every call. The HTTP figures include the client's own work
(httpx building and parsing each request).

Rates are the median of ``ROUNDS`` rounds in which SDK and HTTP take turns (the other one first
each round); latencies are every call of every round. Neither side runs the background work of
``memwarden up`` (flushing batched read records), so both do the same work per call.

    python -m bench http
"""

from __future__ import annotations

import gc
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
from rich.console import Console
from rich.table import Table

from bench._report import formatted, median, percentile
from bench._workload import TENANT, memory_metadata, memory_owner, memory_text
from governance import ApiKeys, MemWarden, Settings

SEEDED = 1000
"""Memories in each database before measuring; ``get`` reads random ones of them."""
CONCURRENCY = (1, 8)
ROUNDS = 5
CALLS_PER_ROUND = {1: 300, 8: 480}
WARMUP_CALLS = 50
_START_TIMEOUT_SECONDS = 60
_REPO = Path(__file__).resolve().parents[1]


class Side(Protocol):
    """One way of calling MemWarden; ``worker`` says which of the concurrent callers calls."""

    name: str

    def add(self, worker: int, i: int) -> str: ...

    def get(self, worker: int, cube_id: str) -> None: ...


class SdkSide:
    name = "SDK"

    def __init__(self, memwarden: MemWarden) -> None:
        self._mw = memwarden

    def add(self, worker: int, i: int) -> str:
        return self._mw.add(memory_text(i), tenant=TENANT, owner=memory_owner(i),
                            metadata=memory_metadata(i)).cube_id

    def get(self, worker: int, cube_id: str) -> None:
        self._mw.get(cube_id)


class HttpSide:
    name = "HTTP"

    def __init__(self, base_url: str, key: str, workers: int) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        self._clients = [httpx.Client(base_url=base_url, headers=headers)
                         for _ in range(workers)]

    def add(self, worker: int, i: int) -> str:
        response = self._clients[worker].post("/v1/memories", json={
            "text": memory_text(i), "tenant": TENANT, "owner": memory_owner(i),
            "metadata": memory_metadata(i)})
        response.raise_for_status()
        return str(response.json()["id"])

    def get(self, worker: int, cube_id: str) -> None:
        self._clients[worker].get(f"/v1/memories/{cube_id}").raise_for_status()

    def close(self) -> None:
        for client in self._clients:
            client.close()


@dataclass
class Results:
    """One side, one operation, one concurrency: a rate per round and every call's latency."""

    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def run(console: Console, full: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="memwarden-bench-http-") as tmp, \
            ExitStack() as closing:
        folders = {name: Path(tmp) / name for name in ("SDK", "HTTP")}
        keys: dict[str, str] = {}
        ids: dict[str, list[str]] = {}
        with console.status("[bold]seeding both databases[/bold]"):
            for name, folder in folders.items():
                folder.mkdir()
                keys[name], ids[name] = _prepare(folder)
        memwarden = closing.enter_context(_open(folders["SDK"], key=keys["SDK"]))
        base = closing.enter_context(_serving(folders["HTTP"]))
        http = HttpSide(base, keys["HTTP"], max(CONCURRENCY))
        closing.callback(http.close)
        results = _measure(console, [SdkSide(memwarden), http], ids)
    console.print(_table(results))


def _url(folder: Path) -> str:
    return f"sqlite:///{folder / 'memwarden.db'}"


def _open(folder: Path, *, key: str | None = None) -> MemWarden:
    return MemWarden.open(_url(folder), actor="ops:bench", key=key,
                          settings=Settings(db_url=_url(folder), data_dir=str(folder)))


def _prepare(folder: Path) -> tuple[str, list[str]]:
    """An agent key for ``folder``'s new database, and ``SEEDED`` memories that agent added (an
    agent may read the memories it created)."""
    with _open(folder) as operator:
        key = ApiKeys(operator).issue(tenant=TENANT, subject="agent:bench", role="agent").secret
    with _open(folder, key=key) as agent:
        return key, [agent.add(memory_text(i), tenant=TENANT, owner=memory_owner(i),
                               metadata=memory_metadata(i)).cube_id for i in range(SEEDED)]


@contextmanager
def _serving(folder: Path) -> Iterator[str]:
    """The API over ``folder``'s database in a uvicorn process; yields its base URL."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = subprocess.Popen(
            [sys.executable, "-m", "bench._serve", str(sock.fileno()), _url(folder), str(folder)],
            cwd=_REPO, pass_fds=[sock.fileno()])
        try:
            _wait_until_healthy(base, server)
            yield base
        finally:
            server.terminate()
            server.wait(timeout=_START_TIMEOUT_SECONDS)


def _wait_until_healthy(base: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    while True:
        try:
            if httpx.get(f"{base}/v1/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the API server did not become healthy")
        time.sleep(0.05)


Case = tuple[str, int, str]
"""(operation, concurrency, side)."""


def _measure(console: Console, sides: Sequence[Side],
             ids: dict[str, list[str]]) -> dict[Case, Results]:
    results: defaultdict[Case, Results] = defaultdict(Results)
    picks = random.Random(SEEDED)
    next_add = SEEDED

    def add(side: Side) -> Callable[[int, int], object]:
        nonlocal next_add
        first, next_add = next_add, next_add + max(CALLS_PER_ROUND.values())
        return lambda worker, n: side.add(worker, first + n)

    def get(side: Side) -> Callable[[int, int], object]:
        chosen = picks.choices(ids[side.name], k=max(CALLS_PER_ROUND.values()))
        return lambda worker, n: side.get(worker, chosen[n])

    operations = {"add": add, "get": get}
    with console.status("[bold]measuring[/bold]") as status:
        for side in sides:
            for operation in operations.values():
                _drive(max(CONCURRENCY), WARMUP_CALLS, operation(side))
        for name, operation in operations.items():
            for concurrency in CONCURRENCY:
                count = CALLS_PER_ROUND[concurrency]
                status.update(f"{name} at concurrency {concurrency}")
                for round_ in range(ROUNDS):
                    shift = round_ % len(sides)
                    for side in [*sides[shift:], *sides[:shift]]:
                        seconds, samples = _drive(concurrency, count, operation(side))
                        measured = results[name, concurrency, side.name]
                        measured.rates.append(count / seconds)
                        measured.latencies.extend(samples)
    console.log("measured the REST API and the SDK")
    return results


def _drive(concurrency: int, count: int,
           call: Callable[[int, int], object]) -> tuple[float, list[float]]:
    """``call(worker, n)`` for n in 0 .. count - 1, shared among ``concurrency`` threads that
    start together; the seconds from their start to the last one's end, and each call's."""
    gc.collect()
    start = threading.Barrier(concurrency + 1)
    samples: list[list[float]] = [[] for _ in range(concurrency)]
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        start.wait()
        try:
            for n in range(worker, count, concurrency):
                began = time.perf_counter()
                call(worker, n)
                samples[worker].append(time.perf_counter() - began)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(concurrency)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    if failures:
        raise failures[0]
    return seconds, [s for worker in samples for s in worker]


def _table(results: dict[Case, Results]) -> Table:
    table = Table(
        title="REST API (uvicorn over loopback) vs the in-process SDK, SQLite",
        title_justify="left", caption_justify="left",
        caption=f"{SEEDED:,} memories seeded per database. Rates: median of {ROUNDS} rounds, "
                "SDK and HTTP taking turns. Latencies: every call of every round. "
                "HTTP ÷ SDK: below 1 for rates and above 1 for latencies is the API's cost.")
    for column in ("operation", "concurrency"):
        table.add_column(column)
    for column in ("SDK", "HTTP", "HTTP ÷ SDK", "SDK p50", "HTTP p50", "SDK p95", "HTTP p95",
                   "HTTP ÷ SDK p50"):
        table.add_column(column, justify="right")
    for name in ("add", "get"):
        for concurrency in CONCURRENCY:
            sdk, http = results[name, concurrency, "SDK"], results[name, concurrency, "HTTP"]
            sdk_rate, http_rate = median(sdk.rates), median(http.rates)
            sdk_p50, http_p50 = percentile(sdk.latencies, 0.5), percentile(http.latencies, 0.5)
            table.add_row(
                name, str(concurrency),
                formatted(sdk_rate, "/s"), formatted(http_rate, "/s"),
                f"{http_rate / sdk_rate:.2f}",
                formatted(sdk_p50, "s"), formatted(http_p50, "s"),
                formatted(percentile(sdk.latencies, 0.95), "s"),
                formatted(percentile(http.latencies, 0.95), "s"),
                f"{http_p50 / sdk_p50:.2f}",
            )
    return table
