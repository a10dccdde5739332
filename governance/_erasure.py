"""Data subjects' rights: erasure by crypto-shredding (GDPR Art. 17) and export (Art. 15/20).

**Erasure** of a subject deletes its key and its memories' keys (``governance._keyvault``) and
appends ``SubjectErased`` in one transaction; the projections purge the subject's text as they
apply it (``projections._purge``). The log is never rewritten: its copies of the text are sealed
under keys that no longer exist. Erasure of one memory's content (``MemoryContentErased``,
retention's erase-after) deletes that memory's key the same way. After the commit the database
files are scrubbed (``scrub_database``): SQLite's WAL is checkpointed into the zeroed pages and
truncated; on PostgreSQL the key tables and the text-holding read models are rewritten
(``VACUUM FULL``) so that no dead tuple keeps the text.

**Export** gathers everything held about a subject in a tenant: memories with every version,
findings, the reads of those memories and their audit trail, erasures. Text is masked per the
exporting principal's rights; the export itself is recorded (``MemoryExported``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, func, select

from eventstore import ANY_VERSION, ConcurrencyError, EventContext, NewEvent, StoredEvent, utcnow
from eventstore._driver import DriverConnection
from governance._errors import ContentErased, InvalidCommand, NotFound, VersionConflict
from governance._keyvault import KEY_TABLES, scrub_database
from governance._memcube import MemCube, validate_identifier
from governance._principal import Resource, validate_tenant
from projections import (
    COLD_ARCHIVE,
    MEMORY_CONTENT_ERASED,
    SUBJECT_ERASED,
    AuditFilter,
    CubeFilter,
    MemoryState,
    cubes,
    evolve,
    reads,
    versions,
)
from projections._archive import archived_texts, text_as_of
from projections._sensitive import ErasureRecord, FindingRecord
from projections._tables import metadata as read_model_metadata

if TYPE_CHECKING:
    from governance._sdk import MemWarden

MEMORY_EXPORTED = "MemoryExported"


@dataclass(frozen=True, slots=True)
class ErasureReport:
    subject: str
    tenant: str
    reason: str
    position: int
    memories: int
    """Memories the subject owns in the tenant, now without text."""
    versions: int
    """Versions of those memories whose text was purged from the read models."""
    keys_destroyed: int
    """Memory keys shredded (the subject's own key goes too)."""
    scrubbed: bool
    """Whether the database files were scrubbed at once (else at the next checkpoint)."""

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def subject_stream(subject: str) -> str:
    return f"subject:{subject}"


def _reason(reason: str | None, what: str) -> str:
    if reason is None or not str(reason).strip():
        raise InvalidCommand(f"a reason is required to {what}")
    return str(reason).strip()


def erase_subject(mw: MemWarden, subject: str, *, tenant: str, reason: str) -> ErasureReport:
    validate_tenant(tenant, platform_allowed=False)
    validate_identifier("subject", subject)
    why = _reason(reason, "erase a data subject")
    mw.require("subject.erase", Resource.of_subject(tenant, subject))
    backend = mw.backend
    engine = backend.store.engine
    with engine.connect() as conn:
        memories = _count(conn, cubes, tenant, subject)
        purged = _count(conn, versions, tenant, subject, with_text=True)
        keys = len(backend.vault.subjects_cubes(conn, tenant, subject))
    event = NewEvent(SUBJECT_ERASED, {
        "subject": subject, "tenant": tenant, "reason": why, "memories": memories,
        "versions": purged, "keys_destroyed": keys})

    def shred_then_project(conn: Connection, stored: list[StoredEvent]) -> None:
        backend.vault.destroy_subject(conn, tenant, subject)
        if backend.project_synchronously:
            backend.runner.project_new_events(conn, stored)

    stored = backend.store.append(subject_stream(subject), [event], expected_version=ANY_VERSION,
                                  context=_context(mw, tenant), then=shred_then_project)
    scrubbed = _scrub(engine)
    return ErasureReport(subject, tenant, why, stored[0].position, memories, purged, keys,
                         scrubbed)


def erase_memory_content(mw: MemWarden, cube_id: str, *, reason: str,
                         rule: str | None = None, scrub: bool = True) -> MemoryState:
    why = _reason(reason, "erase a memory's content")
    backend = mw.backend
    cube = MemCube.from_events(cube_id, backend.store.read_stream(cube_id))
    # Retention's erase-after runs under retention.manage; anyone else needs subject.erase.
    mw.require("retention.manage" if rule else "subject.erase", Resource.of_memory(cube.state))
    if cube.state.content_erased:
        raise ContentErased(f"memory {cube_id}'s content is already erased")

    def shred_then_project(conn: Connection, stored: list[StoredEvent]) -> None:
        backend.vault.destroy_memory(conn, cube_id)
        if backend.project_synchronously:
            backend.runner.project_new_events(conn, stored)

    try:
        stored = backend.store.append(
            cube_id, [NewEvent(MEMORY_CONTENT_ERASED, {"reason": why, "rule": rule})],
            expected_version=cube.version, context=_context(mw, cube.state.tenant),
            then=shred_then_project)
    except ConcurrencyError as error:
        raise VersionConflict(cube_id, cube.version, error.actual_version) from None
    if scrub:
        _scrub(backend.store.engine)
    return evolve(cube.state, stored[0])


def scrub_erased(mw: MemWarden) -> bool:
    """Scrub the database files once after erasing many memories with ``scrub=False``."""
    if not mw.may("retention.manage"):
        mw.require("subject.erase")
    return _scrub(mw.backend.store.engine)


def export_subject(mw: MemWarden, subject: str, *, tenant: str) -> dict[str, Any]:
    validate_tenant(tenant, platform_allowed=False)
    validate_identifier("subject", subject)
    mw.require("subject.export", Resource.of_subject(tenant, subject))
    backend = mw.backend
    states: list[MemoryState] = []
    after: str | None = None
    while True:
        page = backend.reads.cubes(CubeFilter(tenant=tenant, owner=subject,
                                              include_archived=True), after=after, limit=1000)
        states.extend(page)
        if len(page) < 1000:
            break
        after = page[-1].cube_id
    cube_ids = [s.cube_id for s in states]
    # Cold memories' texts are held in the cold archive, not in the read models: from there.
    with backend.store.engine.connect() as conn:
        cold = archived_texts(DriverConnection(conn),
                              [s.cube_id for s in states if s.tier == COLD_ARCHIVE])

    def held(state: MemoryState) -> MemoryState:
        texts = cold.get(state.cube_id)
        return state if texts is None else replace(state,
                                                   text=text_as_of(texts, state.version))

    memories = []
    version_count = 0
    from governance._sdk import state_as_dict  # here: _sdk imports this module

    for state in mw.redact([held(s) for s in states]):
        history = backend.reads.versions(state.cube_id)
        shown = mw.redact([held(v.state) for v in history])
        version_count += len(shown)
        memories.append({**state_as_dict(state), "content_erased": state.content_erased,
                         "versions": [{**state_as_dict(s), "reason": v.reason,
                                       "content_erased": s.content_erased}
                                      for v, s in zip(history, shown, strict=True)]})
    exported_at = utcnow()
    event = NewEvent(MEMORY_EXPORTED, {
        "subject": subject, "tenant": tenant, "memories": len(memories),
        "versions": version_count, "format": "json"})
    project = backend.runner.project_new_events if backend.project_synchronously else None
    stored = backend.store.append(subject_stream(subject), [event], expected_version=ANY_VERSION,
                                  context=_context(mw, tenant), then=project)
    return {
        "subject": subject,
        "tenant": tenant,
        "exported_at": exported_at.isoformat(),
        "exported_by": mw.actor,
        "export_position": stored[0].position,
        "memories": memories,
        "findings": [_finding_dict(f) for f in
                     backend.sensitive.queries.findings(cube_ids=cube_ids, limit=100_000)]
        if cube_ids else [],
        "access_log": _access_log(mw, cube_ids),
        "audit_trail": _audit_trail(mw, tenant, cube_ids),
        "erasures": [_erasure_dict(e) for e in backend.sensitive.queries.erasures(
            tenant=tenant, limit=100_000) if e.subject == subject or e.cube_id in cube_ids],
    }


def findings(mw: MemWarden, *, tenant: str | None, cube_id: str | None, after: int,
             limit: int) -> list[FindingRecord]:
    if cube_id is not None:
        mw.require("memory.read_metadata", Resource.of_memory(_current(mw, cube_id)))
        tenant = None
    else:
        tenant = mw.tenant_scope("audit.read", tenant)
    return mw.backend.sensitive.queries.findings(
        tenant=tenant, cube_ids=None if cube_id is None else [cube_id], after=after, limit=limit)


def erasures(mw: MemWarden, *, tenant: str | None, after: int,
             limit: int) -> list[ErasureRecord]:
    tenant = mw.tenant_scope("audit.read", tenant)
    return mw.backend.sensitive.queries.erasures(tenant=tenant, after=after, limit=limit)


def _current(mw: MemWarden, cube_id: str) -> MemoryState:
    state = mw.backend.reads.cube(cube_id)
    if state is None:
        raise NotFound(f"no memory with id {cube_id!r}")
    return state


def _scrub(engine: Engine) -> bool:
    """Scrub the key tables and every read model (any of them may have held the text: cubes,
    versions, the search index, the retention archive...). On PostgreSQL that rewrites them all;
    erasures are rare, and a dead tuple holding the text would be a copy left behind."""
    return scrub_database(engine, (*KEY_TABLES, *read_model_metadata.sorted_tables))


def _context(mw: MemWarden, tenant: str) -> EventContext:
    return EventContext(actor=mw.actor, tenant=tenant, on_behalf_of=mw.on_behalf_of,
                        correlation_id=str(uuid.uuid4()))


def _count(conn: Connection, table: Any, tenant: str, subject: str, *,
           with_text: bool = False) -> int:
    query = select(func.count()).select_from(table).where(
        table.c.tenant == tenant, table.c.owner == subject)
    if with_text:
        query = query.where(table.c.text != "")
    return int(conn.execute(query).scalar_one())


def _access_log(mw: MemWarden, cube_ids: list[str]) -> list[dict[str, Any]]:
    if not cube_ids:
        return []
    rows: list[dict[str, Any]] = []
    with mw.backend.store.engine.connect() as conn:
        for start in range(0, len(cube_ids), 500):
            query = (select(reads).where(reads.c.cube_id.in_(cube_ids[start:start + 500]))
                     .order_by(reads.c.position))
            rows.extend({"cube_id": r.cube_id, "version": r.version, "actor": r.actor,
                         "read_at": _iso(r.read_at), "position": r.position}
                        for r in conn.execute(query))
    return sorted(rows, key=lambda r: r["position"])


def _audit_trail(mw: MemWarden, tenant: str, cube_ids: list[str]) -> list[dict[str, Any]]:
    entries = []
    for cube_id in cube_ids:
        after = 0
        while True:
            page = mw.backend.reads.audit(AuditFilter(tenant=tenant, cube_id=cube_id),
                                          after=after, limit=1000)
            entries.extend({"position": e.position, "type": e.type, "cube_id": e.cube_id,
                            "actor": e.actor, "on_behalf_of": e.on_behalf_of,
                            "reason": e.reason, "detail": e.detail,
                            "recorded_at": _iso(e.recorded_at)} for e in page)
            if len(page) < 1000:
                break
            after = page[-1].position
    return sorted(entries, key=lambda e: e["position"])


def _finding_dict(record: FindingRecord) -> dict[str, Any]:
    return {"cube_id": record.cube_id, "version": record.version,
            "entity_types": list(record.entity_types), "findings": list(record.findings),
            "analyzer": record.analyzer, "position": record.position,
            "detected_at": _iso(record.detected_at)}


def _erasure_dict(record: ErasureRecord) -> dict[str, Any]:
    return {"position": record.position, "type": record.type, "subject": record.subject,
            "cube_id": record.cube_id, "actor": record.actor, "reason": record.reason,
            "rule": record.rule, "detail": dict(record.detail),
            "recorded_at": _iso(record.recorded_at)}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
