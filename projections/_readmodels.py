"""The read models: each turns a batch of events into rows, inside the runner's transaction.

A projection sees only events after its own checkpoint and must write nothing else than what
those events imply, so that replaying from position 0 gives the same rows as applying them one
batch at a time (the tests compare digests).
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, delete

from eventstore import StoredEvent, canonical_json
from eventstore._dialects import Dialect
from eventstore._driver import DriverConnection, insert_sql, select_sql, upsert_sql
from projections._archive import (
    drop_erased,
    final_tiers,
    place_version_texts,
    retention_archive,
    texts_as_of,
)
from projections._purge import purge_text
from projections._state import (
    ACTIVE,
    ARTIFACT_EVENT_TYPES,
    COLD_ARCHIVE,
    CUBE_EVENT_TYPES,
    DELETED,
    EXPIRED,
    MEMORY_ACCESSED,
    MEMORY_CONTENT_ERASED,
    MEMORY_CREATED,
    MEMORY_DECAYED,
    MEMORY_DELETED,
    MEMORY_EXPIRED,
    MEMORY_RECALLED,
    MEMORY_RESTORED,
    MEMORY_TIER_CHANGED,
    SENSITIVE_DATA_DETECTED,
    WORKING,
    CorruptStream,
    MemoryState,
    evolve,
)
from projections._tables import audit, cube_labels, cubes, reads, usage, versions

_CONTENT_KEYS = frozenset({"content", "text"})

# Projections run inside every write, so their statements go straight to the driver (see
# eventstore._driver); the rows below name their columns in the order the values are built.
STATE_COLUMNS = (
    "cube_id", "tenant", "owner", "kind", "text", "metadata", "version", "state", "created_at",
    "created_by", "updated_at", "updated_by", "position", "last_event", "changed", "tier",
)
_SELECT_CUBES = f"{select_sql('cubes', STATE_COLUMNS)} WHERE cube_id IN {{keys}}"
_UPSERT_CUBE = upsert_sql("cubes", STATE_COLUMNS, key=("cube_id",))
_DELETE_LABELS = "DELETE FROM cube_labels WHERE cube_id = ?"
_INSERT_LABEL = insert_sql("cube_labels", ("cube_id", "label"))

_SELECT_VERSIONS = f"{select_sql('versions', STATE_COLUMNS)} WHERE (cube_id, version) IN {{keys}}"
_INSERT_VERSION = insert_sql("versions", (*STATE_COLUMNS, "reason"))
_RESTORE_CUBE_TEXT = "UPDATE cubes SET text = ? WHERE cube_id = ?"

# Lifecycle moves (a retention sweep appends one per due memory) carry no content: the new row
# is the previous one with the event's bookkeeping and at most its state, tier or text replaced.
# Both read models write those rows in SQL, from the row already stored, rather than loading,
# decoding and re-encoding every memory (see ``_split_moves``). Each SET below is what
# ``evolve`` does for these events; the digest tests (incremental vs rebuilt) hold them equal.
_MOVE_VALUES = ("version", "updated_at", "updated_by", "position", "last_event", "changed")
_MOVE_EXPRESSIONS = {
    **{name: "?" for name in _MOVE_VALUES},
    "state": "COALESCE(?, state)", "tier": "COALESCE(?, tier)",
    "text": "CASE WHEN ? THEN '' ELSE text END",
}
_CUBE_MOVE_PARAMS = tuple(name for name in STATE_COLUMNS if name in _MOVE_EXPRESSIONS)
_UPDATE_CUBE_MOVE = (
    f"UPDATE cubes SET {', '.join(f'{n} = {_MOVE_EXPRESSIONS[n]}' for n in _CUBE_MOVE_PARAMS)} "
    "WHERE cube_id = ?"
)
_VERSION_MOVE_PARAMS = (*_CUBE_MOVE_PARAMS, "reason")
_INSERT_VERSION_MOVE = (
    f"INSERT INTO versions ({', '.join((*STATE_COLUMNS, 'reason'))}) SELECT "
    f"{', '.join(_MOVE_EXPRESSIONS.get(name, name) for name in STATE_COLUMNS)}, ? "
    "FROM versions WHERE cube_id = ? "
    "AND version = (SELECT MAX(version) FROM versions WHERE cube_id = ?)"
)

_INSERT_AUDIT = insert_sql("audit", (
    "position", "event_id", "type", "stream_id", "cube_id", "tenant", "actor", "on_behalf_of",
    "reason", "detail", "recorded_at",
))

_USAGE_COLUMNS = (
    "cube_id", "tenant", "read_count", "last_read_at", "last_read_by", "write_count",
    "last_write_at",
)
# A batch's counters are added to the stored ones in the upsert itself, sparing a read of the
# old row. Each backend stores timestamps in one sortable form, so ">" compares the times.
_UPSERT_USAGE = upsert_sql("usage", _USAGE_COLUMNS, key=("cube_id",), merged={
    "read_count": "usage.read_count + excluded.read_count",
    "write_count": "usage.write_count + excluded.write_count",
    "last_read_at": "CASE WHEN excluded.last_read_at IS NULL "
                    "OR usage.last_read_at > excluded.last_read_at "
                    "THEN usage.last_read_at ELSE excluded.last_read_at END",
    # The reader of the latest read, whatever order reads arrive in (Kafka consumers on
    # several partitions apply them out of position order).
    "last_read_by": "CASE WHEN excluded.last_read_at IS NULL "
                    "OR usage.last_read_at > excluded.last_read_at "
                    "THEN usage.last_read_by ELSE excluded.last_read_by END",
    "last_write_at": "COALESCE(excluded.last_write_at, usage.last_write_at)",
})
_READ_COLUMNS = ("position", "cube_id", "version", "tenant", "actor", "read_at")
_INSERT_READ = insert_sql("reads", _READ_COLUMNS)


class Projection(ABC):
    """One read model: a name (its checkpoint), its tables, and what a batch of events does to
    them."""

    name: str
    tables: tuple[Table, ...]

    extra_tables: tuple[Table, ...] = ()
    """Tables it also writes but leaves out of its digest (what the retention rules derive from
    its rows, caches): emptied by ``reset`` as the projection sees fit, dropped and re-created
    with ``tables`` by ``recreate``."""

    revision: int = 1
    """The form of its rows: bump it when its tables, their columns or indexes, or the way it
    stores what the events imply change. ``metadata.create_all`` only creates what is missing,
    so without a bump an existing database would keep the old index, column or stored form; a
    database whose read model was built at another revision rebuilds it (``recreate``, then a
    replay of the log) when it opens: see ``ProjectionRunner.create_schema``."""

    @abstractmethod
    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None: ...

    def reset(self, conn: Connection) -> None:
        for table in self.tables:
            conn.execute(delete(table))

    def recreate(self, conn: Connection) -> None:
        """Drop its tables and create them again as this release declares them, then ``reset``
        (which also resets what lives beside the tables). Deleting the rows, as ``reset`` does,
        would keep an index or column of an older release."""
        owned = (*self.tables, *self.extra_tables)
        for table in reversed(owned):
            table.drop(conn, checkfirst=True)
        for table in owned:
            table.create(conn)
        self.reset(conn)


def state_values(state: MemoryState, dialect: Dialect) -> tuple[Any, ...]:
    """``state`` as the driver takes it, in ``STATE_COLUMNS`` order."""
    return (
        state.cube_id, state.tenant, state.owner, state.kind, state.text,
        canonical_json(state.metadata), state.version, state.state,
        dialect.to_db_time(state.created_at), state.created_by,
        dialect.to_db_time(state.updated_at), state.updated_by, state.position,
        state.last_event, _changed_json(state.changed), state.tier,
    )


@functools.lru_cache(maxsize=64)
def _changed_json(changed: tuple[str, ...]) -> str:
    # A handful of distinct values (which fields an event changed), encoded for every version.
    return canonical_json(list(changed))


def state_from_values(values: Sequence[Any], dialect: Dialect) -> MemoryState:
    """A row of ``STATE_COLUMNS`` as the driver returns it."""
    (cube_id, tenant, owner, kind, text, metadata, version, state, created_at, created_by,
     updated_at, updated_by, position, last_event, changed, tier) = values
    return MemoryState(
        cube_id=cube_id, tenant=tenant, owner=owner, kind=kind, text=text,
        metadata=json.loads(metadata), version=version, state=state,
        created_at=dialect.from_db_time(created_at), created_by=created_by,
        updated_at=dialect.from_db_time(updated_at), updated_by=updated_by,
        position=position, last_event=last_event, changed=tuple(json.loads(changed)),
        tier=tier,
    )


def state_from_row(row: Mapping[str, Any]) -> MemoryState:
    """A row of ``cubes`` or ``versions`` read through SQLAlchemy (timestamps already parsed)."""
    return MemoryState(
        cube_id=row["cube_id"],
        tenant=row["tenant"],
        owner=row["owner"],
        kind=row["kind"],
        text=row["text"],
        metadata=json.loads(row["metadata"]),
        version=row["version"],
        state=row["state"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        updated_at=row["updated_at"],
        updated_by=row["updated_by"],
        position=row["position"],
        last_event=row["last_event"],
        changed=tuple(json.loads(row["changed"])),
        tier=row["tier"],
    )


def _needs_prior_state(events: Sequence[StoredEvent]) -> list[str]:
    """Cubes whose first event in this batch is not their creation: their state is in the table."""
    seen: set[str] = set()
    needed: list[str] = []
    for event in events:
        if event.stream_id not in seen:
            seen.add(event.stream_id)
            if event.type != MEMORY_CREATED:
                needed.append(event.stream_id)
    return needed


LIFECYCLE_EVENT_TYPES = frozenset(
    {MEMORY_DELETED, MEMORY_RESTORED, MEMORY_EXPIRED, MEMORY_TIER_CHANGED, MEMORY_RECALLED,
     MEMORY_DECAYED, SENSITIVE_DATA_DETECTED, MEMORY_CONTENT_ERASED} | ARTIFACT_EVENT_TYPES
)
"""Memory events that leave kind, owner and metadata (so labels) as they were."""

# What each lifecycle move sets (state, tier; None: unchanged), whether it blanks the text, and
# ``changed``, as ``evolve`` has them. A tier change takes its tier from the payload.
_MOVES: dict[str, tuple[str | None, str | None, bool, tuple[str, ...]]] = {
    MEMORY_DELETED: (DELETED, None, False, ("state",)),
    MEMORY_RESTORED: (ACTIVE, None, False, ("state",)),
    MEMORY_EXPIRED: (EXPIRED, None, False, ("state",)),
    MEMORY_TIER_CHANGED: (None, None, False, ("tier",)),
    MEMORY_RECALLED: (None, WORKING, False, ("tier",)),
    MEMORY_DECAYED: (None, None, False, ()),
    SENSITIVE_DATA_DETECTED: (None, None, False, ()),
    MEMORY_CONTENT_ERASED: (None, None, True, ()),
    **{artifact: (None, None, False, ()) for artifact in ARTIFACT_EVENT_TYPES},
}


def _split_moves(relevant: Sequence[StoredEvent]) -> tuple[list[StoredEvent], list[StoredEvent]]:
    """(events to fold in Python, lifecycle moves to write in SQL). A memory's events go to SQL
    only when all of them in the batch are moves of a memory already stored: any other event
    (a creation, new content) needs the folded state, so that memory's events are all folded."""
    folded = {e.stream_id for e in relevant if e.type not in LIFECYCLE_EVENT_TYPES}
    if not folded:
        return [], list(relevant)
    return ([e for e in relevant if e.stream_id in folded],
            [e for e in relevant if e.stream_id not in folded])


