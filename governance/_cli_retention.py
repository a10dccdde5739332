"""``memwarden retention``, ``memwarden hold`` and ``memwarden recall``: lifecycle workers,
legal holds and the cold archive from the command line (registered by ``_cli``)."""

from __future__ import annotations

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from governance._cli import (
    _parse_moment,
    _print_json,
    cli,
    command,
    console,
    id_column,
    json_option,
)
from governance._holds import Hold
from governance._retention import RetentionReport, SweepReport
from governance._sdk import MemWarden, state_as_dict


@cli.group("retention")
def retention_group() -> None:
    """Retention rules (policies/retention.yaml), sweeps and the report (and see: recall)."""


@cli.group("hold")
def hold_group() -> None:
    """Legal holds: while one is in force, nothing it covers expires, goes cold or is erased."""


def _sweep_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("memories due"), TimeElapsedColumn(), console=console,
                    transient=True)


def _show_sweep(report: SweepReport) -> None:
    what = "would do" if report.dry_run else "did"
    scope = f"tenant {report.tenant}" if report.tenant else "every tenant"
    console.print(Text.assemble(
        ("Retention sweep", "bold"), f" at {report.now.isoformat(timespec='seconds')} "
        f"over {scope}{' (dry run: nothing changed)' if report.dry_run else ''}"))
    if report.dry_run:
        if not report.actions:
            console.print("Nothing is due.")
        else:
            table = Table(id_column("memory", (a.cube_id for a in report.actions)), "tenant",
                          "outcome", "rule", "why")
            for action in report.actions:
                outcome = f"held ({action.held_by})" if action.held_by else action.outcome
                table.add_row(action.cube_id, action.tenant, outcome, action.rule or "(write ttl)",
                              action.explain())
            console.print(table)
    if report.by_rule:
        table = Table("rule", "outcome", "memories", title=f"what the sweep {what}")
        for (rule, outcome), count in sorted(report.by_rule.items()):
            table.add_row(rule, outcome, str(count))
        console.print(table)
    others = {k: v for k, v in report.counts.items()
              if k in ("held", "conflicts")}
    console.print(f"examined {report.examined} due memories; {report.events} events appended"
                  + "".join(f"; {k.replace('_', ' ')}: {v}" for k, v in sorted(others.items()))
                  + f" ({report.seconds:.2f} s)")


@command(retention_group, "run")
@click.option("--dry-run", is_flag=True, help="Print what would happen; change nothing.")
@click.option("--tenant", help="Only this tenant (default: your key's; the operator: all).")
@click.option("--at", "at_", help="With --dry-run: as if it were this moment (ISO-8601 with a "
                                   "time zone), to see what falls due later.")
@json_option
def run_command(mw: MemWarden, dry_run: bool, tenant: str | None, at_: str | None,
                as_json: bool) -> None:
    """Sweep now: expire, move tiers, record decay and erase what the rules say is due."""
    at = _parse_moment(at_) if at_ is not None else None
    if as_json:
        _print_json(mw.run_retention(dry_run=dry_run, tenant=tenant, at=at).as_dict())
        return
    progress = _sweep_progress()
    task = progress.add_task("sweeping", total=None)
    shown: list[bool] = []

    def advance(done: int, total: int) -> None:
        if not shown:  # only once the sweep runs: a refused one prints nothing to stdout
            progress.start()
            shown.append(True)
        progress.update(task, completed=done, total=total)

    try:
        report = mw.run_retention(dry_run=dry_run, tenant=tenant, at=at, on_progress=advance)
    finally:
        if shown:
            progress.stop()
    _show_sweep(report)


def _show_report(report: RetentionReport) -> None:
    scope = f"tenant {report.tenant}" if report.tenant else "every tenant"
    console.print(Text.assemble(("Retention report", "bold"), f" for {scope}, "
                                f"{report.now.isoformat(timespec='seconds')}, "
                                f"±{report.days} days"))
    done = Table("rule", "outcome", "memories", title=f"done in the last {report.days} days")
    for row in report.done:
        done.add_row(row["rule"] or "(write ttl)", row["outcome"], str(row["count"]))
    console.print(done)
    outcomes = ("expired", "long_term", "cold_archive", "erased", "decayed")
    due = Table("rule", *outcomes, title=f"due in the next {report.days} days")
    for row in report.due:
        due.add_row(row["rule"] or "(write ttl)", *(str(row[o]) for o in outcomes))
    console.print(due)
    if report.recent:
        shown = report.recent[:20]
        recent = Table("when", id_column("memory", (row["cube_id"] or "" for row in shown)),
                       "outcome", "rule", "by", title="latest actions")
        for row in shown:
            recent.add_row(row["occurred_at"], row["cube_id"] or "", row["outcome"],
                           row["rule"] or "", row["actor"])
        console.print(recent)
    console.print(f"legal holds in force: {report.holds}")
    if report.unplanned:
        console.print(Text.assemble(
            (f"{report.unplanned:,} memories not yet planned", "yellow"),
            " under the current rules and facts (schedule planned through log position "
            f"{report.planned_through:,}): they count under their previous due dates until the "
            "next report or sweep plans them"))
    for sweep in report.sweeps:
        console.print(f"sweep at {sweep['at']} by {sweep['actor']}: examined "
                      f"{sweep.get('examined', 0)}, {sweep.get('events', 0)} events, "
                      f"{sweep.get('counts', {})}")


