"""API keys: who is calling (authentication); the access policy decides what they may do.

A key is ``mwk_<key id>_<secret>``. Issuing one appends ``ApiKeyIssued`` with the sha256 of the
whole key (never the key); revoking appends ``ApiKeyRevoked``. Keys are random 256-bit secrets,
so a plain sha256 cannot be brute-forced and a slow password hash would only cost latency.
Presented keys are found by id and compared by hash in constant time.

Each key carries a tenant (``*`` for all tenants), a subject (recorded as the actor of every
event the key causes) and a role: together a ``Principal``. Issuing a key needs ``key.manage``
in its tenant, and no one may issue a key that could do more than their own
(``AccessPolicy.check_grant``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from eventstore import ConcurrencyError, EventContext, NewEvent
from governance._errors import InvalidCommand, MemWardenError, NotFound, StateConflict
from governance._memcube import _required_reason
from governance._policy import PermissionDenied
from governance._principal import PLATFORM, Principal, Resource, validate_role
from projections import (
    API_KEY_ISSUED,
    API_KEY_REVOKED,
    ApiKeyQueries,
    ApiKeyRecord,
    api_key_stream,
    evolve_key,
)

if TYPE_CHECKING:
    from governance._sdk import MemWarden

ALL_TENANTS = PLATFORM
_PREFIX = "mwk"


class Unauthenticated(MemWardenError):
    """No key, an unknown key, or a revoked one (HTTP 401)."""


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
        Principal(subject, tenant, validate_role(role))  # every name plain, or InvalidCommand
        known = self._memwarden.policy.known_roles()
        if role not in known:
            raise InvalidCommand(f"role must be one of {', '.join(known)}; got {role!r}")
        if (role == "admin") != (tenant == ALL_TENANTS):
            raise InvalidCommand("the admin role, and only it, acts in all tenants "
                                 f"(tenant {ALL_TENANTS!r})")
        decision = self._memwarden.policy.check_grant(self._memwarden.principal, role, tenant)
        if not decision.allowed:
            raise PermissionDenied(decision)
        key_id = secrets.token_hex(8)
        secret = f"{_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        event = NewEvent(API_KEY_ISSUED, {"key_id": key_id, "subject": subject, "role": role,
                                          "key_hash": _hash(secret)})
        return IssuedKey(self._append(None, key_id, tenant, event, expected_version=0), secret)

    def revoke(self, key_id: str, *, reason: str | None) -> ApiKeyRecord:
        why = _required_reason(reason, "revoke a key")
        record = self.get(key_id)
        if not self._memwarden.principal.may_act_in(record.tenant):
            raise NotFound(f"no API key with id {key_id!r}")  # another tenant's: say no more
        self._memwarden.require("key.manage", Resource.of_tenant(record.tenant))
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
        """The keys of ``tenant`` (default: the principal's own; every tenant's for a platform
        principal)."""
        tenant = self._memwarden.tenant_scope("key.manage", tenant)
        return self._queries.list(tenant=tenant, include_revoked=include_revoked)

    def last_change(self) -> int:
        """Moves whenever any key is issued or revoked (see ``ApiKeyQueries.last_change``)."""
        return self._queries.last_change()

    def has_active_admin(self) -> bool:
        return self._queries.any_active(role="admin")

    def authenticate(self, key: str) -> Principal:
        return authenticate(self._memwarden.store.engine, key)

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


def authenticate(engine: Engine, key: str) -> Principal:
    """The principal of an active ``key``, or ``Unauthenticated``."""
    prefix, _, rest = key.partition("_")
    key_id, _, _ = rest.partition("_")
    record = ApiKeyQueries(engine).find(key_id) if prefix == _PREFIX and key_id else None
    if record is None or not hmac.compare_digest(record.key_hash, _hash(key)):
        raise Unauthenticated("the API key is not valid")
    if not record.active:
        raise Unauthenticated(f"the API key {key_id} was revoked")
    return Principal(record.subject, record.tenant, record.role, record.key_id)


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
