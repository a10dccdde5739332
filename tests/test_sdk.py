"""The ``MemWarden`` SDK end to end, on every backend: commands, reads, history, conflicts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import text

from eventstore import StoredEvent, canonical_json
from governance import (
    CubeFilter,
    EmptyText,
    InvalidCommand,
    MalformedMetadata,
    MemoryState,
    MemWarden,
    NotFound,
    Settings,
    StateConflict,
    TextTooLarge,
    VersionConflict,
    VersionNotFound,
)
from projections import MEMORY_ACCESSED

TENANT, OWNER = "acme", "user:ana"


@pytest.fixture
def open_handle(database_url: str) -> Iterator[Callable[..., MemWarden]]:
    """Open MemWarden handles on the test database; all are closed afterwards."""
    handles: list[MemWarden] = []

    def open_(actor: str = "agent:test", **settings: Any) -> MemWarden:
        handle = MemWarden.open(actor=actor,
                                settings=Settings(db_url=database_url, **settings))
        handles.append(handle)
        return handle

    yield open_
    for handle in handles:
        handle.close()


@pytest.fixture
def mw(open_handle: Callable[..., MemWarden]) -> MemWarden:
    return open_handle()


@pytest.fixture
def start(mw: MemWarden) -> int:
    """The head of the log once ``mw`` is open: opening a database seeds the default access
    policy (PolicyRuleAdded events), so a test's own events come after this position."""
    return mw.store.head_position()


def add(mw: MemWarden, text: str = "Ana prefers aisle seats", **options: Any) -> MemoryState:
    return mw.add(text, tenant=TENANT, owner=OWNER, **options)


def memory_events(mw: MemWarden, event_type: str) -> list[StoredEvent]:
    return [e for e in mw.store.iter_all() if e.type == event_type]


# -- add and get ------------------------------------------------------------------------------


def test_a_read_model_an_upgrade_adds_is_caught_up_when_the_database_opens(
        open_handle: Callable[..., MemWarden]) -> None:
    """An upgrade that adds a read model finds a log it has never seen: its checkpoint starts at
    0. Opening must catch it up, or no later write would be projected in its own transaction
    (they are only while every read model is caught up) and none could be read back."""
    first = open_handle()
    before = add(first)
    first.close()
    with first.store.engine.begin() as conn:  # the read model as a new release finds it
        conn.execute(text("DELETE FROM usage"))
        conn.execute(text("UPDATE projection_checkpoints SET position = 0 WHERE name = 'usage'"))

    mw = open_handle()
    after = add(mw, "Ana now prefers window seats")

    assert mw.get(after.cube_id).text == "Ana now prefers window seats"
    assert set(mw.projector.checkpoints().values()) == {mw.store.head_position()}
    assert mw.get(before.cube_id).cube_id == before.cube_id


def test_an_added_memory_can_be_read_back(mw: MemWarden) -> None:
    added = add(mw, metadata={"semantic_type": "preference", "tags": ["flights"]})

    got = mw.get(added.cube_id)

    assert got == added
    assert (got.version, got.state, got.text) == (1, "active", "Ana prefers aisle seats")
    assert (got.tenant, got.owner, got.kind) == (TENANT, OWNER, "plaintext")
    assert (got.created_by, got.updated_by) == ("agent:test", "agent:test")
    assert got.metadata["semantic_type"] == "preference"
    assert got.metadata["tags"] == ["flights"]


def test_a_memory_can_be_added_under_a_chosen_id(mw: MemWarden) -> None:
    add(mw, cube_id="ana-seat")

    assert mw.get("ana-seat").text == "Ana prefers aisle seats"
    with pytest.raises(InvalidCommand, match="already exists"):
        add(mw, "someone else", cube_id="ana-seat")
    assert mw.get("ana-seat").text == "Ana prefers aisle seats"


@pytest.mark.parametrize("cube_id", ["reads:acme", "", " padded", "tab\tid"])
def test_an_invalid_memory_id_is_refused(mw: MemWarden, start: int, cube_id: str) -> None:
    with pytest.raises(InvalidCommand):
        add(mw, cube_id=cube_id)

    assert mw.store.head_position() == start


@pytest.mark.parametrize(("text", "metadata", "error"), [
    ("   ", None, EmptyText),
    ("fine", {"priority": 42}, MalformedMetadata),
    ("fine", {"colour": "red"}, MalformedMetadata),
    ("x" * 65537, None, TextTooLarge),
])
def test_invalid_input_is_refused_and_writes_nothing(
        mw: MemWarden, start: int, text: str, metadata: dict[str, Any] | None,
        error: type[Exception]) -> None:
    with pytest.raises(error):
        add(mw, text, metadata=metadata)

    assert mw.store.head_position() == start


