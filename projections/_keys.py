"""``api_keys``: the REST API's keys, built only from ``ApiKeyIssued`` and ``ApiKeyRevoked``.

The log, and so this table, holds the sha256 of each key, never the key itself: the secret is
shown once to whoever issued it and can be recognised afterwards but not recovered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Index,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    update,
)

from eventstore import StoredEvent, UTCDateTime
from projections._readmodels import Projection
from projections._tables import _position, metadata

API_KEY_ISSUED = "ApiKeyIssued"
API_KEY_REVOKED = "ApiKeyRevoked"

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("subject", String(200), nullable=False),
    Column("role", String(64), nullable=False),
    Column("key_hash", String(64), nullable=False),
    Column("issued_at", UTCDateTime, nullable=False),
    Column("issued_by", String(200), nullable=False),
    Column("revoked_at", UTCDateTime),
    Column("revoked_by", String(200)),
    Column("revoke_reason", Text),
    _position(),
    Index("api_keys_tenant", "tenant", "key_id"),
    Index("api_keys_position", "position"),
)


def api_key_stream(key_id: str) -> str:
    return f"apikey:{key_id}"


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key_id: str
    tenant: str
    subject: str
    role: str
    key_hash: str
    issued_at: datetime
    issued_by: str
    revoked_at: datetime | None
    revoked_by: str | None
    revoke_reason: str | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def evolve_key(record: ApiKeyRecord | None, event: StoredEvent) -> ApiKeyRecord:
    """The key after ``event``; ``record`` is None before its ``ApiKeyIssued``."""
    if event.type == API_KEY_ISSUED:
        return ApiKeyRecord(
            key_id=event.payload["key_id"], tenant=event.tenant or "",
            subject=event.payload["subject"], role=event.payload["role"],
            key_hash=event.payload["key_hash"], issued_at=event.recorded_at,
            issued_by=event.actor, revoked_at=None, revoked_by=None, revoke_reason=None)
    if event.type == API_KEY_REVOKED and record is not None:
        return replace(record, revoked_at=event.recorded_at, revoked_by=event.actor,
                       revoke_reason=event.payload.get("reason"))
    raise ValueError(f"{event.stream_id}: {event.type} does not follow from the key's history")


class ApiKeysProjection(Projection):
    name = "api_keys"
    tables = (api_keys,)

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        # Key events are rare: one statement each keeps an issue and its revocation in one batch
        # simple, and the revocation needs only the columns it changes.
        for event in events:
            if event.type == API_KEY_ISSUED:
                record = evolve_key(None, event)
                conn.execute(insert(api_keys).values(
                    **{name: getattr(record, name) for name in _COLUMNS},
                    position=event.position))
            elif event.type == API_KEY_REVOKED:
                conn.execute(update(api_keys).where(
                    api_keys.c.key_id == event.payload["key_id"]).values(
                    revoked_at=event.recorded_at, revoked_by=event.actor,
                    revoke_reason=event.payload.get("reason"), position=event.position))


class ApiKeyQueries:
    def __init__(self, engine: Engine):
        self.engine = engine

    def find(self, key_id: str) -> ApiKeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(api_keys).where(api_keys.c.key_id == key_id)).mappings().first()
        return _record(row) if row else None

    def list(self, *, tenant: str | None = None,
             include_revoked: bool = False) -> list[ApiKeyRecord]:
        query = select(api_keys).order_by(api_keys.c.tenant, api_keys.c.key_id)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query).mappings()]

    def last_change(self) -> int:
        """The position of the latest key event applied here: it moves whenever a key is issued
        or revoked, so a cache of keys is valid exactly while it stands still."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.max(api_keys.c.position), 0)))
                       .scalar_one())

    def any_active(self, *, role: str) -> bool:
        query = select(api_keys.c.key_id).where(
            api_keys.c.role == role, api_keys.c.revoked_at.is_(None)).limit(1)
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None


_COLUMNS = tuple(ApiKeyRecord.__dataclass_fields__)


def _record(row: Mapping[str, Any]) -> ApiKeyRecord:
    return ApiKeyRecord(**{name: row[name] for name in _COLUMNS})
