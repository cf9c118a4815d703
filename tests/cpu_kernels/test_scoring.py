"""cpu_kernels.scoring (Numba): Quest bounds (Tang et al. 2024), InfiniGen-style partial-key
scores (Lee et al. 2024) and page min / max metadata, against the numpy references; the
references against float64 loops written here; plus the properties that make the scores
useful (a Quest bound is >= every true score of its page and equal to it for a one-token
page; partial-key scores over all channels are the true page maxima).

All scoring arithmetic is float32 on exactly widened inputs, so the float32 tolerance applies
to every page dtype; min / max are exact.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cpu_kernels.reference import (
    page_key_bounds_ref,
    partial_key_page_scores_ref,
    quest_page_scores_ref,
)
from cpu_kernels.inputs import kernel_pages
from cpu_kernels.scoring import page_key_bounds, partial_key_page_scores, quest_page_scores, quest_page_scores_trusted
from tests.cpu_kernels.arenas import NUM_KV_HEADS
from tests.tolerances import KERNEL_TOL

HEAD_DIMS = [64, 80, 128, 256]
GROUPS = [1, 3, 4, 7]
PAGE_SIZES = [16, 32]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RANKS = [4, 16]  # key channels kept per KV head (InfiniGen)
ATOL, RTOL = KERNEL_TOL[torch.float32]
SCALE = 0.3
CASES = [(64, 1, 16, torch.float32, 4), (80, 3, 32, torch.float16, 16),
         (128, 4, 16, torch.bfloat16, 4), (256, 7, 32, torch.float32, 16),
         (64, 3, 32, torch.bfloat16, 16)]
FULL_CASES = list(itertools.product(HEAD_DIMS, GROUPS, PAGE_SIZES, DTYPES, RANKS))


@dataclass
class ScoringCase:
    q: np.ndarray  # [nkv * group, hd] float32
    k: torch.Tensor  # [nkv, num_slots, ps, hd] dtype
    num_tokens: np.ndarray  # [num_slots] valid tokens per slot (0, 1, partial, full)
    slots: np.ndarray  # [M] shuffled, one slot listed twice
    channels: np.ndarray  # [nkv, r] distinct per head


def _case_id(case: tuple) -> str:
    hd, g, ps, dt, r = case
    return f"d{hd}-g{g}-ps{ps}-{str(dt).split('.')[-1]}-r{r}"


def make_case(head_dim, group, page_size, dtype, rank, seed=0) -> ScoringCase:
    gen = np.random.default_rng(seed)
    num_slots = 9
    k = torch.from_numpy(gen.standard_normal((NUM_KV_HEADS, num_slots, page_size, head_dim)))
    counts = np.array([page_size, 1, 0, page_size - 1, 5, page_size, 2, page_size, 3], np.int32)
    slots = np.concatenate([gen.permutation(num_slots), [4]]).astype(np.int32)
    channels = np.stack([gen.permutation(head_dim)[:rank] for _ in range(NUM_KV_HEADS)])
    q = gen.standard_normal((NUM_KV_HEADS * group, head_dim)).astype(np.float32)
    return ScoringCase(q, k.to(dtype), counts, slots, channels.astype(np.int32))


def _keys64(c: ScoringCase, h: int, slot: int) -> np.ndarray:
    """The valid keys of one page as float64 [n, hd]."""
    return c.k[h, slot, : c.num_tokens[slot]].double().numpy()


def _true_page_max(c: ScoringCase, h: int, slot: int, channels=None) -> float:
    keys = _keys64(c, h, slot)
    group = c.q.shape[0] // NUM_KV_HEADS
    qg = c.q[h * group:(h + 1) * group].astype(np.float64)
    if channels is not None:
        qg, keys = qg[:, channels], keys[:, channels]
    return (SCALE * (qg @ keys.T)).max() if len(keys) else -np.inf


def _check_bounds(c: ScoringCase) -> None:
    k_min, k_max = page_key_bounds(c.k, c.num_tokens)
    ref_min, ref_max = page_key_bounds_ref(c.k, c.num_tokens)
    np.testing.assert_array_equal(k_min, ref_min)
    np.testing.assert_array_equal(k_max, ref_max)
    for h, s in itertools.product(range(NUM_KV_HEADS), range(len(c.num_tokens))):
        keys = _keys64(c, h, s)
        lo, hi = (keys.min(0), keys.max(0)) if len(keys) else (0.0, 0.0)
        np.testing.assert_array_equal(ref_min[h, s], lo)
        np.testing.assert_array_equal(ref_max[h, s], hi)


def _check_quest(c: ScoringCase) -> None:
    k_min, k_max = page_key_bounds_ref(c.k, c.num_tokens)
    got = quest_page_scores(c.q, k_min, k_max, c.slots, scale=SCALE)
    ref = quest_page_scores_ref(c.q, k_min, k_max, c.slots, scale=SCALE)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL)
    group = c.q.shape[0] // NUM_KV_HEADS
    for h, (i, s) in itertools.product(range(NUM_KV_HEADS), enumerate(c.slots)):
        qg = c.q[h * group:(h + 1) * group].astype(np.float64)
        bound = SCALE * np.maximum(qg * k_min[h, s], qg * k_max[h, s]).sum(axis=1).max()
        np.testing.assert_allclose(ref[h, i], bound, atol=ATOL, rtol=RTOL)
        if c.num_tokens[s] > 0:
            true_max = _true_page_max(c, h, s)
            assert got[h, i] >= true_max - ATOL - RTOL * abs(true_max)
            if c.num_tokens[s] == 1:
                np.testing.assert_allclose(got[h, i], true_max, atol=ATOL, rtol=RTOL)


def _check_partial(c: ScoringCase, channels: np.ndarray) -> None:
    k_part = c.k[..., torch.from_numpy(channels[0]).long()].clone()
    for h in range(1, NUM_KV_HEADS):
        k_part[h] = c.k[h][..., torch.from_numpy(channels[h]).long()]
    lens = c.num_tokens[c.slots]
    got = partial_key_page_scores(c.q, channels, k_part, c.slots, lens, scale=SCALE)
    ref = partial_key_page_scores_ref(c.q, channels, k_part, c.slots, lens, scale=SCALE)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL)
    for h, (i, s) in itertools.product(range(NUM_KV_HEADS), enumerate(c.slots)):
        np.testing.assert_allclose(ref[h, i], _true_page_max(c, h, s, channels[h]), atol=ATOL, rtol=RTOL)
    assert np.all((got == -np.inf) == (lens == 0)[None, :])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("op", ["bounds", "quest", "partial", "partial_all_channels"])
def test_matches_reference(case, op):
    c = make_case(*case)
    if op == "bounds":
        _check_bounds(c)
    elif op == "quest":
        _check_quest(c)
    else:
        hd = case[0]
        channels = c.channels if op == "partial" else np.tile(np.arange(hd, dtype=np.int32), (2, 1))
        _check_partial(c, channels)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES, ids=_case_id)
def test_matches_reference_full(case):
    c = make_case(*case, seed=1)
    _check_bounds(c)
    _check_quest(c)
    _check_partial(c, c.channels)


def test_numpy_inputs_and_torch_outputs():
    c = make_case(64, 3, 16, torch.float16, 4)
    k_np = c.k.numpy()  # numpy float16
    lo_np, hi_np = page_key_bounds(k_np, c.num_tokens)
    lo_t, hi_t = page_key_bounds(c.k, torch.from_numpy(c.num_tokens))
    assert isinstance(lo_np, np.ndarray) and isinstance(lo_t, torch.Tensor)
    np.testing.assert_array_equal(lo_np, lo_t.numpy())
    scores_np = quest_page_scores(c.q, lo_np.astype(np.float16), hi_np.astype(np.float16), c.slots)
    scores_t = quest_page_scores(torch.from_numpy(c.q), lo_t.half(), hi_t.half(), c.slots)
    assert isinstance(scores_t, torch.Tensor)
    np.testing.assert_array_equal(scores_np, scores_t.numpy())
    full_lo, _ = page_key_bounds(c.k)  # None: every page full
    np.testing.assert_array_equal(full_lo, c.k.float().amin(dim=2).numpy())


def test_non_contiguous_and_not_mutated():
    c = make_case(80, 4, 16, torch.bfloat16, 4)
    big = torch.zeros(NUM_KV_HEADS, 18, 16, 96, dtype=torch.bfloat16)
    big[:, ::2, :, :80] = c.k
    k_view = big[:, ::2, :, :80]
    before = k_view.clone()
    lo, hi = page_key_bounds(k_view, c.num_tokens)
    np.testing.assert_array_equal(lo.numpy(), page_key_bounds_ref(c.k, c.num_tokens)[0])
    wide = torch.zeros(2, NUM_KV_HEADS, 9, 160, dtype=torch.bfloat16)
    wide[0, ..., ::2], wide[1, ..., ::2] = lo, hi
    lo_view, hi_view = wide[0, ..., ::2], wide[1, ..., ::2]  # channel stride 2
    rev = c.slots[::-1]
    scores = quest_page_scores(c.q, lo_view, hi_view, rev, scale=SCALE)
    ref = quest_page_scores_ref(c.q, lo.to(torch.bfloat16), hi.to(torch.bfloat16), rev, scale=SCALE)
    np.testing.assert_allclose(scores, ref, atol=ATOL, rtol=RTOL)
    # The engine's unchecked entry point, on the same strided bf16 views, against the same reference.
    trusted = quest_page_scores_trusted(np.ascontiguousarray(c.q, dtype=np.float32), kernel_pages(lo_view, "k_min", 3),
                                        kernel_pages(hi_view, "k_max", 3), np.ascontiguousarray(rev), SCALE)
    np.testing.assert_allclose(trusted, ref, atol=ATOL, rtol=RTOL)
    part = k_view[..., ::8]  # channels 0, 8, ... as a strided [nkv, S, ps, 10] view
    channels = np.tile(np.arange(0, 80, 8, dtype=np.int32), (2, 1))
    lens = c.num_tokens[c.slots]
    got = partial_key_page_scores(c.q, channels, part, c.slots, lens, scale=SCALE)
    np.testing.assert_allclose(got, partial_key_page_scores_ref(c.q, channels, part, c.slots, lens,
                                                                scale=SCALE), atol=ATOL, rtol=RTOL)
    assert torch.equal(k_view.view(torch.int16), before.view(torch.int16))


def test_extreme_queries():
    """q of magnitude 1e3 (scores ~1e4): finite, and still the Quest property holds."""
    c = make_case(64, 3, 16, torch.float32, 16)
    c.q *= 1e3
    k_min, k_max = page_key_bounds(c.k, c.num_tokens)
    got = quest_page_scores(c.q, k_min, k_max, c.slots, scale=SCALE)
    assert np.isfinite(got).all() and np.abs(got).max() > 1e3
    np.testing.assert_allclose(got, quest_page_scores_ref(c.q, k_min, k_max, c.slots, scale=SCALE),
                               atol=ATOL, rtol=RTOL)


BAD_QUEST = [("q_dtype", "q must be float32"), ("minmax_shape", "share shape and dtype"),
             ("head_dim", "must have head_dim"), ("slot_range", "slots must lie"),
             ("slots_2d", "slots must be 1-D"), ("scale", "scale must be a positive")]


@pytest.mark.parametrize("what,match", BAD_QUEST, ids=[b[0] for b in BAD_QUEST])
def test_quest_bad_inputs(what, match):
    c = make_case(64, 3, 16, torch.float32, 4)
    lo, hi = page_key_bounds_ref(c.k, c.num_tokens)
    args = dict(q=c.q, k_min=lo, k_max=hi, slots=c.slots, scale=SCALE)
    args.update({"q_dtype": dict(q=c.q.astype(np.float16)), "minmax_shape": dict(k_max=hi[:1]),
                 "head_dim": dict(q=c.q[:, :32]), "slot_range": dict(slots=c.slots + 9),
                 "slots_2d": dict(slots=c.slots[None]), "scale": dict(scale=-1.0)}[what])
    with pytest.raises(ValueError, match=match):
        quest_page_scores(**args)


BAD_PARTIAL = [("channel_range", "channels must lie"), ("channels_shape", "channels must have shape"),
               ("lens_range", "lens must lie"), ("lens_len", "lens must have 10 entries"),
               ("slot_range", "slots must lie"), ("k_dtype", "float32, float16 or bfloat16")]


@pytest.mark.parametrize("what,match", BAD_PARTIAL, ids=[b[0] for b in BAD_PARTIAL])
def test_partial_bad_inputs(what, match):
    c = make_case(64, 3, 16, torch.float32, 4)
    part = c.k[..., :4]
    lens = c.num_tokens[c.slots]
    args = dict(q=c.q, channels=c.channels, k_partial=part, slots=c.slots, lens=lens)
    args.update({"channel_range": dict(channels=c.channels + 64),
                 "channels_shape": dict(channels=c.channels[:, :3]),
                 "lens_range": dict(lens=lens + 17), "lens_len": dict(lens=lens[:-1]),
                 "slot_range": dict(slots=c.slots - 20), "k_dtype": dict(k_partial=part.double())}[what])
    with pytest.raises(ValueError, match=match):
        partial_key_page_scores(**args)


def test_bounds_bad_num_tokens():
    c = make_case(64, 3, 16, torch.float32, 4)
    with pytest.raises(ValueError, match="num_tokens must lie"):
        page_key_bounds(c.k, c.num_tokens + 16)
    with pytest.raises(ValueError, match="num_tokens must have shape"):
        page_key_bounds(c.k, c.num_tokens[:-1])

