"""The ``memwarden`` command line over a temporary SQLite database: every command, in human and
``--json`` form, and the exit codes documented in ``governance/_cli.py``."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from log_tampering import overwrite_column
from sqlalchemy import create_engine

import governance._cli as _cli
import governance._cli_kafka as work_module
from governance import ENVIRONMENT_VARIABLES
from governance._cli import cli

OK, INVALID, NOT_FOUND, CONFLICT, INTEGRITY = 0, 2, 3, 4, 5


@dataclass
class Memwarden:
    """``memwarden --db <temp> --actor cli:test ...``, checking the exit code."""

    db_url: str

    def __call__(self, *args: str, code: int = OK, actor: str = "cli:test") -> Result:
        result = CliRunner().invoke(cli, ["--db", self.db_url, "--actor", actor, *args])
        assert result.exit_code == code, (
            f"memwarden {' '.join(args)} exited {result.exit_code}, wanted {code}:\n"
            f"{result.output}{result.exception!r}")
        return result

    def json(self, *args: str, code: int = OK) -> Any:
        return json.loads(self(*args, "--json", code=code).stdout)

    def fails(self, *args: str, code: int) -> str:
        """Run a command that must fail with ``code``; return what it said on stderr."""
        result = self(*args, code=code)
        assert result.stdout == ""
        return result.stderr


@pytest.fixture
def memwarden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Memwarden:
    for variable in (*ENVIRONMENT_VARIABLES, "MEMWARDEN_API_KEY"):  # no key: the local operator
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("COLUMNS", "250")  # wide tables: no wrapped or elided cells
    return Memwarden(f"sqlite:///{tmp_path / 'cli.db'}")


def add(memwarden: Memwarden, cube_id: str, text: str, *options: str,
        tenant: str = "acme") -> dict[str, Any]:
    added: dict[str, Any] = memwarden.json("add", text, "--tenant", tenant, "--owner",
                                           "user:ana", "--id", cube_id, *options)
    return added


@pytest.fixture
def start(memwarden: Memwarden) -> int:
    """The head of the log before the test's own events: the first command opens the database,
    which seeds the default access policy (PolicyRuleAdded events)."""
    head: int = memwarden.json("verify")["head_position"]
    return head


@pytest.fixture
def seat(memwarden: Memwarden, start: int) -> str:
    """Memory ``seat``: v1 aisle, v2 window (by cli:test), at positions start + 1, start + 2."""
    add(memwarden, "seat", "Ana prefers aisle seats", "--tag", "flights")
    memwarden("update", "seat", "--text", "Ana prefers window seats", "--reason", "she said so")
    return "seat"


# -- add, get, list ---------------------------------------------------------------------------


def test_add_prints_the_new_id(memwarden: Memwarden) -> None:
    result = memwarden("add", "Ana prefers aisle seats", "--tenant", "acme", "--owner", "user:ana",
                       "--id", "seat")

    assert result.stdout.strip() == "added seat (version 1)"


def test_add_as_json_gives_the_whole_memory(memwarden: Memwarden) -> None:
    added = add(memwarden, "seat", "Ana prefers aisle seats", "--type", "preference",
                "--source", "inference", "--tag", "flights", "--tag", "seats", "--label",
                "sensitive", "--ttl", "3600", "--priority", "8", "--retention-class", "travel",
                "--kind", "plaintext", "--reason", "intake")

    assert (added["id"], added["version"], added["state"]) == ("seat", 1, "active")
    assert (added["tenant"], added["owner"], added["created_by"]) == ("acme", "user:ana",
                                                                      "cli:test")
    assert added["text"] == "Ana prefers aisle seats"
    assert added["metadata"] == {
        "source": "inference", "semantic_type": "preference", "tags": ["flights", "seats"],
        "labels": ["sensitive"], "ttl_seconds": 3600, "priority": 8,
        "retention_class": "travel", "shared_with": []}


def test_get_shows_a_memory(memwarden: Memwarden, seat: str) -> None:
    shown = memwarden("get", seat).stdout

    assert "Ana prefers window seats" in shown
    assert "acme" in shown and "user:ana" in shown
    assert '["flights"]' in shown


def test_get_as_json(memwarden: Memwarden, seat: str) -> None:
    got = memwarden.json("get", seat)

    assert (got["id"], got["version"], got["text"]) == (seat, 2, "Ana prefers window seats")


def test_list_shows_a_page_of_memories(memwarden: Memwarden) -> None:
    for n in range(3):
        add(memwarden, f"m{n}", f"memory {n}")
    add(memwarden, "g0", "elsewhere", tenant="globex")

    listed = memwarden("list", "--tenant", "acme", "--limit", "2").stdout

    assert "m0" in listed and "m1" in listed and "m2" not in listed and "g0" not in listed
    assert "more: --after m1" in listed


def test_list_as_json_pages_with_a_cursor(memwarden: Memwarden) -> None:
    for n in range(3):
        add(memwarden, f"m{n}", f"memory {n}")

    first = memwarden.json("list", "--limit", "2")
    second = memwarden.json("list", "--limit", "2", "--after", first["next"])

    assert [m["id"] for m in first["items"]] == ["m0", "m1"]
    assert first["next"] == "m1"
    assert ([m["id"] for m in second["items"]], second["next"]) == (["m2"], None)


def test_list_filters_by_label_and_state(memwarden: Memwarden) -> None:
    add(memwarden, "m0", "plain")
    add(memwarden, "m1", "secret", "--label", "sensitive")
    memwarden("delete", "m0", "--reason", "asked")

    assert [m["id"] for m in memwarden.json("list", "--label", "sensitive")["items"]] == ["m1"]
    assert [m["id"] for m in memwarden.json("list", "--state", "deleted")["items"]] == ["m0"]


# -- update, delete, restore ------------------------------------------------------------------


def test_update_prints_the_new_version(memwarden: Memwarden, seat: str) -> None:
    result = memwarden("update", seat, "--label", "sensitive", "--expected-version", "2")

    assert result.stdout.strip() == "updated seat to version 3"


def test_update_as_json_patches_the_metadata(memwarden: Memwarden, seat: str) -> None:
    updated = memwarden.json("update", seat, "--priority", "9", "--label", "sensitive")

    assert updated["version"] == 3
    assert updated["text"] == "Ana prefers window seats"
    assert (updated["metadata"]["priority"], updated["metadata"]["tags"]) == (9, ["flights"])
    assert updated["metadata"]["labels"] == ["sensitive"]


def test_delete_and_restore(memwarden: Memwarden, seat: str) -> None:
    deleted = memwarden("delete", seat, "--reason", "subject asked").stdout
    restored = memwarden("restore", seat, "--reason", "mistake").stdout

    assert deleted.strip() == "deleted seat (version 3)"
    assert restored.strip() == "restored seat (version 4)"


def test_delete_and_restore_as_json(memwarden: Memwarden, seat: str) -> None:
    deleted = memwarden.json("delete", seat, "--reason", "subject asked")
    restored = memwarden.json("restore", seat)

    assert (deleted["state"], deleted["version"]) == ("deleted", 3)
    assert "text" not in deleted
    assert (restored["state"], restored["version"]) == ("active", 4)
    assert restored["text"] == "Ana prefers window seats"


# -- history, diff, rollback ------------------------------------------------------------------


def test_history_shows_every_version(memwarden: Memwarden, seat: str) -> None:
    shown = memwarden("history", seat).stdout

    assert "MemoryCreated" in shown and "MemoryUpdated" in shown
    assert "she said so" in shown
    assert "Ana prefers aisle seats" in shown and "Ana prefers window seats" in shown


def test_history_as_json(memwarden: Memwarden, seat: str) -> None:
    history = memwarden.json("history", seat)

    assert [(v["version"], v["text"], v["reason"]) for v in history] == [
        (1, "Ana prefers aisle seats", None), (2, "Ana prefers window seats", "she said so")]


def test_diff_shows_changed_lines(memwarden: Memwarden, seat: str) -> None:
    shown = memwarden("diff", seat, "1", "2").stdout

    assert "-Ana prefers aisle seats" in shown
    assert "+Ana prefers window seats" in shown
    assert memwarden("diff", seat, "2", "2").stdout.strip() == "no differences"


def test_diff_as_json(memwarden: Memwarden, seat: str) -> None:
    memwarden("update", seat, "--priority", "1")

    text_diff = memwarden.json("diff", seat, "1", "2")
    metadata_diff = memwarden.json("diff", seat, "2", "3")

    assert "+Ana prefers window seats" in text_diff["text_diff"]
    assert text_diff["metadata_changes"] == {}
    assert metadata_diff == {"id": seat, "from": 2, "to": 3, "text_diff": [],
                             "metadata_changes": {"priority": [5, 1]}}


def test_rollback_appends_the_old_content(memwarden: Memwarden, seat: str) -> None:
    result = memwarden("rollback", seat, "1", "--reason", "misheard")

    assert result.stdout.strip() == "rolled seat back to the content of version 1: now version 3"
    assert memwarden.json("get", seat)["text"] == "Ana prefers aisle seats"


def test_rollback_as_json(memwarden: Memwarden, seat: str) -> None:
    rolled = memwarden.json("rollback", seat, "1", "--reason", "misheard",
                            "--expected-version", "2")

    assert (rolled["version"], rolled["text"], rolled["last_event"]) == (
        3, "Ana prefers aisle seats", "MemoryRolledBack")
    assert len(memwarden.json("history", seat)) == 3


# -- as-of ------------------------------------------------------------------------------------


def test_as_of_a_position_shows_the_memory_then(
        memwarden: Memwarden, start: int, seat: str) -> None:
    shown = memwarden("as-of", seat, "--position", str(start + 1)).stdout

    assert "Ana prefers aisle seats" in shown and "window" not in shown
    assert memwarden.json("as-of", seat, "--position", str(start + 2))["text"] == (
        "Ana prefers window seats")
    assert "did not exist yet" in memwarden.fails("as-of", seat, "--position", str(start),
                                                  code=NOT_FOUND)


def test_as_of_a_moment(memwarden: Memwarden, seat: str) -> None:
    created_at = memwarden.json("history", seat)[0]["updated_at"]

    then = memwarden.json("as-of", seat, "--at", created_at)

    assert then["version"] == 1


def test_as_of_a_tenant(memwarden: Memwarden, start: int, seat: str) -> None:
    add(memwarden, "later", "added later")

    table = memwarden("as-of", "--tenant", "acme", "--position", str(start + 2)).stdout
    memories = memwarden.json("as-of", "--tenant", "acme", "--position", str(start + 3))

    assert "seat" in table and "later" not in table
    assert sorted(m["id"] for m in memories) == ["later", "seat"]


# -- audit ------------------------------------------------------------------------------------


@pytest.fixture
def audited(memwarden: Memwarden, seat: str) -> str:
    """seat (positions start + 1, + 2 by cli:test), then officer:jane deletes it (+ 3),
    auditor:kim reads it (+ 4), and memory ``other`` of globex is added (+ 5)."""
    memwarden("delete", seat, "--reason", "subject asked", actor="officer:jane")
    memwarden("get", seat, actor="auditor:kim")
    add(memwarden, "other", "other memory", tenant="globex")
    return seat


def audit_positions(memwarden: Memwarden, *filters: str) -> list[int]:
    return [e["position"] for e in memwarden.json("audit", "--limit", "1000", *filters)["items"]]


def test_audit_shows_who_did_what(memwarden: Memwarden, audited: str) -> None:
    shown = memwarden("audit", "--limit", "1000").stdout  # past the seeded access rules

    for expected in ("MemoryCreated", "MemoryUpdated", "MemoryDeleted", "MemoryAccessed",
                     "officer:jane", "auditor:kim", "subject asked"):
        assert expected in shown
    assert "Ana prefers" not in shown


def test_audit_as_json_with_filters(memwarden: Memwarden, start: int, audited: str) -> None:
    everything = memwarden.json("audit", "--limit", "1000")["items"]

    assert [e["position"] for e in everything] == list(range(1, start + 6))
    assert {e["type"] for e in everything[:start]} <= {"PolicyRuleAdded"}
    assert [e["type"] for e in everything[start:]] == [
        "MemoryCreated", "MemoryUpdated", "MemoryDeleted", "MemoryAccessed", "MemoryCreated"]
    assert audit_positions(memwarden, "--cube", audited) == [start + n for n in (1, 2, 3, 4)]
    assert audit_positions(memwarden, "--actor", "officer:jane") == [start + 3]
    assert audit_positions(memwarden, "--tenant", "globex") == [start + 5]
    assert audit_positions(memwarden, "--type", "MemoryCreated", "--type",
                           "MemoryDeleted") == [start + n for n in (1, 3, 5)]


def test_audit_filters_by_time(memwarden: Memwarden, start: int, audited: str) -> None:
    last = datetime.fromisoformat(
        memwarden.json("audit", "--limit", "1000")["items"][-1]["recorded_at"])
    later = (last + timedelta(seconds=1)).isoformat()

    assert audit_positions(memwarden, "--since", later) == []
    assert audit_positions(memwarden, "--until", later) == list(range(1, start + 6))


def test_audit_pages_with_a_cursor(memwarden: Memwarden, start: int, audited: str) -> None:
    opening = memwarden.json("audit", "--limit", "3")
    first = memwarden.json("audit", "--limit", "3", "--after", str(start))
    rest = memwarden.json("audit", "--limit", "3", "--after", str(first["next"]))

    assert ([e["position"] for e in opening["items"]], opening["next"]) == ([1, 2, 3], 3)
    assert ([e["position"] for e in first["items"]], first["next"]) == (
        [start + 1, start + 2, start + 3], start + 3)
    assert ([e["position"] for e in rest["items"]], rest["next"]) == (
        [start + 4, start + 5], None)
    assert "more: --after 3" in memwarden("audit", "--limit", "3").stdout
    assert f"more: --after {start + 3}" in memwarden("audit", "--limit", "3", "--after",
                                                     str(start)).stdout


# -- verify -----------------------------------------------------------------------------------


def test_verify_reports_an_intact_chain(memwarden: Memwarden, start: int, seat: str) -> None:
    assert memwarden("verify").stdout.strip() == f"ok: {start + 2} events, chain intact"
    assert memwarden.json("verify") == {"ok": True, "checked": start + 2,
                                        "head_position": start + 2, "first_break": None}


@pytest.fixture
def tampered(memwarden: Memwarden, start: int, seat: str) -> str:
    """seat's update (position start + 2) rewritten in place, with one event after it."""
    add(memwarden, "third", "a third event")
    engine = create_engine(memwarden.db_url)
    try:
        overwrite_column(engine, start + 2, "actor", "cli:mallory")
    finally:
        engine.dispose()
    return seat


