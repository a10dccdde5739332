"""What a compliance overview needs beyond the SDK's own operations: metadata-level views of
memories (for roles that may see that a memory exists but not its text) and aggregates over the
audit trail. Every method asks the access policy first, as the SDK does:

    oversight = Oversight(mw)          # mw: a MemWarden handle acting as one principal
    oversight.describe("demo-acme-001")              # memory.read_metadata, text withheld
    oversight.summary(AuditFilter(tenant="acme"))    # audit.read in that tenant

A memory's text is withheld as the empty string; ``text_withheld`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from governance._errors import InvalidCommand, NotFound
from governance._principal import PLATFORM, Resource
from governance._sdk import MemWarden
from projections import AuditFilter, CubeFilter, MemoryState, ReadModels, Version
from projections._insights import (
    ActivityCount,
    ActorCount,
    Insights,
    TimeSpan,
    choose_bucket,
    merge_series,
)

SENSITIVE_LABEL = "sensitive"


@dataclass(frozen=True, slots=True)
class Summary:
    """The audit trail of one scope, counted."""

    span: TimeSpan
    counts: dict[str, int]
    """Events per type."""
    reads: int
    """Memories read (each memory once per recorded batch of reads)."""
    bucket: str
    activity: list[ActivityCount]
    """Events per type and bucket, reads as type ``MemoryRead``."""


@dataclass(frozen=True, slots=True)
class AccessSummary:
    readers: list[ActorCount]
    sensitive_readers: list[ActorCount]
    """Who read memories labelled ``sensitive``, most reads first."""
    denied: list[ActorCount]


def text_withheld(state: MemoryState) -> bool:
    return state.text == ""


class Oversight:
    def __init__(self, memwarden: MemWarden):
        self._mw = memwarden
        self._reads = ReadModels(memwarden.store.engine)
        self._insights = Insights(memwarden.store.engine)

    # -- memories, metadata only ---------------------------------------------------------

    def describe(self, cube_id: str) -> MemoryState:
        """A memory's current metadata, its text withheld (``memory.read_metadata``)."""
        return replace(self._visible(cube_id, "memory.read_metadata"), text="")

    def timeline(self, cube_id: str) -> list[Version]:
        """Every version's who, when, why and metadata, text withheld (``memory.history``)."""
        self._visible(cube_id, "memory.history")
        return [Version(replace(v.state, text=""), v.reason)
                for v in self._reads.versions(cube_id)]

    def catalog(self, where: CubeFilter | None = None, *, after: str | None = None,
                limit: int = 100) -> list[MemoryState]:
        """A page of the memories the principal may know of, in id order, text withheld.

        Nothing is read, so nothing is recorded as a read."""
        mw, where = self._mw, where or CubeFilter()
        where = replace(where, tenant=mw.tenant_scope("memory.read_metadata", where.tenant,
                                                      items_checked=True))
        page: list[MemoryState] = []
        while len(page) < limit:
            batch = self._reads.cubes(where, after=after, limit=limit)
            allowed = {r.id for r in mw.policy.permitted(
                mw.principal, "memory.read_metadata", [Resource.of_memory(s) for s in batch])}
            page.extend(replace(s, text="") for s in batch if s.cube_id in allowed)
            if len(batch) < limit:
                break
            after = batch[-1].cube_id
        return page[:limit]

    def may(self, action: str, state: MemoryState) -> bool:
        """Whether ``action`` is allowed on the memory, recording nothing (to offer a button)."""
        return self._mw.may(action, Resource.of_memory(state))

    # -- the audit trail, counted ----------------------------------------------------------

    def tenants(self) -> list[str]:
        """The tenants the principal may audit: its own, or every one for a platform one."""
        if not self._mw.principal.is_platform:
            return [self._mw.principal.tenant]
        self._mw.require("audit.read", Resource.of_tenant(PLATFORM))
        return self._insights.tenants()

    def summary(self, where: AuditFilter | None = None, *,
                bucket: str | None = None) -> Summary:
        """Counts per event type, and per type over time (``audit.read``)."""
        where = self._scoped(where)
        span = self._insights.span(where)
        bucket = bucket or choose_bucket(span)
        try:
            events = self._insights.activity(where, bucket=bucket)
            reads = self._insights.reads_over_time(where, bucket=bucket)
        except ValueError as error:
            raise InvalidCommand(str(error)) from None
        counts: dict[str, int] = {}
        for count in events:  # one scan gives both the series and the totals
            counts[count.type] = counts.get(count.type, 0) + count.count
        span = replace(span, events=sum(counts.values()))
        return Summary(span, counts, sum(c.count for c in reads), bucket,
                       merge_series(events, reads))

    def access(self, where: AuditFilter | None = None, *, limit: int = 20) -> AccessSummary:
        """Reads and denials by actor, and the top readers of sensitive memories
        (``audit.read``)."""
        where = self._scoped(where)
        return AccessSummary(
            readers=self._insights.readers(where, limit=limit),
            sensitive_readers=self._insights.readers(where, label=SENSITIVE_LABEL, limit=limit),
            denied=self._insights.actors(replace(where, types=["AccessDenied"]), limit=limit))

    def _scoped(self, where: AuditFilter | None) -> AuditFilter:
        where = where or AuditFilter()
        return replace(where, tenant=self._mw.tenant_scope("audit.read", where.tenant))

    def _visible(self, cube_id: str, action: str) -> MemoryState:
        state = self._reads.cube(cube_id)
        if state is None:
            raise NotFound(f"no memory with id {cube_id!r}")
        self._mw.require(action, Resource.of_memory(state))
        return state

