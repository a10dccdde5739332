"""Batched read records: every content read becomes part of a ``MemoryAccessed`` event.

Reads are frequent, so they are buffered per (tenant, actor) and appended in one event per flush
(at ``max_batch`` reads, or when the caller flushes: ``memwarden up`` does every second, and
``MemWarden.close`` does). The events name cube ids and versions, never content.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

from sqlalchemy import Connection

from eventstore import (
    ANY_VERSION,
    EventContext,
    EventStore,
    NewEvent,
    StoredEvent,
    StreamAppend,
    utcnow,
)
from projections import MEMORY_ACCESSED


def reads_stream(tenant: str) -> str:
    return f"reads:{tenant}"


class AccessRecorder:
    def __init__(self, store: EventStore, *, max_batch: int = 200,
                 then: Callable[[Connection, list[StoredEvent]], None] | None = None) -> None:
        self._store = store
        self._then = then
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: defaultdict[tuple[str, str, str | None], list[dict[str, object]]] = (
            defaultdict(list))
        self._count = 0

    def record(self, *, tenant: str, actor: str, on_behalf_of: str | None,
               reads: list[tuple[str, int]]) -> None:
        at = utcnow().isoformat()
        with self._lock:
            self._pending[(tenant, actor, on_behalf_of)].extend(
                {"cube_id": cube_id, "version": version, "at": at} for cube_id, version in reads)
            self._count += len(reads)
            full = self._count >= self._max_batch
        if full:
            self.flush()

    def flush(self) -> int:
        """Append everything buffered; return how many reads were recorded."""
        with self._lock:
            pending, self._pending = self._pending, defaultdict(list)
            self._count = 0
        if not pending:
            return 0
        self._store.append_many([
            StreamAppend(
                reads_stream(tenant),
                [NewEvent(MEMORY_ACCESSED, {"reads": batch})],
                ANY_VERSION,
                EventContext(actor=actor, tenant=tenant, on_behalf_of=on_behalf_of),
            )
            for (tenant, actor, on_behalf_of), batch in pending.items()
        ], then=self._then)
        return sum(len(batch) for batch in pending.values())
