"""Read models on every backend: rebuilt equals incremental, crash-safe resumption, time travel,
the audit trail and usage indicators (DESIGN §3)."""

from __future__ import annotations

import gc
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pg_statistics import analyzed_tables, estimated_rows
from sqlalchemy import Connection, func, select
from sqlalchemy.engine import make_url

from eventstore import (
    ANY_VERSION,
    EventContext,
    EventStore,
    NewEvent,
    StoredEvent,
    utcnow,
)
from governance import (
    AuditEntry,
    AuditFilter,
    CubeFilter,
    InvalidCommand,
    Limits,
    MemCube,
    MemoryState,
    MemWarden,
    NotFound,
    Settings,
    VersionConflict,
)
from projections import (
    MEMORY_ACCESSED,
    AuditProjection,
    CorruptStream,
    CubesProjection,
    Projection,
    ProjectionRunner,
    ReadModels,
    UsageProjection,
    VersionsProjection,
    audit,
    default_projections,
    usage,
)
from projections._kafka_projector import KafkaFedRunner

TENANTS = ("acme", "globex", "initech")


@pytest.fixture
def mw(database_url: str) -> Iterator[MemWarden]:
    handle = MemWarden.open(actor="agent:test", settings=Settings(db_url=database_url))
    yield handle
    handle.close()


@pytest.fixture
def start(mw: MemWarden) -> int:
    """The head of the log once ``mw`` is open: opening a database seeds the default access
    policy (PolicyRuleAdded events), so a test's own events come after this position."""
    return mw.store.head_position()


@pytest.fixture
def store(database_url: str) -> Iterator[EventStore]:
    opened = EventStore.open(database_url)
    yield opened
    opened.close()


def wait_for_the_clock_to_pass(moment: datetime) -> None:
    """So that the next event is recorded strictly after ``moment``."""
    while utcnow() <= moment:
        time.sleep(0.001)


# -- rebuilt == incremental after a randomized workload --------------------------------------


@dataclass
class Expected:
    """What the workload believes one memory is: its text at every version, and its state."""

    tenant: str
    texts: list[str]
    state: str = "active"

    @property
    def version(self) -> int:
        return len(self.texts)


# About a third writes: reads are what agents mostly do, and what keeps this test quick.
WORKLOAD_MIX = {"add": 6, "update": 14, "delete": 4, "restore": 3, "rollback": 5, "get": 66,
                "list": 2}


