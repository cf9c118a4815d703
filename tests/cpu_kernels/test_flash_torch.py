"""cpu_kernels.flash_torch: partials through torch's fused CPU flash kernel, against an
independent float64 attention (tests/attention_naive.py)."""
from __future__ import annotations

import pytest
import torch

from cpu_kernels.flash_torch import attention_partial_flash, is_available
from gpu_kernels.reference import merge_partials_ref
from tests.attention_naive import (causal_positions, check_against_naive, default_scale, make_qkv,
                                   naive_attention, positions_or_none, strided_like)
from tests.tolerances import TOL

SEQ_LENS = [1, 31, 32, 33, 97]
HEAD_DIMS = [64, 80, 128]
GROUPS = [1, 3, 4]
CAUSAL = [False, True]
DTYPES_16 = [torch.float16, torch.bfloat16]

pytestmark = pytest.mark.skipif(not is_available(torch.device("cpu")),
                                reason="this torch build lacks the fused CPU flash op")


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_flash_matches_naive_fp32(seq_len, head_dim, group, causal):
    q, k, v = make_qkv(seq_len, head_dim, group)
    q_pos, k_pos = positions_or_none(seq_len, causal)
    scale = default_scale(head_dim)
    out, lse = attention_partial_flash(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos)
    want_out, want_lse = naive_attention(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos)
    check_against_naive(out, lse, want_out, want_lse)


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES_16], ids=["fp32", "fp16", "bf16"])
def test_fully_masked_rows_are_zero_and_minus_inf(seq_len, dtype):
    q, k, v = make_qkv(seq_len, 64, 3, dtype=dtype)
    q_pos, k_pos = causal_positions(seq_len)
    out, lse = attention_partial_flash(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    empty = (k_pos.view(1, -1) > q_pos.view(-1, 1)).all(dim=1)
    assert bool(empty.any()) and not bool(empty.all())
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert bool(torch.isneginf(lse[:, :, empty]).all())
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse[:, :, ~empty]).all())


def test_every_row_masked_gives_empty_partial():
    q, k, v = make_qkv(33, 64, 2)
    q_pos = torch.tensor([0, 1, 2, 3])
    k_pos = torch.arange(100, 133)
    out, lse = attention_partial_flash(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    assert torch.equal(out, torch.zeros_like(out))
    assert bool(torch.isneginf(lse).all())


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq_len", [31, 97])
def test_strided_qkv_views(seq_len, causal):
    q, k, v = make_qkv(seq_len, 64, 4)
    q_pos, k_pos = positions_or_none(seq_len, causal)
    ks, vs = strided_like(k), strided_like(v)
    q = q.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # token-major, as the engine has it
    assert not q.is_contiguous()
    out, lse = attention_partial_flash(q, ks, vs, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    want_out, want_lse = naive_attention(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    check_against_naive(out, lse, want_out, want_lse)
    c_out, c_lse = attention_partial_flash(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out, c_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, c_lse, atol=atol, rtol=rtol)


@pytest.mark.parametrize("causal", CAUSAL)
def test_split_and_merge_equals_whole(causal):
    """Flash partials over three disjoint pieces merge into the whole (the decode path)."""
    q, k, v = make_qkv(97, 80, 3)
    q_pos, k_pos = positions_or_none(97, causal)
    scale = default_scale(80)
    outs, lses = [], []
    for a, b in [(0, 5), (5, 64), (64, 97)]:
        piece_pos = None if k_pos is None else k_pos[a:b]
        o, s = attention_partial_flash(q, k[:, a:b], v[:, a:b], scale=scale, q_pos=q_pos, k_pos=piece_pos)
        outs.append(o)
        lses.append(s)
    out, lse = merge_partials_ref(outs, lses)
    want_out, want_lse = naive_attention(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos)
    check_against_naive(out, lse, want_out, want_lse)


def test_extreme_logits_stay_finite():
    q, k, v = make_qkv(97, 64, 3)
    q = q * 1e3
    q_pos, k_pos = causal_positions(97)
    out, lse = attention_partial_flash(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    want_out, want_lse = naive_attention(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    assert bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(lse[torch.isfinite(want_lse)]).all())
    # Scores of magnitude ~1e3 carry fp32 rounding of ~1e-4 (absolute), which moves the
    # near-one-hot softmax weights by as much: looser than the fp32 entry on purpose.
    torch.testing.assert_close(out.double(), want_out, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-3, rtol=1e-5)


def test_inputs_are_not_mutated():
    q, k, v = make_qkv(33, 64, 3)
    q_pos, k_pos = causal_positions(33)
    args = [q, k, v, q_pos, k_pos]
    before = [a.clone() for a in args]
    attention_partial_flash(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    assert all(torch.equal(a, b) for a, b in zip(args, before))


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq_len", [1, 33, 97])
@pytest.mark.parametrize("dtype", DTYPES_16, ids=["fp16", "bf16"])
def test_flash_16bit_matches_naive(dtype, seq_len, causal):
    q, k, v = make_qkv(seq_len, 64, 3, dtype=dtype)
    q_pos, k_pos = positions_or_none(seq_len, causal)
    out, lse = attention_partial_flash(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    want_out, want_lse = naive_attention(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    check_against_naive(out, lse, want_out, want_lse, dtype=dtype)


def test_zero_length_piece_is_empty():
    """A piece with no keys sees nothing: zeros and -inf (the fused op itself would crash)."""
    q = torch.randn(2, 3, 4, 64)
    k = v = torch.empty(2, 0, 64)
    out, lse = attention_partial_flash(q, k, v, scale=0.125)
    assert torch.equal(out, torch.zeros_like(q))
    assert bool(torch.isneginf(lse).all()) and lse.shape == (2, 3, 4)
