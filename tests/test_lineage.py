"""Lineage and taint (issue 10), on SQLite and PostgreSQL: every kind of source change taints
every artifact made from the source, in the read model at once and in the log by the taint
worker (idempotently); loading is refused until the artifact is rebuilt; lineage answers both
directions; the read model rebuilds to the same rows.

The artifacts here are real KV caches of the tiny base model (one forward pass each); the LoRA
training run is in test_parametric.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from eventstore import EventContext, NewEvent, utcnow
from governance import MemWarden
from governance._artifacts import ArtifactStore
from governance._config import Settings
from governance._errors import VersionConflict
from governance._lineage import (
    ArtifactTainted,
    emit_pending_taints,
    queries,
    record_artifact,
)
from governance._policy import PermissionDenied
from governance._principal import Principal
from governance._retention import RetentionPolicy, RetentionWorker
from projections._state import PARAMETRIC_MEMORY_TAINTED

TENANT = "globex-travel"
POLICY = """
selection: {min_reads: 1, stable_days: 0, expiry_margin_days: 0}
training: {steps: 5}
"""


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny default model, built once for the module (then named by MEMWARDEN_BASE_MODEL)."""
    import torch

    from governance import _basemodel

    torch.set_num_threads(1)  # two shared cores: one thread is faster for a model this small
    data = tmp_path_factory.mktemp("basemodel")
    return _basemodel.resolve(Settings(data_dir=str(data)), environ={}).path


@pytest.fixture
def mw(database_url: str, base_model_dir: Path, tmp_path: Path,
       monkeypatch: pytest.MonkeyPatch) -> Iterator[MemWarden]:
    policy = tmp_path / "conversion.yaml"
    policy.write_text(POLICY)
    monkeypatch.setenv("MEMWARDEN_BASE_MODEL", str(base_model_dir))
    monkeypatch.setenv("MEMWARDEN_CONVERSION_POLICY", str(policy))
    settings = Settings(db_url=database_url, data_dir=str(tmp_path / "data"), pii_scan=False)
    with MemWarden.open(settings=settings, actor="admin:root") as handle:
        yield handle


def _hot(mw: MemWarden, text: str, owner: str, **metadata: object) -> str:
    memory = mw.add(text, tenant=TENANT, owner=owner, metadata=metadata or None)
    mw.get(memory.cube_id)
    mw.flush_reads()
    return memory.cube_id


@pytest.fixture
def world(mw: MemWarden) -> dict[str, str]:
    """Three hot memories about two people (one of them at version 2), and a KV cache made
    from them."""
    seat = mw.add("Aiko prefers aisle seats.", tenant=TENANT, owner="customer:aiko").cube_id
    mw.update(seat, text="Aiko prefers window seats on long-haul flights.", reason="changed")
    mw.get(seat)
    ids = {
        "aiko_seat": seat,
        "aiko_food": _hot(mw, "Aiko is vegetarian.", "customer:aiko", ttl_seconds=86400),
        "sam_tier": _hot(mw, "Sam's loyalty tier is Gold.", "customer:sam"),
    }
    result = mw.convert_activation(tenant=TENANT)
    ids["cache"] = result.memory.cube_id
    ids["artifact"] = result.artifact
    return ids


def _taint_events(mw: MemWarden, cube_id: str) -> list[dict]:
    return [e.payload for e in mw.store.read_stream(cube_id) if e.type == PARAMETRIC_MEMORY_TAINTED]


def _expire(mw: MemWarden, cube_id: str) -> None:
    """The retention worker, its clock two days on: the one-day ttl has run out."""
    later = utcnow() + timedelta(days=2)
    RetentionWorker(mw, RetentionPolicy.parse("version: 1\nrules: []\n"),
                    clock=lambda: later).run()
    assert mw.store.read_stream(cube_id)[-1].type == "MemoryExpired"


