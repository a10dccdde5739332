"""Retention as policy, with evidence: the rules file, the decay score, the planner and the worker.

``policies/retention.yaml`` holds ordered rules; the first rule whose ``match`` fits a memory
governs it (a memory no rule matches keeps only the ttl its write gave it). A rule may give:

- ``ttl``: the memory expires that long after it was written (the write's own ``ttl_seconds``
  wins over the rule's). Expired memories leave default listings and search.
- ``tiers``: ``long_term_after`` / ``cold_archive_after``, idle periods (since the last write,
  read or recall) after which a memory moves working -> long_term -> cold_archive. A cold
  memory's text leaves the hot read models (``cubes``, ``versions``, ``search``): the text of
  every version is kept compressed in ``retention_archive`` (see ``projections._archive``), and
  reading it is a recall (``MemoryRecalled``), which puts it back.
- ``decay``: ``half_life`` and ``threshold``; when the decay score falls below the threshold a
  ``MemoryDecayed`` event records it (once, until the memory is used again).
- ``erase_after``: that long after the write, the content is crypto-shredded.

A legal hold (on a memory, an owner or a whole tenant) wins over every rule: a held memory is
never expired, moved to the cold archive or erased.

Decay score (MemOS's behavioural indicators: importance, recency, frequency)::

    importance = priority / 10                      priority 0..10 from the write's metadata
    frequency  = reads / (reads + 5)                saturates: 5 reads -> 0.5, 45 reads -> 0.9
    base       = 0.2 + 0.5 * importance + 0.3 * frequency          in [0.2, 1.0]
    score      = base * 0.5 ** (idle / half_life)   idle: time since the last write, read, recall

so the score falls below ``threshold`` after ``half_life * log2(base / threshold)`` of idleness.

The worker reads only the ``retention_schedule`` rows due by now (an index range), never every
memory. Each memory's events are appended with its stream version as ``expected_version``, many
memories to one transaction: a worker that lost a race to another (or to a writer) gets a
concurrency error for that memory and leaves it to the next sweep, so nothing is ever applied
twice, and a sweep that crashed half way is finished by the next one. The clock is injectable.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from sqlalchemy import Connection, and_, case, func, select

from eventstore import (
    ANY_VERSION,
    ConcurrencyError,
    EventContext,
    NewEvent,
    StoredEvent,
    StreamAppend,
    canonical_json,
    utcnow,
)
from eventstore._driver import DriverConnection, upsert_sql
from governance._errors import InvalidCommand, StateConflict, VersionConflict
from governance._principal import Resource
from projections import ACTIVE, MemoryState, evolve
from projections._archive import archived_text, retention_archive
from projections._retention import (
    FACT_COLUMNS,
    RETENTION_SWEEP_COMPLETED,
    SWEEP_STREAM,
    RetentionFacts,
    facts_from_values,
    retention,
    retention_holds,
    retention_log,
    retention_plan,
    retention_schedule,
)
from projections._state import (
    COLD_ARCHIVE,
    LONG_TERM,
    MEMORY_DECAYED,
    MEMORY_EXPIRED,
    MEMORY_RECALLED,
    MEMORY_TIER_CHANGED,
    WORKING,
)

if TYPE_CHECKING:
    from governance._holds import LoggedHolds
    from governance._sdk import MemWarden

DEFAULT_POLICY_PATH = Path(__file__).resolve().parent.parent / "policies" / "retention.yaml"
PLANNER_VERSION = 2
"""Part of the rules digest: a change to how due dates are computed replans every memory."""

Clock = Callable[[], datetime]

# -- the policy file -------------------------------------------------------------------------


class RetentionPolicyError(InvalidCommand):
    """The retention policy file is invalid; the message names the file, line and field."""


_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w|y)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
MATCH_FIELDS = ("tenant", "kind", "semantic_type", "source", "retention_class", "labels", "pii")
_RULE_FIELDS = ("name", "match", "ttl", "tiers", "decay", "erase_after")
_TIER_FIELDS = ("long_term_after", "cold_archive_after")
_DECAY_FIELDS = ("half_life", "threshold")
DEFAULT_DECAY_THRESHOLD = 0.1


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit in ("y", "w", "d", "h", "m"):
        if seconds and seconds % _UNIT_SECONDS[unit] == 0:
            return f"{seconds // _UNIT_SECONDS[unit]}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True, slots=True)
class Match:
    """Each given field must hold; ``labels`` and ``pii`` hold if the memory has any of them."""

    tenant: frozenset[str] | None = None
    kind: frozenset[str] | None = None
    semantic_type: frozenset[str] | None = None
    source: frozenset[str] | None = None
    retention_class: frozenset[str] | None = None
    labels: frozenset[str] | None = None
    pii: frozenset[str] | None = None

    def fits(self, facts: RetentionFacts) -> bool:
        for name in ("tenant", "kind", "semantic_type", "source", "retention_class"):
            wanted = getattr(self, name)
            if wanted is not None and getattr(facts, name) not in wanted:
                return False
        if self.labels is not None and self.labels.isdisjoint(facts.labels):
            return False
        return self.pii is None or not self.pii.isdisjoint(facts.pii)

    def as_dict(self) -> dict[str, list[str]]:
        return {name: sorted(getattr(self, name)) for name in MATCH_FIELDS
                if getattr(self, name) is not None}


@dataclass(frozen=True, slots=True)
class Decay:
    half_life: timedelta
    threshold: float = DEFAULT_DECAY_THRESHOLD


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    line: int
    match: Match = field(default_factory=Match)
    ttl: timedelta | None = None
    long_term_after: timedelta | None = None
    cold_archive_after: timedelta | None = None
    decay: Decay | None = None
    erase_after: timedelta | None = None

    def as_dict(self) -> dict[str, Any]:
        def duration(value: timedelta | None) -> str | None:
            return None if value is None else format_duration(value)

        return {
            "name": self.name,
            "line": self.line,
            "match": self.match.as_dict(),
            "ttl": duration(self.ttl),
            "tiers": {"long_term_after": duration(self.long_term_after),
                      "cold_archive_after": duration(self.cold_archive_after)},
            "decay": None if self.decay is None else {
                "half_life": duration(self.decay.half_life),
                "threshold": self.decay.threshold},
            "erase_after": duration(self.erase_after),
        }


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    rules: tuple[Rule, ...]
    source: str = "retention policy"

    @classmethod
    def load(cls, path: Path | str = DEFAULT_POLICY_PATH) -> RetentionPolicy:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise RetentionPolicyError(
                f"cannot read the retention policy {path}: {error.strerror}") from None
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, *, source: str = "retention policy") -> RetentionPolicy:
        """Validate a policy document; every error names the source, line and field."""
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark is not None else source
            problem = getattr(error, "problem", None) or str(error)
            raise RetentionPolicyError(f"{where}: not valid YAML: {problem}") from None
        return cls(tuple(_Parser(source).document(root)), source)

    @property
    def digest(self) -> str:
        document = {"planner": PLANNER_VERSION, "rules": [
            {**rule.as_dict(), "line": None} for rule in self.rules]}
        return hashlib.sha256(canonical_json(document).encode()).hexdigest()

    def rule_for(self, facts: RetentionFacts) -> Rule | None:
        """The first rule that fits: rules are ordered, most specific first."""
        for rule in self.rules:
            if rule.match.fits(facts):
                return rule
        return None

    def rule_named(self, name: str | None) -> Rule | None:
        return next((rule for rule in self.rules if rule.name == name), None)


class _Parser:
    """Walks the YAML node tree, so that every error can name the line it is about."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: yaml.Node | None, where: str, message: str) -> RetentionPolicyError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return RetentionPolicyError(f"{self.source}{line}: {where}: {message}")

    def mapping(self, node: yaml.Node, where: str,
                allowed: Sequence[str]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, where, "must be a mapping of field: value")
        fields: dict[str, yaml.Node] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name not in allowed:
                raise self.fail(key, f"{where}.{name}" if name else where,
                                f"unknown field; known: {', '.join(allowed)}")
            if name in fields:
                raise self.fail(key, f"{where}.{name}", "given twice")
            fields[name] = value
        return fields

    def document(self, root: yaml.Node | None) -> list[Rule]:
        if root is None:
            raise self.fail(None, "the document", "is empty; it needs a 'rules:' list")
        fields = self.mapping(root, "the document", ("version", "rules"))
        if "version" in fields and self.scalar(fields["version"], "version") != "1":
            raise self.fail(fields["version"], "version", "only version 1 is known")
        if "rules" not in fields:
            raise self.fail(root, "the document", "needs a 'rules:' list")
        node = fields["rules"]
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, "rules", "must be a list of rules")
        rules = [self.rule(item, f"rules[{i}]") for i, item in enumerate(node.value)]
        seen: dict[str, int] = {}
        for rule in rules:
            if rule.name in seen:
                raise RetentionPolicyError(
                    f"{self.source}:{rule.line}: rules: the name {rule.name!r} is already used "
                    f"by the rule on line {seen[rule.name]}")
            seen[rule.name] = rule.line
        return rules

    def scalar(self, node: yaml.Node, where: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.value == "":
            raise self.fail(node, where, "must be a single value")
        return str(node.value)

    def names(self, node: yaml.Node, where: str) -> frozenset[str]:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if not items:
            raise self.fail(node, where, "must name at least one value")
        return frozenset(self.scalar(item, where) for item in items)

    def duration(self, node: yaml.Node, where: str) -> timedelta:
        raw = self.scalar(node, where)
        if raw.isdigit():
            seconds = int(raw)
        else:
            found = _DURATION.match(raw)
            if found is None:
                raise self.fail(node, where, f"{raw!r} is not a duration; write a whole number "
                                             "and a unit: 90s, 30m, 12h, 30d, 2w, 7y")
            seconds = int(found[1]) * _UNIT_SECONDS[found[2]]
        if seconds <= 0:
            raise self.fail(node, where, "must be longer than zero")
        return timedelta(seconds=seconds)

    def rule(self, node: yaml.Node, where: str) -> Rule:
        named = [value for key, value in getattr(node, "value", ())
                 if isinstance(node, yaml.MappingNode) and key.value == "name"]
        if named:  # name the rule in every error about it, the unknown fields too
            where = f"{where} ({self.scalar(named[0], f'{where}.name')})"
        fields = self.mapping(node, where, _RULE_FIELDS)
        if "name" not in fields:
            raise self.fail(node, where, "needs a name")
        name = self.scalar(fields["name"], f"{where}.name")
        match = Match()
        if "match" in fields:
            criteria = self.mapping(fields["match"], f"{where}.match", MATCH_FIELDS)
            match = Match(**{key: self.names(value, f"{where}.match.{key}")
                             for key, value in criteria.items()})
        options: dict[str, Any] = {}
        for key in ("ttl", "erase_after"):
            if key in fields:
                options[key] = self.duration(fields[key], f"{where}.{key}")
        if "tiers" in fields:
            tiers = self.mapping(fields["tiers"], f"{where}.tiers", _TIER_FIELDS)
            for key, value in tiers.items():
                options[key] = self.duration(value, f"{where}.tiers.{key}")
            long_term, cold = options.get("long_term_after"), options.get("cold_archive_after")
            if long_term is not None and cold is not None and cold <= long_term:
                raise self.fail(tiers["cold_archive_after"], f"{where}.tiers.cold_archive_after",
                                "must be longer than long_term_after (a memory reaches the "
                                "long-term tier first)")
        if "decay" in fields:
            decay = self.mapping(fields["decay"], f"{where}.decay", _DECAY_FIELDS)
            if "half_life" not in decay:
                raise self.fail(fields["decay"], f"{where}.decay", "needs a half_life")
            threshold = DEFAULT_DECAY_THRESHOLD
            if "threshold" in decay:
                raw = self.scalar(decay["threshold"], f"{where}.decay.threshold")
                try:
                    threshold = float(raw)
                except ValueError:
                    threshold = -1.0
                if not 0 < threshold < 1:
                    raise self.fail(decay["threshold"], f"{where}.decay.threshold",
                                    f"must be a number between 0 and 1 (exclusive); got {raw!r}")
            options["decay"] = Decay(self.duration(decay["half_life"],
                                                   f"{where}.decay.half_life"), threshold)
        if not options:
            raise self.fail(node, where, "gives no action: add ttl, tiers, decay or erase_after")
        return Rule(name=name, line=node.start_mark.line + 1, match=match, **options)


# -- the decay score and the schedule ----------------------------------------------------------


def decay_base(priority: int, reads: int) -> float:
    """The score of a memory used just now: importance and frequency, before recency."""
    importance = min(max(priority, 0), 10) / 10
    frequency = reads / (reads + 5)
    return 0.2 + 0.5 * importance + 0.3 * frequency


def decay_score(facts: RetentionFacts, half_life: timedelta, now: datetime) -> float:
    idle = max((now - facts.last_active_at).total_seconds(), 0.0)
    return decay_base(facts.priority, facts.read_count) * 0.5 ** (
        idle / half_life.total_seconds())


def decays_at(facts: RetentionFacts, decay: Decay) -> datetime:
    """When the score falls below the threshold, if nothing uses the memory before."""
    base = decay_base(facts.priority, facts.read_count)
    if base <= decay.threshold:
        return facts.last_active_at
    return facts.last_active_at + decay.half_life * math.log2(base / decay.threshold)


@dataclass(frozen=True, slots=True)
class Schedule:
    """When each retention action falls due for one memory under the rules (None: never)."""

    rule: str | None
    expire_at: datetime | None
    tier_at: datetime | None
    tier_to: str | None
    erase_at: datetime | None
    decay_at: datetime | None

    @property
    def due_at(self) -> datetime | None:
        moments = [m for m in (self.expire_at, self.tier_at, self.erase_at, self.decay_at) if m]
        return min(moments) if moments else None


def ttl_of(facts: RetentionFacts, rule: Rule | None) -> timedelta | None:
    if facts.ttl_seconds is not None:
        return timedelta(seconds=facts.ttl_seconds)
    return rule.ttl if rule is not None else None


def _next_tier(facts: RetentionFacts, rule: Rule) -> tuple[datetime | None, str | None]:
    if facts.tier == WORKING and rule.long_term_after is not None:
        return facts.last_active_at + rule.long_term_after, LONG_TERM
    if facts.tier in (WORKING, LONG_TERM) and rule.cold_archive_after is not None:
        return facts.last_active_at + rule.cold_archive_after, COLD_ARCHIVE
    return None, None


def schedule_for(facts: RetentionFacts, rule: Rule | None) -> Schedule:
    erase_at = None
    if rule is not None and rule.erase_after is not None and not facts.erased:
        erase_at = facts.created_at + rule.erase_after
    if facts.state != ACTIVE:
        return Schedule(rule and rule.name, None, None, None, erase_at, None)
    ttl = ttl_of(facts, rule)
    expire_at = facts.created_at + ttl if ttl is not None else None
    tier_at, tier_to, decay_at = None, None, None
    if rule is not None:
        tier_at, tier_to = _next_tier(facts, rule)
        if rule.decay is not None and not facts.decayed and facts.tier != COLD_ARCHIVE:
            decay_at = decays_at(facts, rule.decay)
    return Schedule(rule and rule.name, expire_at, tier_at, tier_to, erase_at, decay_at)


# -- the planner: keeps retention_schedule in step with the facts and the rules ----------------

_PLAN_NAME = "default"
_SCHEDULE_COLUMNS = ("cube_id", "tenant", "rule", "due_at", "expire_at", "tier_at", "tier_to",
                     "erase_at", "decay_at")
_UPSERT_SCHEDULE = upsert_sql("retention_schedule", _SCHEDULE_COLUMNS, key=("cube_id",))
_UPSERT_PLAN = upsert_sql("retention_plan", ("name", "rules_digest", "position"), key=("name",))
_MARK_EVERY = ("INSERT INTO retention_pending (cube_id, changes) SELECT cube_id, 1 FROM retention "
               "WHERE version > 0 "
               "ON CONFLICT (cube_id) DO UPDATE SET changes = retention_pending.changes + 1")
_SELECT_PENDING = (
    "SELECT p.changes, " + ", ".join(f"r.{c}" for c in FACT_COLUMNS) + " "
    "FROM retention_pending p JOIN retention r ON r.cube_id = p.cube_id "
    "WHERE p.cube_id > ? ORDER BY p.cube_id LIMIT ?")
_DELETE_PENDING = "DELETE FROM retention_pending WHERE cube_id = ? AND changes = ?"
_COUNT_PENDING = ("SELECT COUNT(*) FROM retention_pending p JOIN retention r "
                  "ON r.cube_id = p.cube_id WHERE r.tenant = ?")


def plan(conn: Connection, policy: RetentionPolicy, *, page_size: int = 5000,
         limit: int | None = None) -> int:
    """Recompute the schedule of the memories whose facts changed since the last pass (every
    memory, if the rules changed); return how many were planned. Runs in ``conn``'s transaction.

    The changed memories are those the projection marked in ``retention_pending``; a mark is
    removed only if no change came after the one planned (its count is unchanged), so a change
    committed while planning is planned by the next pass. New rules mark every memory (one
    statement) rather than replan them all at once, so that a pass may stop after ``limit``
    memories (the report's, which must answer in a moment at any size) and the next pass go on
    from the marks left; a sweep plans them all (``limit`` None) before it reads what is due."""
    db = DriverConnection(conn)
    found = db.execute("SELECT rules_digest, position FROM retention_plan WHERE name = ?",
                       (_PLAN_NAME,)).fetchone()
    digest = policy.digest
    highest = found[1] if found is not None else 0
    if found is None or found[0] != digest:
        db.execute(_MARK_EVERY)
    planned, after = 0, ""
    while limit is None or planned < limit:
        size = page_size if limit is None else min(page_size, limit - planned)
        rows = db.execute(_SELECT_PENDING, (after, size)).fetchall()
        facts = [facts_from_values(values[1:], db.dialect) for values in rows]
        highest = max([highest, *(f.position for f in facts)])
        planned += _schedule(db, policy, facts)
        db.executemany(_DELETE_PENDING, [(f.cube_id, values[0])
                                         for f, values in zip(facts, rows, strict=True)])
        if len(rows) < size:
            break
        after = facts[-1].cube_id
    db.execute(_UPSERT_PLAN, (_PLAN_NAME, digest, highest))
    return planned


def unplanned(conn: Connection, tenant: str | None = None) -> int:
    """How many memories (of ``tenant``) changed, or met new rules, since they were last planned:
    their ``retention_schedule`` rows are from before (or missing, for new memories)."""
    db = DriverConnection(conn)
    every = int(db.execute("SELECT COUNT(*) FROM retention_pending").fetchone()[0])
    if tenant is None or not every:  # (the usual answer, without a join per mark)
        return every
    return int(db.execute(_COUNT_PENDING, (tenant,)).fetchone()[0])


def _schedule(db: DriverConnection, policy: RetentionPolicy,
              memories: Sequence[RetentionFacts]) -> int:
    """Write the due dates of ``memories`` under ``policy``."""
    to_db = db.dialect.to_db_time

    def moment(value: datetime | None) -> Any:
        return None if value is None else to_db(value)

    rows = []
    for facts in memories:
        due = schedule_for(facts, policy.rule_for(facts))
        rows.append((facts.cube_id, facts.tenant, due.rule, moment(due.due_at),
                     moment(due.expire_at), moment(due.tier_at), due.tier_to,
                     moment(due.erase_at), moment(due.decay_at)))
    db.executemany(_UPSERT_SCHEDULE, rows)
    return len(rows)


# -- holds, as the worker sees them -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActiveHolds:
    """Every hold in force, indexed by what it covers (holds are few: loaded once a sweep)."""

    memories: Mapping[str, str]
    owners: Mapping[tuple[str, str], str]
    tenants: Mapping[str, str]

    @classmethod
    def load(cls, conn: Connection, logged: LoggedHolds | None = None) -> ActiveHolds:
        """The holds of the read model; with ``logged`` (the distributed mode, whose read model
        may lag), corrected by the hold events the log has after the position it has applied."""
        memories, owners, tenants = {}, {}, {}
        rows = DriverConnection(conn).execute(
            "SELECT hold_id, tenant, scope, target FROM retention_holds "
            "WHERE released_at IS NULL ORDER BY hold_id").fetchall()
        if logged is not None:
            rows = sorted(row for row in {*map(tuple, rows), *logged.placed.values()}
                          if row[0] not in logged.released)
        for hold_id, tenant, scope, target in rows:
            if scope == "memory":
                memories.setdefault(target, hold_id)
            elif scope == "owner":
                owners.setdefault((tenant, target), hold_id)
            else:
                tenants.setdefault(tenant, hold_id)
        return cls(memories, owners, tenants)

    def holding(self, facts: RetentionFacts) -> str | None:
        """The id of a hold covering the memory, or None."""
        return (self.memories.get(facts.cube_id) or self.owners.get((facts.tenant, facts.owner))
                or self.tenants.get(facts.tenant))


# -- the worker -------------------------------------------------------------------------------

EXPIRE, TIER, DECAY, ERASE = "expire", "tier", "decay", "erase"


@dataclass(frozen=True, slots=True)
class Action:
    """One thing a sweep does (or, dry, would do) to one memory."""

    cube_id: str
    tenant: str
    action: str
    rule: str | None
    detail: Mapping[str, Any]
    held_by: str | None = None

    @property
    def hold_blocks(self) -> bool:
        """Whether a legal hold forbids it: expiry, the cold archive, erasure."""
        return self.action in (EXPIRE, ERASE) or (
            self.action == TIER and self.detail["to_tier"] == COLD_ARCHIVE)

    @property
    def outcome(self) -> str:
        """``expired``, ``long_term``, ``cold_archive``, ``decayed`` or ``erased``."""
        if self.action == TIER:
            return str(self.detail["to_tier"])
        return {EXPIRE: "expired", DECAY: "decayed", ERASE: "erased"}[self.action]

    def explain(self) -> str:
        d = self.detail
        if self.action == EXPIRE:
            why = (f"its ttl of {d['ttl']} ({d['ttl_from']}) elapsed at {d['due_at']}")
        elif self.action == TIER:
            why = (f"idle for {d['idle']} (since {d['idle_since']}): {d['from_tier']} -> "
                   f"{d['to_tier']}")
        elif self.action == DECAY:
            why = f"decay score {d['score']} fell below the threshold {d['threshold']}"
        else:
            why = f"erase_after {d['erase_after']} elapsed at {d['due_at']}"
        rule = f"rule {self.rule!r}" if self.rule else "the memory's own ttl"
        held = f"; held by legal hold {self.held_by}, so nothing is done" if self.held_by else ""
        return f"{self.outcome}: {why}, under {rule}{held}"

    def as_dict(self) -> dict[str, Any]:
        return {"cube_id": self.cube_id, "tenant": self.tenant, "action": self.action,
                "outcome": self.outcome, "rule": self.rule, "held_by": self.held_by,
                "detail": dict(self.detail), "explanation": self.explain()}


def _human(span: timedelta) -> str:
    """A span as a person reads it: 31d 4h, 5h 12m, 40s."""
    seconds = max(int(span.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m" if minutes else f"{seconds}s"


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def actions_due(facts: RetentionFacts, rule: Rule | None, now: datetime,
                holds: ActiveHolds) -> list[Action]:
    """What is due for one memory at ``now``, in the order it is done; held actions carry the
    hold (the caller does not do them)."""
    held = holds.holding(facts)
    due = schedule_for(facts, rule)
    found: list[Action] = []

    def add(action: str, detail: dict[str, Any], blocked_by_hold: bool,
            by_rule: bool = True) -> None:
        name = rule.name if rule is not None and by_rule else None
        found.append(Action(facts.cube_id, facts.tenant, action, name, detail,
                            held if blocked_by_hold else None))

    if due.erase_at is not None and due.erase_at <= now:
        assert rule is not None and rule.erase_after is not None
        add(ERASE, {"erase_after": format_duration(rule.erase_after),
                    "due_at": _iso(due.erase_at)}, True)
    if due.expire_at is not None and due.expire_at <= now:
        ttl = ttl_of(facts, rule)
        assert ttl is not None
        from_write = facts.ttl_seconds is not None
        add(EXPIRE, {"ttl": format_duration(ttl), "due_at": _iso(due.expire_at),
                     "ttl_from": "the write's ttl_seconds" if from_write else "the rule"},
            True, by_rule=not from_write)
        if not held:
            return found  # an expired memory moves no further: no tier move, no decay
    if due.tier_at is not None and due.tier_at <= now and rule is not None:
        idle = now - facts.last_active_at
        to_tier = (COLD_ARCHIVE if rule.cold_archive_after is not None
                   and idle >= rule.cold_archive_after else due.tier_to)
        add(TIER, {"from_tier": facts.tier, "to_tier": to_tier,
                   "idle": _human(idle),
                   "idle_since": _iso(facts.last_active_at)}, to_tier == COLD_ARCHIVE)
    if due.decay_at is not None and due.decay_at <= now and rule is not None:
        assert rule.decay is not None
        add(DECAY, {"score": round(decay_score(facts, rule.decay.half_life, now), 4),
                    "threshold": rule.decay.threshold,
                    "half_life": format_duration(rule.decay.half_life)}, False)
    return found


def _event_for(action: Action, now: datetime) -> NewEvent:
    d = action.detail
    if action.action == EXPIRE:
        payload: dict[str, Any] = {
            "rule": action.rule, "reason": f"ttl {d['ttl']} elapsed ({d['ttl_from']})"}
        return NewEvent(MEMORY_EXPIRED, payload, occurred_at=now)
    if action.action == TIER:
        return NewEvent(MEMORY_TIER_CHANGED, {
            "from_tier": d["from_tier"], "to_tier": d["to_tier"], "rule": action.rule,
            "reason": f"idle for {d['idle']}"}, occurred_at=now)
    return NewEvent(MEMORY_DECAYED, {"score": d["score"], "rule": action.rule,
                                     "threshold": d["threshold"]}, occurred_at=now)


@dataclass
class SweepReport:
    """What one sweep did (or, dry, would do)."""

    sweep_id: str
    now: datetime
    dry_run: bool
    tenant: str | None
    rules_digest: str
    examined: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    """By outcome: expired, long_term, cold_archive, decayed, erased; and held (actions a legal
    hold blocked) and conflicts (memories another writer changed first: left to the next
    sweep)."""
    by_rule: Counter[tuple[str, str]] = field(default_factory=Counter)
    actions: list[Action] = field(default_factory=list)
    """Every action, for a dry run (a real sweep keeps only the counts: its memory stays flat)."""
    events: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sweep_id": self.sweep_id, "now": self.now.isoformat(), "dry_run": self.dry_run,
            "tenant": self.tenant, "rules_digest": self.rules_digest, "examined": self.examined,
            "counts": dict(sorted(self.counts.items())),
            "by_rule": [{"rule": rule, "outcome": outcome, "count": count}
                        for (rule, outcome), count in sorted(self.by_rule.items())],
            "events": self.events, "seconds": round(self.seconds, 3),
            "actions": [a.as_dict() for a in self.actions] if self.dry_run else None,
        }


ProgressCallback = Callable[[int, int], None]
"""Called with (memories examined, memories due) after each batch."""

AfterAppend = Callable[[Connection, list[StoredEvent]], None]


@dataclass(frozen=True, slots=True)
class _Pending:
    """One memory's events of a batch, with what they were decided from."""

    append: StreamAppend
    facts: RetentionFacts
    actions: list[Action]


class _HeldMeanwhile(Exception):
    """A legal hold placed since the sweep read the holds covers some of a batch's memories."""

    def __init__(self, cube_ids: list[str]) -> None:
        super().__init__(f"held meanwhile: {', '.join(cube_ids)}")
        self.cube_ids = cube_ids


def _unless_held_meanwhile(appends: Mapping[str, _Pending], project: AfterAppend | None,
                           logged: LoggedHolds | None) -> AfterAppend:
    """Inside the append's transaction, which serializes with the appends that place holds:
    refuse the batch if a hold now covers what it would expire or cold-archive. With
    ``logged`` (the distributed mode) the holds placed since the sweep began come from the log,
    which has them all, not from the Kafka-fed read model, which may not yet."""

    def check(conn: Connection, stored: list[StoredEvent]) -> None:
        if logged is not None:  # (everything before this append's events is committed)
            logged.read(conn, stored[0].position - 1)
        holds = ActiveHolds.load(conn, logged)
        held = [cube_id for cube_id, pending in appends.items()
                if holds.holding(pending.facts) and any(a.hold_blocks for a in pending.actions)]
        if held:
            raise _HeldMeanwhile(held)
        if project is not None:
            project(conn, stored)

    return check

_SELECT_DUE = (
    "SELECT " + ", ".join(f"r.{c}" for c in FACT_COLUMNS) + ", s.due_at "
    "FROM retention_schedule s JOIN retention r ON r.cube_id = s.cube_id "
    "WHERE s.due_at <= ? AND (s.due_at, s.cube_id) > (?, ?) {tenant} "
    "ORDER BY s.due_at, s.cube_id LIMIT ?")
_COUNT_DUE = "SELECT COUNT(*) FROM retention_schedule WHERE due_at <= ? {tenant}"
_STREAM_VERSIONS = ("SELECT stream_id, MAX(stream_version) FROM events WHERE stream_id IN {keys} "
                    "GROUP BY stream_id")


class RetentionWorker:
    """Sweeps what is due. ``clock`` gives "now" (inject a fake one to simulate months)."""

    def __init__(self, memwarden: MemWarden, policy: RetentionPolicy | None = None, *,
                 clock: Clock = utcnow, batch_size: int = 1000) -> None:
        self.memwarden = memwarden
        self.policy = policy if policy is not None else load_policy(memwarden)
        self.clock = clock
        self.batch_size = batch_size

    def run(self, *, dry_run: bool = False, tenant: str | None = None,
            on_progress: ProgressCallback | None = None) -> SweepReport:
        """One sweep at the clock's now. Dry, it plans and decides in a transaction it rolls
        back, appends nothing, and returns every action it would take."""
        mw = self.memwarden
        tenant = mw.tenant_scope("retention.manage", tenant)
        now = self.clock()
        report = SweepReport(uuid.uuid4().hex, now, dry_run, tenant, self.policy.digest)
        started = time.perf_counter()
        store = mw.store
        mw.flush_reads()
        applied = catch_up(mw, wait=True)
        from governance._holds import LoggedHolds  # (it imports this module)

        # Distributed mode: the read model has every hold up to ``applied``; the log, the rest.
        self._logged = None if applied is None else LoggedHolds(store, applied)
        if dry_run:
            with store.write_connection() as conn:
                transaction = conn.begin()
                try:
                    plan(conn, self.policy)
                    holds = ActiveHolds.load(conn)
                    total = self._count_due(conn, now, tenant)
                    for batch in self._due_batches(lambda: nullcontext(conn), now, tenant):
                        for facts in batch:
                            self._decide(facts, now, holds, report)
                        if on_progress:
                            on_progress(report.examined, total)
                finally:
                    transaction.rollback()
        else:
            with store.write_connection() as conn, conn.begin():
                plan(conn, self.policy)
            with store.engine.connect() as conn:
                holds = ActiveHolds.load(conn)
                total = self._count_due(conn, now, tenant)
            for batch in self._due_batches(store.engine.connect, now, tenant):
                decided = [(facts, self._decide(facts, now, holds, report))
                           for facts in batch]
                self._apply(decided, now, report)
                if on_progress:
                    on_progress(report.examined, total)
            self._complete(report)
        report.seconds = time.perf_counter() - started
        return report

    def _count_due(self, conn: Connection, now: datetime, tenant: str | None) -> int:
        db = DriverConnection(conn)
        params: list[Any] = [db.dialect.to_db_time(now)]
        if tenant is not None:
            params.append(tenant)
        sql = _COUNT_DUE.format(tenant="AND tenant = ?" if tenant is not None else "")
        return int(db.execute(sql, params).fetchone()[0])

    def _due_batches(self, connection: Callable[[], AbstractContextManager[Connection]],
                     now: datetime,
                     tenant: str | None) -> Iterator[list[RetentionFacts]]:
        """The due memories, a batch at a time, by (due_at, cube_id): each batch is read after
        the previous one was applied, and a memory left due (held) is not read twice."""
        sql = _SELECT_DUE.format(tenant="AND s.tenant = ?" if tenant is not None else "")
        after: tuple[Any, str] = (None, "")
        while True:
            with connection() as conn:
                db = DriverConnection(conn)
                now_db = db.dialect.to_db_time(now)
                if after[0] is None:
                    after = (db.dialect.to_db_time(datetime.min.replace(tzinfo=now.tzinfo)), "")
                params: list[Any] = [now_db, *after]
                if tenant is not None:
                    params.append(tenant)
                params.append(self.batch_size)
                rows = db.execute(sql, params).fetchall()
                batch = [facts_from_values(row[:-1], db.dialect) for row in rows]
            if batch:
                yield batch
                after = (rows[-1][-1], batch[-1].cube_id)
            if len(rows) < self.batch_size:
                return

    def _decide(self, facts: RetentionFacts, now: datetime, holds: ActiveHolds,
                report: SweepReport) -> list[Action]:
        report.examined += 1
        actions = actions_due(facts, self.policy.rule_for(facts), now, holds)
        todo = []
        for action in actions:
            if report.dry_run:
                report.actions.append(action)
            if action.held_by is not None:
                report.counts["held"] += 1
                continue
            todo.append(action)
            if report.dry_run:
                self._count(report, action)
        return todo

    @staticmethod
    def _count(report: SweepReport, action: Action) -> None:
        report.counts[action.outcome] += 1
        report.by_rule[(action.rule or "(write ttl)", action.outcome)] += 1

    def _apply(self, decided: list[tuple[RetentionFacts, list[Action]]], now: datetime,
               report: SweepReport) -> None:
        """Append the batch's events, each memory at the version the projection showed; then
        erase what is due for erasure (the erasure service appends its own events)."""
        mw = self.memwarden
        appends: dict[str, _Pending] = {}
        erasures: list[tuple[RetentionFacts, Action]] = []
        for facts, actions in decided:
            events = [_event_for(a, now) for a in actions if a.action != ERASE]
            erasures.extend((facts, a) for a in actions if a.action == ERASE)
            if events:
                context = EventContext(actor=mw.actor, tenant=facts.tenant,
                                       on_behalf_of=mw.on_behalf_of,
                                       correlation_id=report.sweep_id)
                appends[facts.cube_id] = _Pending(
                    StreamAppend(facts.cube_id, events, facts.version, context), facts,
                    [a for a in actions if a.action != ERASE])
        while appends:
            try:
                mw.store.append_many([p.append for p in appends.values()],
                                     then=_unless_held_meanwhile(appends, _after_append(mw),
                                                                 self._logged))
            except ConcurrencyError as error:
                # Another worker or a writer moved these memories since the projection showed
                # them: leave them to the next sweep, which sees their new state.
                for stale in self._stale(appends, error.stream_id):
                    del appends[stale]
                    report.counts["conflicts"] += 1
                continue
            except _HeldMeanwhile as held:
                for cube_id in held.cube_ids:
                    del appends[cube_id]
                    report.counts["held"] += 1
                continue
            for pending in appends.values():
                report.events += len(pending.append.events)
                for action in pending.actions:
                    self._count(report, action)
            break
        for facts, action in erasures:
            with mw.store.engine.connect() as conn:
                if self._logged is not None:
                    self._logged.read(conn, mw.store.head_position(conn))
                if ActiveHolds.load(conn, self._logged).holding(facts):  # placed meanwhile
                    report.counts["held"] += 1
                    continue
            try:
                mw.erase_memory_content(action.cube_id, reason=action.explain(),
                                        rule=action.rule)
            except (StateConflict, VersionConflict):
                report.counts["conflicts"] += 1  # changed or erased meanwhile: next sweep's
                continue
            report.events += 1
            self._count(report, action)

    def _stale(self, appends: Mapping[str, _Pending], conflicting: str) -> list[str]:
        """The streams of ``appends`` that are no longer at their expected version."""
        ids = sorted(appends)
        with self.memwarden.store.engine.connect() as conn:
            current = dict(DriverConnection(conn).fetch_in_chunks(_STREAM_VERSIONS, ids))
        stale = [c for c in ids if current.get(c, 0) != appends[c].append.expected_version]
        return stale or [conflicting]

    def _complete(self, report: SweepReport) -> None:
        mw = self.memwarden
        payload = {"sweep_id": report.sweep_id, "now": report.now.isoformat(),
                   "tenant": report.tenant, "rules_digest": report.rules_digest,
                   "examined": report.examined, "events": report.events,
                   "counts": dict(sorted(report.counts.items()))}
        context = EventContext(actor=mw.actor, tenant=report.tenant,
                               on_behalf_of=mw.on_behalf_of, correlation_id=report.sweep_id)
        mw.store.append(SWEEP_STREAM, [NewEvent(RETENTION_SWEEP_COMPLETED, payload,
                                                occurred_at=report.now)],
                        expected_version=ANY_VERSION, context=context, then=_after_append(mw))
        report.events += 1


def catch_up(memwarden: MemWarden, *, wait: bool = False) -> int | None:
    """Apply what the read models have not seen (another process's writes) before reading them;
    in the distributed mode the Kafka-fed projectors do that, never this process. With ``wait``
    (a sweep, which must see every legal hold placed before it) it then waits until they have
    applied the log up to now (``ReadModelsBehind`` after a minute) and returns that position
    (None: the read models are fed by this process, and current)."""
    if memwarden._backend.project_synchronously:
        memwarden.projector.catch_up()
    elif wait:
        from projections._kafka_projector import KafkaFedRunner

        runner = memwarden.projector
        if isinstance(runner, KafkaFedRunner):
            return runner.wait_until_applied(["retention"])
    return None


def _after_append(memwarden: MemWarden) -> AfterAppend | None:
    """What the SDK runs inside each append: projection, in the embedded mode."""
    backend = memwarden._backend
    return backend.runner.project_new_events if backend.project_synchronously else None


def load_policy(memwarden: MemWarden) -> RetentionPolicy:
    """The rules file the handle's settings name (read afresh: an edit applies to the next
    sweep, which replans every memory because the rules digest changed)."""
    return RetentionPolicy.load(memwarden._backend.settings.retention_policy)


# -- recall -------------------------------------------------------------------------------------


class MemoryArchived(StateConflict):
    """The memory is in the cold archive: its text, now or as of any earlier version, is read
    only by recalling it (a ``MemoryRecalled`` event, with a reason), never by a plain read."""


def refuse_if_archived(state: MemoryState) -> MemoryState:
    """``state``, unless the memory is in the cold archive: then its text (of any version) is
    not to be read from the hot read models or the log, and the reader is told to recall it."""
    if state.tier == COLD_ARCHIVE:
        raise MemoryArchived(f"memory {state.cube_id} is in the cold archive: recall it (with "
                             "a reason) to read it or its history")
    return state


def archived_in(mw: MemWarden, tenant: str) -> set[str]:
    """The ids of ``tenant``'s memories now in the cold archive (an index range)."""
    with mw.store.engine.connect() as conn:
        return set(conn.execute(select(retention.c.cube_id).where(
            retention.c.tenant == tenant, retention.c.tier == COLD_ARCHIVE)).scalars())



@dataclass(frozen=True, slots=True)
class Recalled:
    """A memory brought back from the cold archive: its state now (tier working) and the text
    read back from the compressed archive (masked as any read is). A memory not in the archive
    (recalled already) is simply read; ``archived_bytes`` is then 0."""

    state: MemoryState
    text: str
    archived_bytes: int


def recall(mw: MemWarden, cube_id: str, *, reason: str) -> Recalled:
    state = mw._visible(cube_id, "memory.recall")
    mw.require("memory.read_content", Resource.of_memory(state))
    if reason is None or not reason.strip():
        raise InvalidCommand("a reason is required to recall a memory from the cold archive")
    if state.tier != COLD_ARCHIVE:  # recalled already (by someone else?): an ordinary read
        shown = mw.get(cube_id)
        return Recalled(shown, shown.text, 0)
    with mw.store.engine.connect() as conn:
        archived = conn.execute(
            select(retention_archive.c.compressed, retention.c.version)
            .join(retention, retention.c.cube_id == retention_archive.c.cube_id)
            .where(retention_archive.c.cube_id == cube_id)).first()
    if archived is None:
        raise StateConflict(f"memory {cube_id} has no archived content (it was erased)")
    text = archived_text(archived.compressed)
    context = EventContext(actor=mw.actor, tenant=state.tenant, on_behalf_of=mw.on_behalf_of,
                           correlation_id=str(uuid.uuid4()))
    try:
        stored = mw.store.append(
            cube_id, [NewEvent(MEMORY_RECALLED, {"reason": reason.strip()})],
            expected_version=archived.version, context=context, then=_after_append(mw))
    except ConcurrencyError:
        raise StateConflict(f"memory {cube_id} changed while it was being recalled (recalled "
                            "by someone else?); read it again") from None
    shown = mw.redact([replace(evolve(state, stored[0]), text=text)])[0]
    return Recalled(shown, shown.text, len(archived.compressed))


# -- the report ---------------------------------------------------------------------------------

_DUE_OUTCOMES = ("expired", "long_term", "cold_archive", "erased", "decayed")
REPORT_PLAN_LIMIT = 1000
"""The most memories one report plans (about 0.1 s); a sweep plans every one."""


@dataclass(frozen=True, slots=True)
class RetentionReport:
    now: datetime
    days: int
    tenant: str | None
    done: list[dict[str, Any]]
    """What was done in the last ``days``: by rule and outcome, with counts."""
    recent: list[dict[str, Any]]
    """The latest retention actions in that window (newest first, at most 100)."""
    due: list[dict[str, Any]]
    """What falls due in the next ``days``, by rule: counts per outcome, and how many held."""
    holds: int
    sweeps: list[dict[str, Any]]
    unplanned: int = 0
    """Memories whose due dates are not yet planned under the current rules and facts (a
    report plans at most ``REPORT_PLAN_LIMIT``; the next reports and every sweep plan the
    rest): ``due`` counts their previous plan, or leaves them out if they have none."""
    planned_through: int = 0
    """The highest log position whose facts the schedule was planned from."""

    def as_dict(self) -> dict[str, Any]:
        return {"now": self.now.isoformat(), "days": self.days, "tenant": self.tenant,
                "done": self.done, "recent": self.recent, "due": self.due,
                "active_holds": self.holds, "sweeps": self.sweeps,
                "unplanned": self.unplanned, "planned_through": self.planned_through}


def retention_report(mw: MemWarden, *, days: int = 30, tenant: str | None = None,
                     clock: Clock = utcnow) -> RetentionReport:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3650:
        raise InvalidCommand(f"days must be a whole number from 1 to 3650; got {days!r}")
    tenant = mw.tenant_scope("retention.read", tenant)
    policy = load_policy(mw)
    now = clock()
    catch_up(mw)
    # Bounded: after new rules (every memory to replan) or a bulk load, planning them all here
    # took 11 s at 100,000 memories, in a write transaction; the report says what is left.
    with mw.store.write_connection() as conn, conn.begin():
        plan(conn, policy, limit=REPORT_PLAN_LIMIT)
    since, horizon = now - timedelta(days=days), now + timedelta(days=days)
    log, sched = retention_log, retention_schedule
    actions = [*_DUE_OUTCOMES, "recalled", "subject_erased"]
    with mw.store.engine.connect() as conn:
        in_window = [log.c.occurred_at >= since, log.c.occurred_at <= now,
                     log.c.outcome.in_(actions)]
        if tenant is not None:
            in_window.append(log.c.tenant == tenant)
        done = [{"rule": row.rule, "outcome": row.outcome, "count": row.count}
                for row in conn.execute(
                    select(log.c.rule, log.c.outcome, func.count().label("count"))
                    .where(*in_window).group_by(log.c.rule, log.c.outcome)
                    .order_by(log.c.rule, log.c.outcome))]
        recent = [{"position": row.position, "type": row.type, "outcome": row.outcome,
                   "cube_id": row.cube_id, "tenant": row.tenant, "rule": row.rule,
                   "actor": row.actor, "occurred_at": row.occurred_at.isoformat()}
                  for row in conn.execute(select(log).where(*in_window)
                                          .order_by(log.c.position.desc()).limit(100))]
        due_filter = [sched.c.due_at <= horizon]
        if tenant is not None:
            due_filter.append(sched.c.tenant == tenant)

        def within(column: Any, *also: Any) -> Any:
            return func.sum(case((and_(column <= horizon, *also), 1), else_=0))

        due = [{"rule": row.rule, "expired": row.expired or 0, "long_term": row.long_term or 0,
                "cold_archive": row.cold_archive or 0, "erased": row.erased or 0,
                "decayed": row.decayed or 0}
               for row in conn.execute(select(
                   sched.c.rule,
                   within(sched.c.expire_at).label("expired"),
                   within(sched.c.tier_at, sched.c.tier_to == LONG_TERM).label("long_term"),
                   within(sched.c.tier_at, sched.c.tier_to == COLD_ARCHIVE).label("cold_archive"),
                   within(sched.c.erase_at).label("erased"),
                   within(sched.c.decay_at).label("decayed"),
               ).where(*due_filter).group_by(sched.c.rule).order_by(sched.c.rule))]
        holds_query = select(func.count()).select_from(retention_holds).where(
            retention_holds.c.released_at.is_(None))
        if tenant is not None:
            holds_query = holds_query.where(retention_holds.c.tenant == tenant)
        active_holds = int(conn.execute(holds_query).scalar_one())
        sweeps_query = select(log).where(log.c.type == RETENTION_SWEEP_COMPLETED)
        if tenant is not None:
            sweeps_query = sweeps_query.where(log.c.tenant == tenant)
        sweeps = [{"at": row.occurred_at.isoformat(), "actor": row.actor, "tenant": row.tenant,
                   **json.loads(row.detail)}
                  for row in conn.execute(sweeps_query.order_by(log.c.position.desc()).limit(5))]
        left = unplanned(conn, tenant)
        through = conn.execute(select(retention_plan.c.position).where(
            retention_plan.c.name == _PLAN_NAME)).scalar() or 0
    return RetentionReport(now, days, tenant, done, recent, due, active_holds, sweeps,
                           left, int(through))
