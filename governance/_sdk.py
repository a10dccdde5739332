"""The Python SDK: every MemWarden operation, used as is by the CLI and the REST API.

    with MemWarden.open(key=os.environ["MEMWARDEN_API_KEY"]) as mw:
        memory = mw.add("Prefers window seats", tenant="acme", owner="user:ana")
        mw.update(memory.cube_id, text="Prefers aisle seats", reason="user corrected it")
        mw.rollback(memory.cube_id, to_version=1, reason="correction was a mistake")

A handle acts as one ``Principal`` (an API key's subject, role and tenant) and every operation
asks the ``AccessPolicy`` first: this module is the one enforcement point behind the CLI, the
REST API and the dashboard. A handle opened on the database without a key acts as the local
operator (the platform admin role), as whoever can open the database file could anyway.

Writes append events (one command, one transaction) and, in the embedded mode, project them
before returning, so the next read sees the write.
"""

from __future__ import annotations

import difflib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
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
from governance._memcube import Limits, MemCube, MemoryMetadata, validate_cube_id
from governance._policy import AccessPolicy, PolicyRule
from governance._principal import PLATFORM, Principal, Resource, validate_tenant
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
        project = self.runner.project_new_events if project_synchronously else None
        self.access = AccessRecorder(self.store, then=project)
        self.policy = AccessPolicy.open(self.store, then=project)
        self.limits = Limits(max_text_bytes=settings.max_text_bytes)

    def close(self) -> None:
        self.access.flush()
        self.store.close()


LOCAL_OPERATOR_ROLE = "admin"
"""The role of a handle opened on the database without an API key."""


