"""A real uvicorn server for an app, on a free loopback port, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

_START_TIMEOUT_SECONDS = 30


@contextmanager
def serving(app: FastAPI) -> Iterator[tuple[str, uvicorn.Server]]:
    """Serve ``app`` until the block ends; yields the base URL and the server (to stop it early)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, ws="none", log_level="warning")
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    # Accepted connections inherit it: without, Nagle's algorithm adds ~40 ms to each response.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
