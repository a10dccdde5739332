"""The REST API: FastAPI under ``/v1``, each route a thin layer over the SDK.

    app = create_app(Settings.from_env())   # opens (and on shutdown closes) its own backend
    app = create_app(memwarden)             # shares an open handle; its owner closes it

Every route but ``/v1/healthz`` needs ``Authorization: Bearer <key>``. The key's subject is the
actor recorded on every event the request causes; the SDK handle acting as the key's principal
asks the access policy before every operation (the one enforcement point), so routes never decide.
Errors are RFC 9457 problem details (``application/problem+json``) with a sentence a person can
act on; a request that fails writes nothing, because every check runs before the append.
"""

from __future__ import annotations

import functools
import hashlib
import http
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eventstore import EventStoreError, IntegrityError
from eventstore._kafka import ReadModelsBehind
from governance._api_lineage import lineage_router
from governance._api_retention import retention_router
from governance._api_schemas import (
    MAX_POSITION,
    MAX_VERSION,
    ApiKey,
    ApiKeyList,
    AuditPage,
    Diff,
    Health,
    IssuedApiKey,
    KeyCreate,
    Memory,
    MemoryCreate,
    MemoryPage,
    MemoryPatch,
    MemoryRestore,
    MemoryRollback,
    MemoryVersion,
    Name,
    PolicyChange,
    PolicyChangeIn,
    PolicyRuleList,
    Problem,
    Readiness,
    Text,
    Verification,
    VersionList,
    audit_document,
    version_document,
)
from governance._api_search import search_router
from governance._api_sensitive import sensitive_router
from governance._config import Settings
from governance._errors import (
    InvalidCommand,
    MemWardenError,
    NotFound,
    StateConflict,
    TextTooLarge,
    VersionConflict,
    VersionNotFound,
)
from governance._keys import ApiKeys, Unauthenticated, key_as_dict
from governance._memcube import KINDS
from governance._policy import PermissionDenied, PolicyRule
from governance._principal import Principal
from governance._sdk import MemWarden, state_as_dict
from projections import MAX_PAGE, AuditFilter, CubeFilter

PROBLEM_JSON = "application/problem+json"
logger = logging.getLogger("memwarden.api")

# JSON escapes can make a body several times larger than the text it carries (\u00e9 is six
# bytes for two); the text limit itself is enforced, with its own message, by the domain.
_BODY_BYTES_PER_TEXT_BYTE = 8

# -- errors ----------------------------------------------------------------------------------

_STATUS_OF: tuple[tuple[type[MemWardenError], int], ...] = (
    (Unauthenticated, 401),
    (PermissionDenied, 403),
    (NotFound, 404),
    (VersionConflict, 409),
    (StateConflict, 409),
    (TextTooLarge, 413),
    (InvalidCommand, 422),
)


