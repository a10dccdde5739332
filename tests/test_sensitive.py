"""Sensitive data end to end, on every backend, with the real Presidio scanner and real AES-GCM:
findings on write, blocked writes, text sealed in the log, masking on every read surface, erasure
of one memory's content, export.

Presidio and spaCy load once per test process (a few seconds, the first time).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import text

from eventstore import EventStore
from governance import (
    MemoryState,
    MemWarden,
    PermissionDenied,
    PolicyRule,
    Principal,
    Settings,
    StateConflict,
)
from governance._errors import ContentErased
from governance._pii import SensitiveDataBlocked
from projections import MEMORY_CONTENT_ERASED, SENSITIVE_DATA_DETECTED

TENANT = "acme"
EMAIL, CARD = "ana.lopez@example.com", "4111 1111 1111 1111"
SECRET_TEXT = f"Refunds for John Smith go to {EMAIL}, card {CARD}."


@pytest.fixture
def open_handle(database_url: str) -> Iterator[Callable[..., MemWarden]]:
    handles: list[MemWarden] = []

    def open_(**settings: Any) -> MemWarden:
        handle = MemWarden.open(actor="ops:test", settings=Settings(db_url=database_url,
                                                                    **settings))
        handles.append(handle)
        return handle

    yield open_
    for handle in handles:
        handle.close()


@pytest.fixture
def mw(open_handle: Callable[..., MemWarden]) -> MemWarden:
    return open_handle()


def as_role(mw: MemWarden, role: str, subject: str | None = None) -> MemWarden:
    return mw.as_principal(Principal(subject or f"{role}:1", TENANT, role))


def raw_payloads(mw: MemWarden, cube_id: str) -> list[str]:
    """The events' payload column exactly as the database holds it."""
    with mw.store.engine.connect() as conn:
        return list(conn.execute(text("SELECT payload FROM events WHERE stream_id = :s "
                                      "ORDER BY stream_version"), {"s": cube_id}).scalars())


def test_a_memory_with_an_email_and_a_card_is_flagged_sealed_masked_and_clear_to_an_officer(
        mw: MemWarden) -> None:
    agent = as_role(mw, "agent")
    officer = as_role(mw, "compliance_officer")
    memory = agent.add(SECRET_TEXT, tenant=TENANT, owner="user:ana")

    # Flagged: a SensitiveDataDetected event in the same commit, naming types and offsets only.
    events = mw.store.read_stream(memory.cube_id)
    assert [e.type for e in events] == ["MemoryCreated", SENSITIVE_DATA_DETECTED]
    detected = events[1].payload
    assert {"EMAIL_ADDRESS", "CREDIT_CARD"} <= set(detected["entity_types"])
    spans = {(f["entity_type"], SECRET_TEXT[f["start"]:f["end"]]) for f in detected["findings"]}
    assert {("EMAIL_ADDRESS", EMAIL), ("CREDIT_CARD", CARD)} <= spans
    assert detected["version"] == 1 and detected["analyzer"].startswith("presidio-analyzer")
    assert EMAIL not in json.dumps(detected) and "4111" not in json.dumps(detected)
    assert events[0].recorded_at == events[1].recorded_at  # one commit

    # Stored encrypted: the raw rows hold ciphertext, never the text or any part of it.
    for payload in raw_payloads(mw, memory.cube_id):
        assert "ana.lopez" not in payload and "4111" not in payload and "Refunds" not in payload
    assert json.loads(raw_payloads(mw, memory.cube_id)[0])["content"]["sealed_text"]["alg"] == (
        "AES-256-GCM")
    assert mw.verify().ok

    # Masked for the agent that wrote it, in clear for a compliance officer.
    masked = agent.get(memory.cube_id).text
    assert masked == "Refunds for <PERSON> go to <EMAIL_ADDRESS>, card <CREDIT_CARD>."
    assert memory.text == masked  # even the write's own answer
    assert officer.get(memory.cube_id).text == SECRET_TEXT
    assert mw.findings(tenant=TENANT)[0].entity_types == tuple(detected["entity_types"])