CHANGES: dict[str, tuple[str, Callable[[MemWarden, dict[str, str]], object]]] = {
    "update": ("MemoryUpdated", lambda mw, w: mw.update(
        w["aiko_food"], text="Aiko is vegan.", reason="she said so")),
    "rollback": ("MemoryRolledBack", lambda mw, w: mw.rollback(
        w["aiko_seat"], 1, reason="the update was wrong")),
    "delete": ("MemoryDeleted", lambda mw, w: mw.delete(w["sam_tier"], reason="asked to")),
    "expire": ("MemoryExpired", lambda mw, w: _expire(mw, w["aiko_food"])),
    "erase content": ("MemoryContentErased", lambda mw, w: mw.erase_memory_content(
        w["sam_tier"], reason="erase-after")),
    "erase subject": ("SubjectErased", lambda mw, w: mw.erase_subject(
        "customer:aiko", tenant=TENANT, reason="GDPR Art. 17 request")),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_source_change_taints_the_artifact_and_blocks_loading(
        mw: MemWarden, world: dict[str, str], change: str) -> None:
    loaded = mw.load_activation(world["cache"])
    assert loaded.record.status == "ready"
    cause, act = CHANGES[change]
    act(mw, world)

    record = mw.lineage(world["artifact"]).artifacts[0]
    assert record.status == "tainted"
    assert {t.cause for t in record.taints} == {cause}
    events = _taint_events(mw, world["cache"])
    assert events and all(e["cause"]["type"] == cause and e["artifact"] == world["artifact"]
                          for e in events)
    # One event per (artifact, cause), each naming its source's distilled version.
    assert len({e["cause"]["event_id"] for e in events}) == len(events)
    assert all(e["cause"]["source_version"] >= 1 for e in events)
    erased = cause in ("SubjectErased", "MemoryContentErased")
    assert all(e["purged"] is erased for e in events)
    # After an erasure the file goes too: weights and activations can give the text back.
    assert ArtifactStore.under(mw.settings.data_dir).exists(world["artifact"]) is not erased
    with pytest.raises(ArtifactTainted, match="tainted"):
        mw.load_activation(world["cache"])
    audit = [e for e in mw.audit(limit=1000) if e.type == PARAMETRIC_MEMORY_TAINTED]
    assert [e.cube_id for e in audit] == [world["cache"]] * len(events)


def test_reads_restores_and_other_tenants_taint_nothing(mw: MemWarden,
                                                        world: dict[str, str]) -> None:
    for _ in range(3):
        mw.get(world["aiko_seat"])
    mw.flush_reads()
    other = mw.add("Aiko is vegetarian.", tenant="acme-health", owner="customer:aiko")
    mw.update(other.cube_id, text="Aiko is vegan.", reason="not a source")
    mw.erase_subject("customer:aiko", tenant="acme-health", reason="another tenant's subject")
    assert mw.lineage(world["cache"]).artifacts[0].status == "ready"
    assert _taint_events(mw, world["cache"]) == []
    mw.load_activation(world["cache"])


def test_taints_are_written_once_whoever_runs_the_worker(mw: MemWarden,
                                                         world: dict[str, str]) -> None:
    backend = mw._backend
    # Detected in the read model with the change itself; written by the worker, once.
    mw.update(world["sam_tier"], text="Sam's loyalty tier is Platinum.", reason="upgrade")
    assert len(_taint_events(mw, world["cache"])) == 1
    assert emit_pending_taints(backend) == 0
    with MemWarden.open(settings=mw.settings, actor="admin:other") as second:
        assert emit_pending_taints(second._backend) == 0
    assert len(_taint_events(mw, world["cache"])) == 1
    assert mw.lineage(world["cache"]).artifacts[0].taints[0].emitted_position is not None


def test_a_taint_pending_when_a_command_ends_is_written_when_its_handle_closes(
        mw: MemWarden, world: dict[str, str]) -> None:
    """Writers outside the SDK's command path (erasure, retention, another process) leave the
    event to the worker; closing a handle runs it, as every CLI command does."""
    with MemWarden.open(settings=mw.settings, actor="admin:eraser") as other:
        other.erase_memory_content(world["aiko_seat"], reason="erase-after")
        assert mw.lineage(world["aiko_seat"]).artifacts[0].status == "tainted"
    assert [e["cause"]["type"] for e in _taint_events(mw, world["cache"])] == [
        "MemoryContentErased"]


def test_memwarden_up_writes_the_taint_of_a_change_made_by_another_writer(
        mw: MemWarden, world: dict[str, str]) -> None:
    """A writer that is not an SDK command (here: a bare append, as another process or service
    might make) leaves the taint pending; the background loop of `memwarden up` writes it."""
    from governance._up import _background_work

    version = mw.store.stream_version(world["sam_tier"])
    mw.store.append(world["sam_tier"], [NewEvent("MemoryDeleted", {"reason": "elsewhere"})],
                    expected_version=version, context=EventContext(actor="svc:x", tenant=TENANT),
                    then=mw.projector.project_new_events)
    assert _taint_events(mw, world["cache"]) == []
    assert queries(mw).artifact(world["artifact"]).status == "tainted"  # blocked already
    _background_work(mw)
    assert [e["cause"]["type"] for e in _taint_events(mw, world["cache"])] == ["MemoryDeleted"]


def test_rebuilding_makes_it_loadable_and_rolling_back_to_the_tainted_one_does_not(
        mw: MemWarden, world: dict[str, str]) -> None:
    mw.update(world["aiko_food"], text="Aiko is vegan.", reason="she said so")
    rebuilt = mw.convert_activation(tenant=TENANT)
    assert rebuilt.memory.cube_id == world["cache"] and rebuilt.artifact != world["artifact"]
    assert {(s.cube_id, s.version) for s in rebuilt.sources} >= {
        (world["aiko_food"], mw.get(world["aiko_food"]).version)}
    assert mw.load_activation(world["cache"]).record.artifact == rebuilt.artifact
    # The artifact memory has versions like any memory; its first version holds the old cache.
    mw.rollback(world["cache"], 1, reason="try the previous cache")
    with pytest.raises(ArtifactTainted):
        mw.load_activation(world["cache"])
    assert mw.load_activation(rebuilt.artifact).record.artifact == rebuilt.artifact


def test_lineage_answers_both_directions(mw: MemWarden, world: dict[str, str]) -> None:
    made_of = mw.lineage(world["cache"])
    assert made_of.direction == "made_of"
    (record,) = made_of.artifacts
    assert {(s.cube_id, s.version, s.owner) for s in record.sources} == {
        (world["aiko_seat"], 2, "customer:aiko"), (world["aiko_food"], 1, "customer:aiko"),
        (world["sam_tier"], 1, "customer:sam")}
    assert mw.lineage(world["artifact"]).artifacts == (record,)
    derived = mw.lineage(world["sam_tier"])
    assert derived.direction == "derived_into"
    assert [a.artifact for a in derived.artifacts] == [world["artifact"]]
    assert mw.lineage(mw.add("unrelated", tenant=TENANT, owner="x").cube_id).artifacts == ()
    assert [a.artifact for a in mw.artifacts(tenant=TENANT)] == [world["artifact"]]


def test_an_artifact_is_refused_if_a_source_changed_while_it_was_made(
        mw: MemWarden, world: dict[str, str]) -> None:
    stale = mw.get(world["sam_tier"])
    mw.update(world["sam_tier"], text="Sam's loyalty tier is Silver.", reason="downgrade")
    with pytest.raises(VersionConflict):
        record_artifact(mw, kind="activation", tenant=TENANT, owner="tenant:globex-travel",
                        cube_id=world["cache"], digest="0" * 64, description="stale",
                        sources=[stale], created_type="ActivationMemoryCreated",
                        detail={"base_model": "0" * 64}, reason=None)


def test_the_lineage_read_model_rebuilds_to_the_same_rows(mw: MemWarden,
                                                          world: dict[str, str]) -> None:
    mw.update(world["aiko_food"], text="Aiko is vegan.", reason="she said so")
    mw.erase_subject("customer:sam", tenant=TENANT, reason="request")
    mw.restore_plaintext(world["cache"], reason="fallback")
    before = mw.projector.digest()
    mw.rebuild_projections(["lineage"])
    assert mw.projector.digest() == before
    record = mw.lineage(world["cache"]).artifacts[0]
    assert record.status == "tainted" and record.retired_position is not None
    assert {t.cause for t in record.taints} == {"MemoryUpdated", "SubjectErased"}


def test_lineage_over_rest(mw: MemWarden, world: dict[str, str]) -> None:
    from fastapi.testclient import TestClient

    from governance import ApiKeys, create_app

    secret = ApiKeys(mw).issue(tenant=TENANT, subject="auditor:kim", role="auditor").secret
    headers = {"Authorization": f"Bearer {secret}"}
    with TestClient(create_app(mw)) as client:
        made_of = client.get(f"/v1/lineage/{world['cache']}", headers=headers)
        assert made_of.status_code == 200, made_of.text
        (artifact,) = made_of.json()["artifacts"]
        assert artifact["artifact"] == world["artifact"] and artifact["status"] == "ready"
        assert {s["cube_id"] for s in artifact["sources"]} == {
            world["aiko_seat"], world["aiko_food"], world["sam_tier"]}
        mw.delete(world["sam_tier"], reason="asked to")
        listed = client.get("/v1/artifacts", headers=headers).json()["items"]
        assert [(a["artifact"], a["status"]) for a in listed] == [(world["artifact"], "tainted")]
        assert listed[0]["taints"][0]["cause"] == "MemoryDeleted"
        assert "Aiko" not in client.get(f"/v1/lineage/{world['aiko_food']}",
                                        headers=headers).text  # ids and versions, no content


def test_the_conversion_worker_rebuilds_what_is_missing_tainted_or_stale(
        mw: MemWarden, world: dict[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from governance._conversion_worker import run_conversions

    policy = tmp_path / "worker.yaml"
    policy.write_text(POLICY + "worker:\n  scopes:\n"
                      f"    - {{tenant: {TENANT}, owner: 'customer:aiko', kinds: [activation]}}\n")
    monkeypatch.setenv("MEMWARDEN_CONVERSION_POLICY", str(policy))

    def outcome(**options: bool) -> tuple[str, str]:
        (action,) = run_conversions(mw, **options)
        assert action.cube_id == "activation.globex-travel.customer.aiko"
        return action.outcome, action.why

    assert outcome(dry_run=True) == ("would build", "no artifact yet")
    assert mw.lineage(world["aiko_seat"]).artifacts[0].artifact == world["artifact"]
    assert outcome() == ("built", "no artifact yet")
    assert outcome() == ("up to date", "the current artifact matches the selection")
    mw.update(world["aiko_food"], text="Aiko is vegan.", reason="she said so")
    assert outcome(dry_run=True) == ("would build", "the current artifact is tainted")
    assert outcome()[0] == "built"
    current = mw.load_activation("activation.globex-travel.customer.aiko").record
    assert {(s.cube_id, s.version) for s in current.sources} == {
        (world["aiko_seat"], 2), (world["aiko_food"], mw.get(world["aiko_food"]).version)}
    assert outcome() == ("up to date", "the current artifact matches the selection")
    other_tenant = mw.as_principal(Principal("manager:x", "acme-health", "tenant_admin"))
    with pytest.raises(PermissionDenied):
        run_conversions(other_tenant, tenant=TENANT)
