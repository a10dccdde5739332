"""The workload both sides run: the same memories, written and read the same way.

Each system under test is a *subject* behind one small interface, so every figure is measured by
the same code for MemWarden and for the peer, and neither gets a shortcut the other lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol

TENANT = "acme"
BATCH = 1000
"""Memories per transaction when seeding and in the batched figure."""

_LABELS = ("travel", "work", "health")


def memory_text(i: int) -> str:
    return (f"Memory {i}: prefers a window seat on flights longer than {i % 12 + 1} hours "
            f"and a vegetarian meal")


def memory_metadata(i: int) -> dict[str, Any]:
    return {"labels": [_LABELS[i % len(_LABELS)]], "tags": ["preferences"], "priority": i % 10}


def memory_owner(i: int) -> str:
    return f"user:{i % 1000}"


class Subject(Protocol):
    """One system under test; cube ids are whatever the subject uses (opaque to the caller)."""

    name: str

    def seed(self, count: int, advance: Callable[[int], None]) -> list[Hashable]:
        """Create ``count`` memories, ``BATCH`` per transaction; return their ids."""
        ...

    def add(self, i: int) -> Hashable:
        """Create memory ``i`` through the full single-command write path."""
        ...

    def append(self, i: int) -> None:
        """Create memory ``i`` as one event in its own transaction, in the event log only."""
        ...

    def update(self, cube_id: Hashable, i: int) -> None:
        """Change a memory's text through the full single-command write path."""
        ...

    def append_batch(self, start: int, count: int) -> None:
        """Create memories ``start`` .. ``start + count - 1`` in one transaction."""
        ...

    def get(self, cube_id: Hashable) -> None: ...

    def history(self, cube_id: Hashable) -> None: ...

    def rebuild(self, core_only: bool = False) -> int:
        """Rebuild state from the whole log; return the number of events read. ``core_only``:
        only the read models the event-sourced core defines (MemWarden's cubes, versions, audit
        and usage, not those of later features); the peer has one kind of state either way."""
        ...

    def close(self) -> None: ...
