"""The dashboard's read model: what a compliance overview counts and charts, kept as it goes.

Counting a million audit rows per page view (``GROUP BY`` over the trail) costs seconds and grows
with the log. So the ``insights`` projection keeps the counts themselves, updated by every batch
of events, and the overview and access pages read a few hundred rows whatever the log's length:

- ``activity_counts``: events per tenant, type and time bucket, at three resolutions (``minute``,
  ``hour``, ``day``, UTC), with the first and last position in each bucket;
- ``read_counts``: memories read per tenant and bucket (the ``reads`` model's rows, counted);
- ``reader_memories`` / ``reader_totals``: how often each actor read each memory, and per actor
  the reads and distinct memories (top readers, readers of ``sensitive`` memories).

Every merge is a sum, a minimum or a maximum, so the rows do not depend on the order the events
arrive in (a Kafka-fed projector sees streams interleaved differently) and a rebuild from position
0 gives the same rows as incremental application (tests compare both, and the counts with a scan
of the trail).

A question the counts cannot answer exactly (an actor or memory filter, a window boundary inside
a minute) is answered by the same ``GROUP BY`` over the indexed ``audit`` and ``reads`` tables as
before (the ``scan_*`` methods). Metadata only: types, actors, counts, times.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Connection,
    Engine,
    Index,
    PrimaryKeyConstraint,
    String,
    Table,
    distinct,
    func,
    select,
)

from eventstore import StoredEvent
from eventstore._driver import DriverConnection, upsert_sql
from projections._queries import AuditEntry, AuditFilter, _filtered, _unindexed, audit_page
from projections._readmodels import Projection
from projections._state import MEMORY_ACCESSED
from projections._tables import audit, cube_labels, cubes, metadata, reads

BUCKETS = {"minute": 16, "hour": 13, "day": 10}
"""Bucket sizes, each as the length of the ISO timestamp prefix that names one."""
_PG_FORMATS = {"minute": "YYYY-MM-DD HH24:MI", "hour": "YYYY-MM-DD HH24", "day": "YYYY-MM-DD"}
_PREFIX_PADDING = {"minute": ":00", "hour": ":00", "day": ""}
_COARSE_TO_FINE = ("day", "hour", "minute")
_STEP = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}

activity_counts = Table(
    "activity_counts",
    metadata,
    Column("level", String(6), nullable=False),
    Column("tenant", String(200), nullable=False),
    Column("bucket", String(16), nullable=False),
    Column("type", String(100), nullable=False),
    Column("events", BigInteger, nullable=False),
    Column("first_position", BigInteger, nullable=False),
    Column("last_position", BigInteger, nullable=False),
    PrimaryKeyConstraint("level", "tenant", "bucket", "type"),
    Index("activity_counts_bucket", "level", "bucket"),
)
"""``bucket``: the UTC ISO prefix naming it (``2026-11-30T10:29``, ``2026-11-30T10``,
``2026-11-30``); ``tenant``: '' for events of no tenant."""

read_counts = Table(
    "read_counts",
    metadata,
    Column("level", String(6), nullable=False),
    Column("tenant", String(200), nullable=False),
    Column("bucket", String(16), nullable=False),
    Column("reads", BigInteger, nullable=False),
    PrimaryKeyConstraint("level", "tenant", "bucket"),
    Index("read_counts_bucket", "level", "bucket"),
)

reader_memories = Table(
    "reader_memories",
    metadata,
    Column("tenant", String(200), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("cube_id", String(200), nullable=False),
    Column("reads", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant", "actor", "cube_id"),
    Index("reader_memories_cube", "cube_id", "tenant"),
)

reader_totals = Table(
    "reader_totals",
    metadata,
    Column("tenant", String(200), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("reads", BigInteger, nullable=False),
    Column("memories", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant", "actor"),
)

_UPSERT_ACTIVITY = upsert_sql(
    "activity_counts",
    ("level", "tenant", "bucket", "type", "events", "first_position", "last_position"),
    key=("level", "tenant", "bucket", "type"), merged={
        "events": "activity_counts.events + excluded.events",
        "first_position": "CASE WHEN excluded.first_position < activity_counts.first_position "
                          "THEN excluded.first_position ELSE activity_counts.first_position END",
        "last_position": "CASE WHEN excluded.last_position > activity_counts.last_position "
                         "THEN excluded.last_position ELSE activity_counts.last_position END",
    })
_UPSERT_READS = upsert_sql("read_counts", ("level", "tenant", "bucket", "reads"),
                           key=("level", "tenant", "bucket"),
                           merged={"reads": "read_counts.reads + excluded.reads"})
_SELECT_PAIRS = ("SELECT tenant, actor, cube_id FROM reader_memories "
                 "WHERE (tenant, actor, cube_id) IN {keys}")
_UPSERT_PAIR = upsert_sql("reader_memories", ("tenant", "actor", "cube_id", "reads"),
                          key=("tenant", "actor", "cube_id"),
                          merged={"reads": "reader_memories.reads + excluded.reads"})
_UPSERT_READER = upsert_sql("reader_totals", ("tenant", "actor", "reads", "memories"),
                            key=("tenant", "actor"), merged={
                                "reads": "reader_totals.reads + excluded.reads",
                                "memories": "reader_totals.memories + excluded.memories"})


def _minute_key(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()[:BUCKETS["minute"]]


def _read_minute_key(at: str) -> str:
    """The minute of a read's ``at`` (ISO text, as the SDK writes it: UTC, ``T``)."""
    if at.endswith("+00:00") and at[10:11] == "T":
        return at[:BUCKETS["minute"]]
    return _minute_key(datetime.fromisoformat(at))


