"""The Elasticsearch backend of the search index (``MEMWARDEN_ES_URL``), on the official client.

Fed by its own projection (``ElasticsearchProjection``, checkpoint ``search_es``) from the same
document fold as the SQL index, run by its own ``ProjectionRunner`` so that Elasticsearch being
slow or down never holds up a write: the index catches up before each search.

- Every document is written with ``version = position of the event that produced it`` and
  ``version_type = external``: Elasticsearch keeps a document only if its version is higher
  than the stored one, so a replay (a crash between the bulk request and the checkpoint's
  commit, a second indexer) can never overwrite a newer document with an older one.
- Readers query the alias ``<prefix>``. A rebuild creates a new index ``<prefix>-<id>``, replays
  the log into it and then moves the alias in one atomic ``_aliases`` call; readers see the old
  index until the new one is complete.
- Policy and lifecycle filters are ``bool.filter`` clauses of the query (and of the kNN search's
  ``filter``), so they apply before scoring, as on the SQL backends.
- Vectors (the semantic extra) are computed at indexing time into a ``dense_vector`` field.
- A cold-archived document keeps no plaintext, as on the SQL backends: its ``text`` is empty and
  the text waits, compressed, in ``archived`` (a ``binary`` field: neither indexed nor returned
  with hits) for a recall to put it back.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from eventstore import EventStore, StoredEvent
from projections._archive import compress_text, decompress_text
from projections._readmodels import Projection
from projections._runner import ProjectionRunner
from projections._search import (
    ACTIVE,
    COLD_ARCHIVE,
    AccessScope,
    Candidate,
    SearchDocument,
    SearchHit,
    SearchIndex,
    SearchQuery,
    apply_to_documents,
)

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch

ES_PROJECTION = "search_es"
DEFAULT_PREFIX = "memwarden-search"
_KNN_CANDIDATES = 200
_SUBJECT_PAGE = 10_000

_KEYWORDS = ("cube_id", "tenant", "owner", "created_by", "kind", "semantic_type", "labels",
             "shared_with", "state", "tier")
_DATES = ("created_at", "updated_at", "expires_at")


ARCHIVED_FIELD = {"type": "binary"}
"""The compressed text of a cold-archived document (base64 in the source; never searched)."""


def mapping(dimensions: int | None = None) -> dict[str, Any]:
    """The index mapping: keywords for every filtered attribute, English analysis of the text,
    and a cosine ``dense_vector`` when vectors are stored."""
    properties: dict[str, Any] = {name: {"type": "keyword"} for name in _KEYWORDS}
    properties.update({name: {"type": "date"} for name in _DATES})
    properties.update({
        "text": {"type": "text", "analyzer": "english"},
        "archived": ARCHIVED_FIELD,
        "erased": {"type": "boolean"},
        "doc_id": {"type": "long"},
        "version": {"type": "integer"},
        "position": {"type": "long"},
    })
    if dimensions is not None:
        properties["vector"] = {"type": "dense_vector", "dims": dimensions, "index": True,
                                "similarity": "cosine"}
    return {"dynamic": "strict", "properties": properties}


def source(doc: SearchDocument, vector: Sequence[float] | None = None) -> dict[str, Any]:
    """A document as stored in Elasticsearch."""
    body: dict[str, Any] = {name: getattr(doc, name) for name in _KEYWORDS}
    body.update({name: list(getattr(doc, name)) for name in ("labels", "shared_with")})
    body.update({name: None if getattr(doc, name) is None else getattr(doc, name).isoformat()
                 for name in _DATES})
    body.update(text=doc.text, erased=doc.erased, doc_id=doc.doc_id, version=doc.version,
                position=doc.position)
    if doc.tier == COLD_ARCHIVE and doc.text:
        body.update(text="", archived=base64.b64encode(compress_text(doc.text)).decode())
    if vector is not None and doc.searchable:
        body["vector"] = list(vector)
    return body


HIT_SOURCE = {"excludes": ["vector", "archived"]}
"""What a search returns of each hit: the document, without its 384 floats (nor, were it cold,
its archived text)."""


def hits_from(response: Any) -> list[SearchHit]:
    """A search response's hits, each with its document (no second request for them)."""
    return [SearchHit(h["_id"], float(h["_score"]), document_from(h["_source"]))
            for h in response["hits"]["hits"]]


