"""Retrieval quality on the demo workload's test set (governance._search_eval): full text finds
what is asked in the memories' own words; semantic search finds what is asked in other words,
where full text cannot. The semantic cases run when the semantic extra is installed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from governance import MemWarden, Settings
from governance._search_eval import QUESTIONS, recall_at, seed_retrieval_set
from governance._search_semantic import semantic_available

LEXICAL = [q for q in QUESTIONS if not q.paraphrased]
PARAPHRASED = [q for q in QUESTIONS if q.paraphrased]
needs_semantic = pytest.mark.skipif(not semantic_available(),
                                    reason="the semantic extra is not installed")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemWarden]:
    url = f"sqlite:///{Path(tmp_path_factory.mktemp('quality')) / 'memwarden.db'}"
    with MemWarden.open(actor="admin:root",
                        settings=Settings(db_url=url, pii_scan=False)) as mw:
        assert seed_retrieval_set(mw) > 0
        yield mw


def test_the_test_set_covers_every_live_demo_memory_both_ways(world: MemWarden) -> None:
    live = {state.cube_id for tenant in ("acme-health", "globex-travel", "initech-hr")
            for state in world.list() if state.tenant == tenant and state.state == "active"
            and state.cube_id.startswith("demo-")}
    assert {q.relevant for q in LEXICAL} == {q.relevant for q in PARAPHRASED} == live


def test_full_text_finds_questions_asked_in_the_memories_words(world: MemWarden) -> None:
    assert recall_at(world, LEXICAL, k=5, mode="bm25") >= 0.9


def test_full_text_alone_misses_most_paraphrases(world: MemWarden) -> None:
    """What the semantic mode is for: the paraphrases share (almost) no word with their memory."""
    assert recall_at(world, PARAPHRASED, k=5, mode="bm25") <= 0.3


@needs_semantic
def test_semantic_search_beats_full_text_on_paraphrased_questions(world: MemWarden) -> None:
    semantic = recall_at(world, PARAPHRASED, k=5, mode="semantic")
    bm25 = recall_at(world, PARAPHRASED, k=5, mode="bm25")
    assert semantic >= bm25 + 0.4, (semantic, bm25)


@needs_semantic
def test_hybrid_keeps_full_text_s_precision_and_gains_paraphrases(world: MemWarden) -> None:
    assert recall_at(world, LEXICAL, k=5, mode="hybrid") >= recall_at(world, LEXICAL, k=5)
    assert (recall_at(world, PARAPHRASED, k=5, mode="hybrid")
            > recall_at(world, PARAPHRASED, k=5, mode="bm25"))
