"""Fixtures and helpers of the Kafka tests (tests/test_kafka.py, tests/test_kafka_consumers.py).

A pytest plugin (listed in conftest.py): the fixtures are defined once, and the test modules
import the helpers from here rather than from each other. ``kafka_environment`` is not autouse,
since a plugin's autouse fixture would apply to every test: a Kafka test module asks for it with
``pytestmark = pytest.mark.usefixtures("kafka_environment")``.
"""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from tansu_broker import TansuBroker

from eventstore import ANY_VERSION, EventContext, EventStore, NewEvent, StreamAppend
from governance._config import Settings
from governance._memcube import Limits, MemCube
from projections import default_projections
from projections._kafka_projector import KafkaProjector
from projections._readmodels import Projection

MEMORY_ACCESSED = "MemoryAccessed"
LIMITS = Limits()
CONVERGE_SECONDS = 30

CROSS_STREAM_ORDER_SENSITIVE = {"retention"}
"""Read models whose rows depend on how events of *different* streams interleave. Kafka keeps
each stream's order only, so these cannot be fed from it as they are: see
test_a_read_model_fed_from_kafka_must_not_depend_on_cross_stream_order."""


def kafka_projections() -> list[Projection]:
    return [p for p in default_projections() if p.name not in CROSS_STREAM_ORDER_SENSITIVE]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def kafka_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One master key for this test and the processes it starts (they inherit the variables);
    no Presidio scan of writes, which is not what these tests are about and costs seconds."""
    monkeypatch.delenv("MEMWARDEN_MASTER_KEY", raising=False)
    monkeypatch.setenv("MEMWARDEN_KEY_FILE", str(tmp_path / "master.key"))
    monkeypatch.setenv("MEMWARDEN_PII_SCAN", "0")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TansuBroker]:
    with TansuBroker(tmp_path / "tansu.log") as running:
        try:
            yield running
        finally:
            close_clients_left_open()
    gc.collect()  # a socket left open by a client would warn now, in this test


def close_clients_left_open() -> list[str]:
    """Close the Kafka clients a test left open (one that failed half-way, say), naming them.

    Each open client keeps an IO thread reconnecting to the stopped broker for the rest of the
    run, and that thread draws from the global ``random``: a later Hypothesis test then fails
    on "Do not use the `random` module inside strategies"."""
    kafka = sys.modules.get("kafka")
    if kafka is None:
        return []
    kinds = (kafka.KafkaConsumer, kafka.KafkaProducer, kafka.KafkaAdminClient)
    left_open = [obj for obj in gc.get_objects()
                 if issubclass(type(obj), kinds) and getattr(obj, "_closed", True) is False]
    for client in left_open:
        if isinstance(client, kafka.KafkaProducer):
            client.close(timeout=1)
        else:
            client.close()
    return [type(client).__name__ for client in left_open]


# -- workloads and processes --------------------------------------------------------------------


def workload(store: EventStore, memories: int, *, seed: int = 7,
             tenants: Sequence[str] = ("acme", "globex")) -> None:
    """Memories created, updated, deleted, restored and read: every kind of cube event and
    batched reads on each tenant's reads stream, so the streams interleave as in real use."""
    rng = random.Random(seed)
    versions: dict[str, tuple[str, int]] = {}
    for n in range(memories):
        tenant = tenants[n % len(tenants)]
        cube_id = f"{tenant}-{n:05d}-{uuid.uuid4().hex[:6]}"
        events = MemCube.create(owner=f"user:{rng.randrange(20)}", kind="plaintext",
                                text=f"memory {n}: {rng.random()}", metadata=None,
                                reason=None, limits=LIMITS)
        context = EventContext(actor=f"agent:{rng.randrange(5)}", tenant=tenant)
        appends = [StreamAppend(cube_id, events, 0, context)]
        if n % 3 == 0 and versions:
            touched, (touched_tenant, _) = rng.choice(sorted(versions.items()))
            cube = MemCube.from_events(touched, store.read_stream(touched))
            change = rng.random()
            if cube.state.deleted:
                new = cube.restore(reason="back")
            elif change < 0.7:
                new = cube.update(text=f"changed {rng.random()}", metadata=None, reason="edit",
                                  limits=LIMITS)
            else:
                new = cube.delete(reason="gone")
            appends.append(StreamAppend(touched, new, cube.version,
                                        EventContext(actor="agent:0", tenant=touched_tenant)))
        if n % 4 == 0:
            reads = [{"cube_id": c, "version": store.stream_version(c), "at":
                      "2026-01-01T00:00:00+00:00"} for c in rng.sample(sorted(versions), 3)
                     if versions[c][0] == tenant] if len(versions) >= 3 else []
            if reads:
                appends.append(StreamAppend(f"reads:{tenant}", [NewEvent(MEMORY_ACCESSED,
                                                                         {"reads": reads})],
                                            ANY_VERSION, context))
        store.append_many(appends)
        versions[cube_id] = (tenant, 1)


