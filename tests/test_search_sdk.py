"""Memory search through the enforcement point (issue 9): the SDK, REST and the CLI.

Principals of the default policy search a shared world; whatever they may not read must never
come back, whoever asks and however: another tenant's memories, an erased subject's, expired or
deleted ones, sensitive ones without the right to read them. Every search is audited without
its text; snippets are masked for readers without ``memory.read_sensitive``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select

from governance import ApiKeys, InvalidCommand, MemWarden, Principal, Settings, create_app
from governance._cli import cli
from governance._search import MEMORY_SEARCHED, reciprocal_rank_fusion, snippet
from projections._search import SearchHit, search_docs

A, B = "acme", "globex"


def _principal(subject: str, role: str, tenant: str = A) -> Principal:
    return Principal(subject, tenant, role)


@pytest.fixture
def mw(database_url: str) -> Iterator[MemWarden]:
    with MemWarden.open(actor="admin:root",
                        settings=Settings(db_url=database_url, pii_scan=False)) as handle:
        yield handle


def _add(mw: MemWarden, text: str, *, actor: str = "agent:a", tenant: str = A,
         owner: str = "user:ana", **metadata: object) -> str:
    return mw.acting_as(actor).add(text, tenant=tenant, owner=owner,
                                   metadata=metadata or None).cube_id


def _ids(results: list) -> list[str]:  # type: ignore[type-arg]
    return [r.cube_id for r in results]


def test_results_never_hold_another_tenant_s_an_erased_subject_s_or_an_expired_memory(
        mw: MemWarden) -> None:
    kept = _add(mw, "lighthouse keeper schedule")
    other_tenant = _add(mw, "lighthouse lighthouse keeper schedule", tenant=B)
    erased = [_add(mw, f"lighthouse visit {n}", owner="user:gone") for n in range(2)]
    expiring = _add(mw, "lighthouse keeper keys", ttl_seconds=1)
    officer = mw.as_principal(_principal("officer:a", "compliance_officer"))
    assert set(_ids(officer.search("lighthouse keeper"))) == {kept, expiring, *erased}

    mw.erase_subject("user:gone", tenant=A, reason="GDPR Art. 17 request")
    time.sleep(1.1)
    mw.run_retention()
    with mw.store.engine.connect() as conn:
        states = dict(conn.execute(select(search_docs.c.cube_id, search_docs.c.state)).all())
        texts = dict(conn.execute(select(search_docs.c.cube_id, search_docs.c.text)).all())
    assert states[expiring] == "expired"  # the worker's MemoryExpired reached the index
    assert all(texts[cube_id] == "" for cube_id in erased)

    for who in (officer, mw.as_principal(_principal("manager:a", "tenant_admin")), mw):
        found = _ids(who.search("lighthouse keeper visit keys", k=50, tenant=A))
        assert found == [kept], who.principal
    everywhere = _ids(mw.search("lighthouse keeper visit keys", k=50))
    assert sorted(everywhere) == sorted([kept, other_tenant])


def test_an_agent_finds_what_it_wrote_and_what_was_shared_with_it(mw: MemWarden) -> None:
    own = _add(mw, "falcon launch checklist", actor="agent:a")
    shared = _add(mw, "falcon launch budget", actor="agent:b", shared_with=["agent:a"])
    _add(mw, "falcon launch staffing", actor="agent:b")
    _add(mw, "falcon launch venue", actor="agent:a", tenant=B)
    agent = mw.as_principal(_principal("agent:a", "agent"))
    assert set(_ids(agent.search("falcon launch"))) == {own, shared}
    assert _ids(agent.search("falcon launch", owner="user:nobody")) == []


def test_sensitive_memories_need_read_sensitive(mw: MemWarden) -> None:
    plain = _add(mw, "cholesterol check booked", actor="agent:a", owner="user:ana")
    sensitive = _add(mw, "cholesterol results high", actor="agent:a", owner="user:ana",
                     labels=["sensitive"])
    assert _ids(mw.as_principal(_principal("agent:a", "agent")).search("cholesterol")) == [plain]
    assert _ids(mw.as_principal(_principal("manager:a", "tenant_admin")).search(
        "cholesterol")) == [plain]
    for who in (_principal("officer:a", "compliance_officer"),
                _principal("user:ana", "data_subject")):
        assert set(_ids(mw.as_principal(who).search("cholesterol"))) == {plain, sensitive}
    assert _ids(mw.as_principal(_principal("user:bo", "data_subject")).search(
        "cholesterol")) == []


def test_every_search_is_audited_by_hash_never_by_text(mw: MemWarden) -> None:
    found = _add(mw, "passport renewal for Ana Lopez")
    agent = mw.as_principal(_principal("agent:a", "agent"), on_behalf_of="user:ana")
    head = mw.store.head_position()
    query = "Ana Lopez passport"
    assert _ids(agent.search(query, semantic_type="fact")) == [found]
    mw.flush_reads()
    events = mw.store.read_all(head, limit=None)
    [searched] = [e for e in events if e.type == MEMORY_SEARCHED]
    assert searched.actor == "agent:a" and searched.on_behalf_of == "user:ana"
    assert searched.tenant == A
    assert searched.payload["query_sha256"] == hashlib.sha256(query.encode()).hexdigest()
    assert searched.payload["result_ids"] == [found]
    assert searched.payload["filters"] == {"tenant": A, "semantic_type": "fact"}
    stored = json.dumps([e.payload for e in mw.store.read_all(head, limit=None, decoded=False)])
    assert "Lopez" not in stored and "passport" not in stored
    reads = [r for e in events if e.type == "MemoryAccessed" for r in e.payload["reads"]]
    assert [r["cube_id"] for r in reads] == [found]
    entry = mw.audit(newest_first=True, limit=10)
    assert any(e.type == MEMORY_SEARCHED and e.detail["result_ids"] == [found] for e in entry)


@pytest.mark.parametrize(("options", "message"), [
    ({"query": "  "}, "needs a query"),
    ({"k": 0}, "k must be between 1 and 100"),
    ({"k": 101}, "k must be between 1 and 100"),
    ({"mode": "fuzzy"}, "mode must be one of"),
    ({"kind": "scroll"}, "kind must be one of"),
    ({"semantic_type": "gossip"}, "semantic type must be one of"),
    ({"labels": ["a,b"]}, "label must contain only"),
    ({"since": datetime(2024, 1, 1)}, "since needs a time zone"),
    ({"query": "x" * 1001}, "at most 1000 characters"),
])
def test_bad_input_is_refused_with_a_clear_error(sqlite_url: str, options: dict,  # type: ignore[type-arg]
                                                 message: str) -> None:
    with MemWarden.open(sqlite_url, actor="admin:root") as mw:
        query = options.pop("query", "anything")
        with pytest.raises(InvalidCommand, match=message):
            mw.search(query, tenant=A, **options)


def test_snippets_are_masked_for_readers_without_read_sensitive(sqlite_url: str) -> None:
    with MemWarden.open(sqlite_url, actor="admin:root") as mw:  # Presidio scans the write
        text = "Invoice dispute: write to ana.lopez@example.com before Friday. " + "x " * 150
        cube_id = mw.acting_as("agent:a").add(text, tenant=A, owner="user:ana").cube_id
        manager = mw.as_principal(_principal("manager:a", "tenant_admin"))
        [hidden] = manager.search("invoice dispute")
        assert hidden.masked and "<EMAIL_ADDRESS>" in hidden.snippet
        assert "ana.lopez" not in hidden.snippet and len(hidden.snippet) <= 202
        [shown] = mw.as_principal(_principal("officer:a", "compliance_officer")).search(
            "invoice dispute")
        assert not shown.masked and "ana.lopez@example.com" in shown.snippet
        assert hidden.cube_id == shown.cube_id == cube_id


def test_rest_search_answers_only_what_the_key_may_read(sqlite_url: str) -> None:
    with MemWarden.open(sqlite_url, actor="admin:root",
                        settings=Settings(db_url=sqlite_url, pii_scan=False)) as mw:
        own = _add(mw, "quarterly report draft", actor="agent:a")
        _add(mw, "quarterly report final", actor="agent:b")
        _add(mw, "quarterly report globex", actor="agent:a", tenant=B)
        secret = ApiKeys(mw).issue(tenant=A, subject="agent:a", role="agent").secret
        headers = {"Authorization": f"Bearer {secret}"}
        with TestClient(create_app(mw)) as client:
            answer = client.post("/v1/search", headers=headers,
                                 json={"query": "quarterly report", "k": 5})
            assert answer.status_code == 200, answer.text
            assert [item["id"] for item in answer.json()["items"]] == [own]
            assert answer.json()["items"][0]["snippet"] == "quarterly report draft"
            denied = client.post("/v1/search", headers=headers,
                                 json={"query": "quarterly", "tenant": B})
            assert denied.status_code == 403
            assert "globex" not in denied.json()["detail"]
            for body in ({"query": "x", "k": 0}, {"query": ""}, {"query": "x", "extra": 1},
                         {"query": "x", "mode": "fuzzy"}, {"query": "x", "since": "2024-01-01"}):
                refused = client.post("/v1/search", headers=headers, json=body)
                assert refused.status_code == 422, (body, refused.text)
            assert client.post("/v1/search", json={"query": "x"}).status_code == 401


def test_cli_search_prints_results_and_json(sqlite_url: str) -> None:
    with MemWarden.open(sqlite_url, actor="admin:root",
                        settings=Settings(db_url=sqlite_url, pii_scan=False)) as mw:
        cube_id = _add(mw, "harvest festival volunteers", semantic_type="event")
    runner = CliRunner()
    env = {"MEMWARDEN_PII_SCAN": "0"}
    result = runner.invoke(cli, ["--db", sqlite_url, "search", "harvest volunteers", "--json",
                                 "--tenant", A, "--type", "event", "--k", "3"], env=env)
    assert result.exit_code == 0, result.output
    assert [item["id"] for item in json.loads(result.stdout)["items"]] == [cube_id]
    table = runner.invoke(cli, ["--db", sqlite_url, "search", "harvest"],
                          env={**env, "COLUMNS": "200"})
    assert table.exit_code == 0 and cube_id in table.stdout
    bad = runner.invoke(cli, ["--db", sqlite_url, "search", "harvest", "--since", "2024-01-01"],
                        env=env)
    assert bad.exit_code == 2 and "time zone" in bad.stderr


def test_reciprocal_rank_fusion_rewards_agreement() -> None:
    bm25 = [SearchHit("a", 9.0), SearchHit("b", 5.0), SearchHit("c", 1.0)]
    vectors = [SearchHit("c", 0.9), SearchHit("a", 0.8), SearchHit("d", 0.7)]
    fused = reciprocal_rank_fusion([bm25, vectors])
    assert [hit.cube_id for hit in fused] == ["a", "c", "b", "d"]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62)


def test_snippets_centre_on_the_first_query_term() -> None:
    text = "filler " * 60 + "the red umbrella is in the hall" + " filler" * 60
    cut = snippet(text, ["umbrella"])
    assert "umbrella" in cut and cut.startswith("…") and cut.endswith("…")
    assert snippet("short text", ["x"]) == "short text"
