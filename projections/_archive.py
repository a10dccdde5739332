"""The cold archive: where a memory's text goes while the memory is in the ``cold_archive`` tier.

When a memory goes cold (``MemoryTierChanged`` to ``cold_archive``) its text leaves the hot read
models in the same projection batch, and a recall (``MemoryRecalled``) brings it back:

- ``versions`` blanks the text of every version and keeps the texts, zlib-compressed, in
  ``retention_archive`` (one row per cold memory; ``place_version_texts``);
- ``cubes`` blanks its text and takes it back on recall from there (``texts_as_of``), so
  ``cubes`` reads ``versions``' rows (``READS`` in ``_kafka_projector``);
- ``search`` blanks its document (the full-text index follows the text) and keeps its own
  compressed copy (``search_archive``, in ``_search``): the search indexer may be a Kafka consumer
  of its own, which cannot read ``versions``.

An erasure drops the archived copies with the rest. The archive stores what a recall needs to
give back history, versions, diffs and as-of: the text of every *content* version (created,
updated, rolled back). Every other version's text is that of the latest content version before
it: lifecycle events never change the text, and none that does can happen while a memory is cold
(it must be recalled first).

This is the *stored form*, not the state: ``evolve`` carries the real text through the cold tier
(time travel and the domain see it), a read model that loads a cold row to fold new events onto
it first puts the archived text back, and each read model stores ``''`` for a cold memory's
text. The rows are thus a function of the events whatever the batching: incremental and rebuilt
digests agree.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Integer, LargeBinary, String, Table

from eventstore import StoredEvent, UTCDateTime, canonical_json
from eventstore._driver import DriverConnection, in_list, upsert_sql
from projections._state import (
    COLD_ARCHIVE,
    MEMORY_CREATED,
    MEMORY_RECALLED,
    MEMORY_ROLLED_BACK,
    MEMORY_TIER_CHANGED,
    MEMORY_UPDATED,
    WORKING,
)
from projections._tables import metadata

retention_archive = Table(
    "retention_archive",
    metadata,
    Column("cube_id", String(200), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("version", Integer, nullable=False),
    Column("text_bytes", Integer, nullable=False),
    Column("compressed", LargeBinary, nullable=False),
    Column("archived_at", UTCDateTime, nullable=False),
)
"""One row per cold memory (maintained with ``versions``): ``compressed`` holds the texts of its
content versions, ``version`` and ``text_bytes`` name the latest of them (the text a recall shows)
and its size; ``archived_at`` is when the memory went cold."""

CONTENT_EVENTS = (MEMORY_CREATED, MEMORY_UPDATED, MEMORY_ROLLED_BACK)
_CONTENT_ROWS = ("SELECT cube_id, version, text FROM versions WHERE last_event IN ("
                 + ", ".join(f"'{name}'" for name in CONTENT_EVENTS) + ") AND cube_id IN {keys}")
_SELECT_ARCHIVE = ("SELECT cube_id, compressed, archived_at FROM retention_archive "
                   "WHERE cube_id IN {keys}")
_UPSERT_ARCHIVE = upsert_sql(
    "retention_archive",
    ("cube_id", "tenant", "version", "text_bytes", "compressed", "archived_at"),
    key=("cube_id",))
_DELETE_ARCHIVE = "DELETE FROM retention_archive WHERE cube_id IN {keys}"
_BLANK_VERSIONS = "UPDATE versions SET text = '' WHERE cube_id IN {keys}"
_SELECT_VERSION_KEYS = "SELECT cube_id, version FROM versions WHERE cube_id IN {keys}"
_RESTORE_VERSION = "UPDATE versions SET text = ? WHERE cube_id = ? AND version = ?"
_CHUNK = 500


def compress_text(text: str) -> bytes:
    return zlib.compress(text.encode(), 9)


def decompress_text(blob: bytes) -> str:
    return zlib.decompress(blob).decode()


def pack(texts: Mapping[int, str]) -> bytes:
    """Texts by version, compressed."""
    return compress_text(canonical_json(sorted(texts.items())))


def unpack(blob: bytes) -> dict[int, str]:
    return {version: text for version, text in json.loads(decompress_text(bytes(blob)))}


def text_as_of(texts: Mapping[int, str], version: int) -> str:
    """The text of ``version``, given the texts of the content versions: that of the latest
    content version at or before it ('' if none: an erased memory's)."""
    before = [v for v in texts if v <= version]
    return texts[max(before)] if before else ""


def archived_text(blob: bytes) -> str:
    """The latest text held in an archive row's ``compressed``: what the memory reads now."""
    texts = unpack(blob)
    return texts[max(texts)]


def _each_chunk(db: DriverConnection, sql: str, keys: Sequence[str]) -> None:
    """Run ``sql`` (a statement with an ``IN {keys}``) over ``keys``, a chunk at a time."""
    for start in range(0, len(keys), _CHUNK):
        part = list(keys[start:start + _CHUNK])
        db.execute(sql.format(keys=in_list(len(part))), part)


def archived_texts(db: DriverConnection, cube_ids: Sequence[str]) -> dict[str, dict[int, str]]:
    """The archived content texts of those of ``cube_ids`` that are cold, by cube and version."""
    return {cube_id: unpack(blob)
            for cube_id, blob, _ in db.fetch_in_chunks(_SELECT_ARCHIVE, list(cube_ids))}


def content_texts(db: DriverConnection, cube_ids: Sequence[str],
                  archived: Mapping[str, Mapping[int, str]] | None = None
                  ) -> dict[str, dict[int, str]]:
    """The text of every content version of these memories, from ``versions`` where it is hot
    and from the archive (``archived``, or read here) where it is not."""
    ids = sorted(set(cube_ids))
    if archived is None:
        archived = archived_texts(db, ids)
    texts: dict[str, dict[int, str]] = {}
    for cube_id, version, text in db.fetch_in_chunks(_CONTENT_ROWS, ids):
        texts.setdefault(cube_id, {})[version] = text
    for cube_id, held in archived.items():
        texts.setdefault(cube_id, {}).update(held)
    return texts


def texts_as_of(db: DriverConnection, wanted: Mapping[str, int]) -> dict[str, str]:
    """Each memory's text as of the version given, hot or archived. For ``cubes``, which keeps
    no copy: a version's text never changes but by an erasure, which every read model applies
    too, so reading it from ``versions`` at any later point gives the same rows."""
    found = content_texts(db, list(wanted))
    return {cube_id: text_as_of(found.get(cube_id, {}), version)
            for cube_id, version in wanted.items()}


def final_tiers(events: Iterable[StoredEvent]) -> dict[str, str]:
    """The tier each memory moved to last among ``events`` (those that moved)."""
    tiers: dict[str, str] = {}
    for event in events:
        if event.type == MEMORY_TIER_CHANGED and "to_tier" in event.payload:
            tiers[event.stream_id] = str(event.payload["to_tier"])
        elif event.type == MEMORY_RECALLED:
            tiers[event.stream_id] = WORKING
    return tiers


def place_version_texts(db: DriverConnection, events: Sequence[StoredEvent],
                        cold_before: Iterable[str]) -> None:
    """After ``versions`` wrote a batch's rows: archive and blank the texts of the memories the
    batch leaves cold, put back those of the memories it recalled.

    ``cold_before``: memories folded from a cold row (their new rows hold real text). A memory
    the batch sends cold costs one read of its content rows, one compression and its share of one
    UPDATE per chunk of 500: the retention sweep stays set-based."""
    tiers = {cube_id: COLD_ARCHIVE for cube_id in cold_before}
    tiers.update(final_tiers(events))
    # Only memories that went to or came from the cold tier (a move to long_term is no concern).
    moved = set(cold_before) | {e.stream_id for e in events if e.type == MEMORY_RECALLED or (
        e.type == MEMORY_TIER_CHANGED and e.payload.get("to_tier") == COLD_ARCHIVE)}
    if not moved:
        return
    cold_at: dict[str, datetime] = {}
    tenants: dict[str, str] = {}
    for event in events:
        tenants[event.stream_id] = event.tenant or ""
        if event.type == MEMORY_TIER_CHANGED and event.payload.get("to_tier") == COLD_ARCHIVE:
            cold_at[event.stream_id] = event.occurred_at
    ids = sorted(moved)
    archived: dict[str, dict[int, str]] = {}
    for cube_id, blob, archived_at in db.fetch_in_chunks(_SELECT_ARCHIVE, ids):
        archived[cube_id] = unpack(blob)
        cold_at.setdefault(cube_id, db.dialect.from_db_time(archived_at))
    going = [c for c in ids if tiers[c] == COLD_ARCHIVE]
    leaving = [c for c in ids if tiers[c] != COLD_ARCHIVE and c in archived]
    texts = content_texts(db, going + leaving, archived)
    if going:
        rows: list[tuple[Any, ...]] = []
        for cube_id in going:
            held = texts.get(cube_id, {})
            if any(held.values()):  # (an erased memory's texts are all gone: nothing to keep)
                latest = max(held)
                at = cold_at.get(cube_id) or min(
                    e.occurred_at for e in events if e.stream_id == cube_id)
                rows.append((cube_id, tenants[cube_id], latest, len(held[latest].encode()),
                             pack(held), db.dialect.to_db_time(at)))
        db.executemany(_UPSERT_ARCHIVE, rows)
        kept = {row[0] for row in rows}
        _each_chunk(db, _DELETE_ARCHIVE, [c for c in going if c in archived and c not in kept])
        _each_chunk(db, _BLANK_VERSIONS, going)
    if leaving:
        db.executemany(_RESTORE_VERSION, [
            (text_as_of(texts[cube_id], version), cube_id, version)
            for cube_id, version in db.fetch_in_chunks(_SELECT_VERSION_KEYS, leaving)])
        _each_chunk(db, _DELETE_ARCHIVE, leaving)


def drop_erased(db: DriverConnection, erased_rows: Iterable[str]) -> None:
    """Drop the archived texts of memories an erasure emptied."""
    _each_chunk(db, _DELETE_ARCHIVE, sorted(set(erased_rows)))