def test_every_read_surface_masks_for_a_reader_without_read_sensitive(mw: MemWarden) -> None:
    # A tenant admin reads all of the tenant's content, but not personal data in clear.
    admin, officer = as_role(mw, "tenant_admin"), as_role(mw, "compliance_officer")
    first = admin.add(f"Mail {EMAIL} about the move.", tenant=TENANT, owner="user:ana")
    admin.update(first.cube_id, text="Nothing personal here any more.", reason="cleanup")
    admin.add(f"Mail {EMAIL} again.", tenant=TENANT, owner="user:ana")
    current = officer.get(first.cube_id)

    def texts(reader: MemWarden) -> dict[str, Any]:
        return {
            "list": [s.text for s in reader.list()],
            "history": [v.state.text for v in reader.history(first.cube_id)],
            "version": reader.version(first.cube_id, 1).state.text,
            "diff": reader.diff(first.cube_id, 1, current.version).text_diff,
            "as_of": reader.as_of(first.cube_id, position=first.position).text,
            "tenant_as_of": [s.text for s in reader.tenant_as_of(
                TENANT, position=first.position).values()],
        }

    for surface, shown in texts(admin).items():
        assert EMAIL not in json.dumps(shown), surface
        assert "<EMAIL_ADDRESS>" in json.dumps(shown), surface
    for surface, shown in texts(officer).items():
        assert EMAIL in json.dumps(shown), surface


def test_a_blocked_entity_type_refuses_the_write_and_stores_nothing(mw: MemWarden) -> None:
    head = mw.store.head_position()
    with pytest.raises(SensitiveDataBlocked, match="US_SSN") as raised:
        mw.add("Her social security number is 536-90-4399.", tenant=TENANT, owner="user:ana")
    assert raised.value.entity_types == ("US_SSN",)
    assert mw.store.head_position() == head

    memory = mw.add("Ana likes tea.", tenant=TENANT, owner="user:ana")
    head = mw.store.head_position()
    with pytest.raises(SensitiveDataBlocked, match="US_SSN"):
        mw.update(memory.cube_id, text="Her SSN is 536-90-4399.", reason="oops")
    assert mw.store.head_position() == head
    assert mw.get(memory.cube_id).text == "Ana likes tea."


def test_the_codec_serves_plaintext_to_readers_and_ciphertext_to_the_relay(
        mw: MemWarden) -> None:
    memory = mw.add(SECRET_TEXT, tenant=TENANT, owner="user:ana")
    decoded = mw.store.read_stream(memory.cube_id)
    stored = mw.store.read_stream(memory.cube_id, decoded=False)
    assert decoded[0].payload["content"]["text"] == SECRET_TEXT
    assert "text" not in stored[0].payload["content"]
    assert [e.hash for e in stored] == [e.hash for e in decoded]
    assert mw.store.decode(stored) == decoded
    everything = mw.store.read_all(0, limit=None, decoded=False)
    assert SECRET_TEXT not in json.dumps([e.payload for e in everything])


def test_scanning_can_be_turned_off_but_encryption_cannot(
        open_handle: Callable[..., MemWarden]) -> None:
    mw = open_handle(pii_scan=False)
    memory = mw.add(SECRET_TEXT, tenant=TENANT, owner="user:ana")
    assert [e.type for e in mw.store.read_stream(memory.cube_id)] == ["MemoryCreated"]
    assert all("ana.lopez" not in p for p in raw_payloads(mw, memory.cube_id))


def test_with_scanning_off_a_text_shown_before_keeps_its_findings(
        open_handle: Callable[..., MemWarden]) -> None:
    """Scanning is turned off after a text was found to hold an email: a metadata-only update
    and a rollback to that text must not show it unmasked to a reader without read_sensitive."""
    scanning = open_handle()
    memory = scanning.add(f"Mail {EMAIL} about the move.", tenant=TENANT, owner="user:ana")
    scanning.update(memory.cube_id, text="Nothing personal here.", reason="cleanup")

    unscanned = open_handle(pii_scan=False)
    unscanned.update(memory.cube_id, metadata={"tags": ["moved"]}, reason="tag it")
    unscanned.rollback(memory.cube_id, 1, reason="undo the cleanup")
    unscanned.update(memory.cube_id, metadata={"tags": ["again"]}, reason="retag")

    reader = as_role(unscanned, "tenant_admin")
    current = reader.get(memory.cube_id)
    assert "<EMAIL_ADDRESS>" in current.text and EMAIL not in current.text
    history = [v.state.text for v in reader.history(memory.cube_id)]
    assert EMAIL not in json.dumps(history) and "<EMAIL_ADDRESS>" in history[-1]
    carried = [e.payload["analyzer"] for e in unscanned.store.read_stream(memory.cube_id)
               if e.type == SENSITIVE_DATA_DETECTED][1:]
    # the rollback's and the retag's; the first tag update set a text with nothing to carry
    assert len(carried) == 2 and all(a.startswith("carried forward from version ")
                                     for a in carried)
    assert EMAIL in as_role(unscanned, "compliance_officer").get(memory.cube_id).text


