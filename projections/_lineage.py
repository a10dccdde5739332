"""``lineage``: which memory versions each parametric or activation artifact was made from, and
what has happened to those sources since.

An artifact (a LoRA adapter or a KV cache, named by the sha256 of its file) belongs to a MemCube
of kind ``parametric`` or ``activation`` (which has an ordinary version chain and rollback). Its
events are on that cube's stream:

* ``ParametricMemoryCreated`` / ``ActivationMemoryCreated``: the artifact of one cube version, with
  the exact (cube id, version) sources, base model, hyperparameters and metrics;
* ``ParametricMemoryTainted``: one source changed after the artifact was made (the cause names the
  event), for adapters and KV caches alike;
* ``ParametricMemoryRetired``: the artifact's sources serve as plaintext again (fallback).

A source change (update, rollback, deletion, expiry, content erasure, the owner's erasure) is
recorded here as a *due* taint the moment it is projected, in the transaction that wrote it, so
loading is blocked at once; the taint worker then writes the ``ParametricMemoryTainted`` event
that the audit trail shows, and marks the due row emitted. Everything here follows from the log:
drop the tables, replay, same rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
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
from eventstore._driver import DriverConnection, insert_sql, upsert_sql
from projections._readmodels import Projection
from projections._state import (
    ACTIVATION_MEMORY_CREATED,
    PARAMETRIC_MEMORY_CREATED,
    PARAMETRIC_MEMORY_RETIRED,
    PARAMETRIC_MEMORY_TAINTED,
)
from projections._tables import metadata

ARTIFACT_CREATED_TYPES = frozenset({PARAMETRIC_MEMORY_CREATED, ACTIVATION_MEMORY_CREATED})

SOURCE_CHANGES = frozenset({
    "MemoryUpdated", "MemoryRolledBack", "MemoryDeleted", "MemoryExpired",
    "MemoryContentErased", "MemoryRedacted",
})
"""Events on a source memory's own stream that make what was learnt from it stale."""
SUBJECT_ERASED = "SubjectErased"
"""On ``subject:<id>``: every source about that subject in the tenant is gone."""
ERASURES = frozenset({"MemoryContentErased", SUBJECT_ERASED})
"""Causes after which an artifact's file is deleted too: it may reproduce the erased text."""

READY, TAINTED, RETIRED = "ready", "tainted", "retired"
_LINEAGE_EVENTS = frozenset({PARAMETRIC_MEMORY_CREATED, ACTIVATION_MEMORY_CREATED,
                             PARAMETRIC_MEMORY_TAINTED, PARAMETRIC_MEMORY_RETIRED, SUBJECT_ERASED})


