"""The PostgreSQL backend of the search index: a generated ``tsvector`` under a GIN index.

The ``english`` text search configuration stems and drops stopwords; ``ts_rank`` ranks by term
frequency, damped by the document's length (normalization 1), the nearest PostgreSQL has to BM25.
(``ts_rank_cd``, cover density, costs twice as much per matching row, and ranking is the bulk of
a search's cost: every matching row is ranked before the best ``k`` are kept.)

The column is generated from ``search_docs.text``, so erasing the text empties it in the same
statement.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import DDL, event

from projections._search import SqlSearchIndex, search_docs

_DDL = (
    "ALTER TABLE search_docs ADD COLUMN IF NOT EXISTS tsv tsvector "
    "GENERATED ALWAYS AS (to_tsvector('english', text)) STORED",
    # Without fastupdate: a pending list of unmerged entries is scanned linearly by every search
    # (after a bulk load, ten times the cost of the search itself); writes pay the merge instead.
    "CREATE INDEX IF NOT EXISTS search_docs_tsv ON search_docs USING GIN (tsv) "
    "WITH (fastupdate = off)",
)
for _statement in _DDL:
    event.listen(search_docs, "after_create", DDL(_statement).execute_if(dialect="postgresql"))



class PostgresSearchIndex(SqlSearchIndex):
    name = "postgres-fts"
    contains = "strpos({haystack}, {needle})"
    full_text_sql = """
SELECT {columns}, ts_rank(d.tsv, q.query, 1) AS score
FROM search_docs d, to_tsquery('english', ?) AS q(query)
WHERE d.tsv @@ q.query AND {where}
ORDER BY score DESC, d.doc_id LIMIT ?
"""

    def match_expression(self, groups: Sequence[tuple[str, ...]]) -> str:
        return " | ".join("(" + " & ".join(f"'{term}'" for term in group) + ")"
                          for group in groups)