@dataclass
class RandomWorkload:
    """Adds, updates, deletes, restores, rollbacks and reads by several actors in several
    tenants, checking every read against what it expects and remembering what it did."""

    mw: MemWarden
    seed: int
    expected: dict[str, Expected] = field(default_factory=dict)
    reads: Counter[str] = field(default_factory=Counter)
    conflicts: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.actors = [self.mw.acting_as(actor) for actor in
                       ("agent:planner", "agent:concierge", "officer:jane")]
        self.active: list[str] = []
        self.deleted: list[str] = []

    def run(self, operations: int) -> None:
        names, weights = zip(*WORKLOAD_MIX.items(), strict=True)
        for n, name in enumerate(self.rng.choices(names, weights, k=operations)):
            getattr(self, name)(n)

    @property
    def actor(self) -> MemWarden:
        return self.rng.choice(self.actors)

    def add(self, n: int) -> None:
        tenant = self.rng.choice(TENANTS)
        memory = self.actor.add(f"memory {n}", tenant=tenant, owner=f"user:{n % 7}",
                                metadata={"tags": [f"t{n % 5}"]})
        self.expected[memory.cube_id] = Expected(tenant, [memory.text])
        self.active.append(memory.cube_id)

    def update(self, n: int) -> None:
        if not self.active:
            self.add(n)
            return
        cube_id = self.rng.choice(self.active)
        expected = self.expected[cube_id]
        if self.rng.random() < 0.05:
            with pytest.raises(VersionConflict):
                self.actor.update(cube_id, text="stale", expected_version=expected.version - 1)
            self.conflicts += 1
            return
        text = f"update {n}" if self.rng.random() < 0.7 else None
        self.actor.update(cube_id, text=text, metadata={"tags": [f"u{n}"]},
                          expected_version=expected.version, reason=f"step {n}")
        expected.texts.append(text or expected.texts[-1])

    def delete(self, n: int) -> None:
        if not self.active:
            self.add(n)
            return
        cube_id = self.rng.choice(self.active)
        self.actor.delete(cube_id, reason=f"asked at step {n}")
        self._move(cube_id, self.active, self.deleted, "deleted")

    def restore(self, n: int) -> None:
        if not self.deleted:
            self.get(n)
            return
        cube_id = self.rng.choice(self.deleted)
        self.actor.restore(cube_id)
        self._move(cube_id, self.deleted, self.active, "active")

    def rollback(self, n: int) -> None:
        candidates = [c for c in self.active[-50:] if self.expected[c].version > 1]
        if not candidates:
            self.update(n)
            return
        cube_id = self.rng.choice(candidates)
        expected = self.expected[cube_id]
        to_version = self.rng.randrange(1, expected.version)
        rolled = self.actor.rollback(cube_id, to_version, reason="undo")
        expected.texts.append(expected.texts[to_version - 1])
        assert rolled.text == expected.texts[-1]

    def get(self, n: int) -> None:
        if not self.expected:
            self.add(n)
            return
        cube_id = self.rng.choice(list(self.expected)[-200:])
        self._check(self.actor.get(cube_id))
        self.reads[cube_id] += 1

    def list(self, _n: int) -> None:
        page = self.actor.list(CubeFilter(tenant=self.rng.choice(TENANTS)), limit=20)
        for memory in page:
            self._check(memory)
            self.reads[memory.cube_id] += 1

    def _move(self, cube_id: str, source: list[str], target: list[str], state: str) -> None:
        source.remove(cube_id)
        target.append(cube_id)
        expected = self.expected[cube_id]
        expected.texts.append(expected.texts[-1])
        expected.state = state

    def _check(self, memory: MemoryState) -> None:
        expected = self.expected[memory.cube_id]
        assert (memory.text, memory.version, memory.state, memory.tenant) == (
            expected.texts[-1], expected.version, expected.state, expected.tenant)

    def assert_read_models_agree(self, reads: ReadModels) -> None:
        """The read models hold exactly what the workload did (so equal digests mean something)."""
        for cube_id, expected in self.expected.items():
            memory = reads.cube(cube_id)
            assert memory is not None
            assert (memory.text, memory.version, memory.state) == (
                expected.texts[-1], expected.version, expected.state)
            assert [v.state.text for v in reads.versions(cube_id)] == expected.texts
            used = reads.usage(cube_id)
            assert (used.read_count, used.write_count) == (self.reads[cube_id], expected.version)


def without_waiting_for_disk_flushes(url: str) -> str:
    """PostgreSQL commits wait for fsync by default; this workload is about projections, not
    durability, so its session does not wait (the same SQL runs, ten times faster)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return url
    options = f"{parsed.query.get('options', '')} -csynchronous_commit=off".strip()
    return parsed.update_query_dict({"options": options}).render_as_string(hide_password=False)


@pytest.fixture
def busy_mw(database_url: str) -> Iterator[MemWarden]:
    # A 10,000-operation load on the read models, not about personal data: no Presidio scan
    # (which would add ~20 ms and, for texts it flags, a SensitiveDataDetected version per write).
    handle = MemWarden.open(actor="agent:test", settings=Settings(
        db_url=without_waiting_for_disk_flushes(database_url), pii_scan=False))
    yield handle
    handle.close()


def test_rebuilding_after_a_randomized_workload_reproduces_the_incremental_state(
        busy_mw: MemWarden) -> None:
    mw = busy_mw
    workload = RandomWorkload(mw, seed=20261121)
    workload.run(10_000)
    mw.flush_reads()
    workload.assert_read_models_agree(ReadModels(mw.store.engine))
    assert len(workload.expected) > 500 and workload.deleted and workload.conflicts
    head, incremental = mw.store.head_position(), mw.projector.digest()

    replayed = mw.rebuild_projections()

    assert replayed == head
    assert mw.projector.digest() == incremental
    assert set(mw.projector.checkpoints().values()) == {head}
    assert mw.verify().ok


# -- a projector killed mid-batch ---------------------------------------------------------------

EVENTS_PER_MEMORY = 7


def write_history_without_projecting(store: EventStore, memories: int = 40) -> int:
    """Each memory: created, updated twice, deleted, restored, rolled back, read once. Appended
    straight to the log, as the SDK's commands would, with no projector running."""
    limits, context = Limits(), EventContext(actor="agent:test", tenant="acme")

    def decide(cube: MemCube, step: str) -> list[NewEvent]:
        if step == "delete":
            return cube.delete(reason="asked")
        if step == "restore":
            return cube.restore(reason=None)
        if step == "rollback":
            return cube.rollback(to_version=1, reason="undo")
        return cube.update(text=f"{step} of {cube.state.cube_id}", metadata=None, reason=None,
                           limits=limits)

    for n in range(memories):
        cube_id = f"m{n:03d}"
        store.append(cube_id, MemCube.create(owner="user:ana", kind="plaintext",
                                             text=f"memory {n}", metadata={"tags": [str(n)]},
                                             reason=None, limits=limits),
                     expected_version=0, context=context)
        for step in ("first update", "second update", "delete", "restore", "rollback"):
            cube = MemCube.from_events(cube_id, store.read_stream(cube_id))
            store.append(cube_id, decide(cube, step), expected_version=cube.version,
                         context=context)
        store.append("reads:acme", [NewEvent(MEMORY_ACCESSED, {"reads": [
            {"cube_id": cube_id, "version": 6, "at": utcnow().isoformat()}]})],
            expected_version=ANY_VERSION, context=context)
    return store.head_position()


