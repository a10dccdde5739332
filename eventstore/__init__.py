"""The MemWarden event log: immutable, ordered, hash-chained events in SQLite or PostgreSQL.

This package imports nothing from the rest of MemWarden.
"""

from eventstore._codec import PayloadCodec
from eventstore._envelope import (
    GENESIS_HASH,
    EventContext,
    NewEvent,
    StoredEvent,
    canonical_json,
    utcnow,
)
from eventstore._errors import (
    BackendError,
    ConcurrencyError,
    EventStoreError,
    IntegrityError,
    TransientConflict,
    UpcastError,
)
from eventstore._schema import UTCDateTime
from eventstore._store import (
    ANY_VERSION,
    ChainBreak,
    EventStore,
    StreamAppend,
    VerificationReport,
)
from eventstore._upcasting import Upcaster, Upcasters

__all__ = [
    "ANY_VERSION",
    "GENESIS_HASH",
    "BackendError",
    "ChainBreak",
    "ConcurrencyError",
    "EventContext",
    "EventStore",
    "EventStoreError",
    "IntegrityError",
    "NewEvent",
    "PayloadCodec",
    "StoredEvent",
    "StreamAppend",
    "TransientConflict",
    "UTCDateTime",
    "UpcastError",
    "Upcaster",
    "Upcasters",
    "VerificationReport",
    "canonical_json",
    "utcnow",
]
