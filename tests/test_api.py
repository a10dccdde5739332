"""The REST API in process (Starlette's test client), on every database backend.

What a client can rely on: each route does what the issue says, the key's subject is the actor of
every event, a key acts only in its own tenant, errors are problem details a person can act on,
and a request that fails writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from governance import ApiKeys, InvalidCommand, MemWarden, Settings, create_app
from governance._cli import cli

PROBLEM_JSON = "application/problem+json"


@pytest.fixture
def memwarden(database_url: str) -> Iterator[MemWarden]:
    with MemWarden.open(database_url, actor="test:setup") as handle:
        yield handle


@pytest.fixture
def client(memwarden: MemWarden) -> Iterator[TestClient]:
    with TestClient(create_app(memwarden)) as test_client:
        yield test_client


def bearer(memwarden: MemWarden, *, tenant: str, subject: str, role: str) -> dict[str, str]:
    issued = ApiKeys(memwarden.acting_as("test:setup")).issue(
        tenant=tenant, subject=subject, role=role)
    return {"Authorization": f"Bearer {issued.secret}"}


@pytest.fixture
def admin(memwarden: MemWarden) -> dict[str, str]:
    return bearer(memwarden, tenant="*", subject="admin:root", role="admin")


@pytest.fixture
def agent(memwarden: MemWarden) -> dict[str, str]:
    return bearer(memwarden, tenant="acme", subject="agent:planner", role="agent")


@pytest.fixture
def officer(memwarden: MemWarden) -> dict[str, str]:
    return bearer(memwarden, tenant="acme", subject="officer:jane", role="compliance_officer")


def add(client: TestClient, headers: dict[str, str], text: str = "Prefers window seats",
        **fields: Any) -> dict[str, Any]:
    body = {"text": text, "tenant": "acme", "owner": "user:ana", **fields}
    response = client.post("/v1/memories", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def assert_problem(response: Any, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    problem = response.json()
    assert problem["status"] == status
    for word in words:
        assert word in problem["detail"], problem["detail"]
    return problem


# -- memories --------------------------------------------------------------------------------


def test_a_memory_lives_through_update_delete_restore_and_rollback(
        client: TestClient, agent: dict[str, str], officer: dict[str, str]) -> None:
    created = add(client, agent, metadata={"tags": ["flights"], "priority": 7})
    memory_id = created["id"]
    assert created["version"] == 1
    assert created["metadata"]["tags"] == ["flights"]
    assert created["metadata"]["semantic_type"] == "fact"  # defaults filled in

    fetched = client.get(f"/v1/memories/{memory_id}", headers=agent).json()
    assert fetched["text"] == "Prefers window seats"

    updated = client.patch(f"/v1/memories/{memory_id}", headers=agent, json={
        "text": "Prefers aisle seats", "metadata": {"priority": 9}, "expected_version": 1,
        "reason": "customer said so"}).json()
    assert (updated["version"], updated["text"]) == (2, "Prefers aisle seats")
    assert updated["metadata"]["tags"] == ["flights"]  # a metadata patch keeps the rest
    assert updated["metadata"]["priority"] == 9

    deleted = client.delete(f"/v1/memories/{memory_id}", headers=agent,
                            params={"reason": "asked to forget"}).json()
    assert (deleted["version"], deleted["state"]) == (3, "deleted")
    restored = client.post(f"/v1/memories/{memory_id}/restore", headers=agent,
                           json={"reason": "by mistake"}).json()
    assert (restored["version"], restored["state"]) == (4, "active")

    assert_problem(client.post(f"/v1/memories/{memory_id}/rollback", headers=agent,
                               json={"to_version": 1, "reason": "mine"}), 403, "rollback")
    rolled_back = client.post(f"/v1/memories/{memory_id}/rollback", headers=officer,
                              json={"to_version": 1, "reason": "the update was wrong"}).json()
    assert (rolled_back["version"], rolled_back["text"]) == (5, "Prefers window seats")
    assert rolled_back["last_event"] == "MemoryRolledBack"


def test_versions_diff_and_time_travel(client: TestClient, agent: dict[str, str]) -> None:
    memory_id = add(client, agent, "line one\nline two")["id"]
    second = client.patch(f"/v1/memories/{memory_id}", headers=agent, json={
        "text": "line one\nline 2", "reason": "typo"}).json()
    client.patch(f"/v1/memories/{memory_id}", headers=agent, json={"metadata": {"tags": ["x"]}})

    versions = client.get(f"/v1/memories/{memory_id}/versions", headers=agent).json()["items"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert [v["reason"] for v in versions] == [None, "typo", None]
    assert client.get(f"/v1/memories/{memory_id}/versions/2",
                      headers=agent).json()["text"] == "line one\nline 2"

    diff = client.get(f"/v1/memories/{memory_id}/diff", headers=agent,
                      params={"from": 1, "to": 3}).json()
    assert "-line two" in diff["text_diff"] and "+line 2" in diff["text_diff"]
    assert diff["metadata_changes"] == {"tags": {"before": [], "after": ["x"]}}

    as_of_position = client.get(f"/v1/memories/{memory_id}", headers=agent,
                                params={"as_of": second["position"]}).json()
    assert (as_of_position["version"], as_of_position["text"]) == (2, "line one\nline 2")
    moment = client.get(f"/v1/memories/{memory_id}/versions/1", headers=agent).json()["updated_at"]
    as_of_moment = client.get(f"/v1/memories/{memory_id}", headers=agent,
                              params={"as_of": moment}).json()
    assert as_of_moment["version"] == 1


def test_listing_filters_and_pages_with_a_cursor(
        client: TestClient, memwarden: MemWarden, admin: dict[str, str]) -> None:
    for n in range(5):
        add(client, admin, f"acme memory {n}", id=f"acme-{n}", owner=f"user:{n % 2}",
            metadata={"labels": ["sensitive"] if n == 3 else []})
    add(client, admin, "globex memory", id="globex-0", tenant="globex")
    client.delete("/v1/memories/acme-4", headers=admin, params={"reason": "gone"})

    seen, cursor = [], None
    while True:
        params = {"tenant": "acme", "limit": 2, **({"after": cursor} if cursor else {})}
        page = client.get("/v1/memories", headers=admin, params=params).json()
        seen += [m["id"] for m in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [f"acme-{n}" for n in range(5)]

    def ids(**filters: Any) -> list[str]:
        page = client.get("/v1/memories", headers=admin, params=filters).json()
        return [m["id"] for m in page["items"]]

    assert ids(owner="user:1") == ["acme-1", "acme-3"]
    assert ids(label="sensitive") == ["acme-3"]
    assert ids(state="deleted") == ["acme-4"]
    assert ids(kind="parametric") == []
    assert ids() == [*(f"acme-{n}" for n in range(5)), "globex-0"]  # an admin sees every tenant


def test_unknown_or_repeated_query_parameters_are_refused(
        client: TestClient, admin: dict[str, str]) -> None:
    add(client, admin, id="only-one")
    typo = client.get("/v1/memories", headers=admin, params={"tennant": "other"})
    assert_problem(typo, 422, "tennant", "tenant")
    twice = client.get("/v1/memories?tenant=acme&tenant=globex", headers=admin)
    assert_problem(twice, 422, "tenant", "more than once")
    types = client.get("/v1/audit?type=MemoryCreated&type=MemoryUpdated", headers=admin)
    assert types.status_code == 200  # a list parameter may repeat


# -- who acts, and where ---------------------------------------------------------------------


def test_every_event_records_the_keys_subject_and_clients_cannot_claim_another(
        client: TestClient, memwarden: MemWarden, agent: dict[str, str]) -> None:
    memory_id = add(client, agent)["id"]
    client.patch(f"/v1/memories/{memory_id}", headers=agent, json={"text": "changed"})
    client.get(f"/v1/memories/{memory_id}", headers=agent)
    head = memwarden.store.head_position()
    claimed = client.post("/v1/memories", headers=agent, json={
        "text": "x", "tenant": "acme", "owner": "user:ana", "actor": "officer:jane"})
    assert_problem(claimed, 422, "actor")
    assert memwarden.store.head_position() == head
    assert {e.actor for e in memwarden.store.read_stream(memory_id)} == {"agent:planner"}
    memwarden.flush_reads()
    reads = memwarden.store.read_stream("reads:acme")
    assert reads and {e.actor for e in reads} == {"agent:planner"}


def test_a_key_acts_only_in_its_own_tenant(
        client: TestClient, memwarden: MemWarden, admin: dict[str, str],
        agent: dict[str, str]) -> None:
    foreign = add(client, admin, "globex secret", tenant="globex")["id"]
    add(client, agent, "acme note")
    head = memwarden.store.head_position()

    listed = client.get("/v1/memories", headers=agent).json()["items"]
    assert {m["tenant"] for m in listed} == {"acme"}
    assert_problem(client.get("/v1/memories", headers=agent, params={"tenant": "globex"}),
                   403, "acme")
    # Another tenant's memory is answered exactly as a missing one: its id tells nothing.
    missing = assert_problem(client.get("/v1/memories/no-such-id", headers=agent), 404)
    hidden = assert_problem(client.get(f"/v1/memories/{foreign}", headers=agent), 404)
    assert hidden["detail"] == missing["detail"].replace("no-such-id", foreign)
    assert_problem(client.patch(f"/v1/memories/{foreign}", headers=agent,
                                json={"text": "overwritten"}), 404)
    assert_problem(client.post("/v1/memories", headers=agent, json={
        "text": "planted", "tenant": "globex", "owner": "user:x"}), 403)
    assert_problem(client.get("/v1/audit", headers=agent), 403, "audit")
    memwarden.flush_reads()  # a refused read is not a read, but every denial is an event
    denials = [e for e in memwarden.store.read_all(head, limit=None) if e.type == "AccessDenied"]
    assert len(denials) == 5 and {e.actor for e in denials} == {"agent:planner"}
    assert memwarden.store.head_position() == head + 5 + 1  # and one read of acme's own list


def test_an_auditor_reads_the_trail_of_its_tenant_but_no_content(
        client: TestClient, memwarden: MemWarden, admin: dict[str, str]) -> None:
    acme_id = add(client, admin, "acme memory")["id"]
    add(client, admin, "globex memory", tenant="globex")
    auditor = bearer(memwarden, tenant="acme", subject="auditor:kim", role="auditor")

    trail = client.get("/v1/audit", headers=auditor).json()["items"]
    assert {e["tenant"] for e in trail} == {"acme"}
    assert [e["cube_id"] for e in trail if e["type"] == "MemoryCreated"] == [acme_id]
    assert "acme memory" not in json.dumps(trail)
    assert_problem(client.get(f"/v1/memories/{acme_id}", headers=auditor), 403,
                   "memory.read_content")
    assert client.get("/v1/verify", headers=auditor).json()["ok"] is True


# -- audit and integrity ---------------------------------------------------------------------


def test_audit_filters_and_pages_through_the_trail(
        client: TestClient, memwarden: MemWarden, admin: dict[str, str],
        agent: dict[str, str]) -> None:
    memory_id = add(client, agent)["id"]
    other_id = add(client, agent, "another")["id"]
    client.patch(f"/v1/memories/{memory_id}", headers=agent,
                 json={"text": "v2", "reason": "because"})
    client.post(f"/v1/memories/{memory_id}/rollback", headers=admin,
                json={"to_version": 1, "reason": "undo"})

    def trail(**filters: Any) -> list[dict[str, Any]]:
        response = client.get("/v1/audit", headers=admin, params=filters)
        assert response.status_code == 200, response.text
        return response.json()["items"]

    about = trail(cube_id=memory_id)
    assert [e["type"] for e in about] == ["MemoryCreated", "MemoryUpdated", "MemoryRolledBack"]
    assert [e["actor"] for e in about] == ["agent:planner", "agent:planner", "admin:root"]
    assert about[1]["reason"] == "because"
    assert [e["cube_id"] for e in trail(type="MemoryCreated", tenant="acme")] == [
        memory_id, other_id]
    assert [e["type"] for e in trail(actor="admin:root")] == ["MemoryRolledBack"]
    newest = trail(cube_id=memory_id, newest_first=True)
    assert [e["type"] for e in newest] == [e["type"] for e in reversed(about)]
    first = about[0]["recorded_at"]
    assert trail(cube_id=memory_id, until=first) == []
    assert_problem(client.get("/v1/audit", headers=admin, params={"since": "2026-01-01T00:00"}),
                   422, "since")

    positions, cursor = [], 0
    while cursor is not None:
        page = client.get("/v1/audit", headers=admin, params={"after": cursor, "limit": 2}).json()
        positions += [e["position"] for e in page["items"]]
        cursor = page["next"]
    assert positions == list(range(1, memwarden.store.head_position() + 1))


def test_verify_reports_the_whole_chain(client: TestClient, memwarden: MemWarden,
                                        admin: dict[str, str]) -> None:
    add(client, admin)
    report = client.get("/v1/verify", headers=admin).json()
    assert report == {"ok": True, "checked": memwarden.store.head_position(),
                      "head_position": memwarden.store.head_position(), "first_break": None}


# -- errors ----------------------------------------------------------------------------------


def test_failures_are_problem_details_and_write_nothing(
        client: TestClient, memwarden: MemWarden, admin: dict[str, str]) -> None:
    memory_id = add(client, admin, "first")["id"]
    client.patch(f"/v1/memories/{memory_id}", headers=admin, json={"text": "second"})
    deleted_id = add(client, admin, "gone")["id"]
    client.delete(f"/v1/memories/{deleted_id}", headers=admin, params={"reason": "r"})
    limit = Settings().max_text_bytes
    cases: list[tuple[str, str, dict[str, Any], int, tuple[str, ...]]] = [
        ("POST", "/v1/memories", {"content": b'{"text": "unterminated',
                                  "headers": {**admin, "content-type": "application/json"}},
         400, ("not valid JSON",)),
        ("POST", "/v1/memories", {"content": b'{"text": "x"}'}, 400, ("Content-Type",)),
        ("POST", "/v1/memories", {"json": {"text": "x", "tenant": "acme"}}, 422, ("owner",)),
        ("POST", "/v1/memories", {"json": {"text": "  ", "tenant": "acme", "owner": "u"}},
         422, ("empty",)),
        ("POST", "/v1/memories", {"json": {"text": "x", "tenant": "acme", "owner": "u",
                                           "metadata": {"priority": 11}}}, 422, ("priority",)),
        ("POST", "/v1/memories", {"json": {"text": "x", "tenant": "acme", "owner": "u",
                                           "id": memory_id}}, 422, ("already exists",)),
        ("POST", "/v1/memories", {"json": {"text": "x" * (limit + 1), "tenant": "acme",
                                           "owner": "u"}}, 413, (str(limit),)),
        ("POST", "/v1/memories", {"json": {"text": "x" * (9 * limit), "tenant": "acme",
                                           "owner": "u"}}, 413, ("request body",)),
        ("GET", "/v1/memories/no-such-memory", {}, 404, ("no-such-memory",)),
        ("GET", f"/v1/memories/{memory_id}/versions/7", {}, 404, ("version 7",)),
        ("GET", f"/v1/memories/{memory_id}", {"params": {"as_of": "yesterday"}}, 422,
         ("as_of",)),
        ("PATCH", f"/v1/memories/{memory_id}", {"json": {"text": "third",
                                                        "expected_version": 1}},
         409, ("version 2", "not 1")),
        ("PATCH", f"/v1/memories/{memory_id}", {"json": {"text": "second"}}, 422,
         ("changes nothing",)),
        ("PATCH", f"/v1/memories/{deleted_id}", {"json": {"text": "revived"}}, 409,
         ("deleted",)),
        ("POST", f"/v1/memories/{memory_id}/rollback", {"json": {"to_version": 9,
                                                                 "reason": "r"}},
         422, ("no version 9",)),
        ("POST", f"/v1/memories/{memory_id}/rollback", {"json": {"to_version": 1,
                                                                 "reason": " "}},
         422, ("reason",)),
        ("DELETE", f"/v1/memories/{memory_id}", {}, 422, ("reason",)),
        ("POST", f"/v1/memories/{memory_id}/restore", {}, 409, ("not deleted",)),
        ("GET", "/v1/memoirs", {}, 404, ("/v1/memoirs",)),
        ("PUT", f"/v1/memories/{memory_id}", {}, 405, ("PUT",)),
    ]
    head = memwarden.store.head_position()
    for method, path, request, status, words in cases:
        response = client.request(method, path, **{"headers": admin, **request})
        problem = assert_problem(response, status, *words)
        if status == 409 and "version" in problem["detail"]:
            assert problem["current_version"] == 2
    memwarden.flush_reads()
    assert memwarden.store.head_position() == head


def test_requests_without_a_valid_key_are_refused(
        client: TestClient, memwarden: MemWarden, admin: dict[str, str]) -> None:
    memory_id = add(client, admin)["id"]
    revoked = bearer(memwarden, tenant="acme", subject="agent:old", role="agent")
    key_id = revoked["Authorization"].split("_")[1]
    ApiKeys(memwarden).revoke(key_id, reason="rotated")
    secret = admin["Authorization"].removeprefix("Bearer ")
    for headers, words in [
        ({}, ("Authorization: Bearer",)),
        ({"Authorization": f"Basic {secret}"}, ("Authorization: Bearer",)),
        ({"Authorization": f"Bearer {secret[:-1]}x"}, ("not valid",)),
        ({"Authorization": "Bearer mwk_0000000000000000_forged"}, ("not valid",)),
        (revoked, ("revoked",)),
    ]:
        response = client.patch(f"/v1/memories/{memory_id}", headers=headers,
                                json={"text": "changed"})
        assert_problem(response, 401, *words)
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get(f"/v1/memories/{memory_id}", headers=admin).json()["version"] == 1


def test_health_needs_no_key_and_readiness_does(client: TestClient, memwarden: MemWarden,
                                                admin: dict[str, str]) -> None:
    assert client.get("/v1/healthz").json() == {"status": "ok"}
    assert client.get("/v1/readyz").status_code == 401
    ready = client.get("/v1/readyz", headers=admin).json()
    head = memwarden.store.head_position()
    assert ready == {"status": "ready", "head_position": head, "projected_position": head}


def test_the_openapi_document_lists_every_route_and_docs_are_served(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operations = {f"{method.upper()} {path}" for path, ops in spec["paths"].items()
                  for method in ops}
    assert operations == {
        "POST /v1/memories", "GET /v1/memories", "GET /v1/memories/{cube_id}",
        "PATCH /v1/memories/{cube_id}", "DELETE /v1/memories/{cube_id}",
        "POST /v1/memories/{cube_id}/restore", "GET /v1/memories/{cube_id}/versions",
        "GET /v1/memories/{cube_id}/versions/{number}", "GET /v1/memories/{cube_id}/diff",
        "POST /v1/memories/{cube_id}/rollback", "GET /v1/audit", "GET /v1/verify",
        "POST /v1/keys", "GET /v1/keys", "DELETE /v1/keys/{key_id}", "GET /v1/healthz",
        "GET /v1/readyz", "GET /v1/policies", "POST /v1/policies", "DELETE /v1/policies",
        "GET /v1/subjects/{subject}/export", "POST /v1/subjects/{subject}/erase",
        "POST /v1/memories/{cube_id}/erase", "GET /v1/findings", "GET /v1/erasures",
        "POST /v1/search", "GET /v1/holds", "POST /v1/holds", "DELETE /v1/holds/{hold_id}",
        "POST /v1/retention/run", "GET /v1/retention/report", "GET /v1/retention/rules",
        "POST /v1/memories/{cube_id}/recall", "GET /v1/lineage/{ident}", "GET /v1/artifacts",
    }
    conflict = spec["paths"]["/v1/memories/{cube_id}"]["patch"]["responses"]["409"]
    assert list(conflict["content"]) == [PROBLEM_JSON]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# -- keys ------------------------------------------------------------------------------------


def test_keys_are_issued_once_stored_hashed_and_revocable(
        client: TestClient, memwarden: MemWarden, admin: dict[str, str]) -> None:
    issued = client.post("/v1/keys", headers=admin, json={
        "tenant": "acme", "subject": "agent:new", "role": "agent"})
    assert issued.status_code == 201, issued.text
    key = issued.json()["key"]
    key_id = issued.json()["id"]
    headers = {"Authorization": f"Bearer {key}"}
    assert add(client, headers)["created_by"] == "agent:new"

    listed = client.get("/v1/keys", headers=admin, params={"tenant": "acme"}).json()["items"]
    assert [k["id"] for k in listed] == [key_id]
    assert "key" not in listed[0] and key not in json.dumps(listed)
    log = json.dumps([dict(e.payload) for e in memwarden.store.read_all(0, limit=None)])
    assert key not in log and key.split("_", 2)[2] not in log

    revoked = client.delete(f"/v1/keys/{key_id}", headers=admin, params={"reason": "leaked"})
    assert revoked.json()["active"] is False and revoked.json()["revoke_reason"] == "leaked"
    assert_problem(client.get("/v1/memories", headers=headers), 401, "revoked")
    assert_problem(client.delete(f"/v1/keys/{key_id}", headers=admin,
                                 params={"reason": "again"}), 409, "already revoked")
    events = memwarden.store.read_stream(f"apikey:{key_id}")
    assert [(e.type, e.actor, e.tenant) for e in events] == [
        ("ApiKeyIssued", "admin:root", "acme"), ("ApiKeyRevoked", "admin:root", "acme")]


def test_only_admins_of_a_tenant_manage_its_keys(
        client: TestClient, memwarden: MemWarden, agent: dict[str, str]) -> None:
    tenant_admin = bearer(memwarden, tenant="acme", subject="admin:acme", role="tenant_admin")

    def issue(headers: dict[str, str], **body: str) -> Any:
        return client.post("/v1/keys", headers=headers, json=body)

    assert issue(tenant_admin, tenant="acme", subject="agent:b", role="agent").status_code == 201
    refused = assert_problem(issue(tenant_admin, tenant="globex", subject="agent:c",
                                   role="agent"), 403, "acme")
    assert "globex" not in refused["detail"]  # nothing about another tenant, even its name
    assert_problem(issue(tenant_admin, tenant="*", subject="root:2", role="admin"), 403,
                   "all tenants")
    assert_problem(issue(agent, tenant="acme", subject="agent:d", role="agent"), 403,
                   "key.manage")
    assert_problem(issue(tenant_admin, tenant="acme", subject="agent:e", role="admin"), 422,
                   "admin")
    others = client.get("/v1/keys", headers=tenant_admin).json()["items"]
    assert {k["tenant"] for k in others} == {"acme"}


def test_keys_survive_a_rebuild_of_the_read_models(
        client: TestClient, memwarden: MemWarden, admin: dict[str, str]) -> None:
    kept = bearer(memwarden, tenant="acme", subject="agent:kept", role="agent")
    dropped = bearer(memwarden, tenant="acme", subject="agent:dropped", role="agent")
    ApiKeys(memwarden).revoke(dropped["Authorization"].split("_")[1], reason="rotated")
    before = memwarden.projector.digest()
    memwarden.rebuild_projections(["api_keys"])
    assert memwarden.projector.digest() == before
    assert client.get("/v1/memories", headers=kept).status_code == 200
    assert client.get("/v1/memories", headers=dropped).status_code == 401


def test_keys_from_the_command_line(database_url: str, memwarden: MemWarden,
                                    client: TestClient) -> None:
    runner = CliRunner()

    def memwarden_cli(*args: str) -> str:
        result = runner.invoke(cli, ["--db", database_url, "--actor", "cli:ops", *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    created = json.loads(memwarden_cli("keys", "create", "--tenant", "acme",
                                       "--subject", "agent:cli", "--role", "agent", "--json"))
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert add(client, headers)["created_by"] == "agent:cli"
    plain = memwarden_cli("keys", "create", "--tenant", "acme", "--subject", "agent:two",
                          "--role", "agent")
    assert plain.strip().startswith("mwk_")  # the key alone on stdout, for scripts
    listed = json.loads(memwarden_cli("keys", "list", "--tenant", "acme", "--json"))
    assert {k["subject"] for k in listed} == {"agent:cli", "agent:two"}
    memwarden_cli("keys", "revoke", created["id"], "--reason", "done")
    assert client.get("/v1/memories", headers=headers).status_code == 401
    assert [k["id"] for k in json.loads(memwarden_cli("keys", "list", "--all", "--json"))
            if not k["active"]] == [created["id"]]
    refused = runner.invoke(cli, ["--db", database_url, "keys", "create", "--tenant", "*",
                                  "--subject", "x", "--role", "agent"])
    assert refused.exit_code == 2 and "admin" in refused.output


def test_issuing_a_key_refuses_bad_input_and_writes_nothing(memwarden: MemWarden) -> None:
    keys = ApiKeys(memwarden)
    head = memwarden.store.head_position()
    for tenant, subject, role in [("acme", "agent:x", "superuser"), ("*", "agent:x", "agent"),
                                  ("acme", " padded ", "agent"), ("", "agent:x", "agent")]:
        with pytest.raises(InvalidCommand, match=r"role|tenant|subject"):
            keys.issue(tenant=tenant, subject=subject, role=role)
    assert memwarden.store.head_position() == head
