"""The MemCube aggregate: plain Python, command in, events out. No database in sight.

Metadata follows MemOS's three groups: descriptive (source, semantic type, tags; timestamps come
from the log), governance (tenant, owner = the data subject, labels, ttl, priority, retention
class) and behavioural (access count and recency, kept by the ``usage`` projection).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from eventstore import NewEvent, StoredEvent
from eventstore._envelope import uuid7
from governance._errors import (
    ContentErased,
    EmptyText,
    InvalidCommand,
    MalformedMetadata,
    NotFound,
    StateConflict,
    TextTooLarge,
    VersionNotFound,
)
from projections import (
    COLD_ARCHIVE,
    CUBE_EVENT_TYPES,
    EXPIRED,
    MEMORY_CREATED,
    MEMORY_DELETED,
    MEMORY_RESTORED,
    MEMORY_ROLLED_BACK,
    MEMORY_UPDATED,
    MemoryState,
    evolve,
)

SOURCES = ("user", "inference", "retrieval", "import", "parameter_tuning")
SEMANTIC_TYPES = ("fact", "preference", "event", "instruction", "skill")
KINDS = ("plaintext", "parametric", "activation")
DEFAULT_MAX_TEXT_BYTES = 64 * 1024
_MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class MemoryMetadata:
    source: str = "user"
    semantic_type: str = "fact"
    tags: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    ttl_seconds: int | None = None
    priority: int = 5
    retention_class: str = "standard"
    shared_with: tuple[str, ...] = ()
    """Subjects (agents) besides the creator that may read this memory (the ``shared`` scope)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "semantic_type": self.semantic_type,
            "tags": list(self.tags),
            "labels": list(self.labels),
            "ttl_seconds": self.ttl_seconds,
            "priority": self.priority,
            "retention_class": self.retention_class,
            "shared_with": list(self.shared_with),
        }

    @classmethod
    def parse(cls, raw: Mapping[str, Any], base: MemoryMetadata | None = None) -> MemoryMetadata:
        """Validate ``raw`` (a full document, or a patch over ``base``), with errors a person
        can act on."""
        if not isinstance(raw, Mapping):
            raise MalformedMetadata("metadata must be an object")
        known = cls.__dataclass_fields__
        if not known.keys() >= raw.keys():
            if not all(isinstance(key, str) for key in raw):
                raise MalformedMetadata("metadata field names must be strings")
            unknown, names = sorted(set(raw) - set(known)), sorted(known)
            raise MalformedMetadata(
                f"unknown metadata field(s) {', '.join(unknown)}; known: {', '.join(names)}")
        merged = {**(base.to_dict() if base else _DEFAULT_METADATA), **raw}
        return cls(
            source=_choice("source", merged["source"], SOURCES),
            semantic_type=_choice("semantic_type", merged["semantic_type"], SEMANTIC_TYPES),
            tags=_names("tags", merged["tags"]),
            labels=_names("labels", merged["labels"]),
            ttl_seconds=_ttl(merged["ttl_seconds"]),
            priority=_priority(merged["priority"]),
            retention_class=_name("retention_class", merged["retention_class"]),
            shared_with=_names("shared_with", merged["shared_with"]),
        )


_DEFAULT_METADATA = MemoryMetadata().to_dict()


