"""``memwarden up`` as a real process: the API and the background work start, the banner shows
the URLs and, on the first start only, an admin key; SIGTERM (or SIGINT) stops it gracefully,
letting requests in flight finish, with no acknowledged write lost.

Configured as an operator would, through the environment only (governance/_config.py).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from eventstore import EventContext, EventStore
from governance import ENVIRONMENT_VARIABLES, MemWarden, Settings
from governance._memcube import Limits, MemCube

START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 60
WAIT_SECONDS = 30
"""How long to wait for something that must happen soon (background work runs every second)."""
TENANT = "acme"
WRITERS = 4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _memwarden_command() -> list[str]:
    script = Path(sys.executable).with_name("memwarden")  # the console script, as installed
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from governance._cli import main; main()"]


def _wait_for(what: str, condition: Callable[[], object],
              alive: Callable[[], None] = lambda: None) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


@dataclass
class Up:
    """One ``memwarden up`` process, its output in a file."""

    process: subprocess.Popen[bytes]
    output: Path
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def require_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"memwarden up exited {self.process.returncode}:\n{self.text()}")

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            self.require_running()
            try:
                if httpx.get(f"{self.base}/v1/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"memwarden up did not answer /v1/healthz:\n{self.text()}")
            time.sleep(0.1)

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.wait()

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"memwarden up did not stop:\n{self.text()}") from None

    def accepts_connections(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        except OSError:
            return False
        return True


@dataclass
class Operator:
    """Starts ``memwarden up`` with its settings in the environment, as an operator would."""

    tmp_path: Path

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.tmp_path / 'db' / 'memwarden.db'}"

    @property
    def data_dir(self) -> Path:
        return self.tmp_path / "data"

    def observer(self) -> MemWarden:
        """A handle on the same database and master key file as the processes started."""
        return MemWarden.open(actor="test:observer", settings=Settings(
            db_url=self.db_url, data_dir=str(self.data_dir)))

    def start(self, name: str) -> Up:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT_VARIABLES}
        env.update(MEMWARDEN_DB_URL=self.db_url, MEMWARDEN_API_PORT=str(port),
                   MEMWARDEN_DATA_DIR=str(self.data_dir),
                   MEMWARDEN_KEY_FILE=str(self.data_dir / "master.key"),
                   # The process's life, not personal data: no analyzer to load (seconds) before
                   # the first write can be answered.
                   MEMWARDEN_PII_SCAN="0", PYTHONUNBUFFERED="1")
        output = self.tmp_path / f"{name}.out"
        with output.open("wb") as out:
            process = subprocess.Popen(
                [*_memwarden_command(), "up"], env=env, cwd=self.tmp_path,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        up = Up(process, output, port)
        try:
            up.wait_until_healthy()
        except BaseException:
            if process.poll() is None:
                process.kill()
                process.wait()
            raise
        return up


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[Operator]:
    yield Operator(tmp_path)


@dataclass(frozen=True, slots=True)
class Added:
    cube_id: str
    version: int
    text: str


class Writers:
    """Clients adding memories as fast as they can, recording what the server acknowledged."""

    def __init__(self, base: str, key: str) -> None:
        self._base, self._key = base, key
        self.acknowledged: list[Added] = []
        self.problems: list[str] = []
        self.signalled = threading.Event()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write, args=(n,), name=f"writer-{n}")
                         for n in range(WRITERS)]

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _write(self, n: int) -> None:
        headers = {"Authorization": f"Bearer {self._key}"}
        i = 0
        try:
            with httpx.Client(base_url=self._base, headers=headers, timeout=60) as client:
                while not self._stop.is_set():
                    i += 1
                    text = f"writer {n} note {i}"
                    try:
                        response = client.post("/v1/memories", json={
                            "text": text, "tenant": TENANT, "owner": f"user:{n}"})
                    except httpx.TransportError as error:
                        if not self.signalled.is_set():
                            self.problems.append(f"writer {n} before the signal: {error!r}")
                        return  # the server stopped: no answer, so nothing was acknowledged
                    if response.status_code != 201:
                        self.problems.append(f"writer {n}: {response.status_code} {response.text}")
                        return
                    body = response.json()
                    self.acknowledged.append(Added(body["id"], body["version"], text))
        except BaseException as error:
            self.problems.append(f"writer {n} crashed: {error!r}")


class SlowAdd(threading.Thread):
    """An add whose body arrives in two parts: the server has the request when the signal comes
    and the rest of the body only after, so it must finish the request while stopping."""

    TEXT = "sent while the server was stopping"

    def __init__(self, base: str, key: str) -> None:
        super().__init__(name="slow-add")
        self._base, self._key = base, key
        self.first_part_sent = threading.Event()
        self.release = threading.Event()
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

    def _body(self) -> Iterator[bytes]:
        yield b'{"text": "%s", "tenant": "%s", ' % (self.TEXT.encode(), TENANT.encode())
        self.first_part_sent.set()  # only once the first part was written to the socket
        if not self.release.wait(WAIT_SECONDS):
            return
        yield b'"owner": "user:late"}'

    def run(self) -> None:
        try:
            self.response = httpx.post(
                f"{self._base}/v1/memories", content=self._body(), timeout=STOP_TIMEOUT_SECONDS,
                headers={"Authorization": f"Bearer {self._key}",
                         "Content-Type": "application/json"})
        except BaseException as error:
            self.error = error


def _banner_key(output: str) -> str | None:
    found = re.search(r"^\s*admin key\s+(\S+)\s*$", output, re.MULTILINE)
    return None if found is None or found.group(1) == "in" else found.group(1)


def test_up_serves_works_in_the_background_and_stops_without_losing_a_write(
        operator: Operator) -> None:
    up = operator.start("first")
    try:
        # The banner: the URLs, and the admin key, saved for the operator only.
        banner = up.text()
        assert f"API        {up.base}/v1" in banner, banner
        assert f"docs       {up.base}/docs" in banner, banner
        key = _banner_key(banner)
        assert key is not None, banner
        key_file = operator.data_dir / "admin.key"
        assert key_file.read_text() == key + "\n"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        admin = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{up.base}/docs").status_code == 200

        with httpx.Client(base_url=up.base, headers=admin) as client:
            # The key works; a read is recorded by the background work while the server runs.
            created = client.post("/v1/memories", json={
                "text": "Prefers window seats", "tenant": TENANT, "owner": "user:ana"})
            assert created.status_code == 201, created.text
            first = created.json()["id"]
            assert client.get(f"/v1/memories/{first}").json()["version"] == 1
            with operator.observer() as observer:
                _wait_for("the read to be recorded", lambda: any(
                    read["cube_id"] == first
                    for event in observer.store.read_stream(f"reads:{TENANT}")
                    for read in event.payload["reads"]), up.require_running)

                # An event appended by another process, left unprojected, is applied by the
                # background projector: the API then serves it.
                late = "written-elsewhere"
                events = MemCube.create(owner="user:bo", kind="plaintext", metadata=None,
                                        text="Written by another process", reason=None,
                                        limits=Limits())
                store = EventStore.open(operator.db_url)  # no projection: only the log
                try:
                    store.append(late, events, expected_version=0,
                                 context=EventContext(actor="test:offline", tenant=TENANT))
                finally:
                    store.close()
                head = observer.store.head_position()

            def projected() -> bool:
                ready = client.get("/v1/readyz").json()
                return bool(ready["projected_position"] >= head)

            _wait_for("the background projector", projected, up.require_running)
            shown = client.get(f"/v1/memories/{late}")
            assert shown.status_code == 200, shown.text
            assert shown.json()["text"] == "Written by another process"

        # SIGTERM while writes are in flight, one of them half sent.
        with Writers(up.base, key) as writers:
            _wait_for("writes to be acknowledged", lambda: len(writers.acknowledged) >= 20,
                      up.require_running)
            slow = SlowAdd(up.base, key)
            slow.start()
            assert slow.first_part_sent.wait(WAIT_SECONDS)
            time.sleep(0.5)  # for the server to read the request's head: then it is in flight
            writers.signalled.set()
            up.process.send_signal(signal.SIGTERM)
            _wait_for("the server to stop accepting connections",
                      lambda: not up.accepts_connections())
            time.sleep(1)  # the server has stopped accepting, yet it waits for the request
            slow.release.set()
            slow.join()
            code = up.wait()
        assert writers.problems == [], writers.problems
        assert code == 0, up.text()
        assert slow.error is None, repr(slow.error)
        assert slow.response is not None
        assert slow.response.status_code == 201, slow.response.text
        assert slow.response.json()["text"] == SlowAdd.TEXT
        assert "MemWarden stopped; every acknowledged write is in the log." in up.text()
    finally:
        if up.process.poll() is None:
            up.process.kill()
            up.process.wait()

    # Every acknowledged write is in the log, at the version acknowledged; the chain verifies.
    acknowledged = [*writers.acknowledged,
                    Added(slow.response.json()["id"], slow.response.json()["version"],
                          SlowAdd.TEXT)]
    with operator.observer() as observer:
        for added in acknowledged:
            events = observer.store.read_stream(added.cube_id)
            assert [(e.stream_version, e.type) for e in events] == [
                (added.version, "MemoryCreated")], added
            assert observer.get(added.cube_id).text == added.text
        report = observer.verify()
        assert report.ok, report.first_break

    # A second start reuses the admin key: none is printed, the file is untouched, the key works.
    again = operator.start("second")
    try:
        output = again.text()
        assert _banner_key(output) is None, output
        assert key not in output
        assert f"admin key  in {key_file}" in output, output
        assert key_file.read_text() == key + "\n"
        still = httpx.get(f"{again.base}/v1/memories/{first}", headers=admin)
        assert still.status_code == 200, still.text
        assert again.stop(signal.SIGINT) == 0, again.text()
    finally:
        if again.process.poll() is None:
            again.process.kill()
            again.process.wait()
