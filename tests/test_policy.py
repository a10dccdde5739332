"""The access policy at its one enforcement point (issue #4), on every backend.

The expected matrix below is written out independently of ``policies/policy.csv``: a change to
the default rules that is not also made here fails the matrix test.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstore import EventStore, StoredEvent
from governance import InvalidCommand, MemWarden, NotFound, StateConflict
from governance._policy import (
    NO_RULE,
    OTHER_TENANT,
    RESTRICTED_LABEL,
    AccessPolicy,
    PermissionDenied,
    PolicyRule,
)
from governance._principal import (
    ACTIONS,
    PLATFORM,
    ROLES,
    Principal,
    Resource,
    is_restricted_label,
    name_problem,
)
from projections._policy import (
    ACCESS_DENIED,
    POLICY_RULE_ADDED,
    POLICY_RULE_REMOVED,
    POLICY_STREAM,
    policy_rules,
    rules_in_force,
)

ANY, OWN, SHARED, SELF = "any", "own", "shared", "about_self"
RELATIONS = (OWN, SHARED, SELF, "unrelated")

_AUDITOR = {action: {ANY} for action in (
    "memory.read_metadata", "memory.history", "audit.read", "integrity.verify", "policy.read",
    "lineage.read", "retention.read")}
_TENANT_ADMIN = _AUDITOR | {action: {ANY} for action in (
    "memory.create", "memory.read_content", "memory.update", "memory.delete", "memory.restore",
    "retention.manage", "key.manage", "memory.recall", "artifact.convert", "artifact.load")}
_COMPLIANCE_OFFICER = _AUDITOR | {action: {ANY} for action in (
    "memory.create", "memory.read_content", "memory.read_sensitive", "memory.update",
    "memory.delete", "memory.restore", "memory.rollback", "subject.export", "subject.erase",
    "retention.manage", "bundle.export", "memory.recall", "artifact.convert", "artifact.load")}
EXPECTED: dict[str, dict[str, set[str]]] = {
    "auditor": _AUDITOR,
    "tenant_admin": _TENANT_ADMIN,
    "compliance_officer": _COMPLIANCE_OFFICER,
    "agent": {
        "memory.create": {OWN},
        "memory.read_metadata": {OWN, SHARED},
        "memory.read_content": {OWN, SHARED},
        "memory.history": {OWN, SHARED},
        "memory.update": {OWN},
        "memory.delete": {OWN},
        "memory.restore": {OWN},
        # Loading an artifact also needs the right to read every one of its sources.
        "artifact.load": {ANY},
    },
    "data_subject": {action: {SELF} for action in (
        "memory.read_metadata", "memory.read_content", "memory.read_sensitive", "memory.history",
        "subject.export", "subject.request_erasure")},
    "admin": _TENANT_ADMIN | _COMPLIANCE_OFFICER | {"policy.manage": {ANY},
                                                    "platform.operate": {ANY},
                                                    "bundle.import": {ANY},
                                                    "subject.request_erasure": {SELF}},
}
"""role -> action -> the relations under which it is allowed (in the principal's own tenant)."""


def expected_allowed(role: str, action: str, relation: str, *, sensitive: bool) -> bool:
    def grants(act: str) -> bool:
        scopes = EXPECTED[role].get(act, set())
        return ANY in scopes or relation in scopes

    if action == "memory.read_content" and sensitive:
        return grants(action) and grants("memory.read_sensitive")
    return grants(action)


def principal(role: str, tenant: str = "acme") -> Principal:
    if role == "admin":
        return Principal("root", PLATFORM, "admin")
    return Principal(f"{role}:1", tenant, role)


def memory(tenant: str, subject: str, relation: str, *, sensitive: bool = False,
           cube_id: str = "m1") -> Resource:
    return Resource(
        tenant, "memory", cube_id,
        owner=subject if relation == SELF else "person:someone",
        created_by=subject if relation == OWN else "agent:someone-else",
        labels=frozenset({"sensitive", "health"} if sensitive else {"health"}),
        shared_with=frozenset({subject} if relation == SHARED else {"agent:third"}),
    )


ADMIN = principal("admin")


@pytest.fixture
def store(database_url: str) -> Iterator[EventStore]:
    opened = EventStore.open(database_url)
    yield opened
    opened.close()


@pytest.fixture
def policy(store: EventStore) -> AccessPolicy:
    return AccessPolicy.open(store)


def denials(store: EventStore) -> list[StoredEvent]:
    return store.read_all(types=[ACCESS_DENIED], limit=None)


def replayed_rules(store: EventStore) -> Counter[tuple[str, ...]]:
    rules: Counter[tuple[str, ...]] = Counter()
    for event in store.read_stream(POLICY_STREAM):
        rules[tuple(event.payload["rule"])] += 1 if event.type == POLICY_RULE_ADDED else -1
    return rules


def table_rules(store: EventStore) -> Counter[tuple[str, ...]]:
    with store.engine.connect() as conn:
        return Counter(tuple(rule) for rule in rules_in_force(conn))


# -- the decision matrix -------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_decision_matrix(store: EventStore, policy: AccessPolicy, role: str) -> None:
    """role x action x own/other tenant x sensitive or not x relation to the memory."""
    asking = principal(role)
    denied = 0
    cases = itertools.product(ACTIONS, ("acme", "globex"), (False, True), RELATIONS)
    for number, (action, tenant, sensitive, relation) in enumerate(cases):
        resource = memory(tenant, asking.subject, relation, sensitive=sensitive,
                          cube_id=f"m{number}")
        decision = policy.check(asking, action, resource)
        in_reach = tenant == "acme" or asking.is_platform
        expected = in_reach and expected_allowed(role, action, relation, sensitive=sensitive)
        assert decision.allowed == expected, (role, action, tenant, sensitive, relation)
        if decision.allowed:
            assert decision.rules and all(rule[2] in (action, "memory.read_sensitive")
                                          for rule in decision.rules)
        else:
            denied += 1
            assert decision.denied_because == (OTHER_TENANT if not in_reach else
                                               RESTRICTED_LABEL if expected_allowed(
                                                   role, action, relation, sensitive=False)
                                               else NO_RULE)
    assert len(denials(store)) == denied


def test_a_platform_principal_acts_in_every_tenant_and_a_tenant_one_only_in_its_own(
        policy: AccessPolicy) -> None:
    officer = principal("compliance_officer", "acme")
    assert policy.check(officer, "audit.read", Resource.of_tenant("acme")).allowed
    assert not policy.check(officer, "audit.read", Resource.of_tenant("globex")).allowed
    assert not policy.check(officer, "audit.read", Resource.of_tenant(PLATFORM)).allowed
    for tenant in ("acme", "globex", PLATFORM):
        assert policy.check(ADMIN, "audit.read", Resource.of_tenant(tenant)).allowed
    platform_auditor = Principal("auditor:platform", PLATFORM, "auditor")
    assert policy.check(platform_auditor, "audit.read", Resource.of_tenant("globex")).allowed
    assert not policy.check(platform_auditor, "memory.read_content",
                            memory("globex", "auditor:platform", OWN)).allowed


def test_data_subjects_export_and_request_erasure_only_for_themselves(
        policy: AccessPolicy) -> None:
    ana = Principal("person:ana", "acme", "data_subject")
    assert policy.check(ana, "subject.export", Resource.of_subject("acme", "person:ana")).allowed
    assert not policy.check(ana, "subject.export", Resource.of_subject("acme", "person:bo")).allowed
    assert policy.check(ana, "subject.request_erasure",
                        Resource.of_subject("acme", "person:ana")).allowed
    assert not policy.check(ana, "subject.erase", Resource.of_subject("acme", "person:ana")).allowed
    assert not policy.check(ana, "subject.export",
                            Resource.of_subject("globex", "person:ana")).allowed


def test_require_raises_a_denial_that_hides_other_tenants(policy: AccessPolicy) -> None:
    agent = principal("agent")
    assert policy.require(agent, "memory.read_content", memory("acme", agent.subject, OWN)).allowed
    with pytest.raises(PermissionDenied) as own_tenant:
        policy.require(agent, "memory.rollback", memory("acme", agent.subject, OWN))
    assert not own_tenant.value.hides_existence
    with pytest.raises(PermissionDenied) as other_tenant:
        policy.require(agent, "memory.read_content", memory("globex", agent.subject, OWN))
    assert other_tenant.value.hides_existence
    assert "globex" not in str(other_tenant.value)


@pytest.mark.parametrize(("issuer", "grantable"), [
    ("tenant_admin", {"tenant_admin", "auditor", "agent"}),
    ("compliance_officer", set()),
    ("auditor", set()),
    ("agent", set()),
])
def test_a_key_never_carries_more_than_its_issuer_has(
        store: EventStore, policy: AccessPolicy, issuer: str, grantable: set[str]) -> None:
    asking = principal(issuer)
    for role in ROLES:
        assert policy.check_grant(asking, role, "acme").allowed == (role in grantable), role
        assert not policy.check_grant(asking, role, "globex").allowed
        assert not policy.check_grant(asking, role, PLATFORM).allowed
    escalations = [e for e in denials(store) if e.payload["denied_because"] == "escalation"]
    assert len(escalations) == (len(ROLES) - len(grantable) if issuer == "tenant_admin" else 0)


def test_the_platform_admin_may_issue_every_key(policy: AccessPolicy) -> None:
    for role, tenant in itertools.product(ROLES, ("acme", PLATFORM)):
        assert policy.check_grant(ADMIN, role, tenant).allowed


def test_permitted_filters_without_recording_denials(store: EventStore,
                                                     policy: AccessPolicy) -> None:
    agent = principal("agent")
    visible = [memory("acme", agent.subject, OWN, cube_id="a"),
               memory("acme", agent.subject, SHARED, cube_id="b")]
    hidden = [memory("acme", agent.subject, "unrelated", cube_id="c"),
              memory("acme", agent.subject, OWN, sensitive=True, cube_id="d"),
              memory("globex", agent.subject, OWN, cube_id="e")]
    assert policy.permitted(agent, "memory.read_content", hidden + visible) == visible
    assert denials(store) == []


def test_unknown_actions_are_refused(policy: AccessPolicy) -> None:
    with pytest.raises(InvalidCommand):
        policy.check(ADMIN, "memory.*")
    with pytest.raises(InvalidCommand):
        policy.permitted(ADMIN, "read", [])


# -- denials are audited -------------------------------------------------------------------------


def test_a_denial_is_an_event_naming_who_what_and_why_but_never_content(
        database_url: str, store: EventStore, policy: AccessPolicy) -> None:
    with MemWarden.open(database_url, actor="agent:writer") as mw:
        state = mw.add("diagnosis: hypertension", tenant="acme", owner="person:ana",
                       metadata={"labels": ["sensitive"]})
    reader = Principal("agent:reader", "acme", "agent", key_id="k123")
    decision = policy.check(reader, "memory.read_content", Resource.of_memory(state))
    assert not decision.allowed
    [event] = denials(store)
    assert (event.stream_id, event.tenant, event.actor) == ("denials:acme", "acme", "agent:reader")
    assert event.payload["action"] == "memory.read_content"
    assert event.payload["cube_id"] == state.cube_id
    assert event.payload["key_id"] == "k123"
    assert event.payload["role"] == "agent"
    assert event.payload["denied_because"] == NO_RULE
    assert event.payload["reason"] == decision.explanation
    assert event.payload["policy_revision"] == store.stream_version(POLICY_STREAM)
    assert "hypertension" not in json.dumps(dict(event.payload))

    writer = Principal("agent:writer", "acme", "agent")
    assert not policy.check(writer, "memory.read_content", Resource.of_memory(state)).allowed
    assert denials(store)[-1].payload["denied_because"] == RESTRICTED_LABEL


def test_a_memory_resource_carries_what_the_policy_needs(database_url: str) -> None:
    with MemWarden.open(database_url, actor="agent:writer") as mw:
        state = mw.add("likes tea", tenant="acme", owner="person:ana",
                       metadata={"labels": ["health"]})
    resource = Resource.of_memory(state)
    assert (resource.tenant, resource.kind, resource.id) == ("acme", "memory", state.cube_id)
    assert (resource.owner, resource.created_by) == ("person:ana", "agent:writer")
    assert resource.labels == {"health"} and not resource.restricted
    shared = replace(state, metadata={**state.metadata, "shared_with": ["agent:reader"]})
    assert Resource.of_memory(shared).shared_with == {"agent:reader"}
    garbled = replace(state, metadata={**state.metadata, "shared_with": "agent:reader"})
    assert Resource.of_memory(garbled).shared_with == frozenset()


def test_a_cross_tenant_attempt_is_recorded_at_platform_level(store: EventStore,
                                                               policy: AccessPolicy) -> None:
    intruder = principal("tenant_admin", "acme")
    policy.check(intruder, "memory.read_content", memory("globex", "x", OWN, cube_id="guessed"))
    [event] = denials(store)
    assert (event.stream_id, event.tenant) == ("denials", None)
    assert event.payload["denied_because"] == OTHER_TENANT
    assert "globex" not in json.dumps(dict(event.payload))


def test_allowed_decisions_append_nothing(store: EventStore, policy: AccessPolicy) -> None:
    head = store.head_position()
    policy.check(ADMIN, "memory.read_content", memory("acme", "root", "unrelated"))
    assert store.head_position() == head


def test_a_denial_that_cannot_be_recorded_fails_the_request(store: EventStore) -> None:
    def broken_projection(*_: object) -> None:
        raise RuntimeError("projection failed")

    policy = AccessPolicy.open(store)
    failing = AccessPolicy(store, then=broken_projection)
    with pytest.raises(RuntimeError):
        failing.check(principal("agent"), "audit.read")
    assert denials(store) == []
    assert policy.check(ADMIN, "audit.read").allowed


# -- rules as data and events --------------------------------------------------------------------


def test_first_start_seeds_the_default_policy_once(store: EventStore,
                                                   policy: AccessPolicy) -> None:
    seeded = store.read_stream(POLICY_STREAM)
    assert seeded and {e.type for e in seeded} == {POLICY_RULE_ADDED}
    assert {e.actor for e in seeded} == {"memwarden"}
    AccessPolicy.open(store)
    assert len(store.read_stream(POLICY_STREAM)) == len(seeded)
    assert table_rules(store) == +replayed_rules(store)
    assert len(policy.list_rules(ADMIN)) == len(seeded)


def test_rows_that_no_event_put_there_are_not_in_force(database_url: str) -> None:
    store = EventStore.open(database_url)
    with store.engine.begin() as conn:
        policy_rules.metadata.create_all(conn)
        conn.execute(policy_rules.insert().values(
            ptype="p", v0="agent", v1="*", v2="memory.read_sensitive", v3="any"))
    policy = AccessPolicy.open(store)
    assert ("p", "agent", "*", "memory.read_sensitive", "any") not in table_rules(store)
    assert not policy.check(principal("agent"), "memory.read_sensitive",
                            memory("acme", "agent:1", OWN)).allowed
    store.close()


def test_a_rule_change_is_an_event_with_actor_and_reason_and_applies_at_once(
        store: EventStore, policy: AccessPolicy) -> None:
    auditor = principal("auditor")
    rule = PolicyRule.permission("auditor", "acme", "memory.read_content", "any")
    target = memory("acme", auditor.subject, "unrelated")
    assert not policy.check(auditor, "memory.read_content", target).allowed

    revision = policy.add_rule(ADMIN, rule, reason="incident review")
    event = store.read_stream(POLICY_STREAM)[-1]
    assert (event.type, event.actor, event.tenant) == (POLICY_RULE_ADDED, "root", "acme")
    assert event.payload == {"rule": rule.fields(), "reason": "incident review"}
    assert revision == event.stream_version
    assert policy.check(auditor, "memory.read_content", target).allowed
    assert rule in policy.list_rules(ADMIN)

    policy.remove_rule(ADMIN, rule, reason="review closed")
    event = store.read_stream(POLICY_STREAM)[-1]
    assert (event.type, event.payload["reason"]) == (POLICY_RULE_REMOVED, "review closed")
    assert not policy.check(auditor, "memory.read_content", target).allowed
    assert table_rules(store) == +replayed_rules(store)


def test_rule_changes_that_change_nothing_are_refused_without_an_event(
        store: EventStore, policy: AccessPolicy) -> None:
    seeded = PolicyRule.permission("agent", "*", "memory.create", "own")
    absent = PolicyRule.permission("agent", "acme", "audit.read", "any")
    version = store.stream_version(POLICY_STREAM)
    with pytest.raises(StateConflict):
        policy.add_rule(ADMIN, seeded, reason="again")
    with pytest.raises(NotFound):
        policy.remove_rule(ADMIN, absent, reason="never there")
    with pytest.raises(InvalidCommand):
        policy.add_rule(ADMIN, absent, reason="  ")
    assert store.stream_version(POLICY_STREAM) == version


def test_when_the_transaction_fails_neither_the_event_nor_the_rule_exists(
        store: EventStore, policy: AccessPolicy) -> None:
    def broken_projection(*_: object) -> None:
        raise RuntimeError("projection failed")

    rule = PolicyRule.permission("agent", "acme", "audit.read", "any")
    version, rules = store.stream_version(POLICY_STREAM), table_rules(store)
    with pytest.raises(RuntimeError):
        AccessPolicy(store, then=broken_projection).add_rule(ADMIN, rule, reason="r")
    assert store.stream_version(POLICY_STREAM) == version
    assert table_rules(store) == rules
    assert not policy.check(principal("agent"), "audit.read").allowed


def test_managing_rules_is_itself_governed_and_scoped_to_the_tenant(
        store: EventStore, policy: AccessPolicy) -> None:
    officer = principal("compliance_officer", "acme")
    acme_rule = PolicyRule.permission("agent", "acme", "audit.read", "any")
    with pytest.raises(PermissionDenied):
        policy.add_rule(officer, acme_rule, reason="self-service")
    assert denials(store)[-1].payload["action"] == "policy.manage"

    policy.add_rule(ADMIN, PolicyRule.permission("compliance_officer", "acme", "policy.manage",
                                                 "any"), reason="delegate acme's rules")
    policy.add_rule(officer, acme_rule, reason="agents may read acme's audit")
    for foreign in (PolicyRule.permission("agent", "globex", "audit.read", "any"),
                    PolicyRule.permission("agent", PLATFORM, "audit.read", "any"),
                    PolicyRule.inheritance("agent", "admin", PLATFORM)):
        with pytest.raises(PermissionDenied):
            policy.add_rule(officer, foreign, reason="overreach")

    globex_rule = PolicyRule.permission("auditor", "globex", "memory.read_content", "any")
    policy.add_rule(ADMIN, globex_rule, reason="globex asked")
    listed = policy.list_rules(officer)
    assert acme_rule in listed and globex_rule not in listed
    assert all(rule.tenant in ("acme", PLATFORM) for rule in listed)
    assert globex_rule in policy.list_rules(ADMIN)


def test_role_inheritance_can_be_granted_per_tenant(policy: AccessPolicy) -> None:
    acme_agent, globex_agent = principal("agent", "acme"), principal("agent", "globex")
    policy.add_rule(ADMIN, PolicyRule.inheritance("agent", "auditor", "acme"), reason="pilot")
    assert policy.check(acme_agent, "audit.read").allowed
    assert not policy.check(globex_agent, "audit.read").allowed


# -- every process sees a change at its next request ----------------------------------------------


@pytest.fixture
def other_store(database_url: str) -> Iterator[EventStore]:
    """A second handle on the same database, as another instance of the service would have."""
    opened = EventStore.open(database_url)
    yield opened
    opened.close()


def test_another_instance_sees_a_change_at_its_next_decision(
        policy: AccessPolicy, other_store: EventStore) -> None:
    other = AccessPolicy.open(other_store)
    agent = principal("agent")
    assert not other.check(agent, "audit.read").allowed
    policy.add_rule(ADMIN, PolicyRule.permission("agent", "acme", "audit.read", "any"), reason="r")
    assert other.check(agent, "audit.read").allowed
    policy.remove_rule(ADMIN, PolicyRule.permission("agent", "acme", "audit.read", "any"),
                       reason="r")
    assert not other.check(agent, "audit.read").allowed


_CHILD = """
import sys
from eventstore import EventStore
from governance._policy import AccessPolicy
from governance._principal import Principal

policy = AccessPolicy.open(EventStore.open(sys.argv[1]))
agent = Principal("agent:1", "acme", "agent")
for _ in sys.stdin:
    print(policy.check(agent, "audit.read").allowed, flush=True)
"""


def test_another_process_sees_a_change_at_its_next_decision(database_url: str,
                                                            policy: AccessPolicy) -> None:
    with subprocess.Popen([sys.executable, "-c", _CHILD, database_url], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as child:
        assert child.stdin is not None and child.stdout is not None

        def ask() -> str:
            child.stdin.write("check\n")
            child.stdin.flush()
            return child.stdout.readline().strip()

        assert ask() == "False"
        policy.add_rule(ADMIN, PolicyRule.permission("agent", "acme", "audit.read", "any"),
                        reason="r")
        assert ask() == "True"
        child.stdin.close()
        assert child.wait(timeout=60) == 0


def test_decisions_racing_a_change_are_old_or_new_and_new_once_it_committed(
        policy: AccessPolicy) -> None:
    agent = principal("agent")
    rule = PolicyRule.permission("agent", "acme", "audit.read", "any")
    committed = threading.Event()
    wrong: list[str] = []

    def decide_repeatedly() -> None:
        for _ in range(50):
            seen_committed = committed.is_set()
            decision = policy.check(agent, "audit.read")
            if seen_committed and not decision.allowed:
                wrong.append(f"denied after the change committed (revision {decision.revision})")

    threads = [threading.Thread(target=decide_repeatedly) for _ in range(4)]
    for thread in threads:
        thread.start()
    policy.add_rule(ADMIN, rule, reason="r")
    committed.set()
    for thread in threads:
        thread.join()
    assert wrong == []
    assert policy.check(agent, "audit.read").allowed


# -- bad input never widens access ----------------------------------------------------------------

CRAFTED = [
    "", " agent:1", "agent:1 ", "a b", "acme*", "**", "a,b", "a, b", 'a"b', "a'b", "a;b", "a=b",
    "a(b)", "[a]", "p.dom == r.dom", "x' OR '1'='1", "x); DROP TABLE events; --",
    "agent\n", "ag\x00ent", "ag\u200bent", "\u0430dmin", "\uff41dmin", "ﬁle", "a\u0301",
    "admin\u202e", "a" * 201, "#agent", "ac/me", "ac\\me", "ac%me", "ac_me%",
]


@pytest.mark.parametrize("crafted", CRAFTED)
def test_crafted_names_are_refused_as_subjects_tenants_and_rule_fields(crafted: str) -> None:
    for make in (lambda: Principal(crafted, "acme", "agent"),
                 lambda: Principal("agent:1", crafted, "agent"),
                 lambda: Principal("agent:1", "acme", crafted),
                 lambda: PolicyRule.permission("agent", crafted, "memory.read_content", "own"),
                 lambda: PolicyRule.permission(crafted, "acme", "memory.read_content", "own"),
                 lambda: PolicyRule.inheritance("agent", crafted, "acme")):
        with pytest.raises(InvalidCommand):
            make()


@pytest.mark.parametrize("literal", ["r.sub", "r.dom", "p.role", "g", "and", "true", "1"])
def test_plain_names_that_look_like_matcher_terms_are_only_themselves(
        policy: AccessPolicy, literal: str) -> None:
    intruder = Principal(literal, literal, "tenant_admin")
    assert not policy.check(intruder, "audit.read", Resource.of_tenant("acme")).allowed
    agent = Principal(literal, "acme", "agent")
    assert not policy.check(agent, "memory.read_content",
                            memory("acme", "agent:1", OWN)).allowed
    assert policy.check(agent, "memory.read_content", memory("acme", literal, OWN)).allowed


def test_the_platform_wildcard_is_a_tenant_and_nothing_else() -> None:
    assert Principal("root", PLATFORM, "admin").is_platform
    assert PolicyRule.permission("agent", PLATFORM, "audit.read", "any").tenant == PLATFORM
    for make in (lambda: Principal(PLATFORM, "acme", "agent"),
                 lambda: Principal("root", "acme", PLATFORM),
                 lambda: PolicyRule.inheritance(PLATFORM, "agent", "acme")):
        with pytest.raises(InvalidCommand):
            make()


@pytest.mark.parametrize("fields", [
    ["p", "agent", "acme", "memory.read_content", "any", "extra"],
    ["p", "agent", "acme", "memory.read_content"],
    ["p", "agent", "acme", "memory.*", "any"],
    ["p", "agent", "acme", "*", "any"],
    ["p", "agent", "acme", "memory.read_content", "*"],
    ["p", "agent", "acme", "memory.read_content", "any || true"],
    ["g", "agent", "agent", "acme"],
    ["g", "agent", "admin"],
    ["p2", "agent", "acme", "memory.read_content", "any"],
    ["P", "agent", "acme", "memory.read_content", "any"],
    [" p", "agent", "acme", "memory.read_content", "any"],
    ["p", "Agent", "acme", "memory.read_content", "any"],
    ["p", "agent", "acme", "memory.read_content ", "any"],
    "p, agent, acme, memory.read_content, any",
    [],
])
def test_malformed_rules_are_refused(fields: list[str]) -> None:
    with pytest.raises(InvalidCommand):
        PolicyRule.parse(fields)


@pytest.mark.parametrize("tenant", ["Ñandú", "東京", "ana@example.org", "acme.eu-1", "x+y:z_w"])
def test_unusual_but_plain_names_round_trip_through_the_database_literally(
        store: EventStore, policy: AccessPolicy, tenant: str) -> None:
    rule = PolicyRule.permission("agent", tenant, "audit.read", "any")
    before = len(policy.list_rules(ADMIN))
    policy.add_rule(ADMIN, rule, reason="r")
    fresh = AccessPolicy.open(store)
    after = fresh.list_rules(ADMIN)
    assert len(after) == before + 1 and rule in after
    assert fresh.check(Principal("agent:1", tenant, "agent"), "audit.read").allowed
    assert not fresh.check(Principal("agent:1", "acme", "agent"), "audit.read").allowed


@st.composite
def disguised(draw: st.DrawFn, word: str) -> str:
    """``word`` with random case, look-alike letters, compatibility forms and blanks."""
    look_alikes = {"s": "\u0455", "e": "\u0435", "i": "\u0456", "a": "\u0430", "n": "\u0578"}
    accented = {"e": "\u00e9", "i": "\u0130", "s": "\u0161", "n": "\u00f1", "a": "\u00e0"}
    letters = []
    for ch in word:
        form = draw(st.sampled_from(["same", "upper", "fullwidth", "look-alike", "accented",
                                     "combining"]))
        if form == "upper":
            ch = ch.upper()
        elif form == "accented":
            ch = accented.get(ch, ch)
        elif form == "combining":
            ch += "\u0301"
        elif form == "fullwidth":
            ch = chr(ord(ch) - ord("a") + 0xFF41)
        elif form == "look-alike":
            ch = look_alikes.get(ch, ch)
        letters.append(ch)
    pad = draw(st.sampled_from(["", " ", "\t", "\u200b", "\u00a0"]))
    return pad + "".join(letters) + draw(st.sampled_from(["", pad]))


_NO_SHARED_STATE = settings(max_examples=60, deadline=None,
                            suppress_health_check=[HealthCheck.function_scoped_fixture])


@_NO_SHARED_STATE
@given(label=disguised("sensitive"))
def test_a_disguised_sensitive_label_still_restricts(policy: AccessPolicy, label: str) -> None:
    assert is_restricted_label(label)
    agent = principal("agent")
    resource = Resource("acme", "memory", "m", created_by=agent.subject, labels=frozenset({label}))
    assert policy.permitted(agent, "memory.read_content", [resource]) == []


@_NO_SHARED_STATE
@given(label=st.text(max_size=30))
def test_any_label_is_either_plain_or_restricting(policy: AccessPolicy, label: str) -> None:
    agent = principal("agent")
    resource = Resource("acme", "memory", "m", created_by=agent.subject, labels=frozenset({label}))
    readable = bool(policy.permitted(agent, "memory.read_content", [resource]))
    assert readable == (not is_restricted_label(label))
    if readable:
        assert name_problem(label) is None and label.casefold() != "sensitive"


@_NO_SHARED_STATE
@given(tenant=st.text(max_size=30), role=st.sampled_from(ROLES))
def test_no_crafted_tenant_reaches_another_tenant(policy: AccessPolicy, tenant: str,
                                                  role: str) -> None:
    if tenant in ("victim", PLATFORM):
        return
    try:
        asking = Principal("someone", tenant, role)
    except InvalidCommand:
        return
    victim = Resource("victim", "memory", "m", owner="someone", created_by="someone",
                      shared_with=frozenset({"someone"}))
    for action in ACTIONS:
        assert policy.permitted(asking, action, [victim, Resource.of_tenant("victim")]) == []


@_NO_SHARED_STATE
@given(subject=st.text(max_size=30))
def test_no_crafted_subject_reaches_another_subjects_memory(policy: AccessPolicy,
                                                            subject: str) -> None:
    if subject in ("agent:alice", "person:pat", "agent:bob"):
        return
    try:
        agent = Principal(subject, "acme", "agent")
        person = Principal(subject, "acme", "data_subject")
    except InvalidCommand:
        return
    alices = Resource("acme", "memory", "m", owner="person:pat", created_by="agent:alice",
                      shared_with=frozenset({"agent:bob"}))
    for action in ACTIONS:
        for asking in (agent, person):
            if ANY in EXPECTED[asking.role].get(action, set()):
                continue  # granted tenant-wide: not a matter of who the memory is about
            assert policy.permitted(asking, action, [alices]) == []


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=40))
def test_every_accepted_name_is_plain(name: str) -> None:
    if name_problem(name) is not None:
        return
    assert name == name.strip() and "*" not in name and "," not in name
    assert all(ch.isalnum() or ch in "-_.:@+" for ch in name)


# -- processes starting together on a fresh database -----------------------------------------


def test_policies_opened_together_on_a_fresh_postgres_schema_seed_once(postgres_url: str) -> None:
    """API, projectors and workers start at the same moment on a new database: each creates the
    rules table and tries to seed the default policy; all must open, and the seed land once."""
    stores = [EventStore.open(postgres_url) for _ in range(4)]
    start = threading.Barrier(len(stores))
    failures: list[str] = []

    def open_policy(store: EventStore) -> None:
        start.wait()
        try:
            AccessPolicy.open(store)
        except Exception as error:  # every failure is the finding
            failures.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=open_policy, args=(store,)) for store in stores]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert failures == []
        seeded = replayed_rules(stores[0])
        assert seeded and set(seeded.values()) == {1}  # each default rule added exactly once
        assert table_rules(stores[0]) == seeded
    finally:
        for store in stores:
            store.close()
