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
# Retention (governance._retention): lifecycle moves on the memory's own stream.
MEMORY_EXPIRED = "MemoryExpired"
MEMORY_TIER_CHANGED = "MemoryTierChanged"
MEMORY_DECAYED = "MemoryDecayed"
MEMORY_RECALLED = "MemoryRecalled"
# Sensitive data (governance._sensitive): findings of a write, and crypto-shredded content.
SENSITIVE_DATA_DETECTED = "SensitiveDataDetected"
MEMORY_CONTENT_ERASED = "MemoryContentErased"
SUBJECT_ERASED = "SubjectErased"
"""On stream ``subject:<subject>``: every memory the subject owns in the tenant loses its text."""
# Parametric and activation memory (projections._lineage): on the artifact cube's own stream.
PARAMETRIC_MEMORY_CREATED = "ParametricMemoryCreated"
ACTIVATION_MEMORY_CREATED = "ActivationMemoryCreated"
PARAMETRIC_MEMORY_TAINTED = "ParametricMemoryTainted"
PARAMETRIC_MEMORY_RETIRED = "ParametricMemoryRetired"
ARTIFACT_EVENT_TYPES = frozenset({PARAMETRIC_MEMORY_CREATED, ACTIVATION_MEMORY_CREATED,
                                  PARAMETRIC_MEMORY_TAINTED, PARAMETRIC_MEMORY_RETIRED})

CUBE_EVENT_TYPES = frozenset(
    {MEMORY_CREATED, MEMORY_UPDATED, MEMORY_DELETED, MEMORY_RESTORED, MEMORY_ROLLED_BACK,
     MEMORY_EXPIRED, MEMORY_TIER_CHANGED, MEMORY_DECAYED, MEMORY_RECALLED,
     SENSITIVE_DATA_DETECTED, MEMORY_CONTENT_ERASED} | ARTIFACT_EVENT_TYPES
)
ACTIVE, DELETED, EXPIRED = "active", "deleted", "expired"
WORKING, LONG_TERM, COLD_ARCHIVE = "working", "long_term", "cold_archive"
TIERS = (WORKING, LONG_TERM, COLD_ARCHIVE)


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
    tier: str = WORKING

    @property
    def deleted(self) -> bool:
        return self.state == DELETED

    @property
    def content_erased(self) -> bool:
        """The text was crypto-shredded (a memory's text is never empty otherwise)."""
        return self.text == ""

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
            # Whether text changed is unknowable once it is erased: the rows an erasure purges
            # drop "text" too, so a rebuild gives the rows the live projection has.
            changed=("metadata",) if content.get("erased") else ("text", "metadata"),
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
    if event.type == MEMORY_EXPIRED:
        return replace(touched, state=EXPIRED, changed=("state",))
    if event.type == MEMORY_TIER_CHANGED:
        return replace(touched, tier=payload["to_tier"], changed=("tier",))
    if event.type == MEMORY_RECALLED:
        return replace(touched, tier=WORKING, changed=("tier",))
    if event.type == MEMORY_DECAYED:
        return replace(touched, changed=())
    if event.type == SENSITIVE_DATA_DETECTED:
        return replace(touched, changed=())
    if event.type == MEMORY_CONTENT_ERASED:
        return replace(touched, text="", changed=())
    if event.type in ARTIFACT_EVENT_TYPES:  # what the artifact is and whether it may be loaded
        return replace(touched, changed=())
    raise CorruptStream(f"{event.stream_id}: {event.type} is not a memory event")


def replay(events: Iterable[StoredEvent]) -> MemoryState | None:
    state: MemoryState | None = None
    for event in events:
        if event.type in CUBE_EVENT_TYPES:
            state = evolve(state, event)
    return state
