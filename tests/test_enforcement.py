"""Enforcement on every surface: no REST route and no CLI command acts without the access policy,
and no subject of one tenant learns anything of another (issue 4).

Three kinds of test, over one shared world per database backend (built once per module):

* the REST route table: every route of the OpenAPI spec has an entry (a new route without one
  fails), needs a key (401 without one), and refuses a key that may do nothing there (403, or 404
  for another tenant's memory) without writing anything but AccessDenied events;
* the CLI command table: the same for every leaf of the ``memwarden`` command tree (exit 6, or 3
  for another tenant's memory), ``up`` and ``demo`` included;
* the cross-tenant matrix: each role of tenant A (acme) against each memory route, on a memory of
  its own tenant (the policy decides) and on memories of tenant B (globex): always 404, word for
  word what a nonexistent id gets, and the listings and audit trail show nothing of B.

Tenant B's memories are built to tempt a sloppy check: their creator, owner and ``shared_with``
carry the very subject names of tenant A's keys, so only the tenant tells them apart.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

import governance._up
from eventstore import StoredEvent
from governance import ENVIRONMENT_VARIABLES, ApiKeys, MemWarden, create_app
from governance._cli import cli
from governance._demo import seed_demo
from projections import MemoryState

PROBLEM_JSON = "application/problem+json"
ACCESS_DENIED = "AccessDenied"
EXIT_NOT_FOUND, EXIT_DENIED = 3, 6
A, B = "acme", "globex"

ROLES_OF_A = ("tenant_admin", "compliance_officer", "auditor", "agent", "data_subject")
SUBJECTS = {
    "admin": "admin:root",
    "tenant_admin": "manager:a",
    "compliance_officer": "officer:a",
    "auditor": "auditor:a",
    "agent": "agent:a",
    "data_subject": "user:a",
    "b_auditor": "auditor:b",
    "b_agent": "agent:b",
}
OUTSIDER = "data_subject"
"""Tenant A's data subject: nothing of tenant B is about it, whatever B's memories say."""
B_AUDITOR = "b_auditor"
"""Tenant B's auditor: in the right tenant, but may neither write nor read content."""


# -- the world: tenants A and B, built once per backend ---------------------------------------


@dataclass
class World:
    url: str
    mw: MemWarden
    client: TestClient
    secrets: dict[str, str]
    key_ids: dict[str, str]
    revoked_secret: str
    b: dict[str, MemoryState]
    """Tenant B's memories by name, each as of its last version."""
    b_first_positions: dict[str, int]
    b_words: list[str] = field(default_factory=list)
    """Every id, text, reason and tag of tenant B, and B's key ids: none may reach tenant A."""

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[who]}"}

    def head(self) -> int:
        self.mw.flush_reads()
        return self.mw.store.head_position()

    def events_since(self, head: int) -> list[StoredEvent]:
        self.mw.flush_reads()
        return self.mw.store.read_all(head, limit=None)

    def leaks(self, body: str, *, sent: str = "") -> list[str]:
        """B's words in ``body``, but for those the request itself ``sent``."""
        return [word for word in self.b_words if word in body and word not in sent]