def test_erasing_one_memorys_content_shreds_every_version_and_nothing_else(
        mw: MemWarden) -> None:
    doomed = mw.add(f"Old address of Ana: {EMAIL}", tenant=TENANT, owner="user:ana")
    mw.update(doomed.cube_id, text="Ana moved to Lisbon.", reason="moved")
    kept = mw.add("Ana prefers tea.", tenant=TENANT, owner="user:ana")

    erased = mw.erase_memory_content(doomed.cube_id, reason="retention: 90 days",
                                     rule="short-lived")
    assert erased.content_erased and erased.last_event == MEMORY_CONTENT_ERASED
    assert [v.state.text for v in mw.history(doomed.cube_id)] == [""] * erased.version
    assert all(e.payload["content"].get("erased") for e in mw.store.read_stream(doomed.cube_id)
               if "content" in e.payload)
    assert mw.get(kept.cube_id).text == "Ana prefers tea."

    with pytest.raises(ContentErased):
        mw.rollback(doomed.cube_id, 1, reason="bring it back")
    with pytest.raises(ContentErased):
        mw.as_of(doomed.cube_id, position=doomed.position)
    with pytest.raises(ContentErased):
        mw.update(doomed.cube_id, text="new text", reason="reuse")
    with pytest.raises(StateConflict):
        mw.erase_memory_content(doomed.cube_id, reason="again")
    assert mw.erasures(tenant=TENANT)[0].rule == "short-lived"
    assert mw.verify().ok

    mw.flush_reads()
    incremental = mw.projector.digest()
    mw.rebuild_projections()
    assert mw.projector.digest() == incremental


def test_an_agent_may_not_erase_and_a_denied_erasure_destroys_nothing(mw: MemWarden) -> None:
    agent = as_role(mw, "agent")
    memory = agent.add("Ana likes tea.", tenant=TENANT, owner="user:ana")
    with pytest.raises(PermissionDenied):
        agent.erase_memory_content(memory.cube_id, reason="mine")
    with pytest.raises(PermissionDenied):
        agent.erase_subject("user:ana", tenant=TENANT, reason="mine")
    assert mw.get(memory.cube_id).text == "Ana likes tea."


def test_an_export_holds_every_version_findings_and_reads_and_is_recorded(
        mw: MemWarden) -> None:
    officer = as_role(mw, "compliance_officer")
    memory = mw.add(f"Mail {EMAIL}.", tenant=TENANT, owner="user:ana")
    mw.update(memory.cube_id, text="Ana likes tea.", reason="corrected")
    mw.add("About someone else.", tenant=TENANT, owner="user:ben")
    officer.get(memory.cube_id)
    mw.flush_reads()

    exported = officer.export_subject("user:ana", tenant=TENANT)
    assert [m["id"] for m in exported["memories"]] == [memory.cube_id]
    versions = exported["memories"][0]["versions"]
    assert [v["text"] for v in versions][:2] == [f"Mail {EMAIL}.", f"Mail {EMAIL}."]
    assert versions[-1]["text"] == "Ana likes tea."
    assert exported["findings"][0]["entity_types"] == ["EMAIL_ADDRESS"]
    assert any(r["actor"] == "compliance_officer:1" for r in exported["access_log"])
    assert "About someone else" not in json.dumps(exported)
    exports = mw.store.read_stream("subject:user:ana")
    assert exports[-1].type == "MemoryExported" and exports[-1].actor == "compliance_officer:1"


def test_an_export_is_masked_for_an_exporter_without_read_sensitive(mw: MemWarden) -> None:
    mw.add_policy_rule(PolicyRule("p", ("tenant_admin", TENANT, "subject.export", "any")),
                       reason="the tenant's admins answer access requests")
    mw.add(f"Mail {EMAIL}.", tenant=TENANT, owner="user:ana")
    exported = as_role(mw, "tenant_admin").export_subject("user:ana", tenant=TENANT)
    assert EMAIL not in json.dumps(exported)
    assert exported["memories"][0]["text"] == "Mail <EMAIL_ADDRESS>."