def test_the_text_limit_comes_from_the_settings(open_handle: Callable[..., MemWarden]) -> None:
    small = open_handle(max_text_bytes=10)

    assert add(small, "ten bytes!").version == 1
    with pytest.raises(TextTooLarge):
        add(small, "eleven bytes")


def test_an_unknown_memory_is_not_found(mw: MemWarden) -> None:
    for attempt in (
        lambda: mw.get("nope"),
        lambda: mw.update("nope", text="x"),
        lambda: mw.delete("nope", reason="r"),
        lambda: mw.restore("nope"),
        lambda: mw.rollback("nope", 1, reason="r"),
        lambda: mw.history("nope"),
        lambda: mw.diff("nope", 1, 2),
        lambda: mw.as_of("nope", position=0),
    ):
        with pytest.raises(NotFound):
            attempt()


# -- update, expected_version ------------------------------------------------------------------


def test_updating_the_text_makes_a_new_version(mw: MemWarden) -> None:
    added = add(mw)

    updated = mw.update(added.cube_id, text="Ana prefers window seats", reason="she said so")

    assert (updated.version, updated.text) == (2, "Ana prefers window seats")
    assert mw.get(added.cube_id) == updated
    assert updated.metadata == added.metadata


def test_a_metadata_update_patches_the_current_metadata(mw: MemWarden) -> None:
    added = add(mw, metadata={"tags": ["flights"], "priority": 8})

    updated = mw.update(added.cube_id, metadata={"labels": ["sensitive"]})

    assert updated.text == added.text
    assert (updated.metadata["tags"], updated.metadata["priority"]) == (["flights"], 8)
    assert updated.metadata["labels"] == ["sensitive"]
    assert updated.labels == ("sensitive",)


def test_an_update_at_the_expected_version_succeeds(mw: MemWarden) -> None:
    added = add(mw)

    assert mw.update(added.cube_id, text="v2", expected_version=1).version == 2
    assert mw.update(added.cube_id, text="v3", expected_version=2).version == 3


@pytest.mark.parametrize("stale", [1, 3])
def test_a_stale_expected_version_is_a_conflict_carrying_the_current_version(
        mw: MemWarden, stale: int) -> None:
    added = add(mw)
    mw.update(added.cube_id, text="v2")

    with pytest.raises(VersionConflict) as raised:
        mw.update(added.cube_id, text="v3", expected_version=stale)

    assert (raised.value.cube_id, raised.value.expected, raised.value.current) == (
        added.cube_id, stale, 2)
    assert mw.get(added.cube_id).text == "v2"


def test_every_command_takes_an_expected_version(mw: MemWarden) -> None:
    cube_id = add(mw).cube_id
    mw.update(cube_id, text="v2")

    for stale_command in (
        lambda: mw.delete(cube_id, reason="r", expected_version=1),
        lambda: mw.rollback(cube_id, 1, reason="r", expected_version=1),
    ):
        with pytest.raises(VersionConflict):
            stale_command()
    mw.delete(cube_id, reason="r", expected_version=2)
    with pytest.raises(VersionConflict):
        mw.restore(cube_id, expected_version=2)
    assert mw.restore(cube_id, expected_version=3).version == 4


# -- delete, restore ---------------------------------------------------------------------------


def test_a_deleted_memory_keeps_its_content_and_history(mw: MemWarden) -> None:
    cube_id = add(mw).cube_id

    deleted = mw.delete(cube_id, reason="subject asked")

    assert (deleted.state, deleted.version, deleted.deleted) == ("deleted", 2, True)
    assert mw.get(cube_id).state == "deleted"
    assert mw.get(cube_id).text == "Ana prefers aisle seats"
    assert [v.reason for v in mw.history(cube_id)] == [None, "subject asked"]


def test_a_deleted_memory_must_be_restored_before_it_changes(mw: MemWarden) -> None:
    cube_id = add(mw).cube_id
    mw.delete(cube_id, reason="subject asked")

    with pytest.raises(StateConflict):
        mw.update(cube_id, text="v2")
    with pytest.raises(StateConflict):
        mw.delete(cube_id, reason="again")
    restored = mw.restore(cube_id, reason="mistake")

    assert (restored.state, restored.version) == ("active", 3)
    assert mw.update(cube_id, text="v4").version == 4


def test_delete_needs_a_reason(mw: MemWarden) -> None:
    cube_id = add(mw).cube_id

    with pytest.raises(InvalidCommand, match="reason"):
        mw.delete(cube_id, reason=" ")
    assert mw.get(cube_id).state == "active"


# -- history, diff, rollback -------------------------------------------------------------------


