"""Sensitive data on the write and read paths: sealing text in the log, findings, masking.

- ``ContentCodec`` is the event store's ``PayloadCodec``: it replaces ``content.text`` in every
  payload with ``content.sealed_text``, an AES-256-GCM envelope under the memory's key (see
  ``governance._keyvault``), bound to its event, before the event is hashed and stored. Reading
  back, it opens the envelope; when the memory's key is gone (its content or its subject was
  erased), the text comes back empty with ``content.erased`` set. Projections, workers and Kafka
  consumers (``EventStore.decode``) thus see plaintext, or no text at all, never ciphertext.
- ``SensitiveData`` scans the text of every write with Presidio (``governance._pii``), in one
  batch per command, appends a ``SensitiveDataDetected`` event after each content event whose text
  holds something the policy cares about (entity types, offsets, scores, analyzer: never the
  values), refuses writes the policy blocks, and masks text for readers without
  ``memory.read_sensitive`` (``masked``).

``MEMWARDEN_PII_SCAN=0`` turns scanning off (load tests and benchmarks that are not about personal
data: scanning costs ~20 ms per text); encryption and masking of findings already recorded stay on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import Connection, Engine

from eventstore import NewEvent, StoredEvent
from eventstore._driver import DriverConnection
from governance._keyvault import KeyVault, MemoryKey, is_envelope, open_sealed, seal
from governance._pii import (
    Action,
    Finding,
    PiiPolicy,
    PresidioScanner,
    SensitiveDataBlocked,
    SensitiveDataScanner,
    shared_scanner,
)
from projections import MEMORY_CREATED, SENSITIVE_DATA_DETECTED, MemoryState
from projections._sensitive import CONTENT_EVENT_TYPES, SensitiveQueries

SEALED_TEXT = "sealed_text"
"""Where the stored form of a payload keeps its sealed ``content.text``."""

_SELECT_CREATED = ("SELECT stream_id, tenant, payload FROM events "
                   "WHERE stream_version = 1 AND stream_id IN {keys}")


def _content_aad(event: StoredEvent) -> str:
    """Binds sealed text to its event: copied into another event, it fails to open."""
    return f"memwarden content {event.stream_id} {event.event_id}"


def _text_to_seal(payload: Mapping[str, Any]) -> str | None:
    content = payload.get("content")
    if isinstance(content, Mapping) and isinstance(content.get("text"), str):
        return content["text"]
    return None


class ContentCodec:
    """Seals memory text in event payloads under per-memory keys (a ``PayloadCodec``)."""

    def __init__(self, vault: KeyVault) -> None:
        self.vault = vault

    def create_schema(self, conn: Connection) -> None:
        self.vault.create_schema(conn)

    def encode(self, conn: Connection, events: Sequence[StoredEvent]) -> list[Mapping[str, Any]]:
        texts = [_text_to_seal(event.payload) for event in events]
        owners: dict[str, tuple[str, str] | None] = {}
        for event, text in zip(events, texts, strict=True):
            if text is None:
                continue
            if event.type == MEMORY_CREATED:
                owners[event.stream_id] = (event.tenant or "", event.payload["owner"])
            else:
                owners.setdefault(event.stream_id, None)
        if not owners:
            return [event.payload for event in events]
        keys = self.vault.memory_keys_for_writing(
            conn, owners, owners_of=lambda cube_ids: _created_owners(conn, cube_ids))
        encoded: list[Mapping[str, Any]] = []
        for event, text in zip(events, texts, strict=True):
            if text is None:
                encoded.append(event.payload)
                continue
            content = {k: v for k, v in event.payload["content"].items() if k != "text"}
            content[SEALED_TEXT] = seal(keys[event.stream_id], text, aad=_content_aad(event))
            encoded.append({**event.payload, "content": content})
        return encoded

    def decode(self, conn: Connection, events: Sequence[StoredEvent]) -> list[StoredEvent]:
        # Each event's envelope is found once (a rebuild decodes every event of the log).
        envelopes = [_sealed_envelope(event) for event in events]
        key_ids = {envelope["key_id"] for envelope in envelopes if envelope is not None}
        if not key_ids:
            return list(events)
        keys = self.vault.memory_keys(conn, key_ids)
        return [event if envelope is None else self._decoded(event, envelope, keys)
                for event, envelope in zip(events, envelopes, strict=True)]

    @staticmethod
    def _decoded(event: StoredEvent, envelope: Mapping[str, Any],
                 keys: Mapping[str, MemoryKey]) -> StoredEvent:
        content = dict(event.payload["content"])
        del content[SEALED_TEXT]
        key = keys.get(envelope["key_id"])
        if key is None:
            content["text"], content["erased"] = "", True
        else:
            content["text"] = open_sealed(key, envelope, aad=_content_aad(event))
        return event.with_payload({**event.payload, "content": content})


def _sealed_envelope(event: StoredEvent) -> Mapping[str, Any] | None:
    content = event.payload.get("content")
    if isinstance(content, Mapping) and is_envelope(content.get(SEALED_TEXT)):
        return content[SEALED_TEXT]
    return None


def _created_owners(conn: Connection, cube_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """The owner of each memory, from its creation event (the owner is never sealed): for a
    memory written before encryption existed, whose first sealed write makes its key."""
    db = DriverConnection(conn)
    return {stream_id: (tenant or "", json.loads(payload)["owner"])
            for stream_id, tenant, payload in db.fetch_in_chunks(_SELECT_CREATED, list(cube_ids))}


# -- findings and masking ----------------------------------------------------------------------

class SensitiveData:
    """The sensitive data policy applied to writes (scan, record, block) and reads (mask)."""

    def __init__(self, engine: Engine, policy: PiiPolicy, *, scan: bool = True,
                 scanner: SensitiveDataScanner | None = None) -> None:
        self.policy = policy
        self.scan_enabled = scan
        self._scanner = scanner
        self.queries = SensitiveQueries(engine)

    @property
    def scanner(self) -> SensitiveDataScanner:
        if self._scanner is None:
            self._scanner = shared_scanner(self.policy)
        return self._scanner

    def warm_up(self) -> None:
        """Load the analyzer now (seconds, once per process) rather than during a write: a
        server does it before it serves, so that its first write is as fast as the others."""
        if self.scan_enabled and isinstance(self.scanner, PresidioScanner):
            self.scanner.warm_up()

    def inspect(self, writes: Sequence[tuple[int, Sequence[NewEvent]]]) -> list[list[NewEvent]]:
        """For each write (the stream version its first event will get, its events): the events
        with a ``SensitiveDataDetected`` after each one whose text holds findings. All texts of
        all writes go to the analyzer in one batch. Raises ``SensitiveDataBlocked`` (and nothing
        may then be stored) if any text holds an entity type the policy blocks."""
        if not self.scan_enabled:
            return [list(events) for _, events in writes]
        texts = [text for _, events in writes for e in events
                 if (text := _text_to_seal(e.payload)) is not None]
        if not texts:
            return [list(events) for _, events in writes]
        found = iter(self.scanner.scan(texts))
        result: list[list[NewEvent]] = []
        blocked: set[str] = set()
        for first_version, events in writes:
            out: list[NewEvent] = []
            for event in events:
                out.append(event)
                if _text_to_seal(event.payload) is None:
                    continue
                findings = next(found)
                verdict = self.policy.decide(findings)
                blocked |= {t for t, a in verdict.actions.items() if a is Action.BLOCK}
                if verdict.findings:
                    out.append(NewEvent(SENSITIVE_DATA_DETECTED, {
                        "version": first_version + len(out) - 1,
                        "entity_types": sorted(verdict.actions),
                        "actions": {t: str(a) for t, a in sorted(verdict.actions.items())},
                        "findings": [f.to_dict() for f in findings],
                        "analyzer": self.scanner.version,
                    }))
            result.append(out)
        if blocked:
            raise SensitiveDataBlocked(sorted(blocked))
        return result

    def carry_forward(self, cube_id: str, first_version: int, events: Sequence[NewEvent],
                      earlier_texts: Mapping[int, str]) -> list[NewEvent]:
        """With scanning off, a write that sets a text the memory showed before (a metadata-only
        update, a rollback) gets that text's findings again, in a ``SensitiveDataDetected``
        naming where they came from: else the new version would carry no findings, and text
        masked until then would be shown unmasked. ``earlier_texts``: the text each earlier
        version showed. With scanning on, ``inspect`` has scanned the text anew."""
        if self.scan_enabled:
            return list(events)
        shown_by: dict[str, int] = {}
        for version, text in sorted(earlier_texts.items()):
            if text:
                shown_by[text] = version  # the latest version that showed it
        sources = {i: shown_by[text] for i, event in enumerate(events)
                   if (text := _text_to_seal(event.payload)) is not None and text in shown_by}
        known = self.queries.findings_for([(cube_id, v) for v in set(sources.values())])
        out: list[NewEvent] = []
        for i, event in enumerate(events):
            out.append(event)
            findings = known.get((cube_id, sources[i])) if i in sources else None
            if not findings:
                continue
            verdict = self.policy.decide(Finding.from_dict(f) for f in findings)
            out.append(NewEvent(SENSITIVE_DATA_DETECTED, {
                "version": first_version + len(out) - 1,
                "entity_types": sorted(verdict.actions),
                "actions": {t: str(a) for t, a in sorted(verdict.actions.items())},
                "findings": list(findings),
                "analyzer": f"carried forward from version {sources[i]} (scanning off)",
            }))
        return out

    def masked(self, states: Sequence[MemoryState],
               may_read_sensitive: Callable[[Sequence[MemoryState]], set[str]], *,
               written: Sequence[StoredEvent] = ()) -> list[MemoryState]:
        """``states`` as a reader sees them: the text of each memory the reader may not read
        unmasked (``may_read_sensitive`` gives the cube ids it may) has the values the policy
        hides replaced by ``<ENTITY_TYPE>``. ``written``: the events a command just stored,
        which tell the findings of the memories whose text they set without a query."""
        with_text = [s for s in states if s.text]
        known = findings_written(written)
        findings = {(s.cube_id, s.version): known[s.cube_id] for s in with_text
                    if known.get(s.cube_id)}
        findings.update(self.queries.findings_for(
            [(s.cube_id, s.version) for s in with_text if s.cube_id not in known]))
        if not findings:
            return list(states)
        concerned = [s for s in with_text if (s.cube_id, s.version) in findings]
        allowed = may_read_sensitive(concerned)
        shown: dict[tuple[str, int], str] = {}
        for state in concerned:
            if state.cube_id in allowed:
                continue
            shown[state.cube_id, state.version] = self.mask_text(
                state.text, findings[state.cube_id, state.version])
        return [replace(s, text=shown[s.cube_id, s.version])
                if (s.cube_id, s.version) in shown else s for s in states]

    def mask_text(self, text: str, raw_findings: Sequence[Mapping[str, Any]]) -> str:
        """``text`` with what the policy hides (``mask_on_read``, and ``block`` in text stored
        before its entity type was blocked) replaced by ``<ENTITY_TYPE>``."""
        verdict = self.policy.decide(Finding.from_dict(f) for f in raw_findings)
        return self.scanner.mask(text, [f for f in verdict.to_mask if f.end <= len(text)])


def findings_written(events: Sequence[StoredEvent]) -> dict[str, list[Any]]:
    """For each memory whose text ``events`` (one command's, in order) set: the raw findings of
    its latest text, empty when nothing was found. Those of its latest version are the findings
    the ``sensitive_content`` read model records for it, the ``SensitiveDataDetected`` that a
    write appends right after the content event it scanned (none when nothing was found, or
    scanning is off)."""
    content_versions: dict[str, int] = {}
    detected: dict[tuple[str, int], list[Any]] = {}
    for event in events:
        if event.type in CONTENT_EVENT_TYPES:
            content_versions[event.stream_id] = event.stream_version
        elif event.type == SENSITIVE_DATA_DETECTED:
            detected[event.stream_id, event.payload["version"]] = list(event.payload["findings"])
    return {cube_id: detected.get((cube_id, version), [])
            for cube_id, version in content_versions.items()}
