"""Artifacts as governed memory: recording them, lineage in both directions, taint, the loading
gate and the plaintext fallback. No torch here (see ``_parametric`` and ``_activation``).

An artifact is a MemCube of kind ``parametric`` (LoRA adapter) or ``activation`` (KV cache) whose
text describes it; its ``ParametricMemoryCreated`` / ``ActivationMemoryCreated`` event, appended
with the cube version it belongs to, names the file (sha256), the base model and the exact
(cube id, version) sources. Retraining is an update of the cube, and rolling the cube back makes
an older artifact current again, like any memory.

The taint worker writes ``ParametricMemoryTainted`` for every taint the ``lineage`` read model has
detected but the log does not yet show. It runs after each SDK write that may change a source,
when a handle closes (so a CLI command of any kind leaves none pending), in ``memwarden up``'s
background loop, and before any lineage answer or load. Loading never waits for it: the read
model blocks a tainted artifact from the moment its source changed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eventstore import ConcurrencyError, EventContext, NewEvent, StoredEvent
from governance._artifacts import ArtifactStore
from governance._errors import InvalidCommand, NotFound, StateConflict, VersionConflict
from governance._memcube import MemCube, validate_cube_id
from governance._principal import Resource, validate_tenant
from projections import MemoryState
from projections._lineage import (
    ERASURES,
    READY,
    SOURCE_CHANGES,
    ArtifactRecord,
    LineageQueries,
    Taint,
)
from projections._state import PARAMETRIC_MEMORY_RETIRED, PARAMETRIC_MEMORY_TAINTED

if TYPE_CHECKING:
    from governance._sdk import MemWarden, _Backend

ARTIFACT_KINDS = ("parametric", "activation")
TAINT_ACTOR = "system:lineage"
logger = logging.getLogger("memwarden.lineage")


class ArtifactTainted(StateConflict):
    """The artifact may not be loaded: a source changed, it was retired, or its cube is gone."""


@dataclass(frozen=True, slots=True)
class Lineage:
    """The answer to ``memwarden lineage ID``: an artifact's sources, or a memory's artifacts."""

    subject: str
    direction: str
    """``made_of`` (the id is an artifact or artifact cube) or ``derived_into`` (a memory)."""
    artifacts: tuple[ArtifactRecord, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.subject, "direction": self.direction,
                "artifacts": [a.as_dict() for a in self.artifacts]}


@dataclass(frozen=True, slots=True)
class Fallback:
    artifact: str
    restored: tuple[MemoryState, ...]
    """The sources' current versions, which serve as plaintext memory again."""
    skipped: tuple[tuple[str, str], ...]
    """(memory id, why it cannot serve): deleted, expired, erased."""


def queries(mw: MemWarden) -> LineageQueries:
    return LineageQueries(mw.store.engine)


def artifact_store(mw: MemWarden) -> ArtifactStore:
    return ArtifactStore.under(mw.settings.data_dir)


def default_cube_id(kind: str, tenant: str, owner: str | None) -> str:
    """One adapter (or cache) per tenant, or per owner: converting again retrains it."""
    parts = [kind, tenant, *([owner] if owner else [])]
    return validate_cube_id(".".join(part.replace(":", ".") for part in parts))


def record_artifact(mw: MemWarden, *, kind: str, tenant: str, owner: str, cube_id: str,
                    digest: str, description: str, sources: Sequence[MemoryState],
                    created_type: str, detail: dict[str, Any], reason: str | None
                    ) -> MemoryState:
    """Create the artifact cube, or add a version to it, with its creation event: one commit.

    Refused if a source changed since it was read (the artifact would be stale at birth).
    """
    for source in sources:
        now = mw._backend.reads.cube(source.cube_id)
        if now is None or now.version != source.version:
            raise VersionConflict(source.cube_id, source.version,
                                  now.version if now else 0)
    metadata = {"source": "parameter_tuning", "semantic_type": "skill",
                "tags": [kind, "artifact"]}
    existing = mw.store.read_stream(cube_id)
    limits = mw._backend.limits
    if existing:
        cube = MemCube.from_events(cube_id, existing)
        if cube.state.kind != kind or cube.state.tenant != tenant:
            raise InvalidCommand(f"{cube_id} is a {cube.state.kind} memory of tenant "
                                 f"{cube.state.tenant}, not a {kind} one of {tenant}")
        mw.require("memory.update", Resource.of_memory(cube.state))
        events = cube.update(text=description, metadata=None, reason=reason, limits=limits)
        expected, state = cube.version, cube.state
    else:
        events = MemCube.create(owner=owner, kind=kind, text=description, metadata=metadata,
                                reason=reason, limits=limits)
        mw.require("memory.create", Resource.new_memory(
            tenant, owner=owner, created_by=mw.actor, labels=()))
        expected, state = 0, None
    created = NewEvent(created_type, {
        "artifact": digest, "kind": kind, "cube_id": cube_id, "cube_version": expected + 1,
        "sources": [{"cube_id": s.cube_id, "version": s.version, "owner": s.owner}
                    for s in sources],
        **detail, "reason": reason,
    })
    return mw._append(cube_id, tenant, state, [*events, created], expected_version=expected)


