"""The event envelope and its hash.

A stored event is immutable: its ``hash`` is the sha256 of the canonical JSON of every other
envelope field plus the previous event's hash, so changing any byte of any stored event, or
removing one, breaks the chain at that point (see ``verify``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

GENESIS_HASH = "0" * 64


def utcnow() -> datetime:
    return datetime.now(UTC)


def uuid7() -> uuid.UUID:
    """A version 7 UUID (RFC 9562): 48 bits of Unix time in milliseconds, the version and
    variant, then 74 random bits.

    New events take these as ids (and new memory keys, see ``governance._keyvault``) rather
    than random version 4 ones: ids made one after another sort in time order, so a batch's
    land together at the end of the unique index on them, where random ones scatter over all
    of its pages, and every page an append touches is written to the WAL at its commit (at
    10^5 memories, a batch of 1,000 new ones wrote ~4,500 pages with random ids, ~3,000
    without). The time they carry is no secret: the event records when it occurred.
    Uniqueness rests on the 74 random bits, as a version 4's does on 122.
    """
    milliseconds = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10))
    return uuid.UUID(int=(milliseconds & _MILLISECONDS) << 80 | 0x7 << 76
                     | (rand >> 68) << 64 | 0b10 << 62 | rand & _LOW_62_BITS)


_MILLISECONDS = (1 << 48) - 1
_LOW_62_BITS = (1 << 62) - 1


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# Every append hashes each event and every projected row encodes a few fields: ``json.dumps``
# with options builds a new encoder per call, which costs as much as the encoding. The C encoder
# behind ``JSONEncoder.encode`` is built once here instead, with the same options (so the same
# bytes); without cycle detection, which JSON from the domain does not need.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_encode_chunks = _c_make_encoder and _c_make_encoder(
    None, _CANONICAL.default, json.encoder.encode_basestring, None, ":", ",", True, False, True)


try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - a declared dependency; json does the same, slower
    _orjson = None


def parse_json(text: str) -> Any:
    """``json.loads``, about four times faster: reads parse every stored payload (a rebuild,
    the whole log). orjson refuses what Python's encoder may write and it may not read (NaN,
    integers past 64 bits): those fall back to ``json.loads``, so the result never differs."""
    if _orjson is not None:
        try:
            return _orjson.loads(text)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(text)


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, UTF-8 kept as is."""
    if _encode_chunks is not None and isinstance(value, dict | list):
        return "".join(_encode_chunks(value, 0))
    return _CANONICAL.encode(value)


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
    event_id: uuid.UUID = field(default_factory=uuid7)


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

    def with_payload(self, payload: Mapping[str, Any]) -> StoredEvent:
        """The same event with another payload (its decoded or upcast form): what
        ``dataclasses.replace`` does, several times faster, for codecs that decode every event
        of a rebuild."""
        return StoredEvent(
            self.position, self.event_id, self.stream_id, self.stream_version, self.type,
            self.schema_version, self.occurred_at, self.recorded_at, self.tenant, self.actor,
            self.on_behalf_of, self.correlation_id, self.causation_id, payload, self.prev_hash,
            self.hash)


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
    return envelope_hash(
        position, str(event_id), stream_id, stream_version, type, schema_version,
        _timestamp(occurred_at), _timestamp(recorded_at), tenant, actor, on_behalf_of,
        correlation_id, causation_id, payload_json, prev_hash)


def envelope_hash(position: int, event_id: str, stream_id: str, stream_version: int, type: str,
                  schema_version: int, occurred_at: str, recorded_at: str, tenant: str | None,
                  actor: str, on_behalf_of: str | None, correlation_id: str | None,
                  causation_id: str | None, payload_json: str, prev_hash: str) -> str:
    """``event_hash`` with the id and timestamps already spelled (``str(event_id)``,
    ``hashed_timestamp``): an append spells each once for its row and its hash, and every event
    of an append shares its ``recorded_at``.

    The JSON is ``canonical_json`` of the envelope dictionary, the same bytes, written without
    building the dictionary (its keys are fixed, so their sorted order is too): the append path
    hashes every event, and the dictionary cost a third of it. ``test_eventstore`` checks both
    spellings agree."""
    return hashlib.sha256((
        f'{{"actor":{_json_string(actor)},"causation_id":{_json_string(causation_id)},'
        f'"correlation_id":{_json_string(correlation_id)},"event_id":{_string(event_id)},'
        f'"occurred_at":{_string(occurred_at)},"on_behalf_of":{_json_string(on_behalf_of)},'
        f'"payload":{_string(payload_json)},"position":{_json_int(position)},'
        f'"prev_hash":{_json_string(prev_hash)},"recorded_at":{_string(recorded_at)},'
        f'"schema_version":{_json_int(schema_version)},"stream_id":{_json_string(stream_id)},'
        f'"stream_version":{_json_int(stream_version)},"tenant":{_json_string(tenant)},'
        f'"type":{_json_string(type)}}}'
    ).encode()).hexdigest()


hashed_timestamp = _timestamp
"""How the hash spells a timestamp: UTC, ISO 8601 with microseconds."""

_string = json.encoder.encode_basestring  # what the canonical encoder writes for a str


def _json_string(value: str | None) -> str:
    return "null" if value is None else _string(value)


def _json_int(value: int) -> str:
    if type(value) is not int:  # a bool, or an int subclass: whatever the encoder writes
        return canonical_json(value)
    return int.__repr__(value)
