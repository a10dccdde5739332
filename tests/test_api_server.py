"""The REST API behind a real uvicorn server on loopback, on every database backend: real
sockets, keep-alive, concurrent connections, chunked bodies and graceful shutdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from live_server import serving

from governance import ApiKeys, MemWarden, create_app


@pytest.fixture
def memwarden(database_url: str) -> Iterator[MemWarden]:
    with MemWarden.open(database_url, actor="test:setup") as handle:
        yield handle


@pytest.fixture
def admin(memwarden: MemWarden) -> dict[str, str]:
    issued = ApiKeys(memwarden).issue(tenant="*", subject="admin:root", role="admin")
    return {"Authorization": f"Bearer {issued.secret}"}


def test_a_client_adds_updates_rolls_back_and_audits_over_loopback(
        memwarden: MemWarden, admin: dict[str, str]) -> None:
    with serving(create_app(memwarden)) as (base, _), \
            httpx.Client(base_url=base, headers=admin) as client:
        created = client.post("/v1/memories", json={
            "text": "Prefers window seats", "tenant": "acme", "owner": "user:ana"})
        assert created.status_code == 201
        memory_id = created.json()["id"]
        assert created.headers["location"] == f"/v1/memories/{memory_id}"
        client.patch(f"/v1/memories/{memory_id}", json={
            "text": "Prefers aisle seats", "expected_version": 1}).raise_for_status()
        client.post(f"/v1/memories/{memory_id}/rollback", json={
            "to_version": 1, "reason": "misheard"}).raise_for_status()
        current = client.get(f"/v1/memories/{memory_id}").json()
        trail = client.get("/v1/audit", params={"cube_id": memory_id}).json()["items"]
        health = httpx.get(f"{base}/v1/healthz")
    assert (current["version"], current["text"]) == (3, "Prefers window seats")
    assert [e["type"] for e in trail] == ["MemoryCreated", "MemoryUpdated", "MemoryRolledBack"]
    assert {e["actor"] for e in trail} == {"admin:root"}
    assert health.json() == {"status": "ok"}


def test_of_concurrent_writers_at_the_same_version_exactly_one_wins(
        memwarden: MemWarden, admin: dict[str, str]) -> None:
    memory_id = memwarden.add("v1", tenant="acme", owner="user:ana").cube_id
    writers = 8
    ready = threading.Barrier(writers)
    answers: list[httpx.Response] = []

    def write(n: int, base: str) -> None:
        with httpx.Client(base_url=base, headers=admin) as client:
            ready.wait()
            answers.append(client.patch(f"/v1/memories/{memory_id}", json={
                "text": f"written by {n}", "expected_version": 1}))

    with serving(create_app(memwarden)) as (base, _):
        threads = [threading.Thread(target=write, args=(n, base)) for n in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] + [409] * (writers - 1)
    assert {a.json()["current_version"] for a in answers if a.status_code == 409} == {2}
    winner = next(a.json()["text"] for a in answers if a.status_code == 200)
    assert [e.stream_version for e in memwarden.store.read_stream(memory_id)] == [1, 2]
    assert memwarden.get(memory_id).text == winner


def test_a_chunked_body_over_the_limit_is_refused_before_it_is_read_whole(
        memwarden: MemWarden, admin: dict[str, str]) -> None:
    head = memwarden.store.head_position()
    chunks, sent = 10_000, 0  # 640 MB if it were all sent: far past the limit

    def endless_json() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"tenant": "acme", "owner": "user:ana", "text": "'
        for _ in range(chunks):
            sent += 1
            yield b"x" * 65536

    with serving(create_app(memwarden)) as (base, _), \
            httpx.Client(base_url=base, headers=admin) as client:
        refused = client.post("/v1/memories", content=endless_json(),
                              headers={"content-type": "application/json"})
    assert refused.status_code == 413
    assert sent < chunks  # the server hung up instead of reading the rest
    assert refused.headers["content-type"] == "application/problem+json"
    assert memwarden.store.head_position() == head


def test_shutdown_waits_for_a_request_in_flight_and_its_write_is_kept(
        memwarden: MemWarden, admin: dict[str, str]) -> None:
    answer: list[httpx.Response] = []
    with serving(create_app(memwarden)) as (base, server):
        # Hold the log's append lock, so the request below stays in flight inside its append.
        with memwarden.store.write_connection() as blocker, blocker.begin():
            memwarden.store.dialect.lock_for_append(blocker)
            request = threading.Thread(target=lambda: answer.append(httpx.post(
                f"{base}/v1/memories", headers=admin, timeout=60,
                json={"text": "written during shutdown", "tenant": "acme", "owner": "u"})))
            request.start()
            deadline = time.monotonic() + 30
            while not server.server_state.tasks and time.monotonic() < deadline:
                time.sleep(0.01)
            server.should_exit = True  # what SIGINT and SIGTERM do
            time.sleep(0.2)  # the server is now shutting down, the request still waiting
            assert request.is_alive()
        request.join()
    assert answer[0].status_code == 201, answer[0].text
    memory_id = answer[0].json()["id"]
    assert [e.type for e in memwarden.store.read_stream(memory_id)] == ["MemoryCreated"]