def document_from(body: dict[str, Any], *, unarchived: bool = False) -> SearchDocument:
    """The document ``body`` stores; ``unarchived``: with a cold one's text taken out of the
    archive (to fold events into it: a recall puts the text back), else without its text."""

    def moment(name: str) -> Any:
        value = body.get(name)
        return None if value is None else datetime.fromisoformat(value)

    return SearchDocument(
        doc_id=body["doc_id"], cube_id=body["cube_id"], tenant=body["tenant"],
        owner=body["owner"], created_by=body["created_by"], kind=body["kind"],
        semantic_type=body["semantic_type"], labels=tuple(body["labels"]),
        shared_with=tuple(body["shared_with"]),
        text=(decompress_text(base64.b64decode(body["archived"]))
              if unarchived and body.get("archived") else body["text"]),
        state=body["state"],
        tier=body["tier"], erased=body["erased"], created_at=moment("created_at"),
        updated_at=moment("updated_at"), expires_at=moment("expires_at"),
        version=body["version"], position=body["position"])


def index_action(index: str, doc: SearchDocument,
                 vector: Sequence[float] | None = None) -> dict[str, Any]:
    """A bulk action that stores ``doc`` unless a document of a later position is there."""
    return {"_op_type": "index", "_index": index, "_id": doc.cube_id,
            "version": doc.position, "version_type": "external", "_source": source(doc, vector)}


_MATCH_NONE: dict[str, Any] = {"match_none": {}}
_MATCH_ALL: dict[str, Any] = {"match_all": {}}


def _related(scopes: frozenset[str], subject: str) -> dict[str, Any]:
    if "any" in scopes:
        return _MATCH_ALL
    terms = [{"term": {field: subject}} for scope, field in (
        ("own", "created_by"), ("shared", "shared_with"), ("about_self", "owner"))
        if scope in scopes]
    return {"bool": {"should": terms, "minimum_should_match": 1}} if terms else _MATCH_NONE


def _readable(scope: AccessScope, restricted: frozenset[str]) -> dict[str, Any]:
    clauses = [{"term": {"tenant": scope.tenant}}, _related(scope.content, scope.subject)]
    if restricted and "any" not in scope.sensitive:
        clauses.append({"bool": {"should": [
            {"bool": {"must_not": [{"terms": {"labels": sorted(restricted)}}]}},
            _related(scope.sensitive, scope.subject),
        ], "minimum_should_match": 1}})
    return {"bool": {"filter": clauses}}


def policy_filters(query: SearchQuery) -> list[dict[str, Any]]:
    """Everything but the text match, as ``bool.filter`` clauses (no effect on scores)."""
    filters: list[dict[str, Any]] = [
        {"term": {"state": ACTIVE}},
        {"term": {"erased": False}},
        {"bool": {"must_not": [{"term": {"tier": COLD_ARCHIVE}}]}},
        {"bool": {"should": [
            {"bool": {"must_not": [{"exists": {"field": "expires_at"}}]}},
            {"range": {"expires_at": {"gt": query.now.isoformat()}}},
        ], "minimum_should_match": 1}},
        {"bool": {"should": [_readable(scope, query.restricted_labels)
                             for scope in query.scopes] or [_MATCH_NONE],
                  "minimum_should_match": 1}},
    ]
    for field, value in (("kind", query.kind), ("semantic_type", query.semantic_type),
                         ("owner", query.owner)):
        if value is not None:
            filters.append({"term": {field: value}})
    filters.extend({"term": {"labels": label}} for label in query.labels)
    created: dict[str, str] = {}
    if query.since is not None:
        created["gte"] = query.since.isoformat()
    if query.until is not None:
        created["lt"] = query.until.isoformat()
    if created:
        filters.append({"range": {"created_at": created}})
    return filters


