"""Portable bundles (MemOS's MemDumper/MemLoader): a tenant's memories, moved between instances.

A bundle is one JSON file: a versioned ``body`` (every event of the tenant's memory streams, in
their *stored* form, so memory text stays sealed; optionally the memory keys that open it) and an
Ed25519 ``signature`` over it by the exporting instance's identity key, with that ``signer``'s
public key. The identity key is made on first use, in ``<data dir>/instance_identity.key`` (0600).

Import refuses, with ``BundleRejected``, a bundle whose signature does not match its contents
(tampered) and one signed by an instance it does not trust: its own identity, and the public
keys passed as ``trusted`` (``memwarden bundle import --trust KEY``; ``memwarden bundle
identity`` prints an instance's key). It appends each memory's events to the same stream, each
with its original event id, actor, on-behalf-of, correlation and time of occurrence (history and
provenance kept; the sealed text stays bound to its event), then one ``MemoryImported`` event
naming the bundle, its signer and the source positions and hashes of what it brought.

Keys travel only if asked (``with_keys``): the memory keys, wrapped under a key derived from a
passphrase (scrypt, AES-256-GCM), are installed in the importing instance's key vault.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from sqlalchemy import Connection, insert, select

from eventstore import (
    ConcurrencyError,
    EventContext,
    IntegrityError,
    NewEvent,
    StoredEvent,
    StreamAppend,
    canonical_json,
    utcnow,
)
from eventstore._driver import DriverConnection
from eventstore._kafka import stored_rows
from governance._errors import InvalidCommand, MemWardenError
from governance._keyvault import _NONCE_BYTES, _memory_aad, memory_keys
from governance._principal import Resource, validate_tenant
from governance._sdk import MemWarden
from projections import MEMORY_CREATED

FORMAT = "memwarden-bundle"
VERSION = 1
MEMORY_IMPORTED = "MemoryImported"
IDENTITY_FILE = "instance_identity.key"
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}


class BundleRejected(MemWardenError):
    """The bundle is not one to import: unreadable, tampered, or signed by an untrusted
    instance."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def key_id(public_key: str) -> str:
    """A short name for an instance's public key (sha256 prefix)."""
    return hashlib.sha256(base64.b64decode(public_key)).hexdigest()[:16]


def instance_identity(data_dir: Path) -> Ed25519PrivateKey:
    """This instance's signing key, made (0600) on first use."""
    path = data_dir / IDENTITY_FILE
    if path.exists():
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise BundleRejected(f"{path} is not an Ed25519 key")
        return loaded
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return key


def public_key_of(key: Ed25519PrivateKey) -> str:
    return _b64(key.public_key().public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw))


def _data_dir(mw: MemWarden) -> Path:
    return Path(mw.settings.data_dir)


def identity(mw: MemWarden) -> str:
    """This instance's public key (what another instance passes to ``--trust``)."""
    mw.require("platform.operate", Resource.of_tenant("*"))
    return public_key_of(instance_identity(_data_dir(mw)))


# -- export ------------------------------------------------------------------------------------


def export_bundle(mw: MemWarden, tenant: str, *, passphrase: str | None = None) -> dict[str, Any]:
    """The signed bundle of ``tenant``'s memories (with their keys if ``passphrase`` is given)."""
    validate_tenant(tenant, platform_allowed=False)
    mw.require("bundle.export", Resource.of_tenant(tenant))
    mw.flush_reads()
    store = mw.store
    with store.engine.connect() as conn:
        cube_ids = [row[0] for row in DriverConnection(conn, store.dialect).execute(
            "SELECT stream_id FROM events WHERE tenant = ? AND type = ? ORDER BY position",
            (tenant, MEMORY_CREATED)).fetchall()]
    wanted = set(cube_ids)
    streams: dict[str, list[dict[str, Any]]] = {cube_id: [] for cube_id in cube_ids}
    after = 0
    while True:
        rows = stored_rows(store, after, 5000)
        for row in rows:
            if row["stream_id"] in wanted:
                streams[row["stream_id"]].append(_portable(row))
        if len(rows) < 5000:
            break
        after = rows[-1]["position"]
    body: dict[str, Any] = {
        "bundle_id": str(uuid.uuid4()),
        "tenant": tenant,
        "exported_at": utcnow().isoformat(),
        "exported_by": mw.actor,
        "streams": [{"cube_id": cube_id, "events": events} for cube_id, events in streams.items()],
        "keys": None,
    }
    if passphrase is not None:
        body["keys"] = _wrapped_keys(mw, cube_ids, passphrase)
    signing = instance_identity(_data_dir(mw))
    return {"format": FORMAT, "version": VERSION, "signer": public_key_of(signing),
            "signature": _b64(signing.sign(canonical_json(body).encode())), "body": body}


