"""The dashboard end to end, as a newcomer uses it: ``memwarden demo``, then ``memwarden up``
(API and dashboard), then headless Chromium signs in with the key ``up`` printed, filters the
audit trail to one memory, opens it, rolls it back (reason, then confirmation) and sees the new
version, then visits every page. A screenshot of every page goes to ``$MEMWARDEN_TEST_ARTIFACTS``
(default ``test-artifacts/dashboard``, git-ignored).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from e2e_browser import Browser, artifacts_dir, chromium_problem

from governance import ENVIRONMENT_VARIABLES

ROOT = Path(__file__).resolve().parent.parent
MEMORY = "demo-globex-travel-003"
"""Sam's loyalty tier: Gold, wrongly updated to Platinum by an agent, rolled back to Gold."""
START_SECONDS = 120
REASON = "end-to-end test: the Platinum upgrade was confirmed after all"


@pytest.fixture(scope="module")
def browser_available() -> None:
    problem = chromium_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"{problem} (CI runs the browser test)")
        pytest.skip(problem)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _memwarden() -> list[str]:
    script = Path(sys.executable).with_name("memwarden")
    return [str(script)] if script.exists() else [
        sys.executable, "-c", "from governance._cli import main; main()"]


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    output: Path
    api: str
    dashboard: str
    admin_key: str


