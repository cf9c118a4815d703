"""The long-document QA set of the fidelity runs (bench/qa_set.py): case counts, variety, fit."""
from __future__ import annotations

import pytest

from bench.qa_set import DEPTHS, build_cases, fit_facts


def test_one_count_per_length_gives_that_many_cases_of_each_task():
    cases = build_cases((2048, 32000), per_task=(3, 1))
    assert [(c.tokens, c.task) for c in cases] == [
        *[(2048, t) for t in ("single", "lookalike", "chain") for _ in range(3)],
        (32000, "single"), (32000, "lookalike"), (32000, "chain")]
    assert len({c.name for c in cases}) == len(cases)
    assert len({c.expected for c in cases}) == len(cases)  # every answer its own invented value


def test_one_count_applies_to_every_length():
    cases = build_cases((2048, 4096, 8192), per_task=3)
    assert len(cases) == 27
    assert {c.depth for c in cases} == set(DEPTHS)  # every depth in turn


def test_a_count_per_length_must_match_the_lengths():
    with pytest.raises(ValueError, match="2 counts for 3 lengths"):
        build_cases((2048, 4096, 8192), per_task=(3, 1))


def test_the_document_holds_each_fact_and_fits_its_length():
    case = build_cases((2000,), per_task=1)[1]  # look-alike keys: three facts
    essays = [f"Essay {i}. " + "Words fill the page. " * 200 for i in range(5)]
    doc = fit_facts(case, essays, lambda text: len(text.split()))
    assert all(fact in doc for _, fact in case.facts)
    assert abs(len(doc.split()) - case.tokens) <= case.tokens // 100
