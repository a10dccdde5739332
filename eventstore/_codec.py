"""The payload codec: how payloads are transformed on their way into the log and back out.

The event store stays ignorant of what a payload means; a ``PayloadCodec`` passed to
``EventStore.open(url, codec=...)`` turns each new event's payload into its *stored* form before
it is hashed and inserted (MemWarden's codec seals memory text with AES-GCM, see
``governance._sensitive``), and stored payloads back into what the domain wrote when they are
read. So:

- the hash chain covers the stored form: ``verify`` needs no keys and works on any copy of the
  log (a backup, a Kafka topic);
- ``read_stream`` / ``read_all`` return decoded events; pass ``decoded=False`` for the stored
  form (what the Kafka relay publishes), and ``EventStore.decode`` turns stored events read
  elsewhere (a Kafka consumer) into decoded ones with the same codec.

Both methods get the SQLAlchemy connection of the operation they serve: ``encode`` runs inside
the append's transaction (so key rows it writes commit, or roll back, with the events), and
``decode`` inside the reader's (a projector's batch sees keys consistent with its events).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy import Connection

from eventstore._envelope import StoredEvent


class PayloadCodec(Protocol):
    def create_schema(self, conn: Connection) -> None:
        """Create whatever the codec keeps in the database (called by ``EventStore.open``)."""

    def encode(self, conn: Connection, events: Sequence[StoredEvent]) -> list[Mapping[str, Any]]:
        """The payload to store for each of ``events`` (envelopes complete but for the hash,
        payloads as the domain wrote them), in order."""

    def decode(self, conn: Connection, events: Sequence[StoredEvent]) -> list[StoredEvent]:
        """``events`` (payloads as stored) with their payloads decoded, in order."""
