"""gpu_kernels.merge.merge_partials (Triton; interpreted without CUDA) against the torch
reference merge_partials_ref, and both against the float64 oracle of tests/attention_naive.py:
partials over disjoint key pieces must merge into the attention over all the keys."""
from __future__ import annotations

import pytest
import torch

import gpu_kernels.merge as merge_mod
from gpu_kernels.dispatch import interpreting
from gpu_kernels.merge import merge_partials
from gpu_kernels.reference import merge_partials_ref
from tests.attention_naive import make_qkv, naive_attention
from tests.tolerances import KERNEL_TOL, LSE_ATOL

NUM_PIECES = [1, 2, 5]
ROW_SHAPES = [(3,), (2, 7), (2, 3, 4)]
HEAD_DIMS = [64, 80, 128]
# (seq_len, cut points): the pieces of the keys, a 1-key piece included.
SPLITS = [(33, [16]), (97, [1, 32, 64]), (200, [50, 51, 120, 199])]
FP32_ATOL, FP32_RTOL = KERNEL_TOL[torch.float32]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def random_partials(num_pieces: int, rows: tuple[int, ...], head_dim: int, *,
                    empty_fraction: float = 0.3, device: str = "cpu"):
    """outs [P, *rows, head_dim], lses [P, *rows]; about empty_fraction of the (piece, row)
    entries are empty (out 0, lse -inf) and, unless it is 0, row 0 is empty in every piece."""
    outs = torch.randn(num_pieces, *rows, head_dim)
    lses = torch.randn(num_pieces, *rows) * 4
    empty = torch.rand(num_pieces, *rows) < empty_fraction
    empty.view(num_pieces, -1)[:, 0] = empty_fraction > 0
    lses[empty] = float("-inf")
    outs[empty] = 0.0
    return outs.to(device), lses.to(device)


