"""How well the sensitive data scanner finds what it should, and how fast (issue #5, item 6).

A labelled corpus is generated with Faker, seeded, so every run scores the same texts: natural
sentences holding names, e-mail addresses, phone numbers, credit card numbers, IBANs, IP
addresses, postal addresses, dates and the policy's custom identifiers, and sentences holding
only look-alikes that are none of those (card numbers failing the Luhn check, IBANs with wrong
check digits, version numbers, retina image names, order and ISBN numbers, company names...).
Phone numbers are Faker's, kept only when they could be assigned: Faker invents area codes that
do not exist, and no one's real number has one.

Precision and recall are counted per entity type over what the shipped policy keeps
(``PiiPolicy.decide``), the findings a write would record: a found span matches a labelled span
of the same type when the two overlap.

Throughput: texts per second scanning one text per call (as a single write does), and the whole
corpus in one batched call (as bulk writes and imports do), with the latency of one-text scans.

Write path: the latency of ``MemWarden.add`` end to end (scan, seal the text under the memory's
key, append, project) on an embedded SQLite database, with scanning on and with it off
(``MEMWARDEN_PII_SCAN=0``): the difference is what detection costs a write; sealing is in both,
and its own cost (AES-256-GCM on each text) is printed last.

    python -m bench [--full] pii
"""

from __future__ import annotations

import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import phonenumbers
from faker import Faker
from rich.console import Console
from rich.table import Table

from governance import MemWarden, Settings
from governance._keyvault import MemoryKey, open_sealed, seal
from governance._pii import Finding, PiiPolicy, PresidioScanner, SensitiveDataBlocked

SEED = 5
RECALL_TARGETS = {
    "EMAIL_ADDRESS": 0.95, "PHONE_NUMBER": 0.95, "CREDIT_CARD": 0.95, "IBAN_CODE": 0.95,
    "IP_ADDRESS": 0.95, "PERSON": 0.80,
}


@dataclass(frozen=True, slots=True)
class LabelledText:
    text: str
    spans: tuple[tuple[int, int, str], ...]
    """(start, end, entity type) of every sensitive value in ``text``."""


Part = str | tuple[str, str]
"""Plain words, or (entity type, value)."""


def compose(*parts: Part) -> LabelledText:
    text, spans = "", []
    for part in parts:
        if isinstance(part, str):
            text += part
        else:
            entity_type, value = part
            spans.append((len(text), len(text) + len(value), entity_type))
            text += value
    return LabelledText(text, tuple(spans))


# -- sensitive values, as people write them ----------------------------------------------------