lineage_artifacts = Table(
    "lineage_artifacts",
    metadata,
    Column("artifact", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("tenant", String(200), nullable=False),
    Column("cube_id", String(200), nullable=False),
    Column("cube_version", Integer, nullable=False),
    Column("base_model", String(64), nullable=False),
    Column("detail", Text, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("retired_position", BigInteger),
    Index("lineage_artifacts_tenant", "tenant", "position"),
    Index("lineage_artifacts_cube", "cube_id", "cube_version"),
)

lineage_sources = Table(
    "lineage_sources",
    metadata,
    Column("artifact", String(64), nullable=False),
    Column("cube_id", String(200), nullable=False),
    Column("version", Integer, nullable=False),
    Column("tenant", String(200), nullable=False),
    Column("owner", String(200), nullable=False),
    PrimaryKeyConstraint("artifact", "cube_id"),
    Index("lineage_sources_cube", "cube_id"),
    Index("lineage_sources_owner", "tenant", "owner"),
)

lineage_cube_versions = Table(
    "lineage_cube_versions",
    metadata,
    Column("cube_id", String(200), nullable=False),
    Column("version", Integer, nullable=False),
    Column("artifact", String(64), nullable=False),
    PrimaryKeyConstraint("cube_id", "version"),
)
"""The artifact each version of an artifact cube points at (a rollback points at an older one)."""

lineage_taints = Table(
    "lineage_taints",
    metadata,
    Column("artifact", String(64), nullable=False),
    Column("cause_event_id", String(36), nullable=False),
    Column("cause", String(100), nullable=False),
    Column("cause_position", BigInteger, nullable=False),
    Column("source_cube_id", String(200), nullable=False),
    Column("source_version", Integer, nullable=False),
    Column("subject", String(200)),
    Column("detected_at", UTCDateTime, nullable=False),
    Column("emitted_position", BigInteger),
    Column("purged", Integer, nullable=False),
    PrimaryKeyConstraint("artifact", "cause_event_id"),
    Index("lineage_taints_pending", "emitted_position", "cause_position"),
)

_SOURCE_COLUMNS = ("artifact", "cube_id", "version", "tenant", "owner")
_ARTIFACT_COLUMNS = ("artifact", "kind", "tenant", "cube_id", "cube_version", "base_model",
                     "detail", "created_by", "created_at", "position", "retired_position")
_TAINT_COLUMNS = ("artifact", "cause_event_id", "cause", "cause_position", "source_cube_id",
                  "source_version", "subject", "detected_at", "emitted_position", "purged")
_INSERT_ARTIFACT = upsert_sql("lineage_artifacts", _ARTIFACT_COLUMNS, key=("artifact",))
_INSERT_SOURCE = upsert_sql("lineage_sources", _SOURCE_COLUMNS, key=("artifact", "cube_id"))
_INSERT_CUBE_VERSION = upsert_sql("lineage_cube_versions", ("cube_id", "version", "artifact"),
                                  key=("cube_id", "version"))
_INSERT_TAINT = (f"{insert_sql('lineage_taints', _TAINT_COLUMNS)} "
                 "ON CONFLICT (artifact, cause_event_id) DO NOTHING")
_SOURCES_OF_CUBES = ("SELECT artifact, cube_id, version, tenant, owner FROM lineage_sources "
                     "WHERE cube_id IN {keys}")
_SOURCES_OF_OWNER = ("SELECT artifact, cube_id, version, tenant, owner FROM lineage_sources "
                     "WHERE tenant = ? AND owner = ?")
_ARTIFACT_AT = ("SELECT artifact FROM lineage_cube_versions WHERE cube_id = ? AND version <= ? "
                "ORDER BY version DESC LIMIT 1")
_EMITTED = ("UPDATE lineage_taints SET emitted_position = ?, purged = ? "
            "WHERE artifact = ? AND cause_event_id = ?")
_RETIRED = "UPDATE lineage_artifacts SET retired_position = ? WHERE artifact = ?"
_CHANGES_BEFORE = ("SELECT event_id, stream_id, stream_version, type, position, recorded_at "
                   "FROM events WHERE stream_id = ? AND stream_version > ? AND position < ? "
                   "ORDER BY position")


@dataclass(frozen=True, slots=True)
class SourceRef:
    cube_id: str
    version: int
    tenant: str
    owner: str

    def as_dict(self) -> dict[str, Any]:
        return {"cube_id": self.cube_id, "version": self.version, "owner": self.owner}


@dataclass(frozen=True, slots=True)
class Taint:
    artifact: str
    cause: str
    cause_event_id: str
    cause_position: int
    source_cube_id: str
    source_version: int
    subject: str | None
    detected_at: datetime
    emitted_position: int | None
    purged: bool

    def as_dict(self) -> dict[str, Any]:
        return {"cause": self.cause, "cause_event_id": self.cause_event_id,
                "cause_position": self.cause_position, "source_cube_id": self.source_cube_id,
                "source_version": self.source_version, "subject": self.subject,
                "detected_at": self.detected_at.isoformat(),
                "emitted_position": self.emitted_position, "purged": self.purged}


@dataclass(frozen=True, slots=True)
class ArtifactRecord:
    artifact: str
    """The sha256 of the artifact's file (hex)."""
    kind: str
    tenant: str
    cube_id: str
    cube_version: int
    base_model: str
    detail: Mapping[str, Any]
    """Base model name, hyperparameters and metrics, as the creation event recorded them."""
    created_by: str
    created_at: datetime
    position: int
    retired_position: int | None
    sources: tuple[SourceRef, ...]
    taints: tuple[Taint, ...]

    @property
    def status(self) -> str:
        if self.taints:
            return TAINTED
        return RETIRED if self.retired_position is not None else READY

    @property
    def loadable(self) -> bool:
        return self.status == READY

    def as_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "kind": self.kind, "tenant": self.tenant,
                "cube_id": self.cube_id, "cube_version": self.cube_version,
                "base_model": self.base_model, "status": self.status,
                "created_by": self.created_by, "created_at": self.created_at.isoformat(),
                "position": self.position, "retired_position": self.retired_position,
                "sources": [s.as_dict() for s in self.sources],
                "taints": [t.as_dict() for t in self.taints], **dict(self.detail)}


class LineageProjection(Projection):
    name = "lineage"
    tables = (lineage_taints, lineage_cube_versions, lineage_sources, lineage_artifacts)

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        changed = list(dict.fromkeys(e.stream_id for e in events if e.type in SOURCE_CHANGES))
        lineage = any(e.type in _LINEAGE_EVENTS for e in events)
        if not changed and not lineage:
            return
        db = DriverConnection(conn)
        # One query for the whole batch; artifacts made within the batch add theirs below.
        sources_of: dict[str, list[tuple[str, SourceRef]]] = {}
        for row in db.fetch_in_chunks(_SOURCES_OF_CUBES, changed) if changed else ():
            artifact, source = _source(row)
            sources_of.setdefault(source.cube_id, []).append((artifact, source))
        for event in events:  # in log order: a taint can only follow its artifact
            if event.type in ARTIFACT_CREATED_TYPES:
                for source in self._created(db, event):
                    sources_of.setdefault(source.cube_id, []).append(
                        (event.payload["artifact"], source))
            elif event.type == PARAMETRIC_MEMORY_TAINTED:
                db.execute(_EMITTED, (event.position, int(bool(event.payload.get("purged"))),
                                      event.payload["artifact"],
                                      event.payload["cause"]["event_id"]))
            elif event.type == PARAMETRIC_MEMORY_RETIRED:
                db.execute(_RETIRED, (event.position, event.payload["artifact"]))
            elif event.type == SUBJECT_ERASED:
                subject = event.payload.get("subject")
                tenant = event.payload.get("tenant") or event.tenant
                rows = db.execute(_SOURCES_OF_OWNER, (tenant, subject)).fetchall()
                self._taint(db, event, [_source(row) for row in rows], subject=subject)
            elif event.type in SOURCE_CHANGES:
                if event.type == "MemoryRolledBack":
                    self._artifact_cube_rolled_back(db, event)
                self._taint(db, event, [(artifact, source) for artifact, source
                                        in sources_of.get(event.stream_id, ())
                                        if event.stream_version > source.version])

    def _created(self, db: DriverConnection, event: StoredEvent) -> list[SourceRef]:
        p = event.payload
        artifact = p["artifact"]
        detail = {key: p[key] for key in ("base_model_name", "hyperparameters", "metrics",
                                          "device", "size_bytes", "prefix_tokens") if key in p}
        db.execute(_INSERT_ARTIFACT, (
            artifact, p["kind"], event.tenant or "", p["cube_id"], p["cube_version"],
            p["base_model"], canonical_json(detail), event.actor,
            db.dialect.to_db_time(event.recorded_at), event.position, None))
        sources = [SourceRef(s["cube_id"], s["version"], event.tenant or "", s["owner"])
                   for s in p["sources"]]
        db.executemany(_INSERT_SOURCE, [(artifact, s.cube_id, s.version, s.tenant, s.owner)
                                        for s in sources])
        db.execute(_INSERT_CUBE_VERSION, (p["cube_id"], p["cube_version"], artifact))
        # A source written again while the artifact was being made: stale from the start.
        for source in sources:
            for row in db.execute(_CHANGES_BEFORE, (source.cube_id, source.version,
                                                    event.position)).fetchall():
                event_id, _, _, type_, position, recorded_at = row
                if type_ in SOURCE_CHANGES:
                    self._insert_taint(db, artifact, str(event_id), type_, position, source,
                                       None, db.dialect.from_db_time(recorded_at))
        return sources

    def _artifact_cube_rolled_back(self, db: DriverConnection, event: StoredEvent) -> None:
        """An artifact cube rolled back points at the artifact of the version it went back to."""
        row = db.execute(_ARTIFACT_AT, (event.stream_id, event.payload["to_version"])).fetchone()
        if row is not None:
            db.execute(_INSERT_CUBE_VERSION, (event.stream_id, event.stream_version, row[0]))

    def _taint(self, db: DriverConnection, event: StoredEvent,
               sources: Iterable[tuple[str, SourceRef]], *, subject: str | None = None) -> None:
        for artifact, source in sources:
            self._insert_taint(db, artifact, str(event.event_id), event.type, event.position,
                               source, subject, event.recorded_at)

    @staticmethod
    def _insert_taint(db: DriverConnection, artifact: str, event_id: str, cause: str,
                      position: int, source: SourceRef, subject: str | None,
                      at: datetime) -> None:
        db.execute(_INSERT_TAINT, (artifact, event_id, cause, position, source.cube_id,
                                   source.version, subject, db.dialect.to_db_time(at), None, 0))


def _source(row: Sequence[Any]) -> tuple[str, SourceRef]:
    artifact, cube_id, version, tenant, owner = row
    return artifact, SourceRef(cube_id, version, tenant, owner)


class LineageQueries:
    """Both directions: what an artifact is made of, and what was made from a memory."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def artifact(self, artifact: str) -> ArtifactRecord | None:
        found = self._records(select(lineage_artifacts).where(
            lineage_artifacts.c.artifact == artifact))
        return found[0] if found else None

    def artifacts(self, *, tenant: str | None = None, cube_id: str | None = None,
                  limit: int = 1000) -> list[ArtifactRecord]:
        """Newest first."""
        query = select(lineage_artifacts).order_by(lineage_artifacts.c.position.desc())
        if tenant is not None:
            query = query.where(lineage_artifacts.c.tenant == tenant)
        if cube_id is not None:
            query = query.where(lineage_artifacts.c.cube_id == cube_id)
        return self._records(query.limit(limit))

    def derived_from(self, cube_id: str) -> list[ArtifactRecord]:
        """Every artifact made from any version of memory ``cube_id``, newest first."""
        made_from = select(lineage_sources.c.artifact).where(lineage_sources.c.cube_id == cube_id)
        return self._records(select(lineage_artifacts).where(
            lineage_artifacts.c.artifact.in_(made_from)).order_by(
            lineage_artifacts.c.position.desc()))

    def current_artifact(self, cube_id: str, version: int) -> str | None:
        """The artifact that version ``version`` of artifact cube ``cube_id`` points at."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(lineage_cube_versions.c.artifact)
                .where(lineage_cube_versions.c.cube_id == cube_id,
                       lineage_cube_versions.c.version <= version)
                .order_by(lineage_cube_versions.c.version.desc()).limit(1)).scalar()

    def pending_taints(self, limit: int = 1000) -> list[Taint]:
        """Taints detected but not yet written to the log, oldest cause first."""
        query = (select(lineage_taints).where(lineage_taints.c.emitted_position.is_(None))
                 .order_by(lineage_taints.c.cause_position, lineage_taints.c.artifact)
                 .limit(limit))
        with self.engine.connect() as conn:
            return [_taint(row) for row in conn.execute(query).mappings()]

    def _records(self, query: Any) -> list[ArtifactRecord]:
        with self.engine.connect() as conn:
            rows = list(conn.execute(query).mappings())
            names = [row["artifact"] for row in rows]
            sources: dict[str, list[SourceRef]] = {name: [] for name in names}
            taints: dict[str, list[Taint]] = {name: [] for name in names}
            if names:
                for row in conn.execute(select(lineage_sources).where(
                        lineage_sources.c.artifact.in_(names)).order_by(
                        lineage_sources.c.cube_id)).mappings():
                    sources[row["artifact"]].append(
                        SourceRef(row["cube_id"], row["version"], row["tenant"], row["owner"]))
                for row in conn.execute(select(lineage_taints).where(
                        lineage_taints.c.artifact.in_(names)).order_by(
                        lineage_taints.c.cause_position)).mappings():
                    taints[row["artifact"]].append(_taint(row))
        return [ArtifactRecord(
            artifact=row["artifact"], kind=row["kind"], tenant=row["tenant"],
            cube_id=row["cube_id"], cube_version=row["cube_version"],
            base_model=row["base_model"], detail=json.loads(row["detail"]),
            created_by=row["created_by"], created_at=row["created_at"],
            position=row["position"], retired_position=row["retired_position"],
            sources=tuple(sources[row["artifact"]]), taints=tuple(taints[row["artifact"]]))
            for row in rows]


def _taint(row: Mapping[str, Any]) -> Taint:
    return Taint(artifact=row["artifact"], cause=row["cause"],
                 cause_event_id=row["cause_event_id"], cause_position=row["cause_position"],
                 source_cube_id=row["source_cube_id"], source_version=row["source_version"],
                 subject=row["subject"], detected_at=row["detected_at"],
                 emitted_position=row["emitted_position"], purged=bool(row["purged"]))
