"""Queries over the read models, used by every surface (SDK, CLI, REST, dashboard)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, select

from eventstore._dialects import Dialect
from eventstore._driver import DriverConnection, select_sql
from projections._readmodels import STATE_COLUMNS, state_from_row, state_from_values
from projections._state import COLD_ARCHIVE, EXPIRED, MemoryState
from projections._tables import audit, cube_labels, cubes, reads, usage

MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Version:
    state: MemoryState
    reason: str | None


@dataclass(frozen=True, slots=True)
class Usage:
    read_count: int
    last_read_at: datetime | None
    last_read_by: str | None
    write_count: int
    last_write_at: datetime | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    position: int
    event_id: str
    type: str
    stream_id: str
    cube_id: str | None
    tenant: str | None
    actor: str
    on_behalf_of: str | None
    reason: str | None
    detail: dict[str, Any]
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class AuditFilter:
    tenant: str | None = None
    actor: str | None = None
    cube_id: str | None = None
    types: Sequence[str] | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class CubeFilter:
    tenant: str | None = None
    owner: str | None = None
    kind: str | None = None
    label: str | None = None
    state: str | None = None
    include_archived: bool = False
    """Expired and cold-archived memories too (by default a listing leaves them out)."""


_SELECT_CUBE = f"{select_sql('cubes', STATE_COLUMNS)} WHERE cube_id = ?"
_VERSION_ROWS = select_sql("versions", (*STATE_COLUMNS, "reason"))
_SELECT_VERSIONS = f"{_VERSION_ROWS} WHERE cube_id = ? ORDER BY version"
_SELECT_VERSION = f"{_VERSION_ROWS} WHERE cube_id = ? AND version = ?"


def _version(row: Sequence[Any], dialect: Dialect) -> Version:
    """A row of ``_SELECT_VERSIONS``: the state's columns, then the reason."""
    return Version(state_from_values(row[:-1], dialect), row[-1])


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")


class ReadModels:
    def __init__(self, engine: Engine):
        self.engine = engine

    # Every get and history reads these, so they go straight to the driver (see
    # eventstore._driver): through Core, building the statement and its result cost more than
    # the lookup.

    def cube(self, cube_id: str) -> MemoryState | None:
        with self.engine.connect() as conn:
            db = DriverConnection(conn)
            row = db.execute(_SELECT_CUBE, (cube_id,)).fetchone()
            return state_from_values(row, db.dialect) if row else None

    def cubes(self, where: CubeFilter, *, after: str | None = None,
              limit: int = 100) -> list[MemoryState]:
        """A page of cubes in id order; pass the last id as ``after`` for the next page."""
        _check_limit(limit)
        query = select(cubes).order_by(cubes.c.cube_id).limit(limit)
        for column, value in (("tenant", where.tenant), ("owner", where.owner),
                              ("kind", where.kind), ("state", where.state)):
            if value is not None:
                query = query.where(cubes.c[column] == value)
        if where.label is not None:
            query = query.where(cubes.c.cube_id.in_(
                select(cube_labels.c.cube_id).where(cube_labels.c.label == where.label)))
        if after is not None:
            query = query.where(cubes.c.cube_id > after)
        if not where.include_archived:
            query = query.where(cubes.c.tier != COLD_ARCHIVE)
            if where.state is None:
                query = query.where(cubes.c.state != EXPIRED)
        with self.engine.connect() as conn:
            return [state_from_row(row) for row in conn.execute(query).mappings()]

    def versions(self, cube_id: str) -> list[Version]:
        with self.engine.connect() as conn:
            db = DriverConnection(conn)
            rows = db.execute(_SELECT_VERSIONS, (cube_id,)).fetchall()
            return [_version(row, db.dialect) for row in rows]

    def version(self, cube_id: str, number: int) -> Version | None:
        with self.engine.connect() as conn:
            db = DriverConnection(conn)
            row = db.execute(_SELECT_VERSION, (cube_id, number)).fetchone()
            return _version(row, db.dialect) if row else None

    def usage(self, cube_id: str) -> Usage:
        with self.engine.connect() as conn:
            row = conn.execute(select(usage).where(usage.c.cube_id == cube_id)).mappings().first()
        if row is None:
            return Usage(0, None, None, 0, None)
        return Usage(row["read_count"], row["last_read_at"], row["last_read_by"],
                     row["write_count"], row["last_write_at"])

    def audit(self, where: AuditFilter, *, after: int = 0, limit: int = 100,
              newest_first: bool = False) -> list[AuditEntry]:
        """A page of the audit trail. Cursor: the last position seen (``after``).

        With ``newest_first`` the page runs backwards from ``after`` (0 = from the end)."""
        _check_limit(limit)
        with self.engine.connect() as conn:
            return audit_page(conn, where, after=after, limit=limit, newest_first=newest_first)