@pytest.fixture(scope="module", params=("sqlite", "postgresql"))
def world_url(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Like conftest's ``database_url``, but one database for the whole module."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('enforcement') / 'memwarden.db'}"
        return
    server: str = request.getfixturevalue("postgres_server")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(server).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _b_memory(mw: MemWarden, name: str, *, actor: str, owner: str,
              metadata: dict[str, Any] | None = None) -> tuple[MemoryState, int]:
    """A memory of tenant B with two versions; returns it and the position of its version 1."""
    word = f"globex-{name}-{uuid.uuid4().hex[:8]}"
    as_actor = mw.acting_as(actor)
    first = as_actor.add(f"{word} secret v1", tenant=B, owner=owner, cube_id=word,
                         metadata={"tags": [f"{word}-tag"], **(metadata or {})},
                         reason=f"{word} reason v1")
    second = as_actor.update(word, text=f"{word} secret v2", reason=f"{word} reason v2")
    return second, first.position


@pytest.fixture(scope="module")
def world(world_url: str) -> Iterator[World]:
    with MemWarden.open(world_url, actor=SUBJECTS["admin"]) as mw:
        keys = ApiKeys(mw)
        secrets, key_ids = {}, {}
        for who, subject in SUBJECTS.items():
            tenant = "*" if who == "admin" else B if who.startswith("b_") else A
            role = who.removeprefix("b_")
            issued = keys.issue(tenant=tenant, subject=subject, role=role)
            secrets[who], key_ids[who] = issued.secret, issued.record.key_id
        revoked = keys.issue(tenant=A, subject="agent:revoked", role="agent")
        keys.revoke(revoked.record.key_id, reason="left the project")

        # Tenant B, written by the platform admin under subject names that tenant A's keys carry.
        everyone_in_a = [SUBJECTS[role] for role in ROLES_OF_A]
        b, first_positions = {}, {}
        for name, actor, owner, metadata in (
                ("plain", "admin:root", "customer:bo", None),
                ("colliding", SUBJECTS["agent"], SUBJECTS["data_subject"],
                 {"shared_with": everyone_in_a}),
                ("sensitive", SUBJECTS["agent"], SUBJECTS["data_subject"],
                 {"labels": ["sensitive"], "shared_with": everyone_in_a}),
                ("deleted", SUBJECTS["agent"], SUBJECTS["data_subject"],
                 {"shared_with": everyone_in_a})):
            b[name], first_positions[name] = _b_memory(mw, name, actor=actor, owner=owner,
                                                       metadata=metadata)
        b["deleted"] = mw.acting_as(SUBJECTS["agent"]).delete(
            b["deleted"].cube_id, reason=f"{b['deleted'].cube_id} reason v3")
        mw.place_hold(tenant=B, reason="globex litigation", case_id="GX-1")
        b_words = [word for state in b.values() for word in (
            state.cube_id, f"{state.cube_id} secret", f"{state.cube_id} reason",
            f"{state.cube_id}-tag")] + [key_ids["b_auditor"], key_ids["b_agent"]]

        # Tenant A: a few memories of its own, read by its agent.
        for n in (1, 2):
            mw.acting_as(SUBJECTS["agent"]).add(
                f"acme note {n}", tenant=A, owner=SUBJECTS["data_subject"], cube_id=f"acme-{n}")

        with TestClient(create_app(mw)) as client:
            built = World(world_url, mw, client, secrets, key_ids, revoked.secret, b,
                          first_positions, b_words)
            # Tenant A's subjects have already tried tenant B's ids: those denials must not
            # reach tenant A's audit trail with B's ids in them either.
            for role in ROLES_OF_A:
                for state in b.values():  # (the tests below check the answers)
                    client.get(f"/v1/memories/{state.cube_id}", headers=built.headers(role))
                client.get("/v1/memories", params={"tenant": B}, headers=built.headers(role))
            yield built


# -- REST: every route of the spec ------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    method: str
    url: str
    params: dict[str, Any] | None = None
    json: dict[str, Any] | None = None

    def send(self, client: TestClient, headers: dict[str, str] | None = None) -> Any:
        return client.request(self.method, self.url, params=self.params, json=self.json,
                              headers=headers or {})


@dataclass(frozen=True)
class RouteCase:
    request: Callable[[World], Req]
    refused: dict[str, int]
    """Who is refused, with which status: 403, or 404 for another tenant's memory."""
    public: bool = False


def _memory(name: str, suffix: str = "") -> Callable[[World], str]:
    return lambda w: f"/v1/memories/{w.b[name].cube_id}{suffix}"


_ON_B_MEMORY = {OUTSIDER: 404, B_AUDITOR: 403}
_ANY_OTHER_TENANT = {OUTSIDER: 403}
_WRITE = {OUTSIDER: 403, B_AUDITOR: 403}

ROUTES: dict[str, RouteCase] = {
    "POST /v1/memories": RouteCase(
        lambda w: Req("POST", "/v1/memories", json={"text": "planted", "tenant": B,
                                                    "owner": SUBJECTS[OUTSIDER]}), _WRITE),
    "GET /v1/memories": RouteCase(
        lambda w: Req("GET", "/v1/memories", params={"tenant": B}), _ANY_OTHER_TENANT),
    "GET /v1/memories/{cube_id}": RouteCase(
        lambda w: Req("GET", _memory("colliding")(w)), _ON_B_MEMORY),
    "PATCH /v1/memories/{cube_id}": RouteCase(
        lambda w: Req("PATCH", _memory("colliding")(w),
                      json={"text": "overwritten", "reason": "planted"}), _ON_B_MEMORY),
    "DELETE /v1/memories/{cube_id}": RouteCase(
        lambda w: Req("DELETE", _memory("colliding")(w), params={"reason": "planted"}),
        _ON_B_MEMORY),
    "POST /v1/memories/{cube_id}/restore": RouteCase(
        lambda w: Req("POST", _memory("deleted", "/restore")(w), json={"reason": "planted"}),
        _ON_B_MEMORY),
    "POST /v1/memories/{cube_id}/rollback": RouteCase(
        lambda w: Req("POST", _memory("colliding", "/rollback")(w),
                      json={"to_version": 1, "reason": "planted"}), _ON_B_MEMORY),
    "GET /v1/memories/{cube_id}/versions": RouteCase(
        lambda w: Req("GET", _memory("colliding", "/versions")(w)), _ON_B_MEMORY),
    "GET /v1/memories/{cube_id}/versions/{number}": RouteCase(
        lambda w: Req("GET", _memory("colliding", "/versions/1")(w)), _ON_B_MEMORY),
    "GET /v1/memories/{cube_id}/diff": RouteCase(
        lambda w: Req("GET", _memory("colliding", "/diff")(w), params={"from": 1, "to": 2}),
        _ON_B_MEMORY),
    "GET /v1/audit": RouteCase(
        lambda w: Req("GET", "/v1/audit", params={"tenant": B}), _ANY_OTHER_TENANT),
    "GET /v1/verify": RouteCase(lambda w: Req("GET", "/v1/verify"), _ANY_OTHER_TENANT),
    "POST /v1/keys": RouteCase(
        lambda w: Req("POST", "/v1/keys", json={"tenant": B, "subject": "agent:planted",
                                                "role": "agent"}), _WRITE),
    "GET /v1/keys": RouteCase(lambda w: Req("GET", "/v1/keys", params={"tenant": B}), _WRITE),
    "DELETE /v1/keys/{key_id}": RouteCase(
        lambda w: Req("DELETE", f"/v1/keys/{w.key_ids['b_agent']}", params={"reason": "x"}),
        {OUTSIDER: 404, B_AUDITOR: 403}),
    "GET /v1/policies": RouteCase(lambda w: Req("GET", "/v1/policies"), _ANY_OTHER_TENANT),
    "POST /v1/policies": RouteCase(
        lambda w: Req("POST", "/v1/policies", json={
            "rule": ["p", "data_subject", B, "memory.read_content", "any"], "reason": "planted"}),
        _WRITE),
    "DELETE /v1/policies": RouteCase(
        lambda w: Req("DELETE", "/v1/policies", params={
            "rule": ["p", "auditor", "*", "audit.read", "any"], "reason": "planted"}), _WRITE),
    "GET /v1/healthz": RouteCase(lambda w: Req("GET", "/v1/healthz"), {}, public=True),
    "GET /v1/readyz": RouteCase(lambda w: Req("GET", "/v1/readyz"), _WRITE),
    "GET /v1/lineage/{ident}": RouteCase(
        lambda w: Req("GET", f"/v1/lineage/{w.b['colliding'].cube_id}"), {OUTSIDER: 404}),
    "GET /v1/artifacts": RouteCase(
        lambda w: Req("GET", "/v1/artifacts", params={"tenant": B}), _ANY_OTHER_TENANT),
    "POST /v1/search": RouteCase(
        lambda w: Req("POST", "/v1/search", json={"query": "secret", "tenant": B}),
        _ANY_OTHER_TENANT),
    "GET /v1/subjects/{subject}/export": RouteCase(
        lambda w: Req("GET", "/v1/subjects/user:b-person/export",
                      params={"tenant": B}), _ON_B_MEMORY),
    "POST /v1/subjects/{subject}/erase": RouteCase(
        lambda w: Req("POST", "/v1/subjects/user:b-person/erase",
                      json={"tenant": B, "reason": "planted"}), _ON_B_MEMORY),
    "POST /v1/memories/{cube_id}/erase": RouteCase(
        lambda w: Req("POST", _memory("colliding", "/erase")(w), json={"reason": "planted"}),
        _ON_B_MEMORY),
    "GET /v1/findings": RouteCase(
        lambda w: Req("GET", "/v1/findings", params={"tenant": B}), _ANY_OTHER_TENANT),
    "GET /v1/erasures": RouteCase(
        lambda w: Req("GET", "/v1/erasures", params={"tenant": B}), _ANY_OTHER_TENANT),
    "GET /v1/retention/rules": RouteCase(
        lambda w: Req("GET", "/v1/retention/rules"), _ANY_OTHER_TENANT),
    "POST /v1/retention/run": RouteCase(
        lambda w: Req("POST", "/v1/retention/run", json={"tenant": B, "dry_run": True}), _WRITE),
    "GET /v1/retention/report": RouteCase(
        lambda w: Req("GET", "/v1/retention/report", params={"tenant": B}), _ANY_OTHER_TENANT),
    "POST /v1/memories/{cube_id}/recall": RouteCase(
        lambda w: Req("POST", _memory("colliding", "/recall")(w), json={"reason": "planted"}),
        _ON_B_MEMORY),
    "GET /v1/holds": RouteCase(
        lambda w: Req("GET", "/v1/holds", params={"tenant": B}), _ANY_OTHER_TENANT),
    "POST /v1/holds": RouteCase(
        lambda w: Req("POST", "/v1/holds", json={"tenant": B, "reason": "planted",
                                                 "case_id": "x"}), _WRITE),
    "DELETE /v1/holds/{hold_id}": RouteCase(
        lambda w: Req("DELETE", f"/v1/holds/{w.mw.holds(tenant=B)[0].hold_id}",
                      params={"reason": "planted"}), {OUTSIDER: 404, B_AUDITOR: 403}),
}

# Another tenant's API key is "not found" before the policy is asked: nothing is recorded (unlike
# another tenant's memory, whose denial is recorded at platform level).
_UNRECORDED = {("DELETE /v1/keys/{key_id}", OUTSIDER), ("keys revoke", OUTSIDER),
               ("DELETE /v1/holds/{hold_id}", OUTSIDER), ("hold release", OUTSIDER)}

def _route_params() -> list[Any]:
    return [pytest.param(route, id=route) for route in ROUTES]


def test_the_route_table_covers_the_openapi_spec_exactly(world: World) -> None:
    spec = world.client.get("/openapi.json").json()
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    routes = {f"{method.upper()} {path}" for path, operations in spec["paths"].items()
              for method in operations if method in methods}
    assert routes == set(ROUTES), (
        f"routes without an entry: {sorted(routes - set(ROUTES))}; "
        f"entries without a route: {sorted(set(ROUTES) - routes)}")
    assert {route for route, case in ROUTES.items() if case.public} == {"GET /v1/healthz"}


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_route_needs_a_valid_key(world: World, route: str) -> None:
    case, head = ROUTES[route], world.head()
    request = case.request(world)
    if case.public:
        assert request.send(world.client).status_code == 200
        return
    for headers in ({}, {"Authorization": "Bearer mwk_0123456789abcdef_forged"},
                    {"Authorization": f"Bearer {world.revoked_secret}"},
                    {"Authorization": "Basic dXNlcjpwYXNz"}):
        response = request.send(world.client, headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["content-type"] == PROBLEM_JSON
        assert response.headers["www-authenticate"] == "Bearer"
        assert not world.leaks(response.text)
    assert world.events_since(head) == []


@pytest.mark.parametrize("route", _route_params())
def test_every_route_refuses_a_key_that_may_not(world: World, route: str) -> None:
    case = ROUTES[route]
    assert case.public or case.refused, "every keyed route needs a refused key"
    request = case.request(world)
    for who, status in case.refused.items():
        head = world.head()
        response = request.send(world.client, world.headers(who))
        assert response.status_code == status, (who, response.text)
        assert response.headers["content-type"] == PROBLEM_JSON
        if status == 404 and "/memories/" in request.url:
            cube_id = request.url.split("/")[3]
            assert response.json()["detail"] == f"no memory with id {cube_id!r}"
        assert not world.leaks(response.text, sent=repr(request))
        written = world.events_since(head)
        assert all(e.type == ACCESS_DENIED for e in written), [e.type for e in written]
        assert all(e.actor == SUBJECTS[who] and e.payload["key_id"] == world.key_ids[who]
                   for e in written)
        assert len(written) == (0 if (route, who) in _UNRECORDED else 1), written


# -- CLI: every command of the tree -----------------------------------------------------------


def _leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[str]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _leaf_commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name))


