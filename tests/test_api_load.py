"""A load test of the REST API: a real uvicorn server on loopback, on every backend.

Eight clients, each a thread with its own keep-alive httpx client and the same real API key, send
16,000 mixed requests (on SQLite, the embedded default; fewer on PostgreSQL, see ``REQUESTS``):
adds, reads, and updates with ``expected_version``. Each client updates its own memories (nobody
else writes them, so those updates must succeed) and races every other client on a few shared
"hot" memories (so 409 Conflicts must happen). Nothing but 2xx and 409 may come back. Afterwards
the log must hold exactly the acknowledged writes: every 201 and every 200 update at the version
it reported, no version acknowledged twice (a lost update), none missing, none extra, and a hash
chain that verifies.

The server runs in its own process, as ``uvicorn governance:create_app --factory`` over the test's
database: the clients and the server do not share one interpreter lock, and the log is read back
by another process than the one that wrote it. No timing is asserted: the outcome must not depend
on how fast the machine is.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from governance import ApiKeys, MemWarden
from governance._config import Settings

CLIENTS = 8
REQUESTS = {"sqlite": 16_000, "postgresql": 4_000}
"""Requests in all, per backend. PostgreSQL, on the same two cores as the test, takes about twice
as long per request: a quarter of the load still races every client on every hot memory."""
HOT_MEMORIES = 4
TENANT = "acme"
SUBJECT = "agent:load"
SEED = 20240611
START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Write:
    """A write the server acknowledged: the memory and the version it said it wrote."""

    cube_id: str
    version: int
    text: str
    client: int


@dataclass
class Outcome:
    """What one client saw."""

    writes: list[Write] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    first_hot_attempt: dict[str, int] = field(default_factory=dict)
    """For each hot memory, the ``expected_version`` of this client's first update of it."""
    hot_conflicts: Counter[str] = field(default_factory=Counter)


@contextmanager
def uvicorn_process(database_url: str, workdir: Path) -> Iterator[str]:
    """``uvicorn governance:create_app --factory`` on a free loopback port until the block ends,
    then SIGTERM: it must stop gracefully. Yields the base URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    env.update(MEMWARDEN_DB_URL=database_url, MEMWARDEN_DATA_DIR=str(workdir / "data"),
               MEMWARDEN_KEY_FILE=str(workdir / "data" / "master.key"),
               MEMWARDEN_PII_SCAN="0")  # a load test, not about personal data (~20 ms a scan)
    log = workdir / "uvicorn.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "governance:create_app", "--factory",
             "--host", "127.0.0.1", "--port", "0", "--no-access-log"],
            env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = _started_at(process, log)
        yield base
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    # uvicorn re-raises the signal once it has shut down: -SIGTERM is a graceful stop.
    assert code in (0, -signal.SIGTERM), f"uvicorn exited {code}:\n{log.read_text()}"
    assert "Application shutdown complete" in log.read_text(), log.read_text()


def _started_at(process: subprocess.Popen[bytes], log: Path) -> str:
    """The URL uvicorn says it serves on (port 0: it picked a free one)."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return found.group(1)
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start (exit code {process.poll()}):\n"
                               f"{log.read_text()}")
        time.sleep(0.05)


def _tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def memwarden(database_url: str, tmp_path: Path) -> Iterator[MemWarden]:
    """A handle on the server's database with the server's master key (its data folder)."""
    settings = Settings(db_url=database_url, data_dir=str(tmp_path / "data"))
    with MemWarden.open(actor="test:setup", settings=settings) as handle:
        yield handle


def _client(n: int, base: str, key: str, hot: list[str], requests: int,
            start: threading.Barrier, outcome: Outcome) -> None:
    rng = random.Random(SEED + n)
    own: dict[str, int] = {}  # this client's memories -> the version it last wrote
    seen_hot = dict.fromkeys(hot, 1)  # hot memory -> the version this client last learnt of

    def unexpected(response: httpx.Response, what: str) -> None:
        outcome.problems.append(f"client {n}: {what} -> {response.status_code} {response.text}")

    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"},
                      timeout=120) as client:
        start.wait()
        for i in range(requests):
            roll = rng.random()
            if roll < 0.2 or not own:
                text = f"client {n} request {i}: a new memory"
                response = client.post("/v1/memories", json={
                    "text": text, "tenant": TENANT, "owner": f"user:{n}"})
                outcome.statuses[f"add {response.status_code}"] += 1
                if response.status_code != 201:
                    unexpected(response, "add")
                    continue
                body = response.json()
                if body["version"] != 1 or body["text"] != text:
                    unexpected(response, "add answered another memory")
                own[body["id"]] = 1
                outcome.writes.append(Write(body["id"], 1, text, n))
            elif roll < 0.5:
                cube_id = rng.choice([*own, *hot]) if rng.random() < 0.8 else rng.choice(hot)
                response = client.get(f"/v1/memories/{cube_id}")
                outcome.statuses[f"get {response.status_code}"] += 1
                if response.status_code != 200:
                    unexpected(response, f"get {cube_id}")
                elif cube_id in own and response.json()["version"] != own[cube_id]:
                    unexpected(response, f"get {cube_id} did not read this client's last write "
                                         f"(version {own[cube_id]})")
            else:
                racing = roll >= 0.75
                cube_id = rng.choice(hot) if racing else rng.choice(list(own))
                expected = seen_hot[cube_id] if racing else own[cube_id]
                text = f"client {n} request {i}: changed after version {expected}"
                response = client.patch(f"/v1/memories/{cube_id}", json={
                    "text": text, "expected_version": expected})
                outcome.statuses[f"update {response.status_code}"] += 1
                if racing:
                    outcome.first_hot_attempt.setdefault(cube_id, expected)
                if response.status_code == 200:
                    body = response.json()
                    if body["version"] != expected + 1 or body["text"] != text:
                        unexpected(response, f"update {cube_id} at {expected}")
                    outcome.writes.append(Write(cube_id, body["version"], text, n))
                    (seen_hot if racing else own)[cube_id] = body["version"]
                elif response.status_code == 409 and racing:
                    current = response.json().get("current_version")
                    if not isinstance(current, int) or current <= expected:
                        unexpected(response, f"update {cube_id} at {expected}: the conflict "
                                             "does not name a newer current version")
                        continue
                    outcome.hot_conflicts[cube_id] += 1
                    seen_hot[cube_id] = current  # and try again from there another time
                else:  # a 409 on a memory only this client writes is a bug too
                    unexpected(response, f"update {cube_id} at {expected}")