def problem(status: int, detail: str, *, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": http.HTTPStatus(status).phrase, "status": status,
            "detail": detail, **{k: v for k, v in extra.items() if v is not None}}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problems a route can answer with."""
    return {status: {"model": Problem, "description": http.HTTPStatus(status).phrase}
            for status in statuses}


_AUTH = (401, 403)
_READ = _errors(*_AUTH, 404, 409, 422)  # 409: the memory is in the cold archive (recall it)
_WRITE = _errors(400, *_AUTH, 404, 409, 413, 422)


async def _domain_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, MemWardenError)
    status = next((s for kind, s in _STATUS_OF if isinstance(error, kind)), 400)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    current = error.current if isinstance(error, VersionConflict) else None
    if isinstance(error, PermissionDenied) and error.hides_existence:
        # Another tenant's resource: answer exactly as for one that does not exist.
        resource = error.decision.resource
        return problem(404, f"no {resource.kind} with id {resource.id!r}")
    return problem(status, str(error), headers=headers, current_version=current)


def _field_problem(error: dict[str, Any]) -> dict[str, str]:
    location, *path = error["loc"] or ("body",)
    return {"location": str(location), "field": ".".join(str(p) for p in path),
            "message": error["msg"]}


async def _invalid_request(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = list(error.errors())
    malformed = next((e for e in errors if e["type"] == "json_invalid"), None)
    if malformed is not None:
        reason = (malformed.get("ctx") or {}).get("error", "malformed")
        return problem(400, f"the request body is not valid JSON: {reason}")
    if any(e["loc"][:1] == ("body",) and isinstance(e.get("input"), bytes) for e in errors):
        return problem(400, "the request body must be JSON, sent with "
                            "'Content-Type: application/json'")
    fields = [_field_problem(e) for e in errors]
    return problem(422, "invalid request: " + "; ".join(_describe(f) for f in fields),
                   errors=fields)


def _describe(field: dict[str, str]) -> str:
    if field["location"] == "body":
        if not field["field"]:
            return ("a JSON request body is required" if field["message"] == "Field required"
                    else f"the request body: {field['message']}")
        return f"{field['field']}: {field['message']}"
    return f"{field['location']} parameter {field['field']}: {field['message']}"


def _http_error(max_body_bytes: int) -> Callable[[Request, Exception], Any]:
    async def handle(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        detail = str(error.detail)
        if error.status_code == 404:
            detail = (f"there is no {request.url.path}; the API lives under /v1 "
                      "and /docs lists every route")
        elif error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            detail = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
        elif error.status_code == 413:
            detail = f"the request body is larger than {max_body_bytes} bytes"
        return problem(error.status_code, detail, headers=error.headers)

    return handle


READ_MODELS_RETRY_AFTER_SECONDS = 30
"""How long a client told that the Kafka-fed read models lag (``ReadModelsBehind``) waits."""


async def _store_error(request: Request, error: Exception) -> JSONResponse:
    if isinstance(error, IntegrityError):  # a write that collides with one already logged
        return problem(409, f"the write conflicts with the log: {error}")
    if isinstance(error, ReadModelsBehind):  # distributed mode: the database is fine
        logger.warning("%s %s: %s", request.method, request.url.path, error)
        return problem(503, f"the read models are behind the log: {error}",
                       headers={"Retry-After": str(READ_MODELS_RETRY_AFTER_SECONDS)})
    logger.error("database error on %s %s: %s", request.method, request.url.path, error)
    return problem(503, "the database is unavailable; try again shortly")


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    # Starlette logs the exception after this handler answers.
    return problem(500, "the server failed unexpectedly; the error has been logged")


# Closing the connection stops the client from sending the rest, which the server would otherwise
# read (and drop) to keep the connection alive.
_CLOSE = {"Connection": "close"}


class _BodyLimit:
    """Refuse a request body over ``max_bytes`` with 413 before it is read whole.

    (Starlette's own limiter answers a declared oversize body in plain text, not problem+json.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a chunked body that declared no length
                raise HTTPException(413, headers=_CLOSE)
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(413, f"the request body is larger than {self.max_bytes} bytes",
                           headers=_CLOSE)
        await response(scope, receive, send)


def _problems_as_problem_json(app: FastAPI) -> None:
    """FastAPI documents every response model as application/json; ours are problem+json.
    Every route that takes a body can also answer 400 (not JSON) and 413 (too large): those
    come from the body handling shared by all routes, so they are documented here once."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        first_time = app.openapi_schema is None
        schema = generate()
        if first_time:
            problem_ref = {"$ref": "#/components/schemas/Problem"}
            for operations in schema["paths"].values():
                for operation in operations.values():
                    if "requestBody" in operation:
                        for status in ("400", "413"):
                            operation["responses"].setdefault(status, {
                                "description": http.HTTPStatus(int(status)).phrase,
                                "content": {PROBLEM_JSON: {"schema": problem_ref}}})
                    for status, response in operation["responses"].items():
                        content = response.get("content", {})
                        if status >= "400" and "application/json" in content:
                            content[PROBLEM_JSON] = content.pop("application/json")
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# -- who is calling --------------------------------------------------------------------------


class _RecentKeys:
    """Keys that authenticated before, so most requests skip the key lookup and hash check.

    The cache is only trusted while the ``api_keys`` read model is unchanged: every request reads
    its high-water position (one indexed lookup), so a key revoked anywhere (this app, the CLI,
    another server) stops working on the next request in every process."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys
        self._lock = threading.Lock()
        self._known: dict[str, Principal] = {}
        self._as_of = -1

    def authenticate(self, key: str) -> Principal:
        digest = hashlib.sha256(key.encode()).hexdigest()  # no secret kept in memory
        as_of = self._keys.last_change()
        with self._lock:
            if as_of != self._as_of:
                self._known, self._as_of = {}, as_of
            principal = self._known.get(digest)
        if principal is not None:
            return principal
        principal = self._keys.authenticate(key)
        with self._lock:
            if as_of == self._as_of:
                self._known[digest] = principal
        return principal

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._known = {digest: principal for digest, principal in self._known.items()
                           if principal.key_id != key_id}


@dataclass(frozen=True, slots=True)
class _Services:
    memwarden: MemWarden
    keys: _RecentKeys


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated key, and the SDK acting as its subject."""

    principal: Principal
    memwarden: MemWarden
    services: _Services

    @property
    def keys(self) -> ApiKeys:
        return ApiKeys(self.memwarden)


_bearer = HTTPBearer(auto_error=False, description="an API key (memwarden keys create)")


def _caller(request: Request, credentials: Annotated[
        HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    if credentials is None:
        raise Unauthenticated("send an API key as 'Authorization: Bearer <key>' "
                              "(create one with: memwarden keys create)")
    services: _Services = request.app.state.services
    # Distributed mode: read models a Kafka consumer is building hold part of the log (the
    # keys among them): 503 until it is through, never a wrong answer or a valid key refused.
    # The search index alone is refused by the search route only.
    services.memwarden.refuse_while_building()
    principal = services.keys.authenticate(credentials.credentials)
    return Caller(principal, services.memwarden.as_principal(principal), services)


CallerDep = Annotated[Caller, Depends(_caller)]


async def _refuse_ambiguous_query(request: Request) -> None:
    """A misspelt filter must not silently widen a listing, nor may ``?tenant=a&tenant=b`` mean
    whichever one the framework keeps: refuse unknown and repeated single-valued parameters."""
    if not request.query_params:
        return
    repeatable = _query_parameters(request.scope["endpoint"])
    unknown = sorted(set(request.query_params) - set(repeatable))
    if unknown:
        takes = ", ".join(sorted(repeatable)) or "none"
        raise InvalidCommand(f"unknown query parameter(s) {', '.join(unknown)}; "
                             f"{request.method} {request.url.path} takes: {takes}")
    repeated = sorted(name for name in set(request.query_params) if not repeatable[name]
                      and len(request.query_params.getlist(name)) > 1)
    if repeated:
        raise InvalidCommand(f"query parameter(s) {', '.join(repeated)} given more than once")


@functools.cache
def _query_parameters(endpoint: Callable[..., Any]) -> dict[str, bool]:
    """The endpoint's query parameters, each with whether it may repeat (a list)."""
    route = next(route for router in _ROUTERS for route in router.routes
                 if isinstance(route, APIRoute) and route.endpoint is endpoint)
    return {p.alias: _is_list(p.field_info.annotation) for p in route.dependant.query_params}


def _is_list(annotation: Any) -> bool:
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()
    return any(get_origin(option) is list for option in (annotation, *options))
MemoryId = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")]


# -- routes ----------------------------------------------------------------------------------

_CHECKED = [Depends(_refuse_ambiguous_query)]
memories = APIRouter(prefix="/memories", tags=["memories"], dependencies=_CHECKED)


@memories.post("", status_code=201, response_model=Memory, responses=_errors(
    400, *_AUTH, 413, 422))
def add_memory(body: MemoryCreate, caller: CallerDep, response: Response) -> dict[str, Any]:
    """Add a memory (version 1)."""
    state = caller.memwarden.add(
        body.text, tenant=body.tenant, owner=body.owner, kind=body.kind, reason=body.reason,
        metadata=body.metadata.given() if body.metadata else None, cube_id=body.id)
    response.headers["Location"] = f"/v1/memories/{quote(state.cube_id, safe='')}"
    return state_as_dict(state)


@memories.get("", response_model=MemoryPage, responses=_errors(*_AUTH, 422))
def list_memories(
    caller: CallerDep,
    tenant: Name | None = None,
    owner: Name | None = None,
    kind: Literal[KINDS] | None = None,  # type: ignore[valid-type]
    label: Name | None = None,
    state: Literal["active", "deleted", "expired"] | None = None,
    include_archived: Annotated[bool, Query(
        description="expired and cold-archived memories too (needs memory.recall)")] = False,
    after: Annotated[Name | None, Query(description="the `next` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> dict[str, Any]:
    """One page of memories in id order; a key sees only its own tenant's. Expired and
    cold-archived memories are left out unless include_archived."""
    page = caller.memwarden.list(
        CubeFilter(tenant=tenant, owner=owner, kind=kind, label=label, state=state,
                   include_archived=include_archived),
        after=after, limit=limit)
    return {"items": [state_as_dict(m) for m in page],
            "next": page[-1].cube_id if len(page) == limit else None}


@memories.get("/{cube_id}", response_model=Memory, responses=_READ)
def get_memory(
    cube_id: MemoryId,
    caller: CallerDep,
    as_of: Annotated[str | None, Query(
        max_length=64,
        description="a log position, or an ISO-8601 timestamp with time zone: the memory as "
                    "it was then, replayed from the log")] = None,
) -> dict[str, Any]:
    """A memory's current state, or its state as of a position or moment."""
    if as_of is None:
        return state_as_dict(caller.memwarden.get(cube_id))
    position, moment = _parse_as_of(as_of)
    return state_as_dict(caller.memwarden.as_of(cube_id, position=position, at=moment))


def _parse_as_of(value: str) -> tuple[int | None, datetime | None]:
    if value.isascii() and value.isdigit():
        position = int(value)
        if position > MAX_POSITION:
            raise InvalidCommand(f"as_of position {value} is beyond any log")
        return position, None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidCommand(f"as_of must be a log position or an ISO-8601 timestamp; "
                             f"got {value!r}") from None
    if moment.tzinfo is None:
        raise InvalidCommand(f"as_of {value!r} has no time zone; add one, e.g. {value}+00:00")
    return None, moment


@memories.patch("/{cube_id}", response_model=Memory, responses=_WRITE)
def update_memory(cube_id: MemoryId, body: MemoryPatch, caller: CallerDep) -> dict[str, Any]:
    """Change text and/or metadata: a new version. ``expected_version`` guards against lost
    updates."""
    return state_as_dict(caller.memwarden.update(
        cube_id, text=body.text, metadata=body.metadata.given() if body.metadata else None,
        expected_version=body.expected_version, reason=body.reason))


@memories.delete("/{cube_id}", response_model=Memory, responses=_errors(*_AUTH, 404, 409, 422))
def delete_memory(
    cube_id: MemoryId,
    caller: CallerDep,
    reason: Annotated[Text, Query(min_length=1, description="why (recorded)")],
    expected_version: Annotated[int | None, Query(ge=0, le=MAX_VERSION)] = None,
) -> dict[str, Any]:
    """Soft-delete a memory: a new version; history is kept and restore undoes it."""
    return state_as_dict(caller.memwarden.delete(cube_id, reason=reason,
                                           expected_version=expected_version))


@memories.post("/{cube_id}/restore", response_model=Memory, responses=_WRITE)
def restore_memory(cube_id: MemoryId, caller: CallerDep,
                   body: MemoryRestore | None = None) -> dict[str, Any]:
    """Restore a soft-deleted memory."""
    body = body or MemoryRestore()
    return state_as_dict(caller.memwarden.restore(cube_id, reason=body.reason,
                                            expected_version=body.expected_version))


@memories.get("/{cube_id}/versions", response_model=VersionList, responses=_READ)
def list_versions(cube_id: MemoryId, caller: CallerDep) -> dict[str, Any]:
    """Every version of a memory, oldest first, with the reason given for each."""
    return {"items": [version_document(v) for v in caller.memwarden.history(cube_id)]}


@memories.get("/{cube_id}/versions/{number}", response_model=MemoryVersion, responses=_READ)
def get_version(cube_id: MemoryId, number: Annotated[int, Path(ge=1, le=MAX_VERSION)],
                caller: CallerDep) -> dict[str, Any]:
    """One version of a memory."""
    try:
        return version_document(caller.memwarden.version(cube_id, number))
    except VersionNotFound as error:  # a path names a resource: a missing one is 404
        raise NotFound(str(error)) from None


@memories.get("/{cube_id}/diff", response_model=Diff, responses=_READ)
def diff_versions(
    cube_id: MemoryId,
    caller: CallerDep,
    from_version: Annotated[int, Query(alias="from", ge=1, le=MAX_VERSION)],
    to_version: Annotated[int, Query(alias="to", ge=1, le=MAX_VERSION)],
) -> dict[str, Any]:
    """What changed between two versions."""
    diff = caller.memwarden.diff(cube_id, from_version, to_version)
    return {"id": cube_id, "from_version": diff.from_version, "to_version": diff.to_version,
            "text_diff": diff.text_diff,
            "metadata_changes": {key: {"before": before, "after": after}
                                 for key, (before, after) in diff.metadata_changes.items()}}


@memories.post("/{cube_id}/rollback", response_model=Memory, responses=_WRITE)
def rollback_memory(cube_id: MemoryId, body: MemoryRollback, caller: CallerDep) -> dict[str, Any]:
    """Append a new version whose content equals ``to_version``; nothing is rewritten."""
    return state_as_dict(caller.memwarden.rollback(cube_id, body.to_version, reason=body.reason,
                                             expected_version=body.expected_version))


log = APIRouter(tags=["audit"], dependencies=_CHECKED)


@log.get("/audit", response_model=AuditPage, responses=_errors(*_AUTH, 422))
def audit_trail(
    caller: CallerDep,
    tenant: Name | None = None,
    actor: Name | None = None,
    cube_id: Annotated[Name | None, Query(description="about this memory, reads too")] = None,
    event_type: Annotated[list[Name] | None, Query(alias="type")] = None,
    since: Annotated[AwareDatetime | None, Query(description="inclusive")] = None,
    until: Annotated[AwareDatetime | None, Query(description="exclusive")] = None,
    after: Annotated[int, Query(ge=0, le=MAX_POSITION,
                                description="the `next` of the previous page")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    newest_first: bool = False,
) -> dict[str, Any]:
    """Who did what to which memory, when and why (never memory content)."""
    page = caller.memwarden.audit(
        AuditFilter(tenant=tenant, actor=actor, cube_id=cube_id, types=event_type,
                    since=since, until=until),
        after=after, limit=limit, newest_first=newest_first)
    return {"items": [audit_document(e) for e in page],
            "next": page[-1].position if len(page) == limit else None}


@log.get("/verify", response_model=Verification, responses=_errors(*_AUTH, 422))
def verify_log(caller: CallerDep) -> dict[str, Any]:
    """Recompute the hash chain of the whole log and name the first broken event."""
    report = caller.memwarden.verify()
    brk = report.first_break
    return {"ok": report.ok, "checked": report.checked, "head_position": report.head_position,
            "first_break": None if brk is None else
            {"position": brk.position, "event_id": brk.event_id, "reason": brk.reason}}


keys = APIRouter(prefix="/keys", tags=["keys"], dependencies=_CHECKED)


@keys.post("", status_code=201, response_model=IssuedApiKey, responses=_errors(
    400, *_AUTH, 413, 422))
def create_key(body: KeyCreate, caller: CallerDep) -> dict[str, Any]:
    """Issue an API key; the response is the only place the key itself ever appears."""
    issued = caller.keys.issue(tenant=body.tenant, subject=body.subject, role=body.role)
    return {**key_as_dict(issued.record), "key": issued.secret}


@keys.get("", response_model=ApiKeyList, responses=_errors(*_AUTH, 422))
def list_keys(caller: CallerDep, tenant: Name | None = None,
              include_revoked: bool = False) -> dict[str, Any]:
    """The keys of a tenant (never the keys themselves)."""
    return {"items": [key_as_dict(r) for r in caller.keys.list(
        tenant=tenant, include_revoked=include_revoked)]}


@keys.delete("/{key_id}", response_model=ApiKey, responses=_errors(*_AUTH, 404, 409, 422))
def revoke_key(
    key_id: Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")],
    caller: CallerDep,
    reason: Annotated[Text, Query(min_length=1, description="why (recorded)")],
) -> dict[str, Any]:
    """Revoke a key: requests with it are refused from now on."""
    revoked = caller.keys.revoke(key_id, reason=reason)
    caller.services.keys.forget(key_id)
    return key_as_dict(revoked)


policies = APIRouter(prefix="/policies", tags=["policies"], dependencies=_CHECKED)


@policies.get("", response_model=PolicyRuleList, responses=_errors(*_AUTH, 422))
def list_policy_rules(caller: CallerDep) -> dict[str, Any]:
    """The access rules in force in the key's tenant (every rule, for a platform key)."""
    return {"items": [rule.fields() for rule in caller.memwarden.policy_rules()]}


@policies.post("", status_code=201, response_model=PolicyChange, responses=_errors(
    400, *_AUTH, 404, 409, 413, 422))
def add_policy_rule(body: PolicyChangeIn, caller: CallerDep) -> dict[str, Any]:
    """Put a rule in force: a PolicyRuleAdded event; every process applies it to its next
    request."""
    rule = PolicyRule.parse(body.rule)
    revision = caller.memwarden.add_policy_rule(rule, reason=body.reason)
    return {"rule": rule.fields(), "revision": revision}


@policies.delete("", response_model=PolicyChange, responses=_errors(*_AUTH, 404, 409, 422))
def remove_policy_rule(
    caller: CallerDep,
    rule: Annotated[list[Name],
                    Query(min_length=2, max_length=7,
                          description="the rule's fields in order, e.g. "
                                      "rule=p&rule=agent&rule=acme&rule=memory.read_content"
                                      "&rule=own")],
    reason: Annotated[Text, Query(min_length=1, description="why (recorded)")],
) -> dict[str, Any]:
    """Take a rule out of force: a PolicyRuleRemoved event."""
    parsed = PolicyRule.parse(rule)
    revision = caller.memwarden.remove_policy_rule(parsed, reason=reason)
    return {"rule": parsed.fields(), "revision": revision}


health = APIRouter(tags=["health"])


@health.get("/healthz", response_model=Health)
def healthz() -> dict[str, Any]:
    """The process is up (no key needed)."""
    return {"status": "ok"}


@health.get("/readyz", response_model=Readiness, responses=_errors(*_AUTH, 503))
def readyz(caller: CallerDep) -> dict[str, Any]:
    """The database answers; how far the read models have applied the log (platform keys)."""
    return {"status": "ready", **caller.memwarden.readiness()}


_ROUTERS = (memories, log, keys, policies, health,
            search_router(_caller, _CHECKED, _errors(*_AUTH, 422)),
            retention_router(_caller, _CHECKED, _errors),
            sensitive_router(_caller, _CHECKED, _errors),
            lineage_router(_caller, _CHECKED, _errors))

# -- the app ---------------------------------------------------------------------------------


def create_app(source: Settings | MemWarden | None = None) -> FastAPI:
    """The REST API over ``source``: settings (the app opens its backend and closes it on
    shutdown) or an open handle (shared; whoever opened it closes it)."""
    settings = source if isinstance(source, Settings) else Settings.from_env()
    if isinstance(source, MemWarden):
        memwarden, owned = source, False
    else:
        memwarden, owned = MemWarden.open(settings=settings, actor="memwarden:api"), True
    # Keys and memories are read from the projections: apply anything left unprojected.
    memwarden.projector.catch_up()
    memwarden.backend.sensitive.warm_up()
    max_body_bytes = _BODY_BYTES_PER_TEXT_BYTE * settings.max_text_bytes

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            memwarden.close()

    app = FastAPI(
        title="MemWarden",
        summary="Memory governance for LLM agents: every write an immutable, audited event.",
        version="1",
        lifespan=lifespan,
    )
    app.state.services = _Services(
        memwarden, _RecentKeys(ApiKeys(memwarden)))
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_exception_handler(MemWardenError, _domain_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error(max_body_bytes))
    app.add_exception_handler(EventStoreError, _store_error)
    app.add_exception_handler(Exception, _unexpected_error)
    for router in _ROUTERS:
        app.include_router(router, prefix="/v1")
    _problems_as_problem_json(app)
    return app
