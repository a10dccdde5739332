"""What an attacker with database access could do to the log, bypassing the append-only triggers.

The database refuses UPDATE and DELETE on ``events``; someone with enough privileges can still get
around that (SQLite: drop the trigger and put it back; PostgreSQL: replica mode disables user
triggers). The hash chain is what catches them: tests use these helpers to prove it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, text


@contextmanager
def _triggers_bypassed(engine: Engine) -> Iterator[Connection]:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL session_replication_role = replica"))
            yield conn
            return
        triggers = conn.execute(text(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'events'"
        )).all()
        for name, _sql in triggers:
            conn.execute(text(f'DROP TRIGGER "{name}"'))
        yield conn
        for _name, sql in triggers:
            conn.execute(text(sql))


def overwrite_column(engine: Engine, position: int, column: str, value: Any) -> None:
    """Change one stored field of the event at ``position`` in place."""
    with _triggers_bypassed(engine) as conn:
        changed = conn.execute(text(f"UPDATE events SET {column} = :value WHERE position = :p"),
                               {"value": value, "p": position}).rowcount
    assert changed == 1, f"no event at position {position}"


def delete_event(engine: Engine, position: int) -> None:
    """Remove the event at ``position`` from the log."""
    with _triggers_bypassed(engine) as conn:
        removed = conn.execute(text("DELETE FROM events WHERE position = :p"),
                               {"p": position}).rowcount
    assert removed == 1, f"no event at position {position}"
