"""Parametric memory: hot plaintext memories distilled into a LoRA adapter (PEFT, torch).

``convert_parametric`` selects memories by the conversion policy, fine-tunes a LoRA adapter on
their text over the base model (on the GPU when there is one), measures what changed (loss and
perplexity of the sources, and of unrelated held-out texts, before and after), stores the adapter
as a content-addressed safetensors file and records it: a ``parametric`` MemCube version plus
``ParametricMemoryCreated`` with the exact source versions. ``load_adapter`` is the only way back
into a model, through the lineage gate (taint, permissions, file hash, base model).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from governance import _basemodel, _lineage
from governance._conversion import ConversionPolicy, Selection, TrainingParameters, select
from governance._errors import InvalidCommand, StateConflict
from governance._principal import Resource, validate_tenant
from projections import MemoryState
from projections._lineage import ArtifactRecord
from projections._state import PARAMETRIC_MEMORY_CREATED

if TYPE_CHECKING:
    from peft import PeftModel

    from governance._sdk import MemWarden

ARTIFACT_FORMAT = "memwarden.lora-adapter.v1"
HELD_OUT_TEXTS = (
    "The museum opens at nine on weekdays and at ten on Sundays.",
    "Rain is expected in the north tomorrow, with clearer skies by the evening.",
    "Boil the pasta for eleven minutes, then drain it and add the sauce.",
    "The committee will publish its annual report at the end of the quarter.",
    "A bicycle chain needs oil every few hundred kilometres.",
    "The library lends up to twelve books at a time for three weeks.",
)
"""Unrelated to any memory: what the adapter does to them shows what else it changed."""
MAX_TOKENS_PER_TEXT = 512
BATCH_SIZE = 8

StepCallback = Callable[[int, int, float], None]
"""Called after each training step with (step, steps, loss)."""


@dataclass(frozen=True, slots=True)
class TrainedAdapter:
    data: bytes
    """The safetensors file: LoRA weights, with the hyperparameters in its metadata."""
    metrics: dict[str, float]
    device: str


@dataclass(frozen=True, slots=True)
class ParametricResult:
    memory: MemoryState
    """The parametric MemCube, at the version that holds this adapter."""
    artifact: str
    selection: Selection
    metrics: dict[str, float]


@dataclass
class LoadedAdapter:
    record: ArtifactRecord
    model: PeftModel
    """The base model with the adapter applied, in eval mode."""
    base: _basemodel.LoadedBaseModel


def mean_loss(model: Any, base: _basemodel.LoadedBaseModel, texts: Sequence[str]) -> float:
    """Mean next-token cross-entropy over every token of ``texts`` (not over batches)."""
    import torch

    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(texts), BATCH_SIZE):
            batch, labels = _basemodel.encode(base, list(texts[start:start + BATCH_SIZE]),
                                              max_tokens=MAX_TOKENS_PER_TEXT)
            count = int((labels[:, 1:] != -100).sum())
            total += float(model(**batch, labels=labels).loss) * count
            tokens += count
    return total / tokens


def _metrics(prefix: str, loss: float) -> dict[str, float]:
    return {f"{prefix}_loss": round(loss, 6), f"{prefix}_perplexity": round(math.exp(loss), 4)}


def train_adapter(base: _basemodel.LoadedBaseModel, texts: Sequence[str],
                  params: TrainingParameters, *, on_step: StepCallback | None = None
                  ) -> TrainedAdapter:
    """Fine-tune a LoRA adapter on ``texts``; the base model's own weights are left as they were
    (PEFT trains only the low-rank matrices it adds, and they are removed again afterwards)."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict

    if not texts:
        raise InvalidCommand("no texts to train on")
    before_sources = mean_loss(base.model, base, texts)
    before_held_out = mean_loss(base.model, base, HELD_OUT_TEXTS)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(params.seed)  # LoRA's A matrices are initialised at random
    try:
        model = get_peft_model(base.model, _lora_config(params))
    finally:
        torch.random.set_rng_state(rng_state)
    try:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate)
        batches = [_basemodel.encode(base, list(texts[i:i + BATCH_SIZE]),
                                     max_tokens=MAX_TOKENS_PER_TEXT)
                   for i in range(0, len(texts), BATCH_SIZE)]
        for step in range(params.steps):
            model.train()
            batch, labels = batches[step % len(batches)]
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if on_step is not None:
                on_step(step + 1, params.steps, float(loss.detach()))
        after_sources = mean_loss(model, base, texts)
        after_held_out = mean_loss(model, base, HELD_OUT_TEXTS)
        weights = {name: tensor.detach().to("cpu").contiguous()
                   for name, tensor in get_peft_model_state_dict(model).items()}
    finally:
        model.unload()  # the base model again, without the LoRA layers, for the next use
    metrics = {**_metrics("sources_before", before_sources),
               **_metrics("sources_after", after_sources),
               **_metrics("held_out_before", before_held_out),
               **_metrics("held_out_after", after_held_out)}
    return TrainedAdapter(_to_safetensors(weights, params, base.ref), metrics, str(base.device))


