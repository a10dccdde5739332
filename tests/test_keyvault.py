"""The key vault: per-memory keys under per-subject keys under a master key, destroyed on erasure.

Runs on every database backend, with the engine the event store configures (the vault shares the
log's database).
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url

from eventstore import EventStore
from governance._config import ConfigError
from governance._keyvault import (
    KEY_TABLES,
    KeyVault,
    MemoryKey,
    UndecryptableContent,
    is_envelope,
    load_master_key,
    memory_keys,
    open_sealed,
    read_or_create_key_file,
    scrub_database,
    seal,
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
    vault = KeyVault(MASTER_KEY)
    with store.engine.begin() as conn:
        vault.create_schema(conn)
    return vault


def _no_lookup(cube_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    return {}


def key_for(vault: KeyVault, store: EventStore, cube_id: str,
            owner: tuple[str, str] | None = ("acme", "user:ana")) -> MemoryKey:
    with store.engine.begin() as conn:
        return vault.memory_keys_for_writing(conn, {cube_id: owner}, owners_of=_no_lookup)[cube_id]


def keys_by_id(vault: KeyVault, store: EventStore, *key_ids: str) -> dict[str, MemoryKey]:
    with store.engine.connect() as conn:
        return vault.memory_keys(conn, key_ids)


def test_content_round_trips(vault: KeyVault, store: EventStore) -> None:
    key = key_for(vault, store, "cube-1")
    envelope = seal(key, "Ana's flat is at 12 Rue Oberkampf ✓", aad="event-1")
    opened = keys_by_id(vault, store, key.key_id)[key.key_id]
    assert open_sealed(opened, envelope, aad="event-1") == "Ana's flat is at 12 Rue Oberkampf ✓"


def test_envelope_is_json_without_the_plaintext_and_never_repeats(
        vault: KeyVault, store: EventStore) -> None:
    key = key_for(vault, store, "cube-1")
    first = seal(key, "prefers window seats", aad="event-1")
    second = seal(key, "prefers window seats", aad="event-1")
    assert is_envelope(first)
    assert "window" not in json.dumps(first)
    assert first["nonce"] != second["nonce"]
    assert first["ciphertext"] != second["ciphertext"]


def test_a_memory_keeps_its_key_and_memories_share_their_subjects_key(
        vault: KeyVault, store: EventStore) -> None:
    first = key_for(vault, store, "cube-1")
    assert key_for(vault, store, "cube-1", owner=None) == first
    second = key_for(vault, store, "cube-2")
    assert second.key_id != first.key_id
    key_for(vault, store, "cube-3", owner=("acme", "user:ben"))
    key_for(vault, store, "cube-4", owner=("globex", "user:ana"))  # another tenant's Ana
    with store.engine.connect() as conn:
        subjects = conn.execute(select(subject_keys.c.tenant, subject_keys.c.subject)
                                .order_by(subject_keys.c.tenant, subject_keys.c.subject)).all()
        assert vault.subjects_cubes(conn, "acme", "user:ana") == ["cube-1", "cube-2"]
    assert [tuple(row) for row in subjects] == [
        ("acme", "user:ana"), ("acme", "user:ben"), ("globex", "user:ana")]


def test_a_memory_without_a_key_or_an_owner_is_refused(vault: KeyVault, store: EventStore) -> None:
    with pytest.raises(LookupError, match="no owner"):
        key_for(vault, store, "cube-unknown", owner=None)


def test_keys_made_in_a_rolled_back_transaction_are_gone(
        vault: KeyVault, store: EventStore) -> None:
    with pytest.raises(RuntimeError), store.engine.begin() as conn:
        vault.memory_keys_for_writing(conn, {"cube-1": ("acme", "user:ana")},
                                      owners_of=_no_lookup)
        raise RuntimeError("the append failed")
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(memory_keys)).scalar_one() == 0


def test_an_envelope_opens_only_for_what_it_was_written_for(
        vault: KeyVault, store: EventStore) -> None:
    key = key_for(vault, store, "cube-1")
    envelope = seal(key, "secret", aad="event-1")
    with pytest.raises(UndecryptableContent, match="another event"):
        open_sealed(key, envelope, aad="event-2")


def test_altered_ciphertext_is_rejected(vault: KeyVault, store: EventStore) -> None:
    key = key_for(vault, store, "cube-1")
    envelope = seal(key, "secret", aad="event-1")
    sealed = bytearray(base64.b64decode(envelope["ciphertext"]))
    sealed[0] ^= 1
    altered = {**envelope, "ciphertext": base64.b64encode(bytes(sealed)).decode()}
    with pytest.raises(UndecryptableContent):
        open_sealed(key, altered, aad="event-1")


def test_plain_content_is_not_an_envelope() -> None:
    assert not is_envelope({"text": "written before encryption", "metadata": {}})
    assert not is_envelope("a string")


def test_destroying_a_subject_shreds_its_memories_keys_only(
        vault: KeyVault, store: EventStore) -> None:
    ana = key_for(vault, store, "cube-1")
    ana_too = key_for(vault, store, "cube-2")
    ben = key_for(vault, store, "cube-3", owner=("acme", "user:ben"))

    with store.engine.begin() as conn:
        assert vault.destroy_subject(conn, "acme", "user:ana") == 2

    left = keys_by_id(vault, store, ana.key_id, ana_too.key_id, ben.key_id)
    assert set(left) == {ben.key_id}
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(subject_keys).where(
            subject_keys.c.subject == "user:ana")).scalar_one() == 0
    with store.engine.begin() as conn:
        assert vault.destroy_subject(conn, "acme", "user:ana") == 0


def test_destroying_one_memorys_key_leaves_the_subjects_others(
        vault: KeyVault, store: EventStore) -> None:
    first = key_for(vault, store, "cube-1")
    second = key_for(vault, store, "cube-2")
    with store.engine.begin() as conn:
        assert vault.destroy_memory(conn, "cube-1") is True
        assert vault.destroy_memory(conn, "cube-1") is False
    assert set(keys_by_id(vault, store, first.key_id, second.key_id)) == {second.key_id}


def test_a_subject_written_again_after_erasure_gets_new_keys(
        vault: KeyVault, store: EventStore) -> None:
    before = key_for(vault, store, "cube-1")
    with store.engine.begin() as conn:
        vault.destroy_subject(conn, "acme", "user:ana")
    after = key_for(vault, store, "cube-9")
    assert after.key_id != before.key_id and after.key != before.key
    assert set(keys_by_id(vault, store, before.key_id, after.key_id)) == {after.key_id}


def test_erasure_takes_effect_in_every_process_at_once(
        vault: KeyVault, store: EventStore, database_url: str) -> None:
    other_process = EventStore.open(database_url)
    try:
        elsewhere = KeyVault(MASTER_KEY)
        key = key_for(vault, store, "cube-1")
        with other_process.engine.connect() as conn:
            assert key.key_id in elsewhere.memory_keys(conn, [key.key_id])  # now cached there
        with store.engine.begin() as conn:
            vault.destroy_subject(conn, "acme", "user:ana")
        with other_process.engine.connect() as conn:
            assert elsewhere.memory_keys(conn, [key.key_id]) == {}
    finally:
        other_process.close()


def test_a_write_after_another_process_erased_the_subject_makes_a_new_subject_key(
        vault: KeyVault, store: EventStore, database_url: str) -> None:
    # This vault has the subject's key unwrapped in memory; the erasure elsewhere must still
    # stop it from wrapping new memory keys under the shredded key.
    other_process = EventStore.open(database_url)
    try:
        before = key_for(vault, store, "cube-1")
        with other_process.engine.begin() as conn:
            KeyVault(MASTER_KEY).destroy_subject(conn, "acme", "user:ana")
        after = key_for(vault, store, "cube-2")
        with store.engine.connect() as conn:
            subject_key_ids = conn.execute(select(memory_keys.c.subject_key_id)).scalars().all()
            live_subject_keys = conn.execute(select(subject_keys.c.key_id)).scalars().all()
        assert subject_key_ids == live_subject_keys and len(live_subject_keys) == 1
        assert set(keys_by_id(vault, store, before.key_id, after.key_id)) == {after.key_id}
    finally:
        other_process.close()


def test_memory_keys_made_in_one_batch_are_distinct_and_open_again(
        vault: KeyVault, store: EventStore) -> None:
    owners = {f"cube-{i}": ("acme", f"user:{i % 2}") for i in range(5)}
    with store.engine.begin() as conn:
        made = vault.memory_keys_for_writing(conn, owners, owners_of=_no_lookup)
    assert len({key.key for key in made.values()}) == len({key.key_id for key in made.values()})
    assert len({key.key for key in made.values()}) == 5
    assert all(uuid.UUID(key.key_id).version == 7 for key in made.values())
    # A fresh vault (nothing cached) unwraps each from its row to the same key.
    read_back = keys_by_id(KeyVault(MASTER_KEY), store, *(key.key_id for key in made.values()))
    assert {key_id: key.key for key_id, key in read_back.items()} == {
        key.key_id: key.key for key in made.values()}
    with store.engine.connect() as conn:
        nonces = [bytes(wrapped)[:12] for wrapped in
                  conn.execute(select(memory_keys.c.wrapped_key)).scalars()]
    assert len(set(nonces)) == 5


def test_another_master_key_cannot_unwrap_the_subject_keys(
        vault: KeyVault, store: EventStore) -> None:
    key = key_for(vault, store, "cube-1")
    with pytest.raises(ConfigError, match="master key is not the one"):
        keys_by_id(KeyVault(bytes(32)), store, key.key_id)


def test_a_wrapped_key_moved_onto_another_subject_does_not_unwrap(
        vault: KeyVault, store: EventStore) -> None:
    key_for(vault, store, "cube-1")
    ben = key_for(vault, store, "cube-2", owner=("acme", "user:ben"))
    with store.engine.begin() as conn:
        anas = conn.execute(select(subject_keys.c.wrapped_key)
                            .where(subject_keys.c.subject == "user:ana")).scalar_one()
        conn.execute(update(subject_keys).where(subject_keys.c.subject == "user:ben")
                     .values(wrapped_key=anas))
    with pytest.raises(ConfigError, match="or the key row was altered"):
        keys_by_id(KeyVault(MASTER_KEY), store, ben.key_id)


def test_a_memory_key_moved_onto_another_memory_does_not_unwrap(
        vault: KeyVault, store: EventStore) -> None:
    key_for(vault, store, "cube-1")
    other = key_for(vault, store, "cube-2")
    with store.engine.begin() as conn:
        first = conn.execute(select(memory_keys.c.wrapped_key)
                             .where(memory_keys.c.cube_id == "cube-1")).scalar_one()
        conn.execute(update(memory_keys).where(memory_keys.c.cube_id == "cube-2")
                     .values(wrapped_key=first))
    with pytest.raises(UndecryptableContent, match="altered or moved"):
        keys_by_id(KeyVault(MASTER_KEY), store, other.key_id)


def test_destroyed_keys_leave_no_bytes_in_the_sqlite_files(sqlite_url: str) -> None:
    store = EventStore.open(sqlite_url)
    try:
        vault = KeyVault(MASTER_KEY)
        with store.engine.begin() as conn:
            vault.create_schema(conn)
        for n in range(30):
            key_for(vault, store, f"filler-{n}", owner=("acme", f"user:{n}"))
        key_for(vault, store, "cube-1")
        with store.engine.connect() as conn:
            wrapped = [conn.execute(select(table.c.wrapped_key).where(condition)).scalar_one()
                       for table, condition in (
                           (subject_keys, subject_keys.c.subject == "user:ana"),
                           (memory_keys, memory_keys.c.cube_id == "cube-1"))]
        database = Path(make_url(sqlite_url).database or "")
        for blob in wrapped:
            assert any(blob in f.read_bytes() for f in _database_files(database))

        with store.engine.begin() as conn:
            vault.destroy_subject(conn, "acme", "user:ana")
        assert scrub_database(store.engine, KEY_TABLES)

        for blob in wrapped:
            assert not any(blob in f.read_bytes() for f in _database_files(database))
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