@pytest.fixture
def stack(tmp_path: Path, browser_available: None) -> Iterator[Stack]:
    """``memwarden demo`` then ``memwarden up``, configured through the environment only."""
    api_port, dashboard_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT_VARIABLES}
    env.update(MEMWARDEN_DB_URL=f"sqlite:///{tmp_path / 'memwarden.db'}",
               MEMWARDEN_DATA_DIR=str(tmp_path / "data"),
               MEMWARDEN_KEY_FILE=str(tmp_path / "data" / "master.key"),
               MEMWARDEN_API_PORT=str(api_port), MEMWARDEN_DASHBOARD_PORT=str(dashboard_port),
               PYTHONUNBUFFERED="1")
    subprocess.run([*_memwarden(), "demo"], env=env, cwd=tmp_path, check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)
    output = tmp_path / "up.out"
    with output.open("wb") as out:
        process = subprocess.Popen([*_memwarden(), "up"], env=env, cwd=tmp_path,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        banner = _wait_for_banner(process, output)
        key = re.search(r"admin key\s+(mwk_\S+)", banner)
        board = re.search(r"dashboard\s+(http://\S+)", banner)
        assert key and board, banner
        assert board.group(1) == f"http://127.0.0.1:{dashboard_port}"
        _wait_healthy(f"{board.group(1)}/_stcore/health", process, output)
        yield Stack(process, output, f"http://127.0.0.1:{api_port}", board.group(1),
                    key.group(1))
    finally:
        _stop(process)
    assert process.returncode == 0, output.read_text(errors="replace")
    _wait_closed(dashboard_port)  # the dashboard stops with memwarden up


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_closed(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            return
        assert time.monotonic() < deadline, f"something still answers on port {port}"
        time.sleep(0.2)


def _wait_for_banner(process: subprocess.Popen[bytes], output: Path) -> str:
    deadline = time.monotonic() + START_SECONDS
    while "Stop with Ctrl+C" not in (text := output.read_text(errors="replace")):
        assert process.poll() is None, f"memwarden up exited:\n{text}"
        assert time.monotonic() < deadline, f"no banner from memwarden up:\n{text}"
        time.sleep(0.2)
    return text


def _wait_healthy(url: str, process: subprocess.Popen[bytes], output: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        assert process.poll() is None, output.read_text(errors="replace")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the dashboard never answered at {url}"
        time.sleep(0.3)


def test_a_newcomer_audits_the_demo_and_rolls_a_memory_back(stack: Stack) -> None:
    shots = artifacts_dir(ROOT / "test-artifacts" / "dashboard")
    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    before = httpx.get(f"{stack.api}/v1/memories/{MEMORY}", headers=headers).json()
    with Browser(shots) as browser:
        browser.open(stack.dashboard)
        browser.wait_for_text("Sign in with an API key")
        browser.screenshot("01-sign-in")
        browser.fill("API key", stack.admin_key)
        browser.click_button("Sign in")
        browser.wait_for_text("Activity over time")
        browser.screenshot("02-overview")

        browser.click_link("Audit trail")
        browser.fill("Memory id", MEMORY)
        browser.click_button("Apply filters")
        browser.wait_for_text("Open a memory of this page")
        assert browser.options("Open a memory of this page") == [MEMORY]  # the table is a canvas
        browser.screenshot("03-audit-trail-filtered")

        browser.choose("Open a memory of this page", MEMORY)
        browser.click_button("Open memory")
        browser.wait_for_text(f"version {before['version']}")
        assert "Sam's loyalty tier is Gold." in browser.text()
        browser.screenshot("04-memory-detail")
        browser.click_tab("Compare versions")
        browser.screenshot("05-memory-compare")
        browser.click_tab("As of a time")
        browser.screenshot("06-memory-as-of")

        browser.click_tab("Roll back")
        browser.choose("Roll back to version", "Platinum")
        browser.fill("Reason (required, recorded in the audit trail)", REASON)
        browser.click_button("Roll back…")
        browser.wait_for_text("Confirm rollback")
        browser.screenshot("07-rollback-confirm")
        # The new version is scanned for personal data: the first scan loads the NLP model.
        browser.click_button("Confirm rollback", seconds=START_SECONDS)
        browser.wait_for_text("Rolled back")
        assert "Sam's loyalty tier is Platinum." in browser.text()
        after = httpx.get(f"{stack.api}/v1/memories/{MEMORY}", headers=headers).json()
        assert after["version"] > before["version"]
        assert after["text"] == "Sam's loyalty tier is Platinum."
        browser.wait_for_text(f"version {after['version']}")
        browser.screenshot("08-rolled-back")

        for number, page, wait_for in (
                (9, "Access decisions", "Reads by actor"),
                (10, "Sensitive data", "Findings by entity type"),
                (11, "Retention", "Legal holds in force"),
                (12, "Erasures", "Subject erasures"),
                (13, "Lineage", "Artifacts"),
                (14, "Integrity", "Verify the hash chain")):
            browser.click_link(page)
            browser.wait_for_text(wait_for)
            if page == "Integrity":
                browser.click_button("Verify the hash chain")
                browser.wait_for_text("The chain is intact")
            browser.screenshot(f"{number:02d}-{page.lower().replace(' ', '-')}")

    trail = httpx.get(f"{stack.api}/v1/audit", headers=headers,
                      params={"cube_id": MEMORY, "type": "MemoryRolledBack"}).json()["items"]
    assert [(e["actor"], e["reason"]) for e in trail][-1] == ("admin", REASON)
    assert len(list(shots.glob("*.png"))) >= 14


def test_memwarden_dashboard_alone_serves_until_stopped(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT_VARIABLES}
    env.update(MEMWARDEN_DB_URL=f"sqlite:///{tmp_path / 'memwarden.db'}",
               MEMWARDEN_KEY_FILE=str(tmp_path / "master.key"),
               MEMWARDEN_DASHBOARD_PORT=str(port), PYTHONUNBUFFERED="1")
    output = tmp_path / "dashboard.out"
    with output.open("wb") as out:
        process = subprocess.Popen([*_memwarden(), "dashboard"], env=env, cwd=tmp_path,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/_stcore/health", process, output)
        announced = f"MemWarden dashboard at http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_SECONDS  # printed once it answers: just after
        while announced not in output.read_text(errors="replace"):
            assert time.monotonic() < deadline, output.read_text(errors="replace")
            time.sleep(0.1)
    finally:
        _stop(process)
    assert process.returncode == 0, output.read_text(errors="replace")
    _wait_closed(port)
