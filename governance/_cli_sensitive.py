"""``memwarden erase``, ``export``, ``findings``, ``erasures``: data subjects' rights and sensitive
data from the command line (registered by ``_cli``)."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import click
from rich.table import Table

from governance._cli import _print_json, cli, command, console, id_column, json_option
from governance._sdk import MemWarden


@command(cli, "erase")
@click.argument("subject")
@click.option("--tenant", required=True, help="The tenant whose data about SUBJECT goes.")
@click.option("--reason", required=True, help="Why (recorded), e.g. the request's reference.")
@json_option
def erase_command(mw: MemWarden, subject: str, tenant: str, reason: str, as_json: bool) -> None:
    """Erase a data subject: destroy its keys, purge its text everywhere (GDPR Art 17;
    irreversible)."""
    with console.status(f"erasing {subject} in {tenant}..."):
        report = mw.erase_subject(subject, tenant=tenant, reason=reason)
    if as_json:
        _print_json(report.as_dict())
        return
    console.print(f"erased {subject} in {tenant} at position {report.position}: "
                  f"{report.memories} memories, {report.versions} versions purged, "
                  f"{report.keys_destroyed} keys destroyed"
                  + ("" if report.scrubbed else " (files scrubbed at the next checkpoint)"))


@command(cli, "export")
@click.argument("subject")
@click.option("--tenant", required=True, help="The tenant whose data about SUBJECT to export.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON here (created readable by you only) instead of stdout.")
def export_command(mw: MemWarden, subject: str, tenant: str, out: Path | None) -> None:
    """Everything held about a data subject, as JSON (GDPR Art 15/20): memories with every
    version, findings, reads, audit trail, erasures; masked per your rights."""
    with console.status(f"exporting {subject} in {tenant}...") if out else nullcontext():
        document = mw.export_subject(subject, tenant=tenant)
    text = json.dumps(document, indent=2, ensure_ascii=False)
    if out is None:
        click.echo(text)
        return
    # Personal data: never readable by other users of the machine, not even for a moment.
    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text + "\n")
    console.print(f"exported {len(document['memories'])} memories of {subject} to {out}")


@command(cli, "findings")
@click.option("--tenant", help="Tenant (default: your key's; the operator: all).")
@click.option("--memory", "cube_id", help="Only this memory's.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@json_option
def findings_command(mw: MemWarden, tenant: str | None, cube_id: str | None, limit: int,
                     as_json: bool) -> None:
    """Sensitive data found on write: entity types, offsets, scores (never the values)."""
    records = mw.findings(tenant=tenant, cube_id=cube_id, limit=limit)
    if as_json:
        _print_json({"items": [{
            "cube_id": r.cube_id, "version": r.version, "tenant": r.tenant,
            "entity_types": list(r.entity_types), "findings": [dict(f) for f in r.findings],
            "analyzer": r.analyzer, "position": r.position,
            "detected_at": r.detected_at.isoformat()} for r in records]})
        return
    table = Table("position", id_column("memory", (r.cube_id for r in records)), "version",
                  "tenant", "entity types")
    for r in records:
        table.add_row(str(r.position), r.cube_id, str(r.version), r.tenant,
                      ", ".join(r.entity_types))
    console.print(table)


@command(cli, "erasures")
@click.option("--tenant", help="Tenant (default: your key's; the operator: all).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@json_option
def erasures_command(mw: MemWarden, tenant: str | None, limit: int, as_json: bool) -> None:
    """Subject erasures and memory content erasures, oldest first."""
    records = mw.erasures(tenant=tenant, limit=limit)
    if as_json:
        _print_json({"items": [{
            "position": e.position, "type": e.type, "tenant": e.tenant, "subject": e.subject,
            "cube_id": e.cube_id, "actor": e.actor, "reason": e.reason, "rule": e.rule,
            "detail": dict(e.detail), "recorded_at": e.recorded_at.isoformat()}
            for e in records]})
        return
    table = Table("position", "type", "tenant", "subject / memory", "by", "reason")
    for e in records:
        table.add_row(str(e.position), e.type, e.tenant, e.subject or e.cube_id or "",
                      e.actor, e.reason or "")
    console.print(table)
