"""The search index contract (issue 9), run on every backend: SQLite FTS5, PostgreSQL full text,
and Elasticsearch when ``MEMWARDEN_ES_URL`` names a server.

Documents are written through the SDK and the lifecycle events (expiry, tier moves, erasure) are
appended as their owners' workers append them, so the index is fed by the real projection. Then
the port is queried with the policy as data (``SearchQuery.scopes``), as ``MemWarden.search``
does: whatever the policy or the lifecycle excludes must never come back, and excluding it must
not shorten a page.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from eventstore import ANY_VERSION, EventContext, NewEvent, utcnow
from governance import MemWarden, Settings
from projections._search import (
    COLD_ARCHIVE,
    MEMORY_CONTENT_ERASED,
    MEMORY_EXPIRED,
    MEMORY_RECALLED,
    MEMORY_TIER_CHANGED,
    SUBJECT_ERASED,
    AccessScope,
    Candidate,
    SearchIndex,
    SearchQuery,
    coordination_levels,
    open_search_index,
    search_docs,
    search_labels,
)

ES_URL = os.environ.get("MEMWARDEN_ES_URL")
ANYONE = frozenset({"any"})
ALL_SCOPES = frozenset({"any", "own", "shared", "about_self"})


@dataclass
class Backend:
    mw: MemWarden
    index: SearchIndex
    sync: Callable[[], None]
    """Brings the index up to the log (a no-op where it is projected with every write)."""
    rebuild: Callable[[], None]

    def add(self, text: str, *, tenant: str = "acme", owner: str = "user:ana",
            actor: str = "agent:a", cube_id: str | None = None, **metadata: Any) -> str:
        state = self.mw.acting_as(actor).add(text, tenant=tenant, owner=owner, cube_id=cube_id,
                                             metadata=metadata or None)
        return state.cube_id

    def lifecycle(self, stream: str, event_type: str, payload: dict[str, Any],
                  tenant: str = "acme") -> None:
        """Append an event as the retention or erasure worker does."""
        self.mw.store.append(stream, [NewEvent(event_type, payload)],
                             expected_version=ANY_VERSION,
                             context=EventContext(actor="worker:test", tenant=tenant),
                             then=self.mw.projector.project_new_events)

    def search(self, words: str, *, scopes: tuple[AccessScope, ...] | None = None,
               **options: Any) -> list[str]:
        self.sync()
        if scopes is None:
            scopes = (AccessScope("acme", "agent:a", ANYONE, ANYONE),)
        query = SearchQuery(words, scopes,
                            options.pop("now", utcnow()), **options)
        return [hit.cube_id for hit in self.index.search(query)]


def _es_backend(mw: MemWarden) -> Backend:
    if not ES_URL:
        pytest.skip("MEMWARDEN_ES_URL is not set: no Elasticsearch server to run the contract on")
    from projections._search_es import (
        ElasticsearchIndex,
        elasticsearch_runner,
        rebuild_elasticsearch,
    )

    index = ElasticsearchIndex.connect(ES_URL, prefix=f"mw-test-{uuid.uuid4().hex[:8]}")
    runner = elasticsearch_runner(mw.store, index)
    runner.create_schema()

    def sync() -> None:
        runner.catch_up()
        index.refresh()

    return Backend(mw, index, sync, lambda: (rebuild_elasticsearch(runner), None)[1])


@pytest.fixture(params=("sqlite", "postgresql", "elasticsearch"))
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    kind = request.param
    url = request.getfixturevalue("postgres_url" if kind == "postgresql" else "sqlite_url")
    mw = MemWarden.open(actor="admin:test", settings=Settings(db_url=url, pii_scan=False))
    try:
        if kind == "elasticsearch":
            es = _es_backend(mw)
            try:
                yield es
            finally:
                es.index.drop()  # type: ignore[attr-defined]
        else:
            yield Backend(mw, open_search_index(mw.store.engine), lambda: None,
                          lambda: (mw.projector.rebuild(["search"]), None)[1])
    finally:
        mw.close()


# -- ranking ----------------------------------------------------------------------------------


def test_the_better_match_ranks_first_and_non_matches_never_come(backend: Backend) -> None:
    both = backend.add("Ana prefers window seats on long flights")
    one = backend.add("Ana booked a window table for dinner")
    backend.add("Bo likes trains")
    assert backend.search("window seats") == [both, one]
    assert backend.search("submarine") == []


def test_memories_holding_more_of_the_words_rank_first(backend: Backend) -> None:
    """Whatever the per-word scores: the SQL backends rank by coordination level first."""
    every = backend.add("a long note that mentions the kayak once, and Oslo once, among much else")
    repeated = backend.add("kayak kayak kayak")
    assert backend.search("kayak Oslo") == [every, repeated]
    assert backend.search("Oslo kayak", k=1) == [every]


def test_coordination_levels_go_from_every_word_to_any() -> None:
    assert coordination_levels(["a", "b", "c"]) == [
        [("a", "b", "c")], [("a", "b"), ("a", "c"), ("b", "c")], [("a",), ("b",), ("c",)]]
    assert coordination_levels(["a"]) == [[("a",)]]
    many = coordination_levels([str(n) for n in range(8)])
    assert [len(level[0]) for level in many] == [8, 7, 1]  # C(8, 6) = 28 conjunctions: skipped


def test_words_are_stemmed_and_punctuation_is_not_syntax(backend: Backend) -> None:
    seats = backend.add("She always prefers the aisle seat.")
    assert backend.search("preferring seats") == [seats]
    # Quotes, operators and column filters are words here, never query syntax.
    assert backend.search('seat" OR text:* NEAR( -aisle ^') == [seats]


def test_k_bounds_the_page(backend: Backend) -> None:
    for n in range(5):
        backend.add(f"note {n} about the quarterly budget")
    assert len(backend.search("budget", k=3)) == 3
    with pytest.raises(ValueError):
        SearchQuery("budget", (), utcnow(), k=0)


def test_an_update_replaces_the_words_it_is_found_by(backend: Backend) -> None:
    cube_id = backend.add("prefers tea in the morning")
    backend.mw.update(cube_id, text="prefers coffee in the morning")
    assert backend.search("tea") == []
    assert backend.search("coffee") == [cube_id]


# -- policy inside the query ------------------------------------------------------------------


def test_another_tenant_s_memory_never_comes_back(backend: Backend) -> None:
    ours = backend.add("invoice reminder")
    backend.add("invoice invoice invoice reminder reminder", tenant="globex")
    assert backend.search("invoice reminder") == [ours]
    globex = (AccessScope("globex", "agent:a", ANYONE),)
    assert len(backend.search("invoice", scopes=globex)) == 1
    assert backend.search("invoice", scopes=()) == []


def test_relations_decide_what_a_reader_finds(backend: Backend) -> None:
    own = backend.add("project falcon notes", actor="agent:a", owner="user:x")
    shared = backend.add("project falcon budget", actor="agent:b", owner="user:x",
                         shared_with=["agent:a"])
    about = backend.add("project falcon staffing", actor="agent:b", owner="agent:a")
    other = backend.add("project falcon timeline", actor="agent:b", owner="user:x",
                        shared_with=["agent:ab"])  # a name containing ours is not ours

    def found(*relations: str) -> set[str]:
        scope = AccessScope("acme", "agent:a", frozenset(relations))
        return set(backend.search("project falcon", scopes=(scope,)))

    assert found("own") == {own}
    assert found("shared") == {shared}
    assert found("about_self") == {about}
    assert found("own", "shared") == {own, shared}
    assert found("any") == {own, shared, about, other}
    assert found() == set()


def test_restricted_labels_need_the_sensitive_scope(backend: Backend) -> None:
    plain = backend.add("blood test results pending", actor="agent:a")
    sensitive = backend.add("blood test results positive", actor="agent:a",
                            labels=["sensitive", "medical"])
    restricted = frozenset({"sensitive"})

    def found(sensitive_scopes: frozenset[str]) -> set[str]:
        scope = AccessScope("acme", "agent:a", ANYONE, sensitive_scopes)
        return set(backend.search("blood test", scopes=(scope,), restricted_labels=restricted))

    assert found(frozenset()) == {plain}
    assert found(frozenset({"own"})) == {plain, sensitive}
    assert found(frozenset({"about_self"})) == {plain}
    assert found(ANYONE) == {plain, sensitive}


def test_filtering_never_starves_the_page(backend: Backend) -> None:
    """Far better matches the reader may not see are ranked out, not cut from a short page."""
    for n in range(30):
        backend.add(f"orchid orchid orchid care {n}", actor="agent:b")
    mine = [backend.add(f"orchid note {n}", actor="agent:a") for n in range(3)]
    scope = AccessScope("acme", "agent:a", frozenset({"own"}))
    assert sorted(backend.search("orchid", scopes=(scope,), k=3)) == sorted(mine)


# -- lifecycle --------------------------------------------------------------------------------


def test_deleted_memories_return_when_restored(backend: Backend) -> None:
    cube_id = backend.add("gym membership renewal")
    backend.mw.delete(cube_id, reason="asked to")
    assert backend.search("gym membership") == []
    backend.mw.restore(cube_id, reason="mistake")
    assert backend.search("gym membership") == [cube_id]


def test_expired_memories_never_come_back(backend: Backend) -> None:
    expired = backend.add("parking permit number")
    kept = backend.add("parking garage level")
    backend.lifecycle(expired, MEMORY_EXPIRED, {"rule": "ttl-30d", "reason": "ttl elapsed"})
    assert backend.search("parking") == [kept]


def test_a_time_to_live_expires_in_the_query_before_any_worker_runs(backend: Backend) -> None:
    short = backend.add("door code for the office", ttl_seconds=3600)
    assert backend.search("door code") == [short]
    assert backend.search("door code", now=utcnow() + timedelta(hours=2)) == []


def test_cold_archive_is_out_until_recalled_to_a_warmer_tier(backend: Backend) -> None:
    cube_id = backend.add("warranty for the washing machine")
    backend.lifecycle(cube_id, MEMORY_TIER_CHANGED,
                      {"from_tier": "working", "to_tier": "long_term", "rule": "age"})
    assert backend.search("warranty") == [cube_id]
    backend.lifecycle(cube_id, MEMORY_TIER_CHANGED,
                      {"from_tier": "long_term", "to_tier": COLD_ARCHIVE, "rule": "age"})
    assert backend.search("warranty") == []
    backend.lifecycle(cube_id, MEMORY_RECALLED, {"reason": "warranty claim"})
    assert backend.search("warranty") == [cube_id]


def _stored_text(backend: Backend, cube_id: str) -> str:
    with backend.mw.store.engine.connect() as conn:
        return conn.execute(search_docs.select().where(
            search_docs.c.cube_id == cube_id)).mappings().one()["text"]


def _full_text_hits(backend: Backend, word: str) -> int:
    """Rows the database's own full-text index still finds ``word`` in, policy or not; on
    SQLite, also index blocks still holding its bytes (deleted, not yet merged away)."""
    with backend.mw.store.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            stored = conn.execute(text("SELECT count(*) FROM search_fts_data "
                                       "WHERE instr(block, CAST(:w AS BLOB)) > 0"),
                                  {"w": word}).scalar_one()
            return stored + conn.execute(text(
                "SELECT count(*) FROM search_fts WHERE search_fts MATCH :w"),
                {"w": f'"{word}"'}).scalar_one()
        return conn.execute(text("SELECT count(*) FROM search_docs "
                                 "WHERE tsv @@ to_tsquery('english', :w)"),
                            {"w": word}).scalar_one()


def test_content_erasure_purges_the_text_from_the_index(backend: Backend) -> None:
    erased = backend.add("tattoo of a dragon on the left shoulder")
    kept = backend.add("dragon fruit smoothie")
    backend.lifecycle(erased, MEMORY_CONTENT_ERASED, {"reason": "GDPR Art. 17", "rule": None})
    assert backend.search("dragon tattoo shoulder") == [kept]
    assert _stored_text(backend, erased) == ""
    assert _full_text_hits(backend, "tattoo") == 0


def test_subject_erasure_purges_every_memory_about_the_subject(backend: Backend) -> None:
    about = [backend.add(f"zebra crossing note {n}", owner="user:erased") for n in range(3)]
    kept = backend.add("zebra at the zoo", owner="user:kept")
    elsewhere = backend.add("zebra stripes", owner="user:erased", tenant="globex")
    backend.lifecycle("subject:user:erased", SUBJECT_ERASED,
                      {"subject": "user:erased", "tenant": "acme", "reason": "Art. 17"})
    assert backend.search("zebra") == [kept]
    assert all(_stored_text(backend, cube_id) == "" for cube_id in about)
    assert _full_text_hits(backend, "crossing") == 0
    # Erasure in one tenant is not erasure of a namesake in another.
    assert backend.search("zebra", scopes=(AccessScope("globex", "x", ANYONE),)) == [elsewhere]


# -- filters ----------------------------------------------------------------------------------


def test_filters_narrow_inside_the_query(backend: Backend) -> None:
    fact = backend.add("kiwi allergy", semantic_type="fact", labels=["health"], owner="user:a")
    pref = backend.add("kiwi smoothies", semantic_type="preference", labels=["food", "health"],
                       owner="user:b")
    assert backend.search("kiwi", semantic_type="preference") == [pref]
    assert set(backend.search("kiwi", labels=("health",))) == {fact, pref}
    assert backend.search("kiwi", labels=("health", "food")) == [pref]
    assert backend.search("kiwi", owner="user:a") == [fact]
    assert backend.search("kiwi", kind="parametric") == []
    created = backend.mw.get(pref).created_at
    assert set(backend.search("kiwi", since=created)) == {pref}
    assert set(backend.search("kiwi", until=created)) == {fact}


# -- the projection ---------------------------------------------------------------------------


def test_labels_seen_are_listed_for_the_policy(backend: Backend) -> None:
    backend.add("x", labels=["sensitive", "finance"])
    with backend.mw.store.engine.connect() as conn:
        labels = set(conn.execute(search_labels.select()).scalars())
    assert {"sensitive", "finance"} <= labels


def test_a_rebuilt_index_equals_the_incremental_one(backend: Backend) -> None:
    a = backend.add("harbour view apartment", owner="user:erased")
    b = backend.add("harbour cruise booking")
    backend.mw.update(b, text="harbour cruise booking confirmed")
    backend.lifecycle(a, MEMORY_TIER_CHANGED, {"from_tier": "working", "to_tier": "long_term",
                                               "rule": "age"})
    backend.lifecycle("subject:user:erased", SUBJECT_ERASED,
                      {"subject": "user:erased", "tenant": "acme", "reason": "Art. 17"})
    runner = backend.mw.projector
    before, found = runner.digest(), backend.search("harbour cruise")
    backend.rebuild()
    assert runner.digest() == before
    assert backend.search("harbour cruise") == found == [b]
    assert backend.search("apartment view") == []


# -- vectors ----------------------------------------------------------------------------------


def _vector(*values: float) -> bytes:
    import array

    return array.array("f", values).tobytes()


def test_vectors_rank_by_cosine_under_the_same_policy(backend: Backend) -> None:
    if not isinstance(backend.index, type(open_search_index(backend.mw.store.engine))):
        pytest.skip("Elasticsearch stores vectors at indexing time (its own test)")
    near = backend.add("alpha", actor="agent:a")
    far = backend.add("beta", actor="agent:a")
    hidden = backend.add("gamma", actor="agent:b")
    changed = backend.add("delta", actor="agent:a")
    pending = {c.cube_id: c for c in backend.index.unembedded("m", 100)}
    assert set(pending) == {near, far, hidden, changed}
    stored = backend.index.store_vectors("m", [
        (pending[near], _vector(1, 0, 0)), (pending[far], _vector(0, 1, 0)),
        (pending[hidden], _vector(1, 0, 0)), (pending[changed], _vector(1, 0, 0))])
    assert stored == 4 and backend.index.unembedded("m", 100) == []
    # A new version makes its vector stale: it is dropped and asked for again.
    backend.mw.update(changed, text="delta two")
    assert [c.cube_id for c in backend.index.unembedded("m", 100)] == [changed]
    own = (AccessScope("acme", "agent:a", frozenset({"own"})),)
    query = SearchQuery("ignored", own, utcnow(), k=5)
    hits = backend.index.nearest(query, [0.8, 0.6, 0.0], "m")
    assert [hit.cube_id for hit in hits] == [near, far]
    assert hits[0].score == pytest.approx(0.8)
    # A vector computed from text that changed meanwhile is refused.
    stale = Candidate(pending[changed].doc_id, changed, pending[changed].position, "delta")
    assert backend.index.store_vectors("m", [(stale, _vector(1, 0, 0))]) == 0


def test_erasure_drops_the_vectors_derived_from_the_text(backend: Backend) -> None:
    if not isinstance(backend.index, type(open_search_index(backend.mw.store.engine))):
        pytest.skip("Elasticsearch stores vectors at indexing time (its own test)")
    cube_id = backend.add("vector source")
    [candidate] = backend.index.unembedded("m", 10)
    backend.index.store_vectors("m", [(candidate, _vector(1, 0))])
    backend.lifecycle(cube_id, MEMORY_CONTENT_ERASED, {"reason": "Art. 17", "rule": None})
    with backend.mw.store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM search_vectors")).scalar_one() == 0
    assert backend.index.unembedded("m", 10) == []


def _sql_backend_only(backend: Backend) -> None:
    if not isinstance(backend.index, type(open_search_index(backend.mw.store.engine))):
        pytest.skip("Elasticsearch stores vectors at indexing time (its own test)")


def test_vector_search_looks_past_the_nearest_until_k_are_readable(backend: Backend) -> None:
    """The nearest vectors are someone else's: the scan goes on down the ranking, so the page
    still fills (the policy never starves vector results either)."""
    _sql_backend_only(backend)
    others = [backend.add(f"theirs {n}", actor="agent:b") for n in range(12)]
    mine = [backend.add(f"mine {n}", actor="agent:a") for n in range(2)]
    pending = {c.cube_id: c for c in backend.index.unembedded("m", 100)}
    backend.index.store_vectors(
        "m", [(pending[c], _vector(1, 0)) for c in others]
        + [(pending[mine[0]], _vector(0.6, 0.8)), (pending[mine[1]], _vector(0, 1))])
    own = (AccessScope("acme", "agent:a", frozenset({"own"})),)
    hits = backend.index.nearest(SearchQuery("ignored", own, utcnow(), k=1), [1.0, 0.0], "m")
    assert [hit.cube_id for hit in hits] == [mine[0]]
    hits = backend.index.nearest(SearchQuery("ignored", own, utcnow(), k=5), [1.0, 0.0], "m")
    assert [hit.cube_id for hit in hits] == mine


def test_the_vectors_held_in_memory_follow_the_table(backend: Backend) -> None:
    """A search after new vectors sees them; after an erasure the process no longer holds the
    erased text's vector (not just the query skipping it)."""
    _sql_backend_only(backend)
    anyone = (AccessScope("acme", "agent:a", ANYONE),)
    query = SearchQuery("ignored", anyone, utcnow(), k=5)
    first = backend.add("first")
    [candidate] = backend.index.unembedded("m", 10)
    backend.index.store_vectors("m", [(candidate, _vector(0, 1))])
    assert [h.cube_id for h in backend.index.nearest(query, [1.0, 0.0], "m")] == [first]
    second = backend.add("second")
    [candidate] = backend.index.unembedded("m", 10)
    backend.index.store_vectors("m", [(candidate, _vector(1, 0))])
    assert [h.cube_id for h in backend.index.nearest(query, [1.0, 0.0], "m")] == [second, first]
    held = backend.index._vectors["m"]  # type: ignore[attr-defined]
    assert candidate.doc_id in held
    backend.lifecycle(second, MEMORY_CONTENT_ERASED, {"reason": "Art. 17", "rule": None})
    assert [h.cube_id for h in backend.index.nearest(query, [1.0, 0.0], "m")] == [first]
    assert candidate.doc_id not in held
