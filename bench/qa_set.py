"""The team's long-document QA set: invented facts in real essays, for judging sparse modes.

Three tasks, every fact made up (a model can only answer from the document):

- ``single``: one fact, asked directly ("The access code of the Orvell archive is 58163.");
- ``lookalike``: three facts with the same shape and different keys ("... of ward 3 ...",
  "... of ward 5 ...", "... of ward 8 ..."), one of them asked;
- ``chain``: two facts, the answer needs both ("Mira Loth's courier is Baptiste Ferrow.",
  "Baptiste Ferrow lives in the town of Quelmarren.").

And one opt-in task (``build_cases(..., tasks=AGGREGATE_TASKS)``), where the answer gathers
facts spread over the document, so attention must hold several far-apart places at once (what
a top-k page choice is expected to lose first):

- ``aggregate``: three facts of one kind at three depths ("The first crate of the Velmorn
  shipment holds copper.", "... second ...", "... third ..."), the question asks for all
  three; ``expected`` joins them with ``|`` and a hit needs every one (``answer_hits``).

Cases vary the document length, the depth of the asked fact (2% to 98% of the document),
the wording, the invented names and values, and the essays the facts sit in. The QA essays
are the haystack's first ``QA_ESSAYS`` in name order; the others are left for calibration
(a calibration may never see a QA document).
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path

__all__ = ["QACase", "build_cases", "qa_essays", "calibration_essays", "fit_facts", "answer_hits", "QA_ESSAYS",
           "TASKS", "AGGREGATE_TASKS"]

QA_ESSAYS = 40
DEPTHS = (0.02, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.98)

_ONSETS = ("Br", "Qu", "Th", "Sk", "V", "Z", "Dr", "Gl", "Kr", "M", "N", "Tr", "Fl", "Sn", "Cr", "Pl")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou", "y")
_CODAS = ("rn", "lm", "sk", "th", "v", "nd", "rr", "x", "lt", "mb", "st", "n")


@dataclasses.dataclass(frozen=True, slots=True)
class QACase:
    """A document recipe and its question: ``facts`` are (depth, sentence) pairs inserted
    into ``tokens`` tokens of essays starting at essay ``essay_offset``."""

    name: str
    task: str
    tokens: int
    depth: float  # depth of the fact the answer rests on (chain: the second hop)
    facts: tuple[tuple[float, str], ...]
    question: str
    expected: str
    essay_offset: int


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).lower().capitalize()


def _number(rng: random.Random) -> str:
    while True:
        s = str(rng.randrange(10000, 100000))
        if len(set(s)) >= 4:  # no 11111-like values a model could guess
            return s


def _single(rng: random.Random, depth: float) -> tuple[tuple[tuple[float, str], ...], str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        place, code = _word(rng, 2), _number(rng)
        return ((depth, f"The access code of the {place} archive is {code}."),), \
            f"What is the access code of the {place} archive?", code
    if kind == 1:
        keeper, cat = _word(rng, 2), _word(rng, 3)
        return ((depth, f"The lighthouse keeper of {keeper} Point calls her cat {cat}."),), \
            f"What does the lighthouse keeper of {keeper} Point call her cat?", cat
    if kind == 2:
        town, town2, pier = _word(rng, 2), _word(rng, 2), _number(rng)
        return ((depth, f"The night ferry from {town} to {town2} leaves from pier {pier}."),), \
            f"From which pier does the night ferry from {town} to {town2} leave?", pier
    person, dish = f"{_word(rng, 1)} {_word(rng, 2)}", _word(rng, 3)
    return ((depth, f"Chef {person} is proudest of a soup she named {dish}."),), \
        f"What did Chef {person} name the soup she is proudest of?", dish


def _lookalike(rng: random.Random, depth: float) -> tuple[tuple[tuple[float, str], ...], str, str]:
    hospital = _word(rng, 2)
    wards = rng.sample(range(2, 10), 3)
    codes = [_number(rng) for _ in wards]
    others = [d for d in DEPTHS if abs(d - depth) > 0.15]
    depths = [depth, *rng.sample(others, 2)]
    facts = tuple((d, f"The locker code of ward {w} at {hospital} Hospital is {c}.")
                  for d, w, c in zip(depths, wards, codes))
    return facts, f"What is the locker code of ward {wards[0]} at {hospital} Hospital?", codes[0]


def _chain(rng: random.Random, depth: float) -> tuple[tuple[tuple[float, str], ...], str, str]:
    sender = f"{_word(rng, 1)} {_word(rng, 2)}"
    courier = f"{_word(rng, 2)} {_word(rng, 2)}"
    town = _word(rng, 3)
    first = rng.choice([d for d in DEPTHS if abs(d - depth) > 0.15])
    facts = ((first, f"The courier of {sender} is a man called {courier}."),
             (depth, f"{courier} lives in the town of {town}."))
    return facts, f"In which town does the courier of {sender} live?", town


_ITEMS = ("copper", "saffron", "lanterns", "marbles", "cinnamon", "violins", "blankets", "walnuts", "mirrors",
          "candles", "pepper", "anchors")


def _aggregate(rng: random.Random, depth: float) -> tuple[tuple[tuple[float, str], ...], str, str]:
    shipment = _word(rng, 2)
    items = rng.sample(_ITEMS, 3)
    others = [d for d in DEPTHS if abs(d - depth) > 0.15]
    first, second = rng.sample(others, 2)
    depths = sorted([depth, first, second])
    facts = tuple((d, f"The {nth} crate of the {shipment} shipment holds {item}.")
                  for d, nth, item in zip(depths, ("first", "second", "third"), items))
    return facts, f"What do the first, second and third crates of the {shipment} shipment hold?", "|".join(items)


_Make = Callable[[random.Random, float], tuple[tuple[tuple[float, str], ...], str, str]]
_TASKS: dict[str, _Make] = {"single": _single, "lookalike": _lookalike, "chain": _chain, "aggregate": _aggregate}
TASKS = ("single", "lookalike", "chain")
AGGREGATE_TASKS = ("aggregate",)


def answer_hits(text: str, expected: str) -> bool:
    """Every ``|``-separated part of ``expected`` appears in ``text`` (case-insensitive)."""
    return all(part.lower() in text.lower() for part in expected.split("|"))


def build_cases(lengths: tuple[int, ...], *, per_task: int | tuple[int, ...] = 3, seed: int = 0,
                tasks: tuple[str, ...] = TASKS) -> list[QACase]:
    """``per_task`` cases of each task at each length (one count for every length, or one per
    length), depths rotating over ``DEPTHS``."""
    counts = (per_task,) * len(lengths) if isinstance(per_task, int) else tuple(per_task)
    if len(counts) != len(lengths):
        raise ValueError(f"per_task gives {len(counts)} counts for {len(lengths)} lengths; give one, or one per length")
    rng = random.Random(seed)
    cases = []
    i = 0
    for tokens, count in zip(lengths, counts):
        for task in tasks:
            make = _TASKS[task]
            for _ in range(count):
                depth = DEPTHS[(5 * i) % len(DEPTHS)]  # 5 and 9 coprime: every depth in turn
                facts, question, expected = make(rng, depth)
                cases.append(QACase(f"{task}-{tokens}-{i}", task, tokens, depth, facts, question, expected,
                                    essay_offset=(i * 7) % QA_ESSAYS))
                i += 1
    return cases


def _essays(folder: Path) -> list[str]:
    return [p.read_text(encoding="utf-8").strip() for p in sorted(Path(folder).glob("*.txt"))]


def qa_essays(folder: Path) -> list[str]:
    return _essays(folder)[:QA_ESSAYS]


def calibration_essays(folder: Path) -> list[str]:
    return _essays(folder)[QA_ESSAYS:]


def _haystack(essays: list[str], offset: int, chars: int) -> str:
    out, i = [], offset
    while sum(map(len, out)) < chars:
        out.append(essays[i % len(essays)])
        i += 1
        if i - offset > 4 * len(essays):
            raise ValueError("the essays are too short for this document")
    return "\n\n".join(out)[:chars]


def _insert(hay: str, facts: tuple[tuple[float, str], ...]) -> str:
    """Each fact on its own line at the line break nearest below its depth."""
    cuts = []
    for depth, fact in facts:
        cut = hay.rfind("\n", 0, int(len(hay) * depth))
        cuts.append((cut if cut > 0 else int(len(hay) * depth), fact))
    for cut, fact in sorted(cuts, reverse=True):
        hay = hay[:cut] + "\n" + fact + "\n" + hay[cut:]
    return hay


def fit_facts(case: QACase, essays: list[str], count_tokens: Callable[[str], int]) -> str:
    """The case's document, within 1% of ``case.tokens`` tokens."""
    chars = case.tokens * 4
    doc = _insert(_haystack(essays, case.essay_offset, chars), case.facts)
    for _ in range(6):
        n = count_tokens(doc)
        if abs(n - case.tokens) <= case.tokens // 100:
            break
        chars = max(1, int(chars * case.tokens / n))
        doc = _insert(_haystack(essays, case.essay_offset, chars), case.facts)
    return doc
