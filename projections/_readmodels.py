"""The read models: each turns a batch of events into rows, inside the runner's transaction.

A projection sees only events after its own checkpoint and must write nothing else than what
those events imply, so that replaying from position 0 gives the same rows as applying them one
batch at a time (the tests compare digests).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, delete

from eventstore import StoredEvent, canonical_json
from eventstore._dialects import Dialect
from eventstore._driver import DriverConnection, insert_sql, select_sql, upsert_sql
from projections._state import (
    CUBE_EVENT_TYPES,
    MEMORY_ACCESSED,
    MEMORY_CREATED,
    MemoryState,
    evolve,
)
from projections._tables import audit, cube_labels, cubes, reads, usage, versions

_CONTENT_KEYS = frozenset({"content", "text"})

# Projections run inside every write, so their statements go straight to the driver (see
# eventstore._driver); the rows below name their columns in the order the values are built.
_STATE_COLUMNS = (
    "cube_id", "tenant", "owner", "kind", "text", "metadata", "version", "state", "created_at",
    "created_by", "updated_at", "updated_by", "position", "last_event", "changed",
)
_SELECT_CUBES = f"{select_sql('cubes', _STATE_COLUMNS)} WHERE cube_id IN {{keys}}"
_UPSERT_CUBE = upsert_sql("cubes", _STATE_COLUMNS, key=("cube_id",))
_DELETE_LABELS = "DELETE FROM cube_labels WHERE cube_id = ?"
_INSERT_LABEL = insert_sql("cube_labels", ("cube_id", "label"))

_SELECT_VERSIONS = f"{select_sql('versions', _STATE_COLUMNS)} WHERE (cube_id, version) IN {{keys}}"
_INSERT_VERSION = insert_sql("versions", (*_STATE_COLUMNS, "reason"))

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
    "last_read_by": "COALESCE(excluded.last_read_by, usage.last_read_by)",
    "last_write_at": "COALESCE(excluded.last_write_at, usage.last_write_at)",
})
_READ_COLUMNS = ("position", "cube_id", "version", "tenant", "actor", "read_at")
_INSERT_READ = insert_sql("reads", _READ_COLUMNS)


class Projection(ABC):
    """One read model: a name (its checkpoint), its tables, and what a batch of events does to
    them."""

    name: str
    tables: tuple[Table, ...]

    @abstractmethod
    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None: ...

    def reset(self, conn: Connection) -> None:
        for table in self.tables:
            conn.execute(delete(table))


def state_values(state: MemoryState, dialect: Dialect) -> tuple[Any, ...]:
    """``state`` as the driver takes it, in ``_STATE_COLUMNS`` order."""
    return (
        state.cube_id, state.tenant, state.owner, state.kind, state.text,
        canonical_json(state.metadata), state.version, state.state,
        dialect.to_db_time(state.created_at), state.created_by,
        dialect.to_db_time(state.updated_at), state.updated_by, state.position,
        state.last_event, canonical_json(list(state.changed)),
    )


def state_from_values(values: Sequence[Any], dialect: Dialect) -> MemoryState:
    """A row of ``_STATE_COLUMNS`` as the driver returns it."""
    (cube_id, tenant, owner, kind, text, metadata, version, state, created_at, created_by,
     updated_at, updated_by, position, last_event, changed) = values
    return MemoryState(
        cube_id=cube_id, tenant=tenant, owner=owner, kind=kind, text=text,
        metadata=json.loads(metadata), version=version, state=state,
        created_at=dialect.from_db_time(created_at), created_by=created_by,
        updated_at=dialect.from_db_time(updated_at), updated_by=updated_by,
        position=position, last_event=last_event, changed=tuple(json.loads(changed)),
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


class CubesProjection(Projection):
    """``cubes``: the current state of every memory, and ``cube_labels`` to filter by label."""

    name = "cubes"
    tables = (cube_labels, cubes)

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        relevant = [e for e in events if e.type in CUBE_EVENT_TYPES]
        if not relevant:
            return
        db = DriverConnection(conn)
        prior = {row[0]: state_from_values(row, db.dialect)
                 for row in db.fetch_in_chunks(_SELECT_CUBES, _needs_prior_state(relevant))}
        states = dict(prior)
        for event in relevant:
            states[event.stream_id] = evolve(states.get(event.stream_id), event)
        db.executemany(_UPSERT_CUBE, [state_values(s, db.dialect) for s in states.values()])
        # Most writes leave the labels as they were: rewrite them only where they changed.
        relabelled = [s for s in states.values()
                      if s.cube_id not in prior or prior[s.cube_id].labels != s.labels]
        db.executemany(_DELETE_LABELS, [(s.cube_id,) for s in relabelled if s.cube_id in prior])
        db.executemany(_INSERT_LABEL, [(s.cube_id, label)
                                       for s in relabelled for label in dict.fromkeys(s.labels)])


class VersionsProjection(Projection):
    """``versions``: the state after every event of every memory: the version chain."""

    name = "versions"
    tables = (versions,)

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        relevant = [e for e in events if e.type in CUBE_EVENT_TYPES]
        if not relevant:
            return
        db = DriverConnection(conn)
        first_version: dict[str, int] = {}
        for event in relevant:
            first_version.setdefault(event.stream_id, event.stream_version)
        wanted = [(cube_id, first_version[cube_id] - 1) for cube_id in _needs_prior_state(relevant)]
        latest = {row[0]: state_from_values(row, db.dialect)
                  for row in db.fetch_in_chunks(_SELECT_VERSIONS, wanted)}
        rows = []
        for event in relevant:
            state = evolve(latest.get(event.stream_id), event)
            latest[event.stream_id] = state
            rows.append((*state_values(state, db.dialect), event.payload.get("reason")))
        db.executemany(_INSERT_VERSION, rows)


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
        db.executemany(_UPSERT_USAGE, [_driver_row(row, _USAGE_COLUMNS, db.dialect)
                                       for row in touched.values()])
        db.executemany(_INSERT_READ, [_driver_row(row, _READ_COLUMNS, db.dialect)
                                      for row in read_rows])


def _driver_row(row: Mapping[str, Any], columns: Sequence[str],
                dialect: Dialect) -> tuple[Any, ...]:
    """``row``'s values for ``columns``, timestamps as the driver takes them."""
    return tuple(dialect.to_db_time(value) if isinstance(value, datetime) else value
                 for value in (row[name] for name in columns))


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return max(a, b)


def default_projections() -> list[Projection]:
    from projections._keys import ApiKeysProjection  # here: that module subclasses Projection

    return [CubesProjection(), VersionsProjection(), AuditProjection(), UsageProjection(),
            ApiKeysProjection()]
