"""Who asks, to do what, to what: the vocabulary of access decisions.

A ``Principal`` is what an API key resolves to: a subject acting under one role in one tenant
(``*``: a platform principal, such as the bootstrap admin). A ``Resource`` is what a request acts
on, described by the attributes the policy looks at. Actions and scopes are closed vocabularies:
a request or a rule naming anything else is refused.

Names that decide access (subjects, tenants, roles) must be plain: NFKC-normal, letters and
digits of a single script plus ``- _ . : @ +``. The policy compares them literally, so a crafted
name cannot match more than itself; the rule exists so that a look-alike (``admin`` spelt with a
Cyrillic a, or in fullwidth letters) can never be mistaken for the real one by the person who
grants it a role, and so that no name can carry Casbin or CSV syntax into a stored rule.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from governance._errors import InvalidCommand
from projections import MemoryState

PLATFORM = "*"
"""As a principal's tenant: acts in every tenant. As a rule's tenant: applies in every tenant."""

ACTIONS = {
    "memory.create": "add a memory",
    "memory.read_metadata": "see that a memory exists, with its metadata, never its text",
    "memory.read_content": "read a memory's text (get, search hits, versions, diffs, time travel)",
    "memory.read_sensitive": "read content labelled sensitive, and unmasked personal data",
    "memory.update": "change a memory's text or metadata",
    "memory.delete": "delete a memory (soft: it can be restored)",
    "memory.restore": "undo a deletion",
    "memory.rollback": "make an earlier version current again",
    "memory.history": "list a memory's versions: who, when, why (text needs read_content)",
    "audit.read": "read the audit trail (metadata, never content)",
    "integrity.verify": "recompute the log's hash chain",
    "subject.export": "export everything held about a data subject",
    "subject.request_erasure": "ask for a data subject's erasure",
    "subject.erase": "erase a data subject (crypto-shredding)",
    "retention.manage": "run retention, place and release legal holds",
    "retention.read": "see the retention rules, the retention report and the legal holds",
    "memory.recall": "read back a cold-archived memory (recorded; it returns to the working tier)",
    "artifact.convert": "distil memories into a LoRA adapter or KV cache; fall back to plaintext",
    "artifact.load": "load an adapter or KV cache into a model (also needs read_content on every "
                     "source)",
    "lineage.read": "see what an artifact is made of and what was made from a memory (no content)",
    "policy.read": "list the access rules",
    "policy.manage": "add and remove access rules",
    "key.manage": "issue and revoke API keys",
    "platform.operate": "rebuild read models and other whole-platform maintenance",
    "bundle.export": "export a tenant's memories, with their history, as a signed bundle",
    "bundle.import": "import a signed bundle's memories into a tenant",
}

SCOPES = {
    "any": "every resource in the tenant",
    "own": "memories the subject created",
    "shared": "memories shared with the subject",
    "about_self": "memories about the subject (its owner), and the subject itself",
}

ROLES = ("admin", "tenant_admin", "compliance_officer", "auditor", "agent", "data_subject")
"""The roles of the default policy; a rule may name others (``^[a-z][a-z0-9_]*$``)."""

RESTRICTED_LABELS = frozenset({"sensitive"})
"""Labels whose content also needs ``memory.read_sensitive`` (compared case-insensitively)."""

RESOURCE_KINDS = ("tenant", "memory", "subject", "role")

_MAX_NAME = 200
_SEPARATORS = frozenset("-_.:@+")
_ROLE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _script(ch: str) -> str:
    """A letter's script: the first word of its Unicode name (LATIN, CYRILLIC, GREEK...)."""
    return unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]


