"""The ``memwarden`` command line. Human-readable output by default, ``--json`` for scripts.

Exit codes: 0 success, 1 unexpected failure, 2 bad usage or invalid input, 3 not found,
4 conflict (stale version, deleted memory), 5 integrity failure (broken hash chain).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from eventstore import EventStoreError
from governance._config import ConfigError, Settings
from governance._errors import (
    InvalidCommand,
    MemWardenError,
    NotFound,
    StateConflict,
    TextTooLarge,
    VersionConflict,
)
from governance._keys import ApiKeys, Unauthenticated, key_as_dict
from governance._memcube import SEMANTIC_TYPES, SOURCES
from governance._policy import PermissionDenied, PolicyRule
from governance._principal import PLATFORM, ROLES, Resource
from governance._sdk import MemWarden, state_as_dict
from projections import (
    COLD_ARCHIVE,
    ApiKeyRecord,
    AuditEntry,
    AuditFilter,
    CubeFilter,
    MemoryState,
)

(EXIT_OK, EXIT_FAILURE, EXIT_INVALID, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_INTEGRITY,
 EXIT_DENIED) = range(7)

PIPED_WIDTH = 160
"""Columns of output that goes to a file or a pipe ($COLUMNS, if set, wins): rich would cut
tables to 80, wrapping every text and shortening names."""


def _console(*, stderr: bool = False) -> Console:
    # Markup off: memory texts, ids and error messages hold whatever users wrote, and "[note]"
    # or "[bold]" in them must print as written. Styled words are built as rich Text instead.
    piped = not (sys.stderr if stderr else sys.stdout).isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, markup=False, width=PIPED_WIDTH if piped else None)


console = _console()
err_console = _console(stderr=True)


def id_column(header: str, ids: Iterable[str]) -> Column:
    """A table column of identifiers, which readers copy into their next command: never
    shortened with "…" nor folded over lines, however narrow the terminal (other columns wrap
    instead)."""
    return Column(header, no_wrap=True, min_width=max([len(header), *map(len, ids)]))


F = TypeVar("F", bound=Callable[..., Any])


def _exit_code(error: MemWardenError) -> int:
    if isinstance(error, PermissionDenied) and error.hides_existence:
        return EXIT_NOT_FOUND
    if isinstance(error, PermissionDenied | Unauthenticated):
        return EXIT_DENIED
    if isinstance(error, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, VersionConflict | StateConflict):
        return EXIT_CONFLICT
    if isinstance(error, InvalidCommand | TextTooLarge):
        return EXIT_INVALID
    return EXIT_FAILURE


class _Context:
    def __init__(self, db_url: str | None, actor: str | None, key: str | None) -> None:
        self._db_url = db_url
        self._actor = actor
        self._key = key
        self._memwarden: MemWarden | None = None

    def memwarden(self) -> MemWarden:
        """The handle every command uses: as the key's principal, or the local operator."""
        if self._memwarden is None:
            settings = Settings.from_env()
            if self._key is not None:
                if self._actor is not None:
                    raise InvalidCommand("--actor names the local operator; with an API key, "
                                         "the key's subject acts")
                self._memwarden = MemWarden.open(self._db_url, key=self._key, settings=settings)
            else:
                actor = self._actor or settings.actor or _default_actor()
                self._memwarden = MemWarden.open(self._db_url, actor=actor, settings=settings)
        return self._memwarden

    def close(self) -> None:
        if self._memwarden is not None:
            self._memwarden.close()


def _default_actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in some containers
        return "cli"