class MemWarden:
    """A handle acting as one principal; ``as_principal`` and ``acting_as`` give handles for
    others on the same backend."""

    def __init__(self, backend: _Backend, *, principal: Principal,
                 on_behalf_of: str | None = None):
        self._backend = backend
        self.principal = principal
        self.on_behalf_of = on_behalf_of

    @classmethod
    def open(cls, url: str | None = None, *, actor: str | None = None, key: str | None = None,
             settings: Settings | None = None) -> MemWarden:
        """A handle on ``url`` (default: ``MEMWARDEN_DB_URL``): as the principal of API ``key``,
        or without one as the local operator named ``actor``."""
        settings = settings or Settings.from_env()
        if url is not None:
            settings = Settings(**{**_fields(settings), "db_url": url})
        backend = _Backend(settings)
        try:
            if key is not None:
                from governance._keys import authenticate

                principal = authenticate(backend.store.engine, key)
            else:
                principal = Principal(actor or settings.actor or "sdk", PLATFORM,
                                      LOCAL_OPERATOR_ROLE)
        except BaseException:
            backend.close()
            raise
        return cls(backend, principal=principal)

    def as_principal(self, principal: Principal, *,
                     on_behalf_of: str | None = None) -> MemWarden:
        """A handle on the same backend acting as ``principal`` (an authenticated key)."""
        return MemWarden(self._backend, principal=principal, on_behalf_of=on_behalf_of)

    def acting_as(self, actor: str, *, on_behalf_of: str | None = None) -> MemWarden:
        """The same role and tenant, acting as the subject ``actor``: for the platform operator
        only (seeding, imports), since every event the new handle causes names ``actor``."""
        self.require("platform.operate", Resource.of_tenant(PLATFORM))
        principal = Principal(actor, self.principal.tenant, self.principal.role)
        return self.as_principal(principal, on_behalf_of=on_behalf_of)

    @property
    def actor(self) -> str:
        return self.principal.subject

    @property
    def policy(self) -> AccessPolicy:
        return self._backend.policy

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> MemWarden:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def require(self, action: str, resource: Resource | None = None) -> None:
        """Raise ``PermissionDenied`` (recorded as an AccessDenied event) unless allowed."""
        self._backend.policy.require(self.principal, action, resource)

    def may(self, action: str, resource: Resource | None = None) -> bool:
        """Whether ``action`` is allowed, without recording anything."""
        return bool(self._backend.policy.permitted(self.principal, action,
                                                   [resource or self._own_tenant()]))

    def _own_tenant(self) -> Resource:
        return Resource.of_tenant(self.principal.tenant)

    def tenant_scope(self, action: str, tenant: str | None, *,
                     items_checked: bool = False) -> str | None:
        """The tenant a listing is limited to: the one asked for, else the principal's own
        (None: every tenant, for a platform principal). ``action`` must be allowed there,
        unless ``items_checked``: the listing checks it on every item it returns, so only the
        tenant is checked (an agent may list its own memories without any tenant-wide right)."""
        if tenant is None and not self.principal.is_platform:
            tenant = self.principal.tenant
        where = Resource.of_tenant(PLATFORM if tenant is None else tenant)
        if not (items_checked and self.principal.may_act_in(where.tenant)):
            self.require(action, where)
        return tenant

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
        validate_tenant(tenant, platform_allowed=False)
        cube_id = validate_cube_id(cube_id) if cube_id is not None else str(uuid.uuid4())
        events = MemCube.create(owner=owner, kind=kind, text=text, metadata=metadata,
                                reason=reason, limits=self._backend.limits)
        labels = MemoryMetadata.parse(metadata or {}).labels
        self.require("memory.create", Resource.new_memory(
            tenant, owner=owner, created_by=self.actor, labels=labels))
        return self._append(cube_id, tenant, None, events, expected_version=0)

    def update(self, cube_id: str, *, text: str | None = None,
               metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
               reason: str | None = None) -> MemoryState:
        limits = self._backend.limits
        return self._command("memory.update", cube_id, expected_version, lambda cube: cube.update(
            text=text, metadata=metadata, reason=reason, limits=limits))

    def delete(self, cube_id: str, *, reason: str | None,
               expected_version: int | None = None) -> MemoryState:
        return self._command("memory.delete", cube_id, expected_version,
                             lambda cube: cube.delete(reason=reason))

    def restore(self, cube_id: str, *, reason: str | None = None,
                expected_version: int | None = None) -> MemoryState:
        return self._command("memory.restore", cube_id, expected_version,
                             lambda cube: cube.restore(reason=reason))

    def rollback(self, cube_id: str, to_version: int, *, reason: str | None,
                 expected_version: int | None = None) -> MemoryState:
        return self._command("memory.rollback", cube_id, expected_version,
                             lambda cube: cube.rollback(to_version=to_version, reason=reason))

    def _command(self, action: str, cube_id: str, expected_version: int | None,
                 decide: Callable[[MemCube], list[NewEvent]]) -> MemoryState:
        cube = MemCube.from_events(cube_id, self.store.read_stream(cube_id))
        self.require(action, Resource.of_memory(cube.state))
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
    # Content (text) needs memory.read_content, and memory.read_sensitive too for a memory with a
    # restricted label; history needs memory.history as well. A memory of another tenant is
    # denied as if it did not exist (the API answers 404 for both).

    def get(self, cube_id: str) -> MemoryState:
        """The current state of a memory (deleted ones too: check ``state``). Records the read."""
        state = self._readable(cube_id)
        self._record_reads([state])
        return state

    def list(self, where: CubeFilter | None = None, *, after: str | None = None,
             limit: int = 100) -> list[MemoryState]:
        """A page of the memories the principal may read, in id order (the next page starts
        after the last id returned; a short page is the last)."""
        where = where or CubeFilter()
        where = replace(where, tenant=self.tenant_scope("memory.read_content", where.tenant,
                                                        items_checked=True))
        reads, policy = self._backend.reads, self._backend.policy
        page: list[MemoryState] = []
        while len(page) < limit:
            batch = reads.cubes(where, after=after, limit=limit)
            allowed = {r.id for r in policy.permitted(
                self.principal, "memory.read_content", [Resource.of_memory(s) for s in batch])}
            page.extend(s for s in batch if s.cube_id in allowed)
            if len(batch) < limit:
                break
            after = batch[-1].cube_id
        page = page[:limit]
        self._record_reads(page)
        return page

    def usage(self, cube_id: str) -> Usage:
        self._visible(cube_id, "memory.read_metadata")
        return self._backend.reads.usage(cube_id)

    def history(self, cube_id: str) -> list[Version]:
        self._visible(cube_id, "memory.history")
        self._readable(cube_id)
        return self._backend.reads.versions(cube_id)

    def version(self, cube_id: str, number: int) -> Version:
        self._visible(cube_id, "memory.history")
        self._readable(cube_id)
        found = self._backend.reads.version(cube_id, number)
        if found is None:
            raise VersionNotFound(f"memory {cube_id} has no version {number}")
        return found

    def diff(self, cube_id: str, from_version: int, to_version: int) -> Diff:
        return diff_states(self.version(cube_id, from_version).state,
                           self.version(cube_id, to_version).state)

    def as_of(self, cube_id: str, *, position: int | None = None,
              at: datetime | None = None) -> MemoryState:
        """The memory as it was at a log position or a moment (replayed from the log)."""
        self._readable(cube_id)
        try:
            state = cube_as_of(self.store, cube_id, position=position, at=at)
        except ValueError as error:
            raise InvalidCommand(str(error)) from None
        if state is None:
            when = f"position {position}" if position is not None else f"{at}"
            raise NotFound(f"memory {cube_id} did not exist yet at {when}")
        # Labels change over time: what it was then must be readable as well as what it is now.
        self.require("memory.read_content", Resource.of_memory(state))
        return state

    def tenant_as_of(self, tenant: str, *, position: int | None = None,
                     at: datetime | None = None) -> dict[str, MemoryState]:
        """Every memory of ``tenant`` then that the principal may read."""
        self.require("memory.read_content", Resource.of_tenant(
            validate_tenant(tenant, platform_allowed=False)))
        try:
            states = tenant_as_of(self.store, tenant, position=position, at=at)
        except ValueError as error:
            raise InvalidCommand(str(error)) from None
        allowed = {r.id for r in self._backend.policy.permitted(
            self.principal, "memory.read_content",
            [Resource.of_memory(s) for s in states.values()])}
        return {cube_id: s for cube_id, s in states.items() if cube_id in allowed}

    def audit(self, where: AuditFilter | None = None, *, after: int = 0, limit: int = 100,
              newest_first: bool = False) -> list[AuditEntry]:
        """The audit trail of the principal's tenant (of any, or all, for a platform one)."""
        where = where or AuditFilter()
        where = replace(where, tenant=self.tenant_scope("audit.read", where.tenant))
        try:
            return self._backend.reads.audit(where, after=after, limit=limit,
                                             newest_first=newest_first)
        except ValueError as error:
            raise InvalidCommand(str(error)) from None

    def verify(self, *, on_progress: ProgressCallback | None = None) -> VerificationReport:
        self.require("integrity.verify")
        return self.store.verify(on_progress=on_progress)

    def rebuild_projections(self, names: Sequence[str] | None = None, *,
                            on_progress: ProgressCallback | None = None) -> int:
        self.require("platform.operate", Resource.of_tenant(PLATFORM))
        self._backend.access.flush()
        try:
            return self.projector.rebuild(names, on_progress=on_progress)
        except ValueError as error:
            raise InvalidCommand(str(error)) from None

    def projection_checkpoints(self) -> dict[str, int]:
        self.require("platform.operate", Resource.of_tenant(PLATFORM))
        return self.projector.checkpoints()

    # -- the access policy -----------------------------------------------------------------

    def policy_rules(self) -> list[PolicyRule]:
        """The access rules in force in the principal's tenant (all, for a platform one)."""
        return self._backend.policy.list_rules(self.principal)

    def add_policy_rule(self, rule: PolicyRule, *, reason: str) -> int:
        """Put ``rule`` in force (a PolicyRuleAdded event); returns the policy revision."""
        return self._backend.policy.add_rule(self.principal, rule, reason=reason)

    def remove_policy_rule(self, rule: PolicyRule, *, reason: str) -> int:
        """Take ``rule`` out of force (a PolicyRuleRemoved event); returns the revision."""
        return self._backend.policy.remove_rule(self.principal, rule, reason=reason)

    def readiness(self) -> dict[str, int]:
        """How far the read models have applied the log (whole-platform facts: operator only)."""
        self.require("platform.operate", Resource.of_tenant(PLATFORM))
        return {"head_position": self.store.head_position(),
                "projected_position": min(self.projector.checkpoints().values())}

    def flush_reads(self) -> int:
        return self._backend.access.flush()

    def _readable(self, cube_id: str) -> MemoryState:
        """The memory's current state, if the principal may read its content."""
        state = self._backend.reads.cube(cube_id)
        if state is None:
            raise NotFound(f"no memory with id {cube_id!r}")
        self.require("memory.read_content", Resource.of_memory(state))
        return state

    def _visible(self, cube_id: str, action: str) -> MemoryState:
        """The memory's current state, if ``action`` (a metadata-level one) is allowed on it."""
        state = self._backend.reads.cube(cube_id)
        if state is None:
            raise NotFound(f"no memory with id {cube_id!r}")
        self.require(action, Resource.of_memory(state))
        return state

    def _record_reads(self, states: Sequence[MemoryState]) -> None:
        by_tenant: dict[str, list[tuple[str, int]]] = {}
        for state in states:
            by_tenant.setdefault(state.tenant, []).append((state.cube_id, state.version))
        for tenant, reads in by_tenant.items():
            self._backend.access.record(tenant=tenant, actor=self.actor,
                                        on_behalf_of=self.on_behalf_of, reads=reads)


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