def _lora_config(params: TrainingParameters) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
                      target_modules=params.target_modules, task_type="CAUSAL_LM")


def _to_safetensors(weights: dict[str, Any], params: TrainingParameters,
                    base: _basemodel.BaseModelRef) -> bytes:
    from safetensors.torch import save

    return save(weights, metadata={
        "format": "pt", "memwarden.format": ARTIFACT_FORMAT,
        "memwarden.training": json.dumps(params.as_dict(), sort_keys=True),
        "memwarden.base_model": base.sha256,
    })


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file: 8 bytes of header length, then JSON."""
    if len(data) < 8:
        raise StateConflict("not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + length])
    except ValueError:
        raise StateConflict("not a safetensors file (unreadable header)") from None
    return dict(header.get("__metadata__") or {})


def apply_adapter(base: _basemodel.LoadedBaseModel, data: bytes) -> PeftModel:
    """``base``'s model with the adapter in ``data`` applied (it modifies that model in place)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load

    meta = safetensors_metadata(data)
    if meta.get("memwarden.format") != ARTIFACT_FORMAT:
        raise StateConflict(f"not a MemWarden LoRA adapter ({meta.get('memwarden.format')!r})")
    if meta.get("memwarden.base_model") != base.ref.sha256:
        raise StateConflict(f"the adapter was trained for base model "
                            f"{meta.get('memwarden.base_model')}, not {base.ref.sha256} "
                            f"({base.ref.name}): set MEMWARDEN_BASE_MODEL to that model")
    params = TrainingParameters(**json.loads(meta["memwarden.training"]))
    model = get_peft_model(base.model, _lora_config(params))
    result = set_peft_model_state_dict(model, load(data))
    if result.unexpected_keys:
        raise StateConflict(f"the adapter does not fit the base model: "
                            f"{len(result.unexpected_keys)} unexpected tensors")
    model.eval()
    return model


def convert_parametric(mw: MemWarden, *, tenant: str, owner: str | None = None,
                       cube_id: str | None = None, policy: ConversionPolicy | None = None,
                       reason: str | None = None, on_step: StepCallback | None = None
                       ) -> ParametricResult:
    """Distil the selected memories of ``tenant`` (``owner``) into a new adapter version."""
    selection = plan(mw, tenant=tenant, owner=owner, policy=policy)
    policy = policy or ConversionPolicy.load()
    if not selection.selected:
        raise InvalidCommand(f"no memory of {_scope(tenant, owner)} meets the conversion policy "
                             f"({len(selection.excluded)} left out; see --dry-run)")
    sources = [c.state for c in selection.selected]
    base = _basemodel.load(_basemodel.resolve(mw.settings))
    trained = train_adapter(base, [s.text for s in sources], policy.training, on_step=on_step)
    digest = _lineage.artifact_store(mw).put(trained.data)
    cube_id = cube_id or _lineage.default_cube_id("parametric", tenant, owner)
    memory = _lineage.record_artifact(
        mw, kind="parametric", tenant=tenant, owner=owner or f"tenant:{tenant}", cube_id=cube_id,
        digest=digest, sources=sources, created_type=PARAMETRIC_MEMORY_CREATED,
        description=(f"LoRA adapter sha256:{digest} over base model {base.ref.name}, distilled "
                     f"from {len(sources)} memories of {_scope(tenant, owner)}"),
        detail={"base_model": base.ref.sha256, "base_model_name": base.ref.name,
                "hyperparameters": policy.training.as_dict(), "metrics": trained.metrics,
                "device": trained.device, "size_bytes": len(trained.data)},
        reason=reason or "distilled hot memories into parameters")
    return ParametricResult(memory, digest, selection, trained.metrics)


def plan(mw: MemWarden, *, tenant: str, owner: str | None,
         policy: ConversionPolicy | None = None) -> Selection:
    """What a conversion would distil (the dry run): needs ``artifact.convert`` in the tenant."""
    validate_tenant(tenant, platform_allowed=False)
    mw.require("artifact.convert", Resource.of_tenant(tenant))
    return select(mw, policy or ConversionPolicy.load(), tenant=tenant, owner=owner)


def load_adapter(mw: MemWarden, ident: str) -> LoadedAdapter:
    """The base model with the adapter of ``ident`` (an adapter memory or artifact digest)."""
    record, data = _lineage.loadable(mw, ident, kind="parametric")
    base = _basemodel.load(_basemodel.resolve(mw.settings))
    return LoadedAdapter(record, apply_adapter(base, data), base)


def _scope(tenant: str, owner: str | None) -> str:
    return f"tenant {tenant}" + (f", owner {owner}" if owner else "")
