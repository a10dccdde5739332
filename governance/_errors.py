"""Errors of the MemWarden domain and its services; every surface maps them the same way.

    MemWardenError
    ├── NotFound                 no such memory, version or key                      (HTTP 404)
    ├── InvalidCommand           the command cannot be carried out as given          (HTTP 422)
    │   ├── EmptyText
    │   ├── MalformedMetadata
    │   └── VersionNotFound      rollback / diff / read of a version that does not exist
    ├── TextTooLarge             over the configured limit                           (HTTP 413)
    ├── StateConflict            e.g. update of a deleted memory                     (HTTP 409)
    │   └── ContentErased        its text was crypto-shredded: no update, rollback or time travel
    └── VersionConflict          expected_version is stale; carries the current one  (HTTP 409)
"""

from __future__ import annotations


class MemWardenError(Exception):
    """Base class of MemWarden's own errors."""


class NotFound(MemWardenError):
    pass


class InvalidCommand(MemWardenError):
    pass


class EmptyText(InvalidCommand):
    pass


class MalformedMetadata(InvalidCommand):
    pass


class VersionNotFound(InvalidCommand):
    pass


class TextTooLarge(MemWardenError):
    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit
        super().__init__(f"memory text is {size} bytes; the limit is {limit} bytes")


class StateConflict(MemWardenError):
    pass


class ContentErased(StateConflict):
    """The text asked for, or needed, was erased (crypto-shredded) and can never be read again."""


class VersionConflict(MemWardenError):
    def __init__(self, cube_id: str, expected: int | None, current: int) -> None:
        self.cube_id, self.expected, self.current = cube_id, expected, current
        super().__init__(
            f"memory {cube_id} is at version {current}, not {expected}: "
            "someone changed it since you read it; read it again and retry"
        )