def text_query(query: SearchQuery) -> dict[str, Any]:
    """BM25 over the text (any of the terms), inside the policy filters."""
    return {"bool": {
        "must": [{"match": {"text": {"query": " ".join(query.terms), "operator": "or"}}}],
        "filter": policy_filters(query),
    }}


def knn_query(query: SearchQuery, vector: Sequence[float]) -> dict[str, Any]:
    return {"field": "vector", "query_vector": list(vector), "k": query.k,
            "num_candidates": max(_KNN_CANDIDATES, query.k), "filter": policy_filters(query)}


class ElasticsearchIndex(SearchIndex):
    name = "elasticsearch"

    def __init__(self, client: Elasticsearch, *, prefix: str = DEFAULT_PREFIX,
                 dimensions: int | None = None) -> None:
        self.client = client
        self.alias = prefix
        self.dimensions = dimensions
        self._rebuilding: str | None = None

    @classmethod
    def connect(cls, url: str, *, prefix: str = DEFAULT_PREFIX,
                dimensions: int | None = None) -> ElasticsearchIndex:
        from elasticsearch import Elasticsearch

        return cls(Elasticsearch(url), prefix=prefix, dimensions=dimensions)

    # -- the physical indices behind the alias -----------------------------------------------

    def _new_index(self) -> str:
        name = f"{self.alias}-{uuid.uuid4().hex[:12]}"
        self.client.indices.create(index=name, mappings=mapping(self.dimensions))
        return name

    def _current(self) -> list[str]:
        if not self.client.indices.exists_alias(name=self.alias):
            return []
        return sorted(self.client.indices.get_alias(name=self.alias))

    def ensure(self) -> None:
        """Create the first index behind the alias if there is none; give an index created by
        an earlier release the fields added since (adding a field is all its mapping allows)."""
        if not self._current():
            self.client.indices.update_aliases(actions=[
                {"add": {"index": self._new_index(), "alias": self.alias}}])
        else:
            self.client.indices.put_mapping(index=self.alias,
                                            properties={"archived": ARCHIVED_FIELD})

    @property
    def write_index(self) -> str:
        return self._rebuilding or self.alias

    def begin_rebuild(self) -> None:
        self._rebuilding = self._new_index()

    def finish_rebuild(self) -> None:
        """Point the alias at the rebuilt index (atomically) and drop the old ones."""
        assert self._rebuilding is not None, "no rebuild in progress"
        new, self._rebuilding = self._rebuilding, None
        old = self._current()
        self.client.indices.refresh(index=new)
        self.client.indices.update_aliases(actions=[
            *({"remove": {"index": name, "alias": self.alias}} for name in old),
            {"add": {"index": new, "alias": self.alias}}])
        for name in old:
            self.client.indices.delete(index=name)

    def abandon_rebuild(self) -> None:
        if self._rebuilding is not None:
            self.client.indices.delete(index=self._rebuilding, ignore_unavailable=True)
            self._rebuilding = None

    def refresh(self) -> None:
        self.client.indices.refresh(index=self.alias)

    def drop(self) -> None:
        for name in self._current():
            self.client.indices.delete(index=name)

    # -- writing -----------------------------------------------------------------------------

    def write(self, docs: Sequence[SearchDocument],
              vectors: Sequence[Sequence[float] | None] | None = None) -> None:
        from elasticsearch import helpers

        if not docs:
            return
        vectors = vectors or [None] * len(docs)
        _, errors = helpers.bulk(
            self.client, [index_action(self.write_index, d, v) for d, v in zip(
                docs, vectors, strict=True)],
            raise_on_error=False, stats_only=False)
        # 409: the stored document is as new or newer (a replay): exactly what must happen.
        failed = [e for e in errors if isinstance(e, dict)  # type: ignore[union-attr]
                  and next(iter(e.values())).get("status") != 409]
        if failed:
            raise RuntimeError(f"Elasticsearch refused {len(failed)} documents: {failed[:3]}")

    def loaded(self, cube_ids: Sequence[str]) -> dict[str, SearchDocument]:
        if not cube_ids:
            return {}
        found = self.client.mget(index=self.write_index, ids=list(cube_ids), realtime=True)
        return {d["_id"]: document_from(d["_source"], unarchived=True)
                for d in found["docs"] if d.get("found")}

    def about_subject(self, tenant: str, subject: str) -> dict[str, SearchDocument]:
        self.client.indices.refresh(index=self.write_index)
        found = self.client.search(index=self.write_index, size=_SUBJECT_PAGE, query={
            "bool": {"filter": [{"term": {"tenant": tenant}}, {"term": {"owner": subject}}]}})
        return {h["_id"]: document_from(h["_source"], unarchived=True)
                for h in found["hits"]["hits"]}

    # -- the port ----------------------------------------------------------------------------

    def search(self, query: SearchQuery) -> list[SearchHit]:
        if not query.terms:
            return []
        found = self.client.search(index=self.alias, query=text_query(query), size=query.k,
                                   sort=[{"_score": "desc"}, {"doc_id": "asc"}],
                                   source=HIT_SOURCE, track_total_hits=False)
        return hits_from(found)

    def nearest(self, query: SearchQuery, vector: Sequence[float], model: str) -> list[SearchHit]:
        found = self.client.search(index=self.alias, knn=knn_query(query, vector),
                                   size=query.k, source=HIT_SOURCE)
        return hits_from(found)

    def unembedded(self, model: str, limit: int) -> list[Candidate]:
        return []  # vectors are written with the documents

    def store_vectors(self, model: str, rows: Sequence[tuple[Candidate, bytes]]) -> int:
        return 0  # vectors are written with the documents

    def documents(self, cube_ids: Sequence[str]) -> dict[str, SearchDocument]:
        if not cube_ids:
            return {}
        found = self.client.mget(index=self.alias, ids=list(cube_ids))
        return {d["_id"]: document_from(d["_source"]) for d in found["docs"] if d.get("found")}


