"""The conversion policy (``policies/conversion.yaml``): which plaintext memories may become
parametric (LoRA) or activation (KV cache) memory, and the LoRA hyperparameters.

A memory is selected when it is active plaintext the converting principal may read, and hot,
stable, free of sensitive labels and of detected personal data beyond the tolerated kinds (names,
dates, places: what most memories are about; erasing their subject taints the artifact), not
under a legal hold and not due to expire (each threshold per tenant or owner, see the file).
``select`` returns the selected memories and, for every other candidate, the reason it was left
out: the dry run prints both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from sqlalchemy import select as sql_select

from eventstore import utcnow
from governance._config import ConfigError
from governance._principal import Resource, is_restricted_label
from projections import CubeFilter, MemoryState

if TYPE_CHECKING:
    from governance._sdk import MemWarden

POLICY_ENV = "MEMWARDEN_CONVERSION_POLICY"
DEFAULT_POLICY_PATH = Path(__file__).resolve().parent.parent / "policies" / "conversion.yaml"
_CONTENT_WRITES = frozenset({"MemoryCreated", "MemoryUpdated", "MemoryRolledBack"})
_PAGE = 1000


@dataclass(frozen=True, slots=True)
class SelectionRule:
    min_reads: int = 3
    stable_days: float = 7
    exclude_labels: tuple[str, ...] = ("sensitive",)
    tolerated_pii: tuple[str, ...] = ("PERSON", "DATE_TIME", "LOCATION")
    allow_held: bool = False
    expiry_margin_days: float = 30
    max_memories: int = 64


@dataclass(frozen=True, slots=True)
class TrainingParameters:
    """LoRA hyperparameters: recorded with every adapter made with them."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = "all-linear"
    learning_rate: float = 0.01
    steps: int = 30
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class _Override:
    tenant: str
    owner: str | None
    values: Mapping[str, Any]

    def matches(self, tenant: str, owner: str | None) -> bool:
        return self.tenant in ("*", tenant) and self.owner in (None, "*", owner)


@dataclass(frozen=True, slots=True)
class WorkerScope:
    """What the conversion worker keeps built: these kinds of artifact for a tenant (owner)."""

    tenant: str
    owner: str | None
    kinds: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WorkerSchedule:
    interval_seconds: int = 3600
    scopes: tuple[WorkerScope, ...] = ()


@dataclass(frozen=True, slots=True)
class ConversionPolicy:
    selection: SelectionRule = field(default_factory=SelectionRule)
    rules: tuple[_Override, ...] = ()
    training: TrainingParameters = field(default_factory=TrainingParameters)
    worker: WorkerSchedule = field(default_factory=WorkerSchedule)
    source: str = "<defaults>"

    @classmethod
    def load(cls, path: str | Path | None = None) -> ConversionPolicy:
        """``path``, else ``$MEMWARDEN_CONVERSION_POLICY``, else the packaged policy file."""
        where = Path(path or os.environ.get(POLICY_ENV) or DEFAULT_POLICY_PATH)
        try:
            raw = yaml.safe_load(where.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"cannot read the conversion policy {where}: {error}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{where} is not valid YAML: {error}") from None
        return cls.parse(raw or {}, source=str(where))

    @classmethod
    def parse(cls, raw: Any, *, source: str = "<policy>") -> ConversionPolicy:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: the conversion policy must be a mapping")
        _known(source, "top level", raw, {"selection", "rules", "training", "worker"})
        selection = _selection(source, "selection", raw.get("selection") or {}, SelectionRule())
        rules = []
        for index, rule in enumerate(raw.get("rules") or [], start=1):
            where = f"rules[{index}]"
            if not isinstance(rule, Mapping) or not isinstance(rule.get("tenant"), str):
                raise ConfigError(f"{source}: {where} must be a mapping with a tenant")
            values = {k: v for k, v in rule.items() if k not in ("tenant", "owner")}
            _selection(source, where, values, selection)  # validates the values it names
            owner = rule.get("owner")
            if owner is not None and not isinstance(owner, str):
                raise ConfigError(f"{source}: {where}.owner must be a string")
            rules.append(_Override(rule["tenant"], owner, values))
        training = _training(source, raw.get("training") or {})
        return cls(selection, tuple(rules), training, _worker(source, raw.get("worker") or {}),
                   source)

    def rule_for(self, tenant: str, owner: str | None) -> SelectionRule:
        for rule in self.rules:
            if rule.matches(tenant, owner):
                return _selection(self.source, "rule", rule.values, self.selection)
        return self.selection


