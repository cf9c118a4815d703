"""gpu_kernels.paged_attention (Triton; interpreted without CUDA) against the plain-torch
references in gpu_kernels.reference, and those references against the float64 oracle of
tests/attention_naive.py, which sees each sequence's keys as one contiguous tensor and never
touches a block table.

Every arena starts as NaN: only the rows of real tokens are written, so a kernel that reads
a padding row, an unused slot or a token outside the window turns the output into NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import gpu_kernels.paged_attention as pa
from gpu_kernels.dispatch import interpreting
from gpu_kernels.paged_attention import paged_decode_attention, sparse_paged_decode_attention
from gpu_kernels.reference import paged_decode_attention_ref, sparse_paged_decode_attention_ref
from tests.attention_naive import naive_attention
from tests.tolerances import KERNEL_TOL, LSE_ATOL, kernel_tol

PAGE_SIZES = [16, 32]
PS_MINUS_1, PS, PS_PLUS_1 = "ps-1", "ps", "ps+1"  # lengths relative to the page size
SEQ_LENS = [1, PS_MINUS_1, PS, PS_PLUS_1, 97, 4096]
HEAD_DIMS = [64, 80, 128]
GROUPS = [1, 3, 4, 7]  # query heads per KV head
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NUM_KV_HEADS = 2
# Windows smaller than, equal to and larger than the 97-token sequence, aligned or not.
WINDOWS = [1, 20, 32, 97, 512]
NUM_SPLITS = [1, 2, 5, 16]
SPARSE_SCENARIOS = ["empty", "single", "partial_last", "unordered", "per_head"]
# First visible key per sequence (sliding-window rings), page size 16: one batch of 69-token
# sequences (4 full pages and a partial one) cut at 0, inside the first page, at the whole
# first page, inside the second, leaving one key, and at every key; with each window. A
# 300-token pair spans several tiles and splits.
FIRST_KEYS = [0, 5, 16, 20, 68, 69]
FIRST_KEY_WINDOWS = [None, 1, 12, 40]
# Scores of about +-1e4 (exact integers, so kernel and reference see identical logits).
EXTREME_SHIFTS = [-9216.0, 9216.0]


def _length(spec: int | str, page_size: int) -> int:
    return {PS_MINUS_1: page_size - 1, PS: page_size, PS_PLUS_1: page_size + 1}.get(spec, spec)


def _cover(i: int) -> tuple:
    """Case i of the default matrix: every listed value appears, 4096 only twice."""
    return (SEQ_LENS[i % 6], PAGE_SIZES[i // 6], HEAD_DIMS[i % 3], GROUPS[i % 4],
            DTYPES[(i // 4) % 3])


DEFAULT_CASES = [_cover(i) for i in range(12)]
FULL_CASES = [(s, p, h, g, d) for s in SEQ_LENS for p in PAGE_SIZES for h in HEAD_DIMS
              for g in GROUPS for d in DTYPES]


def _case_id(case: tuple) -> str:
    seq, page_size, head_dim, group, dtype = case
    return f"L{seq}-ps{page_size}-d{head_dim}-g{group}-{str(dtype).split('.')[-1]}"


@dataclass
class Paged:
    """A batch in a page arena plus the same keys as contiguous tensors (for the oracle)."""
    q: torch.Tensor  # [B, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_kv_heads, num_slots, page_size, head_dim]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [B, max_pages] int32; -1 where unused
    seq_lens: torch.Tensor  # [B] int32
    keys: list[torch.Tensor]  # per sequence [num_kv_heads, L, head_dim], on the CPU
    values: list[torch.Tensor]

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens


def make_paged(lens: list[int], *, head_dim: int, group: int, page_size: int,
               dtype: torch.dtype, num_kv_heads: int = NUM_KV_HEADS, device: str = "cpu") -> Paged:
    """Random K/V written page by page to shuffled (scattered, non-ascending) slots."""
    pages = [-(-n // page_size) for n in lens]
    num_slots = sum(pages) + 3  # a few slots nobody uses
    slots = torch.randperm(num_slots).tolist()
    k_cache = torch.full((num_kv_heads, num_slots, page_size, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    block_table = torch.full((len(lens), max(pages, default=0) + 1), -1, dtype=torch.int32)
    keys, values = [], []
    for b, n in enumerate(lens):
        keys.append(torch.randn(num_kv_heads, n, head_dim).to(dtype))
        values.append(torch.randn(num_kv_heads, n, head_dim).to(dtype))
        for i in range(pages[b]):
            slot, rows = slots.pop(), slice(i * page_size, min((i + 1) * page_size, n))
            block_table[b, i] = slot
            k_cache[:, slot, : rows.stop - rows.start] = keys[b][:, rows]
            v_cache[:, slot, : rows.stop - rows.start] = values[b][:, rows]
    q = torch.randn(len(lens), num_kv_heads * group, head_dim).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return Paged(q.to(device), k_cache.to(device), v_cache.to(device), block_table.to(device),
                 seq_lens.to(device), keys, values)


def naive_pieces(p: Paged, scale: float, pieces: list[list[tuple[int, int]]]):
    """Oracle (float64, CPU): KV head h of sequence b sees the keys of the position ranges
    pieces[b][h] = [(lo, hi), ...] (none: zeros and -inf)."""
    num_kv_heads, head_dim = p.k_cache.shape[0], p.q.shape[2]
    q = p.q.cpu()
    outs, lses = [], []
    for b, per_head in enumerate(pieces):
        o_b, l_b = [], []
        for h, ranges in enumerate(per_head):
            ranges = ranges or [(0, 0)]
            keys = torch.cat([p.keys[b][h : h + 1, lo:hi] for lo, hi in ranges], dim=1)
            values = torch.cat([p.values[b][h : h + 1, lo:hi] for lo, hi in ranges], dim=1)
            qh = q[b].view(num_kv_heads, -1, 1, head_dim)[h : h + 1]
            o, lse = naive_attention(qh, keys, values, scale=scale)
            o_b.append(o.reshape(-1, head_dim))
            l_b.append(lse.reshape(-1))
        outs.append(torch.cat(o_b))
        lses.append(torch.cat(l_b))
    return torch.stack(outs), torch.stack(lses)


def dense_pieces(p: Paged, window: int | None) -> list[list[list[tuple[int, int]]]]:
    lens = p.seq_lens.tolist()
    return [[[(max(0, n - window) if window else 0, n)]] * p.k_cache.shape[0] for n in lens]


def check_close(out, lse, want_out, want_lse, dtype: torch.dtype, num_keys: int,
                lse_rtol: float = 0.0) -> None:
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    atol, rtol = kernel_tol(dtype, num_keys)
    torch.testing.assert_close(out.cpu().double(), want_out.cpu().double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu().double(), want_lse.cpu().double(), atol=LSE_ATOL[dtype],
                               rtol=lse_rtol)


def check_dense(p: Paged, dtype: torch.dtype, *, scale: float, window: int | None = None,
                num_splits: int | None = None) -> None:
    """Kernel vs reference (dtype tolerance) and reference vs oracle. The reference computes in
    fp32 from the same (upcast) inputs the oracle sees, so it is held to fp32's tolerance."""
    out, lse = paged_decode_attention(*p.args, scale=scale, window=window, num_splits=num_splits)
    ref_out, ref_lse = paged_decode_attention_ref(*p.args, scale=scale, window=window)
    num_keys = min(max(p.seq_lens.tolist()), window or 1 << 30)
    check_close(out, lse, ref_out, ref_lse, dtype, num_keys)
    want_out, want_lse = naive_pieces(p, scale, dense_pieces(p, window))
    check_close(ref_out, ref_lse, want_out, want_lse, torch.float32, num_keys)
    assert bool(torch.isfinite(out).all())


