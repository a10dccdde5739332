"""Erasure completeness: after a data subject is erased, its text is found nowhere.

Canary strings are written for one subject through every path (SDK add, update and rollback,
REST, CLI, an export file), the subject is erased, and then the bytes are searched:

- SQLite: the database file, its write-ahead log and shared-memory index, byte for byte;
- PostgreSQL: every table's rows as text, and the raw files of every table, index and TOAST
  table of the schema (read with ``pg_read_binary_file`` after a ``CHECKPOINT``), where dead
  tuples would survive a plain DELETE or UPDATE;
- both: every row of every table through SQL, and a new export of the subject.

Another subject's canaries, written the same way, must still be readable afterwards. The export
file written *before* the erasure is the subject's own copy, handed over; it is checked to hold the
canaries, which proves the search would find them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import make_url

from governance import ApiKeys, MemWarden, Settings, create_app
from governance._cli import cli

TENANT = "acme"
ANA, BEN = "user:ana", "user:ben"


@pytest.fixture
def mw(database_url: str) -> Iterator[MemWarden]:
    handle = MemWarden.open(actor="ops:erasure", settings=Settings(db_url=database_url))
    yield handle
    handle.close()


def canaries(subject: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    name = subject.split(":")[1]
    return {path: f"canary-{name}-{path}-{tag}" for path in (
        "sdk-add", "sdk-update", "rest-add", "rest-update", "cli-add", "cli-update")}


def write_everywhere(mw: MemWarden, client: TestClient, headers: dict[str, str],
                     database_url: str, subject: str, words: dict[str, str]) -> None:
    """One subject's canaries through every write path (and a few reads)."""
    memory = mw.add(f"Note {words['sdk-add']} for later", tenant=TENANT, owner=subject)
    mw.update(memory.cube_id, text=f"Note {words['sdk-update']} instead", reason="update")
    mw.rollback(memory.cube_id, 1, reason="the first note was right")

    created = client.post("/v1/memories", headers=headers, json={
        "text": f"Remember {words['rest-add']}", "tenant": TENANT, "owner": subject})
    assert created.status_code == 201, created.text
    cube_id = created.json()["id"]
    updated = client.patch(f"/v1/memories/{cube_id}", headers=headers, json={
        "text": f"Remember {words['rest-update']} too", "reason": "more"})
    assert updated.status_code == 200, updated.text
    assert client.get(f"/v1/memories/{cube_id}", headers=headers).status_code == 200

    runner = CliRunner()
    added = runner.invoke(cli, ["--db", database_url, "add", f"Jot {words['cli-add']} down",
                                "--tenant", TENANT, "--owner", subject, "--json"])
    assert added.exit_code == 0, added.output
    cli_id = json.loads(added.stdout)["id"]
    changed = runner.invoke(cli, ["--db", database_url, "update", cli_id, "--text",
                                  f"Jot {words['cli-update']} down", "--reason", "typo"])
    assert changed.exit_code == 0, changed.output
    mw.get(memory.cube_id)
    mw.flush_reads()


def export_file(database_url: str, subject: str, path: Path) -> bytes:
    result = CliRunner().invoke(cli, ["--db", database_url, "export", subject, "--tenant",
                                      TENANT, "--out", str(path)])
    assert result.exit_code == 0, result.output
    assert path.stat().st_mode & 0o777 == 0o600
    return path.read_bytes()


def found_in(blob: bytes, words: dict[str, str]) -> set[str]:
    return {word for word in words.values() if word.encode() in blob}


def every_row_as_text(engine: Engine) -> bytes:
    """Every row of every table, through SQL (a logical dump)."""
    chunks = []
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                chunks.append(repr(tuple(row)))
    return "\n".join(chunks).encode()


def raw_database_bytes(engine: Engine, database_url: str) -> bytes:
    """The bytes the database keeps on disk (for PostgreSQL: the files of the test's schema)."""
    if engine.dialect.name == "sqlite":
        database = Path(make_url(database_url).database or "")
        files = [p for p in database.parent.iterdir() if p.name.startswith(database.name)]
        assert {p.name for p in files} >= {database.name}
        return b"".join(p.read_bytes() for p in files)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("CHECKPOINT")
        paths = conn.execute(text(
            "SELECT pg_relation_filepath(c.oid) FROM pg_class c "
            "WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = "
            "current_schema()) AND c.relkind IN ('r', 'i', 't', 'm') "
            "UNION SELECT pg_relation_filepath(c.reltoastrelid) FROM pg_class c "
            "WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = "
            "current_schema()) AND c.reltoastrelid <> 0")).scalars().all()
        blobs = []
        for path in paths:
            if path is None:
                continue
            # A relation's first segment (the test's tables are far smaller than 500 MB).
            blobs.append(conn.execute(text("SELECT pg_read_binary_file(:p, 0, 524288000, true)"),
                                      {"p": path}).scalar_one() or b"")
        return b"".join(bytes(b) for b in blobs)


