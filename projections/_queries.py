"""Queries over the read models, used by every surface (SDK, CLI, REST, dashboard)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, or_, select

from projections._readmodels import state_from_row
from projections._state import MemoryState
from projections._tables import audit, cube_labels, cubes, reads, usage, versions

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


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")


class ReadModels:
    def __init__(self, engine: Engine):
        self.engine = engine

    def cube(self, cube_id: str) -> MemoryState | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(cubes).where(cubes.c.cube_id == cube_id)).mappings().first()
        return state_from_row(row) if row else None

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
        with self.engine.connect() as conn:
            return [state_from_row(row) for row in conn.execute(query).mappings()]

    def versions(self, cube_id: str) -> list[Version]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(versions).where(versions.c.cube_id == cube_id)
                                .order_by(versions.c.version)).mappings().all()
        return [Version(state_from_row(row), row["reason"]) for row in rows]

    def version(self, cube_id: str, number: int) -> Version | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(versions).where(
                versions.c.cube_id == cube_id, versions.c.version == number)).mappings().first()
        return Version(state_from_row(row), row["reason"]) if row else None

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

        With ``newest_first`` the page runs backwards from ``after`` (0 = from the end).
        """
        _check_limit(limit)
        query = select(audit).limit(limit)
        if newest_first:
            query = query.order_by(audit.c.position.desc())
            if after:
                query = query.where(audit.c.position < after)
        else:
            query = query.order_by(audit.c.position).where(audit.c.position > after)
        if where.tenant is not None:
            query = query.where(audit.c.tenant == where.tenant)
        if where.actor is not None:
            query = query.where(audit.c.actor == where.actor)
        if where.cube_id is not None:
            read_positions = select(reads.c.position).where(reads.c.cube_id == where.cube_id)
            query = query.where(or_(audit.c.cube_id == where.cube_id,
                                    audit.c.position.in_(read_positions)))
        if where.types:
            query = query.where(audit.c.type.in_(list(where.types)))
        if where.since is not None:
            query = query.where(audit.c.recorded_at >= where.since)
        if where.until is not None:
            query = query.where(audit.c.recorded_at < where.until)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            AuditEntry(
                position=row["position"], event_id=row["event_id"], type=row["type"],
                stream_id=row["stream_id"], cube_id=row["cube_id"], tenant=row["tenant"],
                actor=row["actor"], on_behalf_of=row["on_behalf_of"], reason=row["reason"],
                detail=json.loads(row["detail"]), recorded_at=row["recorded_at"],
            )
            for row in rows
        ]