def _move_params(event: StoredEvent, dialect: Dialect) -> dict[str, Any]:
    """A move's parameters by column (``text``: whether it blanks the text)."""
    state, tier, erase, changed = _MOVES[event.type]
    if event.type == MEMORY_TIER_CHANGED:
        tier = event.payload["to_tier"]
    return {"version": event.stream_version, "updated_at": dialect.to_db_time(event.recorded_at),
            "updated_by": event.actor, "position": event.position, "last_event": event.type,
            "changed": _changed_json(changed), "state": state, "tier": tier, "text": erase,
            "reason": event.payload.get("reason")}


def _cube_move_params(event: StoredEvent, dialect: Dialect) -> dict[str, Any]:
    """``_move_params`` for ``cubes``, whose text is also blanked by a move to the cold tier."""
    params = _move_params(event, dialect)
    params["text"] = params["text"] or params["tier"] == COLD_ARCHIVE
    return params


def _check_moved(db: DriverConnection, expected: int, table: str) -> None:
    """A move of a memory with no stored row writes nothing: say so, as ``evolve`` would."""
    written = db.rowcount
    if written >= 0 and written != expected:
        raise CorruptStream(f"{table}: {expected - written} lifecycle event(s) of a memory with "
                            "no stored state (before its MemoryCreated)")