class ProjectorKilled(Exception):
    pass


class AuditKilledAfter(AuditProjection):
    """The audit projection of a process that dies after projecting ``survives`` events."""

    def __init__(self, survives: int) -> None:
        self.left = survives

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        survivors = events[:self.left]
        super().apply(conn, survivors)
        self.left -= len(survivors)
        if len(survivors) < len(events):
            raise ProjectorKilled


def every_projection_killed_after(survives: int) -> list[Projection]:
    """The default projections, run by a process that dies while projecting the audit trail."""
    return [AuditKilledAfter(survives) if isinstance(p, AuditProjection) else p
            for p in default_projections()]


def healthy_runner(store: EventStore) -> ProjectionRunner:
    runner = ProjectionRunner(store)
    runner.create_schema()
    return runner


def audited_positions(store: EventStore) -> list[int]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(audit.c.position).order_by(audit.c.position)).scalars())


def usage_counts(store: EventStore) -> set[tuple[int, int]]:
    with store.engine.connect() as conn:
        return {(r, w) for r, w in conn.execute(select(usage.c.read_count, usage.c.write_count))}


def digest_of_a_clean_rebuild(store: EventStore) -> str:
    clean = healthy_runner(store)
    clean.rebuild()
    return clean.digest()


def test_a_projector_killed_mid_batch_resumes_applying_each_event_exactly_once(
        store: EventStore) -> None:
    head = write_history_without_projecting(store)
    killed = ProjectionRunner(store, every_projection_killed_after(150))
    killed.create_schema()

    with pytest.raises(ProjectorKilled):
        killed.catch_up(batch_size=64)

    assert set(killed.checkpoints().values()) == {128}
    assert audited_positions(store) == list(range(1, 129))

    resumed = healthy_runner(store)
    assert resumed.catch_up(batch_size=64) == head - 128

    assert audited_positions(store) == list(range(1, head + 1))
    assert usage_counts(store) == {(1, EVENTS_PER_MEMORY - 1)}
    assert set(resumed.checkpoints().values()) == {head}
    incremental = resumed.digest()
    assert digest_of_a_clean_rebuild(store) == incremental


class AuditWatchingTheCollector(AuditProjection):
    def __init__(self) -> None:
        self.collecting: set[bool] = set()

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        self.collecting.add(gc.isenabled())
        super().apply(conn, events)


def test_catching_up_and_rebuilding_run_with_collection_paused_then_resume_it(
        store: EventStore) -> None:
    """Bulk work pauses cyclic garbage collection (``eventstore._gc``): a rebuild ran 40%
    slower with it on. A killed batch must bring it back too."""
    write_history_without_projecting(store, memories=10)
    watching = AuditWatchingTheCollector()
    runner = ProjectionRunner(store, [watching])
    runner.create_schema()
    was = gc.isenabled()
    gc.enable()
    try:
        runner.catch_up(batch_size=7)
        runner.rebuild(batch_size=7)
        assert watching.collecting == {False}
        assert gc.isenabled()

        with pytest.raises(ProjectorKilled):
            ProjectionRunner(store, [AuditKilledAfter(3)]).rebuild(batch_size=7)
        assert gc.isenabled()
    finally:
        if not was:
            gc.disable()


