"""The MemCube aggregate without a database: history in, decision out (events or a typed error).

Histories are hand-made ``StoredEvent`` lists; ``Stream`` plays the store's part (versions,
positions) so each test reads as "given these events, this command gives those events".
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore import GENESIS_HASH, NewEvent, StoredEvent
from governance import (
    EmptyText,
    InvalidCommand,
    Limits,
    MalformedMetadata,
    MemCube,
    MemoryMetadata,
    NotFound,
    StateConflict,
    TextTooLarge,
    VersionNotFound,
)
from projections import (
    MEMORY_ACCESSED,
    MEMORY_CREATED,
    MEMORY_DELETED,
    MEMORY_RESTORED,
    MEMORY_ROLLED_BACK,
    MEMORY_UPDATED,
)

LIMITS = Limits()
DEFAULT_METADATA = MemoryMetadata().to_dict()
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


@dataclass
class Stream:
    """One memory's events as the store would hand them back."""

    cube_id: str = "cube-1"
    events: list[StoredEvent] = field(default_factory=list)

    def record(self, new_events: Sequence[NewEvent], *, actor: str = "agent:test") -> MemCube:
        """Store ``new_events`` and return the memory as it now is."""
        self.append(new_events, actor=actor)
        return self.cube()

    def append(self, new_events: Sequence[NewEvent], *, actor: str = "agent:test") -> None:
        for new in new_events:
            version = len(self.events) + 1
            self.events.append(StoredEvent(
                position=version * 10, event_id=new.event_id, stream_id=self.cube_id,
                stream_version=version, type=new.type, schema_version=new.schema_version,
                occurred_at=new.occurred_at, recorded_at=T0 + timedelta(minutes=version),
                tenant="acme", actor=actor, on_behalf_of=None, correlation_id=None,
                causation_id=None, payload=new.payload, prev_hash=GENESIS_HASH, hash="0" * 64,
            ))

    def cube(self) -> MemCube:
        return MemCube.from_events(self.cube_id, self.events)


def create(text: str = "Ana prefers aisle seats", *, metadata: Mapping[str, Any] | None = None,
           limits: Limits = LIMITS, kind: str = "plaintext") -> list[NewEvent]:
    return MemCube.create(owner="user:ana", kind=kind, text=text, metadata=metadata,
                          reason="told by Ana", limits=limits)


def new_stream(text: str = "v1", metadata: Mapping[str, Any] | None = None) -> Stream:
    stream = Stream()
    stream.record(create(text, metadata=metadata))
    return stream


def update(cube: MemCube, text: str | None = None, metadata: Mapping[str, Any] | None = None,
           *, limits: Limits = LIMITS) -> list[NewEvent]:
    return cube.update(text=text, metadata=metadata, reason="corrected", limits=limits)


def stream_with_versions(*texts: str) -> Stream:
    """Version n has text texts[n-1]."""
    stream = new_stream(texts[0])
    for text in texts[1:]:
        stream.record(update(stream.cube(), text))
    return stream


def only(events: list[NewEvent]) -> NewEvent:
    assert len(events) == 1, events
    return events[0]


# -- building a MemCube from its history ----------------------------------------------------


def test_a_memory_without_events_is_not_found() -> None:
    with pytest.raises(NotFound, match="cube-1"):
        Stream().cube()


def test_a_stream_without_memory_events_is_not_found() -> None:
    stream = Stream("reads:acme")
    stream.append([NewEvent(MEMORY_ACCESSED, {"reads": []})])

    with pytest.raises(NotFound):
        stream.cube()


def test_from_events_folds_the_history_into_the_current_state() -> None:
    stream = stream_with_versions("v1", "v2", "v3")

    cube = stream.cube()

    assert cube.version == 3
    assert (cube.state.text, cube.state.tenant, cube.state.owner) == ("v3", "acme", "user:ana")
    assert {v: text for v, (text, _) in cube.contents.items()} == {1: "v1", 2: "v2", 3: "v3"}


# -- create ---------------------------------------------------------------------------------


def test_create_emits_one_memory_created_with_the_whole_content() -> None:
    event = only(create("Ana prefers aisle seats", metadata={"tags": ["flights"]}))

    assert event.type == MEMORY_CREATED
    assert event.payload == {
        "owner": "user:ana", "kind": "plaintext", "reason": "told by Ana",
        "content": {"text": "Ana prefers aisle seats",
                    "metadata": {**DEFAULT_METADATA, "tags": ["flights"]}},
    }


