"""The compliance dashboard (issue 8), page by page, with Streamlit's AppTest: the real app
script over a real database seeded with the demo workload, signed in with real API keys.

What each role sees is decided by the access policy through the SDK: an auditor gets the audit
trail and metadata but never a memory's text; a compliance officer sees the text and may roll
back (reason and confirmation required, recorded as an event); an agent is refused the audit
pages, and each refusal is itself recorded. The data functions behind the pages
(``dashboard._data``, ``governance._oversight``) run on both database backends below.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import streamlit as st
from google.protobuf import text_format
from log_tampering import overwrite_column
from sqlalchemy import create_engine, text
from streamlit.testing.v1 import AppTest

import dashboard
from dashboard import _data, _ui
from governance import ApiKeys, MemWarden, PermissionDenied
from governance._demo import seed_demo
from governance._keys import authenticate
from governance._oversight import Oversight
from projections import AuditFilter

APP = str(Path(dashboard.__file__).with_name("app.py"))
TENANT = "globex-travel"
ROLLED = "demo-globex-travel-003"
"""Sam's loyalty tier: Gold, wrongly updated to Platinum by an agent, rolled back to Gold."""
SENSITIVE = "demo-acme-health-001"
SENSITIVE_TEXT = "amoxicillin"
KEYS = {"admin": ("*", "admin"), "auditor": (TENANT, "auditor"),
        "compliance_officer": (TENANT, "compliance_officer"), "agent": (TENANT, "agent"),
        "acme_auditor": ("acme-health", "auditor")}
"""Who signs in: name -> (tenant, role)."""


@dataclass
class Demo:
    url: str
    keys: dict[str, str]
    subjects: dict[str, str]
    handles: list[MemWarden] = field(default_factory=list)

    def open(self) -> MemWarden:
        return MemWarden.open(self.url, actor="test:inspector")

    def signed_in(self, name: str) -> MemWarden:
        """A handle acting as the key ``name`` (closed when the test ends)."""
        mw = self.open()
        self.handles.append(mw)
        return mw.as_principal(authenticate(mw.store.engine, self.keys[name]))

    def close(self) -> None:
        for mw in self.handles:
            mw.close()

    def events(self, **where: Any) -> list[Any]:
        with self.open() as mw:
            return mw.audit(AuditFilter(**where), limit=1000)


def _seed(url: str) -> Demo:
    with MemWarden.open(url, actor="admin:root") as mw:
        seed_demo(mw)
        keys, subjects = {}, {}
        for name, (tenant, role) in KEYS.items():
            subject = f"{name.replace('_', '-')}:dash"
            keys[name] = ApiKeys(mw).issue(tenant=tenant, subject=subject, role=role).secret
            subjects[name] = subject
    return Demo(url, keys, subjects)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Demo]]:
    """The demo workload, seeded once (Presidio scans every write); each test gets a copy."""
    folder = tmp_path_factory.mktemp("dashboard-demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMWARDEN_KEY_FILE", str(folder / "master.key"))
        yield folder, _seed(f"sqlite:///{folder / 'memwarden.db'}")


@pytest.fixture
def fresh_dashboard() -> Iterator[None]:
    """The portal and the query caches live as long as the process: one per test database."""
    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    _ui.portal().close()
    st.cache_resource.clear()
    st.cache_data.clear()