def bulk_workload(store: EventStore, events: int, *, seed: int = 11) -> None:
    """About ``events`` events, appended 500 at a time: creations, updates and reads."""
    rng = random.Random(seed)
    cubes: list[tuple[str, str]] = []
    written = 0
    while written < events:
        appends: list[StreamAppend] = []
        batch_versions: dict[str, int] = {}
        while sum(len(a.events) for a in appends) < 500:
            tenant = rng.choice(("acme", "globex", "initech"))
            context = EventContext(actor=f"agent:{rng.randrange(8)}", tenant=tenant)
            roll = rng.random()
            if roll < 0.5 or len(cubes) < 10:
                cube_id = f"c-{len(cubes):06d}"
                appends.append(StreamAppend(cube_id, MemCube.create(
                    owner=f"user:{rng.randrange(50)}", kind="plaintext",
                    text=f"note {rng.random()}", metadata={"tags": [f"t{rng.randrange(9)}"]},
                    reason=None, limits=LIMITS), 0, context))
                cubes.append((cube_id, tenant))
                batch_versions[cube_id] = 1
            elif roll < 0.85:
                cube_id, tenant = rng.choice(cubes)
                if cube_id in batch_versions:
                    continue
                cube = MemCube.from_events(cube_id, store.read_stream(cube_id))
                new = cube.restore(reason=None) if cube.state.deleted else cube.update(
                    text=f"edit {rng.random()}", metadata=None, reason="edit", limits=LIMITS)
                batch_versions[cube_id] = cube.version + 1
                appends.append(StreamAppend(cube_id, new, cube.version,
                                            replace(context, tenant=tenant)))
            else:
                chosen = [c for c in rng.sample(cubes, 5) if c[1] == tenant
                          and c[0] not in batch_versions]
                if not chosen:
                    continue
                reads = [{"cube_id": c, "version": store.stream_version(c),
                          "at": "2026-01-01T00:00:00+00:00"} for c, _ in chosen]
                appends.append(StreamAppend(f"reads:{tenant}", [NewEvent(
                    MEMORY_ACCESSED, {"reads": reads})], ANY_VERSION, context))
        store.append_many(appends)
        written += sum(len(a.events) for a in appends)

def until(condition: Callable[[], bool], *, seconds: float = CONVERGE_SECONDS,
          what: str = "condition", state: Callable[[], object] | None = None) -> None:
    """Poll ``condition``; on timeout, fail naming ``what`` and, if given, ``state()``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}"
                                 + ("" if state is None else f"; state: {state()}"))
        time.sleep(0.1)


def consumer_state(projector: KafkaProjector) -> dict[str, object]:
    """What a Kafka-fed projector has done so far, for a failure message."""
    source = projector.loop.source
    return {"totals": projector.loop.totals, "replacements": source.replacements,
            "verifying": source.verifying,
            "marks": {p: source.mark(p) for p in source.partitions}}


class Running:
    """A relay or projector loop in a thread of this process, stopped at the end."""

    def __init__(self, target: Callable[[threading.Event], None]) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

        def run() -> None:
            try:
                target(self.stop)
            except BaseException as error:  # reported by join()
                self.errors.append(error)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert not self.errors, self.errors


def memwarden_process(url: str, broker: TansuBroker, topic: str, *args: str,
                      env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from governance._cli import main; main()", "--db", url, *args],
        env={**os.environ, "MEMWARDEN_KAFKA_BOOTSTRAP": broker.bootstrap,
             "MEMWARDEN_KAFKA_TOPIC": topic, "MEMWARDEN_KAFKA_PARTITIONS": "3",
             "MEMWARDEN_ACTOR": "ops:test", **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen[str], timeout: float = 60) -> str:
    """The process's standard output, once it has exited successfully."""
    output, errors = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"{output}\n{errors}"
    return output


def distributed(url: str, broker: TansuBroker, topic: str) -> Settings:
    return replace(Settings.from_env({}), db_url=url, kafka_bootstrap=broker.bootstrap,
                   kafka_topic=topic, kafka_partitions=3)