def test_create_fills_in_every_metadata_default() -> None:
    content = only(create(metadata=None)).payload["content"]

    assert content["metadata"] == {
        "source": "user", "semantic_type": "fact", "tags": [], "labels": [],
        "ttl_seconds": None, "priority": 5, "retention_class": "standard", "shared_with": [],
    }


def test_create_accepts_every_kind() -> None:
    kinds = [only(create(kind=kind)).payload["kind"]
             for kind in ("plaintext", "parametric", "activation")]

    assert kinds == ["plaintext", "parametric", "activation"]


@pytest.mark.parametrize("owner", ["", " user:ana", "user:ana\n", "x" * 201, None, 7])
def test_create_rejects_a_malformed_owner(owner: Any) -> None:
    with pytest.raises(InvalidCommand, match="owner"):
        MemCube.create(owner=owner, kind="plaintext", text="t", metadata=None, reason=None,
                       limits=LIMITS)


def test_create_rejects_an_unknown_kind() -> None:
    with pytest.raises(InvalidCommand, match="kind"):
        create(kind="episodic")


# -- text limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "\n\t  "])
def test_blank_text_is_empty_text(text: str) -> None:
    with pytest.raises(EmptyText):
        create(text)
    with pytest.raises(EmptyText):
        update(new_stream().cube(), text)


def test_text_up_to_64_kib_is_accepted_by_default() -> None:
    assert only(create("x" * 65536)).payload["content"]["text"] == "x" * 65536


@pytest.mark.parametrize("text", ["x" * 65537, "é" * 32769], ids=["ascii", "two-byte"])
def test_text_over_64_kib_of_utf8_is_too_large(text: str) -> None:
    with pytest.raises(TextTooLarge) as raised:
        create(text)

    assert raised.value.size == len(text.encode())
    assert raised.value.limit == 64 * 1024


def test_the_text_limit_is_configurable() -> None:
    small = Limits(max_text_bytes=8)

    assert only(create("12345678", limits=small))
    with pytest.raises(TextTooLarge, match="9 bytes; the limit is 8"):
        create("123456789", limits=small)
    with pytest.raises(TextTooLarge):
        update(new_stream().cube(), "123456789", limits=small)


def test_text_must_be_a_string() -> None:
    with pytest.raises(InvalidCommand):
        create(b"bytes")  # type: ignore[arg-type]


def test_text_with_a_lone_surrogate_is_invalid_not_a_crash() -> None:
    with pytest.raises(InvalidCommand):
        create("half a pair: \ud83d")


# -- metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("metadata", "complaint"), [
    ({"colour": "red"}, "unknown metadata field"),
    ({"source": "rumour"}, "source"),
    ({"semantic_type": "opinion"}, "semantic_type"),
    ({"ttl_seconds": 0}, "ttl_seconds"),
    ({"ttl_seconds": -60}, "ttl_seconds"),
    ({"ttl_seconds": 1.5}, "ttl_seconds"),
    ({"ttl_seconds": "60"}, "ttl_seconds"),
    ({"ttl_seconds": True}, "ttl_seconds"),
    ({"priority": 11}, "priority"),
    ({"priority": -1}, "priority"),
    ({"priority": "5"}, "priority"),
    ({"priority": False}, "priority"),
    ({"tags": "flights"}, "tags"),
    ({"tags": 3}, "tags"),
    ({"tags": {"a": 1}}, "tags"),
    ({"tags": [""]}, "tags"),
    ({"tags": ["ok", None]}, "tags"),
    ({"labels": "sensitive"}, "labels"),
    ({"labels": ["tab\there"]}, "labels"),
    ({"retention_class": ""}, "retention_class"),
    ({"retention_class": "x" * 201}, "retention_class"),
    ({7: "seven"}, "field"),
    ({7: "seven", "tags": []}, "field"),
    ({"tags": ["half a pair \ud83d"]}, "tags"),
])
def test_malformed_metadata_is_rejected_with_the_field_named(
        metadata: dict[Any, Any], complaint: str) -> None:
    with pytest.raises(MalformedMetadata, match=complaint):
        create(metadata=metadata)


def test_metadata_must_be_a_mapping() -> None:
    with pytest.raises(MalformedMetadata, match="object"):
        MemoryMetadata.parse(["tags"])  # type: ignore[arg-type]


def test_metadata_names_are_trimmed_and_deduplicated() -> None:
    parsed = MemoryMetadata.parse({"tags": [" a", "a ", "b"], "labels": ["x", "x"]})

    assert (parsed.tags, parsed.labels) == (("a", "b"), ("x",))


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10,
)
field_names = st.sampled_from(sorted(MemoryMetadata.__dataclass_fields__))
plausible_values = st.sampled_from([
    "user", "inference", "fact", "skill", "standard", 1, 10, 3600, None, ["a", "b"], [], ("x",),
])
metadata_documents = st.dictionaries(
    field_names | st.text(max_size=10) | st.integers(),
    plausible_values | json_values,
    max_size=7,
)