def _portable(row: Mapping[str, Any]) -> dict[str, Any]:
    event = {name: row[name] for name in (
        "position", "event_id", "stream_version", "type", "schema_version", "actor",
        "on_behalf_of", "correlation_id", "causation_id", "hash")}
    event["occurred_at"] = row["occurred_at"].isoformat()
    event["recorded_at"] = row["recorded_at"].isoformat()
    event["payload"] = json.loads(row["payload"])  # stored form: text sealed
    return event


def _wrapped_keys(mw: MemWarden, cube_ids: Sequence[str], passphrase: str) -> dict[str, Any]:
    vault = mw._backend.vault
    with mw.store.engine.connect() as conn:
        key_ids = list(conn.execute(select(memory_keys.c.key_id).where(
            memory_keys.c.cube_id.in_(cube_ids))).scalars()) if cube_ids else []
        found = vault.memory_keys(conn, key_ids)
    plain = canonical_json([{"key_id": k.key_id, "cube_id": k.cube_id, "subject": k.subject,
                             "key": _b64(k.key)} for k in found.values()]).encode()
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(_NONCE_BYTES)
    wrapping = Scrypt(salt=salt, length=32, **_SCRYPT).derive(passphrase.encode())
    return {"kdf": "scrypt", **_SCRYPT, "salt": _b64(salt), "nonce": _b64(nonce),
            "ciphertext": _b64(AESGCM(wrapping).encrypt(nonce, plain, b"memwarden bundle keys"))}


# -- import ------------------------------------------------------------------------------------


def read_bundle(data: bytes, *, own_key: str, trusted: Sequence[str] = ()) -> dict[str, Any]:
    """The body of a bundle, once its format, signature and signer are checked."""
    try:
        bundle = json.loads(data)
        if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
            raise ValueError("no MemWarden bundle header")
        signer, signature, body = bundle["signer"], bundle["signature"], bundle["body"]
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(signer))
        signed = base64.b64decode(signature)
    except (ValueError, KeyError, TypeError) as error:
        raise BundleRejected(f"not a MemWarden bundle: {error}") from None
    if bundle.get("version") != VERSION:
        raise BundleRejected(f"bundle format version {bundle.get('version')} is not supported "
                             f"(this instance reads version {VERSION})")
    try:
        public.verify(signed, canonical_json(body).encode())
    except InvalidSignature:
        raise BundleRejected("the bundle was altered after it was signed: its signature does "
                             "not match its contents") from None
    if signer != own_key and signer not in trusted:
        raise BundleRejected(f"the bundle is signed by instance {key_id(signer)}, which this "
                             f"instance does not trust; if you do, import with --trust {signer}")
    return body


