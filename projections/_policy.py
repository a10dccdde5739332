"""The ``policy_rules`` table: the access rules in force, exactly as the ``policy`` stream says.

Its columns are those of the Casbin SQLAlchemy adapter (``ptype``, ``v0`` .. ``v5``), so the
adapter loads it unchanged. Unlike the other read models it is not maintained by the projection
runner: ``governance.AccessPolicy`` applies each PolicyRuleAdded/Removed event inside the very
transaction that appends it, so a rule is in force exactly when its event is committed and the
two can never disagree. Never register it with a runner: replaying a policy event a second time,
late, would undo a later change until the runner caught up.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Column, Connection, Integer, MetaData, String, Table, delete, insert, select

from eventstore import StoredEvent

POLICY_STREAM = "policy"
POLICY_RULE_ADDED = "PolicyRuleAdded"
POLICY_RULE_REMOVED = "PolicyRuleRemoved"
ACCESS_DENIED = "AccessDenied"

RULE_FIELDS = 6
"""A rule is a ptype and at most six values, the adapter's ``v0`` .. ``v5``."""

metadata = MetaData()

policy_rules = Table(
    "policy_rules",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("ptype", String(8), nullable=False),
    *(Column(f"v{i}", String(255)) for i in range(RULE_FIELDS)),
)


def _matching(rule: Sequence[str]) -> list[object]:
    """WHERE clauses matching exactly ``rule`` (``[ptype, v0, ...]``), unused columns NULL."""
    ptype, *values = rule
    padded = [*values, *[None] * (RULE_FIELDS - len(values))]
    return [policy_rules.c.ptype == ptype] + [
        policy_rules.c[f"v{i}"].is_(None) if value is None else policy_rules.c[f"v{i}"] == value
        for i, value in enumerate(padded)
    ]


def rule_in_force(conn: Connection, rule: Sequence[str]) -> bool:
    found = conn.execute(select(policy_rules.c.id).where(*_matching(rule)).limit(1)).first()
    return found is not None


def rules_in_force(conn: Connection) -> list[list[str]]:
    rows = conn.execute(select(policy_rules).order_by(policy_rules.c.id)).mappings()
    return [[row["ptype"], *(row[f"v{i}"] for i in range(RULE_FIELDS) if row[f"v{i}"] is not None)]
            for row in rows]


def apply_policy_events(conn: Connection, events: Sequence[StoredEvent]) -> None:
    """Add and remove the rules that ``events`` name; other events are ignored."""
    for event in events:
        rule = event.payload.get("rule")
        if event.type == POLICY_RULE_ADDED:
            ptype, *values = rule
            conn.execute(insert(policy_rules).values(
                ptype=ptype, **{f"v{i}": value for i, value in enumerate(values)}))
        elif event.type == POLICY_RULE_REMOVED:
            conn.execute(delete(policy_rules).where(*_matching(rule)))


def clear_rules(conn: Connection) -> None:
    """Before the policy stream's first event: rows no event put there must not be in force."""
    conn.execute(delete(policy_rules))