def test_projections_at_different_checkpoints_each_apply_only_what_they_miss(
        store: EventStore) -> None:
    """E.g. a read model added to an existing database starts at 0 while the others are at
    the head."""
    head = write_history_without_projecting(store, memories=10)
    ahead = ProjectionRunner(store, [CubesProjection(), VersionsProjection(), UsageProjection()])
    ahead.create_schema()
    ahead.catch_up(batch_size=25)
    everything = healthy_runner(store)

    assert everything.catch_up(batch_size=25) == head

    assert set(everything.checkpoints().values()) == {head}
    assert audited_positions(store) == list(range(1, head + 1))
    assert digest_of_a_clean_rebuild(store) == everything.digest()


def test_only_a_runner_whose_read_models_lag_catches_up_when_asked_if_behind(
        store: EventStore) -> None:
    """What opening a database does: a read model an upgrade adds starts at 0 and is caught
    up; read models at the head apply nothing; the Kafka-fed runner leaves them to its
    consumers."""
    head = write_history_without_projecting(store, memories=5)
    ahead = ProjectionRunner(store, [CubesProjection()])
    ahead.create_schema()
    assert ahead.catch_up_if_behind() == head
    assert ahead.catch_up_if_behind() == 0
    everything = healthy_runner(store)
    assert KafkaFedRunner(store).catch_up_if_behind() == 0
    assert min(everything.checkpoints().values()) == 0

    assert everything.catch_up_if_behind() == head

    assert set(everything.checkpoints().values()) == {head}
    assert everything.catch_up_if_behind() == 0


def test_a_rebuild_killed_halfway_leaves_the_previous_read_models_in_place(
        store: EventStore) -> None:
    head = write_history_without_projecting(store, memories=10)
    healthy = healthy_runner(store)
    healthy.catch_up()
    before = healthy.digest()

    with pytest.raises(ProjectorKilled):
        ProjectionRunner(store, every_projection_killed_after(30)).rebuild(batch_size=20)

    assert healthy.digest() == before
    assert set(healthy.checkpoints().values()) == {head}


def test_a_rebuild_on_postgresql_gathers_the_planner_statistics_of_what_it_rebuilt(
        postgres_url: str) -> None:
    """Without them (the test server runs without autovacuum) the planner guessed, and a
    semantic search at 10^5 memories took seconds in a nested loop."""
    store = EventStore.open(postgres_url)
    try:
        write_history_without_projecting(store, memories=10)
        runner = healthy_runner(store)
        runner.catch_up()
        rebuilt = [p for p in runner.projections if p.name in ("cubes", "versions")]

        runner.rebuild([p.name for p in rebuilt])

        with store.engine.connect() as conn:
            analyzed = analyzed_tables(conn)
            estimated = estimated_rows(conn, "versions")
            rows = conn.exec_driver_sql("SELECT count(*) FROM versions").scalar_one()
    finally:
        store.close()
    assert {table.name for p in rebuilt for table in p.tables} <= analyzed
    assert estimated == rows > 0


def test_rebuilding_one_projection_leaves_the_others_alone(mw: MemWarden, start: int) -> None:
    cube_id = mw.add("v1", tenant="acme", owner="user:ana").cube_id
    mw.update(cube_id, text="v2")
    before = mw.projector.digest()

    assert mw.rebuild_projections(["audit"]) == start + 2
    assert mw.projector.digest() == before
    with pytest.raises(InvalidCommand, match="unknown projections"):
        mw.rebuild_projections(["nonsense"])