def _choice(field_name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise MalformedMetadata(f"{field_name} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _name(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_NAME:
        raise MalformedMetadata(f"{field_name} must be a non-empty string of at most "
                                f"{_MAX_NAME} characters; got {value!r}")
    if _UNSTORABLE.search(value):
        raise MalformedMetadata(f"{field_name} must not contain control characters or lone "
                                "surrogates")
    return value.strip()


def _names(field_name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise MalformedMetadata(f"{field_name} must be a list of strings; got {value!r}")
    return tuple(dict.fromkeys(_name(field_name, item) for item in value))


def _ttl(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MalformedMetadata(f"ttl_seconds must be a positive whole number; got {value!r}")
    return value


def _priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10:
        raise MalformedMetadata(f"priority must be a whole number from 0 to 10; got {value!r}")
    return value


def new_memory_id() -> str:
    """The id of a memory added without one: a time-ordered (version 7) UUID, like event ids,
    so the memories a batch adds land together at the end of every index keyed by memory id
    (the stream index of the log, the key vault's, the read models') instead of scattering
    writes over all their pages."""
    return str(uuid7())


def validate_cube_id(value: Any) -> str:
    """Cube ids name event streams; ``:`` is kept for system streams such as ``reads:<tenant>``."""
    cube_id = validate_identifier("id", value)
    if ":" in cube_id:
        raise InvalidCommand(f"a memory id must not contain ':'; got {cube_id!r}")
    return cube_id


def validate_identifier(field_name: str, value: Any) -> str:
    """Tenants, owners and cube ids: short, printable, no surrounding blanks."""
    if not isinstance(value, str) or not value or value != value.strip() or len(value) > _MAX_NAME:
        raise InvalidCommand(f"{field_name} must be a non-empty string of at most {_MAX_NAME} "
                             f"characters without surrounding spaces; got {value!r}")
    if _UNSTORABLE.search(value):
        raise InvalidCommand(f"{field_name} must not contain control characters or lone "
                             "surrogates")
    return value


_UNSTORABLE = re.compile("[\x00-\x1f\ud800-\udfff]")
"""Control characters, and lone surrogates: they cannot be stored as UTF-8 (the log's hash is over
UTF-8 bytes). One precompiled scan, as names are checked on every write."""
_SURROGATE = re.compile("[\ud800-\udfff]")


def _required_reason(reason: str | None, what: str) -> str:
    if reason is None or not reason.strip():
        raise InvalidCommand(f"a reason is required to {what}")
    return reason.strip()


@dataclass(frozen=True, slots=True)
class Limits:
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES


def _checked_text(text: Any, limits: Limits) -> str:
    if not isinstance(text, str):
        raise InvalidCommand("text must be a string")
    if not text.strip():
        raise EmptyText("memory text must not be empty")
    if _SURROGATE.search(text):
        raise InvalidCommand("memory text must be valid Unicode (it holds a lone surrogate)")
    size = len(text.encode())
    if size > limits.max_text_bytes:
        raise TextTooLarge(size, limits.max_text_bytes)
    return text


def _content(text: str, metadata: MemoryMetadata) -> dict[str, Any]:
    return {"text": text, "metadata": metadata.to_dict()}


@dataclass
class MemCube:
    """A memory's decision logic over its history. Build with ``MemCube.from_events``."""

    state: MemoryState
    contents: dict[int, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)

    @classmethod
    def from_events(cls, cube_id: str, events: Sequence[StoredEvent]) -> MemCube:
        cube_events = [e for e in events if e.type in CUBE_EVENT_TYPES]
        if not cube_events:
            raise NotFound(f"no memory with id {cube_id!r}")
        state: MemoryState | None = None
        contents: dict[int, tuple[str, Mapping[str, Any]]] = {}
        for event in cube_events:
            state = evolve(state, event)
            contents[state.version] = (state.text, state.metadata)
        assert state is not None
        return cls(state, contents)

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def metadata(self) -> MemoryMetadata:
        return MemoryMetadata.parse(self.state.metadata)

    @staticmethod
    def create(*, owner: str, kind: str, text: str, metadata: Mapping[str, Any] | None,
               reason: str | None, limits: Limits) -> list[NewEvent]:
        validate_identifier("owner", owner)
        _choice("kind", kind, KINDS)
        content = _content(_checked_text(text, limits), MemoryMetadata.parse(metadata or {}))
        return [NewEvent(MEMORY_CREATED,
                         {"owner": owner, "kind": kind, "content": content, "reason": reason})]

    def update(self, *, text: str | None, metadata: Mapping[str, Any] | None,
               reason: str | None, limits: Limits) -> list[NewEvent]:
        self._require_active("update")
        if self.state.content_erased:
            raise ContentErased(f"memory {self.state.cube_id}'s content was erased; it can no "
                                "longer be changed (add a new memory instead)")
        if text is None and metadata is None:
            raise InvalidCommand("an update needs new text, metadata, or both")
        new_text = self.state.text if text is None else _checked_text(text, limits)
        new_metadata = self.metadata if metadata is None else MemoryMetadata.parse(
            metadata, base=self.metadata)
        content = _content(new_text, new_metadata)
        if content == _content(self.state.text, self.metadata):
            raise InvalidCommand("the update changes nothing")
        return [NewEvent(MEMORY_UPDATED, {"content": content, "reason": reason})]

    def delete(self, *, reason: str | None) -> list[NewEvent]:
        self._require_active("delete")
        return [NewEvent(MEMORY_DELETED, {"reason": _required_reason(reason, "delete a memory")})]

    def restore(self, *, reason: str | None) -> list[NewEvent]:
        if not self.state.deleted:
            raise StateConflict(f"memory {self.state.cube_id} is not deleted")
        return [NewEvent(MEMORY_RESTORED, {"reason": reason})]

    def rollback(self, *, to_version: int, reason: str | None) -> list[NewEvent]:
        """Append a new version whose content equals version ``to_version``; nothing is
        rewritten."""
        self._require_active("roll back")
        why = _required_reason(reason, "roll back a memory")
        if isinstance(to_version, bool) or not isinstance(to_version, int):
            raise InvalidCommand("to_version must be a whole number")
        if to_version not in self.contents:
            raise VersionNotFound(f"memory {self.state.cube_id} has no version {to_version} "
                                  f"(versions 1 to {self.version} exist)")
        if to_version == self.version:
            raise InvalidCommand(f"version {to_version} is already the current version")
        text, metadata = self.contents[to_version]
        if not text:
            raise ContentErased(f"version {to_version} of memory {self.state.cube_id} was "
                                "erased: its content can never be restored")
        return [NewEvent(MEMORY_ROLLED_BACK, {
            "to_version": to_version,
            "content": {"text": text, "metadata": dict(metadata)},
            "reason": why,
        })]

    def _require_active(self, action: str) -> None:
        if self.state.deleted:
            raise StateConflict(f"memory {self.state.cube_id} is deleted; restore it before you "
                                f"{action} it")
        if self.state.state == EXPIRED:
            raise StateConflict(f"memory {self.state.cube_id} expired under its retention rule; "
                                f"it cannot be changed (you tried to {action} it)")
        if self.state.tier == COLD_ARCHIVE:
            raise StateConflict(f"memory {self.state.cube_id} is in the cold archive; recall it "
                                f"before you {action} it")