@command(retention_group, "report")
@click.option("--days", default=30, show_default=True, type=click.IntRange(1, 3650),
              help="Look back and ahead this many days.")
@click.option("--tenant", help="Only this tenant (default: your key's; the operator: all).")
@json_option
def report_command(mw: MemWarden, days: int, tenant: str | None, as_json: bool) -> None:
    """What was expired, archived and erased, under which rule, and what falls due next."""
    report = mw.retention_report(days=days, tenant=tenant)
    if as_json:
        _print_json(report.as_dict())
    else:
        _show_report(report)


@command(retention_group, "rules")
@json_option
def rules_command(mw: MemWarden, as_json: bool) -> None:
    """The retention rules in force, in the order they are tried."""
    policy = mw.retention_rules()
    rules = [rule.as_dict() for rule in policy.rules]
    if as_json:
        _print_json({"source": policy.source, "digest": policy.digest, "rules": rules})
        return
    table = Table("#", "rule", "match", "ttl", "tiers", "decay", "erase after",
                  title=policy.source)
    for n, rule in enumerate(rules, 1):
        match = "; ".join(f"{k}: {', '.join(v)}" for k, v in rule["match"].items()) or "(all)"
        tiers = " / ".join(f"{k.removesuffix('_after')} {v}" for k, v in rule["tiers"].items()
                           if v)
        decay = (f"half-life {rule['decay']['half_life']}, below {rule['decay']['threshold']}"
                 if rule["decay"] else "")
        table.add_row(str(n), rule["name"], match, rule["ttl"] or "", tiers, decay,
                      rule["erase_after"] or "")
    console.print(table)


@command(cli, "recall")
@click.argument("cube_id")
@click.option("--reason", required=True, help="Why it is read back (recorded).")
@json_option
def recall_command(mw: MemWarden, cube_id: str, reason: str, as_json: bool) -> None:
    """Read a cold-archived memory back; it returns to the working tier."""
    recalled = mw.recall(cube_id, reason=reason)
    if as_json:
        _print_json({**state_as_dict(recalled.state), "text": recalled.text,
                     "archived_bytes": recalled.archived_bytes})
        return
    console.print(f"recalled {cube_id} (now in the {recalled.state.tier} tier):")
    console.print(recalled.text, highlight=False, markup=False)


def _hold_row(hold: Hold) -> list[str]:
    released = "" if hold.active else f"released {hold.released_at:%Y-%m-%d} ({hold.released_by})"
    return [hold.hold_id, hold.tenant, f"{hold.scope}: {hold.target}", hold.case_id, hold.reason,
            f"{hold.placed_at:%Y-%m-%d %H:%M} ({hold.placed_by})", released]


def _show_holds(holds: list[Hold]) -> None:
    table = Table("hold", "tenant", "covers", "case", "reason", "placed", "released")
    for hold in holds:
        table.add_row(*_hold_row(hold))
    console.print(table)


@command(hold_group, "place")
@click.option("--memory", help="Hold this memory.")
@click.option("--owner", help="Hold every memory of this owner (data subject) in --tenant.")
@click.option("--tenant", help="The tenant (alone: hold every memory of the tenant).")
@click.option("--reason", required=True, help="Why (recorded).")
@click.option("--case", "case_id", required=True, help="The legal case or matter id.")
@json_option
def place_command(mw: MemWarden, memory: str | None, owner: str | None, tenant: str | None,
                  reason: str, case_id: str, as_json: bool) -> None:
    """Place a legal hold on a memory, an owner's memories, or a whole tenant."""
    hold = mw.place_hold(reason=reason, case_id=case_id, memory=memory, owner=owner,
                         tenant=tenant)
    if as_json:
        _print_json(hold.as_dict())
    else:
        console.print(f"placed legal hold {hold.hold_id} on {hold.scope} {hold.target} "
                      f"(tenant {hold.tenant}, case {hold.case_id})")


@command(hold_group, "release")
@click.argument("hold_id")
@click.option("--reason", required=True, help="Why (recorded).")
@json_option
def release_command(mw: MemWarden, hold_id: str, reason: str, as_json: bool) -> None:
    """Release a legal hold: retention rules apply again at the next sweep."""
    hold = mw.release_hold(hold_id, reason=reason)
    if as_json:
        _print_json(hold.as_dict())
    else:
        console.print(f"released legal hold {hold.hold_id} ({hold.scope} {hold.target})")


@command(hold_group, "list")
@click.option("--tenant", help="Only this tenant (default: your key's; the operator: all).")
@click.option("--all", "include_released", is_flag=True, help="Released holds too.")
@json_option
def list_command(mw: MemWarden, tenant: str | None, include_released: bool,
                 as_json: bool) -> None:
    """The legal holds in force (with --all, released ones too)."""
    holds = mw.holds(tenant=tenant, include_released=include_released)
    if as_json:
        _print_json({"items": [hold.as_dict() for hold in holds]})
    else:
        _show_holds(holds)
