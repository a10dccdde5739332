"""Per-data-subject encryption keys, kept outside the log (crypto-shredding).

Memory content in event payloads is sealed with AES-256-GCM under a key that belongs to one data
subject. Those keys live in the ``subject_keys`` table of the same database as the log, each
*wrapped* (AES-256-GCM again) under a master key that never touches the database: it comes from
``MEMWARDEN_MASTER_KEY`` (base64) or from a key file (``MEMWARDEN_KEY_FILE``, default
``./data/master.key``) created with mode 0600 on first start. So the log, Kafka and backups of
either hold only ciphertext, and destroying one row makes one subject's content unreadable
everywhere at once, however many copies of the log exist.

Keys are only ever removed by ``destroy``: an envelope whose key is missing belongs to an erased
subject. Nothing is cached in memory, so an erasure takes effect in every process at once.

Deleted rows can outlive a DELETE in the database files: SQLite leaves the bytes on the page (or
on a free page) and keeps older copies of the page in the write-ahead log; PostgreSQL leaves the
dead tuple in the heap until a vacuum, and a plain vacuum does not overwrite it. ``destroy``
therefore deletes with ``PRAGMA secure_delete=ON`` (SQLite zeroes the freed cell) and then
``scrub``s: a ``wal_checkpoint(TRUNCATE)`` on SQLite copies the zeroed pages into the database
file and empties the WAL; ``VACUUM FULL subject_keys`` on PostgreSQL rewrites the (small) table
into a new file. PostgreSQL's own WAL archive and any backup still hold the *wrapped* key until
they age out; they cannot be opened without the master key.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Column, Engine, LargeBinary, MetaData, String, Table, delete, insert, select
from sqlalchemy import exc as sa_exc

from eventstore import UTCDateTime, utcnow
from governance._config import ConfigError
from governance._errors import MemWardenError

ALGORITHM = "AES-256-GCM"
KEY_BYTES = 32
_NONCE_BYTES = 12
DEFAULT_KEY_FILE = "./data/master.key"

metadata = MetaData()

subject_keys = Table(
    "subject_keys",
    metadata,
    Column("key_id", String(36), primary_key=True),
    Column("subject", String(200), nullable=False, unique=True),
    # nonce followed by the AES-GCM sealed subject key; never the key itself.
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)


class SubjectKeyDestroyed(MemWardenError):
    """The content belongs to an erased data subject: its key is gone for good."""

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(f"this content belongs to an erased data subject: key {key_id} was "
                         "destroyed and the content can never be read again")


class UndecryptableContent(MemWardenError):
    """An envelope is malformed, was altered, or is read under another binding (``aad``)."""


# -- the master key ----------------------------------------------------------------------------

def load_master_key(environ: Mapping[str, str] | None = None) -> bytes:
    """The master key from ``MEMWARDEN_MASTER_KEY``, else from the key file (created if absent)."""
    env = os.environ if environ is None else environ
    encoded = env.get("MEMWARDEN_MASTER_KEY")
    if encoded:
        return _decoded_key(encoded, "MEMWARDEN_MASTER_KEY")
    return read_or_create_key_file(Path(env.get("MEMWARDEN_KEY_FILE") or DEFAULT_KEY_FILE))


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


# -- the vault ---------------------------------------------------------------------------------

class KeyVault:
    """Seals and opens memory content with per-subject keys kept in ``subject_keys``."""

    def __init__(self, engine: Engine, master_key: bytes) -> None:
        if len(master_key) != KEY_BYTES:
            raise ConfigError(f"the master key must be {KEY_BYTES} bytes")
        self._engine = engine
        self._master = AESGCM(master_key)

    def create_schema(self) -> None:
        with self._engine.begin() as conn:
            metadata.create_all(conn)

    def encrypt(self, subject: str, plaintext: str, *, aad: str) -> dict[str, str]:
        """Seal ``plaintext`` under ``subject``'s key (created on first use).

        ``aad`` is authenticated but not stored: pass what the envelope belongs to (e.g.
        ``"<cube id>/<version>"``) so that an envelope copied elsewhere fails to open.
        """
        key_id, key = self._key_for(subject)
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = AESGCM(key).encrypt(nonce, plaintext.encode(), aad.encode())
        return {"alg": ALGORITHM, "key_id": key_id, "nonce": _b64(nonce),
                "ciphertext": _b64(sealed)}

    def decrypt(self, envelope: Mapping[str, Any], *, aad: str) -> str:
        """Open an envelope made by ``encrypt`` with the same ``aad``.

        Raises ``SubjectKeyDestroyed`` once the subject has been erased.
        """
        if not is_envelope(envelope):
            raise UndecryptableContent("not an encrypted content envelope")
        key_id = envelope["key_id"]
        with self._engine.connect() as conn:
            row = conn.execute(select(subject_keys).where(subject_keys.c.key_id == key_id)).first()
        if row is None:
            raise SubjectKeyDestroyed(key_id)
        key = self._unwrap(key_id, row.subject, row.wrapped_key)
        try:
            nonce = base64.b64decode(envelope["nonce"], validate=True)
            sealed = base64.b64decode(envelope["ciphertext"], validate=True)
            return AESGCM(key).decrypt(nonce, sealed, aad.encode()).decode()
        except (binascii.Error, ValueError, InvalidTag):
            raise UndecryptableContent(
                f"content sealed under key {key_id} fails authentication: it was altered, or "
                "it is read for another memory or version than it was written for") from None

    def destroy(self, subject: str) -> bool:
        """Delete ``subject``'s key for good, then ``scrub``; False if it had none."""
        with self._engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                # Zero the freed cell instead of leaving the wrapped key on the page.
                conn.exec_driver_sql("PRAGMA secure_delete=ON")
            deleted = conn.execute(delete(subject_keys).where(subject_keys.c.subject == subject))
        self.scrub()
        return deleted.rowcount > 0

    def scrub(self) -> bool:
        """Push deleted keys out of the database files (see the module docstring).

        False when SQLite could not finish because a reader held the WAL for longer than the
        busy timeout: the bytes then go at a later checkpoint, and calling again finishes it.
        """
        if self._engine.dialect.name == "sqlite":
            raw = self._engine.raw_connection()
            try:
                busy, _, _ = raw.driver_connection.execute(
                    "PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                raw.close()
            return busy == 0
        with self._engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                f"VACUUM FULL {subject_keys.name}")
        return True

    def _key_for(self, subject: str) -> tuple[str, bytes]:
        existing = self._find(subject)
        if existing is not None:
            return existing
        key_id, key = str(uuid.uuid4()), AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        nonce = secrets.token_bytes(_NONCE_BYTES)
        wrapped = nonce + self._master.encrypt(nonce, key, _wrapping_aad(key_id, subject))
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(subject_keys).values(
                    key_id=key_id, subject=subject, wrapped_key=wrapped, created_at=utcnow()))
        except sa_exc.IntegrityError:
            # Another writer created this subject's key at the same moment: use theirs.
            found = self._find(subject)
            if found is None:
                raise
            return found
        return key_id, key

    def _find(self, subject: str) -> tuple[str, bytes] | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(subject_keys).where(subject_keys.c.subject == subject)).first()
        if row is None:
            return None
        return row.key_id, self._unwrap(row.key_id, subject, row.wrapped_key)

    def _unwrap(self, key_id: str, subject: str, wrapped: bytes) -> bytes:
        nonce, sealed = wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:]
        try:
            return self._master.decrypt(nonce, sealed, _wrapping_aad(key_id, subject))
        except InvalidTag:
            raise ConfigError(
                f"cannot unwrap subject key {key_id}: the master key is not the one this "
                "database's keys were wrapped with (or the key row was altered)") from None


def is_envelope(value: Any) -> bool:
    """Whether ``value`` is an envelope ``encrypt`` made (content written before encryption
    existed is plain text)."""
    return (isinstance(value, Mapping) and value.get("alg") == ALGORITHM
            and all(isinstance(value.get(name), str) for name in ("key_id", "nonce", "ciphertext")))


def _wrapping_aad(key_id: str, subject: str) -> bytes:
    """Binds a wrapped key to its row, so a wrapped key copied onto another subject's row
    fails to unwrap instead of opening that subject's content."""
    return f"memwarden subject key {key_id} {subject}".encode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
