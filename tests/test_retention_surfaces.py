"""Retention and legal holds through the CLI and the REST API (issue 6), on each backend: the
dry run explains itself, holds are placed, listed and released, cold memories are recalled, the
report tells what was done and what is due, and a broken rules file is refused by line."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from fastapi.testclient import TestClient
from retention_fixtures import POLICY

from eventstore import utcnow
from governance import ApiKeys, MemWarden, create_app
from governance._cli import cli
from governance._retention import RetentionWorker, retention_report


@pytest.fixture
def mw(database_url: str, policy_file: Path) -> Iterator[MemWarden]:
    with MemWarden.open(database_url, actor="ops:test") as handle:
        handle.add("Kickoff meeting on Monday", tenant="acme", owner="user:ana",
                   cube_id="meeting", metadata={"semantic_type": "event"})
        handle.add("Ana's team uses the blue project board", tenant="acme", owner="user:ana",
                   cube_id="board")
        handle.add("Bo prefers email", tenant="acme", owner="user:bo", cube_id="bo-email")
        yield handle


@pytest.fixture
def memwarden(database_url: str, mw: MemWarden) -> Callable[..., Result]:
    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--db", database_url, "--actor", "ops:cli", *args])

    return invoke


def _json(result: Result) -> dict:
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def test_the_cli_dry_run_explains_what_a_later_sweep_would_do(
        mw: MemWarden, memwarden: Callable[..., Result]) -> None:
    later = (utcnow() + timedelta(days=90)).isoformat()
    held = _json(memwarden("hold", "place", "--tenant", "acme", "--owner", "user:bo",
                           "--reason", "subpoena", "--case", "CASE-9", "--json"))
    assert (held["scope"], held["target"], held["active"]) == ("owner", "user:bo", True)

    dry = _json(memwarden("retention", "run", "--dry-run", "--at", later, "--json"))
    outcomes = {(a["cube_id"], a["outcome"], a["rule"], a["held_by"]) for a in dry["actions"]}
    assert outcomes == {("meeting", "expired", "short-events", None),
                        ("board", "cold_archive", "cold-notes", None),
                        ("bo-email", "cold_archive", "cold-notes", held["hold_id"])}
    assert dry["counts"] == {"expired": 1, "cold_archive": 1, "held": 1}
    assert all(a["explanation"] for a in dry["actions"])

    text = memwarden("retention", "run", "--dry-run", "--at", later)
    assert text.exit_code == 0, text.output
    assert "dry run: nothing changed" in text.stdout
    assert "ttl of 30d (the rule) elapsed" in text.stdout
    assert f"held by legal hold {held['hold_id']}" in text.stdout
    assert mw.backend.reads.cube("meeting").state == "active"

    # Only a dry run may pretend to be later; now, nothing is due yet.
    refused = memwarden("retention", "run", "--at", later)
    assert refused.exit_code == 2 and "only be a dry run" in refused.stderr
    now = _json(memwarden("retention", "run", "--json"))
    assert (now["examined"], now["events"], now["dry_run"]) == (0, 1, False)

    released = _json(memwarden("hold", "release", held["hold_id"], "--reason", "case closed",
                               "--json"))
    assert released["active"] is False and released["release_reason"] == "case closed"
    assert _json(memwarden("hold", "list", "--json"))["items"] == []
    assert len(_json(memwarden("hold", "list", "--all", "--json"))["items"]) == 1
    again = memwarden("hold", "release", held["hold_id"], "--reason", "twice")
    assert again.exit_code == 4 and "released already" in again.stderr
    assert memwarden("hold", "release", "0123abcd", "--reason", "x").exit_code == 3


def test_the_cli_recalls_and_reports_after_a_sweep(
        mw: MemWarden, memwarden: Callable[..., Result]) -> None:
    clock = utcnow() + timedelta(days=61)
    RetentionWorker(mw, clock=lambda: clock).run()
    assert {m["id"] for m in _json(memwarden("list", "--json"))["items"]} == set()
    everything = _json(memwarden("list", "--include-archived", "--json"))["items"]
    assert {(m["id"], m["state"]) for m in everything} == {
        ("meeting", "expired"), ("board", "active"), ("bo-email", "active")}
    assert memwarden("get", "board").exit_code == 4  # cold: a recall, with a reason
    listed = " ".join(memwarden("list", "--include-archived").stdout.replace("│", " ").split())
    assert "board acme user:ana 2 active, cold (cold archive: recall to read)" in listed

    recalled = _json(memwarden("recall", "board", "--reason", "planning review", "--json"))
    assert recalled["text"] == "Ana's team uses the blue project board"
    assert recalled["archived_bytes"] > 0
    assert _json(memwarden("get", "board", "--json"))["text"] == recalled["text"]

    # The sweep ran 61 simulated days ahead; the recall happened now, on the real clock.
    report = _json(memwarden("retention", "report", "--days", "90", "--json"))
    assert [(row["rule"], row["outcome"], row["count"]) for row in report["done"]] == [
        (None, "recalled", 1)]
    # The board goes cold again 60 days after its recall; Bo's note (idle) 60 days after its
    # write: both within 90 days.
    assert [(row["rule"], row["cold_archive"]) for row in report["due"]] == [("cold-notes", 1)]
    later = retention_report(mw, days=90, clock=lambda: clock)
    assert {(row["rule"], row["outcome"], row["count"]) for row in later.done} == {
        ("short-events", "expired", 1), ("cold-notes", "cold_archive", 2),
        (None, "recalled", 1)}
    assert later.sweeps[0]["counts"] == {"expired": 1, "cold_archive": 2}
    text = memwarden("retention", "report")
    assert text.exit_code == 0 and "done in the last 30 days" in text.stdout

    rules = _json(memwarden("retention", "rules", "--json"))
    assert [rule["name"] for rule in rules["rules"]] == ["short-events", "cold-notes"]


def test_a_broken_rules_file_is_refused_with_its_line(
        policy_file: Path, memwarden: Callable[..., Result]) -> None:
    policy_file.write_text(POLICY.replace("ttl: 30d", "ttl: thirty days"))
    result = memwarden("retention", "run", "--dry-run")
    assert result.exit_code == 2
    assert f"{policy_file}:4: rules[0] (short-events).ttl: 'thirty days' is not a duration" in (
        " ".join(result.stderr.split()))


def test_the_rest_api(mw: MemWarden) -> None:
    admin = ApiKeys(mw).issue(tenant="*", subject="admin:api", role="admin").secret
    auditor = ApiKeys(mw).issue(tenant="acme", subject="auditor:kim", role="auditor").secret
    with TestClient(create_app(mw)) as client:
        headers = {"Authorization": f"Bearer {admin}"}
        placed = client.post("/v1/holds", headers=headers, json={
            "memory": "board", "reason": "litigation", "case_id": "L-1"})
        assert placed.status_code == 201, placed.text
        hold = placed.json()
        assert (hold["tenant"], hold["scope"], hold["target"]) == ("acme", "memory", "board")
        listed = client.get("/v1/holds", headers={"Authorization": f"Bearer {auditor}"})
        assert [h["hold_id"] for h in listed.json()["items"]] == [hold["hold_id"]]

        later = (utcnow() + timedelta(days=90)).isoformat()
        dry = client.post("/v1/retention/run", headers=headers,
                          json={"dry_run": True, "at": later})
        assert dry.status_code == 200, dry.text
        assert {(a["cube_id"], a["held_by"] is not None) for a in dry.json()["actions"]} == {
            ("meeting", False), ("board", True), ("bo-email", False)}
        assert client.post("/v1/retention/run", headers=headers,
                           json={"at": later}).status_code == 422
        assert client.post("/v1/retention/run", headers={"Authorization": f"Bearer {auditor}"},
                           json={"dry_run": True}).status_code == 403

        RetentionWorker(mw, clock=lambda: utcnow() + timedelta(days=90)).run()
        assert client.get("/v1/memories/bo-email", headers=headers).status_code == 409
        recalled = client.post("/v1/memories/bo-email/recall", headers=headers,
                               json={"reason": "customer asked"})
        assert recalled.status_code == 200, recalled.text
        assert recalled.json()["text"] == "Bo prefers email"
        assert recalled.json()["tier"] == "working"

        report = client.get("/v1/retention/report", params={"days": 120},
                            headers={"Authorization": f"Bearer {auditor}"})
        assert report.status_code == 200, report.text
        assert report.json()["active_holds"] == 1
        rules = client.get("/v1/retention/rules", headers=headers).json()
        assert [rule["name"] for rule in rules["rules"]] == ["short-events", "cold-notes"]

        released = client.delete(f"/v1/holds/{hold['hold_id']}", headers=headers,
                                  params={"reason": "settled"})
        assert released.status_code == 200 and released.json()["active"] is False
        assert client.delete(f"/v1/holds/{hold['hold_id']}", headers=headers,
                             params={"reason": "again"}).status_code == 409
        assert client.post("/v1/holds", headers=headers, json={
            "memory": "no-such-memory", "reason": "x", "case_id": "y"}).status_code == 404


def test_memwarden_up_sweeps_on_its_schedule(mw: MemWarden) -> None:
    from governance._up import _Every, _retention_sweep

    assert mw.settings.retention_interval == 300  # the default schedule: every five minutes
    sweeper = _Every(0.05, lambda: _retention_sweep(mw))
    sweeper.start()
    try:
        deadline = time.monotonic() + 60
        while len(mw.store.read_stream("retention:sweeps")) < 2:
            assert time.monotonic() < deadline, "no sweep ran on the schedule"
            time.sleep(0.05)
    finally:
        sweeper.stop()
    sweeps = mw.store.read_stream("retention:sweeps")
    assert all(e.type == "RetentionSweepCompleted" and e.actor == "ops:test" for e in sweeps)
