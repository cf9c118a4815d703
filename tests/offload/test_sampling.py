"""offload.sampling: nucleus mask, seeded sampling, greedy, config validation."""
from __future__ import annotations

import math

import pytest
import torch

from offload.sampling import Sampler, SamplingConfig, top_p_mask

TOP_PS = [0.1, 0.5, 0.9, 0.99]
VOCABS = [1, 2, 7, 50, 1000]
NUM_DRAWS = 500


def _random_probs(vocab: int, sharpness: float) -> torch.Tensor:
    return torch.softmax(torch.randn(vocab) * sharpness, dim=0)


@pytest.mark.parametrize("sharpness", [0.5, 3.0])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("top_p", TOP_PS)
def test_top_p_mask_is_smallest_nucleus(top_p, vocab, sharpness):
    for _ in range(5):
        probs = _random_probs(vocab, sharpness)
        mask = top_p_mask(probs, top_p)
        assert mask.dtype == torch.bool and mask.shape == probs.shape
        kept = probs[mask].double()
        dropped = probs[~mask]
        # the kept tokens are the most likely ones
        if dropped.numel():
            assert kept.min() >= dropped.max()
        # mass of the kept >= p, and without the least likely kept token it is < p
        assert kept.sum().item() >= top_p - 1e-6
        assert kept.sum().item() - kept.min().item() < top_p


def test_top_p_mask_exact_boundary():
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])
    assert top_p_mask(probs, 0.4).tolist() == [False, True, False, False]
    assert top_p_mask(probs, 0.41).tolist() == [False, True, False, True]
    assert top_p_mask(probs, 0.05).tolist() == [False, True, False, False]  # never empty


@pytest.mark.parametrize("vocab", [1, 2, 7])
def test_top_p_one_keeps_all(vocab):
    probs = _random_probs(vocab, 3.0)
    assert bool(top_p_mask(probs, 1.0).all())


def test_top_p_one_keeps_all_of_a_softmax_with_rounding():
    probs = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(28)) * 3, dim=0)
    tail = torch.sort(probs.double(), descending=True).values
    assert tail[:-1].sum().item() < 1.0  # even exactly, the mass before the last token is < 1
    assert bool(top_p_mask(probs, 1.0).all())


def test_sampler_with_top_p_one_can_pick_every_token():
    sampler = Sampler(SamplingConfig(temperature=1.0, top_p=1.0, seed=2))
    logits = torch.tensor([0.0, 0.1, -0.1, 0.05])
    assert set(_draws(sampler, logits, NUM_DRAWS)) == {0, 1, 2, 3}


def test_top_p_mask_does_not_mutate_probs():
    probs = _random_probs(50, 1.0)
    before = probs.clone()
    top_p_mask(probs, 0.5)
    assert torch.equal(probs, before)


@pytest.mark.parametrize("top_p", [0.5, 1.0])
def test_seeded_sampler_reproduces(top_p):
    logits = torch.randn(100)
    cfg = SamplingConfig(temperature=0.8, top_p=top_p, seed=11)
    a = _draws(Sampler(cfg), logits, 50)
    torch.manual_seed(123)  # the global generator plays no part
    b = _draws(Sampler(cfg), logits, 50)
    assert a == b
    other = _draws(Sampler(SamplingConfig(temperature=0.8, top_p=top_p, seed=12)), logits, 50)
    assert other != a


def _draws(sampler: Sampler, logits: torch.Tensor, n: int) -> list[int]:
    return [sampler(logits) for _ in range(n)]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("top_p", TOP_PS)
def test_sampler_never_picks_outside_nucleus(top_p, temperature):
    logits = torch.randn(40) * 2
    nucleus = top_p_mask(torch.softmax(logits / temperature, dim=-1), top_p)
    sampler = Sampler(SamplingConfig(temperature=temperature, top_p=top_p, seed=5))
    picks = _draws(sampler, logits, NUM_DRAWS)
    assert all(bool(nucleus[t]) for t in picks)
    if int(nucleus.sum()) > 1:
        assert len(set(picks)) > 1  # it does sample, not always the argmax


def test_greedy_picks_argmax():
    logits = torch.randn(1000)
    logits[417] = 10.0
    sampler = Sampler(SamplingConfig())
    assert SamplingConfig().is_greedy
    assert sampler(logits) == 417
    assert sampler(logits.half()) == 417
    assert not SamplingConfig(temperature=0.1).is_greedy


@pytest.mark.parametrize("temperature", [-0.1, -1.0, math.nan])
def test_config_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        SamplingConfig(temperature=temperature)


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.0001, 2.0, math.nan])
def test_config_rejects_bad_top_p(top_p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingConfig(temperature=1.0, top_p=top_p)


def test_config_accepts_bounds():
    SamplingConfig(temperature=0.0, top_p=1.0)
    SamplingConfig(temperature=5.0, top_p=1e-6)
