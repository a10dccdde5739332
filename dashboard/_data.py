"""What each dashboard page shows, as plain functions of an SDK handle: testable without
Streamlit, and the same code the benchmark times (``python -m bench dashboard``).

Every function acts through ``mw`` (a ``MemWarden`` handle acting as the signed-in key), so the
access policy decides each read: a role without ``memory.read_content`` gets metadata with the
text withheld, never the text, and a role without ``audit.read`` gets ``PermissionDenied``.
"""

from __future__ import annotations

import csv
import difflib
import html
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from eventstore import VerificationReport
from governance._errors import InvalidCommand
from governance._oversight import AccessSummary, Oversight, Summary
from governance._sdk import MemWarden
from projections import (
    COLD_ARCHIVE,
    MAX_PAGE,
    AuditEntry,
    AuditFilter,
    CubeFilter,
    MemoryState,
    Usage,
    Version,
)
from projections._insights import Insights

PAGE_SIZE = 50

CATEGORIES: dict[str, tuple[str, ...]] = {
    "Writes": ("MemoryCreated", "MemoryUpdated", "MemoryRolledBack", "MemoryDeleted",
               "MemoryRestored"),
    "Reads": ("MemoryRead",),
    "Denials": ("AccessDenied",),
    "PII findings": ("SensitiveDataDetected",),
    "Expiries": ("MemoryExpired",),
    "Erasures": ("SubjectErased", "MemoryContentErased"),
}
"""What the overview charts, each as the event types it counts (reads come from the reads
model, one per memory read)."""

EVENT_TYPES = (
    "MemoryCreated", "MemoryUpdated", "MemoryRolledBack", "MemoryDeleted", "MemoryRestored",
    "MemoryAccessed", "AccessDenied", "SensitiveDataDetected", "MemoryRedacted", "MemoryExpired",
    "MemoryDecayed", "MemoryTierChanged", "MemoryRecalled", "LegalHoldPlaced",
    "LegalHoldReleased", "RetentionSweepCompleted", "SubjectErased", "MemoryContentErased",
    "PolicyRuleAdded", "PolicyRuleRemoved", "ApiKeyIssued", "ApiKeyRevoked",
    "ParametricMemoryCreated", "ParametricMemoryTainted", "ActivationMemoryCreated",
)
"""The event types the audit filter offers (DESIGN.md section 2), besides those seen."""

AUDIT_COLUMNS = ("position", "recorded_at", "type", "tenant", "actor", "on_behalf_of", "memory",
                 "reason", "detail")


# -- overview -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Overview:
    totals: dict[str, int]
    """Per category of ``CATEGORIES``."""
    events: int
    first: datetime | None
    last: datetime | None
    bucket: str
    series: list[dict[str, Any]]
    """Rows {time, category, count} for a chart over time."""


WINDOWS = {"Last 24 hours": timedelta(days=1), "Last 7 days": timedelta(days=7),
           "Last 30 days": timedelta(days=30), "All time": None}
"""What the overview counts: a window keeps it to the events recorded since (an index range),
however long the log grows."""


def overview(mw: MemWarden, tenant: str | None = None,
             since: datetime | None = None) -> Overview:
    summary = Oversight(mw).summary(AuditFilter(tenant=tenant, since=since))
    return Overview(
        totals={name: _total(summary, types) for name, types in CATEGORIES.items()},
        events=summary.span.events, first=summary.span.first, last=summary.span.last,
        bucket=summary.bucket, series=_series(summary))


def _total(summary: Summary, types: Sequence[str]) -> int:
    if types == ("MemoryRead",):
        return summary.reads
    return sum(summary.counts.get(kind, 0) for kind in types)


def _series(summary: Summary) -> list[dict[str, Any]]:
    category_of = {kind: name for name, types in CATEGORIES.items() for kind in types}
    counts: dict[tuple[datetime, str], int] = {}
    for count in summary.activity:
        name = category_of.get(count.type)
        if name is not None:
            counts[(count.start, name)] = counts.get((count.start, name), 0) + count.count
    return [{"time": start, "category": name, "count": n}
            for (start, name), n in sorted(counts.items())]


def tenants(mw: MemWarden) -> list[str]:
    return Oversight(mw).tenants()


