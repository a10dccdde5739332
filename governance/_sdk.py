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
import os
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
    StoredEvent,
    StreamAppend,
    VerificationReport,
    utcnow,
)
from eventstore._gc import collection_paused
from governance import _erasure, _holds, _lineage, _retention
from governance._access import AccessRecorder
from governance._config import Settings
from governance._conversion import Selection
from governance._erasure import ErasureReport
from governance._errors import (
    ContentErased,
    InvalidCommand,
    NotFound,
    VersionConflict,
    VersionNotFound,
)
from governance._holds import Hold
from governance._keyvault import KeyVault, load_master_key
from governance._memcube import (
    Limits,
    MemCube,
    MemoryMetadata,
    new_memory_id,
    validate_cube_id,
)
from governance._pii import PiiPolicy
from governance._policy import AccessPolicy, PolicyRule
from governance._principal import PLATFORM, Principal, Resource, validate_tenant
from governance._retention import RetentionPolicy, SweepReport
from governance._search import (
    MemorySearch,
    SearchFilters,
    SearchResult,
    searchable_tenants,
    sensitive_data_masker,
)
from governance._sensitive import ContentCodec, SensitiveData
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
from projections._kafka_projector import KafkaFedRunner
from projections._lineage import ArtifactRecord
from projections._search import SearchProjection
from projections._sensitive import ErasureRecord, FindingRecord


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
        # Memory text is sealed in the log under per-memory keys (governance._sensitive).
        self.vault = KeyVault(load_master_key(
            default_file=os.path.join(settings.data_dir, "master.key")))
        self.store = EventStore.open(settings.db_url, codec=ContentCodec(self.vault))
        # Distributed mode: the Kafka-fed projectors write the read models, never the SQL runner.
        self.runner = (ProjectionRunner(self.store) if project_synchronously
                       else KafkaFedRunner(self.store))
        self.runner.create_schema()
        self.runner.catch_up_if_behind()  # e.g. a read model an upgrade added
        self.reads = ReadModels(self.store.engine)
        self.project_synchronously = project_synchronously
        project = self.runner.project_new_events if project_synchronously else None
        self.access = AccessRecorder(self.store, then=project)
        self.policy = AccessPolicy.open(self.store, then=project)
        self.limits = Limits(max_text_bytes=settings.max_text_bytes)
        self.sensitive = SensitiveData(self.store.engine, PiiPolicy.load(), scan=settings.pii_scan)
        self.search = MemorySearch(self.store, self.policy, then=project,
                                   masker=sensitive_data_masker(self.sensitive),
                                   es_url=settings.es_url)

    def close(self) -> None:
        _lineage.emit_pending_taints_quietly(self)  # whichever command changed a source
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
        # In the distributed mode the Kafka-fed projectors maintain the read models.
        backend = _Backend(settings, project_synchronously=settings.kafka_bootstrap is None)
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
    def settings(self) -> Settings:
        return self._backend.settings

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
        cube_id = validate_cube_id(cube_id) if cube_id is not None else new_memory_id()
        events = MemCube.create(owner=owner, kind=kind, text=text, metadata=metadata,
                                reason=reason, limits=self._backend.limits)
        labels = MemoryMetadata.parse(metadata or {}).labels
        self.require("memory.create", Resource.new_memory(
            tenant, owner=owner, created_by=self.actor, labels=labels))
        return self._append(cube_id, tenant, None, events, expected_version=0)

    @collection_paused()  # thousands of events alive at once: see eventstore._gc
    def add_many(self, memories: Sequence[Mapping[str, Any]], *,
                 tenant: str) -> list[MemoryState]:
        """Add several memories (imports): each a mapping with ``text``, ``owner`` and optional
        ``kind``, ``metadata``, ``reason``, ``id``. One transaction, all or none; their texts
        go to the sensitive data scanner in one batch, much faster than one ``add`` each."""
        validate_tenant(tenant, platform_allowed=False)
        backend = self._backend
        writes: list[tuple[str, list[NewEvent]]] = []
        for memory in memories:
            cube_id = (validate_cube_id(memory["id"]) if memory.get("id") is not None
                       else new_memory_id())
            metadata = memory.get("metadata")
            writes.append((cube_id, MemCube.create(
                owner=memory.get("owner"), kind=memory.get("kind", "plaintext"),
                text=memory.get("text"), metadata=metadata, reason=memory.get("reason"),
                limits=backend.limits)))
            self.require("memory.create", Resource.new_memory(
                tenant, owner=memory["owner"], created_by=self.actor,
                labels=MemoryMetadata.parse(metadata or {}).labels))
        if len({cube_id for cube_id, _ in writes}) != len(writes):
            raise InvalidCommand("two memories of the batch have the same id")
        inspected = backend.sensitive.inspect([(1, events) for _, events in writes])
        context = EventContext(actor=self.actor, tenant=tenant, on_behalf_of=self.on_behalf_of,
                               correlation_id=str(uuid.uuid4()))
        project = backend.runner.project_new_events if backend.project_synchronously else None
        try:
            stored = self.store.append_many([StreamAppend(cube_id, events, 0, context)
                                             for (cube_id, _), events in zip(writes, inspected,
                                                                             strict=True)],
                                            then=project)
        except ConcurrencyError as error:
            raise InvalidCommand(f"a memory with id {error.stream_id!r} already exists") from None
        states: dict[str, MemoryState] = {}
        for event in stored:
            states[event.stream_id] = evolve(states.get(event.stream_id), event)
        return self.redact(list(states.values()), written=stored)

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
                            expected_version=cube.version,
                            earlier_texts={v: text for v, (text, _) in cube.contents.items()})

    def _append(self, cube_id: str, tenant: str, state: MemoryState | None,
                events: Sequence[NewEvent], *, expected_version: int,
                earlier_texts: Mapping[int, str] | None = None) -> MemoryState:
        context = EventContext(actor=self.actor, tenant=tenant, on_behalf_of=self.on_behalf_of,
                               correlation_id=str(uuid.uuid4()))
        backend = self._backend
        # Scanned before anything is stored: a blocked entity type refuses the whole command.
        events = backend.sensitive.inspect([(expected_version + 1, events)])[0]
        if earlier_texts:
            events = backend.sensitive.carry_forward(cube_id, expected_version + 1, events,
                                                     earlier_texts)
        project = backend.runner.project_new_events if backend.project_synchronously else None
        try:
            stored = self.store.append(cube_id, events, expected_version=expected_version,
                                       context=context, then=project)
        except ConcurrencyError as error:
            if expected_version == 0:
                raise InvalidCommand(f"a memory with id {cube_id!r} already exists") from None
            raise VersionConflict(cube_id, expected_version, error.actual_version) from None
        _lineage.after_write(backend, stored)
        for event in stored:
            state = evolve(state, event)
        assert state is not None
        return self.redact([state], written=stored)[0]

    # -- reads -----------------------------------------------------------------------------
    # Content (text) needs memory.read_content, and memory.read_sensitive too for a memory with a
    # restricted label; history needs memory.history as well. A memory of another tenant is
    # denied as if it did not exist (the API answers 404 for both).

    def get(self, cube_id: str) -> MemoryState:
        """The current state of a memory (deleted ones too: check ``state``). Records the read."""
        state = _retention.refuse_if_archived(self._readable(cube_id))
        self._record_reads([state])
        return self.redact([state])[0]

    def list(self, where: CubeFilter | None = None, *, after: str | None = None,
             limit: int = 100) -> list[MemoryState]:
        """A page of the memories the principal may read, in id order (the next page starts
        after the last id returned; a short page is the last)."""
        where = where or CubeFilter()
        where = replace(where, tenant=self.tenant_scope("memory.read_content", where.tenant,
                                                        items_checked=True))
        if where.include_archived:  # cold content is read through a recall, by those allowed
            self.tenant_scope("memory.recall", where.tenant)
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
        return self.redact(page)

    def usage(self, cube_id: str) -> Usage:
        self._visible(cube_id, "memory.read_metadata")
        return self._backend.reads.usage(cube_id)

    def history(self, cube_id: str) -> list[Version]:
        _retention.refuse_if_archived(self._readable(cube_id, first="memory.history"))
        found = self._backend.reads.versions(cube_id)
        shown = self.redact([v.state for v in found])
        return [replace(v, state=s) for v, s in zip(found, shown, strict=True)]

    def version(self, cube_id: str, number: int) -> Version:
        _retention.refuse_if_archived(self._readable(cube_id, first="memory.history"))
        found = self._backend.reads.version(cube_id, number)
        if found is None:
            raise VersionNotFound(f"memory {cube_id} has no version {number}")
        return replace(found, state=self.redact([found.state])[0])

    def diff(self, cube_id: str, from_version: int, to_version: int) -> Diff:
        return diff_states(self.version(cube_id, from_version).state,
                           self.version(cube_id, to_version).state)

    def as_of(self, cube_id: str, *, position: int | None = None,
              at: datetime | None = None) -> MemoryState:
        """The memory as it was at a log position or a moment (replayed from the log); not while
        it is in the cold archive (recall it first)."""
        _retention.refuse_if_archived(self._readable(cube_id))
        try:
            state = cube_as_of(self.store, cube_id, position=position, at=at)
        except ValueError as error:
            raise InvalidCommand(str(error)) from None
        if state is None:
            when = f"position {position}" if position is not None else f"{at}"
            raise NotFound(f"memory {cube_id} did not exist yet at {when}")
        # Labels change over time: what it was then must be readable as well as what it is now.
        self.require("memory.read_content", Resource.of_memory(state))
        if state.content_erased:
            raise ContentErased(f"memory {cube_id}'s content as of then was erased "
                                "(crypto-shredded) and can never be read again")
        return self.redact([state])[0]

    def tenant_as_of(self, tenant: str, *, position: int | None = None,
                     at: datetime | None = None) -> dict[str, MemoryState]:
        """Every memory of ``tenant`` then that the principal may read, less those now in the
        cold archive (read through a recall only)."""
        self.require("memory.read_content", Resource.of_tenant(
            validate_tenant(tenant, platform_allowed=False)))
        try:
            states = tenant_as_of(self.store, tenant, position=position, at=at)
        except ValueError as error:
            raise InvalidCommand(str(error)) from None
        archived = _retention.archived_in(self, tenant)
        allowed = {r.id for r in self._backend.policy.permitted(
            self.principal, "memory.read_content",
            [Resource.of_memory(s) for s in states.values()])} - archived
        shown = self.redact([s for cube_id, s in states.items() if cube_id in allowed])
        return {s.cube_id: s for s in shown}

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

    # -- retention and legal holds (governance._retention, governance._holds) ---------------

    def retention_rules(self) -> RetentionPolicy:
        """The retention rules in force ($MEMWARDEN_RETENTION_POLICY, default
        policies/retention.yaml), validated."""
        self.tenant_scope("retention.read", None)
        return _retention.load_policy(self)

    def run_retention(self, *, dry_run: bool = False, tenant: str | None = None,
                      at: datetime | None = None,
                      on_progress: _retention.ProgressCallback | None = None) -> SweepReport:
        """One retention sweep now (every tenant, for a platform principal). ``at`` asks what a
        sweep at another moment would do: dry runs only."""
        if at is not None and not dry_run:
            raise InvalidCommand("a sweep at another moment than now can only be a dry run")
        clock = (lambda: at) if at is not None else utcnow
        return _retention.RetentionWorker(self, clock=clock).run(
            dry_run=dry_run, tenant=tenant, on_progress=on_progress)

    def retention_report(self, *, days: int = 30,
                         tenant: str | None = None) -> _retention.RetentionReport:
        return _retention.retention_report(self, days=days, tenant=tenant)

    def holds(self, *, tenant: str | None = None, include_released: bool = False) -> list[Hold]:
        return _holds.list_holds(self, tenant=tenant, include_released=include_released)

    def place_hold(self, *, reason: str, case_id: str, memory: str | None = None,
                   owner: str | None = None, tenant: str | None = None) -> Hold:
        """Hold a memory, an owner's memories in a tenant, or a whole tenant (an event)."""
        return _holds.place_hold(self, reason=reason, case_id=case_id, memory=memory,
                                 owner=owner, tenant=tenant)

    def release_hold(self, hold_id: str, *, reason: str) -> Hold:
        return _holds.release_hold(self, hold_id, reason=reason)

    def recall(self, cube_id: str, *, reason: str) -> _retention.Recalled:
        """Read a cold-archived memory back (a MemoryRecalled event); it returns to working."""
        return _retention.recall(self, cube_id, reason=reason)

    # -- parametric and activation memory (governance._parametric, _activation, _lineage) ---
    # torch loads in seconds: the modules that use it are imported only when called.

    def lineage(self, memory_or_artifact_id: str) -> _lineage.Lineage:
        """Which artifacts hold knowledge from a memory, or what an artifact is made of."""
        return _lineage.lineage(self, memory_or_artifact_id)

    def artifacts(self, *, tenant: str | None = None) -> list[ArtifactRecord]:
        """Adapters and KV caches, newest first, with their sources and taints."""
        return _lineage.artifacts(self, tenant=tenant)

    def conversion_plan(self, *, tenant: str, owner: str | None = None) -> Selection:
        """What a conversion would distil now, and why everything else is left out."""
        from governance._parametric import plan

        return plan(self, tenant=tenant, owner=owner)

    def convert_parametric(self, *, tenant: str, owner: str | None = None,
                           cube_id: str | None = None, reason: str | None = None,
                           on_step: Callable[[int, int, float], None] | None = None) -> Any:
        """Train a LoRA adapter on the selected memories: a ``ParametricResult``."""
        from governance._parametric import convert_parametric

        return convert_parametric(self, tenant=tenant, owner=owner, cube_id=cube_id,
                                  reason=reason, on_step=on_step)

    def convert_activation(self, *, tenant: str, owner: str | None = None,
                           cube_id: str | None = None, reason: str | None = None) -> Any:
        """Precompute the KV cache of the selected memories: an ``ActivationResult``."""
        from governance._activation import convert_activation

        return convert_activation(self, tenant=tenant, owner=owner, cube_id=cube_id,
                                  reason=reason)

    def restore_plaintext(self, artifact: str, *, reason: str | None = None) -> _lineage.Fallback:
        """Retire an adapter or cache: its sources' current plaintext serves instead."""
        return _lineage.restore_plaintext(self, artifact, reason=reason)

    def load_adapter(self, artifact: str) -> Any:
        """The base model with an untainted adapter applied: a ``LoadedAdapter``."""
        from governance._parametric import load_adapter

        return load_adapter(self, artifact)

    def load_activation(self, artifact: str) -> Any:
        """An untainted KV cache, ready to start generations from: a ``LoadedActivation``."""
        from governance._activation import load_activation

        return load_activation(self, artifact)

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

    def refuse_while_building(self, *, search: bool = False) -> None:
        """Distributed mode: raise ``ReadModelsBehind`` while a Kafka consumer builds, from the
        beginning of the topic, the read models reads use: every one but the search index, or
        with ``search`` the search index. They hold part of the log until it is through, and
        an answer from them would be wrong. Embedded mode: never."""
        projector = self._backend.runner
        names = {p.name for p in projector.projections}
        projector.refuse_while_building(
            names & {SearchProjection.name} if search else names - {SearchProjection.name})

    def readiness(self) -> dict[str, int]:
        """How far the read models have applied the log (whole-platform facts: operator only)."""
        self.require("platform.operate", Resource.of_tenant(PLATFORM))
        return {"head_position": self.store.head_position(),
                "projected_position": min(self.projector.checkpoints().values())}

    def flush_reads(self) -> int:
        return self._backend.access.flush()

    def search(self, query: str, *, k: int = 10, mode: str = "bm25", tenant: str | None = None,
               kind: str | None = None, semantic_type: str | None = None,
               labels: Sequence[str] = (), owner: str | None = None,
               since: datetime | None = None, until: datetime | None = None) -> list[SearchResult]:
        """The ``k`` memories best matching ``query`` among those the principal may read
        (mode ``bm25``, ``semantic`` or ``hybrid``; see ``governance._search``). Audited."""
        tenant = self.tenant_scope("memory.read_content", tenant, items_checked=True)
        search = self._backend.search
        filters = SearchFilters(tenant, kind, semantic_type, tuple(labels), owner, since, until)
        return search.search(self.principal, query, k=k, mode=mode, filters=filters,
                             tenants=searchable_tenants(search, self.principal, tenant),
                             on_behalf_of=self.on_behalf_of)

    # -- sensitive data and data subjects (governance._sensitive, governance._erasure) -------

    def redact(self, states: Sequence[MemoryState], *,
               written: Sequence[StoredEvent] = ()) -> list[MemoryState]:
        """``states`` as this principal may see them: personal data the policy masks is shown as
        ``<ENTITY_TYPE>`` in the text of memories it lacks ``memory.read_sensitive`` on. Every
        read surface applies it; use it on any text drawn from the read models. ``written``:
        the events a command just stored (their findings need no query)."""
        return self._backend.sensitive.masked(states, self._may_read_sensitive, written=written)

    def _may_read_sensitive(self, states: Sequence[MemoryState]) -> set[str]:
        return {r.id for r in self._backend.policy.permitted(
            self.principal, "memory.read_sensitive", [Resource.of_memory(s) for s in states])}

    def findings(self, *, tenant: str | None = None, cube_id: str | None = None,
                 after: int = 0, limit: int = 100) -> list[FindingRecord]:
        """Sensitive data found on write (entity types, offsets, scores; never the values)."""
        return _erasure.findings(self, tenant=tenant, cube_id=cube_id, after=after, limit=limit)

    def erasures(self, *, tenant: str | None = None, after: int = 0,
                 limit: int = 100) -> list[ErasureRecord]:
        """Subject erasures and memory content erasures, oldest first."""
        return _erasure.erasures(self, tenant=tenant, after=after, limit=limit)

    def erase_subject(self, subject: str, *, tenant: str, reason: str) -> ErasureReport:
        """Crypto-shred everything ``subject`` owns in ``tenant`` (GDPR Art. 17)."""
        return _erasure.erase_subject(self, subject, tenant=tenant, reason=reason)

    def erase_memory_content(self, cube_id: str, *, reason: str, rule: str | None = None,
                             scrub: bool = True) -> MemoryState:
        """Crypto-shred one memory's text, every version of it (retention's erase-after).
        Erasing many: pass ``scrub=False`` to each, then call ``scrub_erased()`` once (on
        PostgreSQL a scrub rewrites the read-model tables)."""
        return _erasure.erase_memory_content(self, cube_id, reason=reason, rule=rule,
                                             scrub=scrub)

    def scrub_erased(self) -> bool:
        """Push erased keys and text out of the database files now (see ``governance._erasure``);
        False if SQLite could not finish (a long reader): the next checkpoint does it."""
        return _erasure.scrub_erased(self)

    def export_subject(self, subject: str, *, tenant: str) -> dict[str, Any]:
        """Everything held about ``subject`` in ``tenant``, as JSON-ready data (GDPR Art. 15/20);
        masked per this principal's rights. Recorded as a MemoryExported event."""
        return _erasure.export_subject(self, subject, tenant=tenant)

    @property
    def backend(self) -> _Backend:
        return self._backend

    def _readable(self, cube_id: str, *, first: str | None = None) -> MemoryState:
        """The memory's current state, if the principal may read its content, and do ``first``
        (checked first: a denial names it)."""
        state = self._visible(cube_id, first or "memory.read_content")
        if first is not None:
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
        "tier": state.tier,
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
