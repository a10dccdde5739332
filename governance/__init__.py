"""MemWarden's domain and services: the MemCube aggregate, the SDK, the CLI.

Errors (all subclasses of ``MemWardenError``) are documented in ``governance._errors``.
"""

from governance._api import create_app
from governance._config import ENVIRONMENT_VARIABLES, ConfigError, Settings
from governance._erasure import ErasureReport
from governance._errors import (
    ContentErased,
    EmptyText,
    InvalidCommand,
    MalformedMetadata,
    MemWardenError,
    NotFound,
    StateConflict,
    TextTooLarge,
    VersionConflict,
    VersionNotFound,
)
from governance._keys import ALL_TENANTS, ApiKeys, IssuedKey, Unauthenticated, key_as_dict
from governance._memcube import KINDS, SEMANTIC_TYPES, SOURCES, Limits, MemCube, MemoryMetadata
from governance._pii import SensitiveDataBlocked
from governance._policy import AccessPolicy, Decision, PermissionDenied, PolicyRule
from governance._principal import ACTIONS, PLATFORM, ROLES, Principal, Resource
from governance._sdk import Diff, MemWarden, diff_states, state_as_dict
from governance._search import SearchResult
from projections import AuditEntry, AuditFilter, CubeFilter, MemoryState, Usage, Version

__all__ = [
    "ACTIONS",
    "ALL_TENANTS",
    "ENVIRONMENT_VARIABLES",
    "KINDS",
    "PLATFORM",
    "ROLES",
    "SEMANTIC_TYPES",
    "SOURCES",
    "AccessPolicy",
    "ApiKeys",
    "AuditEntry",
    "AuditFilter",
    "ConfigError",
    "ContentErased",
    "CubeFilter",
    "Decision",
    "Diff",
    "EmptyText",
    "ErasureReport",
    "InvalidCommand",
    "IssuedKey",
    "Limits",
    "MalformedMetadata",
    "MemCube",
    "MemWarden",
    "MemWardenError",
    "MemoryMetadata",
    "MemoryState",
    "NotFound",
    "PermissionDenied",
    "PolicyRule",
    "Principal",
    "Resource",
    "SearchResult",
    "SensitiveDataBlocked",
    "Settings",
    "StateConflict",
    "TextTooLarge",
    "Unauthenticated",
    "Usage",
    "Version",
    "VersionConflict",
    "VersionNotFound",
    "create_app",
    "diff_states",
    "key_as_dict",
    "state_as_dict",
]