class ElasticsearchProjection(Projection):
    """Folds events into documents (as ``SearchProjection`` does) and writes them to
    Elasticsearch; its checkpoint is in the database, its rows are not."""

    name = ES_PROJECTION
    tables = ()
    revision = 1
    """Keep at 1: its documents live in Elasticsearch, where only ``rebuild_elasticsearch``
    swaps in the index a rebuild fills; the rebuild on open (``Projection.revision``) would
    not."""

    def __init__(self, index: ElasticsearchIndex, embed: Any = None) -> None:
        self.index = index
        self.embed = embed
        """``texts -> vectors`` (the semantic extra), or None for text search only."""

    def apply(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        changed = apply_to_documents(events, self.index.loaded, self.index.about_subject)
        docs = list(changed.values())
        vectors = None
        if self.embed is not None:
            live = [d for d in docs if d.searchable and d.text]
            by_id = dict(zip([d.cube_id for d in live], self.embed([d.text for d in live]),
                             strict=True))
            vectors = [by_id.get(d.cube_id) for d in docs]
        self.index.write(docs, vectors)

    def reset(self, conn: Connection) -> None:
        self.index.begin_rebuild()


def elasticsearch_runner(store: EventStore, index: ElasticsearchIndex,
                         embed: Any = None) -> ProjectionRunner:
    index.ensure()
    return ProjectionRunner(store, [ElasticsearchProjection(index, embed)])


def rebuild_elasticsearch(runner: ProjectionRunner) -> int:
    """Replay the log into a new index and swap the alias to it; returns the events applied."""
    [projection] = runner.projections
    assert isinstance(projection, ElasticsearchProjection)
    try:
        applied = runner.rebuild([ES_PROJECTION])
    except BaseException:
        projection.index.abandon_rebuild()
        raise
    projection.index.finish_rebuild()
    return applied
