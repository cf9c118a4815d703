"""Attention partials ``(out, lse)`` of every implementation against an independent float64
attention (tests/attention_naive.py): the plain-torch reference (gpu_kernels.reference) and the
fused CPU flash path (cpu_kernels.flash_torch). One parametrized set, so both are held to the
same semantics. The merge itself is tested in tests/gpu_kernels/test_reference.py."""
from __future__ import annotations

import pytest
import torch

from cpu_kernels.flash_torch import attention_partial_flash, is_available
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
IMPLS = [
    pytest.param(attention_partial_ref, id="reference"),
    pytest.param(attention_partial_flash, id="flash_cpu", marks=pytest.mark.skipif(
        not is_available(torch.device("cpu")), reason="this torch build lacks the fused CPU flash op")),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_partial_matches_naive_fp32(impl, seq_len, head_dim, group, causal):
    q, k, v = make_qkv(seq_len, head_dim, group)
    q_pos, k_pos = positions_or_none(seq_len, causal)
    scale = default_scale(head_dim)
    out, lse = impl(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos)
    want_out, want_lse = naive_attention(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos)
    check_against_naive(out, lse, want_out, want_lse)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq_len", [1, 33, 97])
@pytest.mark.parametrize("dtype", DTYPES_16, ids=["fp16", "bf16"])
def test_partial_16bit_matches_naive(impl, dtype, seq_len, causal):
    q, k, v = make_qkv(seq_len, 64, 3, dtype=dtype)
    q_pos, k_pos = positions_or_none(seq_len, causal)
    out, lse = impl(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    # The oracle sees exactly the 16-bit values, upcast: only the kernel's rounding differs.
    want_out, want_lse = naive_attention(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    check_against_naive(out, lse, want_out, want_lse, dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES_16], ids=["fp32", "fp16", "bf16"])
def test_rows_seeing_no_key_are_zero_and_minus_inf(impl, seq_len, dtype):
    q, k, v = make_qkv(seq_len, 64, 3, dtype=dtype)
    q_pos, k_pos = causal_positions(seq_len)
    out, lse = impl(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    empty = (k_pos.view(1, -1) > q_pos.view(-1, 1)).all(dim=1)
    assert bool(empty.any()) and not bool(empty.all())
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert bool(torch.isneginf(lse[:, :, empty]).all())
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse[:, :, ~empty]).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_length_piece_is_empty(impl):
    """A piece with no keys sees nothing: zeros and -inf (the fused op itself would crash)."""
    q = torch.randn(2, 3, 4, 64)
    k = v = torch.empty(2, 0, 64)
    out, lse = impl(q, k, v, scale=0.125)
    assert torch.equal(out, torch.zeros_like(q))
    assert bool(torch.isneginf(lse).all()) and lse.shape == (2, 3, 4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_len,cuts", SPLITS)
@pytest.mark.parametrize("causal", CAUSAL)
def test_merge_of_disjoint_pieces_equals_whole(impl, seq_len, cuts, causal):
    """Partials over disjoint pieces merge into the whole (the decode path)."""
    q, k, v = make_qkv(seq_len, 80, 4)
    q_pos, k_pos = positions_or_none(seq_len, causal)
    scale = default_scale(80)
    bounds = [0, *cuts, seq_len]
    outs, lses = [], []
    for a, b in zip(bounds, bounds[1:]):
        piece_pos = None if k_pos is None else k_pos[a:b]
        o, s = impl(q, k[:, a:b], v[:, a:b], scale=scale, q_pos=q_pos, k_pos=piece_pos)
        outs.append(o)
        lses.append(s)
    out, lse = merge_partials_ref(outs, lses)
    want_out, want_lse = naive_attention(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos)
    check_against_naive(out, lse, want_out, want_lse)


@pytest.mark.parametrize("impl", IMPLS)
def test_piece_whose_keys_are_all_hidden_merges_as_noop(impl):
    """A piece made empty by the causal mask (every key after every query) merges away."""
    q, k, v = make_qkv(40, 64, 1)
    q_pos = torch.tensor([3, 5, 7, 9])
    k_pos = torch.arange(40)
    front_out, front_lse = impl(q, k[:, :20], v[:, :20], scale=0.125, q_pos=q_pos, k_pos=k_pos[:20])
    back_out, back_lse = impl(q, k[:, 20:], v[:, 20:], scale=0.125, q_pos=q_pos, k_pos=k_pos[20:])
    assert bool(torch.isneginf(back_lse).all()) and torch.equal(back_out, torch.zeros_like(back_out))
    out, lse = merge_partials_ref([front_out, back_out], [front_lse, back_lse])
    assert torch.equal(out, front_out) and torch.equal(lse, front_lse)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", CAUSAL)
def test_extreme_logits_stay_finite(impl, causal):
    q, k, v = make_qkv(97, 64, 3)
    q = q * 1e3
    q_pos, k_pos = positions_or_none(97, causal)
    out, lse = impl(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    want_out, want_lse = naive_attention(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    assert bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(lse[torch.isfinite(want_lse)]).all())
    # Scores of magnitude ~1e3 carry fp32 rounding of ~1e-4 (absolute), which moves the
    # near-one-hot softmax weights by as much: looser than the fp32 entry on purpose.
    torch.testing.assert_close(out.double(), want_out, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq_len", [31, 97])
def test_strided_qkv_views_give_same_result(impl, seq_len, causal):
    q, k, v = make_qkv(seq_len, 64, 4)
    q_pos, k_pos = positions_or_none(seq_len, causal)
    ks, vs = strided_like(k), strided_like(v)
    q = q.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # token-major, as the engine has it
    assert not q.is_contiguous()
    out, lse = impl(q, ks, vs, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    want_out, want_lse = naive_attention(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    check_against_naive(out, lse, want_out, want_lse)
    c_out, c_lse = impl(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out, c_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, c_lse, atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_are_not_mutated(impl):
    q, k, v = make_qkv(33, 64, 3)
    q_pos, k_pos = causal_positions(33)
    args = [q, k, v, q_pos, k_pos]
    before = [a.clone() for a in args]
    impl(q, k, v, scale=0.125, q_pos=q_pos, k_pos=k_pos)
    assert all(torch.equal(a, b) for a, b in zip(args, before))
