"""The peer: a pyeventsourcing ``Application`` on its own SQLite persistence module.

Its aggregate holds what a MemCube holds (tenant, owner, kind, text, metadata) and records the same
two events, so both sides store the same information per command.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.sqlite import SQLiteConnection, SQLiteConnectionPool, SQLiteFactory

from bench._workload import BATCH, TENANT, memory_metadata, memory_owner, memory_text

_NOTIFICATIONS_PAGE = 5000


class Memory(Aggregate):
    @event("Created")
    def __init__(self, tenant: str, owner: str, kind: str, text: str, metadata: dict[str, Any],
                 reason: str | None) -> None:
        self.tenant = tenant
        self.owner = owner
        self.kind = kind
        self.text = text
        self.metadata = metadata
        self.reason = reason

    @event("Updated")
    def update(self, text: str, reason: str | None) -> None:
        self.text = text
        self.reason = reason


class Memories(Application[uuid.UUID]):
    pass


class _NormalSyncPool(SQLiteConnectionPool):
    def _create_connection(self) -> SQLiteConnection:
        connection = super()._create_connection()
        connection._sqlite_conn.execute("PRAGMA synchronous=NORMAL")
        return connection


class NormalSyncSQLiteFactory(SQLiteFactory):
    """The peer's SQLite module with MemWarden's durability: WAL and ``synchronous=NORMAL``
    (no fsync per commit). The peer itself keeps SQLite's default, ``FULL``."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        pool = self.datastore.pool
        self.datastore.pool = _NormalSyncPool(db_name=pool.db_name, lock_timeout=pool.lock_timeout)
        pool.close()


class PeerSubject:
    def __init__(self, directory: Path, *, normal_sync: bool = False) -> None:
        self.name = "peer, synchronous=NORMAL" if normal_sync else "peer"
        module = f"{__name__}:{NormalSyncSQLiteFactory.__name__}" if normal_sync else (
            "eventsourcing.sqlite")
        self._app = Memories(env={"PERSISTENCE_MODULE": module,
                                  "SQLITE_DBNAME": str(directory / "peer.db")})

    def seed(self, count: int, advance: Callable[[int], None]) -> list[Hashable]:
        ids: list[Hashable] = []
        for start in range(0, count, BATCH):
            size = min(BATCH, count - start)
            ids.extend(self._save_new(start, size))
            advance(size)
        return ids

    def add(self, i: int) -> Hashable:
        return self._save_new(i, 1)[0]

    def append(self, i: int) -> None:
        self._save_new(i, 1)  # the peer's full write path is its event log

    def update(self, cube_id: Hashable, i: int) -> None:
        memory: Memory = self._app.repository.get(cube_id)
        memory.update(text=f"{memory_text(i)} (revised)", reason="benchmark")
        self._app.save(memory)

    def append_batch(self, start: int, count: int) -> None:
        self._save_new(start, count)

    def get(self, cube_id: Hashable) -> None:
        self._app.repository.get(cube_id)

    def history(self, cube_id: Hashable) -> None:
        self._app.repository.get(cube_id)

    def rebuild(self, core_only: bool = False) -> int:
        """Read every notification a page at a time, decode it and fold it into a dict of
        aggregates: the peer's in-memory equivalent of a projection (it writes no read model)."""
        recorder, mapper = self._app.recorder, self._app.mapper
        state: dict[uuid.UUID, Memory] = {}
        start, count = 1, 0
        while True:
            page = recorder.select_notifications(start, _NOTIFICATIONS_PAGE)
            for notification in page:
                domain_event = mapper.to_domain_event(notification)
                state[domain_event.originator_id] = domain_event.mutate(
                    state.get(domain_event.originator_id))
            count += len(page)
            if len(page) < _NOTIFICATIONS_PAGE:
                return count
            start = page[-1].id + 1

    def close(self) -> None:
        self._app.close()

    def _save_new(self, start: int, count: int) -> list[uuid.UUID]:
        memories = [
            Memory(tenant=TENANT, owner=memory_owner(i), kind="plaintext", text=memory_text(i),
                   metadata=memory_metadata(i), reason=None)
            for i in range(start, start + count)
        ]
        self._app.save(*memories)
        return [memory.id for memory in memories]
