"""``POST /v1/search``: memory search over REST, a thin layer over ``MemWarden.search``.

A POST, not a GET: the query may hold personal data, and a body stays out of access logs and
proxies' URLs. ``governance._api`` builds the router with its authentication dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from governance._memcube import KINDS, SEMANTIC_TYPES
from governance._search import MAX_QUERY_CHARS, MODES
from projections._search import MAX_K

_NAME = Annotated[str, Field(min_length=1, max_length=200)]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS,
                                description="what to look for, in words")]
    k: Annotated[int, Field(ge=1, le=MAX_K, description="how many results at most")] = 10
    mode: Literal[MODES] = Field(  # type: ignore[valid-type]
        "bm25", description="bm25 (full text), semantic (embeddings: the semantic extra) or "
                            "hybrid (both, reciprocal rank fusion)")
    tenant: _NAME | None = Field(None, description="default: the key's tenant; a platform key "
                                                   "searches every tenant without it")
    kind: Literal[KINDS] | None = None  # type: ignore[valid-type]
    semantic_type: Literal[SEMANTIC_TYPES] | None = None  # type: ignore[valid-type]
    labels: Annotated[list[_NAME], Field(max_length=20,
                                         description="memories carrying every one of these")] = []
    owner: _NAME | None = Field(None, description="the data subject the memories are about")
    since: AwareDatetime | None = Field(None, description="created at or after")
    until: AwareDatetime | None = Field(None, description="created before")


class SearchResultOut(BaseModel):
    id: str
    tenant: str
    owner: str
    kind: str
    semantic_type: str
    labels: list[str]
    version: int
    score: float
    snippet: str
    masked: bool
    created_at: str
    updated_at: str


class SearchResults(BaseModel):
    items: list[SearchResultOut]
    mode: str


def search_router(caller: Callable[..., Any], dependencies: Sequence[Any],
                  responses: dict[int | str, dict[str, Any]]) -> APIRouter:
    """The search routes, authenticating with ``caller`` (the API's key dependency)."""
    router = APIRouter(tags=["search"], dependencies=list(dependencies))

    @router.post("/search", response_model=SearchResults, responses=responses)
    def search(body: SearchRequest,
               who: Any = Depends(caller)) -> dict[str, Any]:  # noqa: B008 (FastAPI's idiom)
        """The memories best matching a query among those the key may read, best first.
        Policy filters apply inside the query; snippets are masked for keys without
        memory.read_sensitive; every search is audited (query hash, never its text)."""
        who.memwarden.refuse_while_building(search=True)
        results = who.memwarden.search(
            body.query, k=body.k, mode=body.mode, tenant=body.tenant, kind=body.kind,
            semantic_type=body.semantic_type, labels=body.labels, owner=body.owner,
            since=body.since, until=body.until)
        return {"items": [result.as_dict() for result in results], "mode": body.mode}

    return router