def audit_page(conn: Connection, where: AuditFilter, *, after: int = 0, limit: int = 100,
               newest_first: bool = False) -> list[AuditEntry]:
    """A page of the audit trail matching ``where``: up to ``limit`` entries beyond position
    ``after`` (0: from the start, or with ``newest_first`` from the end), in position order.

    One implementation for every surface (SDK, REST, CLI, dashboard): it walks the index of the
    most selective filter, so a page costs about ``limit`` rows whatever the trail's length:

    - a memory (``cube_id``): its own events (``audit_cube``) merged with the batches that read
      it (``reads_cube``, then those rows by position);
    - else types: one walk of ``audit_type`` per type, merged;
    - else the actor's index, else the tenant's (else the positions).

    One query with an ``OR`` of a memory's events and reads, or one the planner serves from the
    tenant's index (SQLite without statistics does, for any filter that comes with a tenant),
    walks the tenant's whole trail when the filter is rare: seconds at a million events."""
    walks = []
    if where.cube_id is not None:
        walks.append(_filtered(select(audit), where, selective=True))
    elif where.types:
        walks += [_filtered(select(audit), replace(where, types=[kind]), selective=True)
                  for kind in dict.fromkeys(where.types)]
    else:
        walks.append(_filtered(select(audit), where, selective=where.actor is not None))
    rows: dict[int, Any] = {}
    for walk in walks:
        page = _beyond(walk, audit.c.position, after, newest_first).limit(limit)
        for row in conn.execute(page).mappings():
            rows[row["position"]] = row
    if where.cube_id is not None:
        rows.update(_read_by(conn, where, after=after, limit=limit, newest_first=newest_first))
    return [audit_entry(rows[position])
            for position in sorted(rows, reverse=newest_first)[:limit]]


def _read_by(conn: Connection, where: AuditFilter, *, after: int, limit: int,
             newest_first: bool) -> dict[int, Any]:
    """Up to ``limit`` audit rows (by position) of the batches that read ``where.cube_id`` and
    match the rest of ``where``, the first beyond ``after`` in the walk's direction."""
    others = replace(where, cube_id=None)
    rows: dict[int, Any] = {}
    cursor = after
    while len(rows) < limit:
        batches = _beyond(select(reads.c.position).where(reads.c.cube_id == where.cube_id),
                          reads.c.position, cursor, newest_first)
        positions = list(conn.execute(batches.limit(limit)).scalars())
        if positions:
            for row in conn.execute(_filtered(select(audit), others, selective=True).where(
                    audit.c.position.in_(positions))).mappings():
                rows[row["position"]] = row
        if len(positions) < limit:
            break
        cursor = positions[-1]
    return rows


def _beyond(query: Any, position: Any, after: int, newest_first: bool) -> Any:
    """``query`` past the cursor ``after`` on ``position``, ordered in the walk's direction."""
    if newest_first:
        return (query.where(position < after) if after else query).order_by(position.desc())
    return query.where(position > after).order_by(position)


def audit_entry(row: Any) -> AuditEntry:
    """An ``audit`` row (a mapping) as the trail's entry."""
    return AuditEntry(
        position=row["position"], event_id=row["event_id"], type=row["type"],
        stream_id=row["stream_id"], cube_id=row["cube_id"], tenant=row["tenant"],
        actor=row["actor"], on_behalf_of=row["on_behalf_of"], reason=row["reason"],
        detail=json.loads(row["detail"]), recorded_at=row["recorded_at"])


def _unindexed(column: Any) -> Any:
    """``column`` through an expression no index serves (SQLite and PostgreSQL alike), so the
    planner walks the index of a more selective filter of the same query."""
    return column + ""


def _filtered(query: Any, where: AuditFilter, *, selective: bool = False) -> Any:
    """``query`` limited to ``where``; ``selective``: another filter than the tenant is the one
    to walk an index of (a memory, a type, an actor). With a memory, that is the memory's: a
    memory has a few events, a type or an actor may have a million (without statistics SQLite
    may walk the type's index, say every ``MemoryAccessed``, for a memory's reads)."""
    tenant, actor, kind = audit.c.tenant, audit.c.actor, audit.c.type
    if selective:
        tenant = _unindexed(tenant)
        if where.cube_id is not None:
            actor, kind = _unindexed(actor), _unindexed(kind)
    for column, value in ((tenant, where.tenant), (actor, where.actor),
                          (audit.c.cube_id, where.cube_id)):
        if value is not None:
            query = query.where(column == value)
    if where.types:
        query = query.where(kind.in_(list(where.types)))
    if where.since is not None:
        query = query.where(audit.c.recorded_at >= where.since)
    if where.until is not None:
        query = query.where(audit.c.recorded_at < where.until)
    return query
