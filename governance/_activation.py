"""Activation memory: the KV cache of hot memories, precomputed for the base model.

The selected memories, joined one per line after BOS, are run through the base model once; the
key and value tensors of every layer are stored as a content-addressed safetensors file (never a
pickle) and recorded like an adapter: an ``activation`` MemCube version plus
``ActivationMemoryCreated`` with the exact sources, in prefix order. A generation that starts from
the cache skips recomputing the prefix: the benchmark prints the time to first token with and
without it, and the tests check the logits are those of recomputing.

The file holds activations, never the text or its token ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from governance import _basemodel, _lineage
from governance._conversion import ConversionPolicy, Selection
from governance._errors import InvalidCommand, StateConflict
from governance._parametric import plan, safetensors_metadata
from projections import MemoryState
from projections._lineage import ArtifactRecord
from projections._state import ACTIVATION_MEMORY_CREATED

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache

    from governance._sdk import MemWarden

ARTIFACT_FORMAT = "memwarden.kv-cache.v1"
QUERY_ROOM = 256
"""Positions left free after the prefix for what a generation adds."""


@dataclass(frozen=True, slots=True)
class ActivationResult:
    memory: MemoryState
    artifact: str
    selection: Selection
    sources: tuple[MemoryState, ...]
    """The memories in the cache, in prefix order (the hottest that fit the model's context)."""
    prefix_tokens: int


@dataclass
class LoadedActivation:
    record: ArtifactRecord
    base: _basemodel.LoadedBaseModel
    tensors: dict[str, torch.Tensor]
    prefix_tokens: int

    def fresh_cache(self) -> DynamicCache:
        """A cache to start one generation from (a forward pass appends to the one it gets)."""
        return cache_from_tensors(self.base, self.tensors)


def prefix_text(base: _basemodel.LoadedBaseModel, texts: Sequence[str]) -> str:
    return (base.tokenizer.bos_token or "") + "".join(f"{text}\n" for text in texts)


def prefix_ids(base: _basemodel.LoadedBaseModel, texts: Sequence[str]) -> torch.Tensor:
    return base.tokenizer(prefix_text(base, texts), return_tensors="pt",
                          add_special_tokens=False)["input_ids"].to(base.device)


def fitting(base: _basemodel.LoadedBaseModel, texts: Sequence[str]) -> int:
    """How many of ``texts``, in order, fit in the prefix with room for a query."""
    room = int(getattr(base.model.config, "max_position_embeddings", 2048)) - QUERY_ROOM
    count = 0
    while count < len(texts) and prefix_ids(base, texts[:count + 1]).shape[1] <= room:
        count += 1
    return count


def build_cache(base: _basemodel.LoadedBaseModel, texts: Sequence[str]) -> tuple[bytes, int]:
    """The KV cache of ``texts`` as a safetensors file, and the prefix's length in tokens."""
    import torch
    from safetensors.torch import save

    ids = prefix_ids(base, texts)
    with torch.no_grad():
        cache = base.model(input_ids=ids, use_cache=True).past_key_values
    tensors: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(cache.layers):
        tensors[f"layer.{index}.key"] = layer.keys.detach().to("cpu").contiguous()
        tensors[f"layer.{index}.value"] = layer.values.detach().to("cpu").contiguous()
    data = save(tensors, metadata={
        "format": "pt", "memwarden.format": ARTIFACT_FORMAT,
        "memwarden.base_model": base.ref.sha256, "memwarden.layers": str(len(cache.layers)),
        "memwarden.prefix_tokens": str(ids.shape[1]),
        # Lets a consumer check it holds the same prefix, without the file holding the text.
        "memwarden.prefix_sha256": hashlib.sha256(json.dumps(ids[0].tolist()).encode())
        .hexdigest(),
    })
    return data, int(ids.shape[1])


def cache_from_tensors(base: _basemodel.LoadedBaseModel,
                       tensors: dict[str, torch.Tensor]) -> DynamicCache:
    from transformers import DynamicCache

    cache = DynamicCache(config=base.model.config)
    for index in range(len(tensors) // 2):
        cache.update(tensors[f"layer.{index}.key"].to(base.device).clone(),
                     tensors[f"layer.{index}.value"].to(base.device).clone(), index)
    return cache


def read_cache(base: _basemodel.LoadedBaseModel, data: bytes) -> tuple[dict[str, Any], int]:
    from safetensors.torch import load

    meta = safetensors_metadata(data)
    if meta.get("memwarden.format") != ARTIFACT_FORMAT:
        raise StateConflict(f"not a MemWarden KV cache ({meta.get('memwarden.format')!r})")
    if meta.get("memwarden.base_model") != base.ref.sha256:
        raise StateConflict(f"the KV cache was computed by base model "
                            f"{meta.get('memwarden.base_model')}, not {base.ref.sha256} "
                            f"({base.ref.name}): set MEMWARDEN_BASE_MODEL to that model")
    return load(data), int(meta["memwarden.prefix_tokens"])


def next_token_logits(base: _basemodel.LoadedBaseModel, query: str,
                      cache: DynamicCache | None = None,
                      prefix: Sequence[str] = ()) -> torch.Tensor:
    """Logits over ``query``'s positions: after ``cache``, or after recomputing ``prefix``."""
    import torch

    query_ids = base.tokenizer(query, return_tensors="pt",
                               add_special_tokens=False)["input_ids"].to(base.device)
    with torch.no_grad():
        if cache is not None:
            return base.model(input_ids=query_ids, past_key_values=cache).logits
        ids = torch.cat([prefix_ids(base, prefix), query_ids], dim=1)
        return base.model(input_ids=ids).logits[:, -query_ids.shape[1]:]


def convert_activation(mw: MemWarden, *, tenant: str, owner: str | None = None,
                       cube_id: str | None = None, policy: ConversionPolicy | None = None,
                       reason: str | None = None) -> ActivationResult:
    """Precompute the KV cache of the selected memories of ``tenant`` (``owner``)."""
    selection = plan(mw, tenant=tenant, owner=owner, policy=policy)
    if not selection.selected:
        raise InvalidCommand(f"no memory of tenant {tenant} meets the conversion policy "
                             f"({len(selection.excluded)} left out; see --dry-run)")
    base = _basemodel.load(_basemodel.resolve(mw.settings))
    texts = [c.state.text for c in selection.selected]
    count = fitting(base, texts)
    if count == 0:
        raise InvalidCommand("the hottest memory alone is longer than the base model's context")
    sources = tuple(c.state for c in selection.selected[:count])
    data, prefix_tokens = build_cache(base, texts[:count])
    digest = _lineage.artifact_store(mw).put(data)
    memory = _lineage.record_artifact(
        mw, kind="activation", tenant=tenant, owner=owner or f"tenant:{tenant}",
        cube_id=cube_id or _lineage.default_cube_id("activation", tenant, owner),
        digest=digest, sources=sources, created_type=ACTIVATION_MEMORY_CREATED,
        description=(f"KV cache sha256:{digest} of {len(sources)} memories "
                     f"({prefix_tokens} tokens) for base model {base.ref.name}"),
        detail={"base_model": base.ref.sha256, "base_model_name": base.ref.name,
                "prefix_tokens": prefix_tokens, "device": str(base.device),
                "size_bytes": len(data)},
        reason=reason or "precomputed the KV cache of hot memories")
    return ActivationResult(memory, digest, selection, sources, prefix_tokens)


def load_activation(mw: MemWarden, ident: str) -> LoadedActivation:
    """The KV cache of ``ident`` (an activation memory or artifact digest), through the gate."""
    record, data = _lineage.loadable(mw, ident, kind="activation")
    base = _basemodel.load(_basemodel.resolve(mw.settings))
    tensors, prefix_tokens = read_cache(base, data)
    return LoadedActivation(record, base, tensors, prefix_tokens)
