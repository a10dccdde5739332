"""Encryption keys for memory content, kept outside the log (crypto-shredding).

Three layers, each wrapping the next with AES-256-GCM:

- the **master key** never touches the database: it comes from ``MEMWARDEN_MASTER_KEY`` (base64)
  or from a key file (``MEMWARDEN_KEY_FILE``, default ``master.key`` in the data folder) created
  with mode 0600 on first start;
- one **subject key** per data subject (a memory's owner, within its tenant), in the
  ``subject_keys`` table, wrapped by the master key;
- one **memory key** per memory, in the ``memory_keys`` table, wrapped by its subject's key. Every
  version of the memory's text is sealed under it (``seal`` / ``open_sealed``).

So the log, Kafka and backups hold only ciphertext, and deleting rows shreds content however many
copies of the log exist: a subject's key (and its memory keys) for a subject's erasure, one memory
key for the erasure of one memory's content (retention's erase-after). A sealed text whose memory
key is gone is *erased*: the codec (``governance._sensitive``) reads it back as no text at all.

The vault works on the caller's connection, so the keys a write creates commit or roll back with
its events, and a projector reads keys consistent with the events of its batch. Rows are looked up
on every use (an erasure must take effect in every process at once); what is cached is only the
result of unwrapping a given wrapped key, which is the costly part and can never go stale.

Deleted rows can outlive a DELETE in the database files: SQLite leaves the bytes on the page (or on
a free page) and keeps older copies of the page in the write-ahead log; PostgreSQL leaves the dead
tuple in the heap until a vacuum, and a plain vacuum does not overwrite it. ``destroy_*``
therefore delete with ``PRAGMA secure_delete=ON`` (SQLite zeroes the freed cell), and ``scrub``
(after the commit) runs ``wal_checkpoint(TRUNCATE)`` on SQLite, which copies the zeroed pages into
the database file and empties the WAL, and ``VACUUM FULL`` of the (small) key tables on
PostgreSQL. PostgreSQL's own WAL archive and any backup still hold the *wrapped* keys until they
age out; they cannot be opened without the master key.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    delete,
    select,
)

from eventstore import UTCDateTime, utcnow
from eventstore._driver import DriverConnection, in_list, insert_sql
from eventstore._envelope import uuid7
from governance._config import ConfigError
from governance._errors import MemWardenError

ALGORITHM = "AES-256-GCM"
KEY_BYTES = 32
_NONCE_BYTES = 12
_FRESH_BYTES = KEY_BYTES + _NONCE_BYTES
"""Random bytes a new memory key takes: the key's, then its wrapping's nonce's."""
_CHUNK = 500
_CACHED_KEYS = 50_000
"""Entries each cache keeps before it starts again (a few MB)."""
DEFAULT_KEY_FILE = "./data/master.key"

metadata = MetaData()

