"""``memwarden up``: the whole embedded stack in one process.

The REST API (uvicorn) serves from the main thread. A background thread, every second, applies
whatever the read models have not seen yet (events appended by another process, such as the CLI)
and appends the batched read records; another runs a retention sweep every
``$MEMWARDEN_RETENTION_INTERVAL`` seconds (``governance._retention``). In the distributed mode
(``MEMWARDEN_KAFKA_BOOTSTRAP``) it runs the API and the relay only: projectors and workers are
processes of their own (``memwarden project --source kafka``, ``memwarden work``). SIGINT or
SIGTERM stops it gracefully: the server stops
accepting connections and lets in-flight requests finish (a write is committed before it is
acknowledged, so no acknowledged event can be lost), then the background work runs one last time.

On first start (no active admin key) an admin key is issued, printed once, and written to
``<data dir>/admin.key``, readable by the operator only.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from governance._api import create_app
from governance._dashboard import Dashboard, DashboardError, start_dashboard
from governance._keys import ALL_TENANTS, ApiKeys
from governance._lineage import emit_pending_taints
from governance._relay import RelayThread, kafka_settings, open_relay
from governance._sdk import MemWarden

ADMIN_KEY_FILE = "admin.key"
BACKGROUND_INTERVAL_SECONDS = 1.0
logger = logging.getLogger("memwarden.up")


@dataclass(frozen=True, slots=True)
class AdminKey:
    path: Path
    secret: str | None
    """The key, when this start issued it; None when an active admin key existed already."""


def ensure_admin_key(memwarden: MemWarden, data_dir: Path) -> AdminKey:
    path = data_dir / ADMIN_KEY_FILE
    keys = ApiKeys(memwarden)
    if keys.has_active_admin():
        return AdminKey(path, None)
    issued = keys.issue(tenant=ALL_TENANTS, subject="admin", role="admin")
    _write_private(path, issued.secret + "\n")
    return AdminKey(path, issued.secret)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by the owner only, replacing any older file in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


class _Every(threading.Thread):
    """Runs ``work`` every ``seconds`` until stopped; a failure is logged and retried."""

    def __init__(self, seconds: float, work: Callable[[], object]) -> None:
        super().__init__(name="memwarden-background", daemon=True)
        self._seconds = seconds
        self._work = work
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self._seconds):
            try:
                self._work()
            except Exception:
                logger.exception("background work failed; retrying in %ss", self._seconds)

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def _retention_sweep(memwarden: MemWarden) -> None:
    """One retention sweep ($MEMWARDEN_RETENTION_INTERVAL apart), logged with its counts."""
    report = memwarden.run_retention()
    logger.info("retention sweep: examined %d, %d events, %s", report.examined, report.events,
                dict(report.counts))


def _start_conversions(memwarden: MemWarden) -> _Every | None:
    """The conversion worker, when policies/conversion.yaml schedules any scope."""
    from governance._conversion import ConversionPolicy
    from governance._conversion_worker import run_conversions

    policy = ConversionPolicy.load()
    if not policy.worker.scopes:
        return None
    worker = _Every(policy.worker.interval_seconds, lambda: run_conversions(memwarden))
    worker.start()
    return worker


def _background_work(memwarden: MemWarden) -> None:
    if memwarden.settings.kafka_bootstrap is None:  # distributed: Kafka-fed projectors do it
        memwarden.projector.catch_up()
    memwarden.flush_reads()
    emit_pending_taints(memwarden._backend)  # e.g. a source another process changed


@contextmanager
def _stopping_on_signals(server: uvicorn.Server) -> Iterator[None]:
    """SIGINT and SIGTERM ask the server to stop.

    uvicorn installs its own handlers while it serves; these cover the start-up before that,
    and the signal uvicorn raises again once it has stopped, which would otherwise kill the
    process (SIGTERM) or raise KeyboardInterrupt (SIGINT) before the final background work.
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_stack(memwarden: MemWarden, *, host: str, port: int, data_dir: Path,
              echo: Callable[[str], None] = print, dashboard: bool = True) -> None:
    """Serve until SIGINT or SIGTERM; ``memwarden`` stays open (its owner closes it). With
    ``dashboard``, the compliance dashboard runs beside the API, on the same host."""
    _background_work(memwarden)
    admin = ensure_admin_key(memwarden, data_dir)
    config = uvicorn.Config(create_app(memwarden), host=host, port=port, ws="none",
                            log_level="info", timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    with _stopping_on_signals(server):
        # Bound here, before anything is printed: a busy port fails at once, and port 0 gets a
        # free one whose number the banner can show.
        sock = config.bind_socket()
        # Listening at once: a client that reads the banner while the app is still starting
        # waits in the backlog instead of being refused.
        sock.listen(config.backlog)
        _no_delay(sock)
        base = f"http://{_url_host(host)}:{sock.getsockname()[1]}"
        board, board_line = _start_dashboard(memwarden, host) if dashboard else (None, None)
        echo(_banner(base, memwarden, admin, board_line))
        background = _Every(BACKGROUND_INTERVAL_SECONDS, lambda: _background_work(memwarden))
        background.start()
        # In the distributed mode the workers run as their own processes (memwarden work).
        embedded = memwarden.settings.kafka_bootstrap is None
        retention = _Every(memwarden.settings.retention_interval,
                           lambda: _retention_sweep(memwarden)) if embedded else None
        if retention is not None:
            retention.start()
        conversions = _start_conversions(memwarden) if embedded else None
        relay = _start_relay(memwarden)
        try:
            server.run(sockets=[sock])
        finally:
            if retention is not None:
                retention.stop()
            if conversions is not None:
                conversions.stop()
            background.stop()
            _background_work(memwarden)
            if relay is not None:
                relay.stop()
            if board is not None:
                board.stop()
            sock.close()
    echo("MemWarden stopped; every acknowledged write is in the log.")


def _start_relay(memwarden: MemWarden) -> RelayThread | None:
    """In the distributed mode, the relay publishing the log to Kafka beside the API."""
    if memwarden.settings.kafka_bootstrap is None:
        return None
    relay = RelayThread(open_relay(memwarden, kafka_settings(memwarden.settings)))
    relay.start()
    return relay


def _start_dashboard(memwarden: MemWarden, host: str) -> tuple[Dashboard | None, str]:
    """The dashboard process, and its banner line (why it did not start, if it did not)."""
    port = memwarden.settings.dashboard_port
    try:
        board = start_dashboard(db_url=memwarden.store.engine.url.render_as_string(
            hide_password=False), host=host, port=port, wait=False)
    except (DashboardError, OSError) as error:
        return None, f"not started: {error}"
    return board, f"{board.url}  (sign in with an API key)"


def _no_delay(sock: socket.socket) -> None:
    """Turn Nagle's algorithm off on the connections ``sock`` accepts (they inherit it).

    ``Config.bind_socket`` creates the socket with protocol 0, and asyncio sets TCP_NODELAY only
    on sockets whose protocol is IPPROTO_TCP: without this, a response written in two parts waits
    for the client's delayed ACK, about 40 ms a request on Linux.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _banner(base: str, memwarden: MemWarden, admin: AdminKey,
            dashboard: str | None = None) -> str:
    database = memwarden.store.engine.url.render_as_string(hide_password=True)
    lines = [
        "MemWarden is up",
        f"  API        {base}/v1",
        f"  docs       {base}/docs",
        *([f"  dashboard  {dashboard}"] if dashboard else []),
        f"  database   {database}",
    ]
    if admin.secret is not None:
        lines += [f"  admin key  {admin.secret}",
                  f"             shown once; saved to {admin.path} (readable by you only)"]
    else:
        lines.append(f"  admin key  in {admin.path} (issued on first start)")
    lines.append("Stop with Ctrl+C; requests in flight finish first.")
    return "\n".join(lines)