class _Minutes:
    """Minute keys of one batch's timestamps: most events of a batch share a few minutes."""

    def __init__(self) -> None:
        self._keys: dict[tuple[int, ...], str] = {}

    def of(self, moment: datetime) -> str:
        if moment.tzinfo is not UTC:
            moment = moment.astimezone(UTC)
        minute = (moment.year, moment.month, moment.day, moment.hour, moment.minute)
        key = self._keys.get(minute)
        if key is None:
            key = self._keys[minute] = moment.isoformat()[:BUCKETS["minute"]]
        return key


def _levels(minute: str) -> Iterator[tuple[str, str]]:
    """The bucket of each resolution that contains ``minute``."""
    for level in _COARSE_TO_FINE:
        yield level, minute[:BUCKETS[level]]


class InsightsProjection(Projection):
    """Keeps the counts above: a batch is counted per minute in memory, then one upsert per
    table."""

    name = "insights"
    tables = (activity_counts, read_counts, reader_memories, reader_totals)

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        minutes = _Minutes()
        activity: dict[tuple[str, str, str], list[int]] = {}
        read_minutes: dict[tuple[str, str], int] = {}
        pairs: dict[tuple[str, str, str], int] = {}
        for event in events:
            tenant = event.tenant or ""
            key = (tenant, minutes.of(event.recorded_at), event.type)
            row = activity.get(key)
            if row is None:
                activity[key] = [1, event.position, event.position]
            else:
                row[0] += 1
                row[1] = min(row[1], event.position)
                row[2] = max(row[2], event.position)
            if event.type == MEMORY_ACCESSED:
                # As the ``reads`` model: one read per memory per batch, at its last time.
                read_at: dict[str, str] = {}
                for read in event.payload["reads"]:
                    read_at[read["cube_id"]] = read["at"]
                for cube_id, at in read_at.items():
                    minute = (tenant, _read_minute_key(at))
                    read_minutes[minute] = read_minutes.get(minute, 0) + 1
                    pair = (tenant, event.actor, cube_id)
                    pairs[pair] = pairs.get(pair, 0) + 1
        if not activity:
            return
        db = DriverConnection(conn)
        # Every upsert in key order: consumers on other partitions update the same counters,
        # and two transactions taking row locks in one order cannot deadlock each other.
        db.executemany(_UPSERT_ACTIVITY, _rolled_up_activity(activity))
        if not pairs:
            return
        db.executemany(_UPSERT_READS, _rolled_up_reads(read_minutes))
        known = {tuple(row) for row in db.fetch_in_chunks(_SELECT_PAIRS, list(pairs))}
        totals: dict[tuple[str, str], list[int]] = {}
        for (tenant, actor, cube_id), n in pairs.items():
            total = totals.setdefault((tenant, actor), [0, 0])
            total[0] += n
            total[1] += (tenant, actor, cube_id) not in known
        db.executemany(_UPSERT_PAIR, [(*pair, n) for pair, n in sorted(pairs.items())])
        db.executemany(_UPSERT_READER, [(*key, *total) for key, total in sorted(totals.items())])