@pytest.fixture
def three_versions(mw: MemWarden, start: int) -> str:
    """Memory at versions 1-3 (``start`` is requested so it is taken before these events)."""
    cube_id = add(mw, "Ana prefers aisle seats\nShe flies on Mondays",
                  metadata={"tags": ["flights"]}, reason="intake").cube_id
    mw.update(cube_id, text="Ana prefers window seats\nShe flies on Mondays",
              reason="corrected by Ana")
    mw.acting_as("officer:jane").update(cube_id, metadata={"labels": ["sensitive"]},
                                        reason="classified")
    return cube_id


def test_history_lists_every_version_oldest_first(mw: MemWarden, three_versions: str) -> None:
    history = mw.history(three_versions)

    assert [v.state.version for v in history] == [1, 2, 3]
    assert [v.reason for v in history] == ["intake", "corrected by Ana", "classified"]
    assert [v.state.updated_by for v in history] == ["agent:test", "agent:test", "officer:jane"]
    assert [v.state.changed for v in history] == [("text", "metadata"), ("text",), ("metadata",)]
    assert history[-1].state == mw.get(three_versions)


def test_diff_shows_text_and_metadata_changes(mw: MemWarden, three_versions: str) -> None:
    text_change = mw.diff(three_versions, 1, 2)
    metadata_change = mw.diff(three_versions, 2, 3)

    assert "-Ana prefers aisle seats" in text_change.text_diff
    assert "+Ana prefers window seats" in text_change.text_diff
    assert " She flies on Mondays" in text_change.text_diff
    assert text_change.metadata_changes == {}
    assert metadata_change.text_diff == []
    assert metadata_change.metadata_changes == {"labels": ([], ["sensitive"])}
    assert mw.diff(three_versions, 2, 2).unchanged


def test_diff_of_a_missing_version_is_version_not_found(
        mw: MemWarden, three_versions: str) -> None:
    with pytest.raises(VersionNotFound):
        mw.diff(three_versions, 1, 9)


def test_rollback_appends_the_content_of_an_earlier_version(
        mw: MemWarden, three_versions: str) -> None:
    rolled = mw.rollback(three_versions, 1, reason="bad correction")

    history = mw.history(three_versions)
    assert (rolled.version, rolled.last_event) == (4, "MemoryRolledBack")
    assert (rolled.text, rolled.metadata) == (history[0].state.text, history[0].state.metadata)
    assert [v.state.version for v in history] == [1, 2, 3, 4]
    assert history[1].state.text.startswith("Ana prefers window seats")
    assert mw.diff(three_versions, 1, 4).unchanged
    assert mw.get(three_versions) == rolled


def test_rollback_to_a_missing_version_is_version_not_found(
        mw: MemWarden, three_versions: str) -> None:
    with pytest.raises(VersionNotFound):
        mw.rollback(three_versions, 7, reason="undo")
    assert mw.get(three_versions).version == 3


# -- listing -----------------------------------------------------------------------------------


def test_list_filters_and_pages_by_id(mw: MemWarden) -> None:
    for n in range(5):
        add(mw, f"memory {n}", cube_id=f"m{n}",
            metadata={"labels": ["sensitive"]} if n % 2 else None)
    mw.add("elsewhere", tenant="globex", owner="user:bo", cube_id="g0")
    mw.delete("m4", reason="asked")

    first = mw.list(CubeFilter(tenant=TENANT), limit=3)
    rest = mw.list(CubeFilter(tenant=TENANT), after=first[-1].cube_id, limit=3)

    assert [m.cube_id for m in first + rest] == ["m0", "m1", "m2", "m3", "m4"]
    assert [m.cube_id for m in mw.list(CubeFilter(label="sensitive"))] == ["m1", "m3"]
    assert [m.cube_id for m in mw.list(CubeFilter(state="deleted"))] == ["m4"]
    assert [m.cube_id for m in mw.list(CubeFilter(owner="user:bo"))] == ["g0"]


# -- reads are recorded ------------------------------------------------------------------------


def test_reads_are_recorded_in_batches_without_content(mw: MemWarden) -> None:
    first = add(mw, "secret: Ana's passport is X123")
    second = add(mw, "Ana likes tea")
    mw.get(first.cube_id)
    mw.get(first.cube_id)
    mw.list(CubeFilter(tenant=TENANT))

    assert memory_events(mw, MEMORY_ACCESSED) == []
    assert mw.flush_reads() == 4

    [accessed] = memory_events(mw, MEMORY_ACCESSED)
    assert (accessed.stream_id, accessed.tenant, accessed.actor) == ("reads:acme", TENANT,
                                                                     "agent:test")
    assert [(r["cube_id"], r["version"]) for r in accessed.payload["reads"]] == [
        (first.cube_id, 1), (first.cube_id, 1), *sorted(
            [(first.cube_id, 1), (second.cube_id, 1)])]
    recorded = canonical_json(dict(accessed.payload))
    assert "passport" not in recorded and "tea" not in recorded