class CubesProjection(Projection):
    """``cubes``: the current state of every memory, and ``cube_labels`` to filter by label.
    A cold memory's row has no text: a recall takes it back from ``versions`` or the cold
    archive (see ``projections._archive``)."""

    name = "cubes"
    tables = (cube_labels, cubes)
    revision = 2
    """2: a cold memory's row has no text (the cold archive)."""

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        relevant = [e for e in events if e.type in CUBE_EVENT_TYPES]
        if not relevant:
            purge_text(conn, self.name, events)
            return
        db = DriverConnection(conn)
        relevant, moves = _split_moves(relevant)
        if moves:
            db.executemany(_UPDATE_CUBE_MOVE, [
                (*[params[name] for name in _CUBE_MOVE_PARAMS], e.stream_id)
                for e in moves for params in [_cube_move_params(e, db.dialect)]])
            _check_moved(db, len(moves), self.name)
            self._thaw(db, moves)
        prior = {row[0]: state_from_values(row, db.dialect)
                 for row in db.fetch_in_chunks(_SELECT_CUBES, _needs_prior_state(relevant))}
        cold = {c: s.version for c, s in prior.items() if s.tier == COLD_ARCHIVE}
        if cold:  # events to fold onto a cold memory (a recall, then more): its text first
            for cube_id, text in texts_as_of(db, cold).items():
                prior[cube_id] = replace(prior[cube_id], text=text)
        states = dict(prior)
        for event in relevant:
            states[event.stream_id] = evolve(states.get(event.stream_id), event)
        db.executemany(_UPSERT_CUBE, [
            state_values(replace(s, text="") if s.tier == COLD_ARCHIVE else s, db.dialect)
            for s in states.values()])
        # Most writes leave the labels as they were: rewrite them only where they changed.
        relabelled = [s for s in states.values()
                      if s.cube_id not in prior or prior[s.cube_id].labels != s.labels]
        db.executemany(_DELETE_LABELS, [(s.cube_id,) for s in relabelled if s.cube_id in prior])
        db.executemany(_INSERT_LABEL, [(s.cube_id, label)
                                       for s in relabelled for label in dict.fromkeys(s.labels)])
        purge_text(conn, self.name, events)

    @staticmethod
    def _thaw(db: DriverConnection, moves: Sequence[StoredEvent]) -> None:
        """Give the memories these moves recalled (and left out of the cold tier) their text."""
        recalled = {e.stream_id for e in moves if e.type == MEMORY_RECALLED}
        if not recalled:
            return
        tiers = final_tiers(moves)
        last_version = {e.stream_id: e.stream_version for e in moves}
        thawed = {c: last_version[c] for c in recalled if tiers[c] != COLD_ARCHIVE}
        db.executemany(_RESTORE_CUBE_TEXT, [
            (text, cube_id) for cube_id, text in sorted(texts_as_of(db, thawed).items())])


