"""Schema evolution: stored events are never rewritten; readers upcast them on the way out.

An upcaster turns the payload of ``(type, schema_version=n)`` into the payload of version n+1.
Registering ``MemoryCreated`` 1->2 and 2->3 lets a v1 event be read as v3.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from eventstore._envelope import StoredEvent
from eventstore._errors import UpcastError

Payload = Mapping[str, Any]
Upcaster = Callable[[Payload], Payload]


class Upcasters:
    """A registry of one-step upcasters, applied in a chain up to each type's current version."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Upcaster] = {}
        self._current: dict[str, int] = {}

    def register(self, event_type: str, from_version: int, upcaster: Upcaster) -> None:
        key = (event_type, from_version)
        if key in self._steps:
            raise ValueError(f"an upcaster for {event_type} v{from_version} is already registered")
        self._steps[key] = upcaster
        self._current[event_type] = max(self._current.get(event_type, 1), from_version + 1)

    def current_version(self, event_type: str) -> int:
        return self._current.get(event_type, 1)

    def upcast(self, event: StoredEvent) -> StoredEvent:
        target = self._current.get(event.type)
        if target is None or event.schema_version == target:
            return event
        if event.schema_version > target:
            raise UpcastError(
                f"event {event.event_id} is {event.type} v{event.schema_version}, newer than "
                f"this reader understands (v{target})"
            )
        payload, version = event.payload, event.schema_version
        while version < target:
            step = self._steps.get((event.type, version))
            if step is None:
                raise UpcastError(f"no upcaster for {event.type} v{version} -> v{version + 1}")
            payload, version = step(payload), version + 1
        return replace(event, payload=payload, schema_version=version)
