"""The projector: feeds new events to the read models, checkpointing in the same transaction.

Each projection's checkpoint (the last position it applied) is updated in the transaction that
writes its rows, so a crash at any point leaves rows and checkpoint in agreement: the next run
resumes exactly after the last committed batch, applying nothing twice and skipping nothing.
Runners in several threads or processes serialize on the checkpoint rows.

**Upgrades.** Each read model declares the ``revision`` of its form (``Projection.revision``) and
``projection_revisions`` records the one each was built at. Opening a database
(``create_schema``) rebuilds, from the log, every read model built at another revision: its
tables dropped and re-created (a changed index or column reaches the database; rows in an older
stored form go), in one transaction with the revision recorded, so a reader sees the old read
model or the rebuilt one, never half of it, and processes opening the database together wait
for one rebuild rather than racing (the schema-setup lock, as ``EventStore.create_schema``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from sqlalchemy import Connection, insert, select

from eventstore import EventStore, StoredEvent, canonical_json
from eventstore._driver import DriverConnection, in_list, upsert_sql
from eventstore._gc import collection_paused
from projections._readmodels import Projection, default_projections
from projections._tables import checkpoints, metadata

logger = logging.getLogger("memwarden.projections")

ProgressCallback = Callable[[int, int], None]
"""Called with (position reached, head position) after each batch."""


class ProjectionRunner:
    def __init__(self, store: EventStore, projections: Sequence[Projection] | None = None):
        self.store = store
        self.projections = list(projections if projections is not None else default_projections())
        names = [p.name for p in self.projections]
        if len(set(names)) != len(names):
            raise ValueError(f"projection names must be unique: {names}")

    def refuse_while_building(self, read_models: Collection[str] | None = None) -> None:
        """Nothing to refuse: here a rebuild replaces the read models in one transaction, so
        readers see them whole, before or after (``KafkaFedRunner`` refuses while its consumers
        build theirs)."""

    def create_schema(self) -> None:
        """Create what is missing, and rebuild the read models built at another revision than
        this release's (see the module docstring). At the current revisions, a few small reads.
        """
        with self.store.schema_setup() as conn:
            # Processes starting together (API, projectors, workers) would race to create the
            # same tables: serialized, as EventStore.create_schema is. Held until the upgrade
            # below commits: whoever comes next waits, then finds the read models rebuilt.
            metadata.create_all(conn)
            known = set(conn.execute(select(checkpoints.c.name)).scalars())
            missing = [{"name": p.name, "position": 0} for p in self.projections
                       if p.name not in known]
            if missing:
                conn.execute(insert(checkpoints), missing)
            outdated = outdated_revisions(conn, self.projections, built=known)
            if outdated:
                self._upgrade(conn, outdated)

    def _upgrade(self, conn: Connection, outdated: Mapping[str, int]) -> None:
        """Rebuild the read models ``outdated`` names (with the revision each was built at), in
        ``conn``'s transaction, and record this release's revisions of them.

        All in one replay: a read model that reads another's rows (``READS`` in
        ``_kafka_projector``: ``cubes`` reads ``versions``) then reads them exactly as in
        incremental projection, each batch applied in the runner's order; one rebuilt alone
        reads the other's rows at the head, which those rows allow (see ``_archive``)."""
        chosen = [p for p in self.projections if p.name in outdated]
        for projection in chosen:
            logger.warning("read model %s was built at revision %d and this release builds "
                           "revision %d: rebuilding it from the log", projection.name,
                           outdated[projection.name], projection.revision)
        applied = self._rebuild_in(conn, chosen, recreate=True)
        record_revisions(conn, chosen)
        logger.warning("rebuilt read model(s) %s from %d events",
                       ", ".join(p.name for p in chosen), applied)

    def checkpoints(self) -> dict[str, int]:
        with self.store.engine.connect() as conn:
            return _read_checkpoints(conn)

    def catch_up(self, *, batch_size: int = 2000,
                 on_progress: ProgressCallback | None = None) -> int:
        """Apply every event not yet projected, one committed batch at a time; return the count."""
        applied = 0
        while True:
            with collection_paused(), self.store.write_connection() as conn, conn.begin():
                count = self._apply_batch(conn, batch_size)
            applied += count
            if on_progress is not None and count:
                on_progress(min(self.checkpoints().values()), self.store.head_position())
            if count < batch_size:
                return applied

    def catch_up_if_behind(self) -> int:
        """``catch_up`` if a read model lags the log; return the events applied.

        Run when a database opens: a read model an upgrade adds starts at checkpoint 0, and
        ``project_new_events`` projects a write in its own transaction only while every read
        model is caught up, so without this no write would be readable before the next
        catch-up. Costs two small reads when nothing lags.
        """
        head = self.store.head_position()
        positions = self.checkpoints()
        if all(positions[p.name] >= head for p in self.projections):
            return 0
        return self.catch_up()

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
        crash leaves the old rows in place. The planner's statistics of the rebuilt tables are
        gathered in it too (PostgreSQL), so the new rows are never queried without them.
        """
        chosen = [p for p in self.projections if names is None or p.name in names]
        unknown = set(names or ()) - {p.name for p in chosen}
        if unknown:
            raise ValueError(f"unknown projections: {sorted(unknown)}")
        with self.store.write_connection() as conn, conn.begin():
            return self._rebuild_in(conn, chosen, batch_size=batch_size,
                                    on_progress=on_progress)

    @collection_paused()  # the whole log replayed: see eventstore._gc
    def _rebuild_in(self, conn: Connection, chosen: Sequence[Projection], *,
                    recreate: bool = False, batch_size: int = 5000,
                    on_progress: ProgressCallback | None = None) -> int:
        """``rebuild``'s work in ``conn``'s transaction; ``recreate``: drop and create the tables
        (``Projection.recreate``) rather than delete their rows."""
        # The checkpoints first: a write projecting its own events locks them before the read
        # models' tables, so it finishes before the tables are dropped, or waits for the rebuild.
        self._locked_checkpoints(conn)
        head = self.store.head_position(conn)
        for projection in chosen:
            if recreate:
                projection.recreate(conn)
            else:
                projection.reset(conn)
        _move_checkpoints(conn, [p.name for p in chosen], 0)
        applied = 0
        while True:
            count = self._apply_batch(conn, batch_size, only=chosen)
            applied += count
            if on_progress is not None:
                on_progress(min(_read_checkpoints(conn)[p.name] for p in chosen), head)
            if count < batch_size:
                break
        self.store.dialect.gather_statistics(
            conn, [table.name for p in chosen for table in p.tables])
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
                            {k: v.isoformat() if hasattr(v, "isoformat")
                             else bytes(v).hex() if isinstance(v, bytes | memoryview) else v
                             for k, v in row.items()}
                        ).encode())
        return digest.hexdigest()


_SELECT_REVISIONS = "SELECT name, revision FROM projection_revisions"
_RECORD_REVISION = upsert_sql("projection_revisions", ("name", "revision"), key=("name",))


def recorded_revisions(conn: Connection) -> dict[str, int]:
    """The revision each read model was built at, of those with one recorded."""
    return dict(DriverConnection(conn).execute(_SELECT_REVISIONS).fetchall())


def record_revisions(conn: Connection, built: Iterable[Projection]) -> None:
    """Record that ``built`` hold this release's form (their ``revision``)."""
    DriverConnection(conn).executemany(_RECORD_REVISION, [(p.name, p.revision) for p in built])


