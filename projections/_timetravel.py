"""What did the agent know then? Replay the log up to a position or a moment."""

from __future__ import annotations

from datetime import datetime

from eventstore import EventStore
from projections._state import CUBE_EVENT_TYPES, MemoryState, evolve, replay


def resolve_position(store: EventStore, *, position: int | None, at: datetime | None) -> int:
    if (position is None) == (at is None):
        raise ValueError("give exactly one of position or at")
    if position is not None:
        if position < 0:
            raise ValueError("position must be >= 0")
        return position
    assert at is not None
    if at.tzinfo is None:
        raise ValueError("the moment must carry a time zone (e.g. 2026-11-17T09:00:00+00:00)")
    return store.position_at(at)


def cube_as_of(store: EventStore, cube_id: str, *, position: int | None = None,
               at: datetime | None = None) -> MemoryState | None:
    """The cube as it was at ``position`` (or at the moment ``at``); None if it did not exist."""
    upto = resolve_position(store, position=position, at=at)
    return replay(store.read_stream(cube_id, up_to_position=upto))


def tenant_as_of(store: EventStore, tenant: str, *, position: int | None = None,
                 at: datetime | None = None) -> dict[str, MemoryState]:
    """Every cube of ``tenant`` as it was at ``position`` (or ``at``), by cube id."""
    upto = resolve_position(store, position=position, at=at)
    states: dict[str, MemoryState] = {}
    after = 0
    while True:
        page = store.read_all(after, limit=5000, tenant=tenant, up_to_position=upto,
                              types=sorted(CUBE_EVENT_TYPES))
        for event in page:
            states[event.stream_id] = evolve(states.get(event.stream_id), event)
        if len(page) < 5000:
            return states
        after = page[-1].position