def command(group: click.Group, name: str | None = None) -> Callable[[F], F]:
    """Register a subcommand that gets the MemWarden handle and maps errors to exit codes."""

    def decorate(func: F) -> F:
        @group.command(name=name, help=func.__doc__)
        @click.pass_obj
        @functools.wraps(func)
        def run(ctx: _Context, *args: Any, **kwargs: Any) -> None:
            try:
                func(ctx.memwarden(), *args, **kwargs)
            except MemWardenError as error:
                message = str(error)
                if isinstance(error, PermissionDenied) and error.hides_existence:
                    # Another tenant's: say exactly what a missing one would.
                    resource = error.decision.resource
                    message = f"no {resource.kind} with id {resource.id!r}"
                err_console.print(Text.assemble(("error:", "red"), f" {message}"), highlight=False)
                sys.exit(_exit_code(error))
            except (ConfigError, EventStoreError) as error:
                err_console.print(Text.assemble(("error:", "red"), f" {error}"), highlight=False)
                sys.exit(EXIT_FAILURE)
            finally:
                ctx.close()

        run.__doc__ = func.__doc__
        return run  # type: ignore[return-value]

    return decorate


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _parse_moment(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidCommand(f"{value!r} is not an ISO-8601 timestamp") from None
    if moment.tzinfo is None:
        raise InvalidCommand(f"{value!r} has no time zone; add one, e.g. {value}+00:00")
    return moment


def _show_memory(memory: MemoryState) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan")
    table.add_column()
    data = state_as_dict(memory)
    for key in ("id", "tenant", "owner", "kind", "version", "state", "text"):
        table.add_row(key, str(data[key]))
    for key, value in data["metadata"].items():
        table.add_row(f"  {key}", json.dumps(value) if isinstance(value, list) else str(value))
    table.add_row("updated", f"{data['updated_at']} by {data['updated_by']} ({data['last_event']})")
    table.add_row("created", f"{data['created_at']} by {data['created_by']}")
    console.print(table)


@click.group()
@click.option("--db", "db_url", envvar="MEMWARDEN_DB_URL", default=None,
              help="Database URL (default: sqlite:///./data/memwarden.db).")
@click.option("--key", envvar="MEMWARDEN_API_KEY", default=None,
              help="Act as this API key's principal (default: $MEMWARDEN_API_KEY; without one, "
                   "act as the local operator).")
@click.option("--actor", default=None,
              help="The local operator's name, recorded on every event (without --key). "
                   "Default: $MEMWARDEN_ACTOR or cli:<user>.")
@click.version_option(package_name="memwarden")
@click.pass_context
def cli(ctx: click.Context, db_url: str | None, key: str | None, actor: str | None) -> None:
    """MemWarden: governance for LLM agent memory.

    Every command goes through the access policy. With --key (or $MEMWARDEN_API_KEY) it acts as
    that key's subject, role and tenant; without one, as the local operator (the admin role),
    as anyone who can open the database could.
    """
    ctx.obj = _Context(db_url, actor, key)


def _metadata_options(func: F) -> F:
    options = [
        click.option("--source", type=click.Choice(SOURCES), help="Where the memory came from."),
        click.option("--type", "semantic_type", type=click.Choice(SEMANTIC_TYPES),
                     help="Semantic type."),
        click.option("--tag", "tags", multiple=True, help="Tag (repeatable)."),
        click.option("--label", "labels", multiple=True, help="Governance label (repeatable)."),
        click.option("--ttl", "ttl_seconds", type=click.IntRange(min=1),
                     help="Time to live, seconds."),
        click.option("--priority", type=click.IntRange(0, 10), help="Priority 0-10."),
        click.option("--retention-class", help="Retention class name."),
        click.option("--share-with", "shared_with", multiple=True,
                     help="Subject that may also read it (repeatable)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _metadata_from(options: dict[str, Any]) -> dict[str, Any] | None:
    metadata = {k: options[k] for k in ("source", "semantic_type", "ttl_seconds", "priority",
                                        "retention_class") if options.get(k) is not None}
    for key in ("tags", "labels", "shared_with"):
        if options.get(key):
            metadata[key] = list(options[key])
    return metadata or None


@command(cli, "add")
@click.argument("text")
@click.option("--tenant", required=True, help="Tenant the memory belongs to.")
@click.option("--owner", required=True, help="The data subject the memory is about.")
@click.option("--kind", default="plaintext", show_default=True,
              type=click.Choice(["plaintext", "parametric", "activation"]))
@click.option("--id", "cube_id", help="Choose the memory's id (default: a new UUID).")
@click.option("--reason", help="Why it is written (recorded).")
@_metadata_options
@json_option
def add_command(mw: MemWarden, text: str, tenant: str, owner: str, kind: str,
                cube_id: str | None, reason: str | None, as_json: bool, **options: Any) -> None:
    """Add a memory."""
    memory = mw.add(text, tenant=tenant, owner=owner, kind=kind, metadata=_metadata_from(options),
                    reason=reason, cube_id=cube_id)
    if as_json:
        _print_json(state_as_dict(memory))
    else:
        console.print(Text.assemble("added ", (memory.cube_id, "bold"),
                                    f" (version {memory.version})"))


@command(cli, "get")
@click.argument("cube_id")
@json_option
def get_command(mw: MemWarden, cube_id: str, as_json: bool) -> None:
    """Show a memory's current state."""
    memory = mw.get(cube_id)
    if as_json:
        _print_json(state_as_dict(memory))
    else:
        _show_memory(memory)


@command(cli, "list")
@click.option("--tenant")
@click.option("--owner")
@click.option("--kind")
@click.option("--label")
@click.option("--state", type=click.Choice(["active", "deleted", "expired"]))
@click.option("--include-archived", is_flag=True,
              help="Expired and cold-archived memories too (needs memory.recall).")
@click.option("--after", help="Cursor: the last id of the previous page.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@json_option
def list_command(mw: MemWarden, tenant: str | None, owner: str | None, kind: str | None,
                 label: str | None, state: str | None, include_archived: bool,
                 after: str | None, limit: int, as_json: bool) -> None:
    """List memories (one page; --after continues). Expired and cold-archived memories are left
    out unless --include-archived."""
    page = mw.list(CubeFilter(tenant=tenant, owner=owner, kind=kind, label=label, state=state,
                              include_archived=include_archived),
                   after=after, limit=limit)
    if as_json:
        _print_json({"items": [state_as_dict(m) for m in page],
                     "next": page[-1].cube_id if len(page) == limit else None})
        return
    table = Table(id_column("id", (m.cube_id for m in page)), "tenant", "owner", "v", "state",
                  "text")
    for memory in page:
        table.add_row(memory.cube_id, memory.tenant, memory.owner, str(memory.version),
                      *_listed_state_and_text(memory))
    console.print(table)
    if len(page) == limit:
        console.print(f"more: --after {page[-1].cube_id}")


def _listed_state_and_text(memory: MemoryState) -> tuple[str, str]:
    """A listed memory's state and the start of its text. A cold-archived memory's text is held
    compressed until a recall (``memwarden recall``), not shown blank as if erased."""
    if memory.tier == COLD_ARCHIVE:
        return f"{memory.state}, cold", "(cold archive: recall to read)"
    return memory.state, memory.text if len(memory.text) < 60 else memory.text[:57] + "…"


@command(cli, "update")
@click.argument("cube_id")
@click.option("--text", help="New text.")
@click.option("--expected-version", type=int, help="Fail unless the memory is at this version.")
@click.option("--reason", help="Why it changed (recorded).")
@_metadata_options
@json_option
def update_command(mw: MemWarden, cube_id: str, text: str | None, expected_version: int | None,
                   reason: str | None, as_json: bool, **options: Any) -> None:
    """Change a memory's text and/or metadata: a new version."""
    memory = mw.update(cube_id, text=text, metadata=_metadata_from(options),
                       expected_version=expected_version, reason=reason)
    if as_json:
        _print_json(state_as_dict(memory))
    else:
        console.print(f"updated {memory.cube_id} to version {memory.version}")


@command(cli, "delete")
@click.argument("cube_id")
@click.option("--reason", required=True, help="Why (recorded).")
@json_option
def delete_command(mw: MemWarden, cube_id: str, reason: str, as_json: bool) -> None:
    """Soft-delete a memory (history is kept; restore undoes it)."""
    memory = mw.delete(cube_id, reason=reason)
    if as_json:
        _print_json(state_as_dict(memory, with_text=False))
    else:
        console.print(f"deleted {cube_id} (version {memory.version})")


@command(cli, "restore")
@click.argument("cube_id")
@click.option("--reason", help="Why (recorded).")
@json_option
def restore_command(mw: MemWarden, cube_id: str, reason: str | None, as_json: bool) -> None:
    """Restore a soft-deleted memory."""
    memory = mw.restore(cube_id, reason=reason)
    if as_json:
        _print_json(state_as_dict(memory))
    else:
        console.print(f"restored {cube_id} (version {memory.version})")


@command(cli, "history")
@click.argument("cube_id")
@json_option
def history_command(mw: MemWarden, cube_id: str, as_json: bool) -> None:
    """Every version of a memory, oldest first."""
    versions = mw.history(cube_id)
    if as_json:
        _print_json([{**state_as_dict(v.state), "reason": v.reason} for v in versions])
        return
    table = Table("v", "event", "when", "by", "state", "changed", "reason", "text")
    for v in versions:
        s = v.state
        table.add_row(str(s.version), s.last_event, s.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
                      s.updated_by, s.state, ",".join(s.changed), v.reason or "",
                      s.text if len(s.text) < 50 else s.text[:47] + "…")
    console.print(table)


@command(cli, "diff")
@click.argument("cube_id")
@click.argument("from_version", type=int)
@click.argument("to_version", type=int)
@json_option
def diff_command(mw: MemWarden, cube_id: str, from_version: int, to_version: int,
                 as_json: bool) -> None:
    """Differences between two versions of a memory."""
    diff = mw.diff(cube_id, from_version, to_version)
    if as_json:
        _print_json({"id": cube_id, "from": from_version, "to": to_version,
                     "text_diff": diff.text_diff,
                     "metadata_changes": {k: list(v) for k, v in diff.metadata_changes.items()}})
        return
    if diff.unchanged:
        console.print("no differences")
    for line in diff.text_diff:
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else None
        console.print(line, style=style, highlight=False, markup=False)
    for key, (old, new) in diff.metadata_changes.items():
        console.print(f"{key}: {old!r} -> {new!r}", highlight=False, markup=False)


@command(cli, "rollback")
@click.argument("cube_id")
@click.argument("to_version", type=int)
@click.option("--reason", required=True, help="Why (recorded).")
@click.option("--expected-version", type=int, help="Fail unless the memory is at this version.")
@json_option
def rollback_command(mw: MemWarden, cube_id: str, to_version: int, reason: str,
                     expected_version: int | None, as_json: bool) -> None:
    """Make a memory's content equal to an earlier version, as a new version."""
    memory = mw.rollback(cube_id, to_version, reason=reason, expected_version=expected_version)
    if as_json:
        _print_json(state_as_dict(memory))
    else:
        console.print(f"rolled {cube_id} back to the content of version {to_version}: "
                      f"now version {memory.version}")


@command(cli, "as-of")
@click.argument("cube_id", required=False)
@click.option("--tenant", help="Show every memory of this tenant instead of one memory.")
@click.option("--position", type=click.IntRange(min=0), help="Log position.")
@click.option("--at", "moment", help="ISO-8601 timestamp with time zone.")
@json_option
def as_of_command(mw: MemWarden, cube_id: str | None, tenant: str | None, position: int | None,
                  moment: str | None, as_json: bool) -> None:
    """What a memory (or a whole tenant) looked like at a position or moment."""
    at = _parse_moment(moment) if moment else None
    if (cube_id is None) == (tenant is None):
        raise InvalidCommand("name a memory id or --tenant (one of them)")
    if cube_id is not None:
        memory = mw.as_of(cube_id, position=position, at=at)
        if as_json:
            _print_json(state_as_dict(memory))
        else:
            _show_memory(memory)
        return
    assert tenant is not None
    states = mw.tenant_as_of(tenant, position=position, at=at)
    if as_json:
        _print_json([state_as_dict(s) for s in states.values()])
        return
    table = Table(id_column("id", (s.cube_id for s in states.values())), "owner", "v", "state",
                  "text")
    for s in states.values():
        table.add_row(s.cube_id, s.owner, str(s.version), s.state, s.text[:60])
    console.print(table)


def _audit_row(entry: AuditEntry) -> dict[str, Any]:
    return {
        "position": entry.position, "event_id": entry.event_id, "type": entry.type,
        "stream_id": entry.stream_id, "cube_id": entry.cube_id, "tenant": entry.tenant,
        "actor": entry.actor, "on_behalf_of": entry.on_behalf_of, "reason": entry.reason,
        "detail": entry.detail, "recorded_at": entry.recorded_at.isoformat(),
    }


@command(cli, "audit")
@click.option("--tenant")
@click.option("--actor", "actor_filter", help="Only events by this actor.")
@click.option("--cube", "cube_id", help="Only events about this memory (reads included).")
@click.option("--type", "types", multiple=True, help="Event type (repeatable).")
@click.option("--since", help="ISO-8601 timestamp (inclusive).")
@click.option("--until", help="ISO-8601 timestamp (exclusive).")
@click.option("--after", default=0, type=click.IntRange(min=0), help="Cursor: last position seen.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@json_option
def audit_command(mw: MemWarden, tenant: str | None, actor_filter: str | None,
                  cube_id: str | None, types: tuple[str, ...], since: str | None,
                  until: str | None, after: int, limit: int, as_json: bool) -> None:
    """The audit trail: who did what to which memory, when and why."""
    where = AuditFilter(tenant=tenant, actor=actor_filter, cube_id=cube_id, types=types or None,
                        since=_parse_moment(since) if since else None,
                        until=_parse_moment(until) if until else None)
    page = mw.audit(where, after=after, limit=limit)
    if as_json:
        _print_json({"items": [_audit_row(e) for e in page],
                     "next": page[-1].position if len(page) == limit else None})
        return
    table = Table("pos", "when", "type", "actor", "tenant",
                  id_column("memory", (e.cube_id or "" for e in page)), "reason", "detail")
    for e in page:
        detail = {k: v for k, v in e.detail.items() if k != "metadata"}
        table.add_row(str(e.position), e.recorded_at.strftime("%Y-%m-%d %H:%M:%S"), e.type,
                      e.actor, e.tenant or "", e.cube_id or "", e.reason or "",
                      json.dumps(detail) if detail else "")
    console.print(table)
    if len(page) == limit:
        console.print(f"more: --after {page[-1].position}")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err_console, transient=True)


@command(cli, "verify")
@json_option
def verify_command(mw: MemWarden, as_json: bool) -> None:
    """Recompute the hash chain of the whole log; name the first broken event."""
    with _progress() as progress:
        task = progress.add_task("verifying", total=None)
        report = mw.verify(on_progress=lambda done, total: progress.update(
            task, completed=done, total=total))
    if as_json:
        brk = report.first_break
        _print_json({"ok": report.ok, "checked": report.checked,
                     "head_position": report.head_position,
                     "first_break": None if brk is None else
                     {"position": brk.position, "event_id": brk.event_id, "reason": brk.reason}})
    elif report.ok:
        console.print(Text.assemble(("ok", "green"), f": {report.checked} events, chain intact"))
    else:
        brk = report.first_break
        assert brk is not None
        console.print(Text.assemble(
            ("BROKEN", "red"), f" at position {brk.position} (event {brk.event_id}): "
            f"{brk.reason}; {report.checked} events before it are intact"))
    if not report.ok:
        sys.exit(EXIT_INTEGRITY)


@cli.group("projections")
def projections_group() -> None:
    """Read models: status and rebuild."""


@command(projections_group, "rebuild")
@click.argument("names", nargs=-1)
@json_option
def rebuild_command(mw: MemWarden, names: tuple[str, ...], as_json: bool) -> None:
    """Drop read models (default: all) and replay the whole log into them. In the distributed
    mode, drop them with the offsets of the Kafka consumers that maintain them: those read the
    topic again from offset 0."""
    if mw.settings.kafka_bootstrap:
        from governance._cli_kafka import rebuild_kafka_fed

        rebuild_kafka_fed(mw, names, as_json)
        return
    with _progress() as progress:
        task = progress.add_task("replaying", total=None)
        applied = mw.rebuild_projections(names or None, on_progress=lambda done, total:
                                         progress.update(task, completed=done, total=total))
    if as_json:
        _print_json({"replayed": applied, "digest": mw.projector.digest()})
    else:
        console.print(f"rebuilt from {applied} events")


@command(projections_group, "status")
@json_option
def status_command(mw: MemWarden, as_json: bool) -> None:
    """Each read model's checkpoint against the head of the log (distributed mode: each Kafka
    consumer's read models, offsets, and the position it has applied the log through)."""
    if mw.settings.kafka_bootstrap:
        from governance._cli_kafka import show_kafka_status

        show_kafka_status(mw, as_json)
        return
    checkpoints = mw.projection_checkpoints()
    head = mw.store.head_position()
    if as_json:
        _print_json({"head": head, "checkpoints": checkpoints})
        return
    table = Table("projection", "position", "behind")
    for name, position in sorted(checkpoints.items()):
        table.add_row(name, str(position), str(head - position))
    console.print(table)


@command(cli, "demo")
@json_option
def demo_command(mw: MemWarden, as_json: bool) -> None:
    """Seed a realistic multi-tenant workload (does nothing if already seeded)."""
    from governance._demo import seed_demo

    summary = seed_demo(mw)
    if as_json:
        _print_json({"seeded": summary.seeded, "memories": summary.memories,
                     "events": summary.events})
    elif summary.seeded:
        console.print(f"seeded {summary.memories} memories in 3 tenants ({summary.events} events); "
                      "try: memwarden list, memwarden history demo-globex-travel-003, "
                      "memwarden audit")
    else:
        console.print("demo data already present")


@cli.group("keys")
def keys_group() -> None:
    """API keys for the REST API: create, revoke, list."""


def _show_keys(records: list[ApiKeyRecord]) -> None:
    table = Table(id_column("id", (r.key_id for r in records)), "tenant", "subject", "role",
                  "issued", "by", "revoked")
    for r in records:
        table.add_row(r.key_id, r.tenant, r.subject, r.role,
                      r.issued_at.strftime("%Y-%m-%d %H:%M:%S"), r.issued_by,
                      "" if r.active else f"{r.revoked_at:%Y-%m-%d %H:%M:%S} ({r.revoke_reason})")
    console.print(table)


@command(keys_group, "create")
@click.option("--tenant", required=True, help="Tenant the key acts in ('*': all, admin only).")
@click.option("--subject", required=True,
              help="Who uses the key: the actor recorded on everything done with it.")
@click.option("--role", required=True, type=click.Choice(ROLES))
@json_option
def keys_create_command(mw: MemWarden, tenant: str, subject: str, role: str,
                        as_json: bool) -> None:
    """Issue an API key and print it: the only time it is shown (only its hash is kept)."""
    issued = ApiKeys(mw).issue(tenant=tenant, subject=subject, role=role)
    if as_json:
        _print_json({**key_as_dict(issued.record), "key": issued.secret})
        return
    err_console.print(f"key {issued.record.key_id}: {subject} as {role} in tenant {tenant}. "
                      "Store it now; it is not shown again:", highlight=False)
    click.echo(issued.secret)


@command(keys_group, "revoke")
@click.argument("key_id")
@click.option("--reason", required=True, help="Why (recorded).")
@json_option
def keys_revoke_command(mw: MemWarden, key_id: str, reason: str, as_json: bool) -> None:
    """Revoke an API key: requests with it are refused from now on."""
    record = ApiKeys(mw).revoke(key_id, reason=reason)
    if as_json:
        _print_json(key_as_dict(record))
    else:
        console.print(f"revoked key {key_id} ({record.subject} in tenant {record.tenant})")


@command(keys_group, "list")
@click.option("--tenant", help="Only this tenant's keys.")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@json_option
def keys_list_command(mw: MemWarden, tenant: str | None, include_revoked: bool,
                      as_json: bool) -> None:
    """API keys (never the keys themselves)."""
    records = ApiKeys(mw).list(tenant=tenant, include_revoked=include_revoked)
    if as_json:
        _print_json([key_as_dict(r) for r in records])
    else:
        _show_keys(records)


@command(cli, "up")
@click.option("--host", help="Interface to listen on (default: $MEMWARDEN_API_HOST, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535),
              help="Port (default: $MEMWARDEN_API_PORT, 8000; 0 picks a free one).")
@click.option("--no-dashboard", is_flag=True,
              help="Do not start the compliance dashboard ($MEMWARDEN_DASHBOARD_PORT, 8501).")
def up_command(mw: MemWarden, host: str | None, port: int | None, no_dashboard: bool) -> None:
    """Start the REST API, the projector, the workers and the compliance dashboard (Ctrl+C
    stops)."""
    from governance._up import run_stack  # imports uvicorn and FastAPI: only for this command

    mw.require("platform.operate", Resource.of_tenant(PLATFORM))
    settings = Settings.from_env()
    run_stack(mw, host=host or settings.api_host,
              port=settings.api_port if port is None else port,
              data_dir=Path(settings.data_dir), echo=click.echo, dashboard=not no_dashboard)


def main() -> None:
    cli(prog_name="memwarden")


@cli.group("policy")
def policy_group() -> None:
    """Access rules (Casbin): list, add, remove. Every change is an audited event."""


def _rule_fields(ptype: str, values: tuple[str, ...]) -> PolicyRule:
    return PolicyRule.parse([ptype, *values])


@command(policy_group, "list")
@json_option
def policy_list_command(mw: MemWarden, as_json: bool) -> None:
    """The rules in force in your tenant (every rule, for the platform admin)."""
    rules = mw.policy_rules()
    if as_json:
        _print_json([rule.fields() for rule in rules])
        return
    table = Table("type", "role", "tenant / inherits", "action / tenant", "scope")
    for rule in rules:
        table.add_row(*rule.fields())
    console.print(table)


@command(policy_group, "add")
@click.argument("ptype", type=click.Choice(["p", "g"]))
@click.argument("values", nargs=-1, required=True)
@click.option("--reason", required=True, help="Why (recorded).")
@json_option
def policy_add_command(mw: MemWarden, ptype: str, values: tuple[str, ...], reason: str,
                       as_json: bool) -> None:
    """Put a rule in force. PTYPE VALUES...: 'p ROLE TENANT ACTION SCOPE' or
    'g ROLE INHERITED_ROLE TENANT'; TENANT '*' means every tenant."""
    rule = _rule_fields(ptype, values)
    revision = mw.add_policy_rule(rule, reason=reason)
    if as_json:
        _print_json({"rule": rule.fields(), "revision": revision})
    else:
        console.print(f"added: {rule} (policy revision {revision})")


@command(policy_group, "remove")
@click.argument("ptype", type=click.Choice(["p", "g"]))
@click.argument("values", nargs=-1, required=True)
@click.option("--reason", required=True, help="Why (recorded).")
@json_option
def policy_remove_command(mw: MemWarden, ptype: str, values: tuple[str, ...], reason: str,
                          as_json: bool) -> None:
    """Take a rule out of force (same form as 'policy add')."""
    rule = _rule_fields(ptype, values)
    revision = mw.remove_policy_rule(rule, reason=reason)
    if as_json:
        _print_json({"rule": rule.fields(), "revision": revision})
    else:
        console.print(f"removed: {rule} (policy revision {revision})")


import governance._cli_conversion  # noqa: E402  (registers convert, lineage, artifacts)
import governance._cli_dashboard  # noqa: E402  (registers dashboard)
import governance._cli_kafka  # noqa: E402  (registers relay, project, bundle)
import governance._cli_retention  # noqa: E402  (registers retention, hold, recall)
import governance._cli_search  # noqa: E402  (registers search)
import governance._cli_sensitive  # noqa: E402, F401  (registers erase, export, findings, erasures)