def test_an_erased_subject_leaves_no_canary_anywhere(
        mw: MemWarden, database_url: str, tmp_path: Path) -> None:
    engine = mw.store.engine
    officer = ApiKeys(mw).issue(tenant=TENANT, subject="officer:erasure",
                                role="compliance_officer")
    headers = {"Authorization": f"Bearer {officer.secret}"}
    ana, ben = canaries(ANA), canaries(BEN)
    with TestClient(create_app(mw)) as client:
        write_everywhere(mw, client, headers, database_url, ANA, ana)
        write_everywhere(mw, client, headers, database_url, BEN, ben)
        before = export_file(database_url, ANA, tmp_path / "ana-before.json")
        assert found_in(before, ana) == set(ana.values())  # the scan can see them
        assert found_in(every_row_as_text(engine), ana) == set(ana.values())
        assert found_in(raw_database_bytes(engine, database_url), ana) == set(ana.values())
        # What the Kafka relay publishes (the stored form) never held them in clear.
        published = mw.store.read_all(0, limit=None, decoded=False)
        assert found_in(json.dumps([e.payload for e in published]).encode(), ana) == set()

        erased = client.post(f"/v1/subjects/{ANA}/erase", headers=headers,
                             json={"tenant": TENANT, "reason": "GDPR Art. 17 request #42"})
        assert erased.status_code == 200, erased.text
        assert erased.json()["memories"] == 3 and erased.json()["keys_destroyed"] == 3

        after = export_file(database_url, ANA, tmp_path / "ana-after.json")
        assert json.loads(after)["memories"] and found_in(after, ana) == set()

    assert found_in(every_row_as_text(engine), ana) == set()
    assert found_in(raw_database_bytes(engine, database_url), ana) == set()

    # The other subject is untouched, in the read models and in the log.
    rows = every_row_as_text(engine)
    assert found_in(rows, ben) == set(ben.values())
    texts = " ".join(state.text for state in mw.list())
    assert {w for w in ben.values() if w in texts} == {
        ben["sdk-add"], ben["rest-update"], ben["cli-update"]}
    assert found_in(json.dumps([e.payload for e in mw.store.read_all(0, limit=None)]).encode(),
                    ben) == set(ben.values())
    assert mw.verify().ok

    # Replaying the log gives the same read models, still without the canaries.
    mw.flush_reads()
    incremental = mw.projector.digest()
    mw.rebuild_projections()
    assert mw.projector.digest() == incremental


def test_the_cli_erases_and_records_the_erasure(mw: MemWarden, database_url: str) -> None:
    memory = mw.add("canary-cli-erase", tenant=TENANT, owner=ANA)
    result = CliRunner().invoke(cli, ["--db", database_url, "erase", ANA, "--tenant", TENANT,
                                      "--reason", "request 7", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["subject"], report["memories"], report["keys_destroyed"]) == (ANA, 1, 1)
    assert mw.get(memory.cube_id).content_erased
    [erasure] = mw.erasures(tenant=TENANT)
    assert (erasure.type, erasure.subject, erasure.reason) == ("SubjectErased", ANA, "request 7")
    listed = CliRunner().invoke(cli, ["--db", database_url, "erasures", "--json"])
    assert json.loads(listed.stdout)["items"][0]["detail"]["memories"] == 1


def test_a_subject_may_come_back_after_erasure_with_new_keys(mw: MemWarden) -> None:
    old = mw.add("canary-old-life", tenant=TENANT, owner=ANA)
    mw.erase_subject(ANA, tenant=TENANT, reason="request")
    new = mw.add("A new start", tenant=TENANT, owner=ANA)
    assert mw.get(new.cube_id).text == "A new start"
    assert mw.get(old.cube_id).text == ""
    mw.flush_reads()
    incremental = mw.projector.digest()
    mw.rebuild_projections()
    assert mw.projector.digest() == incremental
    assert mw.get(new.cube_id).text == "A new start"