# -- audit trail --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """The audit trail's filters as the page holds them (empty: no filter)."""

    tenant: str | None = None
    actor: str | None = None
    cube_id: str | None = None
    types: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def as_filter(self) -> AuditFilter:
        return AuditFilter(tenant=self.tenant or None, actor=self.actor or None,
                           cube_id=self.cube_id or None, types=list(self.types) or None,
                           since=self.since, until=self.until)


@dataclass(frozen=True, slots=True)
class AuditPage:
    rows: list[dict[str, Any]]
    older: int | None
    """The cursor of the next (older) page; None on the last one."""


def audit_page(mw: MemWarden, query: AuditQuery, before: int = 0,
               limit: int = PAGE_SIZE) -> AuditPage:
    """One page of the trail, newest first, from just before position ``before`` (0: the end).
    Filtered and paged in the database, on the index of the most selective filter
    (``Insights.trail``: a memory's events and reads, or a rare type, without walking the
    tenant's whole trail); the tenant scope and right are the SDK's ``audit``'s."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidCommand(f"limit must be between 1 and {MAX_PAGE}")
    where = query.as_filter()
    where = replace(where, tenant=mw.tenant_scope("audit.read", where.tenant))
    entries = Insights(mw.store.engine).trail(where, before=before, limit=limit)
    return AuditPage([audit_row(e) for e in entries],
                     entries[-1].position if len(entries) == limit else None)


def audit_row(entry: AuditEntry) -> dict[str, Any]:
    return {
        "position": entry.position,
        "recorded_at": entry.recorded_at.isoformat(timespec="seconds"),
        "type": entry.type,
        "tenant": entry.tenant or "",
        "actor": entry.actor,
        "on_behalf_of": entry.on_behalf_of or "",
        "memory": entry.cube_id or "",
        "reason": entry.reason or "",
        "detail": json.dumps(entry.detail, ensure_ascii=False, sort_keys=True),
    }


def rows_as_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] = AUDIT_COLUMNS) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def rows_as_json(rows: Sequence[dict[str, Any]]) -> bytes:
    return json.dumps(list(rows), indent=2, ensure_ascii=False, default=str).encode()


# -- memory detail ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryDetail:
    state: MemoryState
    content_visible: bool
    """False: every text here is withheld (the viewer may see metadata only)."""
    history_visible: bool
    versions: list[Version]
    usage: Usage
    may_rollback: bool


def memory_detail(mw: MemWarden, cube_id: str) -> MemoryDetail:
    """A memory with its versions: text only where the viewer may read it (a read of the text
    is recorded, as any read is)."""
    oversight = Oversight(mw)
    described = oversight.describe(cube_id)
    # A cold-archived memory's text is read only by recalling it (Retention), with a reason.
    content_visible = (oversight.may("memory.read_content", described)
                       and described.tier != COLD_ARCHIVE)
    history_visible = oversight.may("memory.history", described)
    state = mw.get(cube_id) if content_visible else described
    if not history_visible:
        versions: list[Version] = []
    elif content_visible:
        versions = mw.history(cube_id)
    else:
        versions = oversight.timeline(cube_id)
    return MemoryDetail(state, content_visible, history_visible, versions, mw.usage(cube_id),
                        oversight.may("memory.rollback", described))


CONTENT_EVENTS = ("MemoryCreated", "MemoryUpdated", "MemoryRolledBack", "MemoryDeleted",
                  "MemoryRestored")
"""Events that make a version a reader would compare or roll back to; others on a memory's
stream (a personal data scan, a tier move) carry the content of the version before."""


def content_versions(versions: Sequence[Version]) -> list[Version]:
    return [v for v in versions if v.state.last_event in CONTENT_EVENTS]


def timeline_rows(versions: Sequence[Version]) -> list[dict[str, Any]]:
    return [{"version": v.state.version, "event": v.state.last_event,
             "recorded_at": v.state.updated_at.isoformat(timespec="seconds"),
             "by": v.state.updated_by, "reason": v.reason or "", "state": v.state.state,
             "changed": ", ".join(v.state.changed)} for v in versions]


def memory_choices(mw: MemWarden, tenant: str | None, *, after: str | None = None,
                   limit: int = 200) -> list[MemoryState]:
    """A page of the memories the viewer may know of (metadata), to pick one."""
    return Oversight(mw).catalog(CubeFilter(tenant=tenant), after=after, limit=limit)


@dataclass(frozen=True, slots=True)
class SideBySide:
    before_html: str
    after_html: str
    metadata: list[dict[str, str]] = field(default_factory=list)
    """Rows {field, before, after} for every metadata field (and state) that differs."""


_TOKENS = re.compile(r"(\s+)")


def side_by_side(old: MemoryState, new: MemoryState, *, content_visible: bool) -> SideBySide:
    """Two versions, words removed from the first and added in the second marked up."""
    metadata = [{"field": key, "before": _show(old.metadata.get(key)),
                 "after": _show(new.metadata.get(key))}
                for key in sorted(set(old.metadata) | set(new.metadata))
                if old.metadata.get(key) != new.metadata.get(key)]
    if old.state != new.state:
        metadata.append({"field": "state", "before": old.state, "after": new.state})
    if not content_visible:
        withheld = "<em>text withheld: your role may not read content</em>"
        return SideBySide(withheld, withheld, metadata)
    a, b = _TOKENS.split(old.text), _TOKENS.split(new.text)
    before, after = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        old_part, new_part = html.escape("".join(a[i1:i2])), html.escape("".join(b[j1:j2]))
        if op == "equal":
            before.append(old_part)
            after.append(new_part)
            continue
        if old_part:
            before.append(f"<del>{old_part}</del>")
        if new_part:
            after.append(f"<ins>{new_part}</ins>")
    return SideBySide("".join(before), "".join(after), metadata)


def _show(value: Any) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def state_as_of(mw: MemWarden, detail: MemoryDetail, at: datetime) -> MemoryState | None:
    """The memory as it was at ``at`` (None: it did not exist yet). With content rights it is
    replayed from the log; otherwise it is the version then current, text withheld."""
    if detail.content_visible:
        return mw.as_of(detail.state.cube_id, at=at) if at >= detail.state.created_at else None
    then = [v.state for v in detail.versions if v.state.updated_at <= at]
    return then[-1] if then else None


def rollback(mw: MemWarden, cube_id: str, to_version: int, *, reason: str,
             expected_version: int) -> MemoryState:
    """Make ``to_version`` current again: a new version (``MemoryRolledBack``), nothing
    rewritten; fails if the memory changed since the page showed ``expected_version``."""
    return mw.rollback(cube_id, to_version, reason=reason, expected_version=expected_version)


# -- access decisions ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessDecisions:
    summary: AccessSummary
    recent_denials: list[dict[str, Any]]


def access_decisions(mw: MemWarden, tenant: str | None = None, *,
                     limit: int = PAGE_SIZE) -> AccessDecisions:
    summary = Oversight(mw).access(AuditFilter(tenant=tenant))
    denials = mw.audit(AuditFilter(tenant=tenant, types=["AccessDenied"]), limit=limit,
                       newest_first=True)
    return AccessDecisions(summary, [_denial_row(e) for e in denials])


def _denial_row(entry: AuditEntry) -> dict[str, Any]:
    detail = entry.detail
    return {"recorded_at": entry.recorded_at.isoformat(timespec="seconds"),
            "actor": entry.actor, "role": detail.get("role", ""),
            "action": detail.get("action", ""),
            "resource": f"{detail.get('resource_kind', '')} {detail.get('resource_id') or ''}"
                        .strip(),
            "why": detail.get("denied_because", ""), "explanation": entry.reason or ""}


# -- integrity ----------------------------------------------------------------------------


def verify(mw: MemWarden, on_progress: Callable[[int, int], None] | None = None,
           ) -> VerificationReport:
    return mw.verify(on_progress=on_progress)


# -- sensitive data -----------------------------------------------------------------------

SCAN_LIMIT = 5000
"""Most records a page counts (findings, erasures): beyond, it says the figures are partial."""
_BATCH = 1000


def _scan(fetch: Callable[[int], Sequence[Any]]) -> tuple[list[Any], bool]:
    """Records from ``fetch(after)`` pages, oldest first, up to ``SCAN_LIMIT``; and whether
    there were more."""
    records: list[Any] = []
    after = 0
    while len(records) < SCAN_LIMIT:
        page = fetch(after)
        records.extend(page)
        if len(page) < _BATCH:
            return records, False
        after = page[-1].position
    return records[:SCAN_LIMIT], True


@dataclass(frozen=True, slots=True)
class SensitiveData:
    by_type: dict[str, int]
    """Findings per entity type, in the current version of each memory."""
    rows: list[dict[str, Any]]
    """One per memory with findings: its latest scan (entity types, scores; never values)."""
    scanned: int
    partial: bool


def sensitive_data(mw: MemWarden, tenant: str | None = None) -> SensitiveData:
    records, partial = _scan(lambda after: mw.findings(tenant=tenant, after=after,
                                                       limit=_BATCH))
    latest = {record.cube_id: record for record in records}
    by_type: dict[str, int] = {}
    rows = []
    for record in sorted(latest.values(), key=lambda r: r.position, reverse=True):
        for finding in record.findings:
            kind = str(finding.get("entity_type", "?"))
            by_type[kind] = by_type.get(kind, 0) + 1
        scores = [float(f.get("score", 0)) for f in record.findings]
        rows.append({"memory": record.cube_id, "version": record.version,
                     "tenant": record.tenant, "entity_types": ", ".join(record.entity_types),
                     "findings": len(record.findings),
                     "top_score": round(max(scores), 2) if scores else None,
                     "detected_at": record.detected_at.isoformat(timespec="seconds"),
                     "analyzer": record.analyzer or ""})
    return SensitiveData(dict(sorted(by_type.items(), key=lambda kv: -kv[1])), rows,
                         len(records), partial)


@dataclass(frozen=True, slots=True)
class SeenText:
    text: str | None
    """None: the viewer may not read this memory's content at all."""
    clear: bool
    """True: personal data shown in clear (the viewer has ``memory.read_sensitive``)."""


