"""Retention rules as data (issue 6): the policy file, rule precedence, the decay formula and the
schedule, without a database. The workers, over a real database, are in
``test_retention_worker.py``; the CLI and REST surfaces in ``test_retention_surfaces.py``."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from governance._retention import (
    DEFAULT_POLICY_PATH,
    ActiveHolds,
    RetentionPolicy,
    RetentionPolicyError,
    actions_due,
    decay_base,
    decay_score,
    decays_at,
    schedule_for,
)
from projections._retention import RetentionFacts

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NO_HOLDS = ActiveHolds({}, {}, {})


def facts(**changes: object) -> RetentionFacts:
    base = RetentionFacts(
        cube_id="m-1", tenant="acme", owner="user:ana", kind="plaintext", semantic_type="fact",
        source="user", retention_class="standard", labels=(), pii=(), ttl_seconds=None,
        priority=5, state="active", tier="working", erased=False, decayed=False, read_count=0,
        created_at=T0, last_active_at=T0, version=1, content_version=1, position=1)
    return replace(base, **changes)


def test_the_shipped_policy_is_valid_and_names_its_rules() -> None:
    policy = RetentionPolicy.load(DEFAULT_POLICY_PATH)
    assert [r.name for r in policy.rules][-1] == "default"
    assert policy.rule_named("clinical-records").erase_after == timedelta(days=3650)


# -- validation: every error names the line and the field ---------------------------------------

BAD_POLICIES = [
    ("rules:\n  - name: a\n    ttl: 3 fortnights\n", 3, "rules[0] (a).ttl",
     "is not a duration"),
    ("rules:\n  - name: a\n    ttl: 30d\n    colour: red\n", 4, "rules[0] (a).colour",
     "unknown field"),
    ("rules:\n  - name: a\n    ttl: 30d\n  - name: b\n    match:\n      tenat: acme\n"
     "    ttl: 1d\n", 6, "rules[1] (b).match.tenat", "unknown field"),
    ("rules:\n  - name: a\n    tiers:\n      long_term_after: 90d\n"
     "      cold_archive_after: 30d\n", 5, "rules[0] (a).tiers.cold_archive_after",
     "must be longer than long_term_after"),
    ("rules:\n  - name: a\n    decay:\n      half_life: 30d\n      threshold: 2\n", 5,
     "rules[0] (a).decay.threshold", "between 0 and 1"),
    ("rules:\n  - name: a\n    decay:\n      threshold: 0.2\n", 4, "rules[0] (a).decay",
     "needs a half_life"),
    ("rules:\n  - name: a\n    match:\n      tenant: acme\n", 2, "rules[0] (a)",
     "gives no action"),
    ("rules:\n  - name: a\n    ttl: 1d\n  - name: a\n    ttl: 2d\n", 4, "rules",
     "already used by the rule on line 2"),
    ("rules:\n  - ttl: 1d\n", 2, "rules[0]", "needs a name"),
    ("rules:\n  - name: a\n    ttl: 0d\n", 3, "rules[0] (a).ttl", "longer than zero"),
    ("rules:\n  - name: a\n    ttl: [1d, 2d]\n", 3, "rules[0] (a).ttl", "single value"),
    ("rules: {name: a}\n", 1, "rules", "must be a list"),
    ("version: 2\nrules: []\n", 1, "version", "only version 1"),
    ("rules:\n  - name: a\n    ttl: 1d\n   bad: indent\n", 4, "", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "line", "field", "problem"), BAD_POLICIES,
                         ids=[case[3] for case in BAD_POLICIES])
def test_an_invalid_policy_is_refused_naming_line_and_field(
        text: str, line: int, field: str, problem: str) -> None:
    with pytest.raises(RetentionPolicyError) as caught:
        RetentionPolicy.parse(text, source="retention.yaml")
    message = str(caught.value)
    assert message.startswith(f"retention.yaml:{line}: "), message
    assert field in message and problem in message, message


def test_an_empty_policy_says_what_it_needs() -> None:
    with pytest.raises(RetentionPolicyError, match="needs a 'rules:' list"):
        RetentionPolicy.parse("# nothing here\n", source="retention.yaml")


def test_durations_and_match_values_parse() -> None:
    policy = RetentionPolicy.parse(
        "rules:\n  - name: a\n    match:\n      tenant: acme\n      labels: [x, y]\n"
        "    ttl: 90s\n    erase_after: 2w\n    tiers: {long_term_after: 12h}\n"
        "    decay: {half_life: 1y}\n")
    rule = policy.rules[0]
    assert rule.match.tenant == frozenset({"acme"})
    assert rule.match.labels == frozenset({"x", "y"})
    assert (rule.ttl, rule.erase_after, rule.long_term_after) == (
        timedelta(seconds=90), timedelta(days=14), timedelta(hours=12))
    assert rule.decay is not None and rule.decay.half_life == timedelta(days=365)
    assert rule.decay.threshold == 0.1
    assert rule.line == 2


def test_the_digest_changes_with_the_rules_but_not_with_comments() -> None:
    a = RetentionPolicy.parse("rules:\n  - name: a\n    ttl: 30d\n")
    commented = RetentionPolicy.parse("# why\n\nrules:\n  - name: a   # the one\n    ttl: 30d\n")
    b = RetentionPolicy.parse("rules:\n  - name: a\n    ttl: 31d\n")
    assert a.digest == commented.digest != b.digest


# -- precedence -----------------------------------------------------------------------------------

PRECEDENCE = """
rules:
  - name: medical-pii
    match: {pii: [MEDICAL_RECORD_NUMBER], tenant: acme}
    ttl: 7d
  - name: sensitive
    match: {labels: [sensitive, secret]}
    ttl: 30d
  - name: inferred-preferences
    match: {source: inference, semantic_type: [preference]}
    ttl: 60d
  - name: everything
    ttl: 365d
