"""``GET /v1/lineage/{id}`` and ``GET /v1/artifacts``: parametric and activation memory's lineage
over REST, thin layers over ``MemWarden.lineage`` and ``MemWarden.artifacts``.

Conversions train models for seconds to hours: they run from the CLI or a worker, not in a
request. ``governance._api`` builds the router with its authentication dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict

from governance._api_schemas import Name


class SourceOut(BaseModel):
    cube_id: str
    version: int
    owner: str


class TaintOut(BaseModel):
    cause: str
    cause_event_id: str
    cause_position: int
    source_cube_id: str
    source_version: int
    subject: str | None
    detected_at: str
    emitted_position: int | None
    purged: bool


class ArtifactOut(BaseModel):
    # Base model name, hyperparameters, metrics and sizes, as the creation event recorded them.
    model_config = ConfigDict(extra="allow")

    artifact: str
    kind: str
    tenant: str
    cube_id: str
    cube_version: int
    base_model: str
    status: Literal["ready", "tainted", "retired"]
    created_by: str
    created_at: str
    position: int
    retired_position: int | None
    sources: list[SourceOut]
    taints: list[TaintOut]


class LineageOut(BaseModel):
    id: str
    direction: Literal["made_of", "derived_into"]
    artifacts: list[ArtifactOut]


class ArtifactList(BaseModel):
    items: list[ArtifactOut]


def lineage_router(caller: Callable[..., Any], dependencies: Sequence[Any],
                   responses: Callable[..., dict[int | str, dict[str, Any]]]) -> APIRouter:
    """The lineage routes, authenticating with ``caller`` (the API's key dependency)."""
    router = APIRouter(tags=["lineage"], dependencies=list(dependencies))

    @router.get("/lineage/{ident}", response_model=LineageOut,
                responses=responses(401, 403, 404, 422))
    def lineage(ident: Annotated[Name, Path()],
                who: Any = Depends(caller)) -> dict[str, Any]:  # noqa: B008 (FastAPI's idiom)
        """What an artifact (its memory id or sha256) is made of, or the artifacts made from a
        memory: exact source versions, status, taints with their causes (never content)."""
        return who.memwarden.lineage(ident).as_dict()

    @router.get("/artifacts", response_model=ArtifactList, responses=responses(401, 403, 422))
    def artifacts(tenant: Annotated[Name | None, Query()] = None,
                  who: Any = Depends(caller)) -> dict[str, Any]:  # noqa: B008
        """Adapters and KV caches of a tenant (default: the key's), newest first."""
        return {"items": [a.as_dict() for a in who.memwarden.artifacts(tenant=tenant)]}

    return router
