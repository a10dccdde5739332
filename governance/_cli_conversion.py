"""``memwarden convert`` and ``memwarden lineage``: parametric and activation memory from the
command line (registered by ``_cli``)."""

from __future__ import annotations

from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from governance._cli import _print_json, cli, command, console, err_console, id_column, json_option
from governance._conversion import Selection
from governance._lineage import Lineage
from governance._sdk import MemWarden, state_as_dict
from projections._lineage import ArtifactRecord


@cli.group("convert")
def convert_group() -> None:
    """Distil hot memories into a LoRA adapter or a KV cache, or fall back to plaintext."""


def _show_selection(selection: Selection) -> None:
    table = Table(id_column("selected memory", (c.state.cube_id for c in selection.selected)),
                  "owner", "version", "reads", "last write",
                  title=f"{len(selection.selected)} selected")
    for c in selection.selected:
        table.add_row(c.state.cube_id, c.state.owner, str(c.state.version), str(c.reads),
                      c.last_write.strftime("%Y-%m-%d %H:%M"))
    console.print(table)
    if selection.excluded:
        left_out = Table(id_column("left out", (c for c, _ in selection.excluded)), "why",
                         title=f"{len(selection.excluded)} left out")
        for cube_id, why in selection.excluded:
            left_out.add_row(cube_id, why)
        console.print(left_out)


_scope_options = [
    click.option("--tenant", required=True, help="Tenant whose memories are converted."),
    click.option("--owner", help="Only the memories about this data subject."),
    click.option("--id", "cube_id", help="The artifact memory to create or add a version to "
                                         "(default: <kind>.<tenant>[.<owner>])."),
    click.option("--dry-run", is_flag=True, help="Show what would be converted, and why the "
                                                 "rest is left out; change nothing."),
    click.option("--reason", help="Why (recorded)."),
    json_option,
]


def _scope(func: Any) -> Any:
    for option in reversed(_scope_options):
        func = option(func)
    return func


@command(convert_group, "parametric")
@_scope
def convert_parametric_command(mw: MemWarden, tenant: str, owner: str | None,
                               cube_id: str | None, dry_run: bool, reason: str | None,
                               as_json: bool) -> None:
    """Train a LoRA adapter on the memories the conversion policy selects (a new version of the
    parametric memory, with its exact sources and before/after metrics)."""
    if dry_run:
        _dry_run(mw.conversion_plan(tenant=tenant, owner=owner), as_json)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("training LoRA adapter", total=None, loss="-")

        def step(done: int, total: int, loss: float) -> None:
            progress.update(task, completed=done, total=total, loss=f"{loss:.3f}")

        result = mw.convert_parametric(tenant=tenant, owner=owner, cube_id=cube_id,
                                       reason=reason, on_step=step)
    if as_json:
        _print_json({"memory": state_as_dict(result.memory, with_text=False),
                     "artifact": result.artifact, "metrics": result.metrics,
                     "sources": [{"id": c.state.cube_id, "version": c.state.version}
                                 for c in result.selection.selected]})
        return
    m = result.metrics
    console.print(
        f"adapter {result.artifact} is version {result.memory.version} of "
        f"{result.memory.cube_id}, from {len(result.selection.selected)} memories\n"
        f"  sources  perplexity {m['sources_before_perplexity']:.1f} -> "
        f"{m['sources_after_perplexity']:.1f}\n"
        f"  held-out perplexity {m['held_out_before_perplexity']:.1f} -> "
        f"{m['held_out_after_perplexity']:.1f} (unrelated texts: what else changed)",
        highlight=False)


@command(convert_group, "activation")
@_scope
def convert_activation_command(mw: MemWarden, tenant: str, owner: str | None,
                               cube_id: str | None, dry_run: bool, reason: str | None,
                               as_json: bool) -> None:
    """Precompute the KV cache of the memories the conversion policy selects (a new version of
    the activation memory, with its exact sources)."""
    if dry_run:
        _dry_run(mw.conversion_plan(tenant=tenant, owner=owner), as_json)
        return
    with err_console.status("computing the KV cache"):
        result = mw.convert_activation(tenant=tenant, owner=owner, cube_id=cube_id,
                                       reason=reason)
    if as_json:
        _print_json({"memory": state_as_dict(result.memory, with_text=False),
                     "artifact": result.artifact, "prefix_tokens": result.prefix_tokens,
                     "sources": [{"id": s.cube_id, "version": s.version}
                                 for s in result.sources]})
        return
    console.print(f"KV cache {result.artifact} is version {result.memory.version} "
                  f"of {result.memory.cube_id}: {len(result.sources)} memories, "
                  f"{result.prefix_tokens} tokens", highlight=False)


