"""Portable bundles between two instances: one on SQLite, one on PostgreSQL, each with its own
master key and identity. History and provenance survive the trip; tampered and foreign-signed
bundles are refused with a clear error."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from governance import MemWarden
from governance._bundles import MEMORY_IMPORTED, BundleRejected, export_bundle, import_bundle
from governance._cli import cli

PASSPHRASE = "correct horse battery staple"


def instance(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Point the environment at instance ``name``'s own data folder and master key."""
    folder = tmp_path / name

    def use() -> None:
        monkeypatch.setenv("MEMWARDEN_DATA_DIR", str(folder))
        monkeypatch.setenv("MEMWARDEN_KEY_FILE", str(folder / "master.key"))
    return use


Instance = tuple[str, Callable[[], None]]
"""A database URL, and what points the environment at that instance."""


@pytest.fixture
def two_instances(tmp_path: Path, sqlite_url: str, postgres_url: str,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Instance, Instance]]:
    monkeypatch.setenv("MEMWARDEN_PII_SCAN", "0")
    monkeypatch.delenv("MEMWARDEN_MASTER_KEY", raising=False)
    monkeypatch.delenv("MEMWARDEN_KAFKA_BOOTSTRAP", raising=False)
    yield ((sqlite_url, instance(tmp_path, "sqlite", monkeypatch)),
           (postgres_url, instance(tmp_path, "postgres", monkeypatch)))


def memwarden(url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--db", url, "--actor", "ops:alice", *args])


def seed(url: str) -> dict[str, list[str]]:
    with MemWarden.open(url, actor="agent:a") as mw:
        seat = mw.add("Prefers window seats", tenant="acme", owner="user:ana")
        mw.update(seat.cube_id, text="Prefers aisle seats", reason="she corrected it")
        mw.acting_as("officer:o").rollback(seat.cube_id, 1, reason="correction was wrong")
        diet = mw.add("Vegetarian", tenant="acme", owner="user:bo", metadata={"tags": ["diet"]})
        mw.delete(diet.cube_id, reason="asked to forget")
        mw.add("Globex secret", tenant="globex", owner="user:cy")
        return {cube_id: [v.state.text for v in mw.history(cube_id)]
                for cube_id in (seat.cube_id, diet.cube_id)}


def test_a_bundle_round_trips_from_sqlite_to_postgresql_with_history_and_provenance(
        two_instances: tuple[Instance, Instance],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (source, use_source), (target, use_target) = two_instances
    use_source()
    histories = seed(source)
    monkeypatch.setenv("MEMWARDEN_BUNDLE_PASSPHRASE", PASSPHRASE)
    bundle = tmp_path / "acme.bundle"
    exported = memwarden(source, "bundle", "export", "--tenant", "acme", "--with-keys",
                         "--out", str(bundle), "--json")
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["memories"] == 2
    assert b"Prefers" not in bundle.read_bytes() and b"Globex" not in bundle.read_bytes()
    assert bundle.stat().st_mode & 0o777 == 0o600
    source_key = memwarden(source, "bundle", "identity").stdout.strip()

    use_target()
    refused = memwarden(target, "bundle", "import", str(bundle))
    assert refused.exit_code != 0
    assert "does not trust" in " ".join(refused.stderr.split()) and "--trust" in refused.stderr
    imported = memwarden(target, "bundle", "import", str(bundle), "--trust", source_key, "--json")
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["keys"] == 2
    with MemWarden.open(target, actor="auditor") as mw:
        for cube_id, texts in histories.items():
            history = mw.history(cube_id)
            assert [v.state.text for v in history] == texts
            events = mw.store.read_stream(cube_id)
            assert events[-1].type == MEMORY_IMPORTED
            assert events[-1].actor == "ops:alice"
            assert [e[0] for e in events[-1].payload["source_events"]] == list(
                range(1, len(events)))
        seat = next(iter(histories))
        assert [e.actor for e in mw.store.read_stream(seat)][:3] == [
            "agent:a", "agent:a", "officer:o"]
        assert mw.get(seat).text == "Prefers window seats"
        assert mw.list() and all(m.tenant == "acme" for m in mw.list())
    again = memwarden(target, "bundle", "import", str(bundle), "--trust", source_key)
    assert again.exit_code != 0 and "imported before" in " ".join(again.stderr.split())


def test_tampered_and_foreign_bundles_are_refused(
        two_instances: tuple[Instance, Instance],
        tmp_path: Path) -> None:
    (source, use_source), (target, use_target) = two_instances
    use_source()
    seed(source)
    with MemWarden.open(source, actor="ops:alice") as mw:
        bundle = export_bundle(mw, "acme")
        # Re-importing its own bundle: trusted, but the memories exist already.
        with pytest.raises(Exception, match="imported before"):
            import_bundle(mw, json.dumps(bundle).encode())
    signer = bundle["signer"]
    tampered = json.loads(json.dumps(bundle))
    tampered["body"]["streams"][0]["events"][0]["actor"] = "agent:mallory"
    use_target()
    with MemWarden.open(target, actor="ops:bob") as mw:
        head = mw.store.head_position()
        with pytest.raises(BundleRejected, match="altered after it was signed"):
            import_bundle(mw, json.dumps(tampered).encode(), trusted=[signer])
        with pytest.raises(BundleRejected, match="does not trust"):
            import_bundle(mw, json.dumps(bundle).encode())
        with pytest.raises(BundleRejected, match="not a MemWarden bundle"):
            import_bundle(mw, b'{"format": "something else"}')
        assert mw.store.head_position() == head  # nothing written
        summary = import_bundle(mw, json.dumps(bundle).encode(), trusted=[signer])
        assert summary["memories"] == 2 and summary["keys"] == 0
        # Without its keys the content stays sealed here: history, but no text.
        cube_id = bundle["body"]["streams"][0]["cube_id"]
        assert [v.state.text for v in mw.history(cube_id)] == ["", "", ""]
