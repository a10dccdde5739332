"""``memwarden search``: memory search from the command line (registered by ``_cli``)."""

from __future__ import annotations

from datetime import datetime

import click
from rich.table import Table

from governance._cli import (
    _parse_moment,
    _print_json,
    cli,
    command,
    console,
    id_column,
    json_option,
)
from governance._memcube import KINDS, SEMANTIC_TYPES
from governance._sdk import MemWarden
from governance._search import MODES
from projections._search import MAX_K


def _moment(value: str | None) -> datetime | None:
    return None if value is None else _parse_moment(value)


@command(cli, "search")
@click.argument("query")
@click.option("--k", default=10, show_default=True, type=click.IntRange(1, MAX_K),
              help="How many results at most.")
@click.option("--mode", default="bm25", show_default=True, type=click.Choice(MODES),
              help="bm25: full text; semantic: embeddings (the semantic extra); hybrid: both.")
@click.option("--tenant", help="Tenant to search (default: your key's; the operator: all).")
@click.option("--kind", type=click.Choice(KINDS))
@click.option("--type", "semantic_type", type=click.Choice(SEMANTIC_TYPES),
              help="Semantic type.")
@click.option("--label", "labels", multiple=True, help="Carrying this label (repeatable: all).")
@click.option("--owner", help="About this data subject.")
@click.option("--since", help="Created at or after (ISO-8601 with a time zone).")
@click.option("--until", help="Created before (ISO-8601 with a time zone).")
@json_option
def search_command(mw: MemWarden, query: str, k: int, mode: str, tenant: str | None,
                   kind: str | None, semantic_type: str | None, labels: tuple[str, ...],
                   owner: str | None, since: str | None, until: str | None,
                   as_json: bool) -> None:
    """Search the memories you may read, best first (audited: the query's hash, never its
    text)."""
    results = mw.search(query, k=k, mode=mode, tenant=tenant, kind=kind,
                        semantic_type=semantic_type, labels=labels, owner=owner,
                        since=_moment(since), until=_moment(until))
    if as_json:
        _print_json({"items": [result.as_dict() for result in results], "mode": mode})
        return
    table = Table("score", id_column("id", (r.cube_id for r in results)), "tenant", "owner",
                  "type", "snippet")
    for result in results:
        snippet = result.snippet + (" [masked]" if result.masked else "")
        table.add_row(f"{result.score:.3f}", result.cube_id, result.tenant, result.owner,
                      result.semantic_type, snippet)
    console.print(table)
    if not results:
        console.print("no memory you may read matches")
