"""How one memory's state evolves from its events.

This is the one place that knows what each memory event does to a MemCube. The domain aggregate
(``governance``), the ``cubes`` and ``versions`` read models and time travel all fold events with
``evolve``, so they cannot disagree. Every version-creating event carries the complete content of
the new version, which keeps folding trivial and lets a rollback name any version by number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from eventstore import StoredEvent

MEMORY_CREATED = "MemoryCreated"
MEMORY_UPDATED = "MemoryUpdated"
MEMORY_DELETED = "MemoryDeleted"
MEMORY_RESTORED = "MemoryRestored"
MEMORY_ROLLED_BACK = "MemoryRolledBack"
MEMORY_ACCESSED = "MemoryAccessed"

CUBE_EVENT_TYPES = frozenset(
    {MEMORY_CREATED, MEMORY_UPDATED, MEMORY_DELETED, MEMORY_RESTORED, MEMORY_ROLLED_BACK}
)
ACTIVE, DELETED = "active", "deleted"


@dataclass(frozen=True, slots=True)
class MemoryState:
    """A MemCube as of one stream version."""

    cube_id: str
    tenant: str
    owner: str
    kind: str
    text: str
    metadata: Mapping[str, Any]
    version: int
    state: str
    created_at: datetime
    created_by: str
    updated_at: datetime
    updated_by: str
    position: int
    last_event: str
    changed: tuple[str, ...] = field(default=())

    @property
    def deleted(self) -> bool:
        return self.state == DELETED

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.metadata.get("labels", ()))


class CorruptStream(Exception):
    """A stream's events do not make a valid history (a bug or a foreign writer)."""


def evolve(state: MemoryState | None, event: StoredEvent) -> MemoryState:
    """The state after ``event``; ``state`` is None before the stream's first event."""
    payload = event.payload
    if event.type == MEMORY_CREATED:
        if state is not None:
            raise CorruptStream(f"{event.stream_id}: MemoryCreated after version {state.version}")
        content = payload["content"]
        return MemoryState(
            cube_id=event.stream_id,
            tenant=event.tenant or "",
            owner=payload["owner"],
            kind=payload["kind"],
            text=content["text"],
            metadata=content["metadata"],
            version=event.stream_version,
            state=ACTIVE,
            created_at=event.recorded_at,
            created_by=event.actor,
            updated_at=event.recorded_at,
            updated_by=event.actor,
            position=event.position,
            last_event=event.type,
            changed=("text", "metadata"),
        )
    if state is None:
        raise CorruptStream(f"{event.stream_id}: {event.type} before MemoryCreated")
    touched = replace(
        state,
        version=event.stream_version,
        updated_at=event.recorded_at,
        updated_by=event.actor,
        position=event.position,
        last_event=event.type,
    )
    if event.type in (MEMORY_UPDATED, MEMORY_ROLLED_BACK):
        content = payload["content"]
        changed = tuple(
            name for name, old, new in (
                ("text", state.text, content["text"]),
                ("metadata", state.metadata, content["metadata"]),
            ) if old != new
        )
        return replace(touched, text=content["text"], metadata=content["metadata"],
                       changed=changed)
    if event.type == MEMORY_DELETED:
        return replace(touched, state=DELETED, changed=("state",))
    if event.type == MEMORY_RESTORED:
        return replace(touched, state=ACTIVE, changed=("state",))
    raise CorruptStream(f"{event.stream_id}: {event.type} is not a memory event")


def replay(events: Iterable[StoredEvent]) -> MemoryState | None:
    state: MemoryState | None = None
    for event in events:
        if event.type in CUBE_EVENT_TYPES:
            state = evolve(state, event)
    return state