@pytest.mark.parametrize("lifecycle", ["MemoryExpired", "MemoryDeleted"])
def test_a_lifecycle_event_of_a_memory_never_created_stops_the_projection(
        store: EventStore, lifecycle: str) -> None:
    """Lifecycle moves are written set-based (an UPDATE, an INSERT … SELECT from the previous
    version): one that finds no row must fail loudly, as folding it would, not write nothing."""
    runner = ProjectionRunner(store, [CubesProjection(), VersionsProjection()])
    runner.create_schema()
    context = EventContext(actor="agent:test", tenant="acme")
    store.append("ghost", [NewEvent(lifecycle, {"reason": "no such memory"})],
                 expected_version=0, context=context)

    with pytest.raises(CorruptStream, match=r"ghost|no stored state"):
        runner.catch_up()
    assert set(runner.checkpoints().values()) == {0}  # nothing applied, nothing skipped


def test_a_new_event_is_projected_in_the_transaction_that_appends_it(
        mw: MemWarden, start: int) -> None:
    cube_id = mw.add("v1", tenant="acme", owner="user:ana").cube_id

    mw.update(cube_id, text="v2")

    assert set(mw.projector.checkpoints().values()) == {start + 2}
    assert ReadModels(mw.store.engine).cube(cube_id).text == "v2"  # type: ignore[union-attr]


# -- time travel --------------------------------------------------------------------------------


@dataclass
class Timeline:
    cube_id: str
    versions: list[MemoryState]
    other_tenant: str
    start: int


@pytest.fixture
def timeline(mw: MemWarden, start: int) -> Timeline:
    """acme memory: v1 at position start+1, v2 at start+3, deleted at start+4 (v3); a globex
    memory at start+2; each recorded at a distinct moment (``start``: the head after opening)."""
    versions: list[MemoryState] = []

    def record(state: MemoryState) -> MemoryState:
        wait_for_the_clock_to_pass(state.updated_at)
        return state

    versions.append(record(mw.add("v1", tenant="acme", owner="user:ana")))
    other = record(mw.add("elsewhere", tenant="globex", owner="user:bo"))
    versions.append(record(mw.update(versions[0].cube_id, text="v2")))
    versions.append(record(mw.delete(versions[0].cube_id, reason="asked")))
    return Timeline(versions[0].cube_id, versions, other.cube_id, start)


def test_as_of_a_position_replays_the_memory_up_to_it(mw: MemWarden, timeline: Timeline) -> None:
    seen = {n: mw.as_of(timeline.cube_id, position=timeline.start + n)
            for n in (1, 2, 3, 4, 99)}

    assert [(s.version, s.text, s.state) for s in seen.values()] == [
        (1, "v1", "active"), (1, "v1", "active"), (2, "v2", "active"),
        (3, "v2", "deleted"), (3, "v2", "deleted")]
    assert seen[3] == timeline.versions[1]


def test_as_of_a_position_before_creation_is_not_found(
        mw: MemWarden, timeline: Timeline) -> None:
    with pytest.raises(NotFound, match="did not exist yet"):
        mw.as_of(timeline.other_tenant, position=timeline.start + 1)


def test_as_of_a_moment_replays_what_was_recorded_by_then(
        mw: MemWarden, timeline: Timeline) -> None:
    for version in timeline.versions:
        assert mw.as_of(timeline.cube_id, at=version.updated_at) == version
    just_before_v2 = timeline.versions[1].updated_at - timedelta(microseconds=1)
    assert mw.as_of(timeline.cube_id, at=just_before_v2).version == 1


def test_as_of_a_moment_in_another_time_zone_is_the_same_instant(
        mw: MemWarden, timeline: Timeline) -> None:
    moment = timeline.versions[1].updated_at.astimezone(timezone(timedelta(hours=-5)))

    assert mw.as_of(timeline.cube_id, at=moment).version == 2


def test_as_of_a_moment_before_the_log_began_is_not_found(
        mw: MemWarden, timeline: Timeline) -> None:
    with pytest.raises(NotFound):
        mw.as_of(timeline.cube_id, at=timeline.versions[0].updated_at - timedelta(seconds=1))


@pytest.mark.parametrize("when", [
    {}, {"position": 1, "at": datetime.now(UTC)}, {"position": -1},
    {"at": datetime(2026, 1, 1)},
], ids=["neither", "both", "negative", "naive"])
def test_as_of_needs_exactly_one_valid_position_or_moment(
        mw: MemWarden, timeline: Timeline, when: dict[str, object]) -> None:
    with pytest.raises(InvalidCommand):
        mw.as_of(timeline.cube_id, **when)  # type: ignore[arg-type]
    with pytest.raises(InvalidCommand):
        mw.tenant_as_of("acme", **when)  # type: ignore[arg-type]