def _dry_run(selection: Selection, as_json: bool) -> None:
    if as_json:
        _print_json({"dry_run": True, **selection.as_dict()})
    else:
        _show_selection(selection)


@command(convert_group, "run")
@click.option("--tenant", help="Only this tenant's scopes (default: your key's; the operator: "
                               "all).")
@click.option("--dry-run", is_flag=True, help="Say what the worker would convert, and why.")
@json_option
def convert_run_command(mw: MemWarden, tenant: str | None, dry_run: bool, as_json: bool) -> None:
    """Run the conversion worker once: rebuild the artifacts of the policy's worker scopes that
    are missing, tainted, retired or stale."""
    from governance._conversion_worker import run_conversions

    with err_console.status("converting"):
        actions = run_conversions(mw, tenant=tenant, dry_run=dry_run)
    if as_json:
        _print_json([a.as_dict() for a in actions])
        return
    if not actions:
        console.print("no worker scopes (policies/conversion.yaml, worker.scopes)")
        return
    table = Table("kind", id_column("memory", (a.cube_id for a in actions)), "outcome", "why",
                  "artifact")
    for a in actions:
        table.add_row(a.kind, a.cube_id, a.outcome, a.why, (a.artifact or "")[:16])
    console.print(table)


@command(convert_group, "plaintext")
@click.argument("artifact")
@click.option("--reason", help="Why (recorded).")
@json_option
def convert_plaintext_command(mw: MemWarden, artifact: str, reason: str | None,
                              as_json: bool) -> None:
    """Retire an adapter or KV cache (ARTIFACT: its memory id or sha256): its sources' current
    plaintext serves as the active memory instead."""
    fallback = mw.restore_plaintext(artifact, reason=reason)
    if as_json:
        _print_json({"artifact": fallback.artifact,
                     "restored": [state_as_dict(s) for s in fallback.restored],
                     "skipped": [{"id": c, "why": why} for c, why in fallback.skipped]})
        return
    console.print(f"retired {fallback.artifact}; {len(fallback.restored)} memories serve as "
                  "plaintext again", highlight=False)
    ids = [*(s.cube_id for s in fallback.restored), *(c for c, _ in fallback.skipped)]
    table = Table(id_column("memory", ids), "version", "text")
    for state in fallback.restored:
        table.add_row(state.cube_id, str(state.version), state.text[:70])
    for cube_id, why in fallback.skipped:
        table.add_row(cube_id, "-", Text(f"not restored: {why}", style="dim"))
    console.print(table)


def _artifact_rows(artifacts: tuple[ArtifactRecord, ...] | list[ArtifactRecord]) -> Table:
    table = Table("artifact", "kind", id_column("memory", (a.cube_id for a in artifacts)), "v",
                  "status", "sources (id@version)", "taints")
    for a in artifacts:
        status = Text(a.status, style={"ready": "green", "tainted": "red"}.get(a.status, ""))
        table.add_row(a.artifact[:16], a.kind, a.cube_id, str(a.cube_version), status,
                      "\n".join(f"{s.cube_id}@{s.version}" for s in a.sources),
                      "\n".join(f"{t.cause} of {t.source_cube_id}" + (" (file purged)"
                                                                       if t.purged else "")
                                for t in a.taints))
    return table


@command(cli, "lineage")
@click.argument("memory_or_artifact")
@json_option
def lineage_command(mw: MemWarden, memory_or_artifact: str, as_json: bool) -> None:
    """Both directions: the artifacts made from a memory, or what an artifact (memory id or
    sha256) is made of."""
    found: Lineage = mw.lineage(memory_or_artifact)
    if as_json:
        _print_json(found.as_dict())
        return
    verb = ("is made of" if found.direction == "made_of"
            else "has knowledge distilled into")
    console.print(f"{found.subject} {verb}:" if found.artifacts
                  else f"no artifact was made from {found.subject}", highlight=False)
    if found.artifacts:
        console.print(_artifact_rows(found.artifacts))


@command(cli, "artifacts")
@click.option("--tenant", help="Only this tenant's (default: your key's; the operator: all).")
@json_option
def artifacts_command(mw: MemWarden, tenant: str | None, as_json: bool) -> None:
    """Adapters and KV caches, newest first, with their sources and status."""
    found = mw.artifacts(tenant=tenant)
    if as_json:
        _print_json([a.as_dict() for a in found])
    else:
        console.print(_artifact_rows(found))
