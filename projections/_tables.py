"""Tables of the read models. They hold nothing the log does not: drop them and replay."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from eventstore import UTCDateTime

metadata = MetaData()


def _position() -> Column[int]:
    return Column("position", BigInteger, nullable=False)


checkpoints = Table(
    "projection_checkpoints",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("position", BigInteger, nullable=False),
)

revisions = Table(
    "projection_revisions",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("revision", Integer, nullable=False),
)
"""The ``Projection.revision`` each read model's tables and rows were built at. A read model with
a checkpoint but no row here was built before revisions were recorded: at revision 1."""


def _memory_state_columns() -> list[Column[object]]:
    """The columns of one MemoryState; ``cubes`` holds the latest, ``versions`` every one."""
    return [
        Column("cube_id", String(200), nullable=False),
        Column("tenant", String(200), nullable=False),
        Column("owner", String(200), nullable=False),
        Column("kind", String(32), nullable=False),
        Column("text", Text, nullable=False),
        Column("metadata", Text, nullable=False),
        Column("version", Integer, nullable=False),
        Column("state", String(16), nullable=False),
        Column("created_at", UTCDateTime, nullable=False),
        Column("created_by", String(200), nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        Column("updated_by", String(200), nullable=False),
        _position(),
        Column("last_event", String(100), nullable=False),
        Column("changed", Text, nullable=False),
        Column("tier", String(16), nullable=False, server_default="working"),
    ]


cubes = Table(
    "cubes",
    metadata,
    *_memory_state_columns(),
    PrimaryKeyConstraint("cube_id"),
    Index("cubes_tenant", "tenant", "cube_id"),
    Index("cubes_owner", "owner", "cube_id"),
)

cube_labels = Table(
    "cube_labels",
    metadata,
    Column("cube_id", String(200), nullable=False),
    Column("label", String(200), nullable=False),
    PrimaryKeyConstraint("cube_id", "label"),
    Index("cube_labels_label", "label", "cube_id"),
)

versions = Table(
    "versions",
    metadata,
    *_memory_state_columns(),
    Column("reason", Text),
    PrimaryKeyConstraint("cube_id", "version"),
)

audit = Table(
    "audit",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(36), nullable=False),
    Column("type", String(100), nullable=False),
    Column("stream_id", String(200), nullable=False),
    Column("cube_id", String(200)),
    Column("tenant", String(200)),
    Column("actor", String(200), nullable=False),
    Column("on_behalf_of", String(200)),
    Column("reason", Text),
    Column("detail", Text, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
    Index("audit_tenant", "tenant", "position"),
    Index("audit_actor", "actor", "position"),
    Index("audit_cube", "cube_id", "position"),
    Index("audit_type", "type", "position"),
    Index("audit_recorded_at", "recorded_at"),
)

usage = Table(
    "usage",
    metadata,
    Column("cube_id", String(200), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("read_count", Integer, nullable=False),
    Column("last_read_at", UTCDateTime),
    Column("last_read_by", String(200)),
    Column("write_count", Integer, nullable=False),
    Column("last_write_at", UTCDateTime),
)

reads = Table(
    "reads",
    metadata,
    _position(),
    Column("cube_id", String(200), nullable=False),
    Column("version", Integer, nullable=False),
    Column("tenant", String(200), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("read_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("position", "cube_id"),
    Index("reads_cube", "cube_id", "position"),
)
