"""Policy-aware memory search: what a principal may find, ranked, masked and audited.

    results = mw.search("which seat does Aiko like?", k=5, mode="hybrid")

How a search runs
  1. The access policy becomes part of the query. For each tenant searched, the policy is asked
     which relations to the reader (``any``, ``own``, ``shared``, ``about_self``) allow
     ``memory.read_content``, and which allow ``memory.read_sensitive`` (for memories with a
     restricted label); the index compiles that, with the lifecycle filters (deleted, expired,
     past its time to live, cold archive, erased) and the caller's filters, into the very query
     that ranks. Nothing the reader may not see is ever ranked, so no page comes back short.
  2. Ranking, by mode:
     ``bm25``     the index's full-text ranking (FTS5 bm25, PostgreSQL ts_rank_cd, ES BM25);
     ``semantic`` cosine similarity of all-MiniLM-L6-v2 embeddings (the semantic extra);
     ``hybrid``   both lists fused by reciprocal rank fusion (Cormack et al., 2009):
                  score(d) = sum over lists of 1 / (60 + rank of d in that list),
                  each list ``HYBRID_DEPTH`` deep. Ranks, not raw scores, are fused, so BM25's
                  unbounded scores and cosine similarities need no calibration.
  3. Every hit is checked once more at the enforcement point (``AccessPolicy.permitted``), its
     snippet is cut from the text and masked for a reader without ``memory.read_sensitive``.
  4. The search is audited: a ``MemorySearched`` event with the SHA-256 of the query (never its
     text, which may hold personal data), the mode, the filters and the result ids, and the
     hits' content reads (``MemoryAccessed``), in one transaction: one commit per search.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from eventstore import (
    ANY_VERSION,
    EventContext,
    EventStore,
    NewEvent,
    StoredEvent,
    StreamAppend,
    utcnow,
)
from eventstore._driver import DriverConnection
from governance._access import reads_stream
from governance._errors import InvalidCommand
from governance._memcube import KINDS, SEMANTIC_TYPES
from governance._policy import READ_CONTENT, READ_SENSITIVE, AccessPolicy
from governance._principal import (
    PLATFORM,
    Principal,
    Resource,
    is_restricted_label,
    validate_name,
)
from governance._search_semantic import (
    Embedder,
    SentenceTransformerEmbedder,
    semantic_available,
)
from governance._sensitive import SensitiveData
from projections import MEMORY_ACCESSED, ProjectionRunner
from projections._search import (
    MAX_K,
    SCOPES,
    AccessScope,
    SearchDocument,
    SearchHit,
    SearchIndex,
    SearchQuery,
    open_search_index,
    search_docs,
)

MEMORY_SEARCHED = "MemorySearched"
MODES = ("bm25", "semantic", "hybrid")
RRF_K = 60
"""Reciprocal rank fusion's constant: damps the weight of the very first ranks."""
HYBRID_DEPTH = 50
"""How deep each ranked list goes before fusion (at least k)."""
MAX_QUERY_CHARS = 1000
SNIPPET_CHARS = 200
_EMBED_BATCH = 256

Masker = Callable[[Sequence[tuple[str, int, str]]], dict[str, str]]
"""Given ``(cube_id, version, text)`` of memories whose reader lacks ``memory.read_sensitive``,
the texts that have personal data to mask, masked, by cube id."""


def searches_stream(tenant: str | None) -> str:
    return f"searches:{tenant}" if tenant else "searches"