def _dense_case(case: tuple, device: str = "cpu") -> None:
    seq, page_size, head_dim, group, dtype = case
    n = _length(seq, page_size)
    # Three sequences of different lengths (n // 3 is 0 for n = 1: an empty sequence).
    p = make_paged([n, n // 3, page_size + 3], head_dim=head_dim, group=group,
                   page_size=page_size, dtype=dtype, device=device)
    check_dense(p, dtype, scale=1 / math.sqrt(head_dim))


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=_case_id)
def test_dense_matches_reference_and_naive(case):
    _dense_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES, ids=_case_id)
def test_dense_full_matrix(case):
    _dense_case(case)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sliding_window(window, dtype):
    p = make_paged([97, 50, 0], head_dim=64, group=4, page_size=16, dtype=dtype)
    check_dense(p, dtype, scale=0.125, window=window)


def test_head_dim_256_window_and_gemma_scale():
    """Gemma 3 shapes: 4 query heads on 1 KV head, head_dim 256, window 512 and a scale that is
    not head_dim**-0.5 (query_pre_attn_scalar**-0.5 with the scalar 168 here)."""
    p = make_paged([600, 100], head_dim=256, group=4, page_size=32, dtype=torch.bfloat16,
                   num_kv_heads=1)
    check_dense(p, torch.bfloat16, scale=168 ** -0.5, window=512)


