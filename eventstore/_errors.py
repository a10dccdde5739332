"""Errors raised by the event store, the same whatever the backend.

    EventStoreError
    ├── ConcurrencyError      an append's expected_version is stale (HTTP 409)
    ├── IntegrityError        the database refused a write that breaks a uniqueness rule
    ├── UpcastError           a stored event cannot be brought to the current schema
    └── BackendError          the database failed or cannot be reached
        └── TransientConflict the database aborted a transaction to break a deadlock or a
                              serialization conflict: running it again is safe
"""

from __future__ import annotations


class EventStoreError(Exception):
    """Base class of every error the event store raises."""


class ConcurrencyError(EventStoreError):
    """Another writer appended to the stream since the caller read it."""

    def __init__(self, stream_id: str, expected_version: int | None, actual_version: int) -> None:
        self.stream_id = stream_id
        self.expected_version = expected_version
        self.actual_version = actual_version
        super().__init__(
            f"stream {stream_id!r} is at version {actual_version}, "
            f"but the append expected version {expected_version}"
        )


class IntegrityError(EventStoreError):
    """The database refused a write that breaks a uniqueness rule, e.g. an event_id that is
    already in the log."""


class UpcastError(EventStoreError):
    """No upcaster chain leads from a stored event's schema version to the current one."""


class BackendError(EventStoreError):
    """The database reported an error the store cannot translate into anything more specific."""


class TransientConflict(BackendError):
    """The database aborted the transaction to resolve a conflict with another one (PostgreSQL's
    deadlock detected, 40P01, or serialization failure, 40001). Nothing of it was committed:
    running the same transaction again is safe and will usually succeed."""


TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})
