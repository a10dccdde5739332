"""The retention tests' shared parts: a pytest plugin (listed in conftest.py). The report and
surface tests use one ``policy_file`` fixture and one set of rules; the worker and archive tests
one ``FakeClock``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from eventstore import utcnow
from governance import ENVIRONMENT_VARIABLES

POLICY = """\
rules:
  - name: short-events
    match: {semantic_type: event}
    ttl: 30d
  - name: cold-notes
    tiers: {cold_archive_after: 60d}
"""


@pytest.fixture
def policy_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``POLICY`` in a file that MEMWARDEN_RETENTION_POLICY names, with every other MemWarden
    variable of the environment unset (a developer's own settings must not leak in), and wide
    terminal tables (no wrapped or elided cells in CLI output)."""
    path = tmp_path / "retention.yaml"
    path.write_text(POLICY)
    for variable in ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MEMWARDEN_RETENTION_POLICY", str(path))
    monkeypatch.setenv("COLUMNS", "250")
    return path


class FakeClock:
    """The retention worker's injectable clock: ``now`` until a test moves it (default: the real
    time when made)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start if start is not None else utcnow()

    def __call__(self) -> datetime:
        return self.now