def check_merged(out, lse, want_out, want_lse, lse_rtol: float = 0.0) -> None:
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), want_out.cpu().double(), atol=FP32_ATOL,
                               rtol=FP32_RTOL)
    torch.testing.assert_close(lse.cpu().double(), want_lse.cpu().double(),
                               atol=LSE_ATOL[torch.float32], rtol=lse_rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("rows", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("num_pieces", NUM_PIECES)
def test_kernel_matches_reference(num_pieces, rows, head_dim, device):
    outs, lses = random_partials(num_pieces, rows, head_dim, device=device)
    out, lse = merge_partials(outs, lses)
    want_out, want_lse = merge_partials_ref(list(outs), list(lses))
    check_merged(out, lse, want_out, want_lse)
    # Row 0 is empty in every piece.
    assert bool((out.reshape(-1, head_dim)[0] == 0).all())
    assert bool(torch.isneginf(lse.reshape(-1)[0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seq_len,cuts", SPLITS)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_merge_of_pieces_equals_naive_whole(impl, seq_len, cuts, device):
    """Attention over disjoint key pieces (float64 oracle, stored as float32 partials), merged,
    equals the oracle's attention over all the keys."""
    q, k, v = make_qkv(seq_len, 80, 3)
    bounds = [0, *cuts, seq_len]
    pieces = [naive_attention(q, k[:, lo:hi], v[:, lo:hi], scale=0.11)
              for lo, hi in zip(bounds, bounds[1:])]
    outs = torch.stack([o for o, _ in pieces]).float().to(device)
    lses = torch.stack([lse for _, lse in pieces]).float().to(device)
    if impl == "kernel":
        out, lse = merge_partials(outs, lses)
    else:
        out, lse = merge_partials_ref(list(outs), list(lses))
    want_out, want_lse = naive_attention(q, k, v, scale=0.11)
    check_merged(out, lse, want_out, want_lse)


@pytest.mark.parametrize("device", DEVICES)
def test_only_empty_pieces_give_zeros_and_minus_inf(device):
    outs = torch.zeros(3, 4, 5, 64, device=device)
    lses = torch.full((3, 4, 5), float("-inf"), device=device)
    out, lse = merge_partials(outs, lses)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


def test_empty_piece_output_is_ignored():
    """The kernel skips a piece whose lse is -inf, whatever its out holds."""
    outs, lses = random_partials(3, (4,), 64)
    want_out, want_lse = merge_partials_ref(list(outs), list(lses))
    outs[torch.isneginf(lses)] = float("nan")
    out, lse = merge_partials(outs, lses)
    check_merged(out, lse, want_out, want_lse)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_lses(device):
    """Pieces whose lse lie 2e4 apart: nothing overflows; the large piece dominates."""
    outs, lses = random_partials(4, (2, 3), 64, empty_fraction=0.0)
    lses[0] += 1e4
    lses[2] -= 1e4
    outs, lses = outs.to(device), lses.to(device)
    out, lse = merge_partials(outs, lses)
    want_out, want_lse = merge_partials_ref(list(outs), list(lses))
    assert bool(torch.isfinite(out).all()) and bool((lse > 9e3).all())
    # lse is ~1e4, where fp32 itself carries ~1e-3: add fp32's relative tolerance.
    check_merged(out, lse, want_out, want_lse, lse_rtol=FP32_RTOL)


def test_non_contiguous_inputs():
    """outs stored row-major [rows, P, hd] seen as [P, rows, hd]; lses transposed."""
    base_outs, base_lses = random_partials(3, (2, 5), 80)
    outs = base_outs.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)
    lses = base_lses.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert not outs.is_contiguous() and not lses.is_contiguous()
    out, lse = merge_partials(outs, lses)
    want_out, want_lse = merge_partials_ref(list(base_outs), list(base_lses))
    check_merged(out, lse, want_out, want_lse)


@pytest.mark.parametrize("num_pieces", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
def test_out_destinations(layout, num_pieces):
    outs, lses = random_partials(num_pieces, (2, 6), 64)
    out = {"contiguous": torch.full((2, 6, 64), 7.0),
           "sliced": torch.full((2, 6, 72), 7.0)[..., :64],
           "transposed": torch.full((6, 2, 64), 7.0).transpose(0, 1)}[layout]
    lse = torch.full((6, 2), 7.0).t()
    got_out, got_lse = merge_partials(outs, lses, out=out, lse=lse)
    assert got_out is out and got_lse is lse
    want_out, want_lse = merge_partials_ref(list(outs), list(lses))
    check_merged(out, lse, want_out, want_lse)


def test_inputs_not_mutated_and_not_aliased():
    outs, lses = random_partials(1, (3,), 64)
    before = (outs.clone(), lses.clone())
    out, lse = merge_partials(outs, lses)
    out.add_(1.0)
    lse.add_(1.0)
    assert torch.equal(outs, before[0]) and torch.equal(lses, before[1])


BAD = [
    ("list", "stacked tensors"), ("dtype", "must be float32"), ("no_pieces", r"P >= 1"),
    ("lse_shape", "lses must have shape"), ("out_shape", "out must be float32"),
    ("lse_dtype", "lse must be float32"),
]


@pytest.mark.parametrize("what,match", BAD, ids=[w for w, _ in BAD])
def test_bad_inputs_rejected(what, match):
    outs, lses = random_partials(2, (3,), 64)
    kw = {}
    if what == "list":
        outs, lses = list(outs), list(lses)
    elif what == "dtype":
        outs = outs.half()
    elif what == "no_pieces":
        outs, lses = outs[:0], lses[:0]
    elif what == "lse_shape":
        lses = lses[:, :2]
    elif what == "out_shape":
        kw["out"] = torch.empty(3, 32)
    else:
        kw["lse"] = torch.empty(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        merge_partials(outs, lses, **kw)


def _ref_raises(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("merge_partials fell back to the torch reference")

    monkeypatch.setattr(merge_mod, "merge_partials_ref", fail)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(),
                                                 reason="needs the interpreter")),
    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_launcher_runs_triton(monkeypatch, device):
    _ref_raises(monkeypatch)
    outs, lses = random_partials(3, (4,), 64, device=device)
    out, _ = merge_partials(outs, lses)
    assert out.device.type == device


def test_launcher_falls_back_to_reference_without_triton(monkeypatch):
    calls = []
    real = merge_mod.merge_partials_ref
    monkeypatch.setattr(merge_mod, "merge_partials_ref",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(merge_mod, "_merge_partials_kernel", None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    outs, lses = random_partials(3, (4,), 64)
    out, lse = merge_partials(outs, lses)
    want_out, want_lse = real(list(outs), list(lses))
    assert calls == [1]
    check_merged(out, lse, want_out, want_lse)