@settings(max_examples=300, deadline=None)
@given(metadata_documents)
def test_parsing_metadata_fails_only_with_malformed_metadata(raw: dict[Any, Any]) -> None:
    try:
        parsed = MemoryMetadata.parse(raw)
    except MalformedMetadata:
        return
    assert MemoryMetadata.parse(parsed.to_dict()) == parsed
    assert set(parsed.to_dict()) == set(MemoryMetadata.__dataclass_fields__)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_checking_text_fails_only_with_a_typed_error(text: str) -> None:
    try:
        event = only(create(text, limits=Limits(max_text_bytes=200)))
    except (EmptyText, TextTooLarge):
        assert not text.strip() or len(text.encode()) > 200
    else:
        assert event.payload["content"]["text"] == text


# -- update -----------------------------------------------------------------------------------


def test_updating_the_text_keeps_the_metadata() -> None:
    cube = new_stream("v1", metadata={"tags": ["a"]}).cube()

    event = only(update(cube, "v2"))

    assert event.type == MEMORY_UPDATED
    assert event.payload == {"reason": "corrected", "content": {
        "text": "v2", "metadata": {**DEFAULT_METADATA, "tags": ["a"]}}}


def test_a_metadata_update_is_a_patch_over_the_current_metadata() -> None:
    cube = new_stream("v1", metadata={"tags": ["a"], "priority": 9}).cube()

    event = only(update(cube, metadata={"labels": ["sensitive"], "ttl_seconds": 60}))

    assert event.payload["content"] == {"text": "v1", "metadata": {
        **DEFAULT_METADATA, "tags": ["a"], "priority": 9, "labels": ["sensitive"],
        "ttl_seconds": 60}}


def test_an_update_can_clear_the_ttl() -> None:
    cube = new_stream(metadata={"ttl_seconds": 60}).cube()

    assert only(update(cube, metadata={"ttl_seconds": None})).payload["content"]["metadata"][
        "ttl_seconds"] is None


@pytest.mark.parametrize(("text", "metadata"), [
    (None, None), ("v1", None), (None, {}), (None, {"priority": 5}), ("v1", {"tags": []}),
])
def test_an_update_that_changes_nothing_is_refused(
        text: str | None, metadata: dict[str, Any] | None) -> None:
    with pytest.raises(InvalidCommand):
        update(new_stream("v1").cube(), text, metadata)


def test_an_update_with_malformed_metadata_is_refused() -> None:
    with pytest.raises(MalformedMetadata):
        update(new_stream().cube(), metadata={"priority": 99})


def test_a_deleted_memory_cannot_be_updated() -> None:
    stream = new_stream()
    stream.record(stream.cube().delete(reason="asked"))

    with pytest.raises(StateConflict, match="restore"):
        update(stream.cube(), "v2")


# -- delete and restore -----------------------------------------------------------------------


def test_delete_records_the_reason() -> None:
    event = only(new_stream().cube().delete(reason="  subject asked  "))

    assert (event.type, event.payload) == (MEMORY_DELETED, {"reason": "subject asked"})


@pytest.mark.parametrize("reason", [None, "", "   "])
def test_delete_needs_a_reason(reason: str | None) -> None:
    with pytest.raises(InvalidCommand, match="reason"):
        new_stream().cube().delete(reason=reason)


def test_a_deleted_memory_cannot_be_deleted_again() -> None:
    stream = new_stream()
    cube = stream.record(stream.cube().delete(reason="asked"))

    assert cube.state.deleted
    with pytest.raises(StateConflict):
        cube.delete(reason="again")


def test_restore_brings_back_the_content_it_had() -> None:
    stream = new_stream("kept", metadata={"tags": ["a"]})
    stream.record(stream.cube().delete(reason="asked"))

    event = only(stream.cube().restore(reason=None))
    cube = stream.record([event])

    assert (event.type, event.payload) == (MEMORY_RESTORED, {"reason": None})
    assert (cube.state.state, cube.state.text, cube.version) == ("active", "kept", 3)
    assert cube.state.metadata["tags"] == ["a"]


def test_only_a_deleted_memory_can_be_restored() -> None:
    with pytest.raises(StateConflict, match="not deleted"):
        new_stream().cube().restore(reason="why not")


# -- rollback ---------------------------------------------------------------------------------