def outdated_revisions(conn: Connection, projections: Sequence[Projection],
                       built: Collection[str]) -> dict[str, int]:
    """The read models of ``projections`` built at another revision than this release's, with
    the one each was built at. ``built``: those already built here (they have a checkpoint); one
    with no recorded revision was built at revision 1, one not built yet is created at this
    release's. Records the revision of those that have none and are current."""
    recorded = recorded_revisions(conn)
    outdated: dict[str, int] = {}
    unrecorded: list[Projection] = []
    for projection in projections:
        revision = recorded.get(projection.name, 1 if projection.name in built
                                else projection.revision)
        if revision != projection.revision:
            outdated[projection.name] = revision
        elif projection.name not in recorded:
            unrecorded.append(projection)
    if unrecorded:
        record_revisions(conn, unrecorded)
    return outdated


_SELECT_CHECKPOINTS = "SELECT name, position FROM projection_checkpoints"
_MOVE_CHECKPOINTS = "UPDATE projection_checkpoints SET position = ? WHERE name IN {names}"


def _read_checkpoints(conn: Connection, *, for_update: bool = False) -> dict[str, int]:
    # Run on every write, so straight on the driver (see eventstore._driver).
    sql = f"{_SELECT_CHECKPOINTS} FOR UPDATE" if for_update else _SELECT_CHECKPOINTS
    return dict(DriverConnection(conn).execute(sql).fetchall())


def _move_checkpoints(conn: Connection, names: Sequence[str], position: int) -> None:
    DriverConnection(conn).execute(_MOVE_CHECKPOINTS.format(names=in_list(len(names))),
                                   [position, *names])
