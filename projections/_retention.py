"""The ``retention`` read model: what the retention workers need to know about every memory.

Built only from events, like every projection: one row per memory with the facts retention rules
match on (tenant, kind, semantic type, source, retention class, labels, PII entity types, the
write's own ttl), its lifecycle (state, tier, erased, decayed) and the inputs of the decay score
(priority, read count, last activity). Beside it: the legal holds and a log of every retention
action, which the report reads. (A cold memory's text is archived by the read models that hold
text: see ``projections._archive``.)

What is *due* depends on the rules in ``policies/retention.yaml`` as well as on these facts, so
the due dates live in ``retention_schedule``, which the worker's planner keeps in step with this
table (the rows this projection marks in ``retention_pending`` as changed) and with the rules (a
new rules digest replans every row). The schedule and the pending marks are a cache of (facts,
rules): they are not part of this projection's digest, and a reset of this projection clears them
so that the next sweep replans.

Kafka keeps each stream's order, not the order between streams, so every column is merged in a
way that does not depend on how the streams interleave (tests compare a Kafka-fed digest with the
SQL-fed one):

- a read (on the tenant's reads stream) of a memory whose creation has not arrived yet makes a
  placeholder row (``version`` 0, never planned) that the creation then fills in;
- ``read_count`` is a sum, ``last_active_at`` and ``position`` are maxima;
- ``decayed`` is the position of the ``MemoryDecayed`` in force (0: none): a decay counts only if
  no later read arrived before it, and a read clears only an earlier decay;
- a ``SubjectErased`` also erases a memory of that subject whose creation (at a lower position)
  arrives after it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    Integer,
    String,
    Table,
    Text,
    delete,
)

from eventstore import StoredEvent, UTCDateTime, canonical_json
from eventstore._dialects import Dialect
from eventstore._driver import DriverConnection, insert_sql, select_sql, upsert_sql
from projections._readmodels import Projection
from projections._state import (
    ACTIVE,
    CUBE_EVENT_TYPES,
    DELETED,
    EXPIRED,
    MEMORY_ACCESSED,
    MEMORY_CONTENT_ERASED,
    MEMORY_CREATED,
    MEMORY_DECAYED,
    MEMORY_DELETED,
    MEMORY_EXPIRED,
    MEMORY_RECALLED,
    MEMORY_RESTORED,
    MEMORY_ROLLED_BACK,
    MEMORY_TIER_CHANGED,
    MEMORY_UPDATED,
    SENSITIVE_DATA_DETECTED,
    SUBJECT_ERASED,
    WORKING,
)
from projections._tables import metadata

LEGAL_HOLD_PLACED = "LegalHoldPlaced"
LEGAL_HOLD_RELEASED = "LegalHoldReleased"
RETENTION_SWEEP_COMPLETED = "RetentionSweepCompleted"

SWEEP_STREAM = "retention:sweeps"


def hold_stream(hold_id: str) -> str:
    return f"hold:{hold_id}"


retention = Table(
    "retention",
    metadata,
    Column("cube_id", String(200), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("owner", String(200), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("semantic_type", String(32), nullable=False),
    Column("source", String(32), nullable=False),
    Column("retention_class", String(200), nullable=False),
    Column("labels", Text, nullable=False),
    Column("pii", Text, nullable=False),
    Column("ttl_seconds", BigInteger),
    Column("priority", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("tier", String(16), nullable=False),
    Column("erased", Integer, nullable=False),
    Column("decayed", BigInteger, nullable=False),
    Column("read_count", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_active_at", UTCDateTime, nullable=False),
    Column("version", Integer, nullable=False),
    Column("content_version", Integer, nullable=False),
    Column("position", BigInteger, nullable=False),
    Index("retention_tenant_tier", "tenant", "tier"),
)

retention_holds = Table(
    "retention_holds",
    metadata,
    Column("hold_id", String(64), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("scope", String(16), nullable=False),
    Column("target", String(200), nullable=False),
    Column("reason", Text, nullable=False),
    Column("case_id", String(200), nullable=False),
    Column("placed_by", String(200), nullable=False),
    Column("placed_at", UTCDateTime, nullable=False),
    Column("released_by", String(200)),
    Column("released_at", UTCDateTime),
    Column("release_reason", Text),
    Column("position", BigInteger, nullable=False),
    Index("retention_holds_active", "released_at", "tenant"),
)

retention_log = Table(
    "retention_log",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("type", String(100), nullable=False),
    Column("cube_id", String(200)),
    Column("tenant", String(200)),
    Column("actor", String(200), nullable=False),
    Column("rule", String(200)),
    Column("outcome", String(32), nullable=False),
    Column("detail", Text, nullable=False),
    Column("occurred_at", UTCDateTime, nullable=False),
    Index("retention_log_occurred_at", "occurred_at"),
    Index("retention_log_tenant", "tenant", "occurred_at"),
)

retention_schedule = Table(
    "retention_schedule",
    metadata,
    Column("cube_id", String(200), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("rule", String(200)),
    Column("due_at", UTCDateTime),
    Column("expire_at", UTCDateTime),
    Column("tier_at", UTCDateTime),
    Column("tier_to", String(16)),
    Column("erase_at", UTCDateTime),
    Column("decay_at", UTCDateTime),
    Index("retention_schedule_due", "due_at", "cube_id"),
    # Every column: the report counts a tenant's due actions from this index alone (SQLite).
    Index("retention_schedule_tenant_due", "tenant", "due_at", "cube_id", "rule", "expire_at",
          "tier_at", "tier_to", "erase_at", "decay_at"),
)
"""Per memory, when each retention action falls due under the rules; ``due_at`` is the earliest,
so a sweep reads only the index range up to now."""

retention_created = Table(
    "retention_created",
    metadata,
    Column("cube_id", String(200), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("owner", String(200), nullable=False),
    Column("position", BigInteger, nullable=False),
    Index("retention_created_subject", "tenant", "owner", "position"),
)
"""Where each memory was created in the log: a subject's erasure covers the memories created
before it, whichever of the two a Kafka-fed projector sees first."""

retention_pending = Table(
    "retention_pending",
    metadata,
    Column("cube_id", String(200), primary_key=True),
    Column("changes", BigInteger, nullable=False),
)
"""Memories whose facts changed since the planner last saw them, with a count of the changes: the
planner replans these and removes the marks whose count it saw (a memory changed meanwhile keeps
its mark for the next pass). Not part of the digest: a cache, like the schedule."""

retention_plan = Table(
    "retention_plan",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("rules_digest", String(64), nullable=False),
    Column("position", BigInteger, nullable=False),
)
"""The planner's checkpoint: the rules it planned with (a new digest replans every memory), and
the highest ``retention.position`` it planned."""


FACT_COLUMNS = (
    "cube_id", "tenant", "owner", "kind", "semantic_type", "source", "retention_class", "labels",
    "pii", "ttl_seconds", "priority", "state", "tier", "erased", "decayed", "read_count",
    "created_at", "last_active_at", "version", "content_version", "position",
)
_TIME_COLUMNS = frozenset({"created_at", "last_active_at"})
_SELECT_FACTS = f"{select_sql('retention', FACT_COLUMNS)} WHERE cube_id IN {{keys}}"
_UPSERT_FACTS = upsert_sql("retention", FACT_COLUMNS, key=("cube_id",))
_INSERT_LOG = insert_sql("retention_log", (
    "position", "type", "cube_id", "tenant", "actor", "rule", "outcome", "detail",
    "occurred_at"))
_INSERT_HOLD = insert_sql("retention_holds", (
    "hold_id", "tenant", "scope", "target", "reason", "case_id", "placed_by", "placed_at",
    "position"))
_RELEASE_HOLD = ("UPDATE retention_holds SET released_by = ?, released_at = ?, "
                 "release_reason = ?, position = ? WHERE hold_id = ?")
_SUBJECT_MEMORIES = ("SELECT cube_id FROM retention_created "
                     "WHERE tenant = ? AND owner = ? AND position < ?")
_ERASE_SUBJECT = f"UPDATE retention SET erased = 1 WHERE cube_id IN ({_SUBJECT_MEMORIES})"
_PEND_SUBJECT = ("INSERT INTO retention_pending (cube_id, changes) SELECT cube_id, 1 "
                 f"FROM retention WHERE cube_id IN ({_SUBJECT_MEMORIES}) AND erased = 0 "
                 "ON CONFLICT (cube_id) DO UPDATE SET changes = retention_pending.changes + 1")
_INSERT_CREATED = insert_sql("retention_created", ("cube_id", "tenant", "owner", "position"))
_UPSERT_PENDING = ("INSERT INTO retention_pending (cube_id, changes) VALUES (?, 1) "
                   "ON CONFLICT (cube_id) DO UPDATE SET changes = retention_pending.changes + 1")
_SELECT_ERASURES_AFTER = ("SELECT tenant, detail, position FROM retention_log "
                          "WHERE position > ? AND type = 'SubjectErased'")

_LOGGED = frozenset({MEMORY_EXPIRED, MEMORY_TIER_CHANGED, MEMORY_DECAYED, MEMORY_RECALLED,
                     MEMORY_CONTENT_ERASED, SUBJECT_ERASED, LEGAL_HOLD_PLACED,
                     LEGAL_HOLD_RELEASED, RETENTION_SWEEP_COMPLETED})
_OUTCOMES = {
    MEMORY_EXPIRED: "expired", MEMORY_DECAYED: "decayed", MEMORY_RECALLED: "recalled",
    MEMORY_CONTENT_ERASED: "erased", SUBJECT_ERASED: "subject_erased",
    LEGAL_HOLD_PLACED: "hold_placed", LEGAL_HOLD_RELEASED: "hold_released",
    RETENTION_SWEEP_COMPLETED: "sweep",
}
"""What the report calls each logged event (a tier change: the tier it moved to)."""
_CONTENT_EVENTS = frozenset({MEMORY_CREATED, MEMORY_UPDATED, MEMORY_ROLLED_BACK})


@dataclass(frozen=True, slots=True)
class RetentionFacts:
    """One row of ``retention``: what rules match on and what the schedule is computed from."""

    cube_id: str
    tenant: str
    owner: str
    kind: str
    semantic_type: str
    source: str
    retention_class: str
    labels: tuple[str, ...]
    pii: tuple[str, ...]
    ttl_seconds: int | None
    priority: int
    state: str
    tier: str
    erased: bool
    decayed: bool
    read_count: int
    created_at: datetime
    last_active_at: datetime
    version: int
    content_version: int
    position: int


def facts_from_values(values: Sequence[Any], dialect: Dialect) -> RetentionFacts:
    row = dict(zip(FACT_COLUMNS, values, strict=True))
    return _facts(row, dialect.from_db_time)


def facts_from_row(row: Mapping[str, Any]) -> RetentionFacts:
    """A row read through SQLAlchemy (timestamps already parsed)."""
    return _facts(dict(row), lambda value: value)


def _facts(row: dict[str, Any], to_time: Any) -> RetentionFacts:
    return RetentionFacts(
        cube_id=row["cube_id"], tenant=row["tenant"], owner=row["owner"], kind=row["kind"],
        semantic_type=row["semantic_type"], source=row["source"],
        retention_class=row["retention_class"], labels=_names(row["labels"]),
        pii=_names(row["pii"]), ttl_seconds=row["ttl_seconds"],
        priority=row["priority"], state=row["state"], tier=row["tier"],
        erased=bool(row["erased"]), decayed=bool(row["decayed"]), read_count=row["read_count"],
        created_at=to_time(row["created_at"]), last_active_at=to_time(row["last_active_at"]),
        version=row["version"], content_version=row["content_version"],
        position=row["position"],
    )


@functools.lru_cache(maxsize=4096)
def _names(encoded: str) -> tuple[str, ...]:
    """A JSON list of labels or entity types: few distinct values, decoded once each."""
    return tuple(json.loads(encoded))


def _metadata_facts(row: dict[str, Any], metadata_: Mapping[str, Any]) -> None:
    row["semantic_type"] = str(metadata_.get("semantic_type", "fact"))
    row["source"] = str(metadata_.get("source", "user"))
    row["retention_class"] = str(metadata_.get("retention_class", "standard"))
    row["labels"] = canonical_json(list(metadata_.get("labels", ())))
    ttl = metadata_.get("ttl_seconds")
    row["ttl_seconds"] = ttl if isinstance(ttl, int) else None
    priority = metadata_.get("priority", 5)
    row["priority"] = priority if isinstance(priority, int) else 5


def _entity_types(payload: Mapping[str, Any]) -> set[str]:
    """The PII entity types a SensitiveDataDetected event names (never the values)."""
    found = {str(t) for t in payload.get("entity_types", ()) if isinstance(t, str)}
    for finding in payload.get("findings", ()):
        if isinstance(finding, Mapping) and isinstance(finding.get("entity_type"), str):
            found.add(finding["entity_type"])
    return found


def _later(a: datetime, b: datetime) -> datetime:
    return a if a >= b else b


def _placeholder(cube_id: str, tenant: str, read_at: datetime) -> dict[str, Any]:
    """The row of a memory read before its creation arrived (fed from Kafka): reads only,
    ``version`` 0 (the planner skips it) until the creation fills in the facts."""
    return {
        "cube_id": cube_id, "tenant": tenant, "owner": "", "kind": "", "semantic_type": "",
        "source": "", "retention_class": "", "labels": "[]", "pii": "[]", "ttl_seconds": None,
        "priority": 0, "state": "", "tier": WORKING, "erased": 0, "decayed": 0,
        "read_count": 0, "created_at": read_at, "last_active_at": read_at, "version": 0,
        "content_version": 0, "position": 0,
    }


class RetentionProjection(Projection):
    """``retention`` (facts per memory), ``retention_holds`` and ``retention_log``."""

    name = "retention"
    tables = (retention, retention_created, retention_holds, retention_log)
    extra_tables = (retention_schedule, retention_pending, retention_plan)
    revision = 2
    """2: ``retention_schedule_tenant_due`` covers every column of the schedule; the cold
    archive went to ``versions``."""

    def reset(self, conn: Connection) -> None:
        super().reset(conn)
        conn.execute(delete(retention_schedule))
        conn.execute(delete(retention_pending))
        conn.execute(delete(retention_plan))

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        db = DriverConnection(conn)
        dialect = db.dialect
        # Creations too: a read that arrived first (fed from Kafka) left a placeholder row.
        wanted = {e.stream_id for e in events if ":" not in e.stream_id}
        for event in events:
            if event.type == MEMORY_ACCESSED:
                wanted.update(read["cube_id"] for read in event.payload.get("reads", ()))
        rows: dict[str, dict[str, Any]] = {}
        for values in db.fetch_in_chunks(_SELECT_FACTS, sorted(wanted)):
            row = dict(zip(FACT_COLUMNS, values, strict=True))
            for name in _TIME_COLUMNS:
                row[name] = dialect.from_db_time(row[name])
            rows[row["cube_id"]] = row
        erasures = self._later_erasures(db, events)
        changed: set[str] = set()
        log_rows: list[tuple[Any, ...]] = []
        created: list[tuple[str, str, str, int]] = []
        db_time = dialect.to_db_time

        for event in events:
            row = rows.get(event.stream_id)
            if event.type == MEMORY_CREATED and ":" not in event.stream_id:
                row = self._created(event, rows.get(event.stream_id), erasures)
                rows[event.stream_id] = row
                created.append((event.stream_id, row["tenant"], row["owner"], event.position))
                changed.add(event.stream_id)
            elif event.type == MEMORY_ACCESSED:
                for read in event.payload.get("reads", ()):
                    read_row = rows.get(read["cube_id"])
                    read_at = datetime.fromisoformat(read["at"])
                    if read_row is None:  # read before its creation arrived: a placeholder
                        read_row = rows[read["cube_id"]] = _placeholder(
                            read["cube_id"], event.tenant or "", read_at)
                    read_row["read_count"] += 1
                    read_row["last_active_at"] = _later(read_row["last_active_at"], read_at)
                    if event.position > read_row["decayed"]:  # a later read undoes a decay
                        read_row["decayed"] = 0
                    read_row["position"] = max(read_row["position"], event.position)
                    changed.add(read["cube_id"])
            elif event.type == SUBJECT_ERASED:
                # Memories of this subject not loaded in this batch are updated in SQL below.
                tenant, owner = event.tenant or event.payload.get("tenant"), \
                    event.payload.get("subject")
                erasures.append((tenant, owner, event.position))
                self._flush(db, rows, changed, created)
                subject = (tenant, owner, event.position)
                db.execute(_PEND_SUBJECT, subject)
                db.execute(_ERASE_SUBJECT, subject)
                # The rows of this batch: those written before the erasure are erased now.
                for (cube_id,) in db.execute(_SUBJECT_MEMORIES, subject).fetchall():
                    if cube_id in rows:
                        rows[cube_id]["erased"] = 1
            elif event.type == LEGAL_HOLD_PLACED:
                p = event.payload
                db.execute(_INSERT_HOLD, (
                    p["hold_id"], event.tenant or "", p["scope"], p["target"], p["reason"],
                    p["case_id"], event.actor, db_time(event.occurred_at), event.position))
            elif event.type == LEGAL_HOLD_RELEASED:
                db.execute(_RELEASE_HOLD, (event.actor, db_time(event.occurred_at),
                                           event.payload["reason"], event.position,
                                           event.payload["hold_id"]))
            elif row is not None and row["version"] > 0:
                self._evolve(row, event)
                changed.add(event.stream_id)
            if event.type in _LOGGED:
                log_rows.append(self._log_row(event, db_time))
        self._flush(db, rows, changed, created)
        db.executemany(_INSERT_LOG, log_rows)

    @staticmethod
    def _later_erasures(db: DriverConnection,
                        events: Sequence[StoredEvent]) -> list[tuple[str, str, int]]:
        """(tenant, subject, position) of the subject erasures already applied that came after
        the earliest creation of this batch: fed from Kafka, a creation can arrive after the
        erasure of its subject. Fed in log order there are none (an empty index range)."""
        created = [e.position for e in events if e.type == MEMORY_CREATED]
        if not created:
            return []
        erasures = []
        for tenant, detail, position in db.execute(_SELECT_ERASURES_AFTER, (min(created),)):
            found = json.loads(detail)
            erasures.append((tenant or found.get("tenant"), found.get("subject"), position))
        return erasures

    @staticmethod
    def _created(event: StoredEvent, placeholder: dict[str, Any] | None,
                 erasures: Sequence[tuple[str, str, int]]) -> dict[str, Any]:
        """The row a creation makes, merged with the reads of a placeholder that came first."""
        content = event.payload["content"]
        tenant, owner = event.tenant or "", event.payload["owner"]
        row = {
            "cube_id": event.stream_id, "tenant": tenant, "owner": owner,
            "kind": event.payload["kind"], "pii": "[]", "state": ACTIVE, "tier": WORKING,
            "erased": int(any(t == tenant and o == owner and at > event.position
                              for t, o, at in erasures)),
            "decayed": 0, "read_count": 0, "created_at": event.occurred_at,
            "last_active_at": event.occurred_at, "version": event.stream_version,
            "content_version": event.stream_version, "position": event.position,
        }
        _metadata_facts(row, content["metadata"])
        if placeholder is not None:
            row["read_count"] = placeholder["read_count"]
            row["last_active_at"] = _later(row["last_active_at"], placeholder["last_active_at"])
            row["position"] = max(row["position"], placeholder["position"])
        return row

    @staticmethod
    def _evolve(row: dict[str, Any], event: StoredEvent) -> None:
        """What one event on the memory's own stream does to its row."""
        kind = event.type
        row["version"] = event.stream_version
        if kind in CUBE_EVENT_TYPES:
            row["content_version"] = event.stream_version
        if kind in (MEMORY_UPDATED, MEMORY_ROLLED_BACK):
            _metadata_facts(row, event.payload["content"]["metadata"])
        if kind in _CONTENT_EVENTS:
            row["last_active_at"] = _later(row["last_active_at"], event.occurred_at)
            row["decayed"] = 0
        elif kind == MEMORY_DELETED:
            row["state"] = DELETED
        elif kind == MEMORY_RESTORED:
            row["state"] = ACTIVE
        elif kind == MEMORY_EXPIRED:
            row["state"] = EXPIRED
        elif kind == MEMORY_TIER_CHANGED:
            row["tier"] = event.payload["to_tier"]
        elif kind == MEMORY_RECALLED:
            row["tier"] = WORKING
            row["decayed"] = 0
            row["last_active_at"] = _later(row["last_active_at"], event.occurred_at)
        elif kind == MEMORY_DECAYED and event.position > row["position"]:
            # Not if a read later than the decay arrived first: that read undid it.
            row["decayed"] = event.position
        elif kind == SENSITIVE_DATA_DETECTED:
            types = set(json.loads(row["pii"])) | _entity_types(event.payload)
            row["pii"] = canonical_json(sorted(types))
        elif kind == MEMORY_CONTENT_ERASED:
            row["erased"] = 1
        row["position"] = max(row["position"], event.position)

    def _flush(self, db: DriverConnection, rows: dict[str, dict[str, Any]], changed: set[str],
               created: list[tuple[str, str, str, int]]) -> None:
        """Write the changed rows (marking them for the planner) and the creations gathered so
        far."""
        dialect = db.dialect
        db.executemany(_INSERT_CREATED, created)
        created.clear()
        ids = sorted(changed)
        db.executemany(_UPSERT_FACTS, [
            tuple(dialect.to_db_time(rows[c][n]) if n in _TIME_COLUMNS else rows[c][n]
                  for n in FACT_COLUMNS)
            for c in ids])
        db.executemany(_UPSERT_PENDING, [(c,) for c in ids if rows[c]["version"] > 0])
        changed.clear()

    @staticmethod
    def _log_row(event: StoredEvent, db_time: Any) -> tuple[Any, ...]:
        payload = event.payload
        cube_id = None if ":" in event.stream_id else event.stream_id
        detail = {k: v for k, v in payload.items()
                  if k not in ("rule", "content", "text", "reason")}
        if payload.get("reason") is not None:
            detail["reason"] = payload["reason"]
        rule = payload.get("rule")
        outcome = payload["to_tier"] if event.type == MEMORY_TIER_CHANGED else _OUTCOMES[event.type]
        return (event.position, event.type, cube_id, event.tenant, event.actor,
                rule if isinstance(rule, str) else None, outcome, canonical_json(detail),
                db_time(event.occurred_at))
