"""The distributed mode's processes, as the CLI and ``memwarden up`` run them.

``MEMWARDEN_KAFKA_BOOTSTRAP`` set means the distributed mode: writes append to the SQL log only
(no synchronous projection), the relay publishes the log to Kafka, and projectors, workers and
the search indexer consume it (``memwarden project --source kafka``, each consumer maintaining
its share of the read models), and the lifecycle workers (``memwarden work``) act on those read
models once the consumers have applied the log up to the moment they start. Each of these
operations is whole-platform maintenance: it needs ``platform.operate``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from eventstore._kafka import KafkaSettings, Relay, RelayProgress, StepResult
from governance._config import ConfigError, Settings
from governance._principal import PLATFORM, Resource
from governance._sdk import MemWarden
from projections._kafka_projector import KafkaProjector, missing_dependencies
from projections._readmodels import Projection, default_projections


def kafka_settings(settings: Settings, *, topic: str | None = None,
                   partitions: int | None = None, batch_size: int | None = None) -> KafkaSettings:
    """The Kafka settings of ``settings`` (the environment), options overriding them."""
    if not settings.kafka_bootstrap:
        raise ConfigError("MEMWARDEN_KAFKA_BOOTSTRAP is not set: Kafka distribution needs the "
                          "broker's address, e.g. MEMWARDEN_KAFKA_BOOTSTRAP=localhost:9092")
    return KafkaSettings(
        bootstrap=settings.kafka_bootstrap,
        topic=topic or settings.kafka_topic,
        partitions=partitions or settings.kafka_partitions,
        **({"batch_size": batch_size} if batch_size else {}),
    )


def open_relay(mw: MemWarden, kafka: KafkaSettings) -> Relay:
    mw.require("platform.operate", Resource.of_tenant(PLATFORM))
    return Relay(mw.store, kafka)


def chosen_projections(read_models: Sequence[str] = (),
                       excluded: Sequence[str] = ()) -> list[Projection]:
    """The read models a consumer maintains: those named (default: all), less ``excluded``."""
    every = default_projections()
    known = [p.name for p in every]
    unknown = sorted((set(read_models) | set(excluded)) - set(known))
    if unknown:
        raise ConfigError(f"unknown read model(s) {', '.join(unknown)}; the read models are "
                          f"{', '.join(known)}")
    chosen = [p for p in every if (not read_models or p.name in read_models)
              and p.name not in excluded]
    if not chosen:
        raise ConfigError("no read model left to maintain")
    missing = missing_dependencies(p.name for p in chosen)
    if missing:
        raise ConfigError("a consumer must also maintain the read models its read models read: "
                          + "; ".join(f"{name} reads {', '.join(sorted(needed))}"
                                      for name, needed in sorted(missing.items())))
    return chosen


def open_kafka_projector(mw: MemWarden, kafka: KafkaSettings, *, name: str = "projector",
                         partitions: Sequence[int] | None = None,
                         projections: Sequence[Projection] | None = None) -> KafkaProjector:
    """A consumer of ``partitions`` of the topic (default: all) maintaining ``projections``
    (default: every read model) in ``mw``'s database under ``name``: the projector, or the
    search indexer (``chosen_projections(["search"])`` under a name of its own). Each name keeps
    its own offsets and claims its read models (``projections._kafka_projector``)."""
    mw.require("platform.operate", Resource.of_tenant(PLATFORM))
    return KafkaProjector(mw.store, kafka, name=name, partitions=partitions,
                          projections=projections)


class RelayThread(threading.Thread):
    """The relay beside the API in ``memwarden up`` (distributed mode)."""

    def __init__(self, relay: Relay,
                 on_progress: Callable[[RelayProgress], None] | None = None) -> None:
        super().__init__(name="memwarden-relay", daemon=True)
        self.relay = relay
        self._on_progress = on_progress
        self._stop_requested = threading.Event()

    def run(self) -> None:
        self.relay.run(self._stop_requested, on_progress=self._on_progress)

    def stop(self) -> None:
        """Stop after the batch in flight, then publish what the last requests appended."""
        self._stop_requested.set()
        self.join()
        try:
            self.relay.publish_available()
        except Exception:  # the broker is down: the next relay resumes from the checkpoint
            return
        finally:
            self.relay.close()


__all__ = ["RelayThread", "StepResult", "chosen_projections", "kafka_settings",
           "open_kafka_projector", "open_relay"]
