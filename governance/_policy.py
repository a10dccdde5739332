"""The one enforcement point: every surface asks ``AccessPolicy`` before it acts.

    policy = AccessPolicy.open(store)
    policy.require(principal, "memory.read_content", Resource.of_memory(state))

How a decision is made
  1. Casbin evaluates ``policies/model.conf`` over the rules in force: RBAC with domains (the
     tenant) plus the memory's relation to the subject (``own``, ``shared``, ``about_self``).
  2. Reading the content of a memory with a restricted label (``sensitive``) also needs
     ``memory.read_sensitive`` on it: the one step outside the model, as it joins two permissions.
  Whatever no rule allows is denied.

Every denial is appended as an ``AccessDenied`` event before ``check`` returns: who (subject,
role, key), what (action, resource kind and id), which step denied it and why; never content. A
request that reached into another tenant is recorded at platform level (no tenant), so neither
tenant's audit trail tells it anything about the other.

Rules live in the ``policy_rules`` table, which Casbin's SQLAlchemy adapter loads. It is written
only by the transaction that appends the PolicyRuleAdded/Removed event changing it, so rules and
log cannot disagree. The ``policy`` stream's version is the policy's revision: each decision reads
it first (one indexed query) and reloads the rules if it moved, so a change made in any process
applies to the next request in every process.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import casbin
from casbin.util import SimpleEval
from sqlalchemy import Connection
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy_adapter import Adapter

from eventstore import (
    ANY_VERSION,
    ConcurrencyError,
    EventContext,
    EventStore,
    NewEvent,
    StoredEvent,
)
from governance._errors import InvalidCommand, MemWardenError, NotFound, StateConflict
from governance._principal import (
    ACTIONS,
    PLATFORM,
    Asker,
    Principal,
    Relation,
    Resource,
    validate_action,
    validate_role,
    validate_scope,
    validate_tenant,
)
from projections._policy import (
    ACCESS_DENIED,
    POLICY_RULE_ADDED,
    POLICY_RULE_REMOVED,
    POLICY_STREAM,
    apply_policy_events,
    clear_rules,
    metadata,
    policy_rules,
    rule_in_force,
)

POLICIES = Path(__file__).resolve().parent.parent / "policies"
MODEL_PATH = POLICIES / "model.conf"
DEFAULT_POLICY_PATH = POLICIES / "policy.csv"
SEED_ACTOR = "memwarden"

READ_CONTENT = "memory.read_content"
READ_SENSITIVE = "memory.read_sensitive"
_NEEDS_CLEARANCE_IF_RESTRICTED = frozenset({"memory.read_content"})
_DECISIONS_CACHED = 8192

OTHER_TENANT = "other_tenant"
NO_RULE = "no_rule"
RESTRICTED_LABEL = "restricted_label"
ESCALATION = "escalation"

# The matcher only ORs these flags, so a role allowed less than another under each of them is
# allowed less under every combination.
_EACH_RELATION = (Relation(False, False, False), Relation(True, False, False),
                  Relation(False, True, False), Relation(False, False, True))

AfterAppend = Callable[[Connection, list[StoredEvent]], None]
"""Runs inside an append's transaction (the embedded mode projects there)."""


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """``p, role, tenant, action, scope`` or ``g, role, inherited_role, tenant``; ``*``: every
    tenant. Every field is checked, so no rule can smuggle Casbin or CSV syntax into storage."""

    ptype: str
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.values, tuple):
            raise InvalidCommand("rule values must be a tuple of strings")
        if self.ptype == "p" and len(self.values) == 4:
            role, tenant, action, scope = self.values
            validate_role(role)
            validate_tenant(tenant, platform_allowed=True)
            validate_action(action)
            validate_scope(scope)
        elif self.ptype == "g" and len(self.values) == 3:
            role, inherited, tenant = self.values
            validate_role(role)
            validate_role(inherited)
            validate_tenant(tenant, platform_allowed=True)
            if role == inherited:
                raise InvalidCommand(f"role {role!r} cannot inherit itself")
        else:
            raise InvalidCommand("a rule is either 'p, role, tenant, action, scope' or "
                                 f"'g, role, inherited_role, tenant'; got {self.fields()!r}")

    @classmethod
    def permission(cls, role: str, tenant: str, action: str, scope: str) -> PolicyRule:
        return cls("p", (role, tenant, action, scope))

    @classmethod
    def inheritance(cls, role: str, inherited_role: str, tenant: str) -> PolicyRule:
        return cls("g", (role, inherited_role, tenant))

    @classmethod
    def parse(cls, fields: Sequence[Any]) -> PolicyRule:
        """From ``[ptype, value, ...]`` as a CLI or a JSON body gives it; nothing is trimmed."""
        if isinstance(fields, str) or not fields:
            raise InvalidCommand("a rule is a list: ptype (p or g) and its values")
        return cls(fields[0], tuple(fields[1:]))

    @property
    def tenant(self) -> str:
        return self.values[1] if self.ptype == "p" else self.values[2]

    def fields(self) -> list[str]:
        return [self.ptype, *self.values]

    def __str__(self) -> str:
        return ", ".join(self.fields())


