"""``sensitive_content``: what was found in each version of each memory's text, and erasures.

One row per content version (the versions that set text: created, updated, rolled back), whose
``findings`` the ``SensitiveDataDetected`` event of that write fills in (entity types, offsets,
scores: never the values). A reader's masking looks up the row of the latest content version at or
before the version it shows. ``erasures`` lists ``SubjectErased`` and ``MemoryContentErased``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    select,
)

from eventstore import StoredEvent, UTCDateTime, canonical_json
from eventstore._dialects import dialect_named
from eventstore._driver import DriverConnection, insert_sql, upsert_sql
from projections._readmodels import Projection
from projections._state import (
    MEMORY_CONTENT_ERASED,
    MEMORY_CREATED,
    MEMORY_ROLLED_BACK,
    MEMORY_UPDATED,
    SENSITIVE_DATA_DETECTED,
    SUBJECT_ERASED,
)
from projections._tables import _position, metadata

CONTENT_EVENT_TYPES = frozenset({MEMORY_CREATED, MEMORY_UPDATED, MEMORY_ROLLED_BACK})

sensitive_content = Table(
    "sensitive_content",
    metadata,
    Column("cube_id", String(200), nullable=False),
    Column("version", Integer, nullable=False),
    Column("tenant", String(200), nullable=False),
    Column("findings", Text, nullable=False),
    Column("entity_types", Text, nullable=False),
    Column("analyzer", Text),
    Column("detected_position", BigInteger),
    Column("detected_at", UTCDateTime),
    PrimaryKeyConstraint("cube_id", "version"),
    Index("sensitive_content_detected", "tenant", "detected_position"),
)

erasures = Table(
    "erasures",
    metadata,
    _position(),
    Column("type", String(100), nullable=False),
    Column("tenant", String(200), nullable=False),
    Column("subject", String(200)),
    Column("cube_id", String(200)),
    Column("actor", String(200), nullable=False),
    Column("reason", Text),
    Column("rule", String(200)),
    Column("detail", Text, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("position"),
    Index("erasures_tenant", "tenant", "position"),
)

_INSERT_CONTENT = upsert_sql("sensitive_content", (
    "cube_id", "version", "tenant", "findings", "entity_types"), key=("cube_id", "version"))
_DETECTED = ("UPDATE sensitive_content SET findings = ?, entity_types = ?, analyzer = ?, "
             "detected_position = ?, detected_at = ? WHERE cube_id = ? AND version = ?")
_SELECT_CONTENT_FINDINGS = ("SELECT cube_id, version, findings FROM sensitive_content "
                            "WHERE cube_id IN {keys}")
_INSERT_ERASURE = insert_sql("erasures", (
    "position", "type", "tenant", "subject", "cube_id", "actor", "reason", "rule", "detail",
    "recorded_at"))


class SensitiveContentProjection(Projection):
    name = "sensitive_content"
    tables = (sensitive_content, erasures)

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        # Each event's statement, in log order; consecutive ones of the same kind (a batch of
        # creations: one content row each) go to the database in one executemany.
        statements: list[tuple[str, list[Any]]] = []
        to_db_time = dialect_named(conn.dialect.name).to_db_time
        for event in events:
            if event.type not in _HANDLED:
                continue
            if event.type in CONTENT_EVENT_TYPES:
                statements.append((_INSERT_CONTENT, [event.stream_id, event.stream_version,
                                                     event.tenant or "", "[]", "[]"]))
            elif event.type == SENSITIVE_DATA_DETECTED:
                payload = event.payload
                statements.append((_DETECTED, [
                    canonical_json(payload["findings"]), canonical_json(payload["entity_types"]),
                    payload.get("analyzer"), event.position, to_db_time(event.recorded_at),
                    event.stream_id, payload["version"]]))
            else:
                payload = event.payload
                detail = {k: v for k, v in payload.items()
                          if k not in ("reason", "rule", "subject", "tenant")}
                statements.append((_INSERT_ERASURE, [
                    event.position, event.type, payload.get("tenant") or event.tenant or "",
                    payload.get("subject"),
                    event.stream_id if event.type == MEMORY_CONTENT_ERASED else None,
                    event.actor, payload.get("reason"), payload.get("rule"),
                    canonical_json(detail), to_db_time(event.recorded_at)]))
        if not statements:
            return
        db = DriverConnection(conn)
        for sql, run in itertools.groupby(statements, key=lambda statement: statement[0]):
            db.executemany(sql, [params for _, params in run])


_HANDLED = CONTENT_EVENT_TYPES | {SENSITIVE_DATA_DETECTED, MEMORY_CONTENT_ERASED, SUBJECT_ERASED}


@dataclass(frozen=True, slots=True)
class FindingRecord:
    """One write's findings (no values): what ``SensitiveDataDetected`` recorded."""

    cube_id: str
    version: int
    tenant: str
    entity_types: tuple[str, ...]
    findings: tuple[Mapping[str, Any], ...]
    analyzer: str | None
    position: int
    detected_at: datetime


