"""``python -m bench._serve FD DB_URL DATA_DIR``: the REST API over a database, on a socket the
parent bound (file descriptor ``FD``, inherited), until SIGTERM.

Run as its own process so that the server does not share the benchmark client's interpreter (and
its GIL). The parent binds the socket so that it knows the port without a race, and binds it with
``proto=IPPROTO_TCP``: asyncio sets TCP_NODELAY only on connections accepted from such a socket.
(uvicorn's ``Config.bind_socket`` leaves ``proto`` 0, so its connections keep Nagle's algorithm,
and a response sent as headers then body waits for the client's delayed ACK: about 40 ms.)
"""

from __future__ import annotations

import socket
import sys

import uvicorn

from governance import MemWarden, Settings, create_app


def main(fd: str, url: str, data_dir: str) -> None:
    sock = socket.socket(fileno=int(fd))
    with MemWarden.open(url, actor="memwarden:api",
                        settings=Settings(db_url=url, data_dir=data_dir)) as memwarden:
        config = uvicorn.Config(create_app(memwarden), ws="none", log_level="warning",
                                access_log=False)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            sock.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
