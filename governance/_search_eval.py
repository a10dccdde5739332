"""A retrieval test set derived from the demo workload: questions with known relevant memories.

The demo's memories (``governance._demo``) are the targets. Each tenant also gets distractors
written from the same templates about other people (same words, other facts), so a question
cannot be answered by matching any one word. Two kinds of question per target:

- ``lexical``: worded with the memory's own words, as a user who remembers it would ask;
- ``paraphrased``: the same need in other words (``headaches`` for ``migraines``, ``doesn't eat
  meat`` for ``vegetarian``), where full-text matching has little to hold on to.

``recall_at`` runs every question as the platform operator, limited to the question's tenant,
and counts the questions whose relevant memory is among the first k results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from governance._demo import seed_demo
from governance._sdk import MemWarden


@dataclass(frozen=True, slots=True)
class Question:
    text: str
    tenant: str
    relevant: str
    """The id of the demo memory that answers it."""
    paraphrased: bool


def _q(text: str, relevant: str, paraphrased: bool) -> Question:
    tenant = relevant.removeprefix("demo-").rsplit("-", 1)[0]
    return Question(text, tenant, relevant, paraphrased)


QUESTIONS: tuple[Question, ...] = (
    _q("Is Maria allergic to penicillin?", "demo-acme-health-001", False),
    _q("morning appointments for Maria", "demo-acme-health-002", False),
    _q("Tom Becker migraines", "demo-acme-health-003", False),
    _q("Does Tom want SMS reminders?", "demo-acme-health-004", False),
    _q("Aiko window seats on long-haul flights", "demo-globex-travel-001", False),
    _q("Is Aiko vegetarian?", "demo-globex-travel-002", False),
    _q("Sam loyalty tier", "demo-globex-travel-003", False),
    _q("corporate travel policy when booking for Sam", "demo-globex-travel-004", False),
    _q("Does Lena work remotely on Fridays?", "demo-initech-hr-001", False),
    _q("Lena salary band", "demo-initech-hr-002", False),
    _q("Which antibiotic gives the patient a bad reaction?", "demo-acme-health-001", True),
    _q("What time of day suits her for a consultation?", "demo-acme-health-002", True),
    _q("Who keeps getting bad headaches?", "demo-acme-health-003", True),
    _q("Which channel should notifications to him go through: text message?",
       "demo-acme-health-004", True),
    _q("Where does she like to sit on the plane?", "demo-globex-travel-001", True),
    _q("Which traveller doesn't eat meat?", "demo-globex-travel-002", True),
    _q("What frequent flyer status does the customer hold?", "demo-globex-travel-003", True),
    _q("What must be verified before making a reservation for him?",
       "demo-globex-travel-004", True),
    _q("Which day is she at home instead of the office?", "demo-initech-hr-001", True),
    _q("Did her pay grade change this autumn?", "demo-initech-hr-002", True),
)

_NAMES = ("Carlos Diaz", "Priya Nair", "Omar Haddad", "Nina Petrova", "Ken Sato", "Ola Berg",
          "Lucia Rossi", "Femi Adeyemi", "Hana Kim", "Pablo Ruiz")
_DISTRACTORS: dict[str, tuple[str, ...]] = {
    "acme-health": (
        "{name} is allergic to peanuts and carries an epinephrine pen.",
        "{name} prefers evening appointments after 6pm.",
        "{name} reported back pain after the fall in January.",
        "{name} wants reminders by phone call, never by letter.",
        "{name} asked for a Spanish-speaking nurse at every visit.",
        "{name} takes blood pressure medication every morning.",
        "{name} missed two follow-up appointments in the spring.",
        "{name} needs wheelchair access at the clinic entrance.",
    ),
    "globex-travel": (
        "{name} prefers aisle seats on short domestic hops.",
        "{name} is allergic to shellfish; order a special meal.",
        "{name}'s hotel preference is a quiet room on a high floor.",
        "{name} always travels with a folding bike as checked luggage.",
        "{name} asked to avoid layovers in Frankfurt.",
        "{name} booked a rental car with an automatic gearbox.",
        "{name} pays with the company card for every booking.",
        "{name} likes early morning departures on Mondays.",
    ),
    "initech-hr": (
        "{name} works from the Berlin office on Tuesdays and Thursdays.",
        "{name} is on parental leave until June.",
        "{name} completed the security awareness training in May.",
        "{name} asked for a standing desk.",
        "{name} manages the payroll migration project.",
        "{name} joined the team in the London office last year.",
        "{name} prefers one-to-one meetings on Wednesday afternoons.",
        "{name} requested a second monitor for the home setup.",
    ),
}


def seed_retrieval_set(mw: MemWarden) -> int:
    """The demo workload plus its distractors (idempotent); returns the distractors written."""
    seed_demo(mw)
    written = 0
    for tenant, templates in _DISTRACTORS.items():
        for n, name in enumerate(_NAMES):
            for t, template in enumerate(templates):
                cube_id = f"distractor-{tenant}-{n:02d}-{t:02d}"
                if mw.store.stream_version(cube_id) == 0:
                    owner = "person:" + name.lower().replace(" ", ".")
                    mw.acting_as("agent:seeder").add(template.format(name=name), tenant=tenant,
                                                     owner=owner, cube_id=cube_id)
                    written += 1
    return written


def recall_at(mw: MemWarden, questions: Sequence[Question], *, k: int = 5,
              mode: str = "bm25") -> float:
    """The share of ``questions`` whose relevant memory is among the first ``k`` results."""
    found = sum(question.relevant in [r.cube_id for r in mw.search(
        question.text, k=k, mode=mode, tenant=question.tenant)] for question in questions)
    return found / len(questions)
