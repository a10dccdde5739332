"""Legal holds: while one is in force, no retention rule expires, cold-archives or erases what it
covers (a memory, every memory of an owner in a tenant, or a whole tenant).

A hold is its own stream, ``hold:<id>``: ``LegalHoldPlaced`` (scope, target, reason, case id) and
at most one ``LegalHoldReleased`` (reason). The ``retention_holds`` read model lists them.

In the distributed mode Kafka consumers feed that read model, so it lags the log: a retention
sweep waits until it has applied the log up to the sweep's start, and for the holds placed after
that reads the log itself (``LoggedHolds``), the source of truth.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, select

from eventstore import ConcurrencyError, EventContext, EventStore, NewEvent
from governance._errors import InvalidCommand, NotFound, StateConflict
from governance._memcube import validate_identifier
from governance._principal import PLATFORM, Resource, validate_tenant
from governance._retention import catch_up
from projections._retention import (
    LEGAL_HOLD_PLACED,
    LEGAL_HOLD_RELEASED,
    hold_stream,
    retention_holds,
)

if TYPE_CHECKING:
    from governance._sdk import MemWarden

_MAX_TEXT = 2000


@dataclass(frozen=True, slots=True)
class Hold:
    hold_id: str
    tenant: str
    scope: str
    target: str
    reason: str
    case_id: str
    placed_by: str
    placed_at: datetime
    released_by: str | None = None
    released_at: datetime | None = None
    release_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.released_at is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "hold_id": self.hold_id, "tenant": self.tenant, "scope": self.scope,
            "target": self.target, "reason": self.reason, "case_id": self.case_id,
            "placed_by": self.placed_by, "placed_at": self.placed_at.isoformat(),
            "active": self.active, "released_by": self.released_by,
            "released_at": self.released_at.isoformat() if self.released_at else None,
            "release_reason": self.release_reason,
        }


def _text(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidCommand(f"a legal hold needs a {field_name}")
    if len(value) > _MAX_TEXT:
        raise InvalidCommand(f"{field_name} must be at most {_MAX_TEXT} characters")
    return value.strip()


def place_hold(mw: MemWarden, *, reason: str, case_id: str, memory: str | None = None,
               owner: str | None = None, tenant: str | None = None) -> Hold:
    """Hold one memory (``memory``), an owner's memories (``owner`` and ``tenant``) or a whole
    tenant (``tenant`` alone)."""
    if memory is not None:
        if owner is not None:
            raise InvalidCommand("hold a memory or an owner, not both")
        state = mw._visible(memory, "retention.manage")  # another tenant's: not found
        if tenant is not None and tenant != state.tenant:
            raise InvalidCommand(f"memory {memory} is not in tenant {tenant}")
        scope, target, tenant = "memory", memory, state.tenant
    else:
        if tenant is None:
            raise InvalidCommand("name what to hold: a memory, or a tenant (and an owner in it)")
        tenant = validate_tenant(tenant, platform_allowed=False)
        mw.require("retention.manage", Resource.of_tenant(tenant))
        scope, target = ("owner", validate_identifier("owner", owner)) if owner is not None \
            else ("tenant", tenant)
    reason, case_id = _text("reason", reason), _text("case id", case_id)
    hold_id = uuid.uuid4().hex[:16]
    event = NewEvent(LEGAL_HOLD_PLACED, {"hold_id": hold_id, "scope": scope, "target": target,
                                         "reason": reason, "case_id": case_id})
    [placed] = mw.store.append(hold_stream(hold_id), [event], expected_version=0,
                               context=_context(mw, tenant), then=_project(mw))
    return Hold(hold_id, tenant, scope, target, reason, case_id, placed.actor,
                placed.occurred_at)


def release_hold(mw: MemWarden, hold_id: str, *, reason: str) -> Hold:
    hold = _find(mw, hold_id)
    mw.require("retention.manage", Resource.of_tenant(hold.tenant))
    reason = _text("reason", reason)
    if not hold.active:
        raise StateConflict(f"legal hold {hold_id} was released already, at "
                            f"{hold.released_at:%Y-%m-%d %H:%M} by {hold.released_by}")
    event = NewEvent(LEGAL_HOLD_RELEASED, {"hold_id": hold_id, "reason": reason})
    try:
        [released] = mw.store.append(hold_stream(hold_id), [event], expected_version=1,
                                     context=_context(mw, hold.tenant), then=_project(mw))
    except ConcurrencyError:
        raise StateConflict(f"legal hold {hold_id} was released already") from None
    return replace(hold, released_by=released.actor, released_at=released.occurred_at,
                   release_reason=reason)


def list_holds(mw: MemWarden, *, tenant: str | None = None,
               include_released: bool = False) -> list[Hold]:
    tenant = mw.tenant_scope("retention.read", tenant)
    query = select(retention_holds).order_by(retention_holds.c.placed_at,
                                             retention_holds.c.hold_id)
    if tenant is not None:
        query = query.where(retention_holds.c.tenant == tenant)
    if not include_released:
        query = query.where(retention_holds.c.released_at.is_(None))
    with mw.store.engine.connect() as conn:
        return [_from_row(row) for row in conn.execute(query).mappings()]


def _find(mw: MemWarden, hold_id: str) -> Hold:
    """A hold the principal's tenant owns; another tenant's is not found, as keys are."""
    catch_up(mw)
    with mw.store.engine.connect() as conn:
        row = conn.execute(select(retention_holds).where(
            retention_holds.c.hold_id == hold_id)).mappings().first()
    if row is None or not mw.principal.may_act_in(row["tenant"]):
        raise NotFound(f"no legal hold with id {hold_id!r}")
    return _from_row(row)


def _from_row(row: Any) -> Hold:
    return Hold(**{name: row[name] for name in Hold.__dataclass_fields__})


def _context(mw: MemWarden, tenant: str) -> EventContext:
    return EventContext(actor=mw.actor, tenant=None if tenant == PLATFORM else tenant,
                        on_behalf_of=mw.on_behalf_of, correlation_id=str(uuid.uuid4()))


def _project(mw: MemWarden) -> Any:
    backend = mw._backend
    return backend.runner.project_new_events if backend.project_synchronously else None


class LoggedHolds:
    """The legal holds placed and released in the log after a position, read from the log
    (never from the read model, which Kafka may not have fed yet) and a step at a time: each
    ``read`` fetches only the hold events after the last position it read up to (by the
    primary key), so a sweep re-checking before every batch reads each event once."""

    def __init__(self, store: EventStore, after: int) -> None:
        self.store = store
        self.read_up_to = after
        self.placed: dict[str, tuple[str, str, str, str]] = {}
        """hold id -> (hold id, tenant, scope, target), as ``retention_holds`` has them."""
        self.released: set[str] = set()

    def read(self, conn: Connection, up_to: int) -> None:
        """Take in the hold events up to ``up_to``, which must all be committed (the caller
        holds the append lock and ``up_to`` precedes its own events, or read the head before)."""
        if up_to <= self.read_up_to:
            return
        for event in self.store.read_all(self.read_up_to, up_to_position=up_to, limit=None,
                                         types=[LEGAL_HOLD_PLACED, LEGAL_HOLD_RELEASED],
                                         connection=conn):
            hold_id = event.payload["hold_id"]
            if event.type == LEGAL_HOLD_PLACED:
                self.placed[hold_id] = (hold_id, event.tenant or "", event.payload["scope"],
                                        event.payload["target"])
            else:
                self.released.add(hold_id)
        self.read_up_to = up_to