def read_policy_file(path: Path) -> list[PolicyRule]:
    """Rules from a Casbin policy CSV; blank lines and ``#`` comments are skipped."""
    rules = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            rules.append(PolicyRule.parse([field.strip() for field in line.split(",")]))
    return rules


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    principal: Principal
    action: str
    resource: Resource
    revision: int
    """The policy revision (``policy`` stream version) it was decided under."""
    rules: tuple[tuple[str, ...], ...] = ()
    """The rules that allowed it; for a denial by label, the one that allowed the plain read."""
    denied_because: str | None = None
    """``other_tenant``, ``no_rule``, ``restricted_label`` or ``escalation``."""

    @property
    def explanation(self) -> str:
        who, what = self.principal, self.resource
        target = f"{what.kind} {what.id}" if what.id else f"{what.kind} {what.tenant}"
        if self.allowed:
            return f"allowed by {'; '.join(', '.join(rule) for rule in self.rules)}"
        if self.denied_because == OTHER_TENANT:
            # Never name the other tenant, nor the resource: the caller learns nothing of it.
            beyond = ", not in all tenants" if what.tenant == PLATFORM else ""
            return f"{who.subject} acts only in tenant {who.tenant}{beyond}"
        if self.denied_because == RESTRICTED_LABEL:
            return (f"{target} has a restricted label and no rule lets role {who.role} "
                    f"{READ_SENSITIVE} it")
        if self.denied_because == ESCALATION:
            return f"{target} may do what role {who.role} may not: no one grants more than it has"
        return f"no rule lets role {who.role} {self.action} {target}"