"""


@pytest.mark.parametrize(("changes", "rule"), [
    ({}, "everything"),
    ({"labels": ("secret",)}, "sensitive"),
    ({"labels": ("other",)}, "everything"),
    ({"pii": ("MEDICAL_RECORD_NUMBER",), "labels": ("sensitive",)}, "medical-pii"),
    ({"pii": ("MEDICAL_RECORD_NUMBER",), "tenant": "globex"}, "everything"),
    ({"source": "inference", "semantic_type": "preference"}, "inferred-preferences"),
    ({"source": "inference", "semantic_type": "fact"}, "everything"),
    ({"source": "inference", "semantic_type": "preference", "labels": ("sensitive",)},
     "sensitive"),
])
def test_the_first_matching_rule_governs(changes: dict[str, object], rule: str) -> None:
    policy = RetentionPolicy.parse(PRECEDENCE)
    found = policy.rule_for(facts(**changes))
    assert found is not None and found.name == rule


def test_rule_order_decides_between_two_matching_rules() -> None:
    swapped = RetentionPolicy.parse(
        "rules:\n  - name: everything\n    ttl: 365d\n"
        "  - name: sensitive\n    match: {labels: [sensitive]}\n    ttl: 30d\n")
    found = swapped.rule_for(facts(labels=("sensitive",)))
    assert found is not None and found.name == "everything"


def test_the_write_s_own_ttl_wins_over_the_rule_s() -> None:
    rule = RetentionPolicy.parse(PRECEDENCE).rule_named("everything")
    assert schedule_for(facts(), rule).expire_at == T0 + timedelta(days=365)
    own = facts(ttl_seconds=3600)
    assert schedule_for(own, rule).expire_at == T0 + timedelta(hours=1)
    assert schedule_for(own, None).expire_at == T0 + timedelta(hours=1)  # even with no rule
    due = actions_due(own, rule, T0 + timedelta(hours=2), NO_HOLDS)
    assert [(a.action, a.rule) for a in due] == [("expire", None)]
    assert "the write's ttl_seconds" in due[0].explain()


# -- the decay score ------------------------------------------------------------------------------


def test_the_decay_formula_is_the_documented_one() -> None:
    # base = 0.2 + 0.5 * priority / 10 + 0.3 * reads / (reads + 5)
    assert decay_base(0, 0) == pytest.approx(0.2)
    assert decay_base(10, 0) == pytest.approx(0.7)
    assert decay_base(5, 5) == pytest.approx(0.2 + 0.25 + 0.15)
    assert decay_base(10, 10**9) == pytest.approx(1.0, abs=1e-6)
    half_life = timedelta(days=30)
    memory = facts(priority=8, read_count=15)  # base 0.2 + 0.4 + 0.225 = 0.825
    assert decay_score(memory, half_life, T0) == pytest.approx(0.825)
    assert decay_score(memory, half_life, T0 + half_life) == pytest.approx(0.4125)
    assert decay_score(memory, half_life, T0 + 2 * half_life) == pytest.approx(0.20625)


def test_decay_falls_due_when_the_score_crosses_the_threshold() -> None:
    rule = RetentionPolicy.parse(
        "rules:\n  - name: d\n    decay: {half_life: 30d, threshold: 0.25}\n").rules[0]
    assert rule.decay is not None
    memory = facts(priority=5, read_count=0)  # base 0.45
    moment = decays_at(memory, rule.decay)
    assert moment - T0 == timedelta(days=30) * math.log2(0.45 / 0.25)
    assert decay_score(memory, rule.decay.half_life, moment) == pytest.approx(0.25)
    assert actions_due(memory, rule, moment - timedelta(minutes=1), NO_HOLDS) == []
    [decayed] = actions_due(memory, rule, moment + timedelta(days=1), NO_HOLDS)
    assert decayed.action == "decay" and decayed.detail["score"] < 0.25
    # Used more, it decays later; important, later still.
    assert decays_at(facts(read_count=20), rule.decay) > moment
    assert decays_at(facts(priority=10), rule.decay) > moment
    # Already below the threshold when last used: due at once.
    weak = RetentionPolicy.parse(
        "rules:\n  - name: d\n    decay: {half_life: 30d, threshold: 0.5}\n").rules[0]
    assert weak.decay is not None
    assert decays_at(facts(priority=0), weak.decay) == T0


# -- tiers, expiry, holds -------------------------------------------------------------------------

TIERS = """
rules:
  - name: tiers
    tiers: {long_term_after: 30d, cold_archive_after: 90d}
    ttl: 400d
    erase_after: 500d
