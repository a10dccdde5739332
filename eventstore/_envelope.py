"""The event envelope and its hash.

A stored event is immutable: its ``hash`` is the sha256 of the canonical JSON of every other
envelope field plus the previous event's hash, so changing any byte of any stored event, or
removing one, breaks the chain at that point (see ``verify``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

GENESIS_HASH = "0" * 64


def utcnow() -> datetime:
    return datetime.now(UTC)


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class EventContext:
    """Who did it and why: shared by every event one command appends."""

    actor: str
    tenant: str | None = None
    on_behalf_of: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event the domain wants appended; the store assigns versions, position and hash."""

    type: str
    payload: Mapping[str, Any]
    schema_version: int = 1
    occurred_at: datetime = field(default_factory=utcnow)
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One row of the log, exactly as committed (after upcasting when read through a store)."""

    position: int
    event_id: uuid.UUID
    stream_id: str
    stream_version: int
    type: str
    schema_version: int
    occurred_at: datetime
    recorded_at: datetime
    tenant: str | None
    actor: str
    on_behalf_of: str | None
    correlation_id: str | None
    causation_id: str | None
    payload: Mapping[str, Any]
    prev_hash: str
    hash: str


def _timestamp(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("event timestamps must be timezone-aware")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def event_hash(
    *,
    position: int,
    event_id: uuid.UUID | str,
    stream_id: str,
    stream_version: int,
    type: str,
    schema_version: int,
    occurred_at: datetime,
    recorded_at: datetime,
    tenant: str | None,
    actor: str,
    on_behalf_of: str | None,
    correlation_id: str | None,
    causation_id: str | None,
    payload_json: str,
    prev_hash: str,
) -> str:
    """sha256 over the canonical envelope; ``payload_json`` is the payload exactly as stored."""
    envelope = {
        "position": position,
        "event_id": str(event_id),
        "stream_id": stream_id,
        "stream_version": stream_version,
        "type": type,
        "schema_version": schema_version,
        "occurred_at": _timestamp(occurred_at),
        "recorded_at": _timestamp(recorded_at),
        "tenant": tenant,
        "actor": actor,
        "on_behalf_of": on_behalf_of,
        "correlation_id": correlation_id,
        "causation_id": causation_id,
        "payload": payload_json,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(envelope).encode()).hexdigest()
