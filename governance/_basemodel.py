"""The base causal language model that adapters and KV caches are made for (torch port).

``MEMWARDEN_BASE_MODEL`` names any local Hugging Face causal LM directory (config, weights,
tokenizer). Unset, MemWarden uses a tiny Llama-shaped model it builds itself, from a config and a
fixed seed, with a byte-level tokenizer made in code: nothing is downloaded, and two machines with
the same torch build the same weights. It is created on first use under ``<data dir>/models``.

An artifact records the base model's hash (sha256 over its directory's files), so an adapter is
never loaded into a model it was not trained for.

torch and transformers load in seconds, so they are imported here only when a model is needed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance._config import ConfigError, Settings

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BASE_MODEL_ENV = "MEMWARDEN_BASE_MODEL"
TINY_MODEL_NAME = "tiny-llama-bytes-v1"
"""Versioned: a change to the recipe below must change the name, so old artifacts stay valid."""
TINY_MODEL_SEED = 20240601

_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
_TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
_hash_cache: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}
_build_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class BaseModelRef:
    """Where the base model lives and what it is: enough to record it and to check it later."""

    name: str
    path: Path
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}


@dataclass
class LoadedBaseModel:
    ref: BaseModelRef
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device


def resolve(settings: Settings, environ: dict[str, str] | None = None) -> BaseModelRef:
    """The configured base model, building the tiny default on first use."""
    env = os.environ if environ is None else environ
    configured = env.get(BASE_MODEL_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"{BASE_MODEL_ENV}={configured!r} is not a Hugging Face model "
                              "directory (no config.json there)")
        return BaseModelRef(path.name, path.resolve(), directory_sha256(path))
    path = Path(settings.data_dir) / "models" / TINY_MODEL_NAME
    if not (path / "config.json").is_file():
        _build_tiny_model(path)
    return BaseModelRef(TINY_MODEL_NAME, path.resolve(), directory_sha256(path))


def directory_sha256(path: Path) -> str:
    """sha256 over every file's relative name and bytes, in name order (cached per mtime/size)."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stamp = tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in files)
    key = (str(path.resolve()), stamp)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        for file in files:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(ref: BaseModelRef) -> LoadedBaseModel:
    """The model (eval mode, on the GPU when there is one) and its tokenizer."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = device()
    model = AutoModelForCausalLM.from_pretrained(ref.path).to(where)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedBaseModel(ref, model, tokenizer, where)


def encode(base: LoadedBaseModel, texts: list[str], *, max_tokens: int) -> tuple[Any, Any]:
    """``texts`` as one padded batch, each between BOS and EOS and cut at ``max_tokens``; the
    labels ignore padding."""
    tokenizer = base.tokenizer
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    batch = tokenizer([f"{bos}{text}{eos}" for text in texts], padding=True, truncation=True,
                      max_length=max_tokens, return_tensors="pt", add_special_tokens=False)
    batch = {name: tensor.to(base.device) for name, tensor in batch.items()}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch, labels


def _quiet_transformers() -> None:
    """transformers draws its own progress bars on every save and load: ours is enough."""
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built in code: one token per UTF-8 byte, plus pad, BOS and EOS.

    Every text can be encoded and decoded exactly, and nothing has to be downloaded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*_SPECIAL_TOKENS, *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    pad, bos, eos = _SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, bos_token=bos,
                                   eos_token=eos)


def _build_tiny_model(path: Path) -> None:
    """Build the default model into a scratch folder and move it in place in one step, so a
    concurrent first use sees either no model or a whole one."""
    _quiet_transformers()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with _build_lock:
        if (path / "config.json").is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = byte_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False, **_TINY_SHAPE)
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(TINY_MODEL_SEED)
            model = LlamaForCausalLM(config)
        finally:
            torch.random.set_rng_state(generator_state)
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            model.save_pretrained(scratch, safe_serialization=True)
            tokenizer.save_pretrained(scratch)
            try:
                scratch.rename(path)
            except OSError:
                if not (path / "config.json").is_file():  # not another process's build: a fault
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
