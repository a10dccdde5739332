"""The dashboard's way in: one backend per process, one SDK handle per signed-in API key.

The dashboard never queries tables itself: every page acts through a ``MemWarden`` handle acting
as the signed-in key's principal, so the access policy decides every read, as for the CLI and the
REST API. The key is authenticated again on every page run, so a revoked key stops working at
once; the handle on the database without a key (the operator's) only keeps the read models up to
date and appends the buffered read records.
"""

from __future__ import annotations

from eventstore._kafka import ReadModelsBehind
from governance._config import Settings
from governance._keys import authenticate
from governance._sdk import MemWarden

DASHBOARD_ACTOR = "memwarden:dashboard"


class Portal:
    def __init__(self, settings: Settings):
        self._backend = MemWarden.open(settings=settings, actor=DASHBOARD_ACTOR)
        self.database = self._backend.store.engine.url.render_as_string(hide_password=True)

    def sign_in(self, key: str) -> MemWarden:
        """A handle acting as ``key``'s principal; ``Unauthenticated`` for a bad or revoked one."""
        principal = authenticate(self._backend.store.engine, key.strip())
        return self._backend.as_principal(principal)

    def refresh(self) -> None:
        """Apply events other processes appended (the API, the CLI) before a page reads."""
        backend = self._backend
        checkpoints = backend.projector.checkpoints()
        if min(checkpoints.values()) < backend.store.head_position():
            backend.projector.catch_up()

    def rebuilding(self) -> str | None:
        """Why the pages cannot be shown now, or None: in the distributed mode, a Kafka consumer
        building the read models from the beginning of the topic (they hold part of the log
        until it is through: a memory would look missing, a valid key unknown)."""
        try:
            self._backend.refuse_while_building()
        except ReadModelsBehind as error:
            return str(error)
        return None

    def record_reads(self) -> None:
        """Append the reads the last page made (``MemoryAccessed``), as ``memwarden up`` does."""
        self._backend.flush_reads()

    def close(self) -> None:
        self._backend.close()
