"""Retention and legal holds over REST: ``/v1/retention/*``, ``/v1/holds``, and the recall of a
cold-archived memory. Thin layers over the SDK; ``governance._api`` builds the router with its
authentication dependency.
"""

from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from governance._sdk import state_as_dict

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations, and
# ``Who`` is local to the router factory.

_NAME = Annotated[str, Field(min_length=1, max_length=200)]
_TEXT = Annotated[str, Field(min_length=1, max_length=2000)]
_HOLD_ID = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
_MEMORY_ID = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")]


class SweepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(False, description="report what would happen; change nothing")
    tenant: _NAME | None = Field(None, description="default: the key's tenant; a platform key "
                                                   "sweeps every tenant without it")
    at: AwareDatetime | None = Field(None, description="dry runs only: as if it were then")


class Sweep(BaseModel):
    sweep_id: str
    now: str
    dry_run: bool
    tenant: str | None
    rules_digest: str
    examined: int
    counts: dict[str, int]
    by_rule: list[dict[str, Any]]
    events: int
    seconds: float
    actions: list[dict[str, Any]] | None = Field(
        None, description="dry runs: every action, with the rule and why")


class Report(BaseModel):
    now: str
    days: int
    tenant: str | None
    done: list[dict[str, Any]]
    recent: list[dict[str, Any]]
    due: list[dict[str, Any]]
    active_holds: int
    sweeps: list[dict[str, Any]]


class Rules(BaseModel):
    source: str
    digest: str
    rules: list[dict[str, Any]]


class HoldIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory: _NAME | None = Field(None, description="hold this memory")
    owner: _NAME | None = Field(None, description="hold every memory of this owner in tenant")
    tenant: _NAME | None = Field(None, description="alone: hold every memory of the tenant")
    reason: _TEXT
    case_id: _NAME


class Hold(BaseModel):
    hold_id: str
    tenant: str
    scope: str
    target: str
    reason: str
    case_id: str
    placed_by: str
    placed_at: str
    active: bool
    released_by: str | None
    released_at: str | None
    release_reason: str | None


class HoldList(BaseModel):
    items: list[Hold]


class RecallIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: _TEXT


def retention_router(caller: Callable[..., Any], dependencies: Sequence[Any],
                     errors: Callable[..., dict[int | str, dict[str, Any]]]) -> APIRouter:
    """The retention and hold routes, authenticating with ``caller`` (the key dependency)."""
    router = APIRouter(tags=["retention"], dependencies=list(dependencies))
    auth = (401, 403)
    Who = Annotated[Any, Depends(caller)]

    @router.get("/retention/rules", response_model=Rules, responses=errors(*auth, 422))
    def retention_rules(who: Who) -> dict[str, Any]:
        """The retention rules in force, in the order they are tried."""
        policy = who.memwarden.retention_rules()
        return {"source": policy.source, "digest": policy.digest,
                "rules": [rule.as_dict() for rule in policy.rules]}

    @router.post("/retention/run", response_model=Sweep, responses=errors(*auth, 422))
    def run_retention(body: SweepRequest, who: Who) -> dict[str, Any]:
        """Run a retention sweep now (or, with dry_run, say exactly what it would do)."""
        return who.memwarden.run_retention(dry_run=body.dry_run, tenant=body.tenant,
                                           at=body.at).as_dict()

    @router.get("/retention/report", response_model=Report, responses=errors(*auth, 422))
    def retention_report(
        who: Who,
        days: Annotated[int, Query(ge=1, le=3650)] = 30,
        tenant: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    ) -> dict[str, Any]:
        """What was expired, archived and erased, by rule, and what falls due next."""
        return who.memwarden.retention_report(days=days, tenant=tenant).as_dict()

    @router.post("/memories/{cube_id}/recall", responses=errors(*auth, 404, 409, 422))
    def recall_memory(cube_id: _MEMORY_ID, body: RecallIn,
                      who: Who) -> dict[str, Any]:
        """Read a cold-archived memory back (recorded); it returns to the working tier."""
        recalled = who.memwarden.recall(cube_id, reason=body.reason)
        return {**state_as_dict(recalled.state), "text": recalled.text,
                "archived_bytes": recalled.archived_bytes}

    @router.get("/holds", response_model=HoldList, responses=errors(*auth, 422))
    def list_holds(
        who: Who,
        tenant: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
        include_released: bool = False,
    ) -> dict[str, Any]:
        """The legal holds in force (with include_released, released ones too)."""
        holds = who.memwarden.holds(tenant=tenant, include_released=include_released)
        return {"items": [hold.as_dict() for hold in holds]}

    @router.post("/holds", status_code=201, response_model=Hold,
                 responses=errors(*auth, 404, 422))
    def place_hold(body: HoldIn, who: Who) -> dict[str, Any]:
        """Place a legal hold on a memory, an owner's memories in a tenant, or a tenant."""
        return who.memwarden.place_hold(reason=body.reason, case_id=body.case_id,
                                        memory=body.memory, owner=body.owner,
                                        tenant=body.tenant).as_dict()

    @router.delete("/holds/{hold_id}", response_model=Hold,
                   responses=errors(*auth, 404, 409, 422))
    def release_hold(
        hold_id: _HOLD_ID,
        reason: Annotated[str, Query(min_length=1, max_length=2000,
                                     description="why (recorded)")],
        who: Who,
    ) -> dict[str, Any]:
        """Release a legal hold: the rules apply again at the next sweep."""
        return who.memwarden.release_hold(hold_id, reason=reason).as_dict()

    return router