@dataclass(frozen=True)
class CommandCase:
    args: Callable[[World], list[str]]
    refused: dict[str, int]
    """Who is refused, with which exit code: 6, or 3 for another tenant's memory or key."""


_CLI_ON_B_MEMORY = {OUTSIDER: EXIT_NOT_FOUND, B_AUDITOR: EXIT_DENIED}
_CLI_DENIED = {OUTSIDER: EXIT_DENIED}
_CLI_WRITE = {OUTSIDER: EXIT_DENIED, B_AUDITOR: EXIT_DENIED}


def _b_id(name: str) -> Callable[[World], str]:
    return lambda w: w.b[name].cube_id


def _b_bundle(w: World) -> str:
    """A bundle of tenant B's memories, exported by the platform admin (no event written)."""
    from governance._bundles import export_bundle

    path = Path(tempfile.gettempdir()) / f"b-{uuid.uuid4().hex[:8]}.bundle"
    path.write_text(json.dumps(export_bundle(w.mw, B)))
    return str(path)


COMMANDS: dict[str, CommandCase] = {
    "add": CommandCase(lambda w: ["add", "planted", "--tenant", B, "--owner", "user:a"],
                       _CLI_WRITE),
    "get": CommandCase(lambda w: ["get", _b_id("colliding")(w)], _CLI_ON_B_MEMORY),
    "list": CommandCase(lambda w: ["list", "--tenant", B], _CLI_DENIED),
    "update": CommandCase(lambda w: ["update", _b_id("colliding")(w), "--text", "overwritten"],
                          _CLI_ON_B_MEMORY),
    "delete": CommandCase(lambda w: ["delete", _b_id("colliding")(w), "--reason", "planted"],
                          _CLI_ON_B_MEMORY),
    "restore": CommandCase(lambda w: ["restore", _b_id("deleted")(w)], _CLI_ON_B_MEMORY),
    "history": CommandCase(lambda w: ["history", _b_id("colliding")(w)], _CLI_ON_B_MEMORY),
    "diff": CommandCase(lambda w: ["diff", _b_id("colliding")(w), "1", "2"], _CLI_ON_B_MEMORY),
    "rollback": CommandCase(lambda w: ["rollback", _b_id("colliding")(w), "1", "--reason", "x"],
                            _CLI_ON_B_MEMORY),
    "as-of": CommandCase(lambda w: ["as-of", _b_id("colliding")(w), "--position",
                                    str(w.b_first_positions["colliding"])], _CLI_ON_B_MEMORY),
    "audit": CommandCase(lambda w: ["audit", "--tenant", B], _CLI_DENIED),
    "verify": CommandCase(lambda w: ["verify"], _CLI_DENIED),
    "projections rebuild": CommandCase(lambda w: ["projections", "rebuild"], _CLI_WRITE),
    "projections status": CommandCase(lambda w: ["projections", "status"], _CLI_WRITE),
    "demo": CommandCase(lambda w: ["demo"], _CLI_WRITE),
    "keys create": CommandCase(lambda w: ["keys", "create", "--tenant", B, "--subject",
                                          "agent:planted", "--role", "agent"], _CLI_WRITE),
    "keys revoke": CommandCase(lambda w: ["keys", "revoke", w.key_ids["b_agent"], "--reason",
                                          "planted"],
                               {OUTSIDER: EXIT_NOT_FOUND, B_AUDITOR: EXIT_DENIED}),
    "keys list": CommandCase(lambda w: ["keys", "list", "--tenant", B], _CLI_WRITE),
    "up": CommandCase(lambda w: ["up", "--port", "0"], _CLI_WRITE),
    "relay": CommandCase(lambda w: ["relay", "--once"], _CLI_WRITE),
    "project": CommandCase(lambda w: ["project", "--source", "kafka", "--once"], _CLI_WRITE),
    "work": CommandCase(lambda w: ["work", "--once"], _CLI_WRITE),
    "bundle export": CommandCase(lambda w: ["bundle", "export", "--tenant", B, "--out",
                                            "/nonexistent/never-written.bundle"], _CLI_WRITE),
    "bundle import": CommandCase(lambda w: ["bundle", "import", _b_bundle(w)], _CLI_WRITE),
    "bundle identity": CommandCase(lambda w: ["bundle", "identity"], _CLI_WRITE),
    "dashboard": CommandCase(lambda w: ["dashboard"], _CLI_WRITE),
    "policy list": CommandCase(lambda w: ["policy", "list"], _CLI_DENIED),
    "policy add": CommandCase(lambda w: ["policy", "add", "p", "data_subject", B,
                                         "memory.read_content", "any", "--reason", "planted"],
                              _CLI_WRITE),
    "policy remove": CommandCase(lambda w: ["policy", "remove", "p", "auditor", "*",
                                            "audit.read", "any", "--reason", "planted"],
                                 _CLI_WRITE),
    "search": CommandCase(lambda w: ["search", "secret", "--tenant", B], _CLI_DENIED),
    "erase": CommandCase(lambda w: ["erase", "user:b-person", "--tenant", B,
                                    "--reason", "planted"], _CLI_ON_B_MEMORY),
    "export": CommandCase(lambda w: ["export", "user:b-person", "--tenant", B],
                          _CLI_ON_B_MEMORY),
    "findings": CommandCase(lambda w: ["findings", "--tenant", B], _CLI_DENIED),
    "erasures": CommandCase(lambda w: ["erasures", "--tenant", B], _CLI_DENIED),
    "convert parametric": CommandCase(lambda w: ["convert", "parametric", "--tenant", B],
                                      _CLI_WRITE),
    "convert activation": CommandCase(lambda w: ["convert", "activation", "--tenant", B,
                                                 "--dry-run"], _CLI_WRITE),
    # Tenant A's subject gets "not found" here too (exit 3), in words the table cannot check.
    "convert run": CommandCase(lambda w: ["convert", "run", "--tenant", B, "--dry-run"],
                               _CLI_WRITE),
    "convert plaintext": CommandCase(lambda w: ["convert", "plaintext", _b_id("colliding")(w)],
                                     {B_AUDITOR: EXIT_DENIED}),
    "lineage": CommandCase(lambda w: ["lineage", _b_id("colliding")(w)],
                           {OUTSIDER: EXIT_NOT_FOUND}),
    "artifacts": CommandCase(lambda w: ["artifacts", "--tenant", B], _CLI_DENIED),
    "retention run": CommandCase(lambda w: ["retention", "run", "--tenant", B, "--dry-run"],
                                 _CLI_WRITE),
    "retention report": CommandCase(lambda w: ["retention", "report", "--tenant", B],
                                    _CLI_DENIED),
    "retention rules": CommandCase(lambda w: ["retention", "rules"], _CLI_DENIED),
    "recall": CommandCase(lambda w: ["recall", _b_id("colliding")(w), "--reason", "planted"],
                          _CLI_ON_B_MEMORY),
    "hold place": CommandCase(lambda w: ["hold", "place", "--tenant", B, "--reason", "planted",
                                         "--case", "x"], _CLI_WRITE),
    "hold release": CommandCase(lambda w: ["hold", "release", w.mw.holds(tenant=B)[0].hold_id,
                                           "--reason", "planted"],
                                {OUTSIDER: EXIT_NOT_FOUND, B_AUDITOR: EXIT_DENIED}),
    "hold list": CommandCase(lambda w: ["hold", "list", "--tenant", B], _CLI_DENIED),
}
"""Also refused, not in the table: as-of --tenant of another tenant (below)."""