def test_tenant_as_of_gives_every_memory_of_that_tenant_then(
        mw: MemWarden, timeline: Timeline) -> None:
    later = mw.add("later", tenant="acme", owner="user:cy")

    at_3 = mw.tenant_as_of("acme", position=timeline.start + 3)
    at_moment = mw.tenant_as_of("acme", at=timeline.versions[0].updated_at)
    now = mw.tenant_as_of("acme", position=mw.store.head_position())

    assert at_3 == {timeline.cube_id: timeline.versions[1]}
    assert at_moment == {timeline.cube_id: timeline.versions[0]}
    assert now == {timeline.cube_id: timeline.versions[2], later.cube_id: later}
    assert mw.tenant_as_of("globex", position=timeline.start + 1) == {}
    assert mw.tenant_as_of("nobody", position=timeline.start + 99) == {}


# -- the audit trail ----------------------------------------------------------------------------


@dataclass
class AuditScene:
    acme_one: str
    acme_two: str
    globex: str
    second_phase_began: datetime
    start: int


@pytest.fixture
def scene(mw: MemWarden, start: int) -> AuditScene:
    """Phase one: planner adds two acme memories and a globex one, concierge updates acme one.
    Phase two (recorded strictly later): officer deletes acme two, auditor reads acme one.
    Their events are at positions start+1 .. start+6, after the seeded access policy's."""
    planner, concierge = mw.acting_as("agent:planner"), mw.acting_as("agent:concierge")
    officer, auditor = mw.acting_as("officer:jane"), mw.acting_as("auditor:kim")
    one = planner.add("Ana's door code is 4512", tenant="acme", owner="user:ana").cube_id
    two = planner.add("Ana likes tea", tenant="acme", owner="user:ana").cube_id
    globex = planner.add("Bo likes trains", tenant="globex", owner="user:bo").cube_id
    last = concierge.update(one, text="Ana's door code is 9999", reason="changed").updated_at
    wait_for_the_clock_to_pass(last)
    second_phase = officer.delete(two, reason="subject asked").updated_at
    auditor.get(one)
    mw.flush_reads()
    return AuditScene(one, two, globex, second_phase, start)


def entries(mw: MemWarden, **where: object) -> list[tuple[int, str, str]]:
    found = mw.audit(AuditFilter(**where), limit=1000)  # type: ignore[arg-type]
    return [(e.position, e.type, e.actor) for e in found]


def test_the_audit_trail_has_one_entry_per_event(mw: MemWarden, scene: AuditScene) -> None:
    s = scene.start
    trail = entries(mw)

    assert trail[:s] == [(p, "PolicyRuleAdded", "memwarden") for p in range(1, s + 1)]
    assert trail[s:] == [
        (s + 1, "MemoryCreated", "agent:planner"),
        (s + 2, "MemoryCreated", "agent:planner"),
        (s + 3, "MemoryCreated", "agent:planner"),
        (s + 4, "MemoryUpdated", "agent:concierge"),
        (s + 5, "MemoryDeleted", "officer:jane"),
        (s + 6, "MemoryAccessed", "auditor:kim"),
    ]


def test_audit_filters_by_tenant(mw: MemWarden, scene: AuditScene) -> None:
    s = scene.start
    assert [p for p, _, _ in entries(mw, tenant="globex")] == [s + 3]
    assert [p for p, _, _ in entries(mw, tenant="acme")] == [s + 1, s + 2, s + 4, s + 5, s + 6]


def test_audit_filters_by_actor(mw: MemWarden, scene: AuditScene) -> None:
    assert entries(mw, actor="officer:jane") == [(scene.start + 5, "MemoryDeleted",
                                                  "officer:jane")]
    assert entries(mw, actor="nobody") == []


def test_audit_by_memory_includes_the_reads_of_it(mw: MemWarden, scene: AuditScene) -> None:
    s = scene.start
    assert [p for p, _, _ in entries(mw, cube_id=scene.acme_one)] == [s + 1, s + 4, s + 6]
    assert [p for p, _, _ in entries(mw, cube_id=scene.acme_two)] == [s + 2, s + 5]