@dataclass(frozen=True, slots=True)
class SearchFilters:
    """What a caller may narrow a search by (every one optional)."""

    tenant: str | None = None
    kind: str | None = None
    semantic_type: str | None = None
    labels: tuple[str, ...] = ()
    owner: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def validated(self) -> SearchFilters:
        if self.tenant is not None:
            validate_name("tenant", self.tenant)
        if self.kind is not None and self.kind not in KINDS:
            raise InvalidCommand(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.semantic_type is not None and self.semantic_type not in SEMANTIC_TYPES:
            raise InvalidCommand(f"semantic type must be one of {', '.join(SEMANTIC_TYPES)}; "
                                 f"got {self.semantic_type!r}")
        for label in self.labels:
            validate_name("label", label)
        if self.owner is not None:
            validate_name("owner", self.owner)
        for name, moment in (("since", self.since), ("until", self.until)):
            if moment is not None and moment.tzinfo is None:
                raise InvalidCommand(f"{name} needs a time zone")
        return self

    def audited(self) -> dict[str, Any]:
        """The filters as the audit event records them (names and times, no free text)."""
        values = {"tenant": self.tenant, "kind": self.kind, "semantic_type": self.semantic_type,
                  "labels": list(self.labels) or None, "owner": self.owner,
                  "since": self.since.isoformat() if self.since else None,
                  "until": self.until.isoformat() if self.until else None}
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True, slots=True)
class SearchResult:
    cube_id: str
    tenant: str
    owner: str
    kind: str
    semantic_type: str
    labels: tuple[str, ...]
    version: int
    score: float
    """Higher is better; comparable within one result list only."""
    snippet: str
    masked: bool
    """Whether personal data was masked in ``snippet`` (the reader lacks read_sensitive)."""
    created_at: datetime
    updated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.cube_id, "tenant": self.tenant, "owner": self.owner, "kind": self.kind,
            "semantic_type": self.semantic_type, "labels": list(self.labels),
            "version": self.version, "score": self.score, "snippet": self.snippet,
            "masked": self.masked, "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass
class MemorySearch:
    """The search service of one backend (store, policy, index), shared by its handles."""

    store: EventStore
    policy: AccessPolicy
    then: Callable[[Connection, list[StoredEvent]], None] | None = None
    index: SearchIndex = field(init=False)
    masker: Masker | None = None
    embedder: Embedder = field(default_factory=SentenceTransformerEmbedder)
    es_url: str | None = None
    """Search Elasticsearch there instead of the database's own full-text index."""
    _es_runner: ProjectionRunner | None = field(init=False, default=None)
    _embedded_generation: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.es_url is None:
            self.index = open_search_index(self.store.engine)
            return
        from projections._search_es import ElasticsearchIndex, elasticsearch_runner

        semantic = semantic_available()
        index = ElasticsearchIndex.connect(
            self.es_url, dimensions=self.embedder.dimensions if semantic else None)
        self._es_runner = elasticsearch_runner(
            self.store, index, self.embedder.embed_floats if semantic else None)
        self._es_runner.create_schema()
        self.index = index

    def catch_up(self) -> None:
        """Bring an index that is not projected with every write (Elasticsearch) up to the log."""
        if self._es_runner is not None and self._es_runner.catch_up():
            self.index.refresh()  # type: ignore[attr-defined]

    def search(self, principal: Principal, text: str, *, k: int = 10, mode: str = "bm25",
               filters: SearchFilters | None = None, tenants: Sequence[str],
               on_behalf_of: str | None = None) -> list[SearchResult]:
        """Search the ``tenants`` (already checked as the principal's to search)."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidCommand("a search needs a query: some words to look for")
        if len(text) > MAX_QUERY_CHARS:
            raise InvalidCommand(f"a query is at most {MAX_QUERY_CHARS} characters")
        if mode not in MODES:
            raise InvalidCommand(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise InvalidCommand(f"k must be between 1 and {MAX_K}")
        filters = (filters or SearchFilters()).validated()
        query = SearchQuery(
            text=text, k=k, now=utcnow(),
            scopes=tuple(self.access_scope(principal, tenant) for tenant in tenants),
            restricted_labels=self.restricted_labels(), kind=filters.kind,
            semantic_type=filters.semantic_type, labels=filters.labels, owner=filters.owner,
            since=filters.since, until=filters.until)
        self.catch_up()
        hits = self.ranked(query, mode)
        results = self._results(principal, hits, query.terms)
        self._audit(principal, on_behalf_of, text, mode, k, filters, results)
        return results

    # -- the policy, as data for the index ------------------------------------------------------

    def access_scope(self, principal: Principal, tenant: str) -> AccessScope:
        """The relations under which ``principal`` may read content (and sensitive content) in
        ``tenant``. The model ORs its scope flags, so these few probes decide every memory."""
        subject = principal.subject
        probes = {
            "any": Resource(tenant, "memory"),
            "own": Resource(tenant, "memory", created_by=subject),
            "shared": Resource(tenant, "memory", shared_with=frozenset({subject})),
            "about_self": Resource(tenant, "memory", owner=subject),
        }
        assert tuple(probes) == SCOPES

        granted = self.policy.permitted_actions(
            principal, (READ_CONTENT, READ_SENSITIVE), list(probes.values()))

        def allowed(action: str) -> frozenset[str]:
            return frozenset(name for name, probe in probes.items() if probe in granted[action])

        return AccessScope(tenant, subject, allowed(READ_CONTENT), allowed(READ_SENSITIVE))

    def restricted_labels(self) -> frozenset[str]:
        """The labels some memory has carried that the policy restricts."""
        with self.store.engine.connect() as conn:
            rows = DriverConnection(conn).execute("SELECT label FROM search_labels").fetchall()
        return frozenset(label for (label,) in rows if is_restricted_label(label))

    def tenants(self) -> list[str]:
        """Every tenant with a memory in the index (a platform principal's search spans them)."""
        with self.store.engine.connect() as conn:
            return list(conn.execute(select(search_docs.c.tenant).distinct()).scalars())

    # -- ranking ------------------------------------------------------------------------------

    def ranked(self, query: SearchQuery, mode: str) -> list[SearchHit]:
        """The hits of ``query`` in ``mode``, best first: ranking alone, nothing recorded (the
        benchmark times it; ``search`` is what callers use)."""
        if mode == "bm25":
            return self.index.search(query)
        if mode == "semantic":
            return self._nearest(query)
        deep = replace(query, k=max(query.k, HYBRID_DEPTH))
        fused = reciprocal_rank_fusion([self.index.search(deep), self._nearest(deep)])
        return fused[:query.k]

    def _nearest(self, query: SearchQuery) -> list[SearchHit]:
        vector = self.embedder.embed_one(query.text)
        self.embed_pending()
        return self.index.nearest(query, vector, self.embedder.model)

    def embed_pending(self, on_progress: Callable[[int], None] | None = None) -> int:
        """Embed every searchable memory whose text has no vector yet; returns how many.
        Vectors are computed on demand, not on the write path: a write never waits for the
        model, and a deployment that never searches semantically never loads it."""
        # Unchanged documents since a complete pass: nothing to look for (the look-up is a scan
        # of every document).
        generation = self.index.documents_generation()
        if generation is not None and self._embedded_generation == generation:
            return 0
        done = 0
        while True:
            pending = self.index.unembedded(self.embedder.model, _EMBED_BATCH)
            if not pending:
                self._embedded_generation = generation
                return done
            vectors = self.embedder.embed([c.text for c in pending])
            self.index.store_vectors(self.embedder.model, list(zip(pending, vectors, strict=True)))
            done += len(pending)
            if on_progress is not None:
                on_progress(done)
            if len(pending) < _EMBED_BATCH:
                # Complete, unless a document changed meanwhile (then its token is newer).
                self._embedded_generation = generation
                return done

    # -- results ------------------------------------------------------------------------------

    def _results(self, principal: Principal, hits: list[SearchHit],
                 terms: list[str]) -> list[SearchResult]:
        # The ranking query read most documents already; only the rest are looked up.
        docs = {hit.cube_id: hit.document for hit in hits if hit.document is not None}
        docs.update(self.index.documents([hit.cube_id for hit in hits if hit.document is None]))
        found = [(hit, docs[hit.cube_id]) for hit in hits if hit.cube_id in docs]
        # The index filtered by policy already; the enforcement point has the last word.
        granted = self.policy.permitted_actions(
            principal, (READ_CONTENT, READ_SENSITIVE), [_resource(doc) for _, doc in found])
        readable = {r.id for r in granted[READ_CONTENT]}
        cleared = {r.id for r in granted[READ_SENSITIVE]}
        found = [(hit, doc) for hit, doc in found if doc.cube_id in readable]
        # Masked before the snippet is cut: findings' offsets are into the whole text. Only the
        # k results are masked, with one look-up of their findings.
        uncleared = [(doc.cube_id, doc.version, doc.text) for _, doc in found
                     if doc.cube_id not in cleared]
        masked = self.masker(uncleared) if self.masker and uncleared else {}
        return [SearchResult(
            cube_id=doc.cube_id, tenant=doc.tenant, owner=doc.owner, kind=doc.kind,
            semantic_type=doc.semantic_type, labels=doc.labels, version=doc.version,
            score=hit.score, snippet=snippet(masked.get(doc.cube_id, doc.text), terms),
            masked=doc.cube_id in masked, created_at=doc.created_at, updated_at=doc.updated_at)
            for hit, doc in found]

    def _audit(self, principal: Principal, on_behalf_of: str | None, text: str, mode: str,
               k: int, filters: SearchFilters, results: list[SearchResult]) -> None:
        tenant = filters.tenant
        payload = {
            "query_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "mode": mode, "k": k, "filters": filters.audited(),
            "result_ids": [r.cube_id for r in results],
        }
        context = EventContext(actor=principal.subject, tenant=tenant, on_behalf_of=on_behalf_of)
        appends = [StreamAppend(searches_stream(tenant), [NewEvent(MEMORY_SEARCHED, payload)],
                                ANY_VERSION, context)]
        # The hits' reads go in the same transaction (not the read buffer): one commit per
        # search, and no search pays for flushing two hundred other reads.
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        at = utcnow().isoformat()
        for result in results:
            by_tenant.setdefault(result.tenant, []).append(
                {"cube_id": result.cube_id, "version": result.version, "at": at})
        appends.extend(
            StreamAppend(reads_stream(result_tenant), [NewEvent(MEMORY_ACCESSED, {"reads": reads})],
                         ANY_VERSION, EventContext(actor=principal.subject, tenant=result_tenant,
                                                   on_behalf_of=on_behalf_of))
            for result_tenant, reads in by_tenant.items())
        self.store.append_many(appends, then=self.then)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[SearchHit]],
                           k: int = RRF_K) -> list[SearchHit]:
    """One list from several, each document scored sum(1 / (k + rank)), rank from 1; ties keep
    the order of first appearance."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.cube_id] = scores.get(hit.cube_id, 0.0) + 1.0 / (k + rank)
    order = sorted(scores, key=lambda cube_id: -scores[cube_id])
    return [SearchHit(cube_id, scores[cube_id]) for cube_id in order]


def snippet(text: str, terms: Sequence[str], width: int = SNIPPET_CHARS) -> str:
    """Up to ``width`` characters of ``text`` around the first query term found in it."""
    if len(text) <= width:
        return text
    lowered = text.lower()
    found = [match.start() for term in terms
             if (match := re.search(rf"\b{re.escape(term[:max(3, len(term) - 2)])}", lowered))]
    start = max(0, min(found) - width // 4) if found else 0
    start = min(start, len(text) - width)
    cut = text[start:start + width]
    return ("…" if start > 0 else "") + cut + ("…" if start + width < len(text) else "")


def _resource(doc: SearchDocument) -> Resource:
    return Resource(doc.tenant, "memory", doc.cube_id, owner=doc.owner,
                    created_by=doc.created_by, labels=frozenset(doc.labels),
                    shared_with=frozenset(doc.shared_with))


def searchable_tenants(search: MemorySearch, principal: Principal,
                       tenant: str | None) -> list[str]:
    """The tenants a search spans: the one given (checked by the caller), else every tenant for
    a platform principal."""
    if tenant is not None:
        return [tenant]
    assert principal.tenant == PLATFORM
    return search.tenants()


def sensitive_data_masker(sensitive: SensitiveData) -> Masker:
    """Masking by the recorded findings and ``policies/pii.yaml`` (``governance._sensitive``)."""

    def mask(items: Sequence[tuple[str, int, str]]) -> dict[str, str]:
        findings = sensitive.queries.findings_for([(cube_id, version)
                                                   for cube_id, version, _ in items])
        return {cube_id: sensitive.mask_text(text, findings[cube_id, version])
                for cube_id, version, text in items if (cube_id, version) in findings}

    return mask