_MISATTRIBUTED = {"demo"}
"""Refused, but the denial names another actor: test_demo_acts_only_as_the_key_s_subject."""


@pytest.fixture
def memwarden_cli(world: World, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """``memwarden --db <world> --key <key> ...``; ``up`` fails the test if it starts."""
    for variable in (*ENVIRONMENT_VARIABLES, "MEMWARDEN_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("COLUMNS", "250")

    def started(*args: Any, **kwargs: Any) -> None:
        pytest.fail("memwarden up started the stack for a key that may not operate the platform")

    monkeypatch.setattr(governance._up, "run_stack", started)

    def invoke(key: str, *args: str) -> Result:
        return CliRunner().invoke(cli, ["--db", world.url, "--key", key, *args])

    return invoke


def test_the_command_table_covers_the_cli_exactly() -> None:
    commands = set(_leaf_commands(cli))
    assert commands == set(COMMANDS), (
        f"commands without an entry: {sorted(commands - set(COMMANDS))}; "
        f"entries without a command: {sorted(set(COMMANDS) - commands)}")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_a_key_that_may_not(
        world: World, memwarden_cli: Callable[..., Result], command: str) -> None:
    case = COMMANDS[command]
    args = case.args(world)
    for who, code in case.refused.items():
        head = world.head()
        result = memwarden_cli(world.secrets[who], *args)
        assert result.exit_code == code, (who, result.output, result.exception)
        assert result.stdout == ""
        if code == EXIT_NOT_FOUND and args[0] not in ("keys", "hold"):
            kind = "subject" if args[0] in ("erase", "export") else "memory"
            assert result.stderr.strip() == f"error: no {kind} with id {args[1]!r}"
        assert not world.leaks(result.stderr, sent=" ".join(args))
        written = world.events_since(head)
        assert all(e.type == ACCESS_DENIED for e in written), [e.type for e in written]
        if command not in _MISATTRIBUTED:
            assert all(e.actor == SUBJECTS[who] and e.payload["key_id"] == world.key_ids[who]
                       for e in written), [(e.actor, e.payload) for e in written]
        assert len(written) == (0 if (command, who) in _UNRECORDED else 1), written


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_an_invalid_key(
        world: World, memwarden_cli: Callable[..., Result], command: str) -> None:
    head = world.head()
    for key in ("mwk_0123456789abcdef_forged", world.revoked_secret):
        result = memwarden_cli(key, *COMMANDS[command].args(world))
        assert result.exit_code == EXIT_DENIED, (result.output, result.exception)
        assert result.stdout == ""
    assert world.events_since(head) == []


def test_time_travel_over_another_tenant_is_refused(
        world: World, memwarden_cli: Callable[..., Result]) -> None:
    head = world.head()
    result = memwarden_cli(world.secrets[OUTSIDER], "as-of", "--tenant", B, "--position",
                           str(world.head()), "--json")
    assert result.exit_code == EXIT_DENIED, result.output
    assert result.stdout == "" and not world.leaks(result.stderr)
    assert [e.type for e in world.events_since(head)] == [ACCESS_DENIED]


def test_demo_is_refused_even_once_seeded(database_url: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in (*ENVIRONMENT_VARIABLES, "MEMWARDEN_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    with MemWarden.open(database_url, actor="admin:root") as mw:
        seed_demo(mw)
        secret = ApiKeys(mw).issue(tenant=A, subject="user:a", role="data_subject").secret
    result = CliRunner().invoke(cli, ["--db", database_url, "--key", secret, "demo"])
    assert result.exit_code == EXIT_DENIED, result.output


def test_demo_acts_only_as_the_key_s_subject(database_url: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in (*ENVIRONMENT_VARIABLES, "MEMWARDEN_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    with MemWarden.open(database_url, actor="admin:root") as mw:
        issued = ApiKeys(mw).issue(tenant="acme-health", subject="agent:mallory", role="agent")
        head = mw.store.head_position()
    result = CliRunner().invoke(cli, ["--db", database_url, "--key", issued.secret, "demo"])
    with MemWarden.open(database_url, actor="admin:root") as mw:
        written = mw.store.read_all(head, limit=None)
    assert {e.actor for e in written} <= {"agent:mallory"}, [(e.type, e.actor) for e in written]
    if result.exit_code != 0:  # a refused command writes nothing
        assert [e.type for e in written] == [ACCESS_DENIED]


# -- the cross-tenant matrix: every role of A x every memory route x own/other tenant ---------

# What each role of tenant A may do to a memory of its own tenant created by its agent and about
# its data subject (policies/policy.csv).
MAY = {
    "tenant_admin": {"read", "update", "delete", "restore", "history", "recall"},
    "compliance_officer": {"read", "update", "delete", "restore", "rollback", "history",
                           "erase", "recall"},
    "auditor": {"history"},
    "agent": {"read", "update", "delete", "restore", "history"},
    "data_subject": {"read", "history"},
}


@dataclass(frozen=True)
class MemoryRoute:
    needs: frozenset[str]
    request: Callable[[str, int], Req]
    """From the memory's id and the log position of its version 1."""
    deleted: bool = False
    """Whether the route is tried on a deleted memory (restore)."""


MEMORY_ROUTES: dict[str, MemoryRoute] = {
    "get": MemoryRoute(frozenset({"read"}), lambda m, p: Req("GET", f"/v1/memories/{m}")),
    "get as_of": MemoryRoute(frozenset({"read"}), lambda m, p: Req(
        "GET", f"/v1/memories/{m}", params={"as_of": p})),
    "update": MemoryRoute(frozenset({"update"}), lambda m, p: Req(
        "PATCH", f"/v1/memories/{m}", json={"text": "overwritten", "reason": "test"})),
    "delete": MemoryRoute(frozenset({"delete"}), lambda m, p: Req(
        "DELETE", f"/v1/memories/{m}", params={"reason": "test"})),
    "restore": MemoryRoute(frozenset({"restore"}), lambda m, p: Req(
        "POST", f"/v1/memories/{m}/restore", json={"reason": "test"}), deleted=True),
    "rollback": MemoryRoute(frozenset({"rollback"}), lambda m, p: Req(
        "POST", f"/v1/memories/{m}/rollback", json={"to_version": 1, "reason": "test"})),
    "versions": MemoryRoute(frozenset({"history", "read"}), lambda m, p: Req(
        "GET", f"/v1/memories/{m}/versions")),
    "version": MemoryRoute(frozenset({"history", "read"}), lambda m, p: Req(
        "GET", f"/v1/memories/{m}/versions/1")),
    "diff": MemoryRoute(frozenset({"history", "read"}), lambda m, p: Req(
        "GET", f"/v1/memories/{m}/diff", params={"from": 1, "to": 2})),
    "erase": MemoryRoute(frozenset({"erase"}), lambda m, p: Req(
        "POST", f"/v1/memories/{m}/erase", json={"reason": "test"})),
    # (a memory not in the cold archive is simply read back)
    "recall": MemoryRoute(frozenset({"recall", "read"}), lambda m, p: Req(
        "POST", f"/v1/memories/{m}/recall", json={"reason": "test"})),
}


def test_the_matrix_covers_every_memory_route_with_an_id() -> None:
    paths = {route.split(" ", 1)[1] for route in ROUTES}
    with_id = {path for path in paths if "{cube_id}" in path}
    tried = {MEMORY_ROUTES[name].request("{cube_id}", 1).url.replace("/versions/1",
                                                                     "/versions/{number}")
             for name in MEMORY_ROUTES}
    assert tried == with_id


def _own_memory(world: World, role: str, route: str) -> tuple[MemoryState, int]:
    """A memory of tenant A created by its agent, about its data subject, with two versions."""
    cube_id = f"acme-{role}-{route.replace(' ', '-')}-{uuid.uuid4().hex[:8]}"
    agent = world.mw.acting_as(SUBJECTS["agent"])
    first = agent.add(f"{cube_id} v1", tenant=A, owner=SUBJECTS["data_subject"], cube_id=cube_id)
    state = agent.update(cube_id, text=f"{cube_id} v2", reason="second version")
    if MEMORY_ROUTES[route].deleted:
        state = agent.delete(cube_id, reason="so that it can be restored")
    return state, first.position


def _without(body: dict[str, Any], cube_id: str) -> dict[str, Any]:
    return {key: (value.replace(cube_id, "<id>") if isinstance(value, str) else value)
            for key, value in body.items()}


@pytest.mark.parametrize("where", ["own tenant", "other tenant"])
@pytest.mark.parametrize("route", list(MEMORY_ROUTES))
@pytest.mark.parametrize("role", ROLES_OF_A)
def test_a_role_of_tenant_a_on_a_memory(world: World, role: str, route: str,
                                        where: str) -> None:
    memory_route, headers = MEMORY_ROUTES[route], world.headers(role)
    if where == "own tenant":
        state, first = _own_memory(world, role, route)
        head = world.head()
        response = memory_route.request(state.cube_id, first).send(world.client, headers)
        if memory_route.needs <= MAY[role]:
            assert response.status_code == 200, response.text
            assert state.cube_id in response.text
        else:  # in its own tenant a refusal says so: 403, never a pretended 404
            assert response.status_code == 403, response.text
            assert [e.type for e in world.events_since(head)] == [ACCESS_DENIED]
        assert not world.leaks(response.text)
        return

    missing = f"globex-missing-{uuid.uuid4().hex[:8]}"
    absent = memory_route.request(missing, 1).send(world.client, headers)
    assert absent.status_code == 404
    for name, state in world.b.items():
        head = world.head()
        request = memory_route.request(state.cube_id, world.b_first_positions[name])
        response = request.send(world.client, headers)
        # Word for word what a nonexistent id gets: nothing tells B's ids from made-up ones.
        assert response.status_code == 404, (name, response.text)
        assert response.headers["content-type"] == absent.headers["content-type"]
        assert _without(response.json(), state.cube_id) == _without(absent.json(), missing)
        assert not world.leaks(response.text, sent=state.cube_id)
        # Tenant B is untouched; the attempt is recorded at platform level, never in B's trail.
        written = world.events_since(head)
        assert [(e.type, e.tenant, e.stream_id, e.actor) for e in written] == [
            (ACCESS_DENIED, None, "denials", SUBJECTS[role])]
        assert not world.leaks(repr(written[0].payload), sent=state.cube_id)
        assert world.mw.store.stream_version(state.cube_id) == state.version


def test_tenant_b_is_real_to_the_platform_admin(world: World) -> None:
    """The 404s above hide memories that exist: the platform admin reaches every one of them."""
    for name, state in world.b.items():
        for route in ("get", "get as_of", "versions", "version", "diff"):
            request = MEMORY_ROUTES[route].request(state.cube_id, world.b_first_positions[name])
            if route == "diff":  # from the first version to the last: when Presidio finds
                # something in the random id, version 2 is its SensitiveDataDetected, not the update
                request = Req("GET", f"/v1/memories/{state.cube_id}/diff",
                              params={"from": 1, "to": state.version})
            response = request.send(world.client, world.headers("admin"))
            assert response.status_code == 200, response.text
            assert f"{state.cube_id} secret" in response.text


# -- listings: nothing of tenant B, whatever the filter ---------------------------------------

AUDITING = {"tenant_admin", "compliance_officer", "auditor"}
MANAGING_KEYS = {"tenant_admin"}

LISTINGS: dict[str, tuple[Callable[[World], Req], Callable[[str], int]]] = {
    "memories": (lambda w: Req("GET", "/v1/memories"), lambda role: 200),
    "memories of A's data subject": (
        lambda w: Req("GET", "/v1/memories", params={"owner": SUBJECTS["data_subject"]}),
        lambda role: 200),
    "deleted memories": (lambda w: Req("GET", "/v1/memories", params={"state": "deleted"}),
                         lambda role: 200),
    "memories by label": (lambda w: Req("GET", "/v1/memories", params={"label": "sensitive"}),
                          lambda role: 200),
    "memories of B": (lambda w: Req("GET", "/v1/memories", params={"tenant": B}),
                      lambda role: 403),
    "memories after B's id": (
        lambda w: Req("GET", "/v1/memories", params={"after": "globex"}), lambda role: 200),
    "audit": (lambda w: Req("GET", "/v1/audit", params={"limit": 1000}),
              lambda role: 200 if role in AUDITING else 403),
    "audit newest first": (
        lambda w: Req("GET", "/v1/audit", params={"newest_first": True, "limit": 1000}),
        lambda role: 200 if role in AUDITING else 403),
    "audit of a memory of B": (
        lambda w: Req("GET", "/v1/audit", params={"cube_id": w.b["colliding"].cube_id}),
        lambda role: 200 if role in AUDITING else 403),
    "audit by B's writer": (
        lambda w: Req("GET", "/v1/audit", params={"actor": SUBJECTS["agent"], "limit": 1000}),
        lambda role: 200 if role in AUDITING else 403),
    "audit of denials": (
        lambda w: Req("GET", "/v1/audit", params={"type": ACCESS_DENIED, "limit": 1000}),
        lambda role: 200 if role in AUDITING else 403),
    "audit of B": (lambda w: Req("GET", "/v1/audit", params={"tenant": B}), lambda role: 403),
    "keys": (lambda w: Req("GET", "/v1/keys", params={"include_revoked": True}),
             lambda role: 200 if role in MANAGING_KEYS else 403),
    "keys of B": (lambda w: Req("GET", "/v1/keys", params={"tenant": B}), lambda role: 403),
}


@pytest.mark.parametrize("listing", list(LISTINGS))
@pytest.mark.parametrize("role", ROLES_OF_A)
def test_a_listing_shows_tenant_a_nothing_of_tenant_b(world: World, role: str,
                                                      listing: str) -> None:
    request, status = LISTINGS[listing]
    response = request(world).send(world.client, world.headers(role))
    assert response.status_code == status(role), response.text
    assert not world.leaks(response.text)
    if response.status_code == 200:
        assert B not in response.text  # not even the tenant's name
        items = response.json()["items"]
        assert all(item.get("tenant") == A for item in items)
        if listing == "audit of a memory of B":
            assert items == []
        elif listing == "audit" or (listing == "memories" and role != "auditor"):
            assert items  # the listing shows A's own: not empty by accident