@dataclass(frozen=True, slots=True)
class ErasureRecord:
    position: int
    type: str
    tenant: str
    subject: str | None
    cube_id: str | None
    actor: str
    reason: str | None
    rule: str | None
    detail: Mapping[str, Any]
    recorded_at: datetime


class SensitiveQueries:
    def __init__(self, engine: Engine):
        self.engine = engine

    def findings_for(self, wanted: Sequence[tuple[str, int]]) -> dict[tuple[str, int], list[Any]]:
        """For each (cube id, version): the raw findings of the text that version shows (those
        of the latest content version at or before it); absent when nothing was found."""
        result: dict[tuple[str, int], list[Any]] = {}
        if not wanted:
            return result
        by_cube: dict[str, list[int]] = {}
        for cube_id, version in wanted:
            by_cube.setdefault(cube_id, []).append(version)
        content: dict[str, list[tuple[int, str]]] = {}
        # Driver SQL: this runs on every read that shows text, so it skips SQLAlchemy's
        # statement building (most of the cost of so small a query).
        with self.engine.connect() as conn:
            for cube_id, version, findings in DriverConnection(conn).fetch_in_chunks(
                    _SELECT_CONTENT_FINDINGS, sorted(by_cube)):
                content.setdefault(cube_id, []).append((version, findings))
        for cube_id, versions in by_cube.items():
            rows = sorted(content.get(cube_id, ()))
            for version in versions:
                shown = [f for v, f in rows if v <= version]
                if shown and shown[-1] != "[]":
                    result[cube_id, version] = json.loads(shown[-1])
        return result

    def findings(self, *, tenant: str | None = None, cube_ids: Sequence[str] | None = None,
                 after: int = 0, limit: int = 100) -> list[FindingRecord]:
        query = (select(sensitive_content)
                 .where(sensitive_content.c.detected_position > after)
                 .order_by(sensitive_content.c.detected_position).limit(limit))
        if tenant is not None:
            query = query.where(sensitive_content.c.tenant == tenant)
        if cube_ids is not None:
            query = query.where(sensitive_content.c.cube_id.in_(list(cube_ids)))
        with self.engine.connect() as conn:
            return [FindingRecord(
                cube_id=row.cube_id, version=row.version, tenant=row.tenant,
                entity_types=tuple(json.loads(row.entity_types)),
                findings=tuple(json.loads(row.findings)), analyzer=row.analyzer,
                position=row.detected_position, detected_at=row.detected_at)
                for row in conn.execute(query)]

    def erasures(self, *, tenant: str | None = None, after: int = 0,
                 limit: int = 100) -> list[ErasureRecord]:
        query = (select(erasures).where(erasures.c.position > after)
                 .order_by(erasures.c.position).limit(limit))
        if tenant is not None:
            query = query.where(erasures.c.tenant == tenant)
        with self.engine.connect() as conn:
            return [ErasureRecord(
                position=row.position, type=row.type, tenant=row.tenant, subject=row.subject,
                cube_id=row.cube_id, actor=row.actor, reason=row.reason, rule=row.rule,
                detail=json.loads(row.detail), recorded_at=row.recorded_at)
                for row in conn.execute(query)]