def _rolled_up_activity(
        by_minute: dict[tuple[str, str, str], list[int]]) -> list[tuple[Any, ...]]:
    """Per-minute counts as rows of every resolution (level, tenant, bucket, type, events,
    first position, last position)."""
    rows: dict[tuple[str, str, str, str], list[int]] = {}
    for (tenant, minute, kind), (count, first, last) in by_minute.items():
        for level, bucket in _levels(minute):
            row = rows.get((level, tenant, bucket, kind))
            if row is None:
                rows[(level, tenant, bucket, kind)] = [count, first, last]
            else:
                row[0] += count
                row[1] = min(row[1], first)
                row[2] = max(row[2], last)
    return [(*key, *row) for key, row in sorted(rows.items())]


def _rolled_up_reads(by_minute: dict[tuple[str, str], int]) -> list[tuple[Any, ...]]:
    rows: dict[tuple[str, str, str], int] = {}
    for (tenant, minute), count in by_minute.items():
        for level, bucket in _levels(minute):
            rows[(level, tenant, bucket)] = rows.get((level, tenant, bucket), 0) + count
    return [(*key, count) for key, count in sorted(rows.items())]


@dataclass(frozen=True, slots=True)
class ActivityCount:
    """How many events of ``type`` were recorded in the bucket starting at ``start``."""

    start: datetime
    type: str
    count: int


@dataclass(frozen=True, slots=True)
class ActorCount:
    actor: str
    count: int
    memories: int
    """Distinct memories involved (0 where it does not apply)."""


@dataclass(frozen=True, slots=True)
class TimeSpan:
    first: datetime | None
    last: datetime | None
    events: int


def choose_bucket(span: TimeSpan) -> str:
    """A bucket that gives a readable number of points over ``span``."""
    if span.first is None or span.last is None:
        return "day"
    seconds = (span.last - span.first).total_seconds()
    if seconds <= 6 * 3600:
        return "minute"
    if seconds <= 7 * 86400:
        return "hour"
    return "day"


def counted(where: AuditFilter) -> bool:
    """Whether the kept counts answer ``where`` exactly: no actor or memory filter (they are
    not counted per actor or memory), and window ends on whole minutes (the finest bucket)."""
    return (where.actor is None and where.cube_id is None
            and all(moment is None or (moment.second == 0 and moment.microsecond == 0)
                    for moment in (where.since, where.until)))


