"""The key vault: per-subject AES-GCM keys, wrapped by a master key, destroyed on erasure.

Runs on every database backend, with the engine the event store configures (the vault shares the
log's database).
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url

from eventstore import EventStore
from governance._config import ConfigError
from governance._keyvault import (
    KeyVault,
    SubjectKeyDestroyed,
    UndecryptableContent,
    is_envelope,
    load_master_key,
    read_or_create_key_file,
    subject_keys,
)

MASTER_KEY = bytes(range(32))


@pytest.fixture
def store(database_url: str) -> Iterator[EventStore]:
    store = EventStore.open(database_url)
    yield store
    store.close()


@pytest.fixture
def vault(store: EventStore) -> KeyVault:
    vault = KeyVault(store.engine, MASTER_KEY)
    vault.create_schema()
    return vault


def test_content_round_trips(vault: KeyVault) -> None:
    envelope = vault.encrypt("user:ana", "Ana's flat is at 12 Rue Oberkampf ✓", aad="cube-1/1")
    assert vault.decrypt(envelope, aad="cube-1/1") == "Ana's flat is at 12 Rue Oberkampf ✓"


def test_envelope_is_json_without_the_plaintext_and_never_repeats(vault: KeyVault) -> None:
    first = vault.encrypt("user:ana", "prefers window seats", aad="cube-1/1")
    second = vault.encrypt("user:ana", "prefers window seats", aad="cube-1/1")
    assert is_envelope(first)
    assert "window" not in json.dumps(first)
    assert first["nonce"] != second["nonce"]
    assert first["ciphertext"] != second["ciphertext"]


def test_each_subject_has_one_key_of_its_own(vault: KeyVault) -> None:
    ana = {vault.encrypt("user:ana", text, aad="a")["key_id"] for text in ("one", "two", "three")}
    ben = vault.encrypt("user:ben", "one", aad="a")["key_id"]
    assert len(ana) == 1
    assert ben not in ana


def test_an_envelope_opens_only_for_what_it_was_written_for(vault: KeyVault) -> None:
    envelope = vault.encrypt("user:ana", "secret", aad="cube-1/1")
    with pytest.raises(UndecryptableContent, match="another memory or version"):
        vault.decrypt(envelope, aad="cube-1/2")


def test_altered_ciphertext_is_rejected(vault: KeyVault) -> None:
    envelope = vault.encrypt("user:ana", "secret", aad="cube-1/1")
    sealed = bytearray(base64.b64decode(envelope["ciphertext"]))
    sealed[0] ^= 1
    altered = {**envelope, "ciphertext": base64.b64encode(bytes(sealed)).decode()}
    with pytest.raises(UndecryptableContent):
        vault.decrypt(altered, aad="cube-1/1")


def test_plain_content_is_not_an_envelope(vault: KeyVault) -> None:
    assert not is_envelope({"text": "written before encryption", "metadata": {}})
    with pytest.raises(UndecryptableContent, match="not an encrypted content envelope"):
        vault.decrypt({"text": "written before encryption"}, aad="cube-1/1")


def test_destroying_a_key_makes_its_content_unreadable_for_good(
        vault: KeyVault, store: EventStore) -> None:
    ana = vault.encrypt("user:ana", "Ana's diagnosis", aad="cube-1/1")
    ben = vault.encrypt("user:ben", "Ben's diagnosis", aad="cube-2/1")

    assert vault.destroy("user:ana") is True

    with pytest.raises(SubjectKeyDestroyed) as raised:
        vault.decrypt(ana, aad="cube-1/1")
    assert raised.value.key_id == ana["key_id"]
    assert vault.decrypt(ben, aad="cube-2/1") == "Ben's diagnosis"
    with store.engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(subject_keys)
                            .where(subject_keys.c.subject == "user:ana")).scalar_one()
    assert rows == 0
    assert vault.destroy("user:ana") is False


def test_a_subject_written_again_after_erasure_gets_a_new_key(vault: KeyVault) -> None:
    before = vault.encrypt("user:ana", "old", aad="cube-1/1")
    vault.destroy("user:ana")
    after = vault.encrypt("user:ana", "new", aad="cube-9/1")
    assert after["key_id"] != before["key_id"]
    assert vault.decrypt(after, aad="cube-9/1") == "new"
    with pytest.raises(SubjectKeyDestroyed):
        vault.decrypt(before, aad="cube-1/1")


def test_erasure_takes_effect_in_every_process_at_once(vault: KeyVault, database_url: str) -> None:
    other_process = EventStore.open(database_url)
    try:
        elsewhere = KeyVault(other_process.engine, MASTER_KEY)
        envelope = vault.encrypt("user:ana", "secret", aad="cube-1/1")
        assert elsewhere.decrypt(envelope, aad="cube-1/1") == "secret"
        vault.destroy("user:ana")
        with pytest.raises(SubjectKeyDestroyed):
            elsewhere.decrypt(envelope, aad="cube-1/1")
    finally:
        other_process.close()


def test_another_master_key_cannot_unwrap_the_subject_keys(
        vault: KeyVault, store: EventStore) -> None:
    envelope = vault.encrypt("user:ana", "secret", aad="cube-1/1")
    stranger = KeyVault(store.engine, bytes(32))
    with pytest.raises(ConfigError, match="master key is not the one"):
        stranger.decrypt(envelope, aad="cube-1/1")


def test_a_wrapped_key_moved_onto_another_subject_does_not_unwrap(
        vault: KeyVault, store: EventStore) -> None:
    vault.encrypt("user:ana", "secret", aad="cube-1/1")
    vault.encrypt("user:ben", "secret", aad="cube-2/1")
    with store.engine.begin() as conn:
        anas = conn.execute(select(subject_keys.c.wrapped_key)
                            .where(subject_keys.c.subject == "user:ana")).scalar_one()
        conn.execute(update(subject_keys).where(subject_keys.c.subject == "user:ben")
                     .values(wrapped_key=anas))
    with pytest.raises(ConfigError, match="or the key row was altered"):
        vault.encrypt("user:ben", "more", aad="cube-3/1")


def test_concurrent_first_writes_for_a_subject_share_one_key(
        vault: KeyVault, database_url: str) -> None:
    writers = 6
    stores = [EventStore.open(database_url) for _ in range(writers)]
    start = threading.Barrier(writers)
    envelopes: dict[int, dict[str, str]] = {}
    errors: list[BaseException] = []

    def write(store: EventStore, n: int) -> None:
        start.wait()
        try:
            envelopes[n] = KeyVault(store.engine, MASTER_KEY).encrypt(
                "user:new", f"memory {n}", aad=f"cube-{n}/1")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(s, n)) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()

    assert errors == []
    assert len({e["key_id"] for e in envelopes.values()}) == 1
    assert {n: vault.decrypt(e, aad=f"cube-{n}/1") for n, e in envelopes.items()} == {
        n: f"memory {n}" for n in range(writers)}


def test_a_destroyed_key_leaves_no_bytes_in_the_sqlite_files(sqlite_url: str) -> None:
    store = EventStore.open(sqlite_url)
    try:
        vault = KeyVault(store.engine, MASTER_KEY)
        vault.create_schema()
        for n in range(30):
            vault.encrypt(f"user:{n}", "filler", aad="x")
        vault.encrypt("user:ana", "secret", aad="cube-1/1")
        with store.engine.connect() as conn:
            wrapped = conn.execute(select(subject_keys.c.wrapped_key)
                                   .where(subject_keys.c.subject == "user:ana")).scalar_one()
        database = Path(make_url(sqlite_url).database or "")
        assert any(wrapped in f.read_bytes() for f in _database_files(database))

        vault.destroy("user:ana")

        assert not any(wrapped in f.read_bytes() for f in _database_files(database))
    finally:
        store.close()


def _database_files(database: Path) -> list[Path]:
    """The database, its write-ahead log and shared-memory index."""
    return [p for p in database.parent.iterdir() if p.name.startswith(database.name)]


# -- the master key ----------------------------------------------------------------------------

def test_master_key_from_the_environment(tmp_path: Path) -> None:
    key = base64.b64encode(MASTER_KEY).decode()
    environ = {"MEMWARDEN_MASTER_KEY": key, "MEMWARDEN_KEY_FILE": str(tmp_path / "unused.key")}
    assert load_master_key(environ) == MASTER_KEY
    assert not (tmp_path / "unused.key").exists()


@pytest.mark.parametrize(("value", "problem"), [
    ("not base64!", "not valid base64"),
    (base64.b64encode(bytes(16)).decode(), "must decode to 32 bytes"),
])
def test_a_malformed_master_key_is_refused(value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_master_key({"MEMWARDEN_MASTER_KEY": value})


def test_the_key_file_is_created_private_on_first_start_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "master.key"
    first = load_master_key({"MEMWARDEN_KEY_FILE": str(path)})
    assert len(first) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_master_key({"MEMWARDEN_KEY_FILE": str(path)}) == first
    assert [p.name for p in path.parent.iterdir()] == ["master.key"]


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    read_or_create_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_or_create_key_file(path)


def test_the_key_file_defaults_to_the_data_folder(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    load_master_key({})
    assert (tmp_path / "data" / "master.key").stat().st_mode & 0o777 == 0o600
