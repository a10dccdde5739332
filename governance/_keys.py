"""API keys: who is calling (authentication) and, until the Casbin policy lands, what they may do.

A key is ``mwk_<key id>_<secret>``. Issuing one appends ``ApiKeyIssued`` with the sha256 of the
whole key (never the key); revoking appends ``ApiKeyRevoked``. Keys are random 256-bit secrets,
so a plain sha256 cannot be brute-forced and a slow password hash would only cost latency.
Presented keys are found by id and compared by hash in constant time.

Each key carries a tenant (``*`` for all tenants, admin keys only), a subject (recorded as the
actor of every event the key causes) and a role. ``authorize`` is the one enforcement point.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from eventstore import ConcurrencyError, EventContext, NewEvent
from governance._errors import InvalidCommand, MemWardenError, NotFound, StateConflict
from governance._memcube import _required_reason, validate_identifier
from governance._sdk import MemWarden
from projections import (
    API_KEY_ISSUED,
    API_KEY_REVOKED,
    ApiKeyQueries,
    ApiKeyRecord,
    api_key_stream,
    evolve_key,
)

ALL_TENANTS = "*"
_PREFIX = "mwk"

# Actions, named as in the access policy (DESIGN.md section 4) so the Casbin enforcer can take
# over ``authorize`` without the routes changing; what each phrase says is what a denial says.
ACTIONS = {
    "memory.create": "add memories",
    "memory.read_content": "read memories",
    "memory.update": "change memories",
    "memory.delete": "delete memories",
    "memory.restore": "restore memories",
    "memory.rollback": "roll memories back",
    "audit.read": "read the audit trail",
    "integrity.verify": "verify the log",
    "key.manage": "issue or revoke API keys",
}
_MEMORY_WORK = {"memory.create", "memory.read_content", "memory.update", "memory.delete",
                "memory.restore", "memory.rollback"}
_ROLE_ACTIONS: dict[str, set[str]] = {
    "admin": set(ACTIONS),
    "tenant_admin": set(ACTIONS),
    "compliance_officer": (_MEMORY_WORK - {"memory.create"}) | {"audit.read",
                                                                "integrity.verify"},
    "agent": _MEMORY_WORK,
    "auditor": {"audit.read", "integrity.verify"},
}
ROLES = tuple(_ROLE_ACTIONS)


class Unauthenticated(MemWardenError):
    """No key, an unknown key, or a revoked one (HTTP 401)."""


class Forbidden(MemWardenError):
    """The key is valid but may not do this (HTTP 403)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller behind a request: a subject under one role in one tenant."""

    subject: str
    tenant: str
    role: str
    key_id: str


def authorize(principal: Principal, action: str, tenant: str | None) -> None:
    """Allow ``action`` on ``tenant`` (``*``: across all tenants; None: no tenant's data) or raise.

    The Casbin policy replaces this function; every surface calls it before acting.
    """
    if action not in _ROLE_ACTIONS.get(principal.role, ()):
        raise Forbidden(f"a key with role {principal.role!r} may not {ACTIONS[action]}")
    if tenant is not None and principal.tenant not in (ALL_TENANTS, tenant):
        scope = "all tenants" if tenant == ALL_TENANTS else f"tenant {tenant!r}"
        raise Forbidden(f"this key acts only in tenant {principal.tenant!r}, not in {scope}")


@dataclass(frozen=True, slots=True)
class IssuedKey:
    record: ApiKeyRecord
    secret: str
    """The key itself: show it once; only its hash is kept."""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """Issue, revoke, list and check API keys; issuing and revoking act as ``memwarden.actor``.

    Commands decide from the key's own stream, the source of truth; ``list`` and
    ``authenticate`` read the ``api_keys`` projection.
    """

    def __init__(self, memwarden: MemWarden):
        self._memwarden = memwarden
        self._queries = ApiKeyQueries(memwarden.store.engine)

    def issue(self, *, tenant: str, subject: str, role: str) -> IssuedKey:
        validate_identifier("tenant", tenant)
        validate_identifier("subject", subject)
        if role not in _ROLE_ACTIONS:
            raise InvalidCommand(f"role must be one of {', '.join(ROLES)}; got {role!r}")
        if (role == "admin") != (tenant == ALL_TENANTS):
            raise InvalidCommand("the admin role, and only it, acts in all tenants "
                                 f"(tenant {ALL_TENANTS!r})")
        key_id = secrets.token_hex(8)
        secret = f"{_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        event = NewEvent(API_KEY_ISSUED, {"key_id": key_id, "subject": subject, "role": role,
                                          "key_hash": _hash(secret)})
        return IssuedKey(self._append(None, key_id, tenant, event, expected_version=0), secret)

    def revoke(self, key_id: str, *, reason: str | None) -> ApiKeyRecord:
        why = _required_reason(reason, "revoke a key")
        record = self.get(key_id)
        if not record.active:
            raise StateConflict(f"key {key_id} was already revoked at {record.revoked_at}")
        event = NewEvent(API_KEY_REVOKED, {"key_id": key_id, "reason": why})
        # An active key's stream holds one event, its ApiKeyIssued.
        return self._append(record, key_id, record.tenant, event, expected_version=1)

    def get(self, key_id: str) -> ApiKeyRecord:
        record = None
        for event in self._memwarden.store.read_stream(api_key_stream(key_id)):
            record = evolve_key(record, event)
        if record is None:
            raise NotFound(f"no API key with id {key_id!r}")
        return record

    def list(self, *, tenant: str | None = None,
             include_revoked: bool = False) -> list[ApiKeyRecord]:
        return self._queries.list(tenant=tenant, include_revoked=include_revoked)

    def last_change(self) -> int:
        """Moves whenever any key is issued or revoked (see ``ApiKeyQueries.last_change``)."""
        return self._queries.last_change()

    def has_active_admin(self) -> bool:
        return self._queries.any_active(role="admin")

    def authenticate(self, key: str) -> Principal:
        prefix, _, rest = key.partition("_")
        key_id, _, _ = rest.partition("_")
        record = self._queries.find(key_id) if prefix == _PREFIX and key_id else None
        if record is None or not hmac.compare_digest(record.key_hash, _hash(key)):
            raise Unauthenticated("the API key is not valid")
        if not record.active:
            raise Unauthenticated(f"the API key {key_id} was revoked")
        return Principal(record.subject, record.tenant, record.role, record.key_id)

    def _append(self, record: ApiKeyRecord | None, key_id: str, tenant: str, event: NewEvent,
                *, expected_version: int) -> ApiKeyRecord:
        mw = self._memwarden
        context = EventContext(actor=mw.actor, tenant=tenant, on_behalf_of=mw.on_behalf_of,
                               correlation_id=str(uuid.uuid4()))
        try:
            stored = mw.store.append(api_key_stream(key_id), [event],
                                     expected_version=expected_version, context=context,
                                     then=mw.projector.project_new_events)
        except ConcurrencyError:
            raise StateConflict(f"key {key_id} was changed at the same time; look again") from None
        return evolve_key(record, stored[0])


def key_as_dict(record: ApiKeyRecord) -> dict[str, Any]:
    """A key as plain JSON-ready data, never its hash (the CLI's --json and the REST API)."""
    return {
        "id": record.key_id,
        "tenant": record.tenant,
        "subject": record.subject,
        "role": record.role,
        "active": record.active,
        "issued_at": record.issued_at.isoformat(),
        "issued_by": record.issued_by,
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
        "revoked_by": record.revoked_by,
        "revoke_reason": record.revoke_reason,
    }