def import_bundle(mw: MemWarden, data: bytes, *, trusted: Sequence[str] = (),
                  passphrase: str | None = None) -> dict[str, Any]:
    """Import a bundle's memories with their history; returns a summary."""
    try:
        claimed = json.loads(data)["body"]["tenant"]
    except (ValueError, KeyError, TypeError):
        raise BundleRejected("not a MemWarden bundle: no body naming a tenant") from None
    # Who may import into the tenant is decided before anything else is looked at.
    mw.require("bundle.import", Resource.of_tenant(validate_tenant(claimed,
                                                                   platform_allowed=False)))
    own = public_key_of(instance_identity(_data_dir(mw)))
    body = read_bundle(data, own_key=own, trusted=trusted)
    tenant = validate_tenant(body["tenant"], platform_allowed=False)
    keys = _unwrapped_keys(body["keys"], passphrase) if body["keys"] else []
    signer = key_id(json.loads(data)["signer"])
    appends: list[StreamAppend] = []
    for stream in body["streams"]:
        version = 0
        for event in stream["events"]:
            appends.append(StreamAppend(stream["cube_id"], [NewEvent(
                event["type"], event["payload"], event["schema_version"],
                datetime.fromisoformat(event["occurred_at"]), uuid.UUID(event["event_id"]))],
                version, EventContext(actor=event["actor"], tenant=tenant,
                                      on_behalf_of=event["on_behalf_of"],
                                      correlation_id=event["correlation_id"],
                                      causation_id=event["causation_id"])))
            version += 1
        appends.append(StreamAppend(stream["cube_id"], [NewEvent(MEMORY_IMPORTED, {
            "bundle_id": body["bundle_id"], "signer": signer, "exported_at": body["exported_at"],
            "exported_by": body["exported_by"], "with_keys": bool(keys),
            "source_events": [[e["stream_version"], e["position"], e["hash"]]
                              for e in stream["events"]]})],
            version, EventContext(actor=mw.actor, tenant=tenant, on_behalf_of=mw.on_behalf_of)))
    backend = mw._backend

    def install_keys_then_project(conn: Connection, stored: list[StoredEvent]) -> None:
        _install_keys(mw, conn, tenant, keys)
        if backend.project_synchronously:
            # The events were appended in their stored form: projections want them decoded.
            backend.runner.project_new_events(conn, mw.store.decode(stored, connection=conn))

    try:
        stored = mw.store.append_many(appends, then=install_keys_then_project)
    except (ConcurrencyError, IntegrityError) as error:
        raise InvalidCommand(f"the bundle's memories (or events) already exist here; was it "
                             f"imported before? ({error})") from None
    return {"bundle_id": body["bundle_id"], "tenant": tenant, "signer": signer,
            "memories": len(body["streams"]), "events": len(stored), "keys": len(keys)}


def _unwrapped_keys(wrapped: Mapping[str, Any], passphrase: str | None) -> list[dict[str, str]]:
    if passphrase is None:
        raise InvalidCommand("this bundle carries its memories' keys: give the passphrase it "
                             "was exported with")
    try:
        wrapping = Scrypt(salt=base64.b64decode(wrapped["salt"]), length=32, n=wrapped["n"],
                          r=wrapped["r"], p=wrapped["p"]).derive(passphrase.encode())
        plain = AESGCM(wrapping).decrypt(base64.b64decode(wrapped["nonce"]),
                                         base64.b64decode(wrapped["ciphertext"]),
                                         b"memwarden bundle keys")
    except InvalidTag:
        raise BundleRejected("wrong passphrase for the bundle's keys") from None
    return list(json.loads(plain))


def _install_keys(mw: MemWarden, conn: Connection, tenant: str,
                  keys: Sequence[Mapping[str, str]]) -> None:
    """Each memory key under its subject's key in this vault, with its original id (the sealed
    texts name it)."""
    if not keys:
        return
    vault = mw._backend.vault
    subjects = vault._subject_keys(conn, {(tenant, k["subject"]) for k in keys})
    now = utcnow()
    rows = []
    for k in keys:
        subject_key_id, subject_key = subjects[tenant, k["subject"]]
        nonce = secrets.token_bytes(_NONCE_BYTES)
        wrapped = nonce + AESGCM(subject_key).encrypt(
            nonce, base64.b64decode(k["key"]), _memory_aad(k["key_id"], k["cube_id"]))
        rows.append({"key_id": k["key_id"], "cube_id": k["cube_id"],
                     "subject_key_id": subject_key_id, "wrapped_key": wrapped,
                     "created_at": now})
    conn.execute(insert(memory_keys), rows)
