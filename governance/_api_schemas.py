"""The REST API's request and response documents: what ``/openapi.json`` describes.

Inputs refuse unknown fields, so a typo is an error and no client can name its own actor. The
domain validates again, with its own messages; these schemas add what HTTP needs on top.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from governance._keys import ALL_TENANTS
from governance._memcube import KINDS, SEMANTIC_TYPES, SOURCES, MemoryMetadata
from governance._principal import ROLES
from governance._sdk import state_as_dict
from projections import AuditEntry
from projections import Version as StoredVersion

MAX_VERSION = 2**31 - 1
MAX_POSITION = 2**63 - 1
_DEFAULT_METADATA = MemoryMetadata()

# Names (ids, tenants, owners, labels) never hold control characters; rejecting them here also
# keeps NUL, which PostgreSQL cannot store or compare, away from every query.
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")]
Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
VersionNumber = Annotated[int, Field(ge=1, le=MAX_VERSION)]
ExpectedVersion = Annotated[int, Field(ge=0, le=MAX_VERSION,
                                       description="fail with 409 unless the memory is at it")]


class _Input(BaseModel):
    # Unknown fields are refused: a typo is an error, and no client can claim an actor.
    model_config = ConfigDict(extra="forbid")


class MetadataIn(_Input):
    """Metadata to set. On update, fields you leave out keep their current values."""

    source: Literal[SOURCES] = _DEFAULT_METADATA.source  # type: ignore[valid-type]
    semantic_type: Literal[SEMANTIC_TYPES] = _DEFAULT_METADATA.semantic_type  # type: ignore[valid-type]
    tags: list[Name] = []
    labels: list[Name] = Field(default=[], description="governance labels, e.g. sensitive")
    ttl_seconds: Annotated[int, Field(ge=1, le=MAX_POSITION)] | None = None
    priority: Annotated[int, Field(ge=0, le=10)] = _DEFAULT_METADATA.priority
    retention_class: Name = _DEFAULT_METADATA.retention_class
    shared_with: list[Name] = Field(
        default=[], description="subjects (agents) besides the creator that may read it")

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class MemoryCreate(_Input):
    text: Text
    tenant: Name
    owner: Name = Field(description="the data subject the memory is about")
    kind: Literal[KINDS] = "plaintext"  # type: ignore[valid-type]
    metadata: MetadataIn | None = None
    reason: Text | None = None
    id: Name | None = Field(default=None, description="choose the id (default: a new UUID)")


class MemoryPatch(_Input):
    text: Text | None = None
    metadata: MetadataIn | None = None
    expected_version: ExpectedVersion | None = None
    reason: Text | None = None


class MemoryRestore(_Input):
    reason: Text | None = None
    expected_version: ExpectedVersion | None = None


class MemoryRollback(_Input):
    to_version: VersionNumber
    reason: Text
    expected_version: ExpectedVersion | None = None


class KeyCreate(_Input):
    tenant: Name = Field(description=f"the tenant the key acts in ({ALL_TENANTS!r}: admin only)")
    subject: Name = Field(description="recorded as the actor of everything done with the key")
    role: Literal[ROLES]  # type: ignore[valid-type]


class PolicyChangeIn(_Input):
    rule: list[Name] = Field(
        min_length=2, max_length=7,
        description="['p', role, tenant, action, scope] or ['g', role, inherited_role, tenant]; "
                    "tenant '*' means every tenant")
    reason: Annotated[Text, StringConstraints(min_length=1)]


class PolicyChange(BaseModel):
    rule: list[str]
    revision: int = Field(description="the policy's revision after the change")


class PolicyRuleList(BaseModel):
    items: list[list[str]]


class Metadata(BaseModel):
    source: str
    semantic_type: str
    tags: list[str]
    labels: list[str]
    ttl_seconds: int | None
    priority: int
    retention_class: str
    shared_with: list[str] = []


class Memory(BaseModel):
    id: str
    tenant: str
    owner: str
    kind: str
    version: int
    state: Literal["active", "deleted", "expired"]
    tier: Literal["working", "long_term", "cold_archive"] = Field(
        "working", description="retention tier; cold_archive content is read by a recall")
    text: str
    metadata: Metadata
    created_at: datetime
    created_by: str
    updated_at: datetime
    updated_by: str
    position: int = Field(description="log position of the event that made this version")
    last_event: str


class MemoryPage(BaseModel):
    items: list[Memory]
    next: str | None = Field(description="pass as `after` for the next page; null at the end")


class MemoryVersion(Memory):
    reason: str | None


class VersionList(BaseModel):
    items: list[MemoryVersion]


class Change(BaseModel):
    before: Any
    after: Any


class Diff(BaseModel):
    id: str
    from_version: int
    to_version: int
    text_diff: list[str] = Field(description="unified diff of the text, one line per item")
    metadata_changes: dict[str, Change]


class AuditItem(BaseModel):
    position: int
    event_id: str
    type: str
    stream_id: str
    cube_id: str | None
    tenant: str | None
    actor: str
    on_behalf_of: str | None
    reason: str | None
    detail: dict[str, Any]
    recorded_at: datetime


class AuditPage(BaseModel):
    items: list[AuditItem]
    next: int | None = Field(description="pass as `after` for the next page; null at the end")


class ChainBreak(BaseModel):
    position: int
    event_id: str
    reason: str


class Verification(BaseModel):
    ok: bool
    checked: int
    head_position: int
    first_break: ChainBreak | None


class ApiKey(BaseModel):
    id: str
    tenant: str
    subject: str
    role: str
    active: bool
    issued_at: datetime
    issued_by: str
    revoked_at: datetime | None
    revoked_by: str | None
    revoke_reason: str | None


class IssuedApiKey(ApiKey):
    key: str = Field(description="the key itself: shown this once, only its hash is kept")


class ApiKeyList(BaseModel):
    items: list[ApiKey]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    head_position: int
    projected_position: int = Field(description="every read model has applied the log up to here")


class FieldProblem(BaseModel):
    location: str
    field: str
    message: str


class Problem(BaseModel):
    """An error (RFC 9457). ``current_version`` comes with version conflicts, ``errors`` with
    invalid input."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    current_version: int | None = None
    errors: list[FieldProblem] | None = None


def version_document(version: StoredVersion) -> dict[str, Any]:
    return {**state_as_dict(version.state), "reason": version.reason}


def audit_document(entry: AuditEntry) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in AuditItem.model_fields}
