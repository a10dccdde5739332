"""Data subjects and sensitive data over REST: ``/v1/subjects/{id}/export``,
``/v1/subjects/{id}/erase``, ``/v1/memories/{id}/erase``, ``/v1/findings``, ``/v1/erasures``.
Thin layers over the SDK; ``governance._api`` builds the router with its authentication
dependency.
"""

from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from governance._api_schemas import MAX_POSITION
from governance._sdk import state_as_dict

_NAME = Annotated[str, Field(min_length=1, max_length=200)]
_TEXT = Annotated[str, Field(min_length=1, max_length=2000)]
_SUBJECT = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f/]+$")]
_MEMORY_ID = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")]
_TENANT_QUERY = Annotated[str | None, Query(min_length=1, max_length=200)]


class EraseSubjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: _NAME
    reason: _TEXT


class Erasure(BaseModel):
    subject: str
    tenant: str
    reason: str
    position: int
    memories: int
    versions: int
    keys_destroyed: int
    scrubbed: bool


class EraseContentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: _TEXT


class FindingOut(BaseModel):
    cube_id: str
    version: int
    tenant: str
    entity_types: list[str]
    findings: list[dict[str, Any]]
    analyzer: str | None
    position: int
    detected_at: str


class FindingList(BaseModel):
    items: list[FindingOut]


class ErasureOut(BaseModel):
    position: int
    type: str
    tenant: str
    subject: str | None
    cube_id: str | None
    actor: str
    reason: str | None
    rule: str | None
    detail: dict[str, Any]
    recorded_at: str


class ErasureList(BaseModel):
    items: list[ErasureOut]


def sensitive_router(caller: Callable[..., Any], dependencies: Sequence[Any],
                     errors: Callable[..., dict[int | str, dict[str, Any]]]) -> APIRouter:
    """The data subject and sensitive data routes, authenticating with ``caller``."""
    router = APIRouter(tags=["data subjects"], dependencies=list(dependencies))
    auth = (401, 403)
    Who = Annotated[Any, Depends(caller)]

    @router.get("/subjects/{subject}/export", responses=errors(*auth, 422))
    def export_subject(subject: _SUBJECT, who: Who,
                       tenant: Annotated[str, Query(min_length=1, max_length=200)]
                       ) -> dict[str, Any]:
        """Everything held about a data subject in a tenant (GDPR Art. 15/20): memories with
        every version, findings, reads, audit trail, erasures. Masked per the key's rights;
        recorded as MemoryExported."""
        return who.memwarden.export_subject(subject, tenant=tenant)

    @router.post("/subjects/{subject}/erase", response_model=Erasure,
                 responses=errors(*auth, 422))
    def erase_subject(subject: _SUBJECT, body: EraseSubjectIn, who: Who) -> dict[str, Any]:
        """Erase a data subject (GDPR Art. 17): its keys are destroyed, its text purged from
        every read model; SubjectErased records it. Irreversible."""
        return who.memwarden.erase_subject(subject, tenant=body.tenant,
                                           reason=body.reason).as_dict()

    @router.post("/memories/{cube_id}/erase", responses=errors(*auth, 404, 409, 422))
    def erase_memory_content(cube_id: _MEMORY_ID, body: EraseContentIn,
                             who: Who) -> dict[str, Any]:
        """Erase one memory's text, every version of it (MemoryContentErased). Irreversible."""
        return state_as_dict(who.memwarden.erase_memory_content(cube_id, reason=body.reason))

    @router.get("/findings", response_model=FindingList, responses=errors(*auth, 404, 422))
    def findings(
        who: Who,
        tenant: _TENANT_QUERY = None,
        cube_id: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
        after: Annotated[int, Query(ge=0, le=MAX_POSITION)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Sensitive data found on write: entity types, offsets, scores; never the values."""
        records = who.memwarden.findings(tenant=tenant, cube_id=cube_id, after=after,
                                         limit=limit)
        return {"items": [{**{name: getattr(r, name) for name in (
            "cube_id", "version", "tenant", "analyzer", "position")},
            "entity_types": list(r.entity_types), "findings": [dict(f) for f in r.findings],
            "detected_at": r.detected_at.isoformat()} for r in records]}

    @router.get("/erasures", response_model=ErasureList, responses=errors(*auth, 422))
    def erasures(
        who: Who,
        tenant: _TENANT_QUERY = None,
        after: Annotated[int, Query(ge=0, le=MAX_POSITION)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Subject erasures and memory content erasures, oldest first."""
        return {"items": [{**{name: getattr(e, name) for name in (
            "position", "type", "tenant", "subject", "cube_id", "actor", "reason", "rule")},
            "detail": dict(e.detail), "recorded_at": e.recorded_at.isoformat()}
            for e in who.memwarden.erasures(tenant=tenant, after=after, limit=limit)]}

    return router
