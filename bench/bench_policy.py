"""What enforcing the access policy costs per request (issue #4, item 7).

Decisions per second through the enforcement point (``AccessPolicy.check``): allowed ones, and
denied ones, which also append their AccessDenied event; ``permitted`` filtering a page of 100
search hits; and the Casbin matcher alone, without the per-revision memo, over the default
policy. Each ``check`` first reads the policy revision from the database (so that a change made
anywhere applies to the next request); that read is timed on its own too.

Then the SDK's ``add`` and ``get`` (which ask for ``memory.create`` and ``memory.read_content``)
with the real policy and with one that allows everything, interleaved so that both see the same
database: p50 and p95 latency and the overhead.

On the embedded SQLite default, and on PostgreSQL when the test server is reachable
(``MEMWARDEN_TEST_PG_URL``, as in the tests), in a schema created and dropped for the run.

    python -m bench.bench_policy [--full]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from bench._postgres import (
    PG_URL,
    postgres_reachable,
    scratch_postgres_url,
    scratch_sqlite_url,
)
from eventstore import EventStore
from governance import MemWarden
from governance._policy import AccessPolicy
from governance._principal import Principal, Resource
from projections._policy import POLICY_STREAM

AGENT = Principal("agent:bench", "acme", "agent")
OFFICER = Principal("officer:bench", "acme", "compliance_officer")


def _rate(operation: Callable[[], object], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        operation()
    return count / (time.perf_counter() - started)


def _quantiles(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49] * 1000, cuts[94] * 1000


def _decision_rates(policy: AccessPolicy, store: EventStore, count: int) -> dict[str, float]:
    own = Resource("acme", "memory", "m1", owner="person:ana", created_by=AGENT.subject)
    page = [Resource("acme", "memory", f"m{i}", owner=f"person:{i % 7}",
                     created_by=AGENT.subject if i % 3 else "agent:other",
                     labels=frozenset({"sensitive"} if i % 5 == 0 else ()))
            for i in range(100)]
    in_force = policy._current()  # the bench's one look inside: the matcher without the memo
    matcher = in_force.decide.__wrapped__
    asker, relation = AGENT.asker(), own.relation_to(AGENT)
    _rate(lambda: policy.check(AGENT, "memory.read_content", own), count // 10)  # warm up
    return {
        "revision read": _rate(lambda: store.stream_version(POLICY_STREAM), count),
        "matcher alone, no memo": _rate(
            lambda: matcher(asker, "acme", "memory.read_content", relation), count),
        "check, allowed": _rate(lambda: policy.check(AGENT, "memory.read_content", own), count),
        "check, denied (+ AccessDenied event)": _rate(
            lambda: policy.check(AGENT, "memory.rollback", own), count // 4),
        "permitted, per hit of a 100-hit page": 100 * _rate(
            lambda: policy.permitted(AGENT, "memory.read_content", page), max(count // 100, 5)),
    }


class _AllowEverything:
    """Stands in for the access policy to time the SDK without enforcement: the difference
    from the real one is what enforcing costs a request."""

    def require(self, principal: Principal, action: str, resource: Resource | None = None) -> None:
        return None

    def permitted(self, principal: Principal, action: str, resources: list[Resource]) -> list:
        return list(resources)


def _sdk_latencies(mw: MemWarden, count: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in
                                       ("add", "add enforced", "get", "get enforced")}
    backend = mw._backend  # the handle's shared backend holds the policy every call asks
    enforcing, open_door = backend.policy, _AllowEverything()

    def add(enforced: bool) -> str:
        backend.policy = enforcing if enforced else open_door
        return mw.add("Prefers the window seat on long flights", tenant="acme",
                      owner="person:ana").cube_id

    def get(cube_id: str, enforced: bool) -> None:
        backend.policy = enforcing if enforced else open_door
        mw.get(cube_id)

    try:
        cube_ids = [add(enforced=n % 2 == 0) for n in range(20)]  # warm up both paths
        for n in range(count):
            for enforced in (n % 2 == 0, n % 2 == 1):
                suffix = " enforced" if enforced else ""
                started = time.perf_counter()
                cube_ids.append(add(enforced))
                samples["add" + suffix].append(time.perf_counter() - started)
                started = time.perf_counter()
                get(cube_ids[n], enforced)
                samples["get" + suffix].append(time.perf_counter() - started)
    finally:
        backend.policy = enforcing
    return samples


def _bench_backend(console: Console, backend: str, url: str, full: bool) -> None:
    with MemWarden.open(url, actor=OFFICER.subject) as opened:
        mw = opened.as_principal(OFFICER)
        rates = _decision_rates(mw.policy, mw.store, 20_000 if full else 4_000)
        latencies = _sdk_latencies(mw, 1_000 if full else 200)

    table = Table(title=f"access policy on {backend}: decisions")
    table.add_column("operation")
    table.add_column("per second", justify="right")
    table.add_column("µs each", justify="right")
    for name, rate in rates.items():
        table.add_row(name, f"{rate:,.0f}", f"{1e6 / rate:,.1f}")
    console.print(table)

    table = Table(title=f"access policy on {backend}: SDK latency with and without enforcement")
    for column in ("operation", "p50 ms", "p95 ms", "p50 enforced", "p95 enforced",
                   "p95 overhead"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    for operation in ("add", "get"):
        p50, p95 = _quantiles(latencies[operation])
        p50_enforced, p95_enforced = _quantiles(latencies[f"{operation} enforced"])
        table.add_row(operation, f"{p50:.2f}", f"{p95:.2f}", f"{p50_enforced:.2f}",
                      f"{p95_enforced:.2f}", f"{p95_enforced - p95:+.2f} ms")
    console.print(table)


def run(console: Console, full: bool) -> None:
    with scratch_sqlite_url() as url:
        _bench_backend(console, "SQLite", url, full)
    if postgres_reachable():
        with scratch_postgres_url() as url:
            _bench_backend(console, "PostgreSQL", url, full)
    else:
        console.print(f"PostgreSQL at {make_url(PG_URL).render_as_string()} is unreachable: "
                      "SQLite only")


if __name__ == "__main__":
    run(Console(), full="--full" in sys.argv[1:])