def _known(source: str, where: str, raw: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{source}: {where}: unknown field(s) {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(sorted(allowed))}")


def _typed(source: str, where: str, name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str) and bool(value)
    if not ok:
        raise ConfigError(f"{source}: {where}.{name} must be like {default!r}; got {value!r}")
    return float(value) if isinstance(default, float) else value


def _selection(source: str, where: str, raw: Any, base: SelectionRule) -> SelectionRule:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping")
    names = {f.name for f in fields(SelectionRule)}
    _known(source, where, raw, names)
    return replace(base, **{name: _typed(source, where, name, value, getattr(base, name))
                            for name, value in raw.items()})


def _worker(source: str, raw: Any) -> WorkerSchedule:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: worker must be a mapping")
    _known(source, "worker", raw, {"interval_seconds", "scopes"})
    interval = raw.get("interval_seconds", WorkerSchedule().interval_seconds)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ConfigError(f"{source}: worker.interval_seconds must be a positive whole number")
    scopes = []
    for index, scope in enumerate(raw.get("scopes") or [], start=1):
        where = f"worker.scopes[{index}]"
        if not isinstance(scope, Mapping) or not isinstance(scope.get("tenant"), str):
            raise ConfigError(f"{source}: {where} must be a mapping with a tenant")
        _known(source, where, scope, {"tenant", "owner", "kinds"})
        kinds = tuple(scope.get("kinds") or ("parametric", "activation"))
        if not set(kinds) <= {"parametric", "activation"} or (
                scope.get("owner") is not None and not isinstance(scope["owner"], str)):
            raise ConfigError(f"{source}: {where}: kinds are parametric and activation, and "
                              "owner is a string")
        scopes.append(WorkerScope(scope["tenant"], scope.get("owner"), kinds))
    return WorkerSchedule(interval, tuple(scopes))


def _training(source: str, raw: Any) -> TrainingParameters:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: training must be a mapping")
    base = TrainingParameters()
    _known(source, "training", raw, {f.name for f in fields(TrainingParameters)})
    parsed = replace(base, **{name: _typed(source, "training", name, value, getattr(base, name))
                              for name, value in raw.items()})
    if parsed.rank < 1 or parsed.steps < 1 or not 0 < parsed.learning_rate < 1:
        raise ConfigError(f"{source}: training needs rank >= 1, steps >= 1 and a learning rate "
                          "between 0 and 1")
    return parsed


@dataclass(frozen=True, slots=True)
class Candidate:
    state: MemoryState
    reads: int
    last_write: datetime


@dataclass(frozen=True, slots=True)
class Selection:
    tenant: str
    owner: str | None
    rule: SelectionRule
    selected: tuple[Candidate, ...]
    excluded: tuple[tuple[str, str], ...]
    """(memory id, why it was left out)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant, "owner": self.owner,
            "rule": {f.name: getattr(self.rule, f.name) for f in fields(self.rule)},
            "selected": [{"id": c.state.cube_id, "version": c.state.version,
                          "owner": c.state.owner, "reads": c.reads,
                          "last_write": c.last_write.isoformat()} for c in self.selected],
            "excluded": [{"id": cube_id, "reason": why} for cube_id, why in self.excluded],
        }


def select(mw: MemWarden, policy: ConversionPolicy, *, tenant: str, owner: str | None,
           now: datetime | None = None) -> Selection:
    """The memories of ``tenant`` (and ``owner``) that ``policy`` lets ``mw``'s principal distil.

    Reads no content the principal may not read: a memory it may not read is left out, named.
    """
    now = now or utcnow()
    rule = policy.rule_for(tenant, owner)
    backend = mw._backend
    states = _candidates(mw, tenant, owner)
    readable = {r.id for r in backend.policy.permitted(
        mw.principal, "memory.read_content", [Resource.of_memory(s) for s in states])}
    held = _held(mw, tenant)
    chosen: list[Candidate] = []
    excluded: list[tuple[str, str]] = []
    for state in states:
        why, candidate = _judge(mw, state, rule, now, readable, held)
        if candidate is None:
            excluded.append((state.cube_id, why))
        else:
            chosen.append(candidate)
    chosen.sort(key=lambda c: (-c.reads, c.state.cube_id))
    for candidate in chosen[rule.max_memories:]:
        excluded.append((candidate.state.cube_id, f"not among the {rule.max_memories} hottest"))
    return Selection(tenant, owner, rule, tuple(chosen[:rule.max_memories]),
                     tuple(sorted(excluded)))


def _candidates(mw: MemWarden, tenant: str, owner: str | None) -> list[MemoryState]:
    reads = mw._backend.reads
    where = CubeFilter(tenant=tenant, owner=owner, kind="plaintext", state="active")
    found: list[MemoryState] = []
    after = None
    while True:
        page = reads.cubes(where, after=after, limit=_PAGE)
        found.extend(page)
        if len(page) < _PAGE:
            return found
        after = page[-1].cube_id


def _judge(mw: MemWarden, state: MemoryState, rule: SelectionRule, now: datetime,
           readable: set[str | None], held: Sequence[tuple[str, str]]
           ) -> tuple[str, Candidate | None]:
    if state.cube_id not in readable:
        return "you may not read it", None
    if not state.text:
        return "its content was erased", None
    labels = [label for label in state.labels
              if label.casefold() in {x.casefold() for x in rule.exclude_labels}
              or is_restricted_label(label)]
    if labels:
        return f"labelled {', '.join(labels)}", None
    if not rule.allow_held:
        for scope, target in held:
            if (scope, target) in (("tenant", state.tenant), ("owner", state.owner),
                                   ("memory", state.cube_id)):
                return f"under a legal hold ({scope} {target})", None
    ttl = state.metadata.get("ttl_seconds")
    if ttl and state.created_at + timedelta(seconds=ttl) <= now + timedelta(
            days=rule.expiry_margin_days):
        return f"expires within {rule.expiry_margin_days:g} days (ttl)", None
    reads = mw._backend.reads.usage(state.cube_id).read_count
    if reads < rule.min_reads:
        return f"cold: read {reads} time(s), fewer than {rule.min_reads}", None
    events = mw.store.read_stream(state.cube_id)
    tolerated = set(rule.tolerated_pii)
    for event in events:
        if event.type == "SensitiveDataDetected":
            found = _entity_types(event.payload)
            if not found or found - tolerated:  # a finding that names nothing: fail closed
                kinds = ", ".join(sorted(found - tolerated)) or "unspecified"
                return f"personal data detected ({kinds})", None
    last_write = max(e.recorded_at for e in events if e.type in _CONTENT_WRITES)
    if now - last_write < timedelta(days=rule.stable_days):
        return f"written {_age(now - last_write)} ago, less than {rule.stable_days:g} days", None
    return "", Candidate(state, reads, last_write)


def _entity_types(payload: Mapping[str, Any]) -> set[str]:
    types = set(payload.get("entity_types") or ())
    for finding in payload.get("findings") or ():
        if isinstance(finding, Mapping) and finding.get("entity_type"):
            types.add(str(finding["entity_type"]))
    return types


def _held(mw: MemWarden, tenant: str) -> list[tuple[str, str]]:
    """(scope, target) of every legal hold in force in ``tenant``."""
    from projections._retention import retention_holds

    query = sql_select(retention_holds.c.scope, retention_holds.c.target).where(
        retention_holds.c.tenant == tenant, retention_holds.c.released_at.is_(None))
    with mw.store.engine.connect() as conn:
        return [(scope, target) for scope, target in conn.execute(query)]


def _age(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:.1f} hours" if hours < 48 else f"{hours / 24:.1f} days"
