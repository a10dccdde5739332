"""Parametric and activation memory (issue 10): a real LoRA training run on the tiny base model
lowers the perplexity of its sources more than that of unrelated text; artifacts are safetensors
named by their hash and refused once modified; the KV cache gives the logits of recomputing; the
selection policy leaves out what it must; the CLI and the access policy around all of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from governance import MemWarden
from governance._artifacts import ArtifactCorrupted, ArtifactStore
from governance._cli import cli
from governance._config import ConfigError, Settings
from governance._conversion import DEFAULT_POLICY_PATH, ConversionPolicy
from governance._lineage import ArtifactTainted
from governance._parametric import safetensors_metadata
from governance._policy import PermissionDenied
from governance._principal import Principal

TENANT = "globex-travel"
POLICY = """
selection: {min_reads: 1, stable_days: 0}
rules:
  - {tenant: globex-travel, owner: "customer:cold", min_reads: 5}
training: {steps: 24, learning_rate: 0.01, rank: 8, alpha: 16, seed: 0}
"""
TEXTS = {
    "customer:aiko": ["Aiko prefers window seats on long-haul flights.", "Aiko is vegetarian."],
    "customer:sam": ["Sam's loyalty tier is Gold.",
                     "To book for Sam, always check the corporate travel policy first."],
}


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from governance import _basemodel

    torch.set_num_threads(1)  # two shared cores: one thread is faster for a model this small
    return _basemodel.resolve(Settings(data_dir=str(tmp_path_factory.mktemp("basemodel"))),
                              environ={}).path


@pytest.fixture
def env(base_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    policy = tmp_path / "conversion.yaml"
    policy.write_text(POLICY)
    monkeypatch.setenv("MEMWARDEN_BASE_MODEL", str(base_model_dir))
    monkeypatch.setenv("MEMWARDEN_CONVERSION_POLICY", str(policy))
    monkeypatch.setenv("MEMWARDEN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEMWARDEN_PII_SCAN", "0")
    return tmp_path / "data"


@pytest.fixture
def mw(database_url: str, env: Path) -> Iterator[MemWarden]:
    with MemWarden.open(database_url, actor="admin:root") as handle:
        yield handle


def _seed(mw: MemWarden) -> dict[str, str]:
    ids = {}
    for owner, texts in TEXTS.items():
        for n, text in enumerate(texts):
            memory = mw.add(text, tenant=TENANT, owner=owner)
            mw.get(memory.cube_id)
            ids[f"{owner}:{n}"] = memory.cube_id
    mw.flush_reads()
    return ids


def test_a_lora_adapter_learns_its_sources(mw: MemWarden, env: Path) -> None:
    ids = _seed(mw)
    steps: list[int] = []
    result = mw.convert_parametric(tenant=TENANT, on_step=lambda n, total, loss: steps.append(n))
    assert steps == list(range(1, 25))
    m = result.metrics
    sources_drop = m["sources_after_perplexity"] / m["sources_before_perplexity"]
    held_out_drop = m["held_out_after_perplexity"] / m["held_out_before_perplexity"]
    assert sources_drop < 0.8, m
    assert sources_drop < held_out_drop, m  # it learnt these texts, not just the language

    # The record: a parametric MemCube version and its creation event with the exact sources.
    assert result.memory.kind == "parametric" and result.memory.cube_id == "parametric." + TENANT
    created = [e for e in mw.store.read_stream(result.memory.cube_id)
               if e.type == "ParametricMemoryCreated"]
    assert len(created) == 1
    payload = created[0].payload
    from governance import _basemodel

    base = _basemodel.resolve(mw.settings)
    assert payload["artifact"] == result.artifact and payload["kind"] == "parametric"
    assert payload["base_model"] == base.sha256 == _basemodel.directory_sha256(base.path)
    assert payload["hyperparameters"] == ConversionPolicy.load().training.as_dict()
    assert payload["metrics"] == m
    assert sorted((s["cube_id"], s["version"]) for s in payload["sources"]) == sorted(
        (cube_id, 1) for cube_id in ids.values())

    # The file: safetensors named by its sha256, the hyperparameters inside, no pickle.
    path = ArtifactStore.under(env).path(result.artifact)
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == result.artifact
    meta = safetensors_metadata(data)
    assert json.loads(meta["memwarden.training"])["rank"] == 8
    assert b"\x80\x04" not in data[:2] and meta["memwarden.base_model"] == base.sha256

    # Loaded back, the adapter has the loss it was measured with.
    from governance._parametric import mean_loss

    loaded = mw.load_adapter(result.memory.cube_id)
    loss = mean_loss(loaded.model, loaded.base, [t for ts in TEXTS.values() for t in ts])
    assert loss == pytest.approx(m["sources_after_loss"], rel=1e-4)


def test_a_modified_artifact_is_refused(mw: MemWarden, env: Path) -> None:
    _seed(mw)
    cache = mw.convert_activation(tenant=TENANT)
    path = ArtifactStore.under(env).path(cache.artifact)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of one activation
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupted, match="modified on disk"):
        mw.load_activation(cache.memory.cube_id)
    path.unlink()
    with pytest.raises(Exception, match="not in"):
        mw.load_activation(cache.artifact)


def test_a_kv_cache_gives_the_logits_of_recomputing(mw: MemWarden) -> None:
    import torch

    from governance._activation import next_token_logits

    _seed(mw)
    result = mw.convert_activation(tenant=TENANT)
    loaded = mw.load_activation(result.memory.cube_id)
    assert loaded.prefix_tokens == result.prefix_tokens
    query = "Question: what does Aiko eat? Answer:"
    cached = next_token_logits(loaded.base, query, cache=loaded.fresh_cache())
    recomputed = next_token_logits(loaded.base, query, prefix=[s.text for s in result.sources])
    assert cached.shape == recomputed.shape
    assert torch.allclose(cached, recomputed, atol=1e-4)
    # ...and not those without the memories: the cache carries them.
    bare = next_token_logits(loaded.base, query, prefix=[])
    assert not torch.allclose(bare, recomputed, atol=1e-2)
    # Each generation starts from a fresh cache: the first one left the stored tensors intact.
    again = next_token_logits(loaded.base, query, cache=loaded.fresh_cache())
    assert torch.equal(again, cached)


def test_the_selection_leaves_out_what_the_policy_excludes(database_url: str, env: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv("MEMWARDEN_PII_SCAN", "1")  # real Presidio findings
    with MemWarden.open(database_url, actor="admin:root") as mw:
        def hot(text: str, owner: str = "customer:aiko", reads: int = 1, **meta: object) -> str:
            cube_id = mw.add(text, tenant=TENANT, owner=owner, metadata=meta or None).cube_id
            for _ in range(reads):
                mw.get(cube_id)
            return cube_id

        chosen = hot("Aiko prefers window seats.", reads=2)
        also = hot("Sam likes early flights.", owner="customer:sam")
        labelled = hot("Aiko's passport is renewed.", labels=["sensitive"])
        pii = hot("Write to aiko.tanaka@example.com or call +1 415 555 0100 about seats.")
        held = hot("Hold me.", owner="customer:held")
        expiring = hot("A short-lived note.", ttl_seconds=3600)
        cold = hot("Nobody reads this.", reads=0)
        cold_owner = hot("Read once, but this owner needs five reads.", owner="customer:cold")
        deleted = hot("Gone.")
        mw.delete(deleted, reason="asked to")
        elsewhere = mw.add("Elsewhere.", tenant="acme-health", owner="customer:aiko").cube_id
        mw.place_hold(reason="litigation", case_id="C-1", owner="customer:held", tenant=TENANT)
        mw.flush_reads()

        plan = mw.conversion_plan(tenant=TENANT)
        selected = [c.state.cube_id for c in plan.selected]
        assert selected[0] == chosen and also in selected  # hottest first
        why = dict(plan.excluded)
        assert why[labelled] == "labelled sensitive"
        assert why[pii].startswith("personal data detected (") and "EMAIL_ADDRESS" in why[pii]
        assert why[held] == "under a legal hold (owner customer:held)"
        assert why[expiring].startswith("expires within 30 days")
        assert why[cold].startswith("cold: read 0 time(s)")
        for absent in (deleted, elsewhere):  # only the tenant's active memories
            assert absent not in why and absent not in selected
        assert cold_owner in selected  # the owner's stricter rule applies to its own conversion
        owner_plan = mw.conversion_plan(tenant=TENANT, owner="customer:cold")
        assert dict(owner_plan.excluded)[cold_owner] == "cold: read 1 time(s), fewer than 5"
        assert owner_plan.selected == ()

        # An agent sees only what it may read; it may not convert at all.
        agent = mw.as_principal(Principal("agent:x", TENANT, "agent"))
        with pytest.raises(PermissionDenied):
            agent.conversion_plan(tenant=TENANT)


def test_the_policy_file_is_validated(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("selection: {min_reads: -1}\n")
    with pytest.raises(ConfigError, match="min_reads"):
        ConversionPolicy.load(bad)
    bad.write_text("selection: {hot: 3}\n")
    with pytest.raises(ConfigError, match="unknown field"):
        ConversionPolicy.load(bad)
    bad.write_text("rules: [{owner: x}]\n")
    with pytest.raises(ConfigError, match="tenant"):
        ConversionPolicy.load(bad)
    packaged = ConversionPolicy.load(DEFAULT_POLICY_PATH)
    assert packaged.rule_for("globex-travel", None).min_reads == 1
    assert packaged.rule_for("acme-health", "patient:x").min_reads == 3


def test_loading_needs_the_right_to_read_every_source(mw: MemWarden) -> None:
    ids = _seed(mw)
    cache = mw.convert_activation(tenant=TENANT)
    agent = mw.as_principal(Principal("agent:x", TENANT, "agent"))
    with pytest.raises(PermissionDenied):  # artifact.load, yes; its sources, not its own
        agent.load_activation(cache.memory.cube_id)
    auditor = mw.as_principal(Principal("auditor:x", TENANT, "auditor"))
    assert auditor.lineage(ids["customer:sam:0"]).artifacts[0].artifact == cache.artifact
    with pytest.raises(PermissionDenied):
        auditor.load_activation(cache.artifact)
    outsider = mw.as_principal(Principal("auditor:y", "acme-health", "auditor"))
    with pytest.raises(PermissionDenied):
        outsider.lineage(cache.memory.cube_id)
    assert outsider.artifacts() == []


def test_the_default_base_model_is_built_offline_and_the_same_everywhere(
        tmp_path: Path) -> None:
    from governance import _basemodel

    first = _basemodel.resolve(Settings(data_dir=str(tmp_path / "a")), environ={})
    second = _basemodel.resolve(Settings(data_dir=str(tmp_path / "b")), environ={})
    assert first.name == _basemodel.TINY_MODEL_NAME and first.sha256 == second.sha256
    assert {p.name for p in first.path.iterdir()} >= {"config.json", "model.safetensors",
                                                      "tokenizer.json"}
    with pytest.raises(ConfigError, match="MEMWARDEN_BASE_MODEL"):
        _basemodel.resolve(Settings(), environ={"MEMWARDEN_BASE_MODEL": str(tmp_path)})
    tokenizer = _basemodel.byte_tokenizer()
    text = "Ünïcode → bytes ✓"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_the_cli_converts_falls_back_and_answers_lineage(mw: MemWarden, database_url: str,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    ids = _seed(mw)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> dict:
        result = CliRunner().invoke(cli, ["--db", database_url, *args, "--json"])
        assert result.exit_code == 0, (result.output, result.exception)
        return json.loads(result.stdout)

    plan = run("convert", "activation", "--tenant", TENANT, "--dry-run")
    assert plan["dry_run"] and len(plan["selected"]) == 4
    made = run("convert", "activation", "--tenant", TENANT, "--owner", "customer:sam")
    assert {s["id"] for s in made["sources"]} == {ids["customer:sam:0"], ids["customer:sam:1"]}
    lineage = run("lineage", ids["customer:sam:1"])
    assert lineage["direction"] == "derived_into"
    assert lineage["artifacts"][0]["artifact"] == made["artifact"]
    mw.update(ids["customer:sam:1"], text="To book for Sam, ask his assistant.", reason="new")
    fallback = run("convert", "plaintext", made["memory"]["id"], "--reason", "source changed")
    assert {(r["id"], r["version"]) for r in fallback["restored"]} == {
        (ids["customer:sam:0"], 1), (ids["customer:sam:1"], 2)}
    assert [a["status"] for a in run("artifacts", "--tenant", TENANT)] == ["tainted"]
    refused = CliRunner().invoke(cli, ["--db", database_url, "convert", "plaintext",
                                       made["artifact"]])
    assert refused.exit_code == 4 and "already retired" in refused.stderr
    with pytest.raises(ArtifactTainted):
        mw.load_activation(made["artifact"])


def test_the_demo_makes_an_adapter_and_a_kv_cache_with_lineage(sqlite_url: str,
                                                               env: Path) -> None:
    from governance._demo import seed_demo

    with MemWarden.open(sqlite_url, actor="admin:root") as mw:
        seed_demo(mw)
        found = {a.kind: a for a in mw.artifacts(tenant=TENANT)}
        assert set(found) == {"parametric", "activation"}
        assert found["parametric"].status == "ready"
        assert {s.owner for s in found["parametric"].sources} == {"customer:sam.okafor"}
        assert found["activation"].status == "tainted"  # Aiko's diet changed afterwards
        mw.load_adapter(found["parametric"].cube_id)
        mw.erase_subject("customer:sam.okafor", tenant=TENANT, reason="Art. 17 request")
    # As `memwarden erase` does: the command's handle closes, writing the taint it caused.
    with MemWarden.open(sqlite_url, actor="auditor:kim") as mw:
        tainted = [e for e in mw.audit(limit=1000) if e.type == "ParametricMemoryTainted"
                   and e.cube_id == found["parametric"].cube_id]
        assert [e.detail["cause"]["type"] for e in tainted] == ["SubjectErased"]
        assert tainted[0].detail["purged"] is True
