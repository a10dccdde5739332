"""``memwarden dashboard``: the compliance dashboard alone (``memwarden up`` starts it too)."""

from __future__ import annotations

import signal
from types import FrameType

import click

from governance._cli import cli, command
from governance._config import Settings
from governance._dashboard import DashboardError, start_dashboard
from governance._errors import InvalidCommand
from governance._principal import PLATFORM, Resource
from governance._sdk import MemWarden


@command(cli, "dashboard")
@click.option("--host", help="Interface to listen on (default: $MEMWARDEN_API_HOST, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535),
              help="Port (default: $MEMWARDEN_DASHBOARD_PORT, 8501).")
def dashboard_command(mw: MemWarden, host: str | None, port: int | None) -> None:
    """Start the compliance dashboard (Streamlit) over the database; sign in there with an API
    key. Ctrl+C stops it."""
    # The dashboard opens the database itself and keeps its read models up to date: an
    # operator's job, whoever signs in to it later.
    mw.require("platform.operate", Resource.of_tenant(PLATFORM))
    settings = Settings.from_env()
    try:
        board = start_dashboard(
            db_url=mw.store.engine.url.render_as_string(hide_password=False),
            host=host or settings.api_host, port=port or settings.dashboard_port)
    except DashboardError as error:
        raise InvalidCommand(str(error)) from None

    def stop(signum: int, frame: FrameType | None) -> None:
        # Only ask: waiting here, inside the main thread's wait for the same process, deadlocks.
        board.process.terminate()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        click.echo(f"MemWarden dashboard at {board.url}; sign in with an API key. "
                   "Stop with Ctrl+C.")
        board.process.wait()
    finally:
        board.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
