"""gpu_kernels.reference.merge_partials_ref: the log-sum-exp merge of attention partials
(the partials themselves are tested for every implementation in tests/test_attention_partials.py)."""
from __future__ import annotations

import pytest
import torch

from gpu_kernels.reference import attention_partial_ref, merge_partials_ref
from tests.attention_naive import make_qkv, positions_or_none

CAUSAL = [False, True]


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


def test_merge_inputs_are_not_mutated():
    q, k, v = make_qkv(33, 64, 3)
    out, lse = attention_partial_ref(q, k, v, scale=0.125)
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
