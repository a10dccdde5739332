"""What PostgreSQL's planner knows of a schema's tables: the tests that check a rebuild (SQL-fed
or Kafka-fed) leaves the planner statistics of what it filled (the test server runs without
autovacuum)."""

from __future__ import annotations

from sqlalchemy import Connection


def analyzed_tables(conn: Connection) -> set[str]:
    """The tables of the connection's current schema that ANALYZE has gathered statistics of."""
    return set(conn.exec_driver_sql(
        "SELECT relname FROM pg_stat_user_tables "
        "WHERE schemaname = current_schema() AND last_analyze IS NOT NULL").scalars())


def estimated_rows(conn: Connection, table: str) -> float:
    """The planner's estimate of ``table``'s row count (``pg_class.reltuples``)."""
    return float(conn.exec_driver_sql(
        f"SELECT reltuples FROM pg_class WHERE oid = '{table}'::regclass").scalar_one())
