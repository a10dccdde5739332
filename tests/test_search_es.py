"""The Elasticsearch backend's mapping, bulk actions and query building, without a server.

The contract suite (tests/test_search.py) runs against a real server when ``MEMWARDEN_ES_URL``
is set. Here, the policy filters it sends are checked for meaning: a small evaluator of the
query DSL subset they use runs them over the documents of a random workload, and must select
exactly what the SQLite index selects for the same ``SearchQuery``. The backend's fold is run
over a dict of stored bodies to check that a cold-archived document keeps no plaintext.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from eventstore import ANY_VERSION, EventContext, NewEvent, utcnow
from governance import MemWarden, Settings
from projections import ProjectionRunner
from projections._search import (
    MEMORY_EXPIRED,
    MEMORY_TIER_CHANGED,
    SCOPES,
    AccessScope,
    SearchDocument,
    SearchQuery,
    open_search_index,
    search_docs,
)
from projections._search_es import (
    HIT_SOURCE,
    ElasticsearchIndex,
    ElasticsearchProjection,
    document_from,
    hits_from,
    index_action,
    knn_query,
    mapping,
    policy_filters,
    source,
    text_query,
)


def test_the_mapping_is_strict_keyword_filters_english_text() -> None:
    properties = mapping()["properties"]
    assert mapping()["dynamic"] == "strict"
    for name in ("tenant", "owner", "created_by", "labels", "shared_with", "state", "tier"):
        assert properties[name] == {"type": "keyword"}
    assert properties["text"] == {"type": "text", "analyzer": "english"}
    assert properties["archived"] == {"type": "binary"}  # not indexed: never searched
    assert properties["expires_at"] == {"type": "date"}
    assert "vector" not in properties
    assert mapping(384)["properties"]["vector"] == {
        "type": "dense_vector", "dims": 384, "index": True, "similarity": "cosine"}


# -- a workload, on SQLite ---------------------------------------------------------------------

SUBJECTS = ("agent:a", "agent:b", "user:c")
TENANTS = ("acme", "globex")
LABELS = ("sensitive", "medical", "travel")


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemWarden]:
    url = f"sqlite:///{tmp_path_factory.mktemp('es') / 'memwarden.db'}"
    chance = random.Random(9)
    with MemWarden.open(actor="admin:test", settings=Settings(db_url=url, pii_scan=False)) as mw:
        for n in range(60):
            labels = chance.sample(LABELS, chance.randint(0, 2))
            metadata: dict[str, Any] = {
                "labels": labels, "shared_with": chance.sample(SUBJECTS, chance.randint(0, 2)),
                "semantic_type": chance.choice(("fact", "preference"))}
            if n % 7 == 0:
                metadata["ttl_seconds"] = 3600 * chance.randint(1, 48)
            state = mw.acting_as(chance.choice(SUBJECTS)).add(
                f"memo {n}", tenant=chance.choice(TENANTS), owner=chance.choice(SUBJECTS),
                metadata=metadata)
            roll = chance.random()
            if roll < 0.1:
                mw.delete(state.cube_id, reason="test")
            elif roll < 0.2:
                _event(mw, state.cube_id, state.tenant, MEMORY_EXPIRED, {"rule": "r"})
            elif roll < 0.3:
                _event(mw, state.cube_id, state.tenant, MEMORY_TIER_CHANGED,
                       {"from_tier": "working", "to_tier": "cold_archive", "rule": "r"})
        yield mw


def _event(mw: MemWarden, stream: str, tenant: str, kind: str, payload: dict[str, Any]) -> None:
    mw.store.append(stream, [NewEvent(kind, payload)], expected_version=ANY_VERSION,
                    context=EventContext(actor="worker:test", tenant=tenant),
                    then=mw.projector.project_new_events)


# -- an evaluator of the query DSL subset the backend sends -------------------------------------


def _values(body: dict[str, Any], field: str) -> list[Any]:
    value = body.get(field)
    return value if isinstance(value, list) else [] if value is None else [value]


def _compare(value: Any, bound: Any) -> tuple[Any, Any]:
    if isinstance(bound, str):
        return datetime.fromisoformat(value), datetime.fromisoformat(bound)
    return value, bound


def matches(clause: dict[str, Any], body: dict[str, Any]) -> bool:
    [(kind, spec)] = clause.items()
    if kind == "match_all":
        return True
    if kind == "match_none":
        return False
    if kind == "match":
        return True  # every document of the workload holds the word searched
    if kind == "term":
        [(field, value)] = spec.items()
        return value in _values(body, field)
    if kind == "terms":
        [(field, values)] = spec.items()
        return any(v in values for v in _values(body, field))
    if kind == "exists":
        return body.get(spec["field"]) is not None
    if kind == "range":
        [(field, bounds)] = spec.items()
        if body.get(field) is None:
            return False
        tests = {"gt": lambda a, b: a > b, "gte": lambda a, b: a >= b, "lt": lambda a, b: a < b}
        return all(tests[op](*_compare(body[field], bound)) for op, bound in bounds.items())
    if kind == "bool":
        must = [*spec.get("must", ()), *spec.get("filter", ())]
        should = spec.get("should", ())
        return (all(matches(c, body) for c in must)
                and not any(matches(c, body) for c in spec.get("must_not", ()))
                and (not should or sum(matches(c, body) for c in should)
                     >= spec.get("minimum_should_match", 1)))
    raise AssertionError(f"the evaluator does not know {kind!r}")


def _random_query(chance: random.Random) -> SearchQuery:
    def scopes() -> frozenset[str]:
        return frozenset(chance.sample(SCOPES, chance.randint(0, 2)))

    scopes_of = tuple(AccessScope(tenant, chance.choice(SUBJECTS), scopes(), scopes())
                      for tenant in chance.sample(TENANTS, chance.randint(0, 2)))
    return SearchQuery(
        "memo", scopes_of, utcnow() + timedelta(hours=chance.choice((0, 24, 72))), k=100,
        restricted_labels=frozenset(chance.sample(LABELS, chance.randint(0, 2))),
        semantic_type=chance.choice((None, "fact")),
        labels=tuple(chance.sample(LABELS, chance.choice((0, 0, 1)))),
        owner=chance.choice((None, None, *SUBJECTS)))


def test_the_policy_filters_select_what_the_sql_index_selects(workload: MemWarden) -> None:
    index = open_search_index(workload.store.engine)
    with workload.store.engine.connect() as conn:
        ids = list(conn.execute(select(search_docs.c.cube_id)).scalars())
    docs = index.documents(ids)
    chance = random.Random(4)
    non_trivial = 0
    for _ in range(200):
        query = _random_query(chance)
        expected = {hit.cube_id for hit in index.search(query)}
        body = text_query(query)
        found = {cube_id for cube_id, doc in docs.items() if matches(body, source(doc))}
        assert found == expected, query
        knn = knn_query(query, [0.0])
        assert {c for c, d in docs.items()
                if all(matches(f, source(d)) for f in knn["filter"])} == expected
        non_trivial += 0 < len(expected) < len(docs)
    assert non_trivial > 20  # the queries told documents apart, not all or nothing


def test_documents_round_trip_and_bulk_actions_version_by_position(
        workload: MemWarden) -> None:
    index = open_search_index(workload.store.engine)
    with workload.store.engine.connect() as conn:
        first = conn.execute(select(search_docs.c.cube_id).limit(1)).scalar_one()
    doc = index.documents([first])[first]
    assert document_from(source(doc)) == doc
    action = index_action("memwarden-search", doc, [0.5, 0.5])
    assert action["_id"] == doc.cube_id
    assert action["version"] == doc.position and action["version_type"] == "external"
    assert ("vector" in action["_source"]) == doc.searchable

    # A search's hits carry their documents, read from the response (vector left out).
    body = {key: value for key, value in action["_source"].items()
            if key not in HIT_SOURCE["excludes"]}
    [hit] = hits_from({"hits": {"hits": [{"_id": doc.cube_id, "_score": 2.5, "_source": body}]}})
    assert (hit.cube_id, hit.score, hit.document) == (doc.cube_id, 2.5, doc)


def test_policy_filters_never_score() -> None:
    query = SearchQuery("window seat", (AccessScope("acme", "agent:a", frozenset({"own"})),),
                        utcnow())
    body = text_query(query)["bool"]
    assert body["must"] == [{"match": {"text": {"query": "window seat", "operator": "or"}}}]
    assert body["filter"] == policy_filters(query)
    nobody = SearchQuery("x", (), utcnow())
    assert {"bool": {"should": [{"match_none": {}}], "minimum_should_match": 1}} in \
        policy_filters(nobody)


class BodiesInMemory(ElasticsearchIndex):
    """The backend's own documents and fold, with a dict of stored bodies for a server."""

    def __init__(self) -> None:
        super().__init__(client=None)  # type: ignore[arg-type]
        self.bodies: dict[str, dict[str, Any]] = {}

    def write(self, docs: Sequence[SearchDocument],
              vectors: Sequence[Sequence[float] | None] | None = None) -> None:
        self.bodies.update({doc.cube_id: index_action("index", doc)["_source"] for doc in docs})

    def loaded(self, cube_ids: Sequence[str]) -> dict[str, SearchDocument]:
        return {c: document_from(self.bodies[c], unarchived=True)
                for c in cube_ids if c in self.bodies}

    def about_subject(self, tenant: str, subject: str) -> dict[str, SearchDocument]:
        return {c: document_from(body, unarchived=True) for c, body in self.bodies.items()
                if (body["tenant"], body["owner"]) == (tenant, subject)}