def test_rollback_appends_a_new_version_with_the_content_of_version_k() -> None:
    stream = new_stream("v1", metadata={"tags": ["old"]})
    stream.record(update(stream.cube(), "v2", {"tags": ["new"], "priority": 1}))

    event = only(stream.cube().rollback(to_version=1, reason="bad correction"))
    cube = stream.record([event])

    assert event.type == MEMORY_ROLLED_BACK
    assert event.payload == {"to_version": 1, "reason": "bad correction", "content": {
        "text": "v1", "metadata": {**DEFAULT_METADATA, "tags": ["old"]}}}
    assert cube.version == 3
    assert cube.contents[3] == cube.contents[1]


def test_rollback_never_rewrites_history() -> None:
    stream = stream_with_versions("v1", "v2", "v3")
    before = list(stream.events)

    stream.record(stream.cube().rollback(to_version=1, reason="undo"))

    assert stream.events[:3] == before
    assert [text for text, _ in stream.cube().contents.values()] == ["v1", "v2", "v3", "v1"]


def test_rollback_to_a_delete_or_restore_version_takes_that_versions_content() -> None:
    stream = stream_with_versions("v1", "v2")
    stream.record(stream.cube().delete(reason="asked"))
    stream.record(stream.cube().restore(reason=None))
    stream.record(update(stream.cube(), "v5"))

    cube = stream.record(stream.cube().rollback(to_version=3, reason="undo"))

    assert (cube.version, cube.state.text, cube.state.state) == (6, "v2", "active")


@pytest.mark.parametrize("missing", [0, -1, 4, 99])
def test_rollback_to_a_missing_version_is_version_not_found(missing: int) -> None:
    cube = stream_with_versions("v1", "v2", "v3").cube()

    with pytest.raises(VersionNotFound, match=f"no version {missing}"):
        cube.rollback(to_version=missing, reason="undo")


def test_rollback_to_the_current_version_is_refused() -> None:
    with pytest.raises(InvalidCommand, match="already the current"):
        stream_with_versions("v1", "v2").cube().rollback(to_version=2, reason="undo")


@pytest.mark.parametrize("to_version", ["1", 1.0, True])
def test_rollback_needs_a_whole_version_number(to_version: Any) -> None:
    with pytest.raises(InvalidCommand, match="whole number"):
        stream_with_versions("v1", "v2").cube().rollback(to_version=to_version, reason="undo")


@pytest.mark.parametrize("reason", [None, "", " "])
def test_rollback_needs_a_reason(reason: str | None) -> None:
    with pytest.raises(InvalidCommand, match="reason"):
        stream_with_versions("v1", "v2").cube().rollback(to_version=1, reason=reason)


def test_a_deleted_memory_cannot_be_rolled_back() -> None:
    stream = stream_with_versions("v1", "v2")
    stream.record(stream.cube().delete(reason="asked"))

    with pytest.raises(StateConflict):
        stream.cube().rollback(to_version=1, reason="undo")


# -- any sequence of commands -----------------------------------------------------------------

commands = st.lists(
    st.tuples(st.sampled_from(["update", "tag", "delete", "restore", "rollback"]),
              st.integers(min_value=0, max_value=12)),
    max_size=25,
)


def decide(cube: MemCube, command: str, n: int) -> list[NewEvent]:
    if command == "update":
        return update(cube, f"text {n}")
    if command == "tag":
        return update(cube, metadata={"tags": [f"t{n}"]})
    if command == "delete":
        return cube.delete(reason="asked")
    if command == "restore":
        return cube.restore(reason=None)
    return cube.rollback(to_version=n, reason="undo")


@settings(max_examples=150, deadline=None)
@given(commands)
def test_any_command_sequence_keeps_a_gapless_append_only_history(
        script: list[tuple[str, int]]) -> None:
    stream = new_stream("text 0")
    for command, n in script:
        before = stream.cube()
        try:
            new_events = decide(before, command, n)
        except (InvalidCommand, StateConflict):
            continue
        history = list(stream.events)
        after = stream.record(new_events)

        assert stream.events[:len(history)] == history
        assert after.version == before.version + 1
        assert {v: before.contents[v] for v in before.contents} == {
            v: after.contents[v] for v in before.contents}
        if command == "rollback":
            assert after.contents[after.version] == before.contents[n]
            assert after.state.state == before.state.state
    assert [e.stream_version for e in stream.events] == list(range(1, len(stream.events) + 1))


def test_event_ids_are_fresh_for_every_command() -> None:
    cube = new_stream().cube()

    ids = {only(update(cube, f"v{n}")).event_id for n in range(2, 7)}

    assert len(ids) == 5 and all(isinstance(i, uuid.UUID) for i in ids)
