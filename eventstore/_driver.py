"""Hand-written SQL run on the DBAPI connection beneath a SQLAlchemy ``Connection``.

The write path runs about ten statements per command and the projector a few per batch of events.
Through SQLAlchemy Core each of them costs 100-200 µs of statement construction, cache-key
generation and parameter processing before the database sees it, several times what SQLite takes
to run it. So the statements on those paths are plain SQL text, executed on the DBAPI cursor of
the connection the caller already holds: same transaction, same locks, a tenth of the cost.

What SQLAlchemy would otherwise do, this module and the dialect do instead: placeholders are
written ``?`` and translated for the driver, timestamps go through ``Dialect.to_db_time`` and
``from_db_time`` (so rows read back through Core are unchanged), and driver errors are raised as
the SQLAlchemy exceptions the rest of the code already handles.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc

from eventstore._dialects import Dialect, dialect_named


def select_sql(table: str, columns: Sequence[str]) -> str:
    return f"SELECT {', '.join(columns)} FROM {table}"


def in_list(count: int, width: int = 1) -> str:
    """The right side of an IN for ``count`` keys: ``(?, ?)``, or for keys of several columns
    ``(VALUES (?, ?), (?, ?))``, the row-value form SQLite and PostgreSQL both accept."""
    if width == 1:
        return f"({', '.join('?' * count)})"
    row = f"({', '.join('?' * width)})"
    return f"(VALUES {', '.join([row] * count)})"


def insert_sql(table: str, columns: Sequence[str]) -> str:
    """An INSERT taking one value per named column, in that order.

    Columns are always named by the caller, never taken from the table's definition, so a
    column added or reordered there cannot silently shift values into the wrong place.
    """
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def upsert_sql(table: str, columns: Sequence[str], key: Sequence[str],
               merged: Mapping[str, str] | None = None) -> str:
    """An INSERT that updates the row with the same ``key`` instead (SQLite and PostgreSQL spell
    ``ON CONFLICT`` alike).

    ``merged`` gives, by column, the SQL expression to store when the row exists (``usage`` adds
    its counters this way); every other column takes the new value, ``excluded.<column>``.
    """
    merged = merged or {}
    updates = ", ".join(f"{name} = {merged.get(name, f'excluded.{name}')}"
                        for name in columns if name not in key)
    return f"{insert_sql(table, columns)} ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"


class DriverConnection:
    """Runs ``?``-style SQL on the DBAPI connection of ``conn``, inside ``conn``'s transaction."""

    def __init__(self, conn: Connection, dialect: Dialect | None = None) -> None:
        self.dialect = dialect or dialect_named(conn.dialect.name)
        self._sa_dialect = conn.dialect
        self._cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; returns the cursor, ready for ``fetchone``/``fetchall``."""
        # try/except rather than a context manager: a projected write runs ~25 statements.
        try:
            self._cursor.execute(self.dialect.driver_sql(sql), params)
        except self._sa_dialect.loaded_dbapi.Error as error:
            raise self._translated(sql, params, error) from error
        return self._cursor

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = rows if isinstance(rows, list) else list(rows)
        if len(rows) == 1:
            # psycopg runs executemany in pipeline mode: worth it for a batch, not for one row.
            self.execute(sql, rows[0])
        elif rows:
            try:
                self._cursor.executemany(self.dialect.driver_sql(sql), rows)
            except self._sa_dialect.loaded_dbapi.Error as error:
                raise self._translated(sql, rows, error) from error

    @property
    def rowcount(self) -> int:
        """Rows the last statement wrote (an ``executemany``: all its rows), -1 if unknown."""
        return int(self._cursor.rowcount)

    def fetch_in_chunks(self, sql: str, keys: Sequence[Any], chunk: int = 500) -> Iterator[Any]:
        """The rows of ``sql``, whose ``{keys}`` slot is the right side of an IN, for ``keys``
        (values, or tuples for a row-value IN), a chunk of them per query."""
        for start in range(0, len(keys), chunk):
            part = keys[start:start + chunk]
            if isinstance(part[0], tuple):
                slot, params = in_list(len(part), len(part[0])), [v for key in part for v in key]
            else:
                slot, params = in_list(len(part)), list(part)
            yield from self.execute(sql.format(keys=slot), params).fetchall()

    def _translated(self, sql: str, params: Any, error: Exception) -> sa_exc.DBAPIError:
        """``error`` (the driver's) as the SQLAlchemy exception the rest of the code handles."""
        dbapi_error = self._sa_dialect.loaded_dbapi.Error
        return sa_exc.DBAPIError.instance(sql, params, error, dbapi_error,
                                          dialect=self._sa_dialect)