def test_verify_of_a_tampered_log_names_the_event_and_exits_5(
        memwarden: Memwarden, start: int, tampered: str) -> None:
    shown = memwarden("verify", code=INTEGRITY).stdout

    assert f"BROKEN at position {start + 2}" in shown
    assert f"{start + 1} events before it are intact" in shown


def test_verify_of_a_tampered_log_as_json(
        memwarden: Memwarden, start: int, tampered: str) -> None:
    report = memwarden.json("verify", code=INTEGRITY)

    assert (report["ok"], report["checked"], report["head_position"]) == (
        False, start + 1, start + 3)
    assert report["first_break"]["position"] == start + 2


# -- projections ------------------------------------------------------------------------------


def test_projections_rebuild(memwarden: Memwarden, start: int, seat: str) -> None:
    assert memwarden("projections", "rebuild").stdout.strip() == (
        f"rebuilt from {start + 2} events")

    first, again = (memwarden.json("projections", "rebuild") for _ in range(2))

    assert first["replayed"] == start + 2
    assert first["digest"] == again["digest"] and len(first["digest"]) == 64


def test_projections_rebuild_of_one_read_model(
        memwarden: Memwarden, start: int, seat: str) -> None:
    assert memwarden.json("projections", "rebuild", "audit")["replayed"] == start + 2
    assert memwarden.json("audit")["items"][0]["position"] == 1


