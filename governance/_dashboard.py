"""Start the compliance dashboard (``dashboard/app.py``) as a Streamlit process, beside the API
(``memwarden up``) or alone (``memwarden dashboard``). It runs in its own process, acting
through the SDK like any other surface; this module only starts and stops it.

Streamlit runs headless, never phones home (``browser.gatherUsageStats=false``), watches no
files, and dies with the process that started it (Linux: the parent-death signal), so a killed
``memwarden up`` leaves no dashboard holding the port.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 10

STREAMLIT_OPTIONS = {
    "server.headless": "true",
    "browser.gatherUsageStats": "false",
    "server.fileWatcherType": "none",
    "server.runOnSave": "false",
    "global.developmentMode": "false",
    "client.toolbarMode": "viewer",
    "client.showErrorDetails": "false",
    "theme.base": "light",
    "theme.primaryColor": "#2563eb",
}


class DashboardError(RuntimeError):
    """The dashboard did not start (busy port, broken installation)."""


def _app() -> Path:
    spec = importlib.util.find_spec("dashboard")
    if spec is None or spec.origin is None:
        raise DashboardError("the dashboard package is not installed")
    return Path(spec.origin).with_name("app.py")


def streamlit_command(*, host: str, port: int) -> list[str]:
    options = {**STREAMLIT_OPTIONS, "server.address": host, "server.port": str(port)}
    return [sys.executable, "-m", "streamlit", "run", str(_app()),
            *(f"--{name}={value}" for name, value in options.items())]


def _die_with_parent() -> None:
    """Run in the child before exec: SIGTERM it when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Dashboard:
    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_dashboard(*, db_url: str, host: str, port: int, wait: bool = True,
                    environ: Mapping[str, str] | None = None) -> Dashboard:
    """Start Streamlit on ``host:port`` over the database ``db_url``; with ``wait``, return
    once it answers (else at once: it answers a few seconds later)."""
    if _port_taken(host, port):
        raise DashboardError(f"port {port} is in use; set MEMWARDEN_DASHBOARD_PORT to a free one")
    env = {**(os.environ if environ is None else environ), "MEMWARDEN_DB_URL": db_url}
    process = subprocess.Popen(
        streamlit_command(host=host, port=port), env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=None,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    url = f"http://{_url_host(host)}:{port}"
    dashboard = Dashboard(process, url)
    if not wait:
        return dashboard
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not _healthy(url):
        if process.poll() is not None:
            raise DashboardError(f"the dashboard exited with status {process.returncode}")
        if time.monotonic() > deadline:
            dashboard.stop()
            raise DashboardError(f"the dashboard did not answer at {url} within "
                                 f"{START_TIMEOUT_SECONDS} s")
        time.sleep(0.2)
    return dashboard


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
