"""The retention workers over a real database, on each backend (issue 6): months of simulated
time under a fake clock, legal holds, idempotence and racing workers, a crash in the middle of a
sweep, dry runs, the cold archive and recall, erase-after, and projection rebuilds."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from retention_fixtures import FakeClock
from sqlalchemy import func, select

from eventstore import utcnow
from governance import MemWarden, PermissionDenied, Principal, StateConflict
from governance._retention import MemoryArchived, RetentionPolicy, RetentionWorker
from projections import CubeFilter
from projections._archive import retention_archive
from projections._retention import retention, retention_schedule

RETENTION_EVENTS = ("MemoryExpired", "MemoryTierChanged", "MemoryDecayed", "MemoryRecalled",
                    "MemoryContentErased")

POLICY = """
rules:
  - name: short-events
    match: {semantic_type: event}
    ttl: 60d
  - name: secrets
    match: {labels: [secret]}
    ttl: 100d
    erase_after: 200d
  - name: everything
    tiers: {long_term_after: 30d, cold_archive_after: 120d}
    decay: {half_life: 20d, threshold: 0.2}
"""


@pytest.fixture
def mw(database_url: str) -> Iterator[MemWarden]:
    with MemWarden.open(database_url, actor="ops:retention") as handle:
        yield handle


def add(mw: MemWarden, cube_id: str, *, tenant: str = "acme", owner: str = "user:ana",
        text: str | None = None, **metadata: Any) -> None:
    mw.add(text or f"note {cube_id}", tenant=tenant, owner=owner, cube_id=cube_id,
           metadata=metadata or None)


def trail(mw: MemWarden, cube_id: str, start: datetime) -> list[tuple[str, str | None, int]]:
    """The retention events of a memory: type, the tier moved to, and the simulated day."""
    return [(e.type, e.payload.get("to_tier"), (e.occurred_at - start).days)
            for e in mw.store.read_stream(cube_id) if e.type in RETENTION_EVENTS]


def sweep_daily(worker: RetentionWorker, clock: FakeClock, start: datetime, days: range,
                every: dict[int, Any] | None = None) -> None:
    for day in days:
        clock.now = start + timedelta(days=day)
        if every and day in every:
            every[day]()
        worker.run()


def test_months_of_simulated_time(mw: MemWarden) -> None:
    policy = RetentionPolicy.parse(POLICY)
    add(mw, "event", semantic_type="event")
    add(mw, "pref", semantic_type="preference")
    add(mw, "own-ttl", semantic_type="preference", ttl_seconds=10 * 86400)
    add(mw, "read-often", semantic_type="preference")
    add(mw, "secret", labels=["secret"])
    add(mw, "held", owner="user:bo")
    for _ in range(10):
        mw.get("read-often")
    mw.flush_reads()
    start = utcnow() + timedelta(seconds=1)
    clock = FakeClock(start)
    worker = RetentionWorker(mw, policy, clock=clock)
    hold = mw.place_hold(tenant="acme", owner="user:bo", reason="litigation", case_id="C-1")

    def release() -> None:
        mw.release_hold(hold.hold_id, reason="case closed")

    sweep_daily(worker, clock, start, range(0, 215), every={150: release})

    # base 0.45 (priority 5, no reads): below 0.2 after 20 * log2(0.45 / 0.2) = 23.4 days.
    decay_day = math.ceil(20 * math.log2(0.45 / 0.2))
    # ten reads: base 0.2 + 0.25 + 0.3 * 10/15 = 0.65, after 20 * log2(3.25) = 34.0 days.
    read_decay_day = math.ceil(20 * math.log2(0.65 / 0.2))
    assert trail(mw, "event", start) == [("MemoryExpired", None, 60)]
    assert trail(mw, "own-ttl", start) == [("MemoryExpired", None, 10)]
    assert trail(mw, "pref", start) == [
        ("MemoryDecayed", None, decay_day), ("MemoryTierChanged", "long_term", 30),
        ("MemoryTierChanged", "cold_archive", 120)]
    assert trail(mw, "read-often", start) == [
        ("MemoryTierChanged", "long_term", 30), ("MemoryDecayed", None, read_decay_day),
        ("MemoryTierChanged", "cold_archive", 120)]
    assert [t for t, _, _ in trail(mw, "secret", start)] == ["MemoryExpired",
                                                             "MemoryContentErased"]
    assert trail(mw, "secret", start)[0] == ("MemoryExpired", None, 100)
    # Held: long-term and decay go on, the cold archive waits for the release on day 150.
    assert trail(mw, "held", start) == [
        ("MemoryDecayed", None, decay_day), ("MemoryTierChanged", "long_term", 30),
        ("MemoryTierChanged", "cold_archive", 150)]

    erased = mw.store.read_stream("secret")[-1]
    assert erased.payload["rule"] == "secrets" and "erase_after 200d" in erased.payload["reason"]
    assert mw.backend.reads.cube("secret").text == ""
    expired = next(e for e in mw.store.read_stream("event") if e.type == "MemoryExpired")
    assert expired.payload["rule"] == "short-events"
    assert next(e for e in mw.store.read_stream("own-ttl")
                if e.type == "MemoryExpired").payload["rule"] is None
    # Every sweep ended with its RetentionSweepCompleted, counts included.
    sweeps = mw.store.read_stream("retention:sweeps")
    assert len(sweeps) == 215
    assert sum(s.payload["counts"].get("expired", 0) for s in sweeps) == 3
    assert sweeps[120].payload["counts"] == {"cold_archive": 2, "held": 1}
    assert [n for n, s in enumerate(sweeps) if s.payload["counts"].get("erased")] == [200]
    # Expired and cold memories left the default listing, and search.
    assert [m.cube_id for m in mw.list()] == []
    listed = {m.cube_id: (m.state, m.tier) for m in mw.list(CubeFilter(include_archived=True))}
    assert listed == {"event": ("expired", "working"), "own-ttl": ("expired", "working"),
                      "secret": ("expired", "working"), "pref": ("active", "cold_archive"),
                      "read-often": ("active", "cold_archive"),
                      "held": ("active", "cold_archive")}
    add(mw, "fresh")  # (searching records reads, which would have slowed decay above)
    assert [r.cube_id for r in mw.search("note")] == ["fresh"]


def test_a_hold_on_a_memory_or_a_tenant_blocks_expiry_until_released(mw: MemWarden) -> None:
    policy = RetentionPolicy.parse("rules:\n  - name: brief\n    ttl: 1d\n")
    add(mw, "kept")
    add(mw, "other", owner="user:bo")
    add(mw, "elsewhere", tenant="globex")
    start = utcnow() + timedelta(seconds=1)
    clock = FakeClock(start + timedelta(days=5))
    worker = RetentionWorker(mw, policy, clock=clock)
    on_memory = mw.place_hold(memory="kept", reason="evidence", case_id="C-7")
    on_tenant = mw.place_hold(tenant="globex", reason="regulator inquiry", case_id="R-1")
    report = worker.run()
    assert report.counts["held"] == 2 and report.counts["expired"] == 1
    assert [mw.backend.reads.cube(c).state for c in ("kept", "other", "elsewhere")] == [
        "active", "expired", "active"]
    # Still held a month later.
    clock.now += timedelta(days=30)
    assert worker.run().counts["held"] == 2
    mw.release_hold(on_memory.hold_id, reason="evidence filed")
    with pytest.raises(StateConflict, match="released already"):
        mw.release_hold(on_memory.hold_id, reason="twice")
    report = worker.run()
    assert (report.counts["expired"], report.counts["held"]) == (1, 1)
    assert mw.backend.reads.cube("kept").state == "expired"
    assert mw.backend.reads.cube("elsewhere").state == "active"
    assert {h.hold_id for h in mw.holds()} == {on_tenant.hold_id}
    assert {h.hold_id for h in mw.holds(include_released=True)} == {
        on_memory.hold_id, on_tenant.hold_id}
    placed = mw.store.read_stream(f"hold:{on_memory.hold_id}")
    assert [e.type for e in placed] == ["LegalHoldPlaced", "LegalHoldReleased"]


def test_rules_match_the_pii_entity_types_found_on_write(mw: MemWarden) -> None:
    policy = RetentionPolicy.parse(
        "rules:\n  - name: contact-details\n    match: {pii: [EMAIL_ADDRESS]}\n    ttl: 1d\n"
        "  - name: rest\n    ttl: 365d\n")
    add(mw, "with-email", text="Write to ana.lopez@example.com for the contract")
    add(mw, "plain", text="The contract renews every spring")
    with mw.store.engine.connect() as conn:
        found = dict(conn.execute(select(retention.c.cube_id, retention.c.pii)).all())
    assert "EMAIL_ADDRESS" in found["with-email"] and found["plain"] == "[]"
    report = RetentionWorker(mw, policy, clock=FakeClock(utcnow() + timedelta(days=2))).run()
    assert dict(report.by_rule) == {("contact-details", "expired"): 1}
    assert mw.backend.reads.cube("plain").state == "active"


def test_a_rerun_at_the_same_moment_applies_nothing_twice(mw: MemWarden) -> None:
    policy = RetentionPolicy.parse(POLICY)
    for n in range(5):
        add(mw, f"m{n}", semantic_type="event")
    clock = FakeClock(utcnow() + timedelta(days=61))
    worker = RetentionWorker(mw, policy, clock=clock, batch_size=2)
    first = worker.run()
    assert (first.counts["expired"], first.events) == (5, 6)
    head = mw.store.head_position()
    again = worker.run()
    assert (again.examined, again.events, dict(again.counts)) == (0, 1, {})
    assert mw.store.head_position() == head + 1  # the second RetentionSweepCompleted only


def test_two_racing_workers_never_apply_twice(mw: MemWarden, database_url: str) -> None:
    policy = RetentionPolicy.parse(POLICY)
    for n in range(6):
        add(mw, f"m{n}", semantic_type="event")
    clock = FakeClock(utcnow() + timedelta(days=61))
    with MemWarden.open(database_url, actor="ops:other-worker") as elsewhere:
        slow = RetentionWorker(mw, policy, clock=clock, batch_size=4)
        fast = RetentionWorker(elsewhere, policy, clock=clock, batch_size=4)
        decide_then_append = slow._apply

        def overtaken(decided: Any, now: datetime, report: Any) -> None:
            # The other worker sweeps everything between this one's read and its append.
            if not report.counts.get("conflicts"):
                fast.run()
            decide_then_append(decided, now, report)

        slow._apply = overtaken  # type: ignore[method-assign]
        report = slow.run()
    # The first batch (4) conflicts; the second is read after the other worker's sweep, so
    # the projection shows those memories expired already and nothing is due for them.
    assert report.counts["conflicts"] == 4 and report.counts["expired"] == 0
    for n in range(6):
        expiries = [e for e in mw.store.read_stream(f"m{n}") if e.type == "MemoryExpired"]
        assert len(expiries) == 1 and expiries[0].actor == "ops:other-worker"


def test_a_hold_placed_during_a_sweep_is_honoured(mw: MemWarden) -> None:
    policy = RetentionPolicy.parse(POLICY)
    for n in range(4):
        add(mw, f"m{n}", semantic_type="event", owner="user:bo" if n % 2 else "user:ana")
    clock = FakeClock(utcnow() + timedelta(days=61))
    worker = RetentionWorker(mw, policy, clock=clock, batch_size=10)
    decide_then_append = worker._apply

    def hold_arrives(decided: Any, now: datetime, report: Any) -> None:
        # The hold is placed after the sweep read the holds and decided, before it appends.
        mw.place_hold(tenant="acme", owner="user:bo", reason="late subpoena", case_id="C-2")
        decide_then_append(decided, now, report)

    worker._apply = hold_arrives  # type: ignore[method-assign]
    report = worker.run()
    assert (report.counts["expired"], report.counts["held"]) == (2, 2)
    assert {c: mw.backend.reads.cube(c).state for c in ("m0", "m1", "m2", "m3")} == {
        "m0": "expired", "m1": "active", "m2": "expired", "m3": "active"}


def _final_state(mw: MemWarden, cube_id: str) -> tuple[Any, ...]:
    events = [(e.type, dict(e.payload)) for e in mw.store.read_stream(cube_id)
              if e.type in RETENTION_EVENTS]
    state = mw.backend.reads.cube(cube_id)
    return (events, state.state, state.tier, state.version)


def test_a_crash_in_the_middle_of_a_sweep_then_a_rerun_ends_as_an_uninterrupted_sweep(
        mw: MemWarden, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = RetentionPolicy.parse(POLICY)
    kinds = [{"semantic_type": "event"}, {"semantic_type": "preference"}, {"labels": ["secret"]},
             {"semantic_type": "fact", "priority": 9}, {"semantic_type": "event"},
             {"semantic_type": "skill"}, {"semantic_type": "preference", "priority": 1}]
    for tenant in ("crash", "calm"):
        for n, metadata in enumerate(kinds):
            add(mw, f"{tenant}-{n}", tenant=tenant, **metadata)
    clock = FakeClock(utcnow() + timedelta(days=130))
    worker = RetentionWorker(mw, policy, clock=clock, batch_size=2)

    store, append_many, calls = mw.store, mw.store.append_many, []

    def power_cut(appends: Any, **options: Any) -> Any:
        calls.append(len(appends))
        if len(calls) == 3:
            raise ConnectionError("power cut in the middle of the sweep")
        return append_many(appends, **options)

    monkeypatch.setattr(store, "append_many", power_cut)
    with pytest.raises(ConnectionError):
        worker.run(tenant="crash")
    monkeypatch.setattr(store, "append_many", append_many)
    done_before_crash = sum(1 for n in range(len(kinds))
                            if _final_state(mw, f"crash-{n}")[0])
    assert 0 < done_before_crash < len(kinds)

    resumed = worker.run(tenant="crash")
    uninterrupted = worker.run(tenant="calm")
    assert resumed.examined < uninterrupted.examined  # it did only what was left
    for n in range(len(kinds)):
        assert _final_state(mw, f"crash-{n}") == _final_state(mw, f"calm-{n}"), n
    sweeps = [e.payload["tenant"] for e in mw.store.read_stream("retention:sweeps")]
    assert sweeps == ["crash", "calm"]  # the crashed sweep never claimed to complete


def test_a_dry_run_changes_nothing_and_tells_exactly_what_the_sweep_does(mw: MemWarden) -> None:
    policy = RetentionPolicy.parse(POLICY)
    add(mw, "event", semantic_type="event")
    add(mw, "pref", semantic_type="preference")
    add(mw, "secret", labels=["secret"])
    add(mw, "held", owner="user:bo")
    mw.place_hold(tenant="acme", owner="user:bo", reason="litigation", case_id="C-1")
    clock = FakeClock(utcnow() + timedelta(days=130))
    worker = RetentionWorker(mw, policy, clock=clock)
    head = mw.store.head_position()
    with mw.store.engine.connect() as conn:
        planned_before = conn.execute(select(func.count()).select_from(retention_schedule))
        planned_before = planned_before.scalar_one()
    dry = worker.run(dry_run=True)
    assert mw.store.head_position() == head
    with mw.store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(
            retention_schedule)).scalar_one() == planned_before
    would = {(a.cube_id, a.outcome, a.held_by is not None) for a in dry.actions}
    assert would == {("event", "expired", False), ("pref", "decayed", False),
                     ("pref", "cold_archive", False), ("secret", "expired", False),
                     ("held", "decayed", False), ("held", "cold_archive", True)}
    held = next(a for a in dry.actions if a.held_by)
    assert "held by legal hold" in held.explain() and "'everything'" in held.explain()
    real = worker.run()
    assert real.counts == dry.counts and real.by_rule == dry.by_rule
    did = {(c, e.type) for c in ("event", "pref", "secret", "held")
           for e in mw.store.read_stream(c) if e.type in RETENTION_EVENTS}
    assert did == {("event", "MemoryExpired"), ("pref", "MemoryDecayed"),
                   ("pref", "MemoryTierChanged"), ("secret", "MemoryExpired"),
                   ("held", "MemoryDecayed")}


def test_cold_content_is_compressed_and_read_back_only_by_a_recall(mw: MemWarden) -> None:
    policy = RetentionPolicy.parse(
        "rules:\n  - name: cold\n    tiers: {cold_archive_after: 10d}\n")
    text = "The customer asked us to keep every invoice for seven years. " * 20
    add(mw, "old", text=text)
    clock = FakeClock(utcnow() + timedelta(days=11))
    assert RetentionWorker(mw, policy, clock=clock).run().counts["cold_archive"] == 1
    cold = mw.backend.reads.cube("old")
    assert cold.tier == "cold_archive"
    with mw.store.engine.connect() as conn:
        row = conn.execute(select(retention_archive).where(
            retention_archive.c.cube_id == "old")).mappings().one()
    assert row["text_bytes"] == len(text.encode()) and len(row["compressed"]) < len(text) / 5
    assert text.encode() not in row["compressed"]
    with pytest.raises(StateConflict, match="cold archive: recall it"):
        mw.get("old")
    with pytest.raises(StateConflict, match="recall it before you update it"):
        mw.update("old", text="changed", reason="no")
    # Nor its history, any version, a diff or the state as of before it was archived.
    before = mw.store.head_position() - 1
    for read in (lambda: mw.history("old"), lambda: mw.version("old", 1),
                 lambda: mw.diff("old", 1, 2), lambda: mw.as_of("old", position=before)):
        with pytest.raises(MemoryArchived, match="cold archive: recall it"):
            read()
    assert "old" not in mw.tenant_as_of("acme", position=before)
    assert "old" not in {m.cube_id for m in mw.list()}
    assert [r.cube_id for r in mw.search("invoice")] == []  # nor is it found by search

    agent = mw.as_principal(Principal("agent:a", "acme", "agent"))
    with pytest.raises(PermissionDenied):
        agent.list(CubeFilter(include_archived=True))
    officer = mw.as_principal(Principal("officer:o", "acme", "compliance_officer"))
    with pytest.raises(PermissionDenied):
        agent.recall("old", reason="curious")
    recalled = officer.recall("old", reason="auditor asked for the invoice policy")
    assert recalled.text == text and recalled.state.tier == "working"
    last = mw.store.read_stream("old")[-1]
    assert (last.type, last.actor, last.payload["reason"]) == (
        "MemoryRecalled", "officer:o", "auditor asked for the invoice policy")
    again = officer.recall("old", reason="again")  # recalled already: an ordinary read
    assert (again.text, again.archived_bytes) == (text, 0)
    assert mw.store.read_stream("old")[-1].type == "MemoryRecalled"
    assert mw.get("old").text == text
    assert mw.history("old")[0].state.text == text  # recalled: its history reads again
    assert mw.as_of("old", position=before).text == text
    assert mw.tenant_as_of("acme", position=before)["old"].text == text
    assert [r.cube_id for r in mw.search("invoice")] == ["old"]
    with mw.store.engine.connect() as conn:
        assert conn.execute(select(retention_archive)).first() is None


def test_a_changed_policy_replans_every_memory(mw: MemWarden) -> None:
    for n in range(3):
        add(mw, f"m{n}")
    clock = FakeClock(utcnow() + timedelta(days=20))
    lenient = RetentionPolicy.parse("rules:\n  - name: all\n    ttl: 365d\n")
    strict = RetentionPolicy.parse("rules:\n  - name: all\n    ttl: 10d\n")
    assert RetentionWorker(mw, lenient, clock=clock).run(dry_run=True).actions == []
    assert RetentionWorker(mw, lenient, clock=clock).run().examined == 0
    assert RetentionWorker(mw, strict, clock=clock).run().counts["expired"] == 3


def test_rebuilding_the_retention_projection_reproduces_it(mw: MemWarden) -> None:
    policy = RetentionPolicy.parse(POLICY)
    add(mw, "event", semantic_type="event")
    add(mw, "pref", semantic_type="preference", text="Ana prefers tea " * 10)
    add(mw, "secret", labels=["secret"])
    add(mw, "held", owner="user:bo")
    mw.get("pref")
    hold = mw.place_hold(tenant="acme", owner="user:bo", reason="litigation", case_id="C-1")
    clock = FakeClock(utcnow() + timedelta(days=130))
    worker = RetentionWorker(mw, policy, clock=clock)
    worker.run()
    mw.release_hold(hold.hold_id, reason="closed")
    mw.recall("pref", reason="needed it")
    clock.now += timedelta(days=100)
    worker.run()
    mw.flush_reads()
    mw.projector.catch_up()
    before = mw.projector.digest()
    with mw.store.engine.connect() as conn:
        rows = conn.execute(select(retention).order_by(retention.c.cube_id)).all()
        archived = conn.execute(select(retention_archive.c.cube_id)).scalars().all()
    assert sorted(archived) == ["held", "pref"]
    mw.rebuild_projections(["retention"])
    assert mw.projector.digest() == before
    mw.rebuild_projections()
    assert mw.projector.digest() == before
    with mw.store.engine.connect() as conn:
        assert conn.execute(select(retention).order_by(retention.c.cube_id)).all() == rows
    # The schedule was cleared with the projection: the next sweep replans and finds nothing new.
    assert worker.run().examined == 0