def test_projections_status(memwarden: Memwarden, start: int, seat: str) -> None:
    status = memwarden.json("projections", "status")
    table = memwarden("projections", "status").stdout

    assert status["head"] == start + 2
    assert {"cubes", "versions", "audit", "usage"} <= set(status["checkpoints"])
    assert set(status["checkpoints"].values()) == {start + 2}
    assert "cubes" in table and "behind" in table


# -- exit codes -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["get", "nope"], ["get", "nope", "--json"], ["update", "nope", "--text", "x"],
    ["delete", "nope", "--reason", "r"], ["restore", "nope"], ["history", "nope"],
    ["diff", "nope", "1", "2"], ["rollback", "nope", "1", "--reason", "r"],
    ["as-of", "nope", "--position", "1"],
])
def test_an_unknown_memory_exits_3(memwarden: Memwarden, command: Sequence[str]) -> None:
    assert "no memory with id 'nope'" in memwarden.fails(*command, code=NOT_FOUND)


def test_a_missing_version_exits_2(memwarden: Memwarden, seat: str) -> None:
    assert "no version 9" in memwarden.fails("diff", seat, "1", "9", code=INVALID)
    memwarden.fails("rollback", seat, "9", "--reason", "r", code=INVALID)


def test_a_stale_expected_version_exits_4(memwarden: Memwarden, seat: str) -> None:
    complaint = memwarden.fails("update", seat, "--text", "x", "--expected-version", "1",
                                code=CONFLICT)

    assert "at version 2, not 1" in complaint
    memwarden.fails("rollback", seat, "1", "--reason", "r", "--expected-version", "1",
                    code=CONFLICT)