subject_keys = Table(
    "subject_keys",
    metadata,
    Column("key_id", String(36), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("subject", String(200), nullable=False),
    # nonce followed by the AES-GCM sealed subject key; never the key itself.
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("tenant", "subject", name="subject_keys_subject"),
)

memory_keys = Table(
    "memory_keys",
    metadata,
    Column("key_id", String(36), primary_key=True),
    Column("cube_id", String(200), nullable=False, unique=True),
    Column("subject_key_id", String(36), nullable=False),
    # nonce followed by the memory key sealed under the subject key.
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index("memory_keys_subject", "subject_key_id"),
)

KEY_TABLES = (subject_keys, memory_keys)

# The statements run on every write and every projector batch, straight to the driver.
_SELECT_SUBJECT_KEYS = ("SELECT key_id, subject, wrapped_key FROM subject_keys "
                        "WHERE tenant = ? AND subject IN {keys}")
_INSERT_SUBJECT_KEY = insert_sql("subject_keys",
                                 ("key_id", "tenant", "subject", "wrapped_key", "created_at"))
_SELECT_MEMORY_KEYS = (
    "SELECT m.key_id, m.cube_id, m.wrapped_key, s.key_id, s.tenant, s.subject, s.wrapped_key "
    "FROM memory_keys m JOIN subject_keys s ON s.key_id = m.subject_key_id "
    "WHERE {column} IN {keys}")
_INSERT_MEMORY_KEY = insert_sql("memory_keys",
                                ("key_id", "cube_id", "subject_key_id", "wrapped_key",
                                 "created_at"))


class UndecryptableContent(MemWardenError):
    """A sealed text is malformed, was altered, or is read under another binding (``aad``)."""


# -- the master key ----------------------------------------------------------------------------

def load_master_key(environ: Mapping[str, str] | None = None, *,
                    default_file: str | Path = DEFAULT_KEY_FILE) -> bytes:
    """The master key from ``MEMWARDEN_MASTER_KEY``, else from the key file
    (``MEMWARDEN_KEY_FILE``, else ``default_file``), created on first start."""
    env = os.environ if environ is None else environ
    encoded = env.get("MEMWARDEN_MASTER_KEY")
    if encoded:
        return _decoded_key(encoded, "MEMWARDEN_MASTER_KEY")
    return read_or_create_key_file(Path(env.get("MEMWARDEN_KEY_FILE") or default_file))


def read_or_create_key_file(path: Path) -> bytes:
    """Read the base64 master key in ``path``; on first start, create it readable by us only."""
    if not path.exists():
        _create_key_file(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"master key file {path} is accessible to other users (mode "
                          f"{mode:04o}); restrict it with `chmod 600 {path}`")
    return _decoded_key(path.read_text(), f"master key file {path}")


def _create_key_file(path: Path) -> None:
    """Write the new key to a private temporary file, then link it into place: two processes
    starting together end up with the same key, and nobody ever reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.link(draft, path)
    except FileExistsError:
        pass  # another process created it first; use theirs
    finally:
        draft.unlink()


def _decoded_key(encoded: str, source: str) -> bytes:
    try:
        key = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        raise ConfigError(f"{source} is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{source} must decode to {KEY_BYTES} bytes (AES-256); "
                          f"it decodes to {len(key)}")
    return key


# -- sealing texts -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MemoryKey:
    key_id: str
    cube_id: str
    tenant: str
    subject: str
    key: bytes
    # Made once per key: a rebuild opens every event of a memory with the same key.
    cipher: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cipher", AESGCM(self.key))


def seal(key: MemoryKey, plaintext: str, *, aad: str) -> dict[str, str]:
    """Seal ``plaintext`` under a memory key. ``aad`` is authenticated, not stored: pass what the
    sealed text belongs to (the event), so that a copy moved elsewhere fails to open."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    sealed = key.cipher.encrypt(nonce, plaintext.encode(), aad.encode())
    return {"alg": ALGORITHM, "key_id": key.key_id, "nonce": _b64(nonce),
            "ciphertext": _b64(sealed)}


def open_sealed(key: MemoryKey, envelope: Mapping[str, Any], *, aad: str) -> str:
    """The plaintext of a ``seal``ed envelope (with the same ``aad``)."""
    try:
        # binascii's strict mode: what b64decode(validate=True) checks, without its regex.
        nonce = binascii.a2b_base64(envelope["nonce"], strict_mode=True)
        sealed = binascii.a2b_base64(envelope["ciphertext"], strict_mode=True)
        return key.cipher.decrypt(nonce, sealed, aad.encode()).decode()
    except (binascii.Error, ValueError, InvalidTag):
        raise UndecryptableContent(
            f"content sealed under key {key.key_id} fails authentication: it was altered, or "
            "it is read for another event than it was written for") from None


def is_envelope(value: Any) -> bool:
    """Whether ``value`` is an envelope ``seal`` made."""
    return (isinstance(value, Mapping) and value.get("alg") == ALGORITHM
            and all(isinstance(value.get(name), str) for name in ("key_id", "nonce", "ciphertext")))


# -- the vault ---------------------------------------------------------------------------------

class KeyVault:
    """Subject and memory keys in ``subject_keys`` and ``memory_keys``, on the caller's
    connection."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != KEY_BYTES:
            raise ConfigError(f"the master key must be {KEY_BYTES} bytes")
        self._master = AESGCM(master_key)
        # (key id, wrapped bytes) -> unwrapped key: a row's wrapped bytes never change, so an
        # entry can never be stale; a destroyed row is simply no longer looked up.
        self._unwrapped: dict[tuple[str, bytes], bytes] = {}
        self._memory_key_cache: dict[tuple[Any, ...], MemoryKey] = {}
        self._subject_ciphers: dict[tuple[str, bytes], AESGCM] = {}
        self._lock = threading.Lock()

    def create_schema(self, conn: Connection) -> None:
        metadata.create_all(conn)

    # -- writing ---------------------------------------------------------------------------

    def memory_keys_for_writing(
        self, conn: Connection, wanted: Mapping[str, tuple[str, str] | None], *,
        owners_of: Callable[[Sequence[str]], Mapping[str, tuple[str, str]]],
    ) -> dict[str, MemoryKey]:
        """The key of each memory in ``wanted``: cube id -> (tenant, subject) for a memory being
        created (its key is made now, under its owner's subject key, itself made by the
        subject's first memory), or None for one that exists. ``owners_of`` names the owners
        of existing memories without a key (written before encryption, or erased), for keys to
        be made."""
        # A memory whose owner the caller knows is being created: it has no key yet (were it
        # to exist, the unique cube_id would refuse the new key, and the append with it).
        found = self._memory_keys_by_cube(
            conn, [cube_id for cube_id, owner in wanted.items() if owner is None])
        missing = {cube_id: owner for cube_id, owner in wanted.items() if cube_id not in found}
        if not missing:
            return found
        unknown = sorted(cube_id for cube_id, owner in missing.items() if owner is None)
        if unknown:
            looked_up = owners_of(unknown)
            if set(looked_up) != set(unknown):
                raise LookupError(f"memories {sorted(set(unknown) - set(looked_up))} have no "
                                  "owner to make a content key for")
            missing.update(looked_up)
        subjects = self._subject_keys(conn, {owner for owner in missing.values() if owner})
        db = DriverConnection(conn)
        now = db.dialect.to_db_time(utcnow())
        rows = []
        # Every new key and its wrapping nonce in one call to the OS's generator: the bytes
        # generate_key and token_bytes would draw (the same os.urandom), without two calls per
        # memory. Key ids are time-ordered (``uuid7``): each lands at the end of the key
        # table's index on them, not on a random page of it.
        fresh = os.urandom(len(missing) * _FRESH_BYTES)
        for start, (cube_id, owner) in zip(range(0, len(fresh), _FRESH_BYTES), missing.items(),
                                           strict=True):
            assert owner is not None
            subject_key_id, subject_key = subjects[owner]
            key_id = str(uuid7())
            key = fresh[start:start + KEY_BYTES]
            nonce = fresh[start + KEY_BYTES:start + _FRESH_BYTES]
            wrapped = nonce + self._cipher(subject_key_id, subject_key).encrypt(
                nonce, key, _memory_aad(key_id, cube_id))
            rows.append((key_id, cube_id, subject_key_id, wrapped, now))
            found[cube_id] = MemoryKey(key_id, cube_id, owner[0], owner[1], key)
        # One statement for the whole batch, straight to the driver (see eventstore._driver):
        # through Core, binding the timestamp of each row cost more than making its key.
        db.executemany(_INSERT_MEMORY_KEY, rows)
        return found

    def _subject_keys(self, conn: Connection, owners: Iterable[tuple[str, str]],
                      ) -> dict[tuple[str, str], tuple[str, bytes]]:
        """(key id, key) of each (tenant, subject), created if missing: the existing ones are
        looked up with one query per tenant and chunk of subjects, not one per owner."""
        wanted = sorted(set(owners))
        by_tenant: dict[str, list[str]] = {}
        for tenant, subject in wanted:
            by_tenant.setdefault(tenant, []).append(subject)
        db = DriverConnection(conn)
        keys: dict[tuple[str, str], tuple[str, bytes]] = {}
        for tenant, subjects in by_tenant.items():
            for start in range(0, len(subjects), _CHUNK):
                part = subjects[start:start + _CHUNK]
                for key_id, subject, wrapped in db.execute(
                        _SELECT_SUBJECT_KEYS.format(keys=in_list(len(part))),
                        [tenant, *part]).fetchall():
                    keys[tenant, subject] = (key_id, self._unwrap_subject_key(
                        key_id, tenant, subject, wrapped))
        now, rows = db.dialect.to_db_time(utcnow()), []
        for tenant, subject in wanted:
            if (tenant, subject) in keys:
                continue
            key_id, key = str(uuid.uuid4()), AESGCM.generate_key(bit_length=KEY_BYTES * 8)
            nonce = secrets.token_bytes(_NONCE_BYTES)
            wrapped = nonce + self._master.encrypt(nonce, key,
                                                   _subject_aad(key_id, tenant, subject))
            rows.append((key_id, tenant, subject, wrapped, now))
            keys[tenant, subject] = (key_id, key)
        db.executemany(_INSERT_SUBJECT_KEY, rows)
        return keys

    # -- reading ---------------------------------------------------------------------------

    def memory_keys(self, conn: Connection, key_ids: Iterable[str]) -> dict[str, MemoryKey]:
        """The memory keys among ``key_ids`` that still exist (the others were destroyed)."""
        return self._lookup(conn, "m.key_id", sorted(set(key_ids)), by_cube=False)

    def _memory_keys_by_cube(self, conn: Connection,
                             cube_ids: Sequence[str]) -> dict[str, MemoryKey]:
        return self._lookup(conn, "m.cube_id", sorted(set(cube_ids)), by_cube=True)

    def _lookup(self, conn: Connection, column: str, values: Sequence[str], *,
                by_cube: bool) -> dict[str, MemoryKey]:
        # Straight to the driver: a projector batch (and a rebuild, every batch of the log)
        # looks up the keys of thousands of memories.
        found: dict[str, MemoryKey] = {}
        if not values:
            return found
        for row in DriverConnection(conn).fetch_in_chunks(
                _SELECT_MEMORY_KEYS.format(column=column, keys="{keys}"), values, _CHUNK):
            key = self._memory_key(tuple(row))
            found[key.cube_id if by_cube else key.key_id] = key
        return found

    def _memory_key(self, row: tuple[Any, ...]) -> MemoryKey:
        """The memory key of a row of ``_SELECT_MEMORY_KEYS``. Kept by the row's exact content,
        so an entry can never be stale, and a key read again (every write to a memory, every
        projector batch that opens its text) costs no unwrapping and no new cipher."""
        row = (*row[:2], bytes(row[2]), *row[3:6], bytes(row[6]))
        cached = self._memory_key_cache.get(row)
        if cached is not None:
            return cached
        key_id, cube_id, wrapped, subject_id, tenant, subject, subject_wrapped = row
        subject_key = self._unwrap_subject_key(subject_id, tenant, subject, subject_wrapped)
        try:
            key = self._unwrap(key_id, wrapped, self._cipher(subject_id, subject_key),
                               _memory_aad(key_id, cube_id))
        except InvalidTag:
            raise UndecryptableContent(
                f"memory key {key_id} does not unwrap under its subject's key: the key row was "
                "altered or moved") from None
        memory_key = MemoryKey(key_id, cube_id, tenant, subject, key)
        with self._lock:
            if len(self._memory_key_cache) > _CACHED_KEYS:
                self._memory_key_cache.clear()
            self._memory_key_cache[row] = memory_key
        return memory_key

    def _cipher(self, subject_key_id: str, subject_key: bytes) -> AESGCM:
        """The AES-GCM cipher of a subject key, made once: a batch wraps or unwraps the keys of
        many memories of the same subjects."""
        cached = self._subject_ciphers.get((subject_key_id, subject_key))
        if cached is None:
            cached = AESGCM(subject_key)
            with self._lock:
                if len(self._subject_ciphers) > _CACHED_KEYS:
                    self._subject_ciphers.clear()
                self._subject_ciphers[subject_key_id, subject_key] = cached
        return cached

    def subjects_cubes(self, conn: Connection, tenant: str, subject: str) -> list[str]:
        """The memories whose content is sealed under the subject's current key."""
        return list(conn.execute(
            select(memory_keys.c.cube_id)
            .join(subject_keys, subject_keys.c.key_id == memory_keys.c.subject_key_id)
            .where(subject_keys.c.tenant == tenant, subject_keys.c.subject == subject)
            .order_by(memory_keys.c.cube_id)).scalars())

    # -- shredding -------------------------------------------------------------------------

    def destroy_subject(self, conn: Connection, tenant: str, subject: str) -> int:
        """Delete the subject's key and its memories' keys; the number of memory keys deleted.
        Call ``scrub`` after the transaction commits."""
        _secure_delete(conn)
        key_ids = list(conn.execute(select(subject_keys.c.key_id).where(
            subject_keys.c.tenant == tenant, subject_keys.c.subject == subject)).scalars())
        if not key_ids:
            return 0
        shredded = conn.execute(delete(memory_keys).where(
            memory_keys.c.subject_key_id.in_(key_ids))).rowcount
        conn.execute(delete(subject_keys).where(subject_keys.c.key_id.in_(key_ids)))
        return int(shredded)

    def destroy_memory(self, conn: Connection, cube_id: str) -> bool:
        """Delete one memory's key: every version of its text becomes unreadable for good."""
        _secure_delete(conn)
        return bool(conn.execute(delete(memory_keys).where(
            memory_keys.c.cube_id == cube_id)).rowcount)

    # -- unwrapping ------------------------------------------------------------------------

    def _unwrap_subject_key(self, key_id: str, tenant: str, subject: str,
                            wrapped: bytes) -> bytes:
        wrapped = bytes(wrapped)
        cached = self._unwrapped.get((key_id, wrapped))
        if cached is not None:  # before spelling the aad: most lookups hit the cache
            return cached
        try:
            return self._unwrap(key_id, wrapped, self._master,
                                _subject_aad(key_id, tenant, subject))
        except InvalidTag:
            raise ConfigError(
                f"cannot unwrap subject key {key_id}: the master key is not the one this "
                "database's keys were wrapped with (or the key row was altered)") from None

    def _unwrap(self, key_id: str, wrapped: bytes, wrapping: AESGCM | bytes,
                aad: bytes) -> bytes:
        wrapped = bytes(wrapped)
        cached = self._unwrapped.get((key_id, wrapped))
        if cached is not None:
            return cached
        if isinstance(wrapping, bytes):
            wrapping = AESGCM(wrapping)  # only on a miss: most lookups hit the cache
        # InvalidTag goes to the caller, which knows what the failure means.
        key = wrapping.decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], aad)
        with self._lock:
            if len(self._unwrapped) > _CACHED_KEYS:
                self._unwrapped.clear()
            self._unwrapped[key_id, wrapped] = key
        return key