class VersionsProjection(Projection):
    """``versions``: the state after every event of every memory: the version chain. While a
    memory is cold its versions have no text: ``retention_archive`` holds it, compressed, until
    a recall (see ``projections._archive``)."""

    name = "versions"
    tables = (versions, retention_archive)
    revision = 2
    """2: a cold memory's versions have no text; ``retention_archive`` (retention's until then,
    one compressed text) holds the texts of all its content versions."""

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        relevant = [e for e in events if e.type in CUBE_EVENT_TYPES]
        db = DriverConnection(conn)
        if relevant:
            self._append(db, relevant)
        drop_erased(db, purge_text(conn, self.name, events))

    @staticmethod
    def _append(db: DriverConnection, relevant: Sequence[StoredEvent]) -> None:
        folded, moves = _split_moves(relevant)
        if moves:
            # In log order: a memory's second move in the batch copies the row of its first.
            db.executemany(_INSERT_VERSION_MOVE, [
                (*[params[name] for name in _VERSION_MOVE_PARAMS], e.stream_id, e.stream_id)
                for e in moves for params in [_move_params(e, db.dialect)]])
            _check_moved(db, len(moves), "versions")
        first_version: dict[str, int] = {}
        for event in folded:
            first_version.setdefault(event.stream_id, event.stream_version)
        wanted = [(cube_id, first_version[cube_id] - 1) for cube_id in _needs_prior_state(folded)]
        latest = {row[0]: state_from_values(row, db.dialect)
                  for row in db.fetch_in_chunks(_SELECT_VERSIONS, wanted)}
        cold = {c: s.version for c, s in latest.items() if s.tier == COLD_ARCHIVE}
        if cold:  # events to fold onto a cold memory (a recall, then more): its text first
            for cube_id, text in texts_as_of(db, cold).items():
                latest[cube_id] = replace(latest[cube_id], text=text)
        rows = []
        for event in folded:
            state = evolve(latest.get(event.stream_id), event)
            latest[event.stream_id] = state
            rows.append((*state_values(state, db.dialect), event.payload.get("reason")))
        db.executemany(_INSERT_VERSION, rows)
        place_version_texts(db, relevant, cold)