def test_changing_a_deleted_memory_exits_4(memwarden: Memwarden, seat: str) -> None:
    memwarden("delete", seat, "--reason", "asked")

    memwarden.fails("update", seat, "--text", "x", code=CONFLICT)
    memwarden.fails("delete", seat, "--reason", "again", code=CONFLICT)


def test_restoring_an_active_memory_exits_4(memwarden: Memwarden, seat: str) -> None:
    memwarden.fails("restore", seat, code=CONFLICT)


@pytest.mark.parametrize("command", [
    ["add", "   ", "--tenant", "acme", "--owner", "user:ana"],
    ["add", "x" * 65537, "--tenant", "acme", "--owner", "user:ana"],
    ["add", "x", "--tenant", "acme", "--owner", "user:ana", "--id", "reads:acme"],
    ["update", "seat"],
    ["update", "seat", "--text", "Ana prefers window seats"],
    ["as-of", "seat", "--at", "2026-01-01T00:00:00"],
    ["as-of", "seat", "--at", "yesterday"],
    ["as-of", "--position", "1"],
    ["as-of", "seat", "--tenant", "acme", "--position", "1"],
    ["as-of", "seat"],
    ["audit", "--since", "not a time"],
    ["projections", "rebuild", "nonsense"],
])
def test_invalid_input_exits_2_with_a_message(
        memwarden: Memwarden, seat: str, command: Sequence[str]) -> None:
    assert "error:" in memwarden.fails(*command, code=INVALID)