def text_as_seen(mw: MemWarden, cube_id: str) -> SeenText:
    """A memory's text as this viewer may see it: masked where it lacks read_sensitive (a read,
    recorded as any read is), or nothing where it may not read content."""
    oversight = Oversight(mw)
    described = oversight.describe(cube_id)
    if not oversight.may("memory.read_content", described):
        return SeenText(None, False)
    return SeenText(mw.get(cube_id).text, oversight.may("memory.read_sensitive", described))


# -- erasures -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Erasures:
    rows: list[dict[str, Any]]
    """Newest first: what was erased, by whom, why, and the evidence (counts, position)."""
    partial: bool


def erasures(mw: MemWarden, tenant: str | None = None) -> Erasures:
    records, partial = _scan(lambda after: mw.erasures(tenant=tenant, after=after,
                                                       limit=_BATCH))
    rows = []
    for record in reversed(records):
        detail = dict(record.detail)
        rows.append({"position": record.position,
                     "recorded_at": record.recorded_at.isoformat(timespec="seconds"),
                     "type": record.type, "tenant": record.tenant,
                     "erased": record.subject or record.cube_id or "", "actor": record.actor,
                     "reason": record.reason or "", "rule": record.rule or "",
                     "memories": detail.get("memories"), "versions": detail.get("versions"),
                     "keys_destroyed": detail.get("keys_destroyed"),
                     "evidence": json.dumps(detail, ensure_ascii=False, sort_keys=True)})
    return Erasures(rows, partial)