@pytest.fixture
def demo(seeded: tuple[Path, Demo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
         fresh_dashboard: None) -> Iterator[Demo]:
    """A copy of the seeded demo database, and the dashboard configured on it."""
    folder, template = seeded
    shutil.copy(folder / "memwarden.db", tmp_path / "memwarden.db")
    url = f"sqlite:///{tmp_path / 'memwarden.db'}"
    monkeypatch.setenv("MEMWARDEN_DB_URL", url)
    monkeypatch.setenv("MEMWARDEN_KEY_FILE", str(folder / "master.key"))
    demo = Demo(url, template.keys, template.subjects)
    yield demo
    demo.close()


def _app(demo: Demo, role: str | None, page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    if role is not None:
        at.session_state[_ui.KEY] = demo.keys[role]
    if page is not None:
        at.switch_page(f"views/{page}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _rendered(at: AppTest | Any) -> str:
    """Everything the app sent to the browser, element by element (tables included)."""
    parts: list[str] = []

    def walk(node: Any) -> None:
        proto = getattr(node, "proto", None)
        if proto is not None:  # text format escapes quotes: undo that, to search plain text
            parts.append(text_format.MessageToString(proto, as_utf8=True)
                         .replace("\\'", "'").replace('\\"', '"'))
        for child in getattr(node, "children", {}).values():
            walk(child)

    for root in (at.main, at.sidebar) if isinstance(at, AppTest) else (at,):
        walk(root)
    return "\n".join(parts)


def _texts(elements: Any) -> list[str]:
    return [str(e.value) for e in elements]


def _by_label(elements: Any, label: str) -> Any:
    found = [e for e in elements if e.label == label]
    assert found, f"no element labelled {label!r}: {[e.label for e in elements]}"
    return found[0]


# -- sign-in --------------------------------------------------------------------------------


def test_without_a_key_only_the_sign_in_page_is_shown(demo: Demo) -> None:
    at = _app(demo, None)
    assert _texts(at.title) == [":material/shield: MemWarden"]
    assert "Overview" not in _rendered(at)


def test_a_bad_key_is_refused_with_a_clear_message(demo: Demo) -> None:
    at = _app(demo, None)
    _by_label(at.text_input, "API key").input("mwk_0123456789abcdef_forged")
    _by_label(at.button, "Sign in").click()
    at.run()
    assert any("the API key is not valid" in e for e in _texts(at.error)), _texts(at.error)
    assert _ui.KEY not in at.session_state


def test_signing_in_with_a_key_opens_the_overview_as_its_principal(demo: Demo) -> None:
    at = _app(demo, None)
    _by_label(at.text_input, "API key").input(demo.keys["compliance_officer"])
    _by_label(at.button, "Sign in").click()
    at.run()
    at.run()  # the sign-in page reruns into the app
    assert _texts(at.title) == ["Overview"]
    sidebar = _rendered(at.sidebar)
    assert demo.subjects["compliance_officer"] in sidebar and TENANT in sidebar


def test_a_revoked_key_is_signed_out_on_the_next_page(demo: Demo) -> None:
    at = _app(demo, "auditor", "overview")
    with MemWarden.open(demo.url, actor="admin:root") as mw:
        key_id = demo.keys["auditor"].split("_")[1]
        ApiKeys(mw).revoke(key_id, reason="left the company")
    at.run()
    assert "was revoked" in _rendered(at)
    assert _texts(at.title) == [":material/shield: MemWarden"]


def test_no_page_is_shown_while_a_kafka_consumer_builds_the_read_models(
        demo: Demo, monkeypatch: pytest.MonkeyPatch) -> None:
    """The distributed mode: until a consumer building the read models from the beginning of
    the topic is through, they hold part of the log, and the pages would show it as all."""
    from projections import _kafka_projector

    monkeypatch.setenv("MEMWARDEN_KAFKA_BOOTSTRAP", "127.0.0.1:9")  # (never asked here)
    monkeypatch.setattr(_kafka_projector, "BUILD_CHECK_SECONDS", 0.0)
    engine = create_engine(demo.url)
    _kafka_projector.claims_metadata.create_all(engine)
    with engine.begin() as conn:  # what a consumer that started its build has recorded
        conn.execute(text("INSERT INTO kafka_read_models VALUES ('cubes', 'projector')"))
        conn.execute(text("INSERT INTO kafka_read_model_builds VALUES ('projector', 42)"))

    at = _app(demo, "compliance_officer", "overview")
    assert ("The read models are being rebuilt, so no page is shown until they are whole. "
            "Kafka consumer 'projector' is building cubes from the beginning of the topic: "
            "try again shortly.") in _texts(at.error)
    assert _texts(at.title) == []

    with engine.begin() as conn:  # the consumer is through
        conn.execute(text("DELETE FROM kafka_read_model_builds"))
    engine.dispose()
    at.run()
    assert _texts(at.title) == ["Overview"]


# -- overview -------------------------------------------------------------------------------


def test_overview_counts_the_tenant_s_log(demo: Demo) -> None:
    at = _app(demo, "auditor", "overview")
    metrics = {m.label: m.value for m in at.metric}
    writes = [e for e in demo.events(tenant=TENANT) if e.type in _data.CATEGORIES["Writes"]]
    assert metrics["Writes"] == str(len(writes)) and len(writes) > 0
    assert metrics["Reads"] == "4"  # the concierge read four of the tenant's memories
    assert set(metrics) == set(_data.CATEGORIES)


def test_an_agent_is_refused_the_overview_and_the_refusal_is_recorded(demo: Demo) -> None:
    at = _app(demo, "agent", "overview")
    assert any("may not do this" in e and "audit.read" in e for e in _texts(at.error))
    assert not at.metric
    denied = demo.events(types=["AccessDenied"], actor=demo.subjects["agent"])
    assert [e.detail["action"] for e in denied] == ["audit.read"]


# -- audit trail ----------------------------------------------------------------------------


def test_audit_trail_filtered_by_memory_answers_who_read_or_changed_it(demo: Demo) -> None:
    at = _app(demo, "auditor", "audit")
    _by_label(at.text_input, "Memory id").input(ROLLED)
    _by_label(at.button, "Apply filters").click()
    at.run()
    table = at.dataframe[0].value
    assert set(table["memory"]) <= {ROLLED, ""}
    assert {"MemoryCreated", "MemoryUpdated", "MemoryRolledBack",
            "MemoryAccessed"} <= set(table["type"])
    rolled = table[table["type"] == "MemoryRolledBack"].iloc[0]
    assert rolled["actor"] == "officer:jane.roe"
    assert rolled["reason"] == "inference was wrong: the airline record says Gold"
    assert "Platinum" not in _rendered(at) and "Gold." not in _rendered(at)  # no content


def test_audit_downloads_are_exactly_the_rows_on_screen(demo: Demo) -> None:
    at = _app(demo, "auditor", "audit")
    _by_label(at.multiselect, "Event types").select("MemoryUpdated")
    _by_label(at.button, "Apply filters").click()
    at.run()
    shown = at.dataframe[0].value.to_dict("records")
    assert shown and all(row["type"] == "MemoryUpdated" for row in shown)
    page = _data.audit_page(demo.signed_in("auditor"),
                            _data.AuditQuery(tenant=TENANT, types=("MemoryUpdated",)))
    assert [row["position"] for row in shown] == [row["position"] for row in page.rows]
    as_csv = list(csv.DictReader(io.StringIO(_data.rows_as_csv(page.rows).decode())))
    assert [int(row["position"]) for row in as_csv] == [row["position"] for row in shown]
    assert json.loads(_data.rows_as_json(page.rows)) == page.rows
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["CSV of this page", "JSON of this page"]


def test_audit_trail_pages_through_the_log_newest_first(demo: Demo) -> None:
    with MemWarden.open(demo.url, actor="admin:root") as mw:
        writer = mw.acting_as("agent:bulk")
        for n in range(_data.PAGE_SIZE + 5):
            writer.add(f"note {n}", tenant=TENANT, owner="customer:many")
    at = _app(demo, "auditor", "audit")
    first = list(at.dataframe[0].value["position"])
    assert len(first) == _data.PAGE_SIZE and first == sorted(first, reverse=True)
    _by_label(at.button, "Older").click()
    at.run()
    second = list(at.dataframe[0].value["position"])
    assert second and max(second) < min(first)
    _by_label(at.button, "Newer").click()
    at.run()
    assert list(at.dataframe[0].value["position"]) == first


# -- memory detail --------------------------------------------------------------------------


def _memory_page(demo: Demo, role: str, cube_id: str) -> AppTest:
    at = _app(demo, role, "memory")
    _by_label(at.text_input, "Memory id").input(cube_id)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_what_users_wrote_is_shown_as_written_never_as_markdown(demo: Demo) -> None:
    """A memory's text, its writer's name and a reason are data: Markdown in them (a link, a
    colour directive, emphasis) is shown as typed, never rendered."""
    written = "Call **Ana** at [her desk](https://example.invalid) :red[today] _please_"
    with demo.open() as mw:
        writer = mw.acting_as("agent:__bold__")
        writer.add(written, tenant=TENANT, owner="user:ana", cube_id="markdown-memory")
        writer.update("markdown-memory", text=written + "!", reason="fixed *the* [typo](x)")
    at = _memory_page(demo, "compliance_officer", "markdown-memory")
    assert written + "!" in _texts(at.text)  # a text element: no Markdown parsing at all
    captions = _texts(at.caption)
    assert any(_ui.literal("agent:__bold__") in c for c in captions)
    assert "[her desk](" not in "".join(_texts(at.markdown))


def test_an_auditor_sees_metadata_and_history_never_content(demo: Demo) -> None:
    at = _memory_page(demo, "acme_auditor", SENSITIVE)
    rendered = _rendered(at)
    assert SENSITIVE_TEXT not in rendered and "penicillin" not in rendered
    assert any("Content withheld" in i for i in _texts(at.info))
    timeline = at.dataframe[0].value
    assert list(timeline["event"][:1]) == ["MemoryCreated"]
    assert "pharmacist corrected the allergy record" in set(timeline["reason"])
    assert any("may not roll memories back" in i for i in _texts(at.info))
    assert not demo.events(types=["MemoryAccessed"], actor=demo.subjects["acme_auditor"])


def test_a_compliance_officer_sees_content_and_the_read_is_recorded(demo: Demo) -> None:
    at = _memory_page(demo, "compliance_officer", ROLLED)
    assert "Sam's loyalty tier is Gold." in _rendered(at)
    reads = demo.events(types=["MemoryAccessed"], actor=demo.subjects["compliance_officer"])
    assert reads, "the officer's read of the text was not recorded"


def test_the_diff_marks_what_changed_between_two_versions(demo: Demo) -> None:
    at = _memory_page(demo, "compliance_officer", ROLLED)
    _by_label(at.selectbox, "From version").set_value(1)
    updated = next(v for v in demo.signed_in("compliance_officer").history(ROLLED)
                   if v.state.last_event == "MemoryUpdated").state.version
    _by_label(at.selectbox, "To version").set_value(updated)
    at.run()
    html = "\n".join(str(h.proto) for h in at.get("html"))
    assert "<del>Gold.</del>" in html and "<ins>Platinum.</ins>" in html


def test_rollback_needs_a_reason_and_a_confirmation_and_is_recorded(demo: Demo) -> None:
    officer = demo.subjects["compliance_officer"]
    at = _memory_page(demo, "compliance_officer", ROLLED)
    before = demo.signed_in("compliance_officer").history(ROLLED)
    platinum = next(v for v in before if "Platinum" in v.state.text).state.version

    _by_label(at.selectbox, "Roll back to version").set_value(platinum)
    _by_label(at.button, "Roll back…").click()
    at.run()
    assert any("A reason is required" in e for e in _texts(at.error))
    assert not demo.events(types=["MemoryRolledBack"], actor=officer)

    _by_label(at.selectbox, "Roll back to version").set_value(platinum)
    _by_label(at.text_area, "Reason (required, recorded in the audit trail)").input(
        "the airline upgraded Sam after all")
    _by_label(at.button, "Roll back…").click()
    at.run()
    assert any("Roll back" in w and "the airline upgraded Sam" in w for w in _texts(at.warning))
    assert not demo.events(types=["MemoryRolledBack"], actor=officer)  # not before confirming

    _by_label(at.button, "Confirm rollback").click()
    at.run()
    assert any("Rolled back" in s for s in _texts(at.success)), _texts(at.success)
    rolled = demo.events(types=["MemoryRolledBack"], actor=officer)
    assert [(e.cube_id, e.reason, e.detail["to_version"]) for e in rolled] == [
        (ROLLED, "the airline upgraded Sam after all", platinum)]
    assert "Sam's loyalty tier is Platinum." in _rendered(at)


def test_cancelling_a_rollback_writes_nothing(demo: Demo) -> None:
    at = _memory_page(demo, "compliance_officer", ROLLED)
    _by_label(at.text_area, "Reason (required, recorded in the audit trail)").input("maybe")
    _by_label(at.button, "Roll back…").click()
    at.run()
    _by_label(at.button, "Cancel").click()
    at.run()
    assert not demo.events(types=["MemoryRolledBack"], actor=demo.subjects["compliance_officer"])
    assert _by_label(at.button, "Roll back…")


def test_an_agent_sees_only_its_own_memories(demo: Demo) -> None:
    at = _memory_page(demo, "agent", ROLLED)  # written by agent:concierge, not this agent
    assert any("may not do this" in e for e in _texts(at.error)), _texts(at.error)
    assert "Gold" not in _rendered(at)


def test_another_tenant_s_memory_is_answered_as_missing(demo: Demo) -> None:
    at = _memory_page(demo, "compliance_officer", SENSITIVE)
    assert _texts(at.error) == [f"No memory with id `{SENSITIVE}`."]
    assert SENSITIVE_TEXT not in _rendered(at)


# -- access decisions and integrity -------------------------------------------------------------


def test_access_decisions_show_readers_and_denials_by_actor(demo: Demo) -> None:
    _app(demo, "agent", "overview")  # refused: one AccessDenied by the agent
    at = _app(demo, "auditor", "access")
    tables = {tuple(t.value.columns): t.value for t in at.dataframe}
    readers = tables[("actor", "reads", "memories")]
    denied = tables[("actor", "denials", "memories")]
    recent = next(t for columns, t in tables.items() if "action" in columns)
    assert dict(zip(readers["actor"], readers["reads"], strict=True)) == {"agent:concierge": 4}
    assert dict(zip(denied["actor"], denied["denials"], strict=True)) == {
        demo.subjects["agent"]: 1}
    assert list(recent["action"]) == ["audit.read"]


def test_integrity_verifies_the_chain_and_names_a_break(demo: Demo) -> None:
    at = _app(demo, "auditor", "integrity")
    _by_label(at.button, "Verify the hash chain").click()
    at.run()
    with demo.open() as mw:
        head = mw.store.head_position()
        overwrite_column(mw.store.engine, 5, "actor", "mallory")
    assert any(f"{head:,} events verified" in s for s in _texts(at.success)), _texts(at.success)
    _by_label(at.button, "Verify the hash chain").click()
    at.run()
    assert any("broken at position 5" in e for e in _texts(at.error)), _texts(at.error)
    overview = _app(demo, "auditor", "overview")
    assert any("Broken at position 5" in e for e in _texts(overview.error))


def test_a_platform_key_chooses_the_tenant_it_audits(demo: Demo) -> None:
    at = _app(demo, "admin", "overview")
    tenants = _by_label(at.sidebar.selectbox, "Tenant")
    assert tenants.options == [_ui.ALL_TENANTS, "acme-health", "globex-travel", "initech-hr"]
    everywhere = int(_by_label(at.metric, "Writes").value)
    tenants.set_value("initech-hr").run()
    assert 0 < int(_by_label(at.metric, "Writes").value) < everywhere


def test_sensitive_data_shows_findings_and_masks_text_per_the_viewer(demo: Demo) -> None:
    at = _app(demo, "compliance_officer", "sensitive")
    by_memory = next(t.value for t in at.dataframe if "entity_types" in t.value.columns)
    assert ROLLED in set(by_memory["memory"]) and set(by_memory["tenant"]) == {TENANT}
    _by_label(at.selectbox, "Memory").set_value(ROLLED)
    _by_label(at.button, "Show its text").click()
    at.run()
    assert "shown in clear" in _rendered(at) and "Sam's loyalty tier" in _rendered(at)

    at = _app(demo, "auditor", "sensitive")
    _by_label(at.selectbox, "Memory").set_value(ROLLED)
    _by_label(at.button, "Show its text").click()
    at.run()
    assert any("sees findings, never content" in i for i in _texts(at.info))
    assert "loyalty tier" not in _rendered(at)


def test_retention_places_and_releases_a_legal_hold_with_a_reason(demo: Demo) -> None:
    at = _app(demo, "compliance_officer", "retention")
    assert int(_by_label(at.metric, "Rules").value) > 0
    _by_label(at.text_input, "Memory id, or owner (data subject)").input(ROLLED)
    _by_label(at.text_input, "Case id").input("CASE-42")
    at.text_area(key="hold_reason").input("litigation over Sam's status")
    _by_label(at.button, "Place hold").click()
    at.run()
    assert any("placed on memory" in s for s in _texts(at.success)), _texts(at.success)
    placed = demo.events(types=["LegalHoldPlaced"], actor=demo.subjects["compliance_officer"])
    assert [e.reason for e in placed] == ["litigation over Sam's status"]

    _by_label(at.selectbox, "Hold").set_value(placed[0].stream_id.removeprefix("hold:"))
    at.text_area(key="release_reason").input("case closed")
    _by_label(at.button, "Release hold").click()
    at.run()
    released = demo.events(types=["LegalHoldReleased"],
                           actor=demo.subjects["compliance_officer"])
    assert [e.reason for e in released] == ["case closed"]


def test_retention_dry_run_changes_nothing(demo: Demo) -> None:
    at = _app(demo, "compliance_officer", "retention")
    head = demo.events()[-1].position
    _by_label(at.button, "Run a dry run").click()
    at.run()
    assert any("A sweep now would act on" in s for s in _texts(at.success)), _texts(at.success)
    assert demo.events()[-1].position == head


def test_erasures_show_each_erasure_with_its_evidence(demo: Demo) -> None:
    with MemWarden.open(demo.url, actor="admin:root") as mw:
        mw.erase_subject("customer:aiko.tanaka", tenant=TENANT, reason="GDPR Art. 17 request")
    at = _app(demo, "auditor", "erasures")
    table = at.dataframe[0].value
    row = table[table["type"] == "SubjectErased"].iloc[0]
    assert row["erased"] == "customer:aiko.tanaka" and row["reason"] == "GDPR Art. 17 request"
    assert row["memories"] >= 2 and row["keys_destroyed"] >= 1
    assert _by_label(at.metric, "Subject erasures").value == "1"


def test_lineage_lists_artifacts_and_traces_their_sources(demo: Demo) -> None:
    at = _app(demo, "compliance_officer", "lineage")
    artifacts = at.dataframe[0].value
    assert set(artifacts["kind"]) == {"parametric", "activation"}
    assert "tainted" in set(artifacts["status"])
    sources = at.dataframe[1].value
    assert set(sources["cube_id"]) <= {f"demo-globex-travel-00{n}" for n in range(1, 5)}


# -- the data functions, on both backends -----------------------------------------------------


@pytest.fixture
def small(database_url: str, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Demo]:
    """A few memories, reads and a denial, written fast (no personal data scan)."""
    monkeypatch.setenv("MEMWARDEN_KEY_FILE", str(tmp_path / "master.key"))
    monkeypatch.setenv("MEMWARDEN_PII_SCAN", "0")
    with MemWarden.open(database_url, actor="admin:root") as mw:
        agent, other = mw.acting_as("agent:a"), mw.acting_as("agent:b")
        agent.add("plain note", tenant=TENANT, owner="customer:x", cube_id="m-plain")
        agent.add("medical note", tenant=TENANT, owner="customer:x", cube_id="m-sensitive",
                  metadata={"labels": ["sensitive"]})
        agent.update("m-plain", text="plain note, revised", reason="corrected")
        mw.acting_as("officer:o").rollback("m-plain", 1, reason="the correction was wrong")
        agent.add("elsewhere", tenant="acme-health", owner="patient:y", cube_id="m-acme")
        for _ in range(3):
            agent.get("m-sensitive")
        agent.get("m-plain")
        other.get("m-plain")
        mw.flush_reads()
        keys, subjects = {}, {}
        for name, (tenant, role) in KEYS.items():
            subject = f"{name.replace('_', '-')}:dash"
            keys[name] = ApiKeys(mw).issue(tenant=tenant, subject=subject, role=role).secret
            subjects[name] = subject
    demo = Demo(database_url, keys, subjects)
    with pytest.raises(PermissionDenied):
        Oversight(demo.signed_in("agent")).summary()  # the agent's denial
    yield demo
    demo.close()


def test_summary_counts_agree_with_the_audit_trail(small: Demo) -> None:
    auditor = small.signed_in("auditor")
    entries = auditor.audit(limit=1000)
    summary = Oversight(auditor).summary()
    counted: dict[str, int] = {}
    for entry in entries:
        counted[entry.type] = counted.get(entry.type, 0) + 1
    assert summary.counts == counted
    assert counted["AccessDenied"] == 1 and counted["MemoryRolledBack"] == 1
    assert summary.span.events == len(entries)
    for bucket in ("minute", "hour", "day"):
        series = Oversight(auditor).summary(bucket=bucket).activity
        by_type: dict[str, int] = {}
        for count in series:
            by_type[count.type] = by_type.get(count.type, 0) + count.count
        assert {k: v for k, v in by_type.items() if k != "MemoryRead"} == counted
        assert by_type["MemoryRead"] == 3  # m-sensitive (one batch), m-plain by a and by b
        assert all(c.start.tzinfo is not None for c in series)
    overview = _data.overview(auditor)
    assert overview.totals["Writes"] == 4 and overview.totals["Denials"] == 1


def test_metadata_views_withhold_text_and_respect_scope(small: Demo) -> None:
    auditor, agent = small.signed_in("auditor"), small.signed_in("agent")
    oversight = Oversight(auditor)
    described = oversight.describe("m-plain")
    assert described.text == "" and described.version == 3
    timeline = oversight.timeline("m-plain")
    assert [v.reason for v in timeline] == [None, "corrected", "the correction was wrong"]
    assert all(v.state.text == "" for v in timeline)
    catalog = oversight.catalog()
    assert [m.cube_id for m in catalog] == ["m-plain", "m-sensitive"]
    assert all(m.text == "" for m in catalog)
    assert Oversight(agent).catalog() == []  # it created none of them
    with pytest.raises(PermissionDenied):
        Oversight(auditor).summary(AuditFilter(tenant="acme-health"))
    with pytest.raises(PermissionDenied):
        Oversight(agent).describe("m-plain")


def test_readers_and_denials_by_actor(small: Demo) -> None:
    access = Oversight(small.signed_in("auditor")).access()
    assert [(r.actor, r.count, r.memories) for r in access.readers] == [
        ("agent:a", 2, 2), ("agent:b", 1, 1)]
    assert [(r.actor, r.memories) for r in access.sensitive_readers] == [("agent:a", 1)]
    assert [(d.actor, d.count) for d in access.denied] == [("agent:dash", 1)]
