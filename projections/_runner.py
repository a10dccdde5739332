"""The projector: feeds new events to the read models, checkpointing in the same transaction.

Each projection's checkpoint (the last position it applied) is updated in the transaction that
writes its rows, so a crash at any point leaves rows and checkpoint in agreement: the next run
resumes exactly after the last committed batch, applying nothing twice and skipping nothing.
Runners in several threads or processes serialize on the checkpoint rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from sqlalchemy import Connection, insert, select

from eventstore import EventStore, StoredEvent, canonical_json
from eventstore._driver import DriverConnection, in_list
from projections._readmodels import Projection, default_projections
from projections._tables import checkpoints, metadata

ProgressCallback = Callable[[int, int], None]
"""Called with (position reached, head position) after each batch."""


class ProjectionRunner:
    def __init__(self, store: EventStore, projections: Sequence[Projection] | None = None):
        self.store = store
        self.projections = list(projections if projections is not None else default_projections())
        names = [p.name for p in self.projections]
        if len(set(names)) != len(names):
            raise ValueError(f"projection names must be unique: {names}")

    def create_schema(self) -> None:
        with self.store.write_connection() as conn, conn.begin():
            metadata.create_all(conn)
            known = set(conn.execute(select(checkpoints.c.name)).scalars())
            missing = [{"name": p.name, "position": 0} for p in self.projections
                       if p.name not in known]
            if missing:
                conn.execute(insert(checkpoints), missing)

    def checkpoints(self) -> dict[str, int]:
        with self.store.engine.connect() as conn:
            return _read_checkpoints(conn)

    def catch_up(self, *, batch_size: int = 2000,
                 on_progress: ProgressCallback | None = None) -> int:
        """Apply every event not yet projected, one committed batch at a time; return the count."""
        applied = 0
        while True:
            with self.store.write_connection() as conn, conn.begin():
                count = self._apply_batch(conn, batch_size)
            applied += count
            if on_progress is not None and count:
                on_progress(min(self.checkpoints().values()), self.store.head_position())
            if count < batch_size:
                return applied

    def project_new_events(self, conn: Connection, new_events: Sequence[StoredEvent]) -> None:
        """Inside the transaction that appended ``new_events``: project them if every read model
        is caught up to just before them; otherwise leave them to ``catch_up``."""
        if not new_events:
            return
        positions = _read_checkpoints(conn, for_update=conn.dialect.name == "postgresql")
        if any(positions.get(p.name) != new_events[0].position - 1 for p in self.projections):
            return
        for projection in self.projections:
            projection.apply(conn, new_events)
        _move_checkpoints(conn, [p.name for p in self.projections], new_events[-1].position)

    def rebuild(self, names: Sequence[str] | None = None, *, batch_size: int = 5000,
                on_progress: ProgressCallback | None = None) -> int:
        """Drop the named read models (default: all) and replay the whole log into them.

        One transaction: readers keep seeing the old rows until the rebuilt ones commit, and a
        crash leaves the old rows in place.
        """
        chosen = [p for p in self.projections if names is None or p.name in names]
        unknown = set(names or ()) - {p.name for p in chosen}
        if unknown:
            raise ValueError(f"unknown projections: {sorted(unknown)}")
        applied = 0
        with self.store.write_connection() as conn, conn.begin():
            head = self.store.head_position(conn)
            for projection in chosen:
                projection.reset(conn)
            _move_checkpoints(conn, [p.name for p in chosen], 0)
            while True:
                count = self._apply_batch(conn, batch_size, only=chosen)
                applied += count
                if on_progress is not None:
                    on_progress(min(_read_checkpoints(conn)[p.name] for p in chosen), head)
                if count < batch_size:
                    return applied

    def _apply_batch(self, conn: Connection, batch_size: int,
                     only: Sequence[Projection] | None = None) -> int:
        projections = only if only is not None else self.projections
        positions = self._locked_checkpoints(conn)
        low = min(positions[p.name] for p in projections)
        batch = self.store.read_all(low, limit=batch_size, connection=conn)
        if not batch:
            return 0
        # The batch starts after the checkpoint furthest behind (e.g. a read model added to an
        # existing database). One already past the batch keeps its checkpoint: moving it back
        # would make the next batch apply those events again.
        last = batch[-1].position
        behind = [p for p in projections if positions[p.name] < last]
        for projection in behind:
            mark = positions[projection.name]
            projection.apply(conn, [e for e in batch if e.position > mark])
        _move_checkpoints(conn, [p.name for p in behind], last)
        return len(batch)

    def _locked_checkpoints(self, conn: Connection) -> dict[str, int]:
        found = _read_checkpoints(conn, for_update=conn.dialect.name == "postgresql")
        missing = [p.name for p in self.projections if p.name not in found]
        if missing:
            raise RuntimeError(f"projections {missing} have no checkpoint: call create_schema()")
        return found

    def digest(self) -> str:
        """sha256 over every row of every read model, in key order: equal digests, equal state."""
        digest = hashlib.sha256()
        with self.store.engine.connect() as conn:
            for projection in self.projections:
                for table in projection.tables:
                    order = list(table.primary_key.columns)
                    digest.update(table.name.encode())
                    for row in conn.execute(select(table).order_by(*order)).mappings():
                        digest.update(canonical_json(
                            {k: v.isoformat() if hasattr(v, "isoformat") else v
                             for k, v in row.items()}
                        ).encode())
        return digest.hexdigest()


_SELECT_CHECKPOINTS = "SELECT name, position FROM projection_checkpoints"
_MOVE_CHECKPOINTS = "UPDATE projection_checkpoints SET position = ? WHERE name IN {names}"


def _read_checkpoints(conn: Connection, *, for_update: bool = False) -> dict[str, int]:
    # Run on every write, so straight on the driver (see eventstore._driver).
    sql = f"{_SELECT_CHECKPOINTS} FOR UPDATE" if for_update else _SELECT_CHECKPOINTS
    return dict(DriverConnection(conn).execute(sql).fetchall())


def _move_checkpoints(conn: Connection, names: Sequence[str], position: int) -> None:
    DriverConnection(conn).execute(_MOVE_CHECKPOINTS.format(names=in_list(len(names))),
                                   [position, *names])
