"""gpu_kernels.reference: attention partials and their log-sum-exp merge, against an
independent float64 attention (tests/attention_naive.py)."""
from __future__ import annotations

import pytest
import torch

from gpu_kernels.reference import attention_partial_ref, merge_partials_ref
from tests.attention_naive import (causal_positions, check_against_naive, default_scale, make_qkv,
                                   naive_attention, positions_or_none, strided_like)
from tests.tolerances import TOL

SEQ_LENS = [1, 31, 32, 33, 97]
HEAD_DIMS = [64, 80, 128]
GROUPS = [1, 3, 4]
CAUSAL = [False, True]
DTYPES_16 = [torch.float16, torch.bfloat16]
# (seq_len, cut points): two and three disjoint pieces, one cut inside the causal window.
SPLITS = [(2, [1]), (33, [16]), (97, [32, 64]), (97, [5, 90])]


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_partial_matches_naive_fp32(seq_len, head_dim, group, causal):
    q, k, v = make_qkv(seq_len, head_dim, group)
    q_pos, k_pos = positions_or_none(seq_len, causal)
    scale = default_scale(head_dim)
    out, lse = attention_partial_ref(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos)
    want_out, want_lse = naive_attention(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos)
    check_against_naive(out, lse, want_out, want_lse)


@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_rows_seeing_no_key_are_zero_and_minus_inf(seq_len):
    q, k, v = make_qkv(seq_len, 64, 3)
    q_pos, k_pos = causal_positions(seq_len)
    out, lse = attention_partial_ref(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    empty = (k_pos.view(1, -1) > q_pos.view(-1, 1)).all(dim=1)
    assert bool(empty.any()) and not bool(empty.all())
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert bool(torch.isneginf(lse[:, :, empty]).all())
    assert bool(torch.isfinite(lse[:, :, ~empty]).all())


@pytest.mark.parametrize("seq_len,cuts", SPLITS)
@pytest.mark.parametrize("causal", CAUSAL)
def test_merge_of_disjoint_pieces_equals_whole(seq_len, cuts, causal):
    q, k, v = make_qkv(seq_len, 80, 4)
    q_pos, k_pos = positions_or_none(seq_len, causal)
    scale = default_scale(80)
    bounds = [0, *cuts, seq_len]
    outs, lses = [], []
    for a, b in zip(bounds, bounds[1:]):
        piece_pos = None if k_pos is None else k_pos[a:b]
        o, s = attention_partial_ref(q, k[:, a:b], v[:, a:b], scale=scale, q_pos=q_pos, k_pos=piece_pos)
        outs.append(o)
        lses.append(s)
    out, lse = merge_partials_ref(outs, lses)
    want_out, want_lse = naive_attention(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos)
    check_against_naive(out, lse, want_out, want_lse)


@pytest.mark.parametrize("causal", CAUSAL)
def test_merge_with_empty_piece_is_noop(causal):
    q, k, v = make_qkv(33, 64, 3)
    q_pos, k_pos = positions_or_none(33, causal)
    out, lse = attention_partial_ref(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    cases = [([out, empty_out], [lse, empty_lse]),
             ([empty_out, out, empty_out], [empty_lse, lse, empty_lse])]
    for outs, lses in cases:
        m_out, m_lse = merge_partials_ref(outs, lses)
        assert torch.equal(m_out, out)
        assert torch.equal(m_lse, lse)


def test_merge_of_empty_pieces_only_is_empty():
    out = torch.zeros(2, 3, 4, 64)
    lse = torch.full((2, 3, 4), float("-inf"))
    m_out, m_lse = merge_partials_ref([out, out.clone()], [lse, lse.clone()])
    assert torch.equal(m_out, out)
    assert bool(torch.isneginf(m_lse).all())


def test_piece_whose_keys_are_all_hidden_merges_as_noop():
    """A piece made empty by the causal mask (every key after every query) merges away."""
    q, k, v = make_qkv(40, 64, 1)
    q_pos = torch.tensor([3, 5, 7, 9])
    k_pos = torch.arange(40)
    front_out, front_lse = attention_partial_ref(q, k[:, :20], v[:, :20], scale=0.125,
                                                 q_pos=q_pos, k_pos=k_pos[:20])
    back_out, back_lse = attention_partial_ref(q, k[:, 20:], v[:, 20:], scale=0.125,
                                               q_pos=q_pos, k_pos=k_pos[20:])
    assert bool(torch.isneginf(back_lse).all()) and torch.equal(back_out, torch.zeros_like(back_out))
    out, lse = merge_partials_ref([front_out, back_out], [front_lse, back_lse])
    assert torch.equal(out, front_out) and torch.equal(lse, front_lse)


@pytest.mark.parametrize("causal", CAUSAL)
def test_extreme_logits_stay_finite(causal):
    q, k, v = make_qkv(97, 64, 3)
    q = q * 1e3
    q_pos, k_pos = positions_or_none(97, causal)
    out, lse = attention_partial_ref(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    want_out, want_lse = naive_attention(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    seen = torch.isfinite(want_lse)
    assert bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(lse[seen]).all())
    # Scores of magnitude ~1e3 carry fp32 rounding of ~1e-4 (absolute), which moves the
    # near-one-hot softmax weights by as much: looser than the fp32 entry on purpose.
    torch.testing.assert_close(out.double(), want_out, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq_len", [31, 97])
def test_strided_qkv_views_give_same_result(seq_len, causal):
    q, k, v = make_qkv(seq_len, 64, 4)
    q_pos, k_pos = positions_or_none(seq_len, causal)
    ks, vs = strided_like(k), strided_like(v)
    q = q.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # token-major, as the engine has it
    assert not q.is_contiguous()
    out, lse = attention_partial_ref(q, ks, vs, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    want_out, want_lse = attention_partial_ref(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out, want_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, want_lse, atol=atol, rtol=rtol)
    n_out, n_lse = naive_attention(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    check_against_naive(out, lse, n_out, n_lse)


def test_inputs_are_not_mutated():
    q, k, v = make_qkv(33, 64, 3)
    q_pos, k_pos = causal_positions(33)
    args = [q, k, v, q_pos, k_pos]
    before = [a.clone() for a in args]
    out, lse = attention_partial_ref(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    assert all(torch.equal(a, b) for a, b in zip(args, before))
    outs, lses = [out, out * 2], [lse, lse - 1]
    merge_before = [t.clone() for t in outs + lses]
    merge_partials_ref(outs, lses)
    assert all(torch.equal(a, b) for a, b in zip(outs + lses, merge_before))


def test_merge_single_piece_returns_it():
    out, lse = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4)
    m_out, m_lse = merge_partials_ref([out], [lse])
    assert torch.equal(m_out, out) and torch.equal(m_lse, lse)


@pytest.mark.parametrize(
    "outs,lses",
    [
        ([], []),
        ([torch.zeros(2, 4)], []),
        ([torch.zeros(2, 4)] * 2, [torch.zeros(2)]),
        ([torch.zeros(2, 4)], [torch.zeros(2)] * 3),
    ],
    ids=["empty", "no-lse", "fewer-lses", "more-lses"],
)
def test_merge_rejects_mismatched_lists(outs, lses):
    with pytest.raises(ValueError, match="need as many outs as lses"):
        merge_partials_ref(outs, lses)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq_len", [1, 33, 97])
@pytest.mark.parametrize("dtype", DTYPES_16, ids=["fp16", "bf16"])
def test_partial_16bit_matches_naive(dtype, seq_len, causal):
    q, k, v = make_qkv(seq_len, 64, 3, dtype=dtype)
    q_pos, k_pos = positions_or_none(seq_len, causal)
    out, lse = attention_partial_ref(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    # The oracle sees exactly the 16-bit values, upcast: only the kernel's rounding differs.
    want_out, want_lse = naive_attention(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    check_against_naive(out, lse, want_out, want_lse, dtype=dtype)


def test_zero_length_piece_is_empty():
    """A piece with no keys at all sees nothing: zeros and -inf, like a fully masked one."""
    q = torch.randn(2, 3, 4, 64)
    k = v = torch.empty(2, 0, 64)
    out, lse = attention_partial_ref(q, k, v, scale=0.125)
    assert torch.equal(out, torch.zeros_like(q))
    assert bool(torch.isneginf(lse).all()) and lse.shape == (2, 3, 4)