def _cube_of(event: StoredEvent) -> str | None:
    if event.type in CUBE_EVENT_TYPES:
        return event.stream_id
    cube_id = event.payload.get("cube_id")
    return cube_id if isinstance(cube_id, str) else None


def audit_detail(event: StoredEvent) -> dict[str, Any]:
    """What the audit trail shows of a payload: everything but memory content."""
    if event.type == MEMORY_ACCESSED:
        return {"reads": len(event.payload.get("reads", ()))}
    detail = {k: v for k, v in event.payload.items() if k not in _CONTENT_KEYS and k != "reason"}
    if "content" in event.payload:
        detail["metadata"] = event.payload["content"].get("metadata")
    return detail


class AuditProjection(Projection):
    """``audit``: one row per event, never memory content, filterable by who, what and when."""

    name = "audit"
    tables = (audit,)

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        db = DriverConnection(conn)
        db.executemany(_INSERT_AUDIT, [
            (e.position, str(e.event_id), e.type, e.stream_id, _cube_of(e), e.tenant, e.actor,
             e.on_behalf_of, e.payload.get("reason"), canonical_json(audit_detail(e)),
             db.dialect.to_db_time(e.recorded_at))
            for e in events
        ])


class UsageProjection(Projection):
    """``usage`` (MemOS's behavioural indicators: frequency, recency) and ``reads`` (who read
    what)."""

    name = "usage"
    tables = (reads, usage)

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        touched: dict[str, dict[str, Any]] = {}
        read_rows: list[dict[str, Any]] = []

        def counters(cube_id: str, tenant: str) -> dict[str, Any]:
            return touched.setdefault(cube_id, {
                "cube_id": cube_id, "tenant": tenant, "read_count": 0, "last_read_at": None,
                "last_read_by": None, "write_count": 0, "last_write_at": None,
            })

        for event in events:
            if event.type in CUBE_EVENT_TYPES:
                row = counters(event.stream_id, event.tenant or "")
                row["write_count"] += 1
                row["last_write_at"] = event.recorded_at
            elif event.type == MEMORY_ACCESSED:
                last_read_of: dict[str, dict[str, Any]] = {}
                for read in event.payload["reads"]:
                    row = counters(read["cube_id"], event.tenant or "")
                    read_at = datetime.fromisoformat(read["at"])
                    row["read_count"] += 1
                    row["last_read_at"] = _latest(row["last_read_at"], read_at)
                    row["last_read_by"] = event.actor
                    last_read_of[read["cube_id"]] = {
                        "position": event.position, "cube_id": read["cube_id"],
                        "version": read["version"], "tenant": event.tenant or "",
                        "actor": event.actor, "read_at": read_at,
                    }
                read_rows.extend(last_read_of.values())
        db = DriverConnection(conn)
        # In key order: a read counts in the rows of memories on several Kafka partitions, so
        # consumers on other partitions update these rows too (see InsightsProjection.apply).
        db.executemany(_UPSERT_USAGE, [_driver_row(touched[cube_id], _USAGE_COLUMNS, db.dialect)
                                       for cube_id in sorted(touched)])
        db.executemany(_INSERT_READ, [_driver_row(row, _READ_COLUMNS, db.dialect)
                                      for row in read_rows])


def _driver_row(row: Mapping[str, Any], columns: Sequence[str],
                dialect: Dialect) -> tuple[Any, ...]:
    """``row``'s values for ``columns``, timestamps as the driver takes them."""
    # A list comprehension, not nested generators: a rebuild builds a row per memory.
    to_db_time = dialect.to_db_time
    return tuple([to_db_time(value) if isinstance(value, datetime) else value
                  for value in [row[name] for name in columns]])


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return max(a, b)


def default_projections() -> list[Projection]:
    from projections._insights import InsightsProjection
    from projections._keys import ApiKeysProjection  # here: that module subclasses Projection
    from projections._lineage import LineageProjection
    from projections._retention import RetentionProjection
    from projections._search import SearchProjection
    from projections._sensitive import SensitiveContentProjection

    return [CubesProjection(), VersionsProjection(), AuditProjection(), UsageProjection(),
            ApiKeysProjection(), RetentionProjection(), SearchProjection(),
            SensitiveContentProjection(), LineageProjection(), InsightsProjection()]