class Insights:
    """Answers from the kept counts where they are exact (``counted``), else from a scan of the
    indexed trail; both give the same figures."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def span(self, where: AuditFilter) -> TimeSpan:
        """When the first and last matching events were recorded (``events`` is left 0:
        ``activity`` counts them)."""
        if not counted(where):
            return self.scan_span(where)
        with self.engine.connect() as conn:
            ends = []
            for order, pick in ((activity_counts.c.bucket, func.min(
                    activity_counts.c.first_position)), (activity_counts.c.bucket.desc(),
                                                         func.max(activity_counts.c.last_position))):
                # The first (last) minute with matching events, then the position in it.
                rows = _counts_filtered(select(activity_counts.c.bucket), activity_counts,
                                        where, "minute")
                bucket = conn.execute(rows.order_by(order).limit(1)).scalar()
                if bucket is None:
                    return TimeSpan(None, None, 0)
                ends.append(conn.execute(_counts_filtered(select(pick), activity_counts, where,
                                                          "minute").where(
                    activity_counts.c.bucket == bucket)).scalar())
            return self._span_of(conn, ends[0], ends[1])

    def scan_span(self, where: AuditFilter) -> TimeSpan:
        """``span`` from the ``audit`` table: one position-index lookup per end."""
        with self.engine.connect() as conn:
            first = conn.execute(_filtered(select(func.min(audit.c.position)), where)).scalar()
            if first is None:
                return TimeSpan(None, None, 0)
            last = conn.execute(_filtered(select(func.max(audit.c.position)), where)).scalar()
            return self._span_of(conn, first, last)

    @staticmethod
    def _span_of(conn: Connection, first: int, last: int) -> TimeSpan:
        times = dict(conn.execute(select(audit.c.position, audit.c.recorded_at).where(
            audit.c.position.in_([first, last]))).all())
        return TimeSpan(_aware(times[first]), _aware(times[last]), 0)

    def activity(self, where: AuditFilter, *, bucket: str) -> list[ActivityCount]:
        """Events per type and time bucket (``minute``, ``hour`` or ``day``, UTC)."""
        _check_bucket(bucket)
        if not counted(where):
            return self.scan_activity(where, bucket=bucket)
        totals: dict[tuple[str, str], int] = {}
        with self.engine.connect() as conn:
            for level, since, until in _cover(where.since, where.until, bucket):
                query = _counts_filtered(
                    select(activity_counts.c.bucket, activity_counts.c.type,
                           func.sum(activity_counts.c.events)),
                    activity_counts, replace(where, since=since, until=until), level)
                for key, kind, count in conn.execute(query.group_by(
                        activity_counts.c.bucket, activity_counts.c.type)):
                    chart_key = (key[:BUCKETS[bucket]], kind)
                    totals[chart_key] = totals.get(chart_key, 0) + int(count)
        return sorted((ActivityCount(_bucket_start(key, bucket), kind, count)
                       for (key, kind), count in totals.items() if count),
                      key=lambda c: (c.start, c.type))

    def scan_activity(self, where: AuditFilter, *, bucket: str) -> list[ActivityCount]:
        """``activity`` by a ``GROUP BY`` over the matching ``audit`` rows."""
        _check_bucket(bucket)
        with self.engine.connect() as conn:
            key = _bucket_of(audit.c.recorded_at, bucket, conn.dialect.name).label("bucket")
            query = _filtered(select(key, audit.c.type, func.count()), where)
            rows = conn.execute(query.group_by(key, audit.c.type).order_by(key)).all()
        return sorted((ActivityCount(_bucket_start(prefix, bucket), kind, int(count))
                       for prefix, kind, count in rows), key=lambda c: (c.start, c.type))

    def reads_over_time(self, where: AuditFilter, *, bucket: str) -> list[ActivityCount]:
        """Memories read per time bucket (type ``MemoryRead``), as the ``reads`` model has
        them."""
        _check_bucket(bucket)
        if not counted(where):
            return self.scan_reads_over_time(where, bucket=bucket)
        totals: dict[str, int] = {}
        with self.engine.connect() as conn:
            for level, since, until in _cover(where.since, where.until, bucket):
                query = _counts_filtered(
                    select(read_counts.c.bucket, func.sum(read_counts.c.reads)), read_counts,
                    replace(where, since=since, until=until, types=None), level)
                for key, count in conn.execute(query.group_by(read_counts.c.bucket)):
                    chart_key = key[:BUCKETS[bucket]]
                    totals[chart_key] = totals.get(chart_key, 0) + int(count)
        return [ActivityCount(_bucket_start(key, bucket), "MemoryRead", count)
                for key, count in sorted(totals.items()) if count]

    def scan_reads_over_time(self, where: AuditFilter, *, bucket: str) -> list[ActivityCount]:
        """``reads_over_time`` by a ``GROUP BY`` over the matching ``reads`` rows."""
        _check_bucket(bucket)
        with self.engine.connect() as conn:
            key = _bucket_of(reads.c.read_at, bucket, conn.dialect.name).label("bucket")
            query = _reads_filtered(select(key, func.count()), where)
            rows = conn.execute(query.group_by(key).order_by(key)).all()
        return [ActivityCount(_bucket_start(prefix, bucket), "MemoryRead", int(count))
                for prefix, count in rows]

    def readers(self, where: AuditFilter, *, label: str | None = None,
                limit: int = 20) -> list[ActorCount]:
        """Who read most (memories read, distinct memories), optionally only memories that
        carry ``label`` now."""
        if not counted(where) or where.since is not None or where.until is not None:
            return self.scan_readers(where, label=label, limit=limit)
        if label is None and where.tenant is not None:
            query = select(reader_totals.c.actor, reader_totals.c.reads,
                           reader_totals.c.memories).where(
                reader_totals.c.tenant == where.tenant).order_by(
                reader_totals.c.reads.desc(), reader_totals.c.actor)
        else:
            # Across tenants, or of labelled memories: from the per-memory rows (an actor's
            # memories counted once even if read under two tenants).
            count = func.sum(reader_memories.c.reads)
            query = select(reader_memories.c.actor, count,
                           func.count(distinct(reader_memories.c.cube_id)))
            if where.tenant is not None:
                # Of labelled memories: from them to their readers (``reader_memories_cube``),
                # not through every row of the tenant.
                tenant = (reader_memories.c.tenant if label is None
                          else _unindexed(reader_memories.c.tenant))
                query = query.where(tenant == where.tenant)
            if label is not None:
                query = query.where(reader_memories.c.cube_id.in_(
                    select(cube_labels.c.cube_id).where(cube_labels.c.label == label)))
            query = query.group_by(reader_memories.c.actor).order_by(
                count.desc(), reader_memories.c.actor)
        with self.engine.connect() as conn:
            return [ActorCount(actor, int(n), int(m))
                    for actor, n, m in conn.execute(query.limit(limit))]

    def scan_readers(self, where: AuditFilter, *, label: str | None = None,
                     limit: int = 20) -> list[ActorCount]:
        """``readers`` by a ``GROUP BY`` over the matching ``reads`` rows."""
        query = _reads_filtered(
            select(reads.c.actor, func.count(), func.count(distinct(reads.c.cube_id))), where)
        if label is not None:
            query = query.where(reads.c.cube_id.in_(
                select(cube_labels.c.cube_id).where(cube_labels.c.label == label)))
        query = query.group_by(reads.c.actor).order_by(func.count().desc(), reads.c.actor)
        with self.engine.connect() as conn:
            return [ActorCount(actor, int(n), int(m))
                    for actor, n, m in conn.execute(query.limit(limit))]

    def trail(self, where: AuditFilter, *, before: int = 0,
              limit: int = 100) -> list[AuditEntry]:
        """A page of the audit trail, newest first from just before position ``before`` (0: the
        end), walking the index of the most selective filter (``audit_page``, which the SDK's
        ``audit`` shares): the memory's events and reads, else the types', else the actor's,
        else the tenant's."""
        with self.engine.connect() as conn:
            return audit_page(conn, where, after=before, limit=limit, newest_first=True)

    def memory_trail(self, where: AuditFilter, *, before: int = 0,
                     limit: int = 100) -> list[AuditEntry]:
        """The audit trail of one memory (``where.cube_id``), its reads included, newest first
        from just before position ``before`` (0: the end)."""
        if where.cube_id is None:
            raise ValueError("memory_trail needs a memory (where.cube_id)")
        return self.trail(where, before=before, limit=limit)

    def actors(self, where: AuditFilter, *, limit: int = 20) -> list[ActorCount]:
        """Who caused the most matching events (e.g. ``types=["AccessDenied"]``): a scan of
        the matching rows, meant for a rare type (the ``audit_type`` index finds them)."""
        # With a type, its index (without statistics SQLite may walk the tenant's instead).
        query = _filtered(select(audit.c.actor, func.count(), func.count(distinct(
            audit.c.cube_id))), where, selective=bool(where.types))
        query = query.group_by(audit.c.actor).order_by(func.count().desc(), audit.c.actor)
        with self.engine.connect() as conn:
            return [ActorCount(actor, int(n), int(m))
                    for actor, n, m in conn.execute(query.limit(limit))]

    def tenants(self) -> list[str]:
        """Every tenant that has memories."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(cubes.c.tenant).distinct().order_by(
                cubes.c.tenant)).scalars())


def _check_bucket(bucket: str) -> None:
    if bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {', '.join(BUCKETS)}; got {bucket!r}")


def _cover(since: datetime | None, until: datetime | None,
           level: str) -> list[tuple[str, datetime | None, datetime | None]]:
    """[since, until) as ranges of whole buckets, as coarse as they fit: the whole ``level``
    buckets inside it, and finer ones for the ends that fall inside a bucket (the minutes and
    hours of a window that starts at 10:29 before the first whole day)."""
    finer = _COARSE_TO_FINE[_COARSE_TO_FINE.index(level) + 1:]
    if not finer:
        return [(level, since, until)]
    start = _ceil(since, level) if since is not None else None
    end = _floor(until, level) if until is not None else None
    if start is not None and end is not None and start >= end:
        return _cover(since, until, finer[0])
    parts: list[tuple[str, datetime | None, datetime | None]] = [(level, start, end)]
    if since is not None and start is not None and since < start:
        parts += _cover(since, start, finer[0])
    if until is not None and end is not None and end < until:
        parts += _cover(end, until, finer[0])
    return parts


def _floor(moment: datetime, level: str) -> datetime:
    moment = moment.astimezone(UTC)
    if level == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if level == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(second=0, microsecond=0)


def _ceil(moment: datetime, level: str) -> datetime:
    floor = _floor(moment, level)
    return floor if floor == moment else floor + _STEP[level]


def _counts_filtered(query: Any, table: Table, where: AuditFilter, level: str) -> Any:
    query = query.where(table.c.level == level)
    if where.tenant is not None:
        query = query.where(table.c.tenant == where.tenant)
    if where.types and "type" in table.c:
        query = query.where(table.c.type.in_(list(where.types)))
    if where.since is not None:
        query = query.where(table.c.bucket >= _minute_key(where.since)[:BUCKETS[level]])
    if where.until is not None:
        query = query.where(table.c.bucket < _minute_key(where.until)[:BUCKETS[level]])
    return query


def _reads_filtered(query: Any, where: AuditFilter) -> Any:
    for column, value in ((reads.c.tenant, where.tenant), (reads.c.actor, where.actor),
                          (reads.c.cube_id, where.cube_id)):
        if value is not None:
            query = query.where(column == value)
    if where.since is not None:
        query = query.where(reads.c.read_at >= where.since)
    if where.until is not None:
        query = query.where(reads.c.read_at < where.until)
    return query


def _bucket_of(column: Any, bucket: str, dialect: str) -> ColumnElement[str]:
    # SQLite keeps UTC timestamps as ISO text, so a bucket is a prefix of it; PostgreSQL formats.
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", column), _PG_FORMATS[bucket])
    return func.substr(column, 1, BUCKETS[bucket])


def _bucket_start(prefix: str, bucket: str) -> datetime:
    return datetime.fromisoformat(prefix + _PREFIX_PADDING[bucket]).replace(tzinfo=UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def merge_series(*series: Sequence[ActivityCount]) -> list[ActivityCount]:
    """Several series as one, ordered by time then type."""
    merged = [count for one in series for count in one]
    return sorted(merged, key=lambda c: (c.start, c.type))
