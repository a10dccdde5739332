"""``memwarden demo``: a small, realistic multi-tenant workload to explore.

Three tenants with their agents and the people they remember things about: preferences that
change, facts that contradict earlier ones, a deletion on request, a bad update rolled back, and
reads by several agents. Ids are fixed, so seeding twice does nothing the second time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from governance._principal import PLATFORM, Resource
from governance._sdk import MemWarden


@dataclass(frozen=True)
class DemoSummary:
    seeded: bool
    memories: int
    events: int


def _memory_id(tenant: str, n: int) -> str:
    return f"demo-{tenant}-{n:03d}"


# (tenant, actor, owner, text, metadata) — written in this order.
_MEMORIES: list[tuple[str, str, str, str, dict[str, Any]]] = [
    ("acme-health", "agent:triage", "patient:maria.lopez",
     "Maria Lopez is allergic to penicillin.",
     {"semantic_type": "fact", "labels": ["sensitive", "medical"], "priority": 9,
      "retention_class": "clinical"}),
    ("acme-health", "agent:scheduler", "patient:maria.lopez",
     "Maria prefers morning appointments before 10am.",
     {"semantic_type": "preference", "tags": ["scheduling"]}),
    ("acme-health", "agent:triage", "patient:tom.becker",
     "Tom Becker reported recurring migraines since March.",
     {"semantic_type": "event", "labels": ["sensitive", "medical"], "priority": 7,
      "retention_class": "clinical"}),
    ("acme-health", "agent:scheduler", "patient:tom.becker",
     "Tom wants reminders by SMS, never by email.",
     {"semantic_type": "instruction", "tags": ["notifications"]}),
    ("globex-travel", "agent:concierge", "customer:aiko.tanaka",
     "Aiko prefers aisle seats on long-haul flights.",
     {"semantic_type": "preference", "tags": ["flights"], "source": "user"}),
    ("globex-travel", "agent:concierge", "customer:aiko.tanaka",
     "Aiko is vegetarian.",
     {"semantic_type": "fact", "tags": ["meals"], "source": "inference", "priority": 6}),
    ("globex-travel", "agent:concierge", "customer:sam.okafor",
     "Sam's loyalty tier is Gold.",
     {"semantic_type": "fact", "tags": ["loyalty"], "source": "import"}),
    ("globex-travel", "agent:planner", "customer:sam.okafor",
     "To book for Sam, always check the corporate travel policy first.",
     {"semantic_type": "skill", "tags": ["booking"]}),
    ("initech-hr", "agent:hr-helper", "employee:lena.fischer",
     "Lena Fischer works remotely on Fridays.",
     {"semantic_type": "fact", "tags": ["schedule"]}),
    ("initech-hr", "agent:hr-helper", "employee:lena.fischer",
     "Lena's salary band was raised to B3 in October.",
     {"semantic_type": "event", "labels": ["sensitive", "compensation"], "priority": 8}),
    ("initech-hr", "agent:hr-helper", "employee:raj.patel",
     "Raj asked to be addressed as 'Raj', not 'Rajesh'.",
     {"semantic_type": "preference"}),
]


def _steps(mw: MemWarden) -> list[Callable[[], object]]:
    """What happens after the memories exist: the stories an auditor will find."""
    as_ = mw.acting_as
    m = _memory_id
    return [
        # A contradicting fact corrects an earlier one (a new version, history kept).
        lambda: as_("agent:triage").update(
            m("acme-health", 1), text="Maria Lopez is allergic to amoxicillin, not penicillin.",
            reason="pharmacist corrected the allergy record"),
        # A preference changes.
        lambda: as_("agent:concierge").update(
            m("globex-travel", 1), text="Aiko now prefers window seats on long-haul flights.",
            reason="customer said so on the 14 Nov call"),
        lambda: as_("agent:concierge").update(
            m("globex-travel", 2), metadata={"source": "user", "priority": 8},
            reason="customer confirmed it herself"),
        # An agent writes something wrong; a compliance officer rolls it back.
        lambda: as_("agent:planner").update(
            m("globex-travel", 3), text="Sam's loyalty tier is Platinum.",
            reason="inferred from a forwarded email"),
        lambda: as_("officer:jane.roe").rollback(
            m("globex-travel", 3), 1, reason="inference was wrong: the airline record says Gold"),
        # A person asks for something to be forgotten (soft delete, then restore and delete).
        lambda: as_("agent:hr-helper").delete(
            m("initech-hr", 1), reason="employee asked to remove it"),
        lambda: as_("officer:jane.roe").restore(
            m("initech-hr", 1), reason="deleted by mistake: a different note was meant"),
        lambda: as_("agent:hr-helper").delete(
            m("initech-hr", 3), reason="duplicate of the HR system record"),
        # Reads by several agents, recorded as MemoryAccessed events.
        lambda: [as_("agent:triage").get(m("acme-health", n)) for n in (1, 1, 3)],
        lambda: [as_("agent:scheduler").get(m("acme-health", n)) for n in (2, 4)],
        lambda: [as_("agent:concierge").get(m("globex-travel", n)) for n in (1, 2, 3, 4)],
        lambda: as_("auditor:kim").get(m("initech-hr", 2)),
        # Litigation: nothing about Lena may expire, go cold or be erased while the case runs
        # (policies/retention.yaml would otherwise expire her compensation note after 2 years).
        lambda: as_("officer:jane.roe").place_hold(
            tenant="initech-hr", owner="employee:lena.fischer", case_id="HR-2026-114",
            reason="pending employment tribunal claim: preserve all records"),
        # Hot travel memories become parametric and activation memory (policies/conversion.yaml):
        # a LoRA adapter of Sam's, a KV cache of Aiko's; then Aiko's diet changes, which taints
        # the cache (`memwarden lineage activation.globex-travel.customer.aiko.tanaka`).
        mw.flush_reads,
        lambda: as_("officer:jane.roe").convert_parametric(
            tenant="globex-travel", owner="customer:sam.okafor",
            reason="Sam's booking rules are read on every trip"),
        lambda: as_("officer:jane.roe").convert_activation(
            tenant="globex-travel", owner="customer:aiko.tanaka",
            reason="Aiko's preferences open every conversation"),
        lambda: as_("agent:concierge").update(
            m("globex-travel", 2), text="Aiko is vegan.", reason="she corrected it on the phone"),
    ]


def seed_demo(mw: MemWarden) -> DemoSummary:
    """Seed the demo workload as its many actors: the platform operator's job."""
    mw.require("platform.operate", Resource.of_tenant(PLATFORM))
    if mw.store.stream_version(_memory_id("acme-health", 1)) > 0:
        return DemoSummary(seeded=False, memories=0, events=0)
    head_before = mw.store.head_position()
    counters: dict[str, int] = {}
    for tenant, actor, owner, text, metadata in _MEMORIES:
        counters[tenant] = counters.get(tenant, 0) + 1
        mw.acting_as(actor).add(text, tenant=tenant, owner=owner, metadata=metadata,
                                cube_id=_memory_id(tenant, counters[tenant]),
                                reason="learned in conversation")
    for step in _steps(mw):
        step()
    mw.flush_reads()
    return DemoSummary(seeded=True, memories=len(_MEMORIES),
                       events=mw.store.head_position() - head_before)
