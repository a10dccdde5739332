"""The SQLite backend of the search index: FTS5 with BM25 ranking (the embedded default).

The FTS5 table is an external-content index over ``search_docs.text`` (the text is stored once)
kept by triggers, so every write to ``search_docs`` (projection, rebuild, erasure) updates it in
the same transaction. Porter stemming over unicode61 tokens, diacritics folded.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import DDL, Connection, event

from projections._search import SqlSearchIndex, search_docs

_DDL = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS search_fts USING fts5(text, content='search_docs', "
    "content_rowid='doc_id', tokenize='porter unicode61 remove_diacritics 2')",
    "CREATE TRIGGER IF NOT EXISTS search_docs_fts_insert AFTER INSERT ON search_docs BEGIN "
    "INSERT INTO search_fts (rowid, text) VALUES (new.doc_id, new.text); END",
    "CREATE TRIGGER IF NOT EXISTS search_docs_fts_delete AFTER DELETE ON search_docs BEGIN "
    "INSERT INTO search_fts (search_fts, rowid, text) VALUES ('delete', old.doc_id, old.text); "
    "END",
    "CREATE TRIGGER IF NOT EXISTS search_docs_fts_update AFTER UPDATE OF text ON search_docs "
    "WHEN old.text IS NOT new.text BEGIN "
    "INSERT INTO search_fts (search_fts, rowid, text) VALUES ('delete', old.doc_id, old.text); "
    "INSERT INTO search_fts (rowid, text) VALUES (new.doc_id, new.text); END",
)
MERGE_ALL_SEGMENTS = "INSERT INTO search_fts (search_fts) VALUES ('optimize')"


def empty_index(conn: Connection) -> None:
    """Empty ``search_docs`` and its FTS5 index at once, for a rebuild.

    Deleting the rows one by one through the trigger leaves a delete marker per row in the index,
    which made the rebuild's inserts four times slower (the search read model was 40% of a full
    rebuild). ``delete-all`` drops the index's contents in one go; the rows then go with the
    delete trigger set aside for the statement. DDL is transactional in SQLite: a rebuild that
    fails rolls the trigger back with everything else."""
    conn.exec_driver_sql("INSERT INTO search_fts (search_fts) VALUES ('delete-all')")
    conn.exec_driver_sql("DROP TRIGGER IF EXISTS search_docs_fts_delete")
    conn.exec_driver_sql("DELETE FROM search_docs")
    conn.exec_driver_sql(_DDL[2])


for _statement in _DDL:
    event.listen(search_docs, "after_create", DDL(_statement).execute_if(dialect="sqlite"))
# Dropped with its content table (a new revision of the search read model re-creates both): the
# triggers go with search_docs, the index would outlive it.
event.listen(search_docs, "before_drop",
             DDL("DROP TABLE IF EXISTS search_fts").execute_if(dialect="sqlite"))



class SqliteSearchIndex(SqlSearchIndex):
    name = "sqlite-fts5"
    contains = "instr({haystack}, {needle})"
    # FTS5's bm25() is negative, lower is better: negated, higher is better.
    full_text_sql = """
SELECT {columns}, -bm25(search_fts) AS score FROM search_fts
JOIN search_docs d ON d.doc_id = search_fts.rowid
WHERE search_fts MATCH ? AND {where}
ORDER BY score DESC, d.doc_id LIMIT ?
"""

    def match_expression(self, groups: Sequence[tuple[str, ...]]) -> str:
        return " OR ".join("(" + " AND ".join(f'"{term}"' for term in group) + ")"
                           for group in groups)