"""


def test_tier_moves_follow_idleness_and_skip_ahead_when_late() -> None:
    rule = RetentionPolicy.parse(TIERS).rules[0]
    assert schedule_for(facts(), rule).tier_at == T0 + timedelta(days=30)
    assert schedule_for(facts(tier="long_term"), rule).tier_at == T0 + timedelta(days=90)
    assert schedule_for(facts(tier="cold_archive"), rule).tier_at is None
    # A read on day 20 restarts the idle clock.
    assert schedule_for(facts(last_active_at=T0 + timedelta(days=20)), rule).tier_at == (
        T0 + timedelta(days=50))
    # A worker that was down for 100 days moves a working memory straight to the cold archive.
    [move] = actions_due(facts(), rule, T0 + timedelta(days=100), NO_HOLDS)
    assert (move.detail["from_tier"], move.detail["to_tier"]) == ("working", "cold_archive")


def test_an_expired_or_deleted_memory_only_awaits_erasure() -> None:
    rule = RetentionPolicy.parse(TIERS).rules[0]
    for state in ("expired", "deleted"):
        due = schedule_for(facts(state=state), rule)
        assert (due.expire_at, due.tier_at, due.decay_at) == (None, None, None)
        assert due.erase_at == T0 + timedelta(days=500)
    assert schedule_for(facts(erased=True, state="expired"), rule).due_at is None


def test_a_hold_blocks_expiry_cold_archive_and_erasure_but_not_long_term() -> None:
    rule = RetentionPolicy.parse(TIERS).rules[0]
    memory = facts()
    for holds in (ActiveHolds({"m-1": "h1"}, {}, {}),
                  ActiveHolds({}, {("acme", "user:ana"): "h1"}, {}),
                  ActiveHolds({}, {}, {"acme": "h1"})):
        late = actions_due(memory, rule, T0 + timedelta(days=600), holds)
        assert {(a.action, a.held_by) for a in late} == {
            ("erase", "h1"), ("expire", "h1"), ("tier", "h1")}
        early = actions_due(memory, rule, T0 + timedelta(days=40), holds)
        assert [(a.action, a.detail["to_tier"], a.held_by) for a in early] == [
            ("tier", "long_term", None)]
    other_owner = ActiveHolds({}, {("acme", "user:bo"): "h1"}, {"globex": "h2"})
    assert all(a.held_by is None
               for a in actions_due(memory, rule, T0 + timedelta(days=600), other_owner))
