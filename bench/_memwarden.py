"""MemWarden as a benchmark subject: the SDK for single commands, the event store for batches.

Personal-data scanning (Presidio, ~20 ms per text) is off here, as with ``MEMWARDEN_PII_SCAN=0``:
these figures are about the log and the read models; ``bench_pii`` measures the scanner. Memory
text is still sealed (AES-GCM under per-memory keys) on every write, as MemWarden always does.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path

from bench._workload import BATCH, TENANT, memory_metadata, memory_owner, memory_text
from eventstore import EventContext, StreamAppend
from eventstore._gc import collection_paused
from governance import Limits, MemCube, MemWarden, Settings
from governance._memcube import new_memory_id

CORE_READ_MODELS = ("cubes", "versions", "audit", "usage")
"""The read models of the event-sourced core; later features add their own (search, retention,
sensitive data, lineage...), which a full rebuild replays too."""


class MemWardenSubject:
    name = "MemWarden"

    def __init__(self, directory: Path) -> None:
        url = f"sqlite:///{directory / 'memwarden.db'}"
        settings = Settings(db_url=url, data_dir=str(directory), pii_scan=False)
        self._mw = MemWarden.open(url, actor="agent:bench", settings=settings)
        self._context = EventContext(actor="agent:bench", tenant=TENANT)

    def seed(self, count: int, advance: Callable[[int], None]) -> list[Hashable]:
        # Batches projected in their own transaction, as the embedded mode projects a command.
        ids: list[Hashable] = []
        for start in range(0, count, BATCH):
            size = min(BATCH, count - start)
            ids.extend(self._append(start, size, project=True))
            advance(size)
        return ids

    def add(self, i: int) -> Hashable:
        return self._mw.add(memory_text(i), tenant=TENANT, owner=memory_owner(i),
                            metadata=memory_metadata(i)).cube_id

    def append(self, i: int) -> None:
        self._append(i, 1, project=False)

    def update(self, cube_id: Hashable, i: int) -> None:
        self._mw.update(str(cube_id), text=f"{memory_text(i)} (revised)", reason="benchmark")

    def append_batch(self, start: int, count: int) -> None:
        self._append(start, count, project=False)

    def get(self, cube_id: Hashable) -> None:
        self._mw.get(str(cube_id))

    def history(self, cube_id: Hashable) -> None:
        self._mw.history(str(cube_id))

    def rebuild(self, core_only: bool = False) -> int:
        return self._mw.rebuild_projections(CORE_READ_MODELS if core_only else None)

    def close(self) -> None:
        self._mw.close()

    @collection_paused()  # as MemWarden.add_many runs: see eventstore._gc
    def _append(self, start: int, count: int, *, project: bool) -> list[str]:
        """One transaction creating ``count`` memories, each its own stream (and MemCube)."""
        limits = Limits()
        appends = [
            StreamAppend(
                new_memory_id(),  # as MemWarden.add names a memory
                MemCube.create(owner=memory_owner(i), kind="plaintext", text=memory_text(i),
                               metadata=memory_metadata(i), reason=None, limits=limits),
                0,
                self._context,
            )
            for i in range(start, start + count)
        ]
        then = self._mw.projector.project_new_events if project else None
        self._mw.store.append_many(appends, then=then)
        return [a.stream_id for a in appends]
