"""The search read model: what each memory offers to search, and the ``SearchIndex`` port.

``search_docs`` holds one row per memory: its current text and every attribute the access
policy and the lifecycle filter on (tenant, owner, creator, sharing, labels, state, tier,
expiry, erasure). ``SearchProjection`` keeps it from the events like any other read model
(checkpointed, rebuildable); the full-text structure over it belongs to the backend and follows
the rows by itself: an FTS5 table kept by triggers on SQLite (``_search_sqlite``), a generated
``tsvector`` column under a GIN index on PostgreSQL (``_search_postgres``). Elasticsearch
(``_search_es``) is fed by its own projection from the same documents.

A ``SearchQuery`` carries the policy as data (which tenants, which relations to the reader
allow content and sensitive content, which labels are restricted) and every backend compiles it
*into* its query, next to the text match: ranking only ever sees what the reader may read, so
filtering cannot starve a page of results.

Erasure: ``MemoryContentErased`` and ``SubjectErased`` empty the text of the memories they
name (the triggers / generated column drop it from the full-text index too) and drop their
vectors; the row stays, marked erased, so that no replay or late event can bring the text back.

Cold archive: a memory moved to the ``cold_archive`` tier leaves searches, and its document
leaves its text too (the full-text index with it; its vectors are dropped): the text waits,
compressed, in ``search_archive`` until a recall puts it back (see ``projections._archive``).
"""

from __future__ import annotations

import itertools
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    delete,
)

from eventstore import StoredEvent, UTCDateTime
from eventstore._dialects import Dialect
from eventstore._driver import DriverConnection, select_sql, upsert_sql
from projections._archive import compress_text, decompress_text, final_tiers
from projections._readmodels import Projection
from projections._state import (
    ACTIVE,
    COLD_ARCHIVE,
    DELETED,
    EXPIRED,
    MEMORY_CONTENT_ERASED,
    MEMORY_CREATED,
    MEMORY_DELETED,
    MEMORY_EXPIRED,
    MEMORY_RECALLED,
    MEMORY_RESTORED,
    MEMORY_ROLLED_BACK,
    MEMORY_TIER_CHANGED,
    MEMORY_UPDATED,
    SUBJECT_ERASED,
    WORKING,
)
from projections._tables import metadata

SCOPES = ("any", "own", "shared", "about_self")
"""The relations between a reader and a memory that a policy rule can allow (``any``: all)."""

MAX_K = 100
_MAX_TERMS = 32
_WORD = re.compile(r"\w+", re.UNICODE)
# Dropped from keyword queries: they match nearly every memory, cost the most to score and say
# nothing about relevance. (PostgreSQL and Elasticsearch drop the same kind of words themselves.)
STOPWORDS = frozenset({
    "a", "about", "above", "after", "again", "all", "am", "an", "and", "any", "are", "as", "at",
    "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can",
    "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from",
    "further", "had", "has", "have", "having", "he", "her", "here", "hers", "herself", "him",
    "himself", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "me",
    "more", "most", "my", "myself", "no", "nor", "not", "now", "of", "off", "on", "once", "only",
    "or", "other", "our", "ours", "out", "over", "own", "same", "she", "should", "so", "some",
    "such", "than", "that", "the", "their", "theirs", "them", "then", "there", "these", "they",
    "this", "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were",
    "what", "when", "where", "which", "while", "who", "whom", "why", "will", "with", "would",
    "you", "your", "yours",
})

