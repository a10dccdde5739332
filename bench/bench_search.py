"""Memory search (issue 9): latency per backend and mode, indexing throughput, recall@5.

For each available backend (SQLite FTS5; PostgreSQL full text when the test server is reachable;
Elasticsearch when ``MEMWARDEN_ES_URL`` is set) at 10^4 and 10^5 memories:

- indexing: memories/s written and projected (every read model, the search index among them),
  and the search index alone rebuilt from the log; vectors/s embedded (semantic extra);
- search latency, p50 and p95 over ``QUERIES`` queries, at two levels: the index port alone
  (the policy already compiled into the query), and ``MemWarden.search`` end to end (policy
  probes, ranking, the enforcement point's check of every hit, masking, the audit event);
- modes: bm25 everywhere; semantic and hybrid (semantic extra) at 10^4, and at 10^5 with
  ``--full`` (embedding 10^5 texts on a CPU takes long). ``--modes semantic,hybrid`` (or
  ``MEMWARDEN_BENCH_SEARCH_MODES``) measures only those modes; the memories are written and
  indexed all the same.

Embedding: every backend holds the same texts (same seed), so each distinct text is embedded
once per run and its vector written into every backend's vector store by the index's own
``store_vectors`` (``bench._embeddings``); the "embedded" rate is the model's, over the texts it
computed. With ``MEMWARDEN_BENCH_EMBED_CACHE`` set (a folder, or ``1`` for
``~/.cache/memwarden-bench``) the vectors are also cached on disk between runs, keyed by model
and text hash; the run prints how many vectors it computed and how many it reused. Query
embeddings are never cached: they are timed in every semantic search.

The published p95 latencies of Zep (retrieval: 155 ms on LoCoMo, 162 ms on LongMemEval) and
Mem0 (end to end: 1.4 s) are printed beside ours for context. They are not like-for-like: other
datasets, hardware, and their figures include network hops (and for Mem0, an LLM call) that an
embedded MemWarden does not make. Target: p95 <= 20 ms for BM25 at 10^5 memories.

Then recall@5 on the retrieval test set derived from the demo workload
(``governance._search_eval``), per mode: questions in the memories' words and paraphrased ones.

    python -m bench search [--full] [--modes bm25,semantic,hybrid]
    MEMWARDEN_BENCH_EMBED_CACHE=1 python -m bench.bench_search --warm-embedding-cache \
        [COUNT] [--backward]
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from sqlalchemy import text
from sqlalchemy.engine import make_url

from bench._embeddings import CACHE_ENV, SharedEmbeddings, cache_folder, index_pending
from bench._postgres import (
    PG_URL,
    postgres_reachable,
    scratch_postgres_url,
    scratch_sqlite_url,
)
from bench._report import millis, percentile, rate, seeding_progress
from eventstore import EventContext, StreamAppend, utcnow
from governance import Limits, MemCube, MemWarden, Principal, Settings
from governance._search_eval import QUESTIONS, recall_at, seed_retrieval_set
from governance._search_semantic import semantic_available
from projections._search import SearchIndex, SearchQuery

ES_URL = os.environ.get("MEMWARDEN_ES_URL")
SIZES = (10_000, 100_000)
SEMANTIC_SIZES = (10_000,)
QUERIES = 200
SEMANTIC_QUERIES = 50
BATCH = 1000
TENANT, OTHER_TENANT = "acme", "globex"
AGENTS = 10
"""Memories are written by ``AGENTS`` agents in turn: an agent's own scope is a tenth of them."""
TARGET_P95 = 0.020
MODES = ("bm25", "semantic", "hybrid")
MODES_ENV = "MEMWARDEN_BENCH_SEARCH_MODES"


def selected_modes() -> tuple[str, ...]:
    """The modes to measure: ``MEMWARDEN_BENCH_SEARCH_MODES`` (comma-separated; ``python -m
    bench --modes`` sets it), all of them by default."""
    setting = os.environ.get(MODES_ENV, "").strip()
    if not setting:
        return MODES
    wanted = tuple(dict.fromkeys(m.strip() for m in setting.split(",") if m.strip()))
    unknown = [m for m in wanted if m not in MODES]
    if unknown or not wanted:
        raise ValueError(f"{MODES_ENV}={setting!r}: unknown mode(s) {', '.join(unknown)}; "
                         f"known: {', '.join(MODES)}")
    return wanted