class PermissionDenied(MemWardenError):
    """The policy denies the request (HTTP 403; 404 where ``hides_existence``)."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        super().__init__(f"permission denied: {decision.explanation}")

    @property
    def hides_existence(self) -> bool:
        """True for a memory or subject in another tenant: answer as if it did not exist, so
        ids guessed or copied from another tenant tell nothing."""
        resource = self.decision.resource
        return (self.decision.denied_because == OTHER_TENANT and resource.id is not None
                and resource.kind in ("memory", "subject"))


class _Base(DeclarativeBase):
    pass


class _RuleRow(_Base):
    """A ``policy_rules`` row as the adapter expects it: it loads ``str(row)`` as a policy line."""

    __table__ = policy_rules

    def __str__(self) -> str:
        values = (self.ptype, self.v0, self.v1, self.v2, self.v3, self.v4, self.v5)
        return ", ".join(value for value in values if value is not None)


class _Enforcer(casbin.Enforcer):
    """pycasbin parses the matcher again for every request, half the cost of a decision; this
    keeps one parsed evaluator per thread (an evaluator holds the request it is evaluating)."""

    def __init__(self, model: casbin.Model, adapter: Adapter) -> None:
        self._evaluators = threading.local()
        super().__init__(model, adapter)
        # A rule in tenant "*" applies in every tenant (only "*": tenant names are literal).
        self.add_named_domain_matching_func("g", lambda _requested, domain: domain == PLATFORM)

    def _get_expression(self, expr: str, functions: Any = None) -> SimpleEval:
        evaluators = self._evaluators.__dict__
        if expr not in evaluators:
            evaluators[expr] = casbin.Enforcer._get_expression(expr, functions)
        return evaluators[expr]


class _RulesInForce:
    """One revision of the policy, loaded once and then only read (a change loads a new one)."""

    def __init__(self, revision: int, enforcer: _Enforcer) -> None:
        self.revision = revision
        self.rules = [PolicyRule.parse(fields) for fields in
                      [["p", *rule] for rule in enforcer.get_policy()]
                      + [["g", *rule] for rule in enforcer.get_grouping_policy()]]
        self._enforcer = enforcer
        # The model sees only (role, tenant, action, relation): few combinations, so every answer
        # is worth keeping for as long as this revision is in force.
        self.decide = functools.lru_cache(maxsize=_DECISIONS_CACHED)(self._decide)

    def _decide(self, asker: Asker, tenant: str, action: str,
                relation: Relation) -> tuple[bool, tuple[str, ...]]:
        allowed, rule = self._enforcer.enforce_ex(asker, tenant, action, relation)
        return allowed, tuple(rule)


class AccessPolicy:
    """Decides every request, records every denial, and changes rules as events."""

    def __init__(self, store: EventStore, *, then: AfterAppend | None = None) -> None:
        """Use ``open``; ``then`` runs inside each append (pass the projector's hook)."""
        self._store = store
        self._then = then
        self._model_text = MODEL_PATH.read_text(encoding="utf-8")
        self._adapter = Adapter(store.engine, db_class=_RuleRow, create_table=False)
        self._reload_lock = threading.Lock()
        self._in_force = self._load(store.stream_version(POLICY_STREAM))

    @classmethod
    def open(cls, store: EventStore, *, then: AfterAppend | None = None) -> AccessPolicy:
        """Create the rules table; on the first start, seed it from ``policies/policy.csv``."""
        with store.schema_setup() as conn:
            # Processes starting together on a fresh database would race to create the table.
            metadata.create_all(conn)
        if store.stream_version(POLICY_STREAM) == 0:
            cls._seed(store, read_policy_file(DEFAULT_POLICY_PATH), then)
        return cls(store, then=then)

    @staticmethod
    def _seed(store: EventStore, rules: list[PolicyRule], then: AfterAppend | None) -> None:
        def replace_rules(conn: Connection, stored: list[StoredEvent]) -> None:
            clear_rules(conn)
            apply_policy_events(conn, stored)
            if then is not None:
                then(conn, stored)

        reason = f"default policy {DEFAULT_POLICY_PATH.name}"
        events = [NewEvent(POLICY_RULE_ADDED, {"rule": rule.fields(), "reason": reason})
                  for rule in rules]
        with contextlib.suppress(ConcurrencyError):  # another process seeded it first
            store.append(POLICY_STREAM, events, expected_version=0,
                         context=EventContext(actor=SEED_ACTOR), then=replace_rules)

    # -- deciding ---------------------------------------------------------------------------

    def check(self, principal: Principal, action: str,
              resource: Resource | None = None) -> Decision:
        """Decide; a denial is recorded as an AccessDenied event before this returns.

        Without a resource the request is about the principal's own tenant (its audit trail,
        its rules...), or about the platform for a platform principal.
        """
        target = resource if resource is not None else Resource.of_tenant(principal.tenant)
        decision = self._decide(self._current(), principal, validate_action(action), target)
        if not decision.allowed:
            self._record_denial(decision)
        return decision

    def require(self, principal: Principal, action: str,
                resource: Resource | None = None) -> Decision:
        """``check``, raising ``PermissionDenied`` on a denial."""
        decision = self.check(principal, action, resource)
        if not decision.allowed:
            raise PermissionDenied(decision)
        return decision

    def check_grant(self, issuer: Principal, role: str, tenant: str) -> Decision:
        """May ``issuer`` issue a key for ``role`` in ``tenant`` (``*``: a platform key)?

        It needs ``key.manage`` there, and ``role`` may do nothing there that the issuer's own
        role may not; a denial is recorded like any other.
        """
        target = Resource.of_role(validate_tenant(tenant, platform_allowed=True),
                                  validate_role(role))
        in_force = self._current()
        decision = self._decide(in_force, issuer, "key.manage", target)
        if decision.allowed and self._exceeds(in_force, Asker(role, tenant), issuer.asker(),
                                              tenant):
            decision = Decision(False, issuer, "key.manage", target, in_force.revision,
                                decision.rules, ESCALATION)
        if not decision.allowed:
            self._record_denial(decision)
        return decision

    @staticmethod
    def _exceeds(in_force: _RulesInForce, granted: Asker, issuer: Asker, tenant: str) -> bool:
        return any(in_force.decide(granted, tenant, action, relation)[0]
                   and not in_force.decide(issuer, tenant, action, relation)[0]
                   for action in ACTIONS for relation in _EACH_RELATION)

    def permitted(self, principal: Principal, action: str,
                  resources: Iterable[Resource]) -> list[Resource]:
        """The resources ``action`` is allowed on, for filtering a list or search results.

        Hidden results are not recorded as denials: the principal did not ask for them.
        """
        in_force, action = self._current(), validate_action(action)
        return [resource for resource in resources
                if self._decide(in_force, principal, action, resource).allowed]

    def permitted_actions(self, principal: Principal, actions: Sequence[str],
                          resources: Sequence[Resource]) -> dict[str, list[Resource]]:
        """``permitted`` for several actions, decided by one revision of the policy: one read of
        the revision instead of one per action (search asks for two, twice per request)."""
        in_force = self._current()
        return {action: [resource for resource in resources
                         if self._decide(in_force, principal, validate_action(action),
                                         resource).allowed]
                for action in actions}

    def _decide(self, in_force: _RulesInForce, principal: Principal, action: str,
                resource: Resource) -> Decision:
        asker, relation = principal.asker(), resource.relation_to(principal)
        allowed, rule = in_force.decide(asker, resource.tenant, action, relation)
        if not allowed:
            because = NO_RULE if principal.may_act_in(resource.tenant) else OTHER_TENANT
            return Decision(False, principal, action, resource, in_force.revision,
                            denied_because=because)
        if action in _NEEDS_CLEARANCE_IF_RESTRICTED and resource.restricted:
            cleared, clearance = in_force.decide(asker, resource.tenant, READ_SENSITIVE, relation)
            if not cleared:
                return Decision(False, principal, action, resource, in_force.revision, (rule,),
                                RESTRICTED_LABEL)
            return Decision(True, principal, action, resource, in_force.revision,
                            (rule, clearance))
        return Decision(True, principal, action, resource, in_force.revision, (rule,))

    def _record_denial(self, decision: Decision) -> None:
        principal, resource = decision.principal, decision.resource
        inside = principal.may_act_in(resource.tenant) and resource.tenant != PLATFORM
        tenant = resource.tenant if inside else None
        payload: dict[str, Any] = {
            "action": decision.action,
            "role": principal.role,
            "key_id": principal.key_id,
            "resource_kind": resource.kind,
            "resource_id": resource.id,
            "denied_because": decision.denied_because,
            "reason": decision.explanation,
            "policy_revision": decision.revision,
        }
        if resource.kind == "memory" and resource.id is not None:
            payload["cube_id"] = resource.id  # so the audit trail of that memory shows it
        self._store.append(f"denials:{tenant}" if tenant else "denials",
                           [NewEvent(ACCESS_DENIED, payload)], expected_version=ANY_VERSION,
                           context=EventContext(actor=principal.subject, tenant=tenant),
                           then=self._then)

    # -- the rules --------------------------------------------------------------------------

    def known_roles(self) -> list[str]:
        """Every role some rule in force names: the roles a key can usefully be issued for."""
        roles = {rule.values[0] for rule in self._current().rules}
        roles |= {rule.values[1] for rule in self._current().rules if rule.ptype == "g"}
        return sorted(roles)

    def list_rules(self, actor: Principal) -> list[PolicyRule]:
        """The rules that apply in the actor's tenant (every rule, for a platform principal)."""
        self.require(actor, "policy.read")
        return [rule for rule in self._current().rules
                if rule.tenant == PLATFORM or actor.may_act_in(rule.tenant)]

    def add_rule(self, actor: Principal, rule: PolicyRule, *, reason: str) -> int:
        """Put ``rule`` in force; returns the new policy revision."""
        return self._change(actor, rule, POLICY_RULE_ADDED, reason)

    def remove_rule(self, actor: Principal, rule: PolicyRule, *, reason: str) -> int:
        """Take ``rule`` out of force; returns the new policy revision."""
        return self._change(actor, rule, POLICY_RULE_REMOVED, reason)

    def _change(self, actor: Principal, rule: PolicyRule, event_type: str, reason: str) -> int:
        self.require(actor, "policy.manage", Resource.of_tenant(rule.tenant))
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidCommand("a reason is required to change the access policy")

        def apply(conn: Connection, stored: list[StoredEvent]) -> None:
            # Appends are serialized, so the rules read here cannot change before this commits.
            in_force = rule_in_force(conn, rule.fields())
            if event_type == POLICY_RULE_ADDED and in_force:
                raise StateConflict(f"the rule {rule} is already in force")
            if event_type == POLICY_RULE_REMOVED and not in_force:
                raise NotFound(f"the rule {rule} is not in force")
            apply_policy_events(conn, stored)
            if self._then is not None:
                self._then(conn, stored)

        event = NewEvent(event_type, {"rule": rule.fields(), "reason": reason.strip()})
        stored = self._store.append(
            POLICY_STREAM, [event], expected_version=ANY_VERSION,
            context=EventContext(actor=actor.subject,
                                 tenant=None if rule.tenant == PLATFORM else rule.tenant),
            then=apply)
        return stored[-1].stream_version

    # -- reloading --------------------------------------------------------------------------

    def _current(self) -> _RulesInForce:
        revision = self._store.stream_version(POLICY_STREAM)
        if self._in_force.revision < revision:
            with self._reload_lock:
                if self._in_force.revision < revision:
                    self._in_force = self._load(revision)
        return self._in_force

    def _load(self, revision: int) -> _RulesInForce:
        # The revision was read before the rules: they are at least that recent, never older.
        model = casbin.Enforcer.new_model(text=self._model_text)
        return _RulesInForce(revision, _Enforcer(model, self._adapter))
