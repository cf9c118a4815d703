"""The long-document QA set of the fidelity runs (bench/qa_set.py): case counts, variety, fit."""
from __future__ import annotations

import pytest

from bench.qa_set import AGGREGATE_TASKS, DEPTHS, TASKS, answer_hits, build_cases, fit_facts


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


def test_the_default_set_is_unchanged_by_the_opt_in_task():
    assert build_cases((2048,), per_task=2) == build_cases((2048,), per_task=2, tasks=TASKS)
    assert {c.task for c in build_cases((2048,), per_task=2)} == set(TASKS)


def test_an_aggregate_case_asks_for_three_facts_far_apart():
    cases = build_cases((4096,), per_task=3, tasks=AGGREGATE_TASKS)
    assert [c.task for c in cases] == ["aggregate"] * 3
    for c in cases:
        parts = c.expected.split("|")
        assert len(parts) == 3 == len(c.facts) == len(set(parts))
        depths = sorted(d for d, _ in c.facts)
        assert min(b - a for a, b in zip(depths, depths[1:])) > 0.15
        assert all(part in fact for part, (_, fact) in zip(parts, sorted(c.facts)))
        assert answer_hits(f"They hold {', '.join(reversed(parts))}.", c.expected)
        assert not answer_hits(f"They hold {parts[0]} and {parts[1]}.", c.expected)