@pytest.mark.parametrize("num_splits", NUM_SPLITS)
def test_explicit_num_splits(num_splits):
    """Any split count gives the same result, more splits than tiles included."""
    p = make_paged([300, 97, 0], head_dim=64, group=3, page_size=16, dtype=torch.float16)
    check_dense(p, torch.float16, scale=0.125, num_splits=num_splits)


def test_empty_sequences_and_empty_batch():
    p = make_paged([0, 0], head_dim=64, group=2, page_size=16, dtype=torch.float32)
    out, lse = paged_decode_attention(*p.args, scale=0.125)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    e = make_paged([], head_dim=64, group=2, page_size=16, dtype=torch.float32)
    out, lse = paged_decode_attention(*e.args, scale=0.125)
    assert out.shape == (0, 2 * NUM_KV_HEADS, 64) and lse.shape == (0, 2 * NUM_KV_HEADS)


# --- first visible key ------------------------------------------------------------------------

def _poison_hidden(p: Paged, lo: list[int]) -> None:
    """NaN into the arena rows of positions below lo[b] (keys out of a ring's window; the
    oracle's contiguous copies keep their values)."""
    page_size = p.k_cache.shape[2]
    for b, cut in enumerate(lo):
        for pos in range(cut):
            slot = int(p.block_table[b, pos // page_size])
            p.k_cache[:, slot, pos % page_size] = float("nan")
            p.v_cache[:, slot, pos % page_size] = float("nan")


def check_first_key(p: Paged, first_key: list[int], dtype: torch.dtype, *, window: int | None,
                    num_splits: int | None = None) -> None:
    """Kernel vs reference and reference vs the oracle over positions max(n - window,
    first_key) .. n-1 cut by hand; sequences with nothing visible give zeros and -inf."""
    lens = p.seq_lens.tolist()
    lo = [max(fk, n - window if window else 0) for fk, n in zip(first_key, lens)]
    _poison_hidden(p, lo)
    fk = torch.tensor(first_key, dtype=torch.int32, device=p.q.device)
    out, lse = paged_decode_attention(*p.args, scale=0.125, window=window, first_key=fk,
                                      num_splits=num_splits)
    ref_out, ref_lse = paged_decode_attention_ref(*p.args, scale=0.125, window=window,
                                                  first_key=fk)
    num_keys = max(n - a for n, a in zip(lens, lo))
    check_close(out, lse, ref_out, ref_lse, dtype, num_keys)
    pieces = [[[(a, n)]] * p.k_cache.shape[0] for a, n in zip(lo, lens)]
    want_out, want_lse = naive_pieces(p, 0.125, pieces)
    check_close(ref_out, ref_lse, want_out, want_lse, torch.float32, num_keys)
    empty = torch.tensor([a >= n for a, n in zip(lo, lens)], device=p.q.device)
    assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse[~empty]).all())