def test_redact_masks_states_from_any_source(mw: MemWarden) -> None:
    memory = mw.add(f"Mail {EMAIL}.", tenant=TENANT, owner="user:ana")
    state: MemoryState = mw.as_principal(Principal("ops:test", TENANT, "compliance_officer")
                                         ).get(memory.cube_id)
    assert as_role(mw, "agent").redact([state])[0].text == "Mail <EMAIL_ADDRESS>."
    assert as_role(mw, "compliance_officer").redact([state])[0].text == f"Mail {EMAIL}."


def test_a_bulk_add_is_scanned_in_one_batch_and_a_blocked_text_refuses_all(
        mw: MemWarden) -> None:
    added = mw.add_many([
        {"text": f"Mail {EMAIL}.", "owner": "user:ana"},
        {"text": "Prefers tea.", "owner": "user:ana", "id": "bulk-2"},
        {"text": "Call (212) 555-0143 tomorrow.", "owner": "user:ben"},
    ], tenant=TENANT)
    assert [m.version for m in added] == [2, 1, 2]  # created, then findings where found
    assert {tuple(f.entity_types) for f in mw.findings(tenant=TENANT)} == {
        ("EMAIL_ADDRESS",), ("PHONE_NUMBER",)}
    assert all(EMAIL not in p for p in raw_payloads(mw, added[0].cube_id))

    head = mw.store.head_position()
    with pytest.raises(SensitiveDataBlocked, match="US_SSN"):
        mw.add_many([{"text": "Fine.", "owner": "user:ana"},
                     {"text": "SSN 536-90-4399 on file.", "owner": "user:ana"}],
                    tenant=TENANT)
    assert mw.store.head_position() == head


def test_many_erasures_can_share_one_scrub(mw: MemWarden) -> None:
    memories = [mw.add(f"canary-batch-{n}", tenant=TENANT, owner="user:ana") for n in range(3)]
    for memory in memories:
        mw.erase_memory_content(memory.cube_id, reason="expired", rule="ttl", scrub=False)
    assert mw.scrub_erased() is True
    with mw.store.engine.connect() as conn:
        rows = conn.execute(text("SELECT text FROM versions WHERE text <> ''")).scalars().all()
    assert not any("canary-batch" in row for row in rows)
    with pytest.raises(PermissionDenied):
        as_role(mw, "agent").scrub_erased()


def test_the_chain_verifies_without_any_key(mw: MemWarden, database_url: str) -> None:
    mw.add(SECRET_TEXT, tenant=TENANT, owner="user:ana")
    mw.erase_subject("user:ana", tenant=TENANT, reason="request")
    keyless = EventStore.open(database_url)  # no codec: what a backup verifier has
    try:
        assert keyless.verify().ok
        stored = keyless.read_all(0, limit=None, types=["MemoryCreated"])
        assert all("sealed_text" in e.payload["content"] for e in stored)
    finally:
        keyless.close()


@pytest.mark.parametrize("pii_scan", [True, False])
def test_every_commands_answer_is_masked_as_a_later_read_of_the_same_version(
        open_handle: Callable[..., MemWarden], pii_scan: bool) -> None:
    # A command's answer takes its findings from the events it stored (no query) when they set
    # the text, from the read model otherwise: both must show what a read shows.
    mw = open_handle(pii_scan=pii_scan)
    # Findings recorded while scanning was on stay masked once it is off.
    writer = mw if pii_scan else open_handle()
    cube_id = writer.add(f"Mail {EMAIL}.", tenant=TENANT, owner="user:ana").cube_id
    admin, officer = as_role(mw, "tenant_admin"), as_role(mw, "compliance_officer")
    answers = [
        (admin, admin.update(cube_id, text="Nothing personal.", reason="cleanup")),
        (officer, officer.rollback(cube_id, 1, reason="undo")),
        (admin, admin.delete(cube_id, reason="gone")),
        (admin, admin.restore(cube_id, reason="back")),
        *[(admin, added) for added in admin.add_many(
            [{"text": f"Mail {EMAIL} again.", "owner": "user:ana"},
             {"text": "Prefers tea.", "owner": "user:ana"}], tenant=TENANT)],
    ]
    for reader, answer in answers:
        assert answer.text == reader.version(answer.cube_id, answer.version).state.text
    texts = [answer.text for _, answer in answers]
    # Rolled back to the text with an email: rescanned while scanning is on, its earlier
    # findings carried forward while it is off; masked either way.
    shown = "Mail <EMAIL_ADDRESS>."
    assert texts == ["Nothing personal.", f"Mail {EMAIL}.", shown, shown,
                     "Mail <EMAIL_ADDRESS> again." if pii_scan else f"Mail {EMAIL} again.",
                     "Prefers tea."]
