"""The Python SDK: every MemWarden operation, used as is by the CLI and the REST API.

    with MemWarden.open(actor="agent:planner") as mw:
        memory = mw.add("Prefers window seats", tenant="acme", owner="user:ana")
        mw.update(memory.cube_id, text="Prefers aisle seats", reason="user corrected it")
        mw.rollback(memory.cube_id, to_version=1, reason="correction was a mistake")

Writes append events (one command, one transaction) and, in the embedded mode, project them
before returning, so the next read sees the write.
"""

from __future__ import annotations

import difflib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from eventstore import (
    ConcurrencyError,
    EventContext,
    EventStore,
    NewEvent,
    VerificationReport,
)
from governance._access import AccessRecorder
from governance._config import Settings
from governance._errors import InvalidCommand, NotFound, VersionConflict, VersionNotFound
from governance._memcube import Limits, MemCube, validate_cube_id, validate_identifier
from projections import (
    AuditEntry,
    AuditFilter,
    CubeFilter,
    MemoryState,
    ProgressCallback,
    ProjectionRunner,
    ReadModels,
    Usage,
    Version,
    cube_as_of,
    evolve,
    tenant_as_of,
)


@dataclass(frozen=True, slots=True)
class Diff:
    cube_id: str
    from_version: int
    to_version: int
    text_diff: list[str]
    metadata_changes: dict[str, tuple[Any, Any]]

    @property
    def unchanged(self) -> bool:
        return not self.text_diff and not self.metadata_changes


def diff_states(old: MemoryState, new: MemoryState) -> Diff:
    text_diff = list(difflib.unified_diff(
        old.text.splitlines(), new.text.splitlines(),
        f"v{old.version}", f"v{new.version}", lineterm="",
    )) if old.text != new.text else []
    keys = sorted(set(old.metadata) | set(new.metadata))
    changes = {k: (old.metadata.get(k), new.metadata.get(k)) for k in keys
               if old.metadata.get(k) != new.metadata.get(k)}
    if old.state != new.state:
        changes["state"] = (old.state, new.state)
    return Diff(old.cube_id, old.version, new.version, text_diff, changes)


class _Backend:
    """What every MemWarden handle on one database shares: store, projector, read models."""

    def __init__(self, settings: Settings, *, project_synchronously: bool = True):
        self.settings = settings
        self.store = EventStore.open(settings.db_url)
        self.runner = ProjectionRunner(self.store)
        self.runner.create_schema()
        self.reads = ReadModels(self.store.engine)
        self.project_synchronously = project_synchronously
        self.access = AccessRecorder(
            self.store, then=self.runner.project_new_events if project_synchronously else None)
        self.limits = Limits(max_text_bytes=settings.max_text_bytes)

    def close(self) -> None:
        self.access.flush()
        self.store.close()