def name_problem(value: Any) -> str | None:
    """Why ``value`` is not a plain name, or None if it is one."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > _MAX_NAME:
        return f"must be at most {_MAX_NAME} characters"
    if unicodedata.normalize("NFKC", value) != value:
        return "must be in Unicode normal form NFKC (no compatibility or look-alike forms)"
    if not value[0].isalnum():
        return "must start with a letter or digit"
    scripts = set()
    for ch in value:
        category = unicodedata.category(ch)
        if category.startswith("L") or (category == "Nd" and not ch.isascii()):
            scripts.add(_script(ch))  # a non-ASCII digit can pass for an ASCII one, too
        elif category != "Nd" and ch not in _SEPARATORS:
            return f"must contain only letters, digits and {''.join(sorted(_SEPARATORS))}"
    if len(scripts) > 1:
        return f"must not mix scripts ({', '.join(sorted(scripts))})"
    return None


def validate_name(field_name: str, value: Any) -> str:
    problem = name_problem(value)
    if problem:
        raise InvalidCommand(f"{field_name} {problem}; got {value!r}")
    return str(value)


def validate_tenant(value: Any, *, platform_allowed: bool) -> str:
    if value == PLATFORM and platform_allowed:
        return PLATFORM
    return validate_name("tenant", value)


def validate_role(value: Any) -> str:
    if not isinstance(value, str) or not _ROLE.fullmatch(value):
        raise InvalidCommand(f"a role is lowercase ASCII letters, digits and _; got {value!r}")
    return value


def validate_action(value: Any) -> str:
    if not isinstance(value, str) or value not in ACTIONS:
        raise InvalidCommand(f"unknown action {value!r}; known: {', '.join(ACTIONS)}")
    return str(value)


def validate_scope(value: Any) -> str:
    if not isinstance(value, str) or value not in SCOPES:
        raise InvalidCommand(f"unknown scope {value!r}; known: {', '.join(SCOPES)}")
    return str(value)


def is_restricted_label(label: str) -> bool:
    """Fail closed: a label that is not a plain name might be a disguised ``sensitive``, and so
    might one that differs from it only in case or accents (``Sensitive``, ``SENSİTİVE``)."""
    if name_problem(label) is not None:
        return True
    decomposed = unicodedata.normalize("NFKD", label.casefold())
    skeleton = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return skeleton in RESTRICTED_LABELS


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated subject acting under one role in one tenant (``*``: every tenant)."""

    subject: str
    tenant: str
    role: str
    key_id: str | None = None
    """The API key used, recorded with denials; never used to decide."""

    def __post_init__(self) -> None:
        validate_name("subject", self.subject)
        validate_tenant(self.tenant, platform_allowed=True)
        validate_role(self.role)

    @property
    def is_platform(self) -> bool:
        return self.tenant == PLATFORM

    def may_act_in(self, tenant: str) -> bool:
        return self.is_platform or self.tenant == tenant

    def asker(self) -> Asker:
        return Asker(self.role, self.tenant)


class Asker(NamedTuple):
    """Who asks, as the model sees it: the subject itself matters only through a ``Relation``."""

    role: str
    tenant: str


@dataclass(frozen=True, slots=True)
class Resource:
    """What a request acts on: where it lives, and the attributes that relate it to people.

    Attributes come from stored data and are compared literally. ``id`` names the resource in
    AccessDenied events and is never used to decide.
    """

    tenant: str
    kind: str = "tenant"
    id: str | None = None
    owner: str = ""
    """The data subject the resource is about."""
    created_by: str = ""
    labels: frozenset[str] = field(default_factory=frozenset)
    shared_with: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.kind not in RESOURCE_KINDS:
            raise ValueError(f"resource kind must be one of {RESOURCE_KINDS}; got {self.kind!r}")

    @classmethod
    def of_tenant(cls, tenant: str) -> Resource:
        """The tenant itself: its audit trail, rules, keys, integrity (``*``: the platform)."""
        return cls(tenant)

    @classmethod
    def of_memory(cls, state: MemoryState) -> Resource:
        shared_with = state.metadata.get("shared_with", ())
        if not isinstance(shared_with, list | tuple):
            shared_with = ()  # a lone string would be a set of letters, each "shared with" one
        return cls(state.tenant, "memory", state.cube_id, owner=state.owner,
                   created_by=state.created_by, labels=frozenset(state.labels),
                   shared_with=frozenset(shared_with))

    @classmethod
    def new_memory(cls, tenant: str, *, owner: str, created_by: str,
                   labels: Iterable[str] = ()) -> Resource:
        """A memory about to be created (``memory.create``)."""
        return cls(tenant, "memory", owner=owner, created_by=created_by, labels=frozenset(labels))

    @classmethod
    def of_subject(cls, tenant: str, subject: str) -> Resource:
        """A data subject, for export and erasure: ``about_self`` when it is the principal."""
        return cls(tenant, "subject", subject, owner=subject)

    @classmethod
    def of_role(cls, tenant: str, role: str) -> Resource:
        """A role to be granted, by issuing a key for it (``AccessPolicy.check_grant``)."""
        return cls(tenant, "role", role)

    @property
    def restricted(self) -> bool:
        return any(is_restricted_label(label) for label in self.labels)

    def relation_to(self, principal: Principal) -> Relation:
        return Relation(own=self.created_by == principal.subject,
                        shared=principal.subject in self.shared_with,
                        about_self=self.owner == principal.subject)


class Relation(NamedTuple):
    """How a resource relates to the subject asking: all the model needs to know about it."""

    own: bool
    """The subject created the memory."""
    shared: bool
    """The memory is shared with the subject."""
    about_self: bool
    """The subject is the memory's owner (the data subject it is about), or the subject itself."""