def test_reads_by_different_actors_are_recorded_apart(mw: MemWarden) -> None:
    cube_id = add(mw).cube_id
    mw.get(cube_id)
    mw.acting_as("agent:other", on_behalf_of="user:ana").get(cube_id)
    mw.flush_reads()

    accessed = memory_events(mw, MEMORY_ACCESSED)

    assert sorted((e.actor, e.on_behalf_of) for e in accessed) == [
        ("agent:other", "user:ana"), ("agent:test", None)]


def test_reads_are_flushed_on_their_own_once_a_batch_is_full(mw: MemWarden) -> None:
    cube_id = add(mw).cube_id

    for _ in range(200):
        mw.get(cube_id)

    [accessed] = memory_events(mw, MEMORY_ACCESSED)
    assert len(accessed.payload["reads"]) == 200
    assert mw.flush_reads() == 0


def test_closing_a_handle_records_its_pending_reads(
        open_handle: Callable[..., MemWarden]) -> None:
    writer = open_handle()
    cube_id = add(writer).cube_id
    reader = open_handle("agent:reader")
    reader.get(cube_id)

    reader.close()

    [accessed] = memory_events(writer, MEMORY_ACCESSED)
    assert accessed.actor == "agent:reader"


def test_history_and_audit_queries_are_not_content_reads(mw: MemWarden) -> None:
    cube_id = add(mw).cube_id
    mw.history(cube_id)
    mw.diff(cube_id, 1, 1)

    assert mw.flush_reads() == 0


# -- who did it --------------------------------------------------------------------------------


def test_every_event_records_the_actor_and_whom_it_acted_for(mw: MemWarden) -> None:
    delegate = mw.acting_as("agent:concierge", on_behalf_of="user:ana")
    cube_id = delegate.add("Ana prefers aisle seats", tenant=TENANT, owner=OWNER).cube_id
    mw.update(cube_id, text="v2")

    created, updated = mw.store.read_stream(cube_id)

    assert (created.actor, created.on_behalf_of, created.tenant) == (
        "agent:concierge", "user:ana", TENANT)
    assert (updated.actor, updated.on_behalf_of) == ("agent:test", None)
    assert created.correlation_id and created.correlation_id != updated.correlation_id


# -- concurrent writers ------------------------------------------------------------------------


def test_two_handles_updating_one_version_give_exactly_one_conflict(
        open_handle: Callable[..., MemWarden]) -> None:
    cube_id = add(open_handle()).cube_id
    handles = [open_handle(f"agent:{name}") for name in ("left", "right")]
    start = threading.Barrier(len(handles))
    outcomes: dict[str, Any] = {}

    def update_from(handle: MemWarden) -> None:
        start.wait(timeout=30)
        try:
            outcomes[handle.actor] = handle.update(cube_id, text=f"by {handle.actor}",
                                                   expected_version=1)
        except VersionConflict as conflict:
            outcomes[handle.actor] = conflict

    threads = [threading.Thread(target=update_from, args=(h,)) for h in handles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    conflicts = [o for o in outcomes.values() if isinstance(o, VersionConflict)]
    [winner] = [o for o in outcomes.values() if isinstance(o, MemoryState)]
    assert len(conflicts) == 1 and conflicts[0].current == 2
    assert handles[0].get(cube_id) == winner
    assert [v.state.text for v in handles[0].history(cube_id)] == [
        "Ana prefers aisle seats", winner.text]


def test_a_write_between_read_and_append_is_a_conflict_not_an_overwrite(
        open_handle: Callable[..., MemWarden], monkeypatch: pytest.MonkeyPatch) -> None:
    slow, fast = open_handle("agent:slow"), open_handle("agent:fast")
    cube_id = add(fast).cube_id
    read_stream = slow.store.read_stream

    def read_then_let_fast_write(stream_id: str, **options: Any) -> list[StoredEvent]:
        events = read_stream(stream_id, **options)
        monkeypatch.setattr(slow.store, "read_stream", read_stream)
        fast.update(cube_id, text="fast wins")
        return events

    monkeypatch.setattr(slow.store, "read_stream", read_then_let_fast_write)

    with pytest.raises(VersionConflict) as raised:
        slow.update(cube_id, text="slow overwrites")

    assert (raised.value.expected, raised.value.current) == (1, 2)
    assert [v.state.text for v in fast.history(cube_id)] == ["Ana prefers aisle seats",
                                                            "fast wins"]


def test_verify_is_ok_after_a_mixed_workload(
        mw: MemWarden, start: int, three_versions: str) -> None:
    mw.get(three_versions)
    mw.rollback(three_versions, 1, reason="undo")
    mw.flush_reads()

    report = mw.verify()

    assert report.ok and report.checked == mw.store.head_position() == start + 5
