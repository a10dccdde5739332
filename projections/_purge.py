"""Purging erased text from the read models that hold it (``cubes``, ``versions``).

Two events shred memory text (see ``governance._sensitive``): ``MemoryContentErased`` on a
memory's stream (one memory) and ``SubjectErased`` on ``subject:<subject>`` (every memory a data
subject owns in a tenant). The log itself needs nothing done: its copies of the text were sealed
under keys that are now gone. Read models hold plaintext, so each one that stores text must blank
it when it applies either event. Any projection may use ``purge_text`` for that.

Rows are purged to exactly what a rebuild would produce: replayed after the erasure, the events
decode with no text, so no version can say its text changed; "text" leaves ``changed`` too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import Connection

from eventstore import StoredEvent, canonical_json
from eventstore._driver import DriverConnection
from projections._state import MEMORY_CONTENT_ERASED, SUBJECT_ERASED

ERASURE_EVENT_TYPES = frozenset({MEMORY_CONTENT_ERASED, SUBJECT_ERASED})


def purge_text(conn: Connection, table: str, events: Sequence[StoredEvent]) -> set[str]:
    """Blank the text of every row of ``table`` (a table of memory states: ``cube_id``,
    ``version``, ``tenant``, ``owner``, ``text``, ``changed``, ``position``) that an erasure
    among ``events`` covers: rows written before the erasure, of its memory or its subject.
    Returns the ids of the memories purged."""
    erasures = [e for e in events if e.type in ERASURE_EVENT_TYPES]
    purged: set[str] = set()
    if not erasures:
        return purged
    db = DriverConnection(conn)
    if db.dialect.name == "sqlite":
        # Zero the old cells rather than leave the text on free space in the file.
        db.execute("PRAGMA secure_delete=ON")
    select = f"SELECT cube_id, version, changed FROM {table} WHERE position < ? AND "
    for erasure in erasures:
        if erasure.type == SUBJECT_ERASED:
            rows = db.execute(select + "tenant = ? AND owner = ?", [
                erasure.position, erasure.payload["tenant"], erasure.payload["subject"]]
            ).fetchall()
        else:
            rows = db.execute(select + "cube_id = ?",
                              [erasure.position, erasure.stream_id]).fetchall()
        db.executemany(
            f"UPDATE {table} SET text = '', changed = ? WHERE cube_id = ? AND version = ?",
            [(canonical_json([name for name in json.loads(changed) if name != "text"]),
                cube_id, version)
             for cube_id, version, changed in rows])
        purged.update(cube_id for cube_id, _, _ in rows)
    return purged