def scrub_database(engine: Engine, tables: Sequence[Table], *,
                   horizon_timeout: float = 30.0) -> bool:
    """After deletions committed with ``secure_delete``: on SQLite, checkpoint the WAL into the
    (zeroed) database file and truncate it; on PostgreSQL, rewrite ``tables`` (``VACUUM FULL``)
    so their dead tuples leave the heap files, once no older snapshot can still see them. False
    if the scrub could not finish: SQLite's checkpoint met a reader holding the WAL past the
    busy timeout, or a PostgreSQL session kept a snapshot older than the deletions for
    ``horizon_timeout`` seconds (the rewrite then kept what that snapshot sees)."""
    if engine.dialect.name == "sqlite":
        raw = engine.raw_connection()
        try:
            busy, _, _ = raw.driver_connection.execute(
                "PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            raw.close()
        return busy == 0
    with engine.connect() as conn:
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        horizon_passed = _wait_for_older_snapshots(autocommit, timeout=horizon_timeout)
        for table in tables:
            autocommit.exec_driver_sql(f"VACUUM FULL {table.name}")
    return horizon_passed


def _wait_for_older_snapshots(conn: Connection, *, timeout: float) -> bool:
    """Wait until no other session of this database holds a snapshot taken before now.

    ``VACUUM FULL`` copies a deleted row into the new heap when a snapshot that still sees it
    is open ("recently dead"), so a rewrite started while an older transaction runs would keep
    the erased text on disk. A transaction id taken now marks "after the deletions"; every
    session whose ``backend_xmin`` is older may still see them. False if one still does after
    ``timeout`` seconds (the caller reports the scrub as unfinished)."""
    now = conn.exec_driver_sql("SELECT pg_current_xact_id()::text").scalar_one()
    deadline = time.monotonic() + timeout
    while True:
        older = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND datname = current_database() AND backend_xmin IS NOT NULL "
            "AND age(backend_xmin) > age(%(now)s::xid)", {"now": now}).scalar_one()
        if not older:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _secure_delete(conn: Connection) -> None:
    """On SQLite, have this connection zero what it deletes instead of leaving it on the page."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA secure_delete=ON")


def _subject_aad(key_id: str, tenant: str, subject: str) -> bytes:
    """Binds a wrapped key to its row, so a wrapped key copied onto another subject's row
    fails to unwrap instead of opening that subject's content."""
    return f"memwarden subject key {key_id} {tenant} {subject}".encode()


def _memory_aad(key_id: str, cube_id: str) -> bytes:
    return f"memwarden memory key {key_id} {cube_id}".encode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