PEERS = (
    ("Zep, retrieval p95 (LoCoMo)", 0.155),
    ("Zep, retrieval p95 (LongMemEval)", 0.162),
    ("Mem0, end-to-end p95", 1.4),
)

_FIRST = ("Ana", "Bo", "Carlos", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun", "Kemal",
          "Lena", "Maria", "Nils", "Omar", "Priya", "Quinn", "Raj", "Sara", "Tom", "Uma",
          "Viktor", "Wen", "Ximena", "Yusuf", "Zoe")
_LAST = ("Lopez", "Becker", "Tanaka", "Okafor", "Fischer", "Patel", "Rossi", "Kim", "Nair",
         "Berg", "Haddad", "Petrova", "Sato", "Diaz", "Adeyemi", "Novak", "Silva", "Moreau")
_SLOTS = {
    "food": ("sushi", "ramen", "falafel", "tacos", "risotto", "curry", "dumplings", "paella",
             "oatmeal", "pancakes", "salad", "lasagna", "pho", "burritos", "croissants"),
    "place": ("Lisbon", "Osaka", "Nairobi", "Toronto", "Berlin", "Lima", "Seoul", "Oslo",
              "Cairo", "Denver", "Hanoi", "Porto", "Quito", "Zurich", "Austin"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "thing": ("laptop", "passport", "umbrella", "bicycle", "guitar", "camera", "headphones",
              "notebook", "backpack", "telescope", "kayak", "drone", "printer", "scooter"),
    "topic": ("budget", "contract", "invoice", "roadmap", "hiring", "migration", "audit",
              "launch", "training", "renewal", "security", "pricing", "onboarding"),
}
_TEMPLATES = (
    "{person} prefers {food} for lunch when visiting {place} on {day}.",
    "{person} left the {thing} at the {place} office last {day}.",
    "{person} asked to move the {topic} review to {day} afternoon.",
    "{person} is allergic to {food} and avoids restaurants in {place}.",
    "{person} wants reminders about the {topic} every {day} morning.",
    "{person} travels to {place} with a {thing} for the {topic} workshop.",
    "{person} approved the {topic} plan and ordered a new {thing}.",
    "{person} dislikes {food} but enjoyed the team dinner in {place}.",
)


def _memory(chance: random.Random) -> tuple[str, str, list[str]]:
    """A memory text, its owner, and the words of it a user might search for."""
    person = f"{chance.choice(_FIRST)} {chance.choice(_LAST)}"
    values = {slot: chance.choice(options) for slot, options in _SLOTS.items()}
    template = chance.choice(_TEMPLATES)
    used = [value for slot, value in values.items() if "{" + slot + "}" in template]
    return (template.format(person=person, **values),
            "user:" + person.lower().replace(" ", "."), [person.split()[0], *used])


def _query(chance: random.Random) -> str:
    _, _, words = _memory(chance)
    return " ".join(chance.sample(words, min(len(words), chance.choice((2, 3)))))


@dataclass
class Latency:
    p50: float
    p95: float


def _latency(call: Callable[[int], object], count: int) -> Latency:
    samples = []
    for n in range(count):
        started = time.perf_counter()
        call(n)
        samples.append(time.perf_counter() - started)
    return Latency(percentile(samples, 0.5), percentile(samples, 0.95))


# -- databases --------------------------------------------------------------------------------


def _open(url: str, es_url: str | None = None) -> MemWarden:
    settings = Settings(db_url=url, pii_scan=False, es_url=es_url)
    return MemWarden.open(url, actor="admin:bench", settings=settings)


def _grow(mw: MemWarden, start: int, count: int, chance: random.Random,
          advance: Callable[[int], None]) -> None:
    """Write memories ``start`` .. ``start + count - 1``: ``BATCH`` per transaction, projected
    in it (every read model, as the embedded mode projects a command); one in ten in another
    tenant."""
    limits = Limits()
    for first in range(start, start + count, BATCH):
        appends = []
        for n in range(first, min(first + BATCH, start + count)):
            body, owner, _ = _memory(chance)
            tenant = OTHER_TENANT if n % 10 == 9 else TENANT
            appends.append(StreamAppend(
                f"m-{n:07d}", MemCube.create(owner=owner, kind="plaintext", text=body,
                                             metadata=None, reason=None, limits=limits),
                0, EventContext(actor=f"agent:{n % AGENTS}", tenant=tenant)))
        mw.store.append_many(appends, then=mw.projector.project_new_events)
        advance(len(appends))


# -- one backend ------------------------------------------------------------------------------


@dataclass
class Row:
    backend: str
    size: int
    mode: str
    index: Latency
    sdk: Latency


def _measure(mw: MemWarden, index: SearchIndex, backend: str, size: int, mode: str,
             seed: int) -> Row:
    chance = random.Random(seed)
    count = QUERIES if mode == "bm25" else SEMANTIC_QUERIES
    queries = [_query(chance) for _ in range(count)]
    reader = mw.as_principal(Principal("manager:bench", TENANT, "tenant_admin"))
    search = mw._backend.search  # the service behind MemWarden.search, to time its index alone
    scope = (search.access_scope(reader.principal, TENANT),)
    restricted = search.restricted_labels()

    def at_index(n: int) -> None:
        query = SearchQuery(queries[n], scope, utcnow(), k=10, restricted_labels=restricted)
        if mode == "bm25":
            index.search(query)
        else:
            search.ranked(query, mode)

    for n in range(min(20, count)):  # warm caches (and the model) before timing
        at_index(n)
    index_latency = _latency(at_index, count)
    sdk_latency = _latency(lambda n: reader.search(queries[n], k=10, mode=mode), count)
    mw.flush_reads()
    return Row(backend, size, mode, index_latency, sdk_latency)


def _embed(mw: MemWarden, backend: str, size: int, shared: SharedEmbeddings) -> str:
    """Give every memory not embedded yet its vector (batches of the service's size, with
    progress), computed by ``shared`` unless this run or the disk cache has it; returns the
    "embedded" cell: the model's vectors/s over what it computed here, or where the vectors
    came from. The model is loaded before the clock starts."""
    search = mw._backend.search
    shared.embedder.embed(["warm up"])
    pending = sum(1 for _ in search.index.unembedded(search.embedder.model, size))
    computed, seconds = shared.computed, shared.compute_seconds
    from_run, from_disk = shared.from_run, shared.from_disk
    with seeding_progress() as progress:
        task = progress.add_task(f"{backend}: embedding", total=pending)
        started = time.perf_counter()
        stored = index_pending(search, shared,
                               on_progress=lambda done: progress.update(task, completed=done))
        elapsed = time.perf_counter() - started
    computed, seconds = shared.computed - computed, shared.compute_seconds - seconds
    reused_run, reused_disk = shared.from_run - from_run, shared.from_disk - from_disk
    model_rate = computed / seconds if computed else None
    print(f"{backend}: {stored:,} vectors stored in {elapsed:.0f} s; computed {computed:,}"
          + (f" at {model_rate:.0f}/s (all-MiniLM-L6-v2, CPU)" if model_rate else "")
          + f", reused {reused_run:,} from this run and {reused_disk:,} from the disk cache"
          + (f" ({shared.path})" if shared.path else ""), flush=True)
    if model_rate is not None:
        return rate(model_rate) + ("" if not (reused_run or reused_disk) else " (part reused)")
    return "reused" if stored else "—"


def _analyze(mw: MemWarden) -> None:
    """On PostgreSQL, gather the planner's statistics of the search tables, as autovacuum would
    after a bulk load. The test server runs with autovacuum off, and without statistics the
    planner guesses one row per tenant: a semantic search's look-up of its candidate ids then
    became a nested loop over the tenant's every document (2.9 s for 130 ids at 10^5 memories,
    EXPLAIN ANALYZE, 2026-11-30), which measures the missing statistics, not the search."""
    engine = mw.store.engine
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:
        for table in ("search_docs", "search_vectors"):
            conn.execute(text(f"ANALYZE {table}"))


def _bench_backend(backend: str, url: str, full: bool, modes: tuple[str, ...],
                   shared: SharedEmbeddings | None,
                   es_url: str | None = None) -> tuple[list[Row], list[tuple[str, ...]]]:
    rows: list[Row] = []
    throughput: list[tuple[str, ...]] = []
    chance = random.Random(7)
    semantic_sizes = SIZES if full else SEMANTIC_SIZES
    with _open(url, es_url) as mw:
        index = mw._backend.search.index
        written = 0
        for size in SIZES:
            with seeding_progress() as progress:
                task = progress.add_task(f"{backend}: {size:,} memories", total=size - written)
                started = time.perf_counter()
                _grow(mw, written, size - written, chance,
                      lambda n, task=task: progress.advance(task, n))
                write_rate = (size - written) / (time.perf_counter() - started)
            written = size
            started = time.perf_counter()
            if es_url is None:
                mw.projector.rebuild(["search"])
            else:
                from projections._search_es import rebuild_elasticsearch

                rebuild_elasticsearch(mw._backend.search._es_runner)  # type: ignore[arg-type]
            rebuild_rate = size / (time.perf_counter() - started)
            embed_rate = "—"
            dense = shared is not None and size in semantic_sizes and es_url is None
            if dense:
                assert shared is not None
                embed_rate = _embed(mw, backend, size, shared)
            throughput.append((backend, f"{size:,}", rate(write_rate), rate(rebuild_rate),
                               embed_rate))
            _analyze(mw)
            for mode in modes:
                if mode == "bm25" or dense:
                    rows.append(_measure(mw, index, backend, size, mode, seed=size))
    return rows, throughput


# -- tables -----------------------------------------------------------------------------------


def _latency_table(rows: list[Row]) -> Table:
    table = Table(title="Search latency (k = 10, a tenant_admin reading one tenant)",
                  title_justify="left", caption=(
                      "index: the SearchIndex port with the policy compiled into the query; "
                      "SDK: MemWarden.search end to end (policy, ranking, per-hit check, "
                      "masking, audit event)."), caption_justify="left")
    for column in ("backend", "memories", "mode", "index p50", "index p95", "SDK p50",
                   "SDK p95", "target"):
        table.add_column(column, justify="left" if column in ("backend", "mode", "target")
                         else "right")
    for row in rows:
        target = ""
        if row.mode == "bm25" and row.size == max(SIZES):
            met = row.index.p95 <= TARGET_P95
            target = (f"index p95 <= {millis(TARGET_P95)}: "
                      f"{'[green]met[/green]' if met else '[red]missed[/red]'}")
        table.add_row(row.backend, f"{row.size:,}", row.mode, millis(row.index.p50),
                      millis(row.index.p95), millis(row.sdk.p50), millis(row.sdk.p95), target)
    return table


def _peer_table(rows: list[Row]) -> Table:
    table = Table(title="For context: published p95 latencies of Zep and Mem0",
                  title_justify="left", caption=(
                      "Not like-for-like: other datasets and hardware, and the peers' figures "
                      "include network hops (Mem0's an LLM call) that embedded MemWarden does "
                      "not make."), caption_justify="left")
    for column in ("ours (SDK p95, largest size)", "ours", "peer", "peer p95", "ratio ours/peer"):
        table.add_column(column, justify="right" if column != "peer" and "ours (" not in column
                         else "left")
    largest: dict[tuple[str, str], Row] = {}
    for row in rows:
        key = (row.backend, row.mode)
        if key not in largest or row.size > largest[key].size:
            largest[key] = row
    for (backend, mode), row in largest.items():
        for peer, p95 in PEERS:
            table.add_row(f"{backend} {mode} at {row.size:,}", millis(row.sdk.p95), peer,
                          millis(p95), f"{row.sdk.p95 / p95:.3f}")
    return table


def _recall_table(console: Console, wanted: tuple[str, ...]) -> Table:
    table = Table(title="recall@5 on the demo retrieval set (governance._search_eval, SQLite)",
                  title_justify="left")
    for column in ("mode", "questions in the memories' words", "paraphrased questions"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    lexical = [q for q in QUESTIONS if not q.paraphrased]
    paraphrased = [q for q in QUESTIONS if q.paraphrased]
    modes = [m for m in wanted if m == "bm25" or semantic_available()]
    with scratch_sqlite_url() as url, _open(url) as mw:
        seed_retrieval_set(mw)
        for mode in modes:
            table.add_row(mode, f"{recall_at(mw, lexical, mode=mode):.2f}",
                          f"{recall_at(mw, paraphrased, mode=mode):.2f}")
    if not semantic_available():
        console.print("semantic and hybrid modes: install the semantic extra "
                      "(pip install 'memwarden[semantic]')")
    return table


def run(console: Console, full: bool) -> None:
    console.rule("[bold]Memory search[/bold]")
    modes = selected_modes()
    shared = None
    if semantic_available() and set(modes) - {"bm25"}:
        from governance._search_semantic import SentenceTransformerEmbedder

        folder = cache_folder()
        shared = SharedEmbeddings(SentenceTransformerEmbedder(), folder)
        console.print(f"modes: {', '.join(modes)}; memory texts embedded once per run and "
                      "shared by the backends; disk cache of embeddings: "
                      + (f"{shared.path} (model {shared.model_key})" if shared.path else
                         f"off (set {CACHE_ENV} to a folder, or 1, to keep them)"))
    rows: list[Row] = []
    throughput: list[tuple[str, ...]] = []
    backends: list[tuple[str, Callable[[], object], str | None]] = [
        ("SQLite FTS5", scratch_sqlite_url, None)]
    if postgres_reachable():
        backends.append(("PostgreSQL FTS", scratch_postgres_url, None))
    else:
        console.print(f"PostgreSQL at {make_url(PG_URL).render_as_string()} is unreachable: "
                      "skipped")
    if ES_URL:
        backends.append(("Elasticsearch", scratch_sqlite_url, ES_URL))
    else:
        console.print("Elasticsearch: MEMWARDEN_ES_URL is not set: skipped")
    for name, database, es_url in backends:
        with database() as url:  # type: ignore[attr-defined]
            found, rates = _bench_backend(name, url, full, modes, shared, es_url)
        rows.extend(found)
        throughput.extend(rates)
    indexing = Table(title="Indexing throughput", title_justify="left", caption=(
        "written: memories/s appended BATCH per transaction and projected into every read "
        "model; rebuilt: the search index alone replayed from the log; embedded: vectors/s "
        "(all-MiniLM-L6-v2 on the CPU) over the texts the model computed, 'reused': vectors "
        "computed earlier in this run or read from the disk cache."), caption_justify="left")
    for column in ("backend", "memories", "written", "search index rebuilt", "embedded"):
        indexing.add_column(column, justify="left" if column == "backend" else "right")
    for line in throughput:
        indexing.add_row(*line)
    console.print(indexing)
    console.print(_latency_table(rows))
    console.print(_peer_table(rows))
    console.print(_recall_table(console, modes))
    if shared is not None:
        console.print(f"embeddings this run: {shared.computed:,} computed, "
                      f"{shared.from_run:,} reused within the run, {shared.from_disk:,} read "
                      "from the disk cache")
        shared.close()


def warm_embedding_cache(count: int = max(SIZES), backward: bool = False) -> None:
    """Fill the disk cache (``MEMWARDEN_BENCH_EMBED_CACHE``, required) with the vectors of the
    first ``count`` memory texts the benchmark writes, in its order, committing every batch:
    the embedding can run ahead of (or be interrupted before) a ``--full`` run, which then
    reads them. ``backward``: from the last batch to the first, so that a ``--full`` run started
    meanwhile (which embeds from the first) meets it rather than computing the same texts.
    Measures nothing."""
    folder = cache_folder()
    if folder is None:
        raise SystemExit(f"set {CACHE_ENV} (a folder, or 1) to warm the embedding cache")
    from governance._search_semantic import SentenceTransformerEmbedder

    chance = random.Random(7)  # the seed and order of _bench_backend's memories
    texts = [_memory(chance)[0] for _ in range(count)]
    shared = SharedEmbeddings(SentenceTransformerEmbedder(), folder)
    with seeding_progress() as progress:
        task = progress.add_task(f"embedding into {shared.path}", total=count)
        firsts = range(0, count, BATCH)
        for first in reversed(firsts) if backward else firsts:
            shared.vectors(texts[first:first + BATCH])
            progress.advance(task, min(BATCH, count - first))
    print(f"{shared.computed:,} computed, {shared.from_disk:,} were cached, "
          f"{shared.from_run:,} repeated texts", flush=True)
    shared.close()


if __name__ == "__main__":
    if "--warm-embedding-cache" in sys.argv[1:]:
        numbers = [int(a) for a in sys.argv[1:] if a.isdigit()]
        warm_embedding_cache(*numbers[:1], backward="--backward" in sys.argv[1:])
    else:
        run(Console(), full="--full" in sys.argv[1:])