def resolve(mw: MemWarden, ident: str, action: str) -> tuple[ArtifactRecord, MemoryState]:
    """An artifact by digest, or an artifact cube's current one, with its cube's state, if
    ``action`` is allowed on that cube (asked before anything else is told)."""
    lineage_reads = queries(mw)
    record = lineage_reads.artifact(ident.removeprefix("sha256:"))
    state = mw._backend.reads.cube(record.cube_id if record else ident)
    if state is None:
        raise NotFound(f"no artifact or memory with id {ident!r}")
    mw.require(action, Resource.of_memory(state))
    if record is None:
        if state.kind not in ARTIFACT_KINDS:
            raise InvalidCommand(f"memory {ident} is {state.kind}, not an adapter or KV cache")
        digest = lineage_reads.current_artifact(state.cube_id, state.version)
        record = lineage_reads.artifact(digest) if digest else None
        if record is None:
            raise NotFound(f"memory {ident} has no artifact recorded")
    return record, state


def lineage(mw: MemWarden, ident: str) -> Lineage:
    """What an artifact is made of, or which artifacts hold knowledge from a memory."""
    emit_pending_taints(mw._backend)
    lineage_reads = queries(mw)
    state = mw._backend.reads.cube(ident)
    if state is not None and state.kind not in ARTIFACT_KINDS:
        mw.require("lineage.read", Resource.of_memory(state))
        return Lineage(ident, "derived_into", tuple(lineage_reads.derived_from(ident)))
    record, cube = resolve(mw, ident, "lineage.read")
    if ident == cube.cube_id:  # every artifact the memory has held, newest first
        return Lineage(ident, "made_of", tuple(lineage_reads.artifacts(cube_id=ident)))
    return Lineage(record.artifact, "made_of", (record,))


def artifacts(mw: MemWarden, *, tenant: str | None = None) -> list[ArtifactRecord]:
    emit_pending_taints(mw._backend)
    if tenant is not None:
        validate_tenant(tenant, platform_allowed=False)
    scope = mw.tenant_scope("lineage.read", tenant)
    return queries(mw).artifacts(tenant=scope)


def loadable(mw: MemWarden, ident: str, *, kind: str) -> tuple[ArtifactRecord, bytes]:
    """The gate every load goes through: the principal may load the artifact and read each of
    its sources; the artifact is current, untainted, not retired; its bytes hash to its name."""
    record, cube = resolve(mw, ident, "artifact.load")
    if record.kind != kind:
        raise InvalidCommand(f"{ident} is a {record.kind} artifact, not a {kind} one")
    emit_pending_taints(mw._backend)
    record = queries(mw).artifact(record.artifact) or record
    if record.status != READY:
        raise ArtifactTainted(_refusal(record))
    if cube.state != "active" or not cube.text:
        raise ArtifactTainted(f"artifact {record.artifact} belongs to memory {cube.cube_id}, "
                              f"which is {cube.state if cube.text else 'erased'}")
    reads = mw._backend.reads
    for source in record.sources:
        state = reads.cube(source.cube_id)
        if state is None:
            raise ArtifactTainted(f"source {source.cube_id} of {record.artifact} is gone")
        mw.require("memory.read_content", Resource.of_memory(state))
    return record, artifact_store(mw).get(record.artifact)


def _refusal(record: ArtifactRecord) -> str:
    if record.taints:
        first = record.taints[0]
        causes = ", ".join(dict.fromkeys(f"{t.cause} of {t.source_cube_id}"
                                         for t in record.taints))
        return (f"artifact {record.artifact} ({record.kind}, memory {record.cube_id}) is tainted "
                f"since position {first.cause_position}: {causes}. Rebuild it (memwarden convert "
                f"{record.kind} --tenant {record.tenant}) or fall back to its sources (memwarden "
                f"convert plaintext {record.cube_id})")
    return (f"artifact {record.artifact} was retired at position {record.retired_position}: its "
            "sources serve as plaintext; rebuild it to load an adapter again")