@pytest.mark.parametrize("command", [
    ["add", "x", "--tenant", "acme"],
    ["add", "x", "--tenant", "acme", "--owner", "o", "--priority", "11"],
    ["add", "x", "--tenant", "acme", "--owner", "o", "--type", "opinion"],
    ["delete", "seat"],
    ["list", "--limit", "0"],
    ["no-such-command"],
])
def test_bad_usage_exits_2(memwarden: Memwarden, command: Sequence[str]) -> None:
    memwarden(*command, code=INVALID)


def test_a_failed_command_writes_nothing(memwarden: Memwarden, start: int, seat: str) -> None:
    memwarden.fails("update", seat, "--text", "x", "--expected-version", "1", code=CONFLICT)

    assert memwarden.json("verify")["head_position"] == start + 2


def test_work_runs_each_worker_on_its_own_schedule(memwarden: Memwarden,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion pass that takes long (a LoRA training) does not hold up retention sweeps.

    The conversion pass is a stand-in that waits to be released: a real training long enough
    to show this would cost the suite minutes. The sweeps are real."""
    sweeps: list[Any] = []
    conversion_running = threading.Event()
    release = threading.Event()
    real_pass = work_module._work_once

    def work_once(mw: Any, name: str) -> Any:
        if name == "conversion":
            conversion_running.set()
            release.wait(120)
            return []
        result = real_pass(mw, name)
        sweeps.append(result)
        return result

    monkeypatch.setattr(work_module, "_work_once", work_once)
    sweeps_during_conversion: list[int] = []

    def stop_once_sweeps_went_on() -> None:
        conversion_running.wait(60)
        deadline = time.monotonic() + 60
        while len(sweeps) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        sweeps_during_conversion.append(len(sweeps))
        release.set()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C: `work` ends its passes and exits

    stopper = threading.Thread(target=stop_once_sweeps_went_on)
    stopper.start()
    result = memwarden("work", "--every", "1")
    stopper.join()
    assert sweeps_during_conversion[0] >= 3, result.stderr
    assert "retention sweep examined" in result.stderr


def test_what_users_wrote_prints_as_written(memwarden: Memwarden) -> None:
    """Square brackets in a memory are text, not terminal markup: a governance tool must never
    show a memory other than it is stored."""
    written = "[note] call [bold]Ana[/bold] back"
    add(memwarden, "bracketed", written)
    assert written in memwarden("list").stdout
    assert written in memwarden("get", "bracketed").stdout
    assert "no memory with id '[x]'" in memwarden.fails("get", "[x]", code=NOT_FOUND)


def test_ids_print_whole_however_narrow_the_terminal(
        memwarden: Memwarden, monkeypatch: pytest.MonkeyPatch) -> None:
    """An id is what a reader copies into the next command: tables never shorten it, even at
    80 columns where the memory's text must wrap around it."""
    created = memwarden.json("add", "Aiko prefers window seats on long-haul flights, and an "
                             "aisle seat on short ones", "--tenant", "globex-travel",
                             "--owner", "customer:aiko.tanaka")
    assert len(created["id"]) == 36  # a generated (version 7 UUID) id
    monkeypatch.setattr(_cli.console, "width", 80)
    for command in (["list"], ["audit", "--tenant", "globex-travel"],
                    ["search", "window seats", "--tenant", "globex-travel"],
                    ["as-of", "--tenant", "globex-travel", "--position", "1000"]):
        lines = memwarden(*command).stdout.splitlines()
        assert any(created["id"] in line for line in lines), (command, lines)
        assert max(map(len, lines)) <= 80