def test_audit_filters_by_event_type(mw: MemWarden, scene: AuditScene) -> None:
    s = scene.start
    assert [p for p, _, _ in entries(mw, types=["MemoryDeleted", "MemoryUpdated"])] == [s + 4,
                                                                                        s + 5]


def test_audit_filters_by_time_range(mw: MemWarden, scene: AuditScene) -> None:
    s = scene.start
    assert [p for p, _, _ in entries(mw, since=scene.second_phase_began)] == [s + 5, s + 6]
    # Until the second phase: the seeded policy's events, then phase one's.
    assert [p for p, _, _ in entries(mw, until=scene.second_phase_began)] == list(
        range(1, s + 5))
    assert [p for p, _, _ in entries(mw, since=scene.second_phase_began,
                                     until=scene.second_phase_began)] == []


def test_audit_filters_combine(mw: MemWarden, scene: AuditScene) -> None:
    s = scene.start
    assert [p for p, _, _ in entries(mw, tenant="acme", actor="agent:planner",
                                     types=["MemoryCreated"])] == [s + 1, s + 2]


def test_audit_entries_carry_reasons_but_never_content(
        mw: MemWarden, scene: AuditScene) -> None:
    trail = mw.audit(after=scene.start, limit=10)

    assert [e.reason for e in trail] == [None, None, None, "changed", "subject asked", None]
    assert trail[5].detail == {"reads": 1}
    # Only what an entry says can carry content (its ids and timestamps may hold any digits).
    said = [repr((e.type, e.actor, e.reason, e.detail)) for e in mw.audit(limit=1000)]
    assert all("door code" not in text and "4512" not in text and "9999" not in text
               for text in said)


def pages(mw: MemWarden, where: AuditFilter, *, limit: int,
          newest_first: bool = False) -> list[list[AuditEntry]]:
    found, after = [], 0
    while page := mw.audit(where, after=after, limit=limit, newest_first=newest_first):
        found.append(page)
        after = page[-1].position
    return found


@pytest.mark.parametrize("where", [AuditFilter(), AuditFilter(tenant="acme")],
                         ids=["everything", "acme"])
def test_audit_pages_follow_the_cursor_without_gaps_or_repeats(
        mw: MemWarden, scene: AuditScene, where: AuditFilter) -> None:
    everything = mw.audit(where, limit=100)

    forwards = pages(mw, where, limit=2)
    backwards = pages(mw, where, limit=2, newest_first=True)

    assert [len(p) for p in forwards][:-1] == [2] * (len(forwards) - 1)
    assert [e for page in forwards for e in page] == everything
    assert [e for page in backwards for e in page] == everything[::-1]


@pytest.mark.parametrize("limit", [0, 1001])
def test_audit_pages_are_bounded(mw: MemWarden, limit: int) -> None:
    with pytest.raises(InvalidCommand):
        mw.audit(limit=limit)


# -- usage --------------------------------------------------------------------------------------


def test_usage_counts_reads_and_writes(mw: MemWarden) -> None:
    reader = mw.acting_as("agent:reader")
    cube_id = mw.add("v1", tenant="acme", owner="user:ana").cube_id
    listed_only = mw.add("only listed", tenant="acme", owner="user:ana").cube_id
    updated = mw.update(cube_id, text="v2")
    reader.get(cube_id)
    reader.get(cube_id)
    reader.list(CubeFilter(owner="user:ana"))
    mw.flush_reads()

    used, listed = mw.usage(cube_id), mw.usage(listed_only)

    assert (used.read_count, used.write_count) == (3, 2)
    assert used.last_read_by == "agent:reader"
    assert used.last_write_at == updated.updated_at
    assert used.last_read_at is not None and used.last_read_at >= updated.updated_at
    assert (listed.read_count, listed.write_count) == (1, 1)
    with pytest.raises(NotFound):  # only memories the caller may see have usage to show
        mw.usage("no-such-memory")


def test_usage_survives_a_rebuild(mw: MemWarden) -> None:
    cube_id = mw.add("v1", tenant="acme", owner="user:ana").cube_id
    for _ in range(3):
        mw.get(cube_id)
    mw.flush_reads()
    before = mw.usage(cube_id)

    mw.rebuild_projections(["usage"])

    assert mw.usage(cube_id) == before
    with mw.store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(usage)).scalar_one() == 1