def test_a_cold_document_keeps_no_plaintext_until_a_recall_puts_it_back(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'memwarden.db'}"
    with MemWarden.open(actor="admin:test", settings=Settings(db_url=url, pii_scan=False)) as mw:
        cube = mw.add("aisle seat, never the window", tenant="acme", owner="user:ana").cube_id
        index = BodiesInMemory()
        runner = ProjectionRunner(mw.store, [ElasticsearchProjection(index)])
        runner.create_schema()

        def moved(from_tier: str, to_tier: str) -> dict[str, Any]:
            _event(mw, cube, "acme", MEMORY_TIER_CHANGED,
                   {"from_tier": from_tier, "to_tier": to_tier, "rule": "r"})
            runner.catch_up()
            return index.bodies[cube]

        cold = moved("working", "cold_archive")
        assert "aisle" not in json.dumps(cold) and cold["text"] == ""
        assert "archived" in HIT_SOURCE["excludes"]  # not returned with hits either
        assert document_from(cold).text == ""
        assert document_from(cold, unarchived=True).text == "aisle seat, never the window"

        warm = moved("cold_archive", "working")
        assert warm["text"] == "aisle seat, never the window" and "archived" not in warm

        moved("working", "cold_archive")
        mw.erase_subject("user:ana", tenant="acme", reason="article 17 request")
        runner.catch_up()
        erased = index.bodies[cube]
        assert erased["erased"] and "archived" not in erased
        assert document_from(erased, unarchived=True).text == ""
