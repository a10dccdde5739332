"""Fixtures shared by every test: one database per test, on each backend.

``database_url`` is parametrized over SQLite (a fresh file) and PostgreSQL (a fresh schema in the
local server, dropped afterwards). Set ``MEMWARDEN_TEST_PG_URL`` to use another server. Outside CI
a missing server skips the PostgreSQL cases; in CI (``CI`` set) it fails them.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

pytest_plugins = ["kafka_fixtures", "retention_fixtures"]
"""Fixtures of a few test modules each, written once (plugins, since test modules must not
import each other)."""

PG_URL = os.environ.get("MEMWARDEN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")
_URL_FIXTURES = {"sqlite": "sqlite_url", "postgresql": "postgres_url"}
_ran: Counter[str] = Counter()


def _postgres_problem() -> str | None:
    try:
        engine = create_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as error:  # any failure to connect means "no server"
        return f"PostgreSQL at {make_url(PG_URL).render_as_string()} is unreachable: {error}"
    return None


@pytest.fixture(scope="session")
def postgres_server() -> str:
    problem = _postgres_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"{problem} (CI requires PostgreSQL)")
        pytest.skip(problem)
    return PG_URL


def _schema_url(base: str, schema: str) -> str:
    url = make_url(base)
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False)


@contextmanager
def _fresh_schema(server: str) -> Iterator[str]:
    """A URL whose connections see only a new, empty schema, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _schema_url(server, schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A URL whose connections see only a new, empty schema."""
    with _fresh_schema(postgres_server) as url:
        yield url


@pytest.fixture
def other_postgres_url(postgres_server: str) -> Iterator[str]:
    """Another schema of the same database, beside ``postgres_url``'s (another deployment)."""
    with _fresh_schema(postgres_server) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'memwarden.db'}"


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    """Every store contract runs once per backend."""
    backend = request.param
    url: str = request.getfixturevalue(_URL_FIXTURES[backend])
    _ran[backend] += 1
    return url


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    ran = ", ".join(f"{name}: {_ran[name]} tests" for name in BACKENDS)
    terminalreporter.write_line(f"database backends exercised: {ran}")