@pytest.mark.parametrize("window", FIRST_KEY_WINDOWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_first_key(window, dtype):
    """One batch whose rows each have their own first_key (GQA 3, shuffled slots)."""
    p = make_paged([69] * len(FIRST_KEYS), head_dim=64, group=3, page_size=16, dtype=dtype)
    check_first_key(p, FIRST_KEYS, dtype, window=window)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_first_key_long_sequences(num_splits):
    """300 tokens over 19 pages (tiles of 128 tokens): first_key 133 starts the walk at page 8
    with a cut inside it (two tiles, split further), 290 at page 18 (one tile)."""
    p = make_paged([300, 300, 0], head_dim=64, group=4, page_size=16, dtype=torch.float16)
    check_first_key(p, [133, 290, 0], torch.float16, window=None, num_splits=num_splits)


# --- sparse -----------------------------------------------------------------------------------

def make_selection(scenario: str, lens: list[int], page_size: int, num_kv_heads: int):
    """(selected [B, nkv, max_sel] int32, num_selected [B, nkv] int32) for a scenario; unused
    entries hold -7 (never read)."""
    rows = []
    for n in lens:
        num_pages, rows_b = -(-n // page_size), []
        for h in range(num_kv_heads):
            pages = torch.randperm(num_pages).tolist()
            pick = {"empty": [] if h == 0 else pages[:1],
                    "single": pages[:1],
                    "partial_last": [num_pages - 1] if num_pages else [],
                    "unordered": pages[: max(1, num_pages - 1)] if num_pages else [],
                    "per_head": pages[: h + 2]}[scenario]
            rows_b.append(pick)
        rows.append(rows_b)
    max_sel = max((len(r) for rb in rows for r in rb), default=0) + 1
    selected = torch.full((len(lens), num_kv_heads, max_sel), -7, dtype=torch.int32)
    num_selected = torch.zeros((len(lens), num_kv_heads), dtype=torch.int32)
    for b, rows_b in enumerate(rows):
        for h, pick in enumerate(rows_b):
            selected[b, h, : len(pick)] = torch.tensor(pick, dtype=torch.int32)
            num_selected[b, h] = len(pick)
    return selected, num_selected


def check_sparse(p: Paged, selected, num_selected, dtype, *, scale: float) -> None:
    page_size = p.k_cache.shape[2]
    args = (*p.args, selected, num_selected)
    out, lse = sparse_paged_decode_attention(*args, scale=scale)
    ref_out, ref_lse = sparse_paged_decode_attention_ref(*args, scale=scale)
    lens, sel, nsel = p.seq_lens.tolist(), selected.cpu(), num_selected.cpu()
    pieces = [[[(pg * page_size, min((pg + 1) * page_size, n))
                for pg in sel[b, h, : nsel[b, h]].tolist()] for h in range(sel.shape[1])]
              for b, n in enumerate(lens)]
    num_keys = max(lens, default=0)
    check_close(out, lse, ref_out, ref_lse, dtype, num_keys)
    want_out, want_lse = naive_pieces(p, scale, pieces)
    check_close(ref_out, ref_lse, want_out, want_lse, torch.float32, num_keys)


def _sparse_case(scenario, dtype, page_size, head_dim, device="cpu"):
    lens = [97, 2 * page_size + 5, page_size]
    p = make_paged(lens, head_dim=head_dim, group=3, page_size=page_size, dtype=dtype,
                   device=device)
    selected, num_selected = make_selection(scenario, lens, page_size, NUM_KV_HEADS)
    check_sparse(p, selected.to(device), num_selected.to(device), dtype, scale=0.1)
    if scenario == "empty":  # KV head 0 selected nothing: its query heads are empty
        out, lse = sparse_paged_decode_attention(*p.args, selected.to(device),
                                                 num_selected.to(device), scale=0.1)
        assert bool((out[:, :3] == 0).all()) and bool(torch.isneginf(lse[:, :3]).all())


@pytest.mark.parametrize("scenario", SPARSE_SCENARIOS)
@pytest.mark.parametrize("dtype,page_size,head_dim",
                         [(torch.float32, 16, 64), (torch.bfloat16, 32, 80)], ids=["fp32", "bf16"])
def test_sparse_matches_reference_and_naive(scenario, dtype, page_size, head_dim):
    _sparse_case(scenario, dtype, page_size, head_dim)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SPARSE_SCENARIOS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_sparse_full_matrix(scenario, dtype, page_size, head_dim):
    _sparse_case(scenario, dtype, page_size, head_dim)


def test_sparse_fp16_long_sequence():
    """Many selected pages over a 4096-token sequence (several tiles and splits)."""
    p = make_paged([4096], head_dim=128, group=4, page_size=32, dtype=torch.float16)
    selected = torch.full((1, 2, 72), -7, dtype=torch.int32)
    selected[0, 0, :40] = torch.randperm(128)[:40].to(torch.int32)
    selected[0, 1, :70] = torch.randperm(128)[:70].to(torch.int32)
    check_sparse(p, selected, torch.tensor([[40, 70]], dtype=torch.int32),
                 torch.float16, scale=128 ** -0.5)


# --- launcher behaviour -----------------------------------------------------------------------

def _extreme(shift: float, dtype: torch.dtype) -> Paged:
    """Integer-valued q and k (exact in every dtype, and so are their products and sums in
    fp32) with channel 0 shifting every score by `shift`: logits around +-1e4."""
    p = make_paged([97, 40], head_dim=64, group=4, page_size=16, dtype=dtype)
    q = torch.randint(-3, 4, p.q.shape).float() * 32
    q[..., 0] = shift / 3
    p.q = q.to(dtype)
    for b, k in enumerate(p.keys):
        k = torch.randint(-3, 4, k.shape).float()
        k[..., 0] = 3
        p.keys[b] = k.to(dtype)
        pages = p.block_table[b, : -(-k.shape[1] // 16)].long()
        padded = torch.cat([k, torch.zeros(k.shape[0], pages.numel() * 16 - k.shape[1], 64)], 1)
        p.k_cache[:, pages] = padded.view(k.shape[0], -1, 16, 64).to(dtype)
    return p


@pytest.mark.parametrize("shift", EXTREME_SHIFTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits(shift, dtype):
    """Scores of +-1e4 neither overflow nor underflow. lse is ~1e4 there, where fp32 itself
    carries ~1e-3: the lse check adds the dtype's relative tolerance."""
    p = _extreme(shift, dtype)
    out, lse = paged_decode_attention(*p.args, scale=1.0)
    assert 5e3 < float(lse.abs().min()) and bool(torch.isfinite(out).all())
    ref_out, ref_lse = paged_decode_attention_ref(*p.args, scale=1.0)
    check_close(out, lse, ref_out, ref_lse, dtype, 97, lse_rtol=KERNEL_TOL[dtype][1])
    want_out, want_lse = naive_pieces(p, 1.0, dense_pieces(p, None))
    check_close(ref_out, ref_lse, want_out, want_lse, torch.float32, 97,
                lse_rtol=KERNEL_TOL[torch.float32][1])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes (NaN == NaN), for before/after comparisons."""
    return t.contiguous().view(torch.uint8).clone()


def test_inputs_not_mutated():
    p = make_paged([97, 33], head_dim=64, group=3, page_size=16, dtype=torch.bfloat16)
    selected, num_selected = make_selection("per_head", [97, 33], 16, NUM_KV_HEADS)
    inputs = [*p.args, selected, num_selected]
    before = [_bits(t) for t in inputs]
    paged_decode_attention(*p.args, scale=0.125, window=40)
    sparse_paged_decode_attention(*p.args, selected, num_selected, scale=0.125)
    assert all(torch.equal(_bits(t), b) for t, b in zip(inputs, before))


def test_non_contiguous_inputs():
    """q from a head-major buffer, the arena as a token-major (NHD) buffer seen head-major,
    the block table a column slice of a wider table and seq_lens a strided slice."""
    p = make_paged([97, 40, 1], head_dim=80, group=4, page_size=16, dtype=torch.float16)
    q = p.q.transpose(0, 1).contiguous().transpose(0, 1)
    k = p.k_cache.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)
    v = p.v_cache.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)
    wide = torch.full((3, p.block_table.shape[1] + 4), -1, dtype=torch.int32)
    wide[:, : p.block_table.shape[1]] = p.block_table
    block_table = wide[:, : p.block_table.shape[1]]
    seq_lens = torch.stack([p.seq_lens, torch.zeros_like(p.seq_lens)], 1).flatten()[::2]
    views = (q, k, v, block_table, seq_lens)
    assert not any(t.is_contiguous() for t in views)
    out, lse = paged_decode_attention(*views, scale=0.1, num_splits=3)
    ref_out, ref_lse = paged_decode_attention_ref(*p.args, scale=0.1)
    check_close(out, lse, ref_out, ref_lse, torch.float16, 97)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
def test_out_destinations(layout, num_splits):
    """Results land in the given out/lse (sliced: flattens without a copy; transposed: not)."""
    p = make_paged([97, 40], head_dim=64, group=3, page_size=16, dtype=torch.float32)
    shape = (2, 3 * NUM_KV_HEADS, 64)
    out = {"contiguous": torch.full(shape, 7.0),
           "sliced": torch.full((2, 6, 72), 7.0)[..., :64],
           "transposed": torch.full((6, 2, 64), 7.0).transpose(0, 1)}[layout]
    lse = torch.full((6, 2), 7.0).t()
    got_out, got_lse = paged_decode_attention(*p.args, scale=0.125, num_splits=num_splits,
                                              out=out, lse=lse)
    assert got_out is out and got_lse is lse
    ref_out, ref_lse = paged_decode_attention_ref(*p.args, scale=0.125)
    check_close(out, lse, ref_out, ref_lse, torch.float32, 97)
    sel, nsel = make_selection("unordered", [97, 40], 16, NUM_KV_HEADS)
    out.fill_(7.0)
    sparse_paged_decode_attention(*p.args, sel, nsel, scale=0.125, out=out, lse=lse)
    ref_out, ref_lse = sparse_paged_decode_attention_ref(*p.args, sel, nsel, scale=0.125)
    check_close(out, lse, ref_out, ref_lse, torch.float32, 97)


def _bad_dense(p: Paged, what: str) -> tuple[tuple, dict]:
    q, k, v, bt, sl = p.args
    kw: dict = {"scale": 0.125}
    bad = {
        "q_rank": lambda: (q[0], k, v, bt, sl),
        "dtype_mix": lambda: (q, k.half(), v, bt, sl),
        "int64_table": lambda: (q, k, v, bt.long(), sl),
        "seq_lens_shape": lambda: (q, k, v, bt, sl[:1]),
        "head_dim": lambda: (q[..., :32], k, v, bt, sl),
        "heads_not_multiple": lambda: (q[:, :5], k, v, bt, sl),
        "too_long": lambda: (q, k, v, bt, sl + 1000),
        "bad_slot": lambda: (q, k, v, bt.masked_fill(bt == bt[0, 0], 10_000), sl),
        "head_dim_512": lambda: (q.new_zeros(2, 6, 512), k.new_zeros(*k.shape[:3], 512),
                                 v.new_zeros(*v.shape[:3], 512), bt, sl),
    }
    if what in bad:
        return bad[what](), kw
    kw.update({"window": {"window": 0}, "num_splits": {"num_splits": 0},
               "first_key_dtype": {"first_key": torch.zeros(2, dtype=torch.int64)},
               "first_key_shape": {"first_key": torch.zeros(3, dtype=torch.int32)},
               "first_key_past_len": {"first_key": torch.tensor([0, 41], dtype=torch.int32)},
               "first_key_negative": {"first_key": torch.tensor([-1, 0], dtype=torch.int32)},
               "scale": {"scale": float("inf")},
               "out": {"out": torch.empty(2, 6, 64, dtype=torch.float16)}}[what])
    return (q, k, v, bt, sl), kw


BAD_DENSE = [
    ("q_rank", "q must be"), ("dtype_mix", "share one dtype"),
    ("int64_table", "block_table must be an int32"),
    ("seq_lens_shape", "seq_lens"), ("head_dim", "head_dims must match"),
    ("heads_not_multiple", "multiple of num_kv_heads"), ("too_long", "seq_lens must lie"),
    ("bad_slot", "block_table entries"), ("head_dim_512", "head_dim must be <= 256"), ("window", "window must be"),
    ("num_splits", "num_splits must be"), ("scale", "scale must be"), ("out", "out must be"),
    ("first_key_dtype", "first_key must be an int32"),
    ("first_key_shape", r"first_key must be \[B=2\]"),
    ("first_key_past_len", r"first_key must lie in 0 \.\. seq_lens\[b\].*first_key\[1\] = 41"),
    ("first_key_negative", r"first_key must lie in 0 \.\. seq_lens\[b\].*first_key\[0\] = -1"),
]


@pytest.mark.parametrize("what,match", BAD_DENSE, ids=[w for w, _ in BAD_DENSE])
def test_bad_dense_inputs_rejected(what, match):
    p = make_paged([97, 40], head_dim=64, group=3, page_size=16, dtype=torch.float32)
    args, kw = _bad_dense(p, what)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(*args, **kw)


BAD_SPARSE = [("beyond_last_page", "selected ids in use"), ("negative", "selected ids in use"),
              ("repeat", "must not repeat"), ("count", "num_selected must lie"),
              ("shape", "selected must be")]


@pytest.mark.parametrize("what,match", BAD_SPARSE, ids=[w for w, _ in BAD_SPARSE])
def test_bad_sparse_inputs_rejected(what, match):
    p = make_paged([97, 40], head_dim=64, group=3, page_size=16, dtype=torch.float32)
    sel = torch.tensor([[[0, 6], [1, 2]], [[0, 1], [2, 0]]], dtype=torch.int32)
    nsel = torch.full((2, 2), 2, dtype=torch.int32)
    sparse_paged_decode_attention(*p.args, sel, nsel, scale=0.1)  # the unchanged input is fine
    if what == "beyond_last_page":
        sel[1, 0, 1] = 3  # sequence 1 has 40 tokens: pages 0..2
    elif what == "negative":
        sel[0, 1, 0] = -1
    elif what == "repeat":
        sel[1, 1, 1] = 2
    elif what == "count":
        nsel[0, 0] = 3
    else:
        sel = sel[:, :1]
    with pytest.raises(ValueError, match=match):
        sparse_paged_decode_attention(*p.args, sel, nsel, scale=0.1)


def _refs_raise(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the launcher fell back to the torch reference")

    monkeypatch.setattr(pa, "paged_decode_attention_ref", fail)
    monkeypatch.setattr(pa, "sparse_paged_decode_attention_ref", fail)


def _run_both(p: Paged) -> None:
    sel, nsel = make_selection("per_head", p.seq_lens.tolist(), p.k_cache.shape[2], NUM_KV_HEADS)
    paged_decode_attention(*p.args, scale=0.125)
    sparse_paged_decode_attention(*p.args, sel.to(p.q.device), nsel.to(p.q.device), scale=0.125)


@pytest.mark.skipif(not interpreting(), reason="the Triton path on CPU needs the interpreter")
def test_launcher_runs_triton_under_interpreter(monkeypatch):
    _refs_raise(monkeypatch)
    _run_both(make_paged([97], head_dim=64, group=2, page_size=16, dtype=torch.float32))


def test_launcher_falls_back_to_reference_without_triton(monkeypatch):
    """CPU tensors with the interpreter off: the reference answers (and the kernel is not run)."""
    calls = []
    for name in ("paged_decode_attention_ref", "sparse_paged_decode_attention_ref"):
        real = getattr(pa, name)
        monkeypatch.setattr(pa, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    monkeypatch.setattr(pa, "_launch", None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _run_both(make_paged([97], head_dim=64, group=2, page_size=16, dtype=torch.float32))
    assert len(calls) == 2


# --- compiled on CUDA -------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", DEFAULT_CASES, ids=_case_id)
def test_dense_cuda(case):
    _dense_case(case, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("scenario", SPARSE_SCENARIOS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_cuda(scenario, dtype):
    _sparse_case(scenario, dtype, 32, 128, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 40])
def test_first_key_cuda(window):
    p = make_paged([69] * len(FIRST_KEYS), head_dim=128, group=4, page_size=16,
                   dtype=torch.bfloat16, device="cuda")
    check_first_key(p, FIRST_KEYS, torch.bfloat16, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 512])
def test_llama8b_shape_32k_bf16_cuda(window):
    """Llama-3.1-8B decode: 32 query heads on 8 KV heads, head_dim 128, bf16, 32K tokens."""
    p = make_paged([32768], head_dim=128, group=4, page_size=32, dtype=torch.bfloat16,
                   num_kv_heads=8, device="cuda")
    out, lse = paged_decode_attention(*p.args, scale=128 ** -0.5, window=window)
    ref_out, ref_lse = paged_decode_attention_ref(*p.args, scale=128 ** -0.5, window=window)
    check_close(out, lse, ref_out, ref_lse, torch.bfloat16, min(32768, window or 32768))


@pytest.mark.gpu
def test_launcher_runs_triton_on_cuda(monkeypatch):
    _refs_raise(monkeypatch)
    _run_both(make_paged([4000, 97], head_dim=128, group=4, page_size=32, dtype=torch.bfloat16,
                         device="cuda"))
