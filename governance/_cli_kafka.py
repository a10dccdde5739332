"""``memwarden relay``, ``memwarden project`` and ``memwarden work`` (the distributed mode's
processes), and ``memwarden bundle`` (portable bundles, ``governance._bundles``).

Both run until SIGINT or SIGTERM (``--once``: until caught up), finishing the batch in flight:
what they recorded as done is done.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table
from sqlalchemy import select

from eventstore._kafka import (
    KafkaSettings,
    Relay,
    RelayProgress,
    StepResult,
    applied_through,
    consumer_generations,
    consumer_offsets,
    relay_checkpoints,
)
from governance._bundles import export_bundle, identity, import_bundle, key_id
from governance._cli import _print_json, _progress, cli, command, console, err_console, json_option
from governance._cli_retention import _show_sweep
from governance._config import ConfigError
from governance._errors import InvalidCommand
from governance._principal import PLATFORM, Resource
from governance._relay import (
    chosen_projections,
    kafka_settings,
    open_kafka_projector,
    open_relay,
)
from governance._retention import SweepReport
from governance._sdk import MemWarden
from projections._kafka_projector import KafkaFedRunner
from projections._readmodels import Projection

if TYPE_CHECKING:
    from governance._conversion_worker import ConversionAction

PROGRESS_EVERY_SECONDS = 5.0


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop  # (under a test runner's thread: no signals to catch)
        return
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _partitions(values: tuple[int, ...]) -> list[int] | None:
    if any(value < 0 for value in values):
        raise ConfigError("partitions are numbered from 0")
    return sorted(set(values)) or None


@command(cli, "relay")
@click.option("--from-position", type=click.IntRange(min=0),
              help="Publish again everything after this log position (re-seed an empty or new "
                   "broker; 0: the whole log). Default: resume after the last acknowledged one.")
@click.option("--topic", help="Topic (default: $MEMWARDEN_KAFKA_TOPIC, memwarden.events).")
@click.option("--partitions", type=click.IntRange(min=1),
              help="Partitions, if the relay creates the topic ($MEMWARDEN_KAFKA_PARTITIONS, 6).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Events per batch (1000).")
@click.option("--once", is_flag=True, help="Publish what is in the log now, then exit.")
@json_option
def relay_command(mw: MemWarden, from_position: int | None, topic: str | None,
                  partitions: int | None, batch_size: int | None, once: bool,
                  as_json: bool) -> None:
    """Publish the event log to Kafka (acks=all, idempotent, key = stream id), resuming after
    the last acknowledged position; a broker that is down is retried with backoff."""
    mw.require("platform.operate", Resource.of_tenant(PLATFORM))
    relay = open_relay(mw, kafka_settings(mw.settings, topic=topic, partitions=partitions,
                                          batch_size=batch_size))
    if from_position is not None:
        relay.reset(from_position)
    try:
        if once:
            with _progress() as progress:
                task = progress.add_task("relaying", total=None)
                started = relay.position()
                total = relay.publish_available()
                progress.update(task, completed=total, total=relay.position() - started)
        else:
            _run_relay(relay)
            total = relay.published
    finally:
        relay.close()
    position = relay.position()
    if as_json:
        _print_json({"published": total, "position": position,
                     "head": mw.store.head_position()})
    else:
        console.print(f"published {total} events; acknowledged up to position {position}")


def _run_relay(relay: Relay) -> None:
    last_report = 0.0

    def report(progress: RelayProgress) -> None:
        nonlocal last_report
        if time.monotonic() - last_report >= PROGRESS_EVERY_SECONDS:
            last_report = time.monotonic()
            err_console.print(f"relay: position {progress.position} of {progress.head} "
                              f"({progress.published} published)", highlight=False)

    with _stop_on_signals() as stop:
        err_console.print(f"relay: publishing to {relay.settings.topic} at "
                          f"{relay.settings.bootstrap}; Ctrl+C stops", highlight=False)
        relay.run(stop, on_progress=report)


@command(cli, "project")
@click.option("--source", type=click.Choice(["sql", "kafka"]), default="sql", show_default=True,
              help="Read the log from the database, or from Kafka (distributed mode).")
@click.option("--partition", "partitions", type=int, multiple=True,
              help="Kafka partition to consume (repeatable; default: all of the topic's).")
@click.option("--name", default="projector", show_default=True,
              help="Consumer name: each keeps its own offsets and read models (Kafka).")
@click.option("--read-model", "read_models", multiple=True,
              help="Maintain only this read model (repeatable; Kafka; default: all of them). "
                   "The search indexer: --name indexer --read-model search.")
@click.option("--except", "excluded", multiple=True,
              help="Leave this read model to another consumer (repeatable; Kafka).")
@click.option("--topic", help="Topic (default: $MEMWARDEN_KAFKA_TOPIC).")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Most events applied in one transaction (Kafka; 1000).")
@click.option("--once", is_flag=True, help="Apply what is available now, then exit.")
@json_option
def project_command(mw: MemWarden, source: str, partitions: tuple[int, ...], name: str,
                    read_models: tuple[str, ...], excluded: tuple[str, ...], topic: str | None,
                    batch_size: int | None, once: bool, as_json: bool) -> None:
    """Keep the read models up to date: from the SQL log, or from Kafka partitions (each read
    model maintained by one consumer name, scaled out over partitions)."""
    mw.require("platform.operate", Resource.of_tenant(PLATFORM))
    if source == "sql":
        if read_models or excluded or partitions or batch_size:
            raise ConfigError("--read-model, --except, --partition and --batch-size are for "
                              "--source kafka")
        applied = _project_sql(mw, once)
    else:
        kafka = kafka_settings(mw.settings, topic=topic, batch_size=batch_size)
        applied = _project_kafka(mw, name, _partitions(partitions), kafka, once,
                                 chosen_projections(read_models, excluded))
    if as_json:
        _print_json({"applied": applied})
    else:
        console.print(f"applied {applied} events")


def _project_sql(mw: MemWarden, once: bool) -> int:
    if once:
        return mw.projector.catch_up()
    applied = 0
    with _stop_on_signals() as stop:
        while not stop.is_set():
            applied += mw.projector.catch_up()
            stop.wait(1.0)
    return applied


def _project_kafka(mw: MemWarden, name: str, partitions: list[int] | None,
                   kafka: KafkaSettings, once: bool, projections: list[Projection]) -> int:
    projector = open_kafka_projector(mw, kafka, name=name,
                                     partitions=partitions, projections=projections)
    try:
        if once:
            # Idle = one poll that brought nothing (after the partitions were verified).
            while True:
                result = projector.step(timeout=2.0)
                if result.received == 0 and not projector.loop.source.verifying:
                    break
            return projector.loop.totals.applied
        last_report = 0.0

        def report(result: StepResult) -> None:
            nonlocal last_report
            if result.received and time.monotonic() - last_report >= PROGRESS_EVERY_SECONDS:
                last_report = time.monotonic()
                totals = projector.loop.totals
                err_console.print(f"projector {name}: {totals.applied} applied, "
                                  f"{totals.duplicates} duplicates skipped, {totals.gaps} gaps",
                                  highlight=False)

        with _stop_on_signals() as stop:
            err_console.print(f"projector {name}: consuming {projector.loop.settings.topic} "
                              f"partitions {partitions or 'all'} into "
                              f"{', '.join(p.name for p in projections)}; Ctrl+C stops",
                              highlight=False)
            projector.run(stop, on_step=report)
        return projector.loop.totals.applied
    finally:
        projector.close()


def rebuild_kafka_fed(mw: MemWarden, names: tuple[str, ...], as_json: bool) -> None:
    """``memwarden projections rebuild`` in the distributed mode (``KafkaFedRunner.rebuild``)."""
    mw.require("platform.operate", Resource.of_tenant(PLATFORM))
    runner = mw.projector
    assert isinstance(runner, KafkaFedRunner)
    try:
        emptied, consumers = runner.reset_kafka_fed(names or None)
    except ValueError as error:
        raise InvalidCommand(str(error)) from None
    if as_json:
        _print_json({"emptied": emptied, "consumers": consumers})
    elif consumers:
        console.print(f"emptied {', '.join(emptied)}; consumers {', '.join(consumers)} read the "
                      "topic again from offset 0 (running ones at their next batch, stopped "
                      "ones when started)")
    else:
        console.print(f"emptied {', '.join(emptied)}; no Kafka consumer maintained them: the "
                      "next 'memwarden project --source kafka' to claim them builds them")


def kafka_status(mw: MemWarden) -> dict[str, Any]:
    """Where the distributed mode stands, from the database alone: the relay's acknowledged
    position per topic, and per Kafka consumer the read models it maintains, its next offset
    per partition, and the SQL log position through which it has applied every event (its lag
    against the head: what ``memwarden work`` waits on), and the position a consumer building
    its read models from offset 0 must apply through before the API serves them (None: not
    building). Read models no consumer maintains are listed: they stay empty until one claims
    them."""
    mw.require("platform.operate", Resource.of_tenant(PLATFORM))
    runner = mw.projector
    assert isinstance(runner, KafkaFedRunner)
    claims, builds = runner.consumers(), runner.building()
    with mw.store.engine.connect() as conn:
        head = mw.store.head_position(conn)
        relay = {topic: position for topic, position in conn.execute(
            select(relay_checkpoints.c.topic, relay_checkpoints.c.position))}
        offsets = conn.execute(select(
            consumer_offsets.c.consumer, consumer_offsets.c.topic, consumer_offsets.c.partition,
            consumer_offsets.c.next_offset).order_by(
            consumer_offsets.c.consumer, consumer_offsets.c.topic,
            consumer_offsets.c.partition)).all()
        names = sorted({*claims.values(), *(row.consumer for row in offsets), *conn.execute(
            select(consumer_generations.c.consumer)).scalars()})
        consumers = []
        for name in names:
            through = applied_through(conn, name, 0, head)
            consumers.append({
                "consumer": name,
                "read_models": sorted(m for m, owner in claims.items() if owner == name),
                "partitions": [{"topic": row.topic, "partition": row.partition,
                                "next_offset": row.next_offset}
                               for row in offsets if row.consumer == name],
                "applied_through": through, "behind": head - through,
                "building_through": builds.get(name)})
    return {"mode": "kafka", "head": head, "relay": relay, "consumers": consumers,
            "unmaintained": sorted({p.name for p in runner.projections} - set(claims))}


def show_kafka_status(mw: MemWarden, as_json: bool) -> None:
    """``memwarden projections status`` in the distributed mode."""
    status = kafka_status(mw)
    if as_json:
        _print_json(status)
        return
    head = status["head"]
    relayed = ", ".join(f"{topic} up to {position} ({head - position} behind)"
                        for topic, position in sorted(status["relay"].items()))
    console.print(f"log head: position {head}; relay acknowledged: {relayed or 'nothing yet'}",
                  highlight=False)
    table = Table("consumer", "read models", "partition: next offset", "applied through",
                  "behind", "building")
    for c in status["consumers"]:
        building = c["building_through"]
        table.add_row(c["consumer"], ", ".join(c["read_models"]) or "(none)",
                      ", ".join(f"{p['partition']}: {p['next_offset']}"
                                for p in c["partitions"]) or "(none yet)",
                      str(c["applied_through"]), str(c["behind"]),
                      "no" if building is None else f"until position {building}")
    console.print(table)
    if status["unmaintained"]:
        console.print("maintained by no consumer (empty until one claims them): "
                      + ", ".join(status["unmaintained"]), highlight=False)


WORKERS = ("retention", "conversion")


@command(cli, "work")
@click.option("--every", type=click.IntRange(min=1),
              help="Seconds between retention sweeps (default: $MEMWARDEN_RETENTION_INTERVAL, "
                   "300). Conversion passes: the conversion policy's worker.interval_seconds.")
@click.option("--only", "only", type=click.Choice(WORKERS), multiple=True,
              help="Run only this worker (repeatable; default: both).")
@click.option("--once", is_flag=True, help="One pass of each worker now, then exit.")
@json_option
def work_command(mw: MemWarden, every: int | None, only: tuple[str, ...], once: bool,
                 as_json: bool) -> None:
    """Run the lifecycle workers: retention sweeps (TTL, decay, tiering, erasure) and the
    conversion worker (the artifacts of the conversion policy's worker.scopes), each now and
    then at its interval. Each pass first waits until the read models it decides from have
    applied the log up to its start (distributed mode: the Kafka-fed ones), so a sweep sees
    every legal hold placed before it."""
    mw.require("platform.operate", Resource.of_tenant(PLATFORM))
    from governance._conversion import ConversionPolicy

    workers = [w for w in WORKERS if w in only] if only else list(WORKERS)
    policy = ConversionPolicy.load()  # (refused now if invalid, not at the first pass)
    if only == ("conversion",) and not policy.worker.scopes:
        raise ConfigError("the conversion policy schedules no scopes (worker.scopes): the "
                          "conversion worker has nothing to do")
    if once:
        results = {name: _work_once(mw, name) for name in workers}
        if as_json:
            _print_json({name: _as_json(result) for name, result in results.items()})
            return
        for result in results.values():
            if isinstance(result, SweepReport):
                _show_sweep(result)
            else:
                _show_conversions(result)
        return
    intervals = {"retention": every or mw.settings.retention_interval,
                 "conversion": policy.worker.interval_seconds}
    with _stop_on_signals() as stop:
        err_console.print("work: " + ", ".join(f"{name} every {intervals[name]} s"
                                                for name in workers) + "; Ctrl+C stops",
                          highlight=False)
        # A thread per worker: a long LoRA training must not hold up the next retention sweep.
        threads = [threading.Thread(target=_work_every, name=f"memwarden-{name}",
                                    args=(mw, name, intervals[name], stop, as_json))
                   for name in workers]
        for thread in threads:
            thread.start()
        while not stop.wait(0.5):  # (with a timeout: the signal handler runs between waits)
            pass
        for thread in threads:  # each finishes the pass it is in
            thread.join()


def _work_every(mw: MemWarden, name: str, interval: int, stop: threading.Event,
                as_json: bool) -> None:
    """Passes of the worker ``name`` until ``stop``: one now, then one ``interval`` seconds
    after each ends. A pass that fails (the read models behind, the database away) is
    reported and tried again at the next one."""
    while not stop.is_set():
        try:
            result = _work_once(mw, name)
        except Exception as error:
            err_console.print(f"work: {_PASS[name]} skipped: {error}; next in {interval} s",
                              highlight=False, markup=False)
        else:
            if as_json:
                click.echo(json.dumps({name: _as_json(result)}, default=str))
            else:
                err_console.print(f"work: {_summary(name, result)}", highlight=False,
                                  markup=False)
        stop.wait(interval)


_PASS = {"retention": "sweep", "conversion": "conversion pass"}


def _work_once(mw: MemWarden, name: str) -> SweepReport | list[ConversionAction]:
    """One pass of the worker ``name``."""
    if name == "retention":
        return mw.run_retention()
    from governance._conversion_worker import run_conversions

    return run_conversions(mw)


def _as_json(result: SweepReport | list[ConversionAction]) -> Any:
    if isinstance(result, SweepReport):
        return result.as_dict()
    return [action.as_dict() for action in result]


def _summary(name: str, result: SweepReport | list[ConversionAction]) -> str:
    if isinstance(result, SweepReport):
        return (f"retention sweep examined {result.examined}, {result.events} events, "
                f"{dict(result.counts)}")
    outcomes = Counter(action.outcome for action in result)
    return f"conversion pass over {len(result)} scheduled artifacts: {dict(outcomes)}"


def _show_conversions(actions: list[ConversionAction]) -> None:
    if not actions:
        console.print("conversion: no worker scopes (policies/conversion.yaml, worker.scopes)")
        return
    table = Table("kind", "memory", "outcome", "why", "artifact", title="conversion worker")
    for a in actions:
        table.add_row(a.kind, a.cube_id, a.outcome, a.why, (a.artifact or "")[:16])
    console.print(table)


@cli.group("bundle")
def bundle_group() -> None:
    """Portable bundles: a tenant's memories, signed, moved between instances."""


@command(bundle_group, "export")
@click.option("--tenant", required=True, help="The tenant whose memories to export.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="File to write (created 0600).")
@click.option("--with-keys", is_flag=True,
              help="Include the memory keys, wrapped under a passphrase "
                   "($MEMWARDEN_BUNDLE_PASSPHRASE, else asked for).")
@json_option
def bundle_export_command(mw: MemWarden, tenant: str, out: Path, with_keys: bool,
                          as_json: bool) -> None:
    """Write a signed, versioned bundle of a tenant's memories with their full history (text
    stays sealed)."""
    passphrase = _passphrase(confirm=True) if with_keys else None
    bundle = export_bundle(mw, tenant, passphrase=passphrase)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(bundle, file)
    summary = {"file": str(out), "tenant": tenant, "memories": len(bundle["body"]["streams"]),
               "events": sum(len(s["events"]) for s in bundle["body"]["streams"]),
               "signer": bundle["signer"], "with_keys": with_keys}
    if as_json:
        _print_json(summary)
    else:
        console.print(f"exported {summary['memories']} memories ({summary['events']} events) "
                      f"of {tenant} to {out}, signed by {key_id(bundle['signer'])}")


@command(bundle_group, "import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--trust", "trusted", multiple=True,
              help="Public key of an instance whose bundles to accept (repeatable; see "
                   "'memwarden bundle identity' there). Own bundles are always trusted.")
@json_option
def bundle_import_command(mw: MemWarden, file: Path, trusted: tuple[str, ...],
                          as_json: bool) -> None:
    """Import a bundle: memories with their history and provenance, and a MemoryImported event
    each. Refuses tampered bundles and those of untrusted instances."""
    data = file.read_bytes()
    needs_keys = b'"keys":null' not in data and b'"keys": null' not in data
    summary = import_bundle(mw, data, trusted=trusted,
                            passphrase=_passphrase(confirm=False) if needs_keys else None)
    if as_json:
        _print_json(summary)
    else:
        console.print(f"imported {summary['memories']} memories ({summary['events']} events) "
                      f"into {summary['tenant']} from instance {summary['signer']}")


@command(bundle_group, "identity")
def bundle_identity_command(mw: MemWarden) -> None:
    """This instance's public key: what another instance passes to 'bundle import --trust'."""
    click.echo(identity(mw))


def _passphrase(*, confirm: bool) -> str:
    given = os.environ.get("MEMWARDEN_BUNDLE_PASSPHRASE")
    if given:
        return given
    return str(click.prompt("bundle passphrase", hide_input=True, confirmation_prompt=confirm,
                            err=True))
