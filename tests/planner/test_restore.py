"""The compute-or-load split of a DocCache restore (Cake): where recompute and loading meet."""
from __future__ import annotations

import pytest

from planner.restore import RestoreModel, choose_split, prefill_flops


def _model(**kw) -> RestoreModel:
    base = dict(tokens=1000, step=10, linear_s=1e-3, quadratic_s=0.0, load_s=3e-3)
    return RestoreModel(**(base | kw))


def test_the_split_is_where_recompute_and_loading_finish_together():
    # recompute 1 ms/token, load 3 ms/token: 1e-3 t = 3e-3 (1000 - t) at t = 750
    split = choose_split(_model())
    assert split.tokens == 750 and not split.forced
    assert split.predicted_s == pytest.approx(0.75)
    assert split.load_only_s == pytest.approx(3.0) and split.recompute_only_s == pytest.approx(1.0)
    assert "recompute the first 750 tokens (75%, chosen)" in split.explain()


def test_the_quadratic_term_moves_the_split_earlier():
    # 1e-3 t + 1e-6 t^2 = 3e-3 (1000 - t), i.e. 1e-6 t^2 + 4e-3 t - 3 = 0: t = 645.75...
    # (750 without the quadratic term); the best step lies on either side of it
    split = choose_split(_model(quadratic_s=1e-6))
    assert split.tokens in (640, 650)
    assert split.predicted_s == pytest.approx(max(1e-3 * split.tokens + 1e-6 * split.tokens**2,
                                                  3e-3 * (1000 - split.tokens)))
    assert all(split.predicted_s <= _model(quadratic_s=1e-6).restore_s(t) for t in range(0, 1000, 10))


def test_no_split_when_loading_is_cheaper_than_any_recompute():
    split = choose_split(_model(linear_s=1.0, load_s=1e-6))
    assert split.tokens == 0 and split.predicted_s == pytest.approx(1e-3)
    assert split.explain().startswith("load every page (chosen)")


def test_a_forced_split_is_the_nearest_step_and_leaves_a_page_to_load():
    assert choose_split(_model(), 0.3).tokens == 300
    assert choose_split(_model(), 0.304).tokens == 300 and choose_split(_model(), 0.306).tokens == 310
    assert choose_split(_model(), 0.999).tokens == 990  # the last step before the end
    assert choose_split(_model(), 0.0).tokens == 0
    forced = choose_split(_model(), 0.3)
    assert forced.forced and "(30%, forced)" in forced.explain()
    assert forced.predicted_s == pytest.approx(max(0.3, 3e-3 * 700))
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match=r"in \[0, 1\)"):
            choose_split(_model(), bad)


def test_a_split_must_save_min_gain_and_pays_the_first_prefill():
    # 750 alone would save 75% of 3 s; a 2.4 s first prefill leaves 1e-3 t + 2.4 = 3e-3 (1000 - t) at t = 150:
    # 2.55 s, 15% less than loading
    model = _model(first_prefill_s=2.4)
    assert model.recompute_s(0) == 0 and model.recompute_s(10) == pytest.approx(2.41)
    assert choose_split(model).tokens == 150
    assert choose_split(_model(first_prefill_s=2.4, min_gain=0.2)).tokens == 0  # 15% < 20%
    assert choose_split(_model(first_prefill_s=2.4, min_gain=0.2), 0.3).tokens == 300  # forced all the same
    assert model.extend_s(20, first=True) - model.extend_s(20) == pytest.approx(2.4)


def test_a_document_of_one_step_is_loaded():
    assert choose_split(_model(tokens=10, step=10)).tokens == 0
    assert choose_split(_model(tokens=10, step=10), 0.5).tokens == 0


def test_prefill_flops_counted_by_hand():
    # two layers of 10 weights; heads 2 x dim 4; a global layer: 2 * 2 * 4 per token^2;
    # a window of 8: 4 * 2 * 4 * 8 per token
    assert prefill_flops(num_heads=2, head_dim=4, params_per_layer=[10, 10], windows=[None, 8]) == (296.0, 16.0)


def test_extend_prices_a_question_over_the_document():
    m = _model(quadratic_s=1e-6, attend_read_s=1e-4)
    assert m.extend_s(20) == pytest.approx(1e-3 * 20 + 2e-6 * 20 * 1000 + 1e-4 * 1000)


def test_bad_models_are_refused():
    with pytest.raises(ValueError, match="tokens >= 1"):
        _model(tokens=0)
    with pytest.raises(ValueError, match="load_s"):
        _model(load_s=float("nan"))