def restore_plaintext(mw: MemWarden, ident: str, *, reason: str | None) -> Fallback:
    """Retire the artifact: its sources' current plaintext serves instead (recorded)."""
    record, cube = resolve(mw, ident, "artifact.convert")
    if record.retired_position is not None:
        raise StateConflict(f"artifact {record.artifact} was already retired at position "
                            f"{record.retired_position}")
    reads = mw._backend.reads
    restored: list[MemoryState] = []
    skipped: list[tuple[str, str]] = []
    for source in record.sources:
        state = reads.cube(source.cube_id)
        if state is None or state.state != "active" or not state.text:
            why = "erased" if state is not None and not state.text else (
                state.state if state else "gone")
            skipped.append((source.cube_id, why))
        else:
            restored.append(state)
    event = NewEvent(PARAMETRIC_MEMORY_RETIRED, {
        "artifact": record.artifact, "kind": record.kind, "cube_id": record.cube_id,
        "restored": [{"cube_id": s.cube_id, "version": s.version} for s in restored],
        "skipped": [{"cube_id": c, "why": why} for c, why in skipped],
        "reason": reason or ("tainted" if record.taints else "fallback to plaintext"),
    })
    version = mw.store.stream_version(cube.cube_id)
    context = EventContext(actor=mw.actor, tenant=cube.tenant, on_behalf_of=mw.on_behalf_of,
                           correlation_id=str(uuid.uuid4()))
    try:
        mw.store.append(cube.cube_id, [event], expected_version=version, context=context,
                        then=_project(mw._backend))
    except ConcurrencyError as error:
        raise VersionConflict(cube.cube_id, version, error.actual_version) from None
    allowed = {r.id for r in mw._backend.policy.permitted(
        mw.principal, "memory.read_content", [Resource.of_memory(s) for s in restored])}
    shown = mw.redact([s for s in restored if s.cube_id in allowed])
    hidden = [(s.cube_id, "active, but you may not read it") for s in restored
              if s.cube_id not in allowed]
    return Fallback(record.artifact, tuple(shown), (*skipped, *hidden))


def _project(backend: _Backend) -> Any:
    return backend.runner.project_new_events if backend.project_synchronously else None


def after_write(backend: _Backend, stored: Sequence[StoredEvent]) -> None:
    """The SDK's hook after a write: emit taints if the write may have changed a source."""
    if any(e.type in SOURCE_CHANGES for e in stored):
        emit_pending_taints(backend)


def emit_pending_taints(backend: _Backend) -> int:
    """Append ``ParametricMemoryTainted`` for every taint the read model holds and the log does
    not; idempotent, and safe beside another process doing the same. Returns how many."""
    lineage_reads = LineageQueries(backend.store.engine)
    pending = lineage_reads.pending_taints()
    if not pending:
        return 0
    by_cube: dict[str, list[tuple[ArtifactRecord, Taint]]] = {}
    for taint in pending:
        record = lineage_reads.artifact(taint.artifact)
        if record is not None:
            by_cube.setdefault(record.cube_id, []).append((record, taint))
    files = ArtifactStore.under(backend.settings.data_dir)
    emitted = 0
    for cube_id, taints in by_cube.items():
        stream = backend.store.read_stream(cube_id)
        # Written by another worker since the read model was read: pinned by expected_version.
        done = {(e.payload["artifact"], e.payload["cause"]["event_id"])
                for e in stream if e.type == PARAMETRIC_MEMORY_TAINTED}
        events = [_taint_event(record, taint, files) for record, taint in taints
                  if (record.artifact, taint.cause_event_id) not in done]
        if not events:
            continue
        context = EventContext(actor=TAINT_ACTOR, tenant=taints[0][0].tenant,
                               correlation_id=str(uuid.uuid4()),
                               causation_id=taints[0][1].cause_event_id)
        try:
            backend.store.append(cube_id, events, expected_version=stream[-1].stream_version,
                                 context=context, then=_project(backend))
        except ConcurrencyError:
            logger.info("taints of %s: the stream moved; the next run writes them", cube_id)
            continue
        emitted += len(events)
    return emitted


def emit_pending_taints_quietly(backend: _Backend) -> None:
    """For ``close``: a failure here must not fail the command that already succeeded."""
    try:
        emit_pending_taints(backend)
    except Exception:
        logger.exception("writing pending taints failed; the next write or `memwarden up` "
                         "retries (loading stays blocked meanwhile)")


def _taint_event(record: ArtifactRecord, taint: Taint, files: ArtifactStore) -> NewEvent:
    if taint.cause in ERASURES:
        files.purge(record.artifact)
    what = (f"subject {taint.subject} was erased" if taint.subject
            else f"source {taint.source_cube_id} (distilled at version {taint.source_version}) "
                 f"had {taint.cause}")
    return NewEvent(PARAMETRIC_MEMORY_TAINTED, {
        "artifact": record.artifact, "kind": record.kind, "cube_id": record.cube_id,
        "cause": {"type": taint.cause, "event_id": taint.cause_event_id,
                  "position": taint.cause_position, "source_cube_id": taint.source_cube_id,
                  "source_version": taint.source_version, "subject": taint.subject},
        "purged": taint.cause in ERASURES and not files.exists(record.artifact),
        "reason": f"{what}; loading is blocked until the {record.kind} memory is rebuilt",
    })