search_docs = Table(
    "search_docs",
    metadata,
    # The position of the memory's creation: stable across rebuilds, and on SQLite the rowid the
    # FTS5 table points at (an INTEGER PRIMARY KEY survives VACUUM; a plain rowid may not).
    Column("doc_id", BigInteger().with_variant(Integer, "sqlite"), nullable=False,
           autoincrement=False),
    Column("cube_id", String(200), nullable=False),
    Column("tenant", String(200), nullable=False),
    Column("owner", String(200), nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("semantic_type", String(32), nullable=False),
    # "|a|b|": a whole-name test is a substring test for "|name|" (names never hold "|").
    Column("labels", Text, nullable=False),
    Column("shared_with", Text, nullable=False),
    Column("text", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("tier", String(32), nullable=False),
    Column("erased", SmallInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime),
    Column("version", Integer, nullable=False),
    Column("position", BigInteger, nullable=False),
    PrimaryKeyConstraint("doc_id"),
    Index("search_docs_cube", "cube_id", unique=True),
    Index("search_docs_tenant_owner", "tenant", "owner"),
)

search_erasures = Table(
    "search_erasures",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("tenant", String(200), nullable=False),
    Column("subject", String(200), nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
    Index("search_erasures_subject", "tenant", "subject"),
)
"""Every ``SubjectErased`` applied: fed from Kafka, a memory created before an erasure can
arrive after it, and must be erased then (see ``apply_to_documents``)."""

search_labels = Table(
    "search_labels",
    metadata,
    Column("label", String(200), primary_key=True),
)
"""Every label some memory has carried: the short list the policy picks restricted ones from."""

search_archive = Table(
    "search_archive",
    metadata,
    Column("doc_id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=False),
    Column("compressed", LargeBinary, nullable=False),
)
"""The text of each cold document, compressed (its ``search_docs`` row has none until a recall).
The search read model's own copy: it may be maintained by a Kafka consumer of its own, which
cannot read the ``versions`` read model's archive."""

search_vectors = Table(
    "search_vectors",
    metadata,
    Column("doc_id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=False),
    Column("position", BigInteger, nullable=False),
    Column("model", String(200), nullable=False),
    Column("vector", LargeBinary, nullable=False),
    # What ``VectorCache`` checks before each semantic search, and what ``unembedded`` joins
    # on, read from the indexes alone (the rows themselves are 1.5 kB vectors).
    Index("search_vectors_model", "model", "position"),
    Index("search_vectors_current", "doc_id", "position", "model"),
)
"""Embeddings of ``search_docs.text``, computed on demand (a cache: a row is valid while its
``position`` is the document's). Not part of the projection's digest; purged with the text."""

search_generations = Table(
    "search_generations",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("token", String(32), nullable=False),
)
"""A new random token under ``documents`` whenever a document changes, under ``vectors`` whenever
a vector is stored or dropped: a semantic search skips looking for documents to embed, and for
vectors to load, while the token it saw last is still there. Random, not counted, so that a
rebuild can never bring back a token seen before. Outside the projection's digest."""
DOCUMENTS, VECTORS = "documents", "vectors"
_SET_GENERATION = upsert_sql("search_generations", ("name", "token"), key=("name",))


def new_generation(db: DriverConnection, *names: str) -> None:
    db.executemany(_SET_GENERATION, [(name, uuid.uuid4().hex) for name in names])


def read_generation(db: DriverConnection, name: str) -> str | None:
    row = db.execute("SELECT token FROM search_generations WHERE name = ?", (name,)).fetchone()
    return None if row is None else row[0]


def delimited(values: Iterable[str]) -> str:
    return "|" + "".join(f"{v}|" for v in values) if values else ""


def _undelimited(value: str) -> tuple[str, ...]:
    return tuple(v for v in value.split("|") if v)


@dataclass(frozen=True, slots=True)
class SearchDocument:
    """One memory as search sees it."""

    doc_id: int
    cube_id: str
    tenant: str
    owner: str
    created_by: str
    kind: str
    semantic_type: str
    labels: tuple[str, ...]
    shared_with: tuple[str, ...]
    text: str
    state: str
    tier: str
    erased: bool
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    version: int
    position: int

    @property
    def searchable(self) -> bool:
        """Whether any reader may find it (at a moment before its expiry)."""
        return self.state == ACTIVE and self.tier != COLD_ARCHIVE and not self.erased


def _content_fields(content: Any, created_at: datetime) -> dict[str, Any]:
    """Text and metadata from a version's ``content``; erased payloads may have lost the text."""
    content = content if isinstance(content, dict) else {}
    meta = content.get("metadata") or {}
    text = content.get("text")
    ttl = meta.get("ttl_seconds")
    return {
        "text": text if isinstance(text, str) else "",
        "semantic_type": str(meta.get("semantic_type") or "fact"),
        "labels": tuple(str(label) for label in meta.get("labels") or ()),
        "shared_with": tuple(str(s) for s in meta.get("shared_with") or ()
                             if isinstance(meta.get("shared_with"), list | tuple)),
        # A time to live counts from the memory's creation, whichever version set it.
        "expires_at": created_at + timedelta(seconds=ttl) if isinstance(ttl, int) else None,
    }


def fold(doc: SearchDocument | None, event: StoredEvent) -> SearchDocument | None:
    """The document after one event of its memory's stream (None: not a memory yet)."""
    payload = event.payload
    if event.type == MEMORY_CREATED:
        return SearchDocument(
            doc_id=event.position, cube_id=event.stream_id, tenant=event.tenant or "",
            owner=str(payload.get("owner", "")), created_by=event.actor,
            kind=str(payload.get("kind", "plaintext")), state=ACTIVE, tier=WORKING, erased=False,
            created_at=event.recorded_at, updated_at=event.recorded_at,
            version=event.stream_version, position=event.position,
            **_content_fields(payload.get("content"), event.recorded_at),
        )
    if doc is None:
        return None
    touched = replace(doc, version=event.stream_version, **_moved_on(doc, event))
    if event.type in (MEMORY_UPDATED, MEMORY_ROLLED_BACK):
        fields = _content_fields(payload.get("content"), doc.created_at)
        if doc.erased:  # crypto-shredded text stays out, whatever a later event carries
            fields["text"] = ""
        return replace(touched, **fields)
    if event.type == MEMORY_DELETED:
        return replace(touched, state=DELETED)
    if event.type == MEMORY_RESTORED:
        return replace(touched, state=ACTIVE)
    if event.type == MEMORY_EXPIRED:
        return replace(touched, state=EXPIRED)
    if event.type == MEMORY_TIER_CHANGED:
        return replace(touched, tier=str(payload.get("to_tier", doc.tier)))
    if event.type == MEMORY_RECALLED:
        return replace(touched, tier=WORKING)
    if event.type == MEMORY_CONTENT_ERASED:
        return erase(touched)
    return doc


def erase(doc: SearchDocument) -> SearchDocument:
    return replace(doc, text="", erased=True)


@dataclass(frozen=True, slots=True)
class _Erasure:
    """A subject's erasure as the search read model remembers it."""

    position: int
    recorded_at: datetime


def _moved_on(doc: SearchDocument, event: StoredEvent | _Erasure) -> dict[str, Any]:
    """The document's position and update time after ``event``: those of the latest event
    applied to it. Fed from Kafka, a subject's erasure (another stream) can arrive before or
    after a memory's own later events; taking the later one gives the rows log order gives."""
    if event.position <= doc.position:
        return {}
    return {"position": event.position, "updated_at": event.recorded_at}


_DOC_COLUMNS = (
    "doc_id", "cube_id", "tenant", "owner", "created_by", "kind", "semantic_type", "labels",
    "shared_with", "text", "state", "tier", "erased", "created_at", "updated_at", "expires_at",
    "version", "position",
)
FOLDED_TYPES = frozenset({
    MEMORY_CREATED, MEMORY_UPDATED, MEMORY_ROLLED_BACK, MEMORY_DELETED, MEMORY_RESTORED,
    MEMORY_EXPIRED, MEMORY_TIER_CHANGED, MEMORY_RECALLED, MEMORY_CONTENT_ERASED,
})
_TEXT_REPLACING = frozenset({MEMORY_UPDATED, MEMORY_ROLLED_BACK})
_ERASING = frozenset({MEMORY_CONTENT_ERASED, SUBJECT_ERASED})
_SELECT_DOCS = f"{select_sql('search_docs', _DOC_COLUMNS)} WHERE cube_id IN {{keys}}"
_QUALIFIED_DOC_COLUMNS = ", ".join(f"d.{column}" for column in _DOC_COLUMNS)
_SELECT_SUBJECT_DOCS = f"{select_sql('search_docs', _DOC_COLUMNS)} WHERE tenant = ? AND owner = ?"
_UPSERT_DOC = upsert_sql("search_docs", _DOC_COLUMNS, key=("cube_id",))
_INSERT_ERASURE = ("INSERT INTO search_erasures (position, tenant, subject, recorded_at) "
                   "VALUES (?, ?, ?, ?) ON CONFLICT (position) DO NOTHING")
_SELECT_ERASURES = ("SELECT position, recorded_at FROM search_erasures "
                    "WHERE tenant = ? AND subject = ?")
_INSERT_LABEL = "INSERT INTO search_labels (label) VALUES (?) ON CONFLICT (label) DO NOTHING"
_DELETE_VECTOR = "DELETE FROM search_vectors WHERE doc_id = ?"
_SELECT_ARCHIVED = "SELECT doc_id, compressed FROM search_archive WHERE doc_id IN {keys}"
_UPSERT_ARCHIVED = upsert_sql("search_archive", ("doc_id", "compressed"), key=("doc_id",))
_DELETE_ARCHIVED = "DELETE FROM search_archive WHERE doc_id = ?"
_SELECT_TEXTS = "SELECT doc_id, text FROM search_docs WHERE text <> '' AND cube_id IN {keys}"
_SELECT_ARCHIVED_OF = ("SELECT a.doc_id, a.compressed FROM search_archive a "
                       "JOIN search_docs d ON d.doc_id = a.doc_id WHERE d.cube_id IN {keys}")
_SET_TEXT = "UPDATE search_docs SET text = ? WHERE doc_id = ?"
# Moves of state or tier alone (most of a retention sweep) leave a document's text, labels and
# vectors as they are: they are set in SQL, not loaded, folded and written back whole. Each sets
# what ``fold`` does (a missing document stays missing, as ``fold`` leaves it None).
_STATE_MOVES: dict[str, tuple[str | None, str | None]] = {
    MEMORY_DELETED: (DELETED, None), MEMORY_RESTORED: (ACTIVE, None),
    MEMORY_EXPIRED: (EXPIRED, None), MEMORY_TIER_CHANGED: (None, None),
    MEMORY_RECALLED: (None, WORKING),
}
_UPDATE_DOC_MOVE = (  # position and update time only move forward (see _moved_on)
    "UPDATE search_docs SET version = ?, "
    "updated_at = CASE WHEN position > ? THEN updated_at ELSE ? END, "
    "position = CASE WHEN position > ? THEN position ELSE ? END, "
    "state = COALESCE(?, state), tier = COALESCE(?, tier) WHERE cube_id = ?"
)


def doc_values(doc: SearchDocument, dialect: Dialect) -> tuple[Any, ...]:
    return (
        doc.doc_id, doc.cube_id, doc.tenant, doc.owner, doc.created_by, doc.kind,
        doc.semantic_type, delimited(doc.labels), delimited(doc.shared_with), doc.text,
        doc.state, doc.tier, int(doc.erased), dialect.to_db_time(doc.created_at),
        dialect.to_db_time(doc.updated_at),
        None if doc.expires_at is None else dialect.to_db_time(doc.expires_at),
        doc.version, doc.position,
    )


def doc_from_values(values: Sequence[Any], dialect: Dialect) -> SearchDocument:
    (doc_id, cube_id, tenant, owner, created_by, kind, semantic_type, labels, shared_with, text,
     state, tier, erased, created_at, updated_at, expires_at, version, position) = values
    return SearchDocument(
        doc_id=doc_id, cube_id=cube_id, tenant=tenant, owner=owner, created_by=created_by,
        kind=kind, semantic_type=semantic_type, labels=_undelimited(labels),
        shared_with=_undelimited(shared_with), text=text, state=state, tier=tier,
        erased=bool(erased), created_at=dialect.from_db_time(created_at),
        updated_at=dialect.from_db_time(updated_at),
        expires_at=None if expires_at is None else dialect.from_db_time(expires_at),
        version=version, position=position,
    )


def apply_to_documents(events: Sequence[StoredEvent], load: Any, load_subject: Any,
                       erasures_of: Any = lambda tenant, subject: ()
                       ) -> dict[str, SearchDocument]:
    """Fold ``events`` into documents; ``load(cube_ids)`` and ``load_subject(tenant, subject)``
    give the prior ones, ``erasures_of(tenant, subject)`` the subject's erasures already
    applied (as events: position, recorded_at). Returns every document the events changed, by
    cube id."""
    relevant = [e for e in events if e.type in FOLDED_TYPES or e.type == SUBJECT_ERASED]
    if not relevant:
        return {}
    first_seen: dict[str, str] = {}
    for event in relevant:
        if event.type in FOLDED_TYPES:
            first_seen.setdefault(event.stream_id, event.type)
    docs: dict[str, SearchDocument] = dict(load(
        [cube_id for cube_id, first in first_seen.items() if first != MEMORY_CREATED]))
    changed: dict[str, SearchDocument] = {}
    for event in relevant:
        if event.type == SUBJECT_ERASED:
            tenant = event.payload.get("tenant") or event.tenant or ""
            subject = event.payload.get("subject")
            if not isinstance(subject, str):
                continue
            for cube_id, doc in load_subject(tenant, subject).items():
                docs.setdefault(cube_id, doc)
            for cube_id, doc in list(docs.items()):
                # Only memories created before the erasure: fed from Kafka, one created after
                # it (another stream) can arrive first, and keeps its text.
                if doc.tenant == tenant and doc.owner == subject and doc.doc_id < event.position:
                    docs[cube_id] = changed[cube_id] = replace(erase(doc),
                                                               **_moved_on(doc, event))
            continue
        folded = fold(docs.get(event.stream_id), event)
        if folded is not None and event.type == MEMORY_CREATED:
            # Fed from Kafka, the owner's erasure can have arrived first: it covers a memory
            # created before it (a smaller position) whichever order they come in.
            for erasure in erasures_of(folded.tenant, folded.owner):
                if folded.doc_id < erasure.position:
                    folded = replace(erase(folded), **_moved_on(folded, erasure))
        if folded is not None:
            docs[event.stream_id] = changed[event.stream_id] = folded
    return changed


def _split_state_moves(
        events: Sequence[StoredEvent]) -> tuple[Sequence[StoredEvent], list[StoredEvent]]:
    """(events to fold, state and tier moves to set in SQL). A memory's moves go to SQL only when
    it has no other folded event in the batch, and none do beside a subject's erasure."""
    if not any(e.type in _STATE_MOVES for e in events) or any(
            e.type == SUBJECT_ERASED for e in events):
        return events, []
    folded = {e.stream_id for e in events if e.type in FOLDED_TYPES and e.type not in _STATE_MOVES}
    moves = [e for e in events if e.type in _STATE_MOVES and e.stream_id not in folded]
    return [e for e in events if e.type not in _STATE_MOVES or e.stream_id in folded], moves


def _move_values(event: StoredEvent, dialect: Dialect) -> tuple[Any, ...]:
    state, tier = _STATE_MOVES[event.type]
    if event.type == MEMORY_TIER_CHANGED and "to_tier" in event.payload:
        tier = str(event.payload["to_tier"])
    recorded_at = dialect.to_db_time(event.recorded_at)
    return (event.stream_version, event.position, recorded_at, event.position, event.position,
            state, tier, event.stream_id)


def _archive_moves(db: DriverConnection, moves: Sequence[StoredEvent]) -> bool:
    """Move the text of the documents these moves sent to the cold tier into ``search_archive``,
    and back for those they recalled; returns whether vectors were dropped. A memory sent cold
    costs a read of its text, one compression and three statements in executemany batches."""
    tiers = final_tiers(moves)
    going = sorted(c for c, tier in tiers.items() if tier == COLD_ARCHIVE)
    recalled = sorted({e.stream_id for e in moves if e.type == MEMORY_RECALLED}
                      - set(going))
    hot = list(db.fetch_in_chunks(_SELECT_TEXTS, going))  # (those already cold have no text)
    db.executemany(_UPSERT_ARCHIVED, [(doc_id, compress_text(text)) for doc_id, text in hot])
    db.executemany(_SET_TEXT, [("", doc_id) for doc_id, _ in hot])
    db.executemany(_DELETE_VECTOR, [(doc_id,) for doc_id, _ in hot])
    thawed = list(db.fetch_in_chunks(_SELECT_ARCHIVED_OF, recalled))
    db.executemany(_SET_TEXT, [(decompress_text(blob), doc_id) for doc_id, blob in thawed])
    db.executemany(_DELETE_ARCHIVED, [(doc_id,) for doc_id, _ in thawed])
    return bool(hot)


class SearchProjection(Projection):
    """``search_docs`` (and ``search_labels``): the documents every SQL backend searches, and
    ``search_archive``: the text of the cold ones."""

    name = "search"
    tables = (search_docs, search_labels, search_erasures, search_archive)
    extra_tables = (search_vectors, search_generations)
    revision = 2
    """2: a cold document has no text (nor vectors); ``search_archive`` holds it."""

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        db = DriverConnection(conn)
        archived: set[int] = set()
        """Documents loaded with an archived text (put back into them to fold)."""

        def thawed(docs: dict[str, SearchDocument]) -> dict[str, SearchDocument]:
            cold = [d.doc_id for d in docs.values() if d.tier == COLD_ARCHIVE]
            texts = {doc_id: decompress_text(blob)
                     for doc_id, blob in db.fetch_in_chunks(_SELECT_ARCHIVED, cold)}
            archived.update(texts)
            return {c: replace(d, text=texts[d.doc_id]) if d.doc_id in texts else d
                    for c, d in docs.items()}

        def load(cube_ids: Sequence[str]) -> dict[str, SearchDocument]:
            if not cube_ids:
                return {}
            return thawed({row[1]: doc_from_values(row, db.dialect)
                           for row in db.fetch_in_chunks(_SELECT_DOCS, list(cube_ids))})

        def load_subject(tenant: str, subject: str) -> dict[str, SearchDocument]:
            rows = db.execute(_SELECT_SUBJECT_DOCS, (tenant, subject)).fetchall()
            return thawed({row[1]: doc_from_values(row, db.dialect) for row in rows})

        erased_subjects = [e for e in events if e.type == SUBJECT_ERASED
                           and isinstance(e.payload.get("subject"), str)]
        db.executemany(_INSERT_ERASURE, [
            (e.position, e.payload.get("tenant") or e.tenant or "", e.payload["subject"],
             db.dialect.to_db_time(e.recorded_at)) for e in erased_subjects])
        known: dict[tuple[str, str], list[_Erasure]] = {}

        def erasures_of(tenant: str, subject: str) -> Sequence[_Erasure]:
            if (tenant, subject) not in known:  # an index probe per owner a batch creates for
                known[tenant, subject] = [
                    _Erasure(position, db.dialect.from_db_time(recorded_at))
                    for position, recorded_at in db.execute(_SELECT_ERASURES, (tenant, subject))]
            return known[tenant, subject]

        events, moves = _split_state_moves(events)
        db.executemany(_UPDATE_DOC_MOVE, [_move_values(e, db.dialect) for e in moves])
        moved_vectors = _archive_moves(db, moves) if moves else False
        changed = apply_to_documents(events, load, load_subject, erasures_of)
        if not changed:
            if moves:
                new_generation(db, DOCUMENTS, *([VECTORS] if moved_vectors else []))
            return
        # A cold document is stored without its text, which goes to the archive.
        cold = {d.doc_id: d.text for d in changed.values() if d.tier == COLD_ARCHIVE and d.text}
        db.executemany(_UPSERT_DOC, [doc_values(replace(d, text="") if d.doc_id in cold else d,
                                                db.dialect) for d in changed.values()])
        db.executemany(_UPSERT_ARCHIVED, [(doc_id, compress_text(text))
                                          for doc_id, text in cold.items()])
        db.executemany(_DELETE_ARCHIVED, [(d.doc_id,) for d in changed.values()
                                          if d.doc_id in archived and d.doc_id not in cold])
        labels = sorted({label for d in changed.values() for label in d.labels})
        db.executemany(_INSERT_LABEL, [(label,) for label in labels])
        # Vectors are derived from the text: they go wherever the text goes.
        rewritten = {e.stream_id for e in events if e.type in _TEXT_REPLACING}
        dropped = [(d.doc_id,) for d in changed.values()
                   if d.erased or d.cube_id in rewritten or d.tier == COLD_ARCHIVE]
        db.executemany(_DELETE_VECTOR, dropped)
        new_generation(db, DOCUMENTS, *([VECTORS] if dropped or moved_vectors else []))
        if db.dialect.name == "sqlite" and any(e.type in _ERASING for e in events):
            # FTS5 deletes by tombstone: the erased words stay in older index segments until
            # they are merged. Merge them all now (rare: erasures only).
            db.execute(_search_sqlite.MERGE_ALL_SEGMENTS)

    def reset(self, conn: Connection) -> None:
        conn.execute(delete(search_vectors))
        new_generation(DriverConnection(conn), DOCUMENTS, VECTORS)
        if conn.dialect.name == "sqlite":
            _search_sqlite.empty_index(conn)  # without a delete marker per document
        super().reset(conn)


# -- queries ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessScope:
    """What one reader may find in one tenant: memories related to ``subject`` by a relation in
    ``content`` (``any``: all of them), and of those with a restricted label only the ones
    related by a relation in ``sensitive``."""

    tenant: str
    subject: str
    content: frozenset[str]
    sensitive: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = (self.content | self.sensitive) - set(SCOPES)
        if unknown:
            raise ValueError(f"unknown scopes {sorted(unknown)}")


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A search with the policy inside it. An empty ``scopes`` finds nothing."""

    text: str
    scopes: tuple[AccessScope, ...]
    now: datetime
    k: int = 10
    restricted_labels: frozenset[str] = frozenset()
    kind: str | None = None
    semantic_type: str | None = None
    labels: tuple[str, ...] = ()
    """Every one of these labels."""
    owner: str | None = None
    since: datetime | None = None
    """Created at or after."""
    until: datetime | None = None
    """Created before."""

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}")

    @property
    def terms(self) -> list[str]:
        """The words to match: lowercased, stopwords dropped (unless nothing else is left)."""
        words = list(dict.fromkeys(w.lower() for w in _WORD.findall(self.text)))
        kept = [w for w in words if w not in STOPWORDS] or words
        return kept[:_MAX_TERMS]


@dataclass(frozen=True, slots=True)
class SearchHit:
    cube_id: str
    score: float
    """Higher is better; comparable only within one result list."""
    document: SearchDocument | None = field(default=None, compare=False, repr=False)
    """The document, where the ranking query read it anyway (saves looking it up again)."""


@dataclass(frozen=True, slots=True)
class SqlFilter:
    """A WHERE fragment over ``search_docs`` as ``d``, with its ``?`` parameters."""

    sql: str
    params: list[Any] = field(default_factory=list)


def policy_filter(query: SearchQuery, dialect: Dialect, contains: str) -> SqlFilter:
    """Everything but the text match, for the SQL backends. ``contains`` is the backend's
    substring test, a format string over ``{haystack}`` and ``{needle}``."""
    params: list[Any] = []

    def has(column: str, name: str) -> str:
        params.append(f"|{name}|")
        return contains.format(haystack=f"d.{column}", needle="?") + " > 0"

    def related(scopes: frozenset[str], subject: str) -> str:
        if "any" in scopes:
            return "1 = 1"
        terms = []
        if "own" in scopes:
            terms.append("d.created_by = ?")
            params.append(subject)
        if "shared" in scopes:
            terms.append(has("shared_with", subject))
        if "about_self" in scopes:
            terms.append("d.owner = ?")
            params.append(subject)
        return f"({' OR '.join(terms)})" if terms else "1 = 0"

    where = ["d.state = ?", "d.tier <> ?", "d.erased = 0",
             "(d.expires_at IS NULL OR d.expires_at > ?)"]
    params.extend([ACTIVE, COLD_ARCHIVE, dialect.to_db_time(query.now)])
    readable = []
    for scope in query.scopes:
        part = ["d.tenant = ?"]
        params.append(scope.tenant)
        part.append(related(scope.content, scope.subject))
        if query.restricted_labels and "any" not in scope.sensitive:
            restricted = " OR ".join(has("labels", label)
                                     for label in sorted(query.restricted_labels))
            part.append(f"(NOT ({restricted}) OR {related(scope.sensitive, scope.subject)})")
        readable.append("(" + " AND ".join(part) + ")")
    where.append("(" + (" OR ".join(readable) or "1 = 0") + ")")
    for column, value in (("kind", query.kind), ("semantic_type", query.semantic_type),
                          ("owner", query.owner)):
        if value is not None:
            where.append(f"d.{column} = ?")
            params.append(value)
    where.extend(has("labels", label) for label in query.labels)
    if query.since is not None:
        where.append("d.created_at >= ?")
        params.append(dialect.to_db_time(query.since))
    if query.until is not None:
        where.append("d.created_at < ?")
        params.append(dialect.to_db_time(query.until))
    return SqlFilter(" AND ".join(where), params)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A searchable document to embed: its text as of ``position``."""

    doc_id: int
    cube_id: str
    position: int
    text: str


class SearchIndex(ABC):
    """The port every search backend implements; one contract test suite runs on each."""

    name: str

    @abstractmethod
    def search(self, query: SearchQuery) -> list[SearchHit]:
        """The best ``query.k`` matches of the text (BM25-like), best first, policy applied."""

    @abstractmethod
    def nearest(self, query: SearchQuery, vector: Sequence[float], model: str) -> list[SearchHit]:
        """The ``query.k`` documents closest to ``vector`` (cosine), policy applied; documents
        not embedded yet by ``model`` are left out (see ``unembedded``)."""

    @abstractmethod
    def unembedded(self, model: str, limit: int) -> list[Candidate]:
        """Searchable documents without a current embedding by ``model``."""

    def documents_generation(self) -> str | None:
        """A token that changes whenever a document does (None: unknown, look every time)."""
        return None

    @abstractmethod
    def store_vectors(self, model: str, rows: Sequence[tuple[Candidate, bytes]]) -> int:
        """Store embeddings (float32 bytes) of the candidates' text, unless the document
        changed since; returns how many were stored."""

    @abstractmethod
    def documents(self, cube_ids: Sequence[str]) -> dict[str, SearchDocument]:
        """The documents of these memories (for snippets and results)."""


_NOT_EMBEDDED = """
SELECT d.doc_id, d.cube_id, d.position, d.text FROM search_docs d
LEFT JOIN search_vectors v ON v.doc_id = d.doc_id AND v.position = d.position AND v.model = ?
WHERE v.doc_id IS NULL AND d.state = ? AND d.tier <> ? AND d.erased = 0
ORDER BY d.doc_id LIMIT ?
"""
_UPSERT_VECTOR = upsert_sql("search_vectors", ("doc_id", "position", "model", "vector"),
                            key=("doc_id",))


_MAX_GROUPS = 20
"""A coordination level needing more conjunctions than this is skipped (see below)."""


def coordination_levels(terms: Sequence[str]) -> list[list[tuple[str, ...]]]:
    """The levels a full-text search descends: documents holding all the terms, then any
    ``n - 1`` of them, and so on down to any one. Each level is a disjunction of conjunctions
    (the ``m``-subsets of the terms); a level with more than ``_MAX_GROUPS`` of them is skipped,
    and the last level (any term) is always there."""
    levels: list[list[tuple[str, ...]]] = []
    for size in range(len(terms), 1, -1):
        groups = list(itertools.combinations(terms, size))
        if len(groups) <= _MAX_GROUPS:
            levels.append(groups)
    levels.append([(term,) for term in terms])
    return levels


class SqlSearchIndex(SearchIndex):
    """What the SQL backends share: documents and vectors live in the database itself, vectors
    as float32 blobs. Vector search scores every vector in memory (``VectorCache``), then takes
    the documents in score order through the policy filter, in windows, until ``k`` pass:
    exactly the best ``k`` the reader may find, as if the filter had run first.

    Full-text ranking descends ``coordination_levels``: the backend's BM25-like score orders the
    documents holding all the terms, then those holding fewer, level by level, until ``k``
    documents are found. Matching more of the query's words ranks higher whatever the scores
    (Lucene's classic "coordination factor", taken to its limit), and it keeps search fast on a
    large index: neither FTS5 nor PostgreSQL can score only the best few of the documents a
    common word matches, and the conjunctive levels match few. The policy filter is part of
    every level's query, so a level the reader may see little of only means one more level.
    A hit's score is ``terms its level required + s / (1 + s)`` for the backend's score ``s``,
    so scores decrease down the list."""

    contains: str
    """The backend's substring test over ``{haystack}`` and ``{needle}``."""
    full_text_sql: str
    """One level's query: ``{columns}`` the document's columns, ``{where}`` the policy filter;
    parameters: the match expression, the filter's, the limit. Returns the columns and the
    score, best first, score >= 0."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._vectors: dict[str, VectorCache] = {}

    @abstractmethod
    def match_expression(self, groups: Sequence[tuple[str, ...]]) -> str:
        """Any of the groups, each holding all its terms, in the backend's query syntax; each
        term quoted, so that no word can be read as an operator."""

    def search(self, query: SearchQuery) -> list[SearchHit]:
        terms = query.terms
        if not terms:
            return []
        hits: dict[str, SearchHit] = {}
        with self.engine.connect() as conn:
            db = DriverConnection(conn)
            where = policy_filter(query, db.dialect, self.contains)
            sql = self.full_text_sql.format(columns=_QUALIFIED_DOC_COLUMNS, where=where.sql)
            for groups in coordination_levels(terms):
                rows = db.execute(sql, [self.match_expression(groups), *where.params,
                                        query.k + len(hits)]).fetchall()
                required = len(groups[0])
                for row in rows:
                    doc, score = doc_from_values(row[:-1], db.dialect), float(row[-1])
                    if doc.cube_id not in hits:
                        hits[doc.cube_id] = SearchHit(
                            doc.cube_id, required + score / (1.0 + score), doc)
                if len(hits) >= query.k:
                    break
        return list(hits.values())[:query.k]

    def documents(self, cube_ids: Sequence[str]) -> dict[str, SearchDocument]:
        if not cube_ids:
            return {}
        with self.engine.connect() as conn:
            db = DriverConnection(conn)
            return {row[1]: doc_from_values(row, db.dialect)
                    for row in db.fetch_in_chunks(_SELECT_DOCS, list(cube_ids))}

    def nearest(self, query: SearchQuery, vector: Sequence[float], model: str) -> list[SearchHit]:
        cache = self._vectors.setdefault(model, VectorCache(model))
        with self.engine.connect() as conn:
            db = DriverConnection(conn)
            cache.refresh(db)
            where = policy_filter(query, db.dialect, self.contains)
            hits: list[SearchHit] = []
            for window in cache.ranked(vector, first=_FIRST_WINDOW * query.k):
                found = _readable_documents(db, where, [doc_id for doc_id, _, _ in window])
                for doc_id, position, score in window:
                    doc = found.get(doc_id)
                    # A stale vector (the text changed since) is skipped: its document waits
                    # for a new one, as ``unembedded`` says.
                    if doc is not None and doc.position == position:
                        hits.append(SearchHit(doc.cube_id, score, doc))
                if len(hits) >= query.k:
                    break
        return hits[:query.k]

    def documents_generation(self) -> str | None:
        with self.engine.connect() as conn:
            return read_generation(DriverConnection(conn), DOCUMENTS)

    def unembedded(self, model: str, limit: int) -> list[Candidate]:
        with self.engine.connect() as conn:
            rows = DriverConnection(conn).execute(
                _NOT_EMBEDDED, (model, ACTIVE, COLD_ARCHIVE, limit)).fetchall()
        return [Candidate(doc_id, cube_id, position, text)
                for doc_id, cube_id, position, text in rows]

    def store_vectors(self, model: str, rows: Sequence[tuple[Candidate, bytes]]) -> int:
        if not rows:
            return 0
        with self.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                db = DriverConnection(conn)
                # Locked (PostgreSQL) so that the projection's purge of a changed or erased
                # document waits for this commit and then removes what it wrote.
                lock = " FOR SHARE" if db.dialect.name == "postgresql" else ""
                current = dict(db.fetch_in_chunks(
                    "SELECT doc_id, position FROM search_docs WHERE erased = 0 "
                    f"AND doc_id IN {{keys}}{lock}", [c.doc_id for c, _ in rows]))
                fresh = [(c.doc_id, c.position, model, vector) for c, vector in rows
                         if current.get(c.doc_id) == c.position]
                db.executemany(_UPSERT_VECTOR, fresh)
                if fresh:
                    new_generation(db, VECTORS)
        return len(fresh)


_FIRST_WINDOW = 8
"""Vector search first looks at the ``8 k`` nearest vectors, then at ``_WINDOW_GROWTH`` times as
many each time, until ``k`` pass the policy filter."""
_WINDOW_GROWTH = 4


def _readable_documents(db: DriverConnection, where: SqlFilter,
                        doc_ids: Sequence[int]) -> dict[int, SearchDocument]:
    """Those of ``doc_ids`` that pass the policy filter, by doc id."""
    found: dict[int, SearchDocument] = {}
    for start in range(0, len(doc_ids), 500):
        part = list(doc_ids[start:start + 500])
        # Driven by the ids (CROSS JOIN keeps SQLite's planner from reading the tenant's whole
        # index instead: without statistics it guesses an equality matches ten rows).
        rows = db.execute(f"WITH ids (doc_id) AS (VALUES {', '.join(['(?)'] * len(part))}) "
                          f"SELECT {_QUALIFIED_DOC_COLUMNS} FROM ids CROSS JOIN search_docs d "
                          f"WHERE d.doc_id = ids.doc_id AND {where.sql}",
                          [*part, *where.params]).fetchall()
        for row in rows:
            found[row[0]] = doc_from_values(row, db.dialect)
    return found


class VectorCache:
    """One model's vectors from ``search_vectors`` as a float32 matrix in this process's memory
    (10^5 vectors of all-MiniLM-L6-v2: 154 MB), so that a semantic search scores every vector
    with one matrix product instead of reading them all from the database.

    Kept in step by a check before each search: nothing to do while the ``vectors`` generation
    is the one seen last; else the table's row count, highest position and sum of positions
    (over the ``search_vectors_model`` index) are compared with the matrix's. New vectors (a higher
    position) are loaded incrementally; anything else (a vector dropped by an update or an
    erasure, one stored out of position order) reloads the matrix, so an erased text's vector
    does not outlive its row.

    Why exact brute force and no ANN index: one product of a 10^5 x 384 matrix is a few
    milliseconds on one core, less than embedding the query; an approximate index would add a
    dependency, a second structure to keep in step with erasures, and recall below 1."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._matrix: Any = None
        self._doc_ids: Any = None
        self._positions: Any = None
        self._rows: dict[int, int] = {}
        self._size = 0
        self._signature: tuple[int, int, int] = (0, 0, 0)
        self._generation: str | None = None

    def __contains__(self, doc_id: object) -> bool:
        """Whether this process holds a vector of the document."""
        return doc_id in self._rows

    def refresh(self, db: DriverConnection) -> None:
        generation = read_generation(db, VECTORS)
        if generation is not None and generation == self._generation:
            return
        count, top, total = db.execute(
            "SELECT count(*), coalesce(max(position), 0), coalesce(sum(position), 0) "
            "FROM search_vectors WHERE model = ?", (self.model,)).fetchone()
        signature = (int(count), int(top), int(total))
        with self._lock:
            self._generation = generation  # read first: a later change is seen next time
            if signature == self._signature:
                return
            rows = db.execute("SELECT doc_id, position, vector FROM search_vectors "
                              "WHERE model = ? AND position > ?",
                              (self.model, self._signature[1])).fetchall()
            self._load(rows)
            if self._current_signature() != signature:
                self._clear()
                self._load(db.execute("SELECT doc_id, position, vector FROM search_vectors "
                                      "WHERE model = ? ORDER BY doc_id",
                                      (self.model,)).fetchall())
            self._signature = self._current_signature()

    def _current_signature(self) -> tuple[int, int, int]:
        if not self._size:
            return (0, 0, 0)
        positions = self._positions[:self._size]
        return (self._size, int(positions.max()), int(positions.sum()))

    def _load(self, rows: Sequence[Any]) -> None:
        import numpy as np  # the semantic extra brings it

        if not rows:
            return
        vectors = np.frombuffer(b"".join(bytes(row[2]) for row in rows), dtype=np.float32)
        vectors = vectors.reshape(len(rows), -1)
        if self._matrix is None or self._matrix.shape[1] != vectors.shape[1]:
            self._matrix = np.empty((0, vectors.shape[1]), dtype=np.float32)
            self._doc_ids = np.empty(0, dtype=np.int64)
            self._positions = np.empty(0, dtype=np.int64)
            self._rows, self._size = {}, 0
        for (doc_id, position, _), vector in zip(rows, vectors, strict=True):
            row = self._rows.get(doc_id)
            if row is None:
                row = self._rows[doc_id] = self._size
                self._size += 1
                if self._size > len(self._matrix):  # grow by doubling: appends stay cheap
                    capacity = max(1024, 2 * len(self._matrix), self._size)
                    self._matrix = np.resize(self._matrix, (capacity, self._matrix.shape[1]))
                    self._doc_ids = np.resize(self._doc_ids, capacity)
                    self._positions = np.resize(self._positions, capacity)
            self._matrix[row], self._doc_ids[row], self._positions[row] = vector, doc_id, position

    def ranked(self, vector: Sequence[float],
               first: int) -> Iterator[list[tuple[int, int, float]]]:
        """(doc id, position, cosine) of every vector, best first, in windows: the ``first``
        best, then four times as many, and so on (each window a partial sort, so a search
        whose reader may see most memories never sorts them all)."""
        import numpy as np

        with self._lock:
            if not self._size:
                return
            size = self._size
            scores = self._matrix[:size] @ np.asarray(vector, dtype=np.float32)
            doc_ids, positions = self._doc_ids[:size].copy(), self._positions[:size].copy()
        given: set[int] = set()
        window = first
        while len(given) < size:
            top = (np.argpartition(-scores, window - 1)[:window] if window < size
                   else np.arange(size))
            # Ties go to the lower doc id (the older memory), as in the full-text ranking.
            top = top[np.lexsort((doc_ids[top], -scores[top]))]
            fresh = [(int(doc_ids[i]), int(positions[i]), float(scores[i])) for i in top
                     if int(doc_ids[i]) not in given]
            given.update(doc_id for doc_id, _, _ in fresh)
            yield fresh
            window *= _WINDOW_GROWTH


def open_search_index(engine: Engine) -> SqlSearchIndex:
    """The database's own full-text index: FTS5 on SQLite, tsvector on PostgreSQL."""
    if engine.dialect.name == "sqlite":
        return _search_sqlite.SqliteSearchIndex(engine)
    return _search_postgres.PostgresSearchIndex(engine)


# The backends attach their full-text DDL to ``search_docs``: they load with it.
from projections import _search_postgres, _search_sqlite  # noqa: E402
