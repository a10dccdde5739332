"""Another process's long schema setup, as a SQLite database sees it: its write lock held."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from eventstore import _dialects, _store


def shorten_sqlite_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy timeout of 0.3 s standing for the 60 s, and schema-setup attempts of 0.1 s."""
    monkeypatch.setattr(_dialects, "SQLITE_BUSY_TIMEOUT_MS", 300)
    monkeypatch.setattr(_store, "SCHEMA_SETUP_ATTEMPT_MS", 100)


@contextmanager
def write_lock_held(path: Path, seconds: float) -> Iterator[None]:
    """The database at ``path`` write-locked from now for ``seconds`` (an upgrade's read-model
    rebuild, say), by a connection of its own."""
    upgrading = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    upgrading.execute("BEGIN IMMEDIATE")
    released = threading.Timer(seconds, upgrading.rollback)
    released.start()
    try:
        yield
    finally:
        released.join()
        upgrading.close()