class MemWarden:
    """A handle acting as one actor. ``acting_as`` gives handles for others on the same backend."""

    def __init__(self, backend: _Backend, *, actor: str, on_behalf_of: str | None = None):
        self._backend = backend
        self.actor = validate_identifier("actor", actor)
        self.on_behalf_of = on_behalf_of

    @classmethod
    def open(cls, url: str | None = None, *, actor: str | None = None,
             settings: Settings | None = None) -> MemWarden:
        settings = settings or Settings.from_env()
        if url is not None:
            settings = Settings(**{**_fields(settings), "db_url": url})
        return cls(_Backend(settings), actor=actor or settings.actor or "sdk")

    def acting_as(self, actor: str, *, on_behalf_of: str | None = None) -> MemWarden:
        return MemWarden(self._backend, actor=actor, on_behalf_of=on_behalf_of)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> MemWarden:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def store(self) -> EventStore:
        return self._backend.store

    @property
    def projector(self) -> ProjectionRunner:
        return self._backend.runner

    # -- commands --------------------------------------------------------------------------

    def add(self, text: str, *, tenant: str, owner: str, kind: str = "plaintext",
            metadata: Mapping[str, Any] | None = None, reason: str | None = None,
            cube_id: str | None = None) -> MemoryState:
        validate_identifier("tenant", tenant)
        cube_id = validate_cube_id(cube_id) if cube_id is not None else str(uuid.uuid4())
        events = MemCube.create(owner=owner, kind=kind, text=text, metadata=metadata,
                                reason=reason, limits=self._backend.limits)
        return self._append(cube_id, tenant, None, events, expected_version=0)

    def update(self, cube_id: str, *, text: str | None = None,
               metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
               reason: str | None = None) -> MemoryState:
        limits = self._backend.limits
        return self._command(cube_id, expected_version, lambda cube: cube.update(
            text=text, metadata=metadata, reason=reason, limits=limits))

    def delete(self, cube_id: str, *, reason: str | None,
               expected_version: int | None = None) -> MemoryState:
        return self._command(cube_id, expected_version, lambda cube: cube.delete(reason=reason))

    def restore(self, cube_id: str, *, reason: str | None = None,
                expected_version: int | None = None) -> MemoryState:
        return self._command(cube_id, expected_version, lambda cube: cube.restore(reason=reason))

    def rollback(self, cube_id: str, to_version: int, *, reason: str | None,
                 expected_version: int | None = None) -> MemoryState:
        return self._command(cube_id, expected_version,
                             lambda cube: cube.rollback(to_version=to_version, reason=reason))

    def _command(self, cube_id: str, expected_version: int | None,
                 decide: Callable[[MemCube], list[NewEvent]]) -> MemoryState:
        cube = MemCube.from_events(cube_id, self.store.read_stream(cube_id))
        if expected_version is not None and expected_version != cube.version:
            raise VersionConflict(cube_id, expected_version, cube.version)
        return self._append(cube_id, cube.state.tenant, cube.state, decide(cube),
                            expected_version=cube.version)

    def _append(self, cube_id: str, tenant: str, state: MemoryState | None,
                events: Sequence[NewEvent], *, expected_version: int) -> MemoryState:
        context = EventContext(actor=self.actor, tenant=tenant, on_behalf_of=self.on_behalf_of,
                               correlation_id=str(uuid.uuid4()))
        backend = self._backend
        project = backend.runner.project_new_events if backend.project_synchronously else None
        try:
            stored = self.store.append(cube_id, events, expected_version=expected_version,
                                       context=context, then=project)
        except ConcurrencyError as error:
            if expected_version == 0:
                raise InvalidCommand(f"a memory with id {cube_id!r} already exists") from None
            raise VersionConflict(cube_id, expected_version, error.actual_version) from None
        for event in stored:
            state = evolve(state, event)
        assert state is not None
        return state

    # -- reads -----------------------------------------------------------------------------

    def get(self, cube_id: str) -> MemoryState:
        """The current state of a memory (deleted ones too: check ``state``). Records the read."""
        state = self._backend.reads.cube(cube_id)
        if state is None:
            raise NotFound(f"no memory with id {cube_id!r}")
        self._record_reads([state])
        return state

    def list(self, where: CubeFilter | None = None, *, after: str | None = None,
             limit: int = 100) -> list[MemoryState]:
        page = self._backend.reads.cubes(where or CubeFilter(), after=after, limit=limit)
        self._record_reads(page)
        return page

    def usage(self, cube_id: str) -> Usage:
        return self._backend.reads.usage(cube_id)

    def history(self, cube_id: str) -> list[Version]:
        found = self._backend.reads.versions(cube_id)
        if not found:
            raise NotFound(f"no memory with id {cube_id!r}")
        return found

    def version(self, cube_id: str, number: int) -> Version:
        found = self._backend.reads.version(cube_id, number)
        if found is None:
            self._require_exists(cube_id)
            raise VersionNotFound(f"memory {cube_id} has no version {number}")
        return found

    def diff(self, cube_id: str, from_version: int, to_version: int) -> Diff:
        return diff_states(self.version(cube_id, from_version).state,
                           self.version(cube_id, to_version).state)

    def as_of(self, cube_id: str, *, position: int | None = None,
              at: datetime | None = None) -> MemoryState:
        """The memory as it was at a log position or a moment (replayed from the log)."""
        try:
            state = cube_as_of(self.store, cube_id, position=position, at=at)
        except ValueError as error:
            raise InvalidCommand(str(error)) from None
        if state is None:
            self._require_exists(cube_id)
            when = f"position {position}" if position is not None else f"{at}"
            raise NotFound(f"memory {cube_id} did not exist yet at {when}")
        return state

    def tenant_as_of(self, tenant: str, *, position: int | None = None,
                     at: datetime | None = None) -> dict[str, MemoryState]:
        try:
            return tenant_as_of(self.store, tenant, position=position, at=at)
        except ValueError as error:
            raise InvalidCommand(str(error)) from None

    def audit(self, where: AuditFilter | None = None, *, after: int = 0, limit: int = 100,
              newest_first: bool = False) -> list[AuditEntry]:
        try:
            return self._backend.reads.audit(where or AuditFilter(), after=after, limit=limit,
                                             newest_first=newest_first)
        except ValueError as error:
            raise InvalidCommand(str(error)) from None

    def verify(self, *, on_progress: ProgressCallback | None = None) -> VerificationReport:
        return self.store.verify(on_progress=on_progress)

    def rebuild_projections(self, names: Sequence[str] | None = None, *,
                            on_progress: ProgressCallback | None = None) -> int:
        self._backend.access.flush()
        try:
            return self.projector.rebuild(names, on_progress=on_progress)
        except ValueError as error:
            raise InvalidCommand(str(error)) from None

    def flush_reads(self) -> int:
        return self._backend.access.flush()

    def _record_reads(self, states: Sequence[MemoryState]) -> None:
        by_tenant: dict[str, list[tuple[str, int]]] = {}
        for state in states:
            by_tenant.setdefault(state.tenant, []).append((state.cube_id, state.version))
        for tenant, reads in by_tenant.items():
            self._backend.access.record(tenant=tenant, actor=self.actor,
                                        on_behalf_of=self.on_behalf_of, reads=reads)

    def _require_exists(self, cube_id: str) -> None:
        if self._backend.reads.cube(cube_id) is None:
            raise NotFound(f"no memory with id {cube_id!r}")


def _fields(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


def state_as_dict(state: MemoryState, *, with_text: bool = True) -> dict[str, Any]:
    """A memory as plain JSON-ready data (the CLI's --json and the REST API use this)."""
    data: dict[str, Any] = {
        "id": state.cube_id,
        "tenant": state.tenant,
        "owner": state.owner,
        "kind": state.kind,
        "version": state.version,
        "state": state.state,
        "metadata": dict(state.metadata),
        "created_at": state.created_at.isoformat(),
        "created_by": state.created_by,
        "updated_at": state.updated_at.isoformat(),
        "updated_by": state.updated_by,
        "position": state.position,
        "last_event": state.last_event,
    }
    if with_text:
        data["text"] = state.text
    return data