def _run_clients(base: str, key: str, hot: list[str], requests: int) -> list[Outcome]:
    outcomes = [Outcome() for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)

    def run(n: int) -> None:
        try:
            _client(n, base, key, hot, requests // CLIENTS, start, outcomes[n])
        except BaseException as error:  # a thread's exception would otherwise be lost
            outcomes[n].problems.append(f"client {n} crashed: {error!r}")
            start.abort()

    threads = [threading.Thread(target=run, args=(n,), name=f"load-client-{n}")
               for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.mark.slow
def test_concurrent_clients_lose_no_acknowledged_write(
        memwarden: MemWarden, database_url: str, tmp_path: Path) -> None:
    requests = REQUESTS[database_url.partition(":")[0].partition("+")[0]]
    key = ApiKeys(memwarden).issue(tenant=TENANT, subject=SUBJECT, role="agent").secret
    with uvicorn_process(database_url, tmp_path) as base:
        seeded = []  # the hot memories, added by the same key: an agent may change its own only
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as client:
            for h in range(HOT_MEMORIES):
                text = f"hot memory {h}"
                response = client.post("/v1/memories", json={
                    "text": text, "tenant": TENANT, "owner": "user:shared"})
                assert response.status_code == 201, response.text
                seeded.append(Write(response.json()["id"], 1, text, client=-1))
        hot = [w.cube_id for w in seeded]
        outcomes = _run_clients(base, key, hot, requests)

    problems = [p for o in outcomes for p in o.problems]
    assert problems == [], (f"{len(problems)} unexpected answers, the first:\n"
                            + "\n".join(problems[:20])
                            + f"\nthe server's log ends:\n{_tail(tmp_path / 'uvicorn.log')}")
    statuses = sum((o.statuses for o in outcomes), Counter())
    assert sum(statuses.values()) == requests
    assert {s.split()[1] for s in statuses} <= {"200", "201", "409"}, statuses

    # The clients did race: every client's first update of a hot memory expected version 1, and
    # only one update can ever succeed at version 1, so all the others must have conflicted.
    for cube_id in hot:
        racers = [o for o in outcomes if cube_id in o.first_hot_attempt]
        assert all(o.first_hot_attempt[cube_id] == 1 for o in racers)
        assert len(racers) >= 2, f"only {len(racers)} client(s) updated {cube_id}"
        conflicts = sum(o.hot_conflicts[cube_id] for o in outcomes)
        assert conflicts >= len(racers) - 1, (cube_id, conflicts, len(racers))

    # Every acknowledged write is in the log at the version it was acknowledged with, no version
    # was acknowledged twice, and the log holds no memory write that was not acknowledged.
    writes = seeded + [w for o in outcomes for w in o.writes]
    acknowledged = {(w.cube_id, w.version): w for w in writes}
    assert len(acknowledged) == len(writes), "a version was acknowledged to two writers"
    logged: dict[tuple[str, int], str] = {}
    for cube_id in {w.cube_id for w in writes} | set(hot):
        for event in memwarden.store.read_stream(cube_id):
            logged[(cube_id, event.stream_version)] = event.type
            if (cube_id, event.stream_version) in acknowledged:
                writer = acknowledged[(cube_id, event.stream_version)]
                assert event.actor == SUBJECT, event
                assert event.type == ("MemoryCreated" if writer.version == 1 else
                                      "MemoryUpdated"), event
    assert set(logged) == set(acknowledged)
    for (cube_id, version), write in acknowledged.items():
        assert memwarden.version(cube_id, version).state.text == write.text
    for cube_id in hot:  # each hot memory's versions run 1..n with no gap
        versions = sorted(v for c, v in logged if c == cube_id)
        assert versions == list(range(1, len(versions) + 1))

    memory_events = [e for e in memwarden.store.iter_all()
                     if e.type in ("MemoryCreated", "MemoryUpdated")]
    assert len(memory_events) == len(acknowledged)

    report = memwarden.verify()
    assert report.ok, report.first_break
    assert report.checked == report.head_position == memwarden.store.head_position()