class Values:
    """Realistic values of each entity type, drawn from Faker with a fixed seed."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.us = Faker("en_US")
        self.gb = Faker("en_GB")
        self.iban_locales = [Faker(locale) for locale in
                             ("de_DE", "fr_FR", "nl_NL", "en_GB", "es_ES", "it_IT")]
        for n, fake in enumerate([self.us, self.gb, *self.iban_locales]):
            fake.seed_instance(seed + n)

    def person(self) -> str:
        fake = self.random.choice([self.us, self.us, self.gb])
        return f"{fake.first_name()} {fake.last_name()}"

    def email(self) -> str:
        return self.random.choice([self.us.email, self.us.company_email, self.us.free_email])()

    def phone(self) -> str:
        # Faker invents area codes that no one has; keep only numbers that could be assigned.
        fake, region = self.random.choice([(self.us, "US"), (self.us, "US"), (self.gb, "GB")])
        while True:
            number = fake.phone_number()
            try:
                if phonenumbers.is_valid_number(phonenumbers.parse(number, region)):
                    return number
            except phonenumbers.NumberParseException:
                continue

    def credit_card(self) -> str:
        digits = self.us.credit_card_number(
            self.random.choice(["visa16", "mastercard", "amex", "discover"]))
        return self.random.choice([digits, _grouped(digits, " "), _grouped(digits, "-")])

    def iban(self) -> str:
        code = self.random.choice(self.iban_locales).iban()
        return self.random.choice([code, _grouped(code, " ")])

    def ip(self) -> str:
        return self.random.choice([self.us.ipv4_public, self.us.ipv4_private, self.us.ipv6])()

    def address(self) -> str:
        return self.us.address().replace("\n", ", ")

    def date(self) -> str:
        day = self.us.date_of_birth(minimum_age=1, maximum_age=90)
        return day.strftime(self.random.choice(["%B %d, %Y", "%d %B %Y", "%Y-%m-%d", "%m/%d/%Y"]))

    def employee_id(self) -> str:
        return f"EMP-{self.random.randrange(10**6):06d}"

    def record_number(self) -> str:
        return f"MRN-{self.random.randrange(10**7, 10**8)}"

    # look-alikes ----------------------------------------------------------------------------

    def luhn_invalid_card(self) -> str:
        digits = self.us.credit_card_number(self.random.choice(["visa16", "mastercard"]))
        wrong = str((int(digits[-1]) + self.random.randrange(1, 10)) % 10)
        return _grouped(digits[:-1] + wrong, " ")

    def iban_with_wrong_check_digits(self) -> str:
        code = self.random.choice(self.iban_locales).iban()
        check = self.random.choice([n for n in range(2, 99) if n != int(code[2:4])])
        return f"{code[:2]}{check:02d}{code[4:]}"

    def version(self) -> str:
        return ".".join(str(self.random.randrange(0, 20)) for _ in range(3))

    def company(self) -> str:
        return self.us.company()

    def order_number(self) -> str:
        return str(self.random.randrange(10**7, 10**8))


def _grouped(code: str, separator: str) -> str:
    return separator.join(code[i:i + 4] for i in range(0, len(code), 4))


Template = Callable[[Values], tuple[Part, ...]]

POSITIVES: list[Template] = [
    lambda v: ("Please send the signed lease to ", ("EMAIL_ADDRESS", v.email()),
               " before the viewing."),
    lambda v: (("PERSON", v.person()), " asked us to call back on ",
               ("PHONE_NUMBER", v.phone()), "."),
    lambda v: ("The guest paid the deposit with card ", ("CREDIT_CARD", v.credit_card()), "."),
    lambda v: ("Her salary is paid into IBAN ", ("IBAN_CODE", v.iban()), " as usual."),
    lambda v: ("The suspicious login came from ", ("IP_ADDRESS", v.ip()), " overnight."),
    lambda v: (("PERSON", v.person()), " has moved to ", ("LOCATION", v.address()), "."),
    lambda v: ("The user was born on ", ("DATE_TIME", v.date()), " according to the form."),
    lambda v: ("Reach me at ", ("PHONE_NUMBER", v.phone()), " or write to ",
               ("EMAIL_ADDRESS", v.email()), "."),
    lambda v: ("I met ", ("PERSON", v.person()), " at the conference and we got along well."),
    lambda v: ("Refund the order to ", ("CREDIT_CARD", v.credit_card()), " and tell ",
               ("PERSON", v.person()), " it is done."),
    lambda v: ("Ship the replacement to ", ("LOCATION", v.address()), " please."),
    lambda v: ("Badge ", ("EMPLOYEE_ID", v.employee_id()), " belongs to our new hire ",
               ("PERSON", v.person()), "."),
    lambda v: ("The clinic asked for ", ("MEDICAL_RECORD_NUMBER", v.record_number()),
               " before the appointment."),
    lambda v: ("Block traffic from ", ("IP_ADDRESS", v.ip()), " and notify ",
               ("EMAIL_ADDRESS", v.email()), "."),
    lambda v: ("My sister ", ("PERSON", v.person()), " prefers aisle seats on long flights."),
    lambda v: ("Transfer the rent from ", ("IBAN_CODE", v.iban()), " on ",
               ("DATE_TIME", v.date()), "."),
]

LOOK_ALIKES: list[Template] = [
    lambda v: ("The parcel tracking code ", v.luhn_invalid_card(), " was reused by mistake."),
    lambda v: ("The reference ", v.iban_with_wrong_check_digits(), " on the invoice is void."),
    lambda v: ("Upgrade the server from version ", v.version(), " tonight."),
    lambda v: ("Export the icon as logo@2x.png and the banner as hero@3x.jpg.",),
    lambda v: ("Order ", v.order_number(), " shipped without the charger."),
    lambda v: ("The contract with ", v.company(), " was renewed without changes."),
    lambda v: ("Use the ISBN 978-0-306-40615-7 when you cite the book.",),
    lambda v: ("Mention @", v.us.user_name(), " in the release notes."),
    lambda v: ("Set the timeout to 1.5 seconds and retry 3 times.",),
    lambda v: ("The sensor reported a ratio of 3/4 at the second checkpoint.",),
    lambda v: ("Badge numbers like TEMP-", f"{v.random.randrange(10**6):06d}",
               " belong to visitors."),
]


def corpus(per_template: int, seed: int = SEED) -> list[LabelledText]:
    values = Values(seed)
    texts = [compose(*template(values)) for template in POSITIVES + LOOK_ALIKES
             for _ in range(per_template)]
    values.random.shuffle(texts)
    return texts


# -- scoring -----------------------------------------------------------------------------------

@dataclass
class Score:
    labelled: int = 0
    recalled: int = 0
    found: int = 0
    correct: int = 0

    @property
    def precision(self) -> float:
        return self.correct / self.found if self.found else 0.0

    @property
    def recall(self) -> float:
        return self.recalled / self.labelled if self.labelled else 0.0


def score(texts: Sequence[LabelledText], found: Sequence[Sequence[Finding]]) -> dict[str, Score]:
    scores: dict[str, Score] = {}
    for labelled, findings in zip(texts, found, strict=True):
        for start, end, entity_type in labelled.spans:
            entry = scores.setdefault(entity_type, Score())
            entry.labelled += 1
            entry.recalled += any(_overlap(f, start, end, entity_type) for f in findings)
        for f in findings:
            entry = scores.setdefault(f.entity_type, Score())
            entry.found += 1
            entry.correct += any(_overlap(f, s, e, t) for s, e, t in labelled.spans)
    return scores


def _overlap(finding: Finding, start: int, end: int, entity_type: str) -> bool:
    return finding.entity_type == entity_type and finding.start < end and start < finding.end


# -- the benchmark -----------------------------------------------------------------------------

def run(console: Console, full: bool) -> None:
    texts = corpus(per_template=60 if full else 15)
    policy = PiiPolicy.load()
    scanner = PresidioScanner(policy)

    started = time.perf_counter()
    scanner.warm_up()
    load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    batched = scanner.scan([t.text for t in texts])
    batched_rate = len(texts) / (time.perf_counter() - started)

    singles = texts[:300 if full else 100]
    latencies = []
    for labelled in singles:
        started = time.perf_counter()
        scanner.scan([labelled.text])
        latencies.append(time.perf_counter() - started)
    single_rate = len(singles) / sum(latencies)

    scores = score(texts, [policy.decide(found).findings for found in batched])
    console.print(_score_table(scores, texts))
    percentiles = statistics.quantiles(latencies, n=100)
    console.print(f"analyzer: {scanner.version}; loaded in {load_seconds:.1f} s")
    console.print(f"throughput: {single_rate:.0f} texts/s one text per call, "
                  f"{batched_rate:.0f} texts/s batched ({batched_rate / single_rate:.1f}x)")
    console.print(f"one-text scan latency: p50 {percentiles[49] * 1000:.1f} ms, "
                  f"p95 {percentiles[94] * 1000:.1f} ms")
    console.print(_write_path_table([t.text for t in texts[:400 if full else 150]]))
    seal_us, open_us = _sealing_cost([t.text for t in texts])
    console.print(f"AES-256-GCM per memory text: seal {seal_us:.1f} µs, open {open_us:.1f} µs "
                  "(in-process cost of the event-store codec, keys already unwrapped)")


def _sealing_cost(texts: Sequence[str]) -> tuple[float, float]:
    key = MemoryKey("key", "cube", "bench", "user:bench", bytes(range(32)))
    started = time.perf_counter()
    sealed = [seal(key, text, aad=f"event {n}") for n, text in enumerate(texts)]
    sealing = time.perf_counter() - started
    started = time.perf_counter()
    for n, envelope in enumerate(sealed):
        open_sealed(key, envelope, aad=f"event {n}")
    opening = time.perf_counter() - started
    return sealing / len(texts) * 1e6, opening / len(texts) * 1e6


def _write_path_table(texts: Sequence[str]) -> Table:
    """``MemWarden.add`` latency with scanning on and off, on a fresh SQLite database each."""
    table = Table(title=f"write path: MemWarden.add of {len(texts)} generated texts "
                        "(embedded SQLite, text sealed with AES-GCM in both)")
    for column in ("scanning", "p50 ms", "p95 ms", "writes/s", "findings recorded"):
        table.add_column(column, justify="left" if column == "scanning" else "right")
    for scan in (True, False):
        latencies, detected = _timed_writes(texts, scan=scan)
        cuts = statistics.quantiles(latencies, n=100)
        table.add_row("on" if scan else "off (MEMWARDEN_PII_SCAN=0)",
                      f"{cuts[49] * 1000:.1f}", f"{cuts[94] * 1000:.1f}",
                      f"{len(latencies) / sum(latencies):.0f}", str(detected))
    return table


def _timed_writes(texts: Sequence[str], *, scan: bool) -> tuple[list[float], int]:
    with tempfile.TemporaryDirectory(prefix="memwarden-bench-pii-") as folder:
        url = f"sqlite:///{Path(folder) / 'bench.db'}"
        # data_dir: the master key file goes there too, not into ./data.
        with MemWarden.open(url, actor="agent:bench", settings=Settings(
                db_url=url, data_dir=folder, pii_scan=scan)) as mw:
            mw.add("warm up the analyzer and the connection pool", tenant="bench",
                   owner="user:warm-up")
            latencies = []
            for n, text in enumerate(texts):
                started = time.perf_counter()
                # A refused write (nothing stored) still costs its scan: timed too.
                with contextlib.suppress(SensitiveDataBlocked):
                    mw.add(text, tenant="bench", owner=f"user:{n % 50}")
                latencies.append(time.perf_counter() - started)
            return latencies, len(mw.findings(tenant="bench", limit=1000))


def _score_table(scores: dict[str, Score], texts: Sequence[LabelledText]) -> Table:
    look_alikes = sum(not t.spans for t in texts)
    table = Table(title=f"sensitive data found in {len(texts)} generated texts, "
                        f"{look_alikes} holding only look-alikes")
    for column in ("entity type", "labelled", "found", "precision", "recall", "recall target"):
        table.add_column(column, justify="left" if column == "entity type" else "right")
    for entity_type in sorted(scores, key=lambda t: (-scores[t].labelled, t)):
        s = scores[entity_type]
        target = RECALL_TARGETS.get(entity_type)
        if target is None:
            versus_target = ""
        else:
            versus_target = f"{target:.2f} {'met' if s.recall >= target else 'MISSED'}"
        table.add_row(entity_type, str(s.labelled), str(s.found),
                      f"{s.precision:.3f}" if s.found else "-",
                      f"{s.recall:.3f}" if s.labelled else "-", versus_target)
    return table


if __name__ == "__main__":
    run(Console(), full="--full" in sys.argv)