# -- retention ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Retention:
    rules: list[dict[str, Any]]
    report: Any
    """``governance._retention.RetentionReport``: done, due, recent actions, sweeps."""
    holds: list[dict[str, Any]]


def retention(mw: MemWarden, tenant: str | None = None, days: int = 30) -> Retention:
    rules = [rule.as_dict() for rule in mw.retention_rules().rules]
    holds = [hold.as_dict() for hold in mw.holds(tenant=tenant, include_released=True)]
    return Retention(rules, mw.retention_report(days=days, tenant=tenant), holds)


def dry_run(mw: MemWarden, tenant: str | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> Any:
    """What a retention sweep would do now, changing nothing."""
    return mw.run_retention(dry_run=True, tenant=tenant, on_progress=on_progress)


# -- lineage ------------------------------------------------------------------------------


def artifacts(mw: MemWarden, tenant: str | None = None) -> list[dict[str, Any]]:
    return [{"artifact": a.artifact[:12], "kind": a.kind, "status": a.status,
             "memory": a.cube_id, "version": a.cube_version, "tenant": a.tenant,
             "base_model": a.base_model[:12], "sources": len(a.sources),
             "taints": "; ".join(f"{t.cause} ({t.source_cube_id} v{t.source_version})"
                                 for t in a.taints),
             "created_by": a.created_by,
             "created_at": a.created_at.isoformat(timespec="seconds")}
            for a in mw.artifacts(tenant=tenant)]


def lineage(mw: MemWarden, memory_or_artifact: str) -> dict[str, Any]:
    return dict(mw.lineage(memory_or_artifact).as_dict())
