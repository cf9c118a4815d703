"""cpu_kernels.attention (Numba) against the numpy reference, and the reference against a
float64 softmax written here over each KV head's keys laid out densely (it never sees slots).

Kernel and reference both widen 16-bit pages to float32 exactly and accumulate in float32,
so the float32 tolerance applies to every page dtype.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from cpu_kernels.attention import (
    attention_contiguous_pages,
    attention_contiguous_pages_trusted,
    attention_pages,
)
from cpu_kernels.inputs import kernel_pages
from cpu_kernels.reference import attention_pages_ref
from tests.cpu_kernels.arenas import (
    NUM_KV_HEADS,
    SPARE_SLOTS,
    Selection,
    make_selection,
    nan_arena,
    page_lens,
    to_numpy_f32,
)
from tests.tolerances import KERNEL_TOL, LSE_ATOL, kernel_tol

PS_MINUS_1, PS, PS_PLUS_1 = "ps-1", "ps", "ps+1"
SEQ_LENS = [1, PS_MINUS_1, PS, PS_PLUS_1, 97, 4096]
PAGE_SIZES = [16, 32]
HEAD_DIMS = [64, 80, 128, 256]
GROUPS = [1, 3, 4, 7]  # query heads per KV head
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Default matrix: every sequence length in every dtype at one shape, and every
# (head_dim, group) pair at one length; the full product runs under -m slow.
DEFAULT_CASES = ([(s, 16, 64, 3, d) for s in SEQ_LENS for d in DTYPES]
                 + [(97, 32, hd, g, torch.float32) for hd in HEAD_DIMS for g in GROUPS])
FULL_CASES = [(s, p, hd, g, d) for s in SEQ_LENS for p in PAGE_SIZES for hd in HEAD_DIMS
              for g in GROUPS for d in DTYPES]
SCENARIOS = ["empty", "all_lens_zero", "single_page", "one_head_empty", "per_head",
             "partial_middle"]
THREADS = [1, 2]
# First visible key (sliding-window rings), page size 16: (num_tokens, skip). 69 tokens are 4
# full pages and a partial one: skip nothing, inside the first page, the whole first page,
# inside the second, all but one key, all; then whole pages of an exact multiple, all of it,
# and no tokens at all.
SKIP_CASES = [(69, 0), (69, 5), (69, 16), (69, 20), (69, 68), (69, 69), (64, 48), (64, 64),
              (0, 0)]
SKIP_DTYPES = [torch.float32, torch.bfloat16]
SKIP_ENTRIES = ["checked", "trusted"]
# Per KV head (lens, starts) of each listed page: a cut in the first page, pages cut whole
# (starts == lens), starts past lens, and a head that sees nothing.
STARTS_SCENARIOS = {
    "first_page_cut": ([[16, 16, 7], [16, 16, 7]], [[5, 0, 0], [15, 0, 0]]),
    "whole_pages": ([[16, 16, 16, 3], [16, 9, 0, 0]], [[16, 16, 2, 0], [16, 3, 0, 0]]),
    "past_lens": ([[16, 4, 16], [5, 5, 5]], [[0, 9, 1], [0, 5, 4]]),
    "one_head_empty": ([[16, 7], [16, 7]], [[3, 0], [16, 7]]),
}
SCALE = 0.125
F32 = torch.float32


def _length(spec: int | str, page_size: int) -> int:
    return {PS_MINUS_1: page_size - 1, PS: page_size, PS_PLUS_1: page_size + 1}.get(spec, spec)


def _case_id(case: tuple) -> str:
    seq, ps, hd, g, dt = case
    return f"L{seq}-ps{ps}-d{hd}-g{g}-{str(dt).split('.')[-1]}"


def dense_attention_f64(sel: Selection, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Plain float64 softmax attention over each KV head's dense keys."""
    group = sel.q.shape[0] // NUM_KV_HEADS
    out = np.zeros(sel.q.shape)
    lse = np.full(sel.q.shape[0], -np.inf)
    for row in range(sel.q.shape[0]):
        keys, values = sel.keys[row // group], sel.values[row // group]
        if len(keys) == 0:
            continue
        scores = keys @ sel.q[row].astype(np.float64) * scale
        top = scores.max()
        w = np.exp(scores - top)
        out[row] = w @ values / w.sum()
        lse[row] = top + np.log(w.sum())
    return out, lse


def _assert_partial(out, lse, ref_out, ref_lse, num_keys: int) -> None:
    atol, rtol = kernel_tol(F32, num_keys)
    np.testing.assert_allclose(to_numpy_f32(out), ref_out, atol=atol, rtol=rtol)
    np.testing.assert_allclose(to_numpy_f32(lse), ref_lse, atol=LSE_ATOL[F32], rtol=0)


def _dense_selection(case: tuple, gen: np.random.Generator) -> Selection:
    seq, ps, hd, group, dtype = case
    n = _length(seq, ps)
    num_pages = -(-n // ps)
    lens = [page_lens(n, num_pages, ps)] * NUM_KV_HEADS
    return make_selection(lens, ps, hd, group, dtype, gen)


def _check_case(case: tuple) -> None:
    sel = _dense_selection(case, np.random.default_rng(1))
    out, lse = attention_pages(sel.q, sel.k, sel.v, sel.slots, sel.lens, scale=SCALE)
    ref_out, ref_lse = attention_pages_ref(sel.q, sel.k, sel.v, sel.slots, sel.lens, scale=SCALE)
    n = int(sel.lens.sum(axis=1).max())
    _assert_partial(out, lse, ref_out, ref_lse, n)
    oracle_out, oracle_lse = dense_attention_f64(sel, SCALE)
    _assert_partial(ref_out, ref_lse, oracle_out, oracle_lse, n)


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=_case_id)
def test_matches_reference(case):
    _check_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES, ids=_case_id)
def test_matches_reference_full(case):
    _check_case(case)


def _scenario_lens(name: str, ps: int) -> list[np.ndarray]:
    full = np.full(3, ps, dtype=np.int32)
    return {
        "empty": [np.zeros(0, np.int32)] * NUM_KV_HEADS,
        "all_lens_zero": [np.zeros(3, np.int32)] * NUM_KV_HEADS,
        "single_page": [np.array([5], np.int32)] * NUM_KV_HEADS,
        "one_head_empty": [full, np.zeros(3, np.int32)],
        "per_head": [np.array([ps, ps, 7, 0], np.int32), np.array([3, 0, 0, 0], np.int32)],
        "partial_middle": [np.array([ps, 2, ps], np.int32), full],
    }[name]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sparse_selections(scenario, dtype):
    sel = make_selection(_scenario_lens(scenario, 16), 16, 64, 3, dtype, np.random.default_rng(2))
    out, lse = attention_pages(sel.q, sel.k, sel.v, sel.slots, sel.lens, scale=SCALE)
    oracle_out, oracle_lse = dense_attention_f64(sel, SCALE)
    _assert_partial(out, lse, oracle_out, oracle_lse, 64)
    empty_heads = np.repeat(sel.lens.sum(axis=1) == 0, 3)
    assert np.all(out[empty_heads] == 0) and np.all(lse[empty_heads] == -np.inf)


@pytest.mark.parametrize("seq", SEQ_LENS + [0])
def test_contiguous_pages(seq):
    ps, gen = 16, np.random.default_rng(3)
    n = _length(seq, ps)
    num_pages = max(1, -(-n // ps))
    sel = make_selection([page_lens(max(n, 1), num_pages, ps)] * NUM_KV_HEADS, ps, 80, 4,
                         torch.bfloat16, gen)
    slots = sel.slots[0]
    sel.v[1, slots] = sel.v[0, slots]  # every head reads the same slots: give them data
    sel.k[1, slots] = sel.k[0, slots]
    out, lse = attention_contiguous_pages(sel.q, sel.k, sel.v, slots, n, scale=SCALE)
    lens = np.broadcast_to(page_lens(n, num_pages, ps), sel.slots.shape)
    ref_out, ref_lse = attention_pages_ref(sel.q, sel.k, sel.v, sel.slots[[0, 0]], lens, scale=SCALE)
    _assert_partial(out, lse, ref_out, ref_lse, n)
    assert isinstance(out, np.ndarray) and (n > 0) == bool(np.isfinite(lse).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq", [1, 37, 200])
def test_trusted_entry_matches_the_reference(seq, dtype):
    """The engine's unchecked entry point over numpy views of an arena (strided too, as a
    staging buffer's K pages are) gives the reference's partial."""
    ps, gen = 16, np.random.default_rng(5)
    num_pages = -(-seq // ps)
    sel = make_selection([page_lens(seq, num_pages, ps)] * NUM_KV_HEADS, ps, 64, 4, dtype, gen)
    slots = sel.slots[0]
    sel.v[1, slots] = sel.v[0, slots]
    sel.k[1, slots] = sel.k[0, slots]
    staged = torch.stack([sel.k, sel.v], dim=2)  # [nkv, slots, 2, ps, hd]: K and V interleaved per slot
    k, v = staged[:, :, 0], staged[:, :, 1]
    assert not k.is_contiguous()
    q = np.ascontiguousarray(np.asarray(sel.q, dtype=np.float32))
    out, lse = attention_contiguous_pages_trusted(q, kernel_pages(k, "k", 4), kernel_pages(v, "v", 4),
                                                  np.asarray(slots, dtype=np.int32), seq, SCALE)
    lens = np.broadcast_to(page_lens(seq, num_pages, ps), sel.slots.shape)
    ref_out, ref_lse = attention_pages_ref(sel.q, sel.k, sel.v, sel.slots[[0, 0]], lens, scale=SCALE)
    _assert_partial(out, lse, ref_out, ref_lse, seq)


def _extreme_case(kind: str, dtype: torch.dtype) -> tuple[Selection, np.ndarray]:
    """Integer q (|q_c| in 100..300) and keys in {-1, 0, 1}: every score is an exact integer
    of magnitude ~1e4, identical in kernel and reference.

    'peak': query head j's own key sign(q_j) sits at position pos[j] and beats every other key
    by >= 100. 'negative': a group shares one sign pattern and every key opposes it, so all
    scores are around -1e4.
    """
    gen = np.random.default_rng(4)
    ps, hd, group, n = 16, 64, 3, 192
    sel = make_selection([page_lens(n, n // ps, ps)] * NUM_KV_HEADS, ps, hd, group, dtype, gen)
    mags = gen.integers(100, 301, sel.q.shape)
    pos = gen.permutation(n)[: NUM_KV_HEADS * group].reshape(NUM_KV_HEADS, group)
    if kind == "peak":
        signs = gen.choice([-1, 1], sel.q.shape)
        keys = gen.integers(-1, 2, (NUM_KV_HEADS, n, hd))
        for h in range(NUM_KV_HEADS):
            keys[h, pos[h]] = signs[h * group:(h + 1) * group]
    else:
        head_signs = gen.choice([-1, 1], (NUM_KV_HEADS, hd))
        signs = np.repeat(head_signs, group, axis=0)
        keys = -gen.integers(0, 2, (NUM_KV_HEADS, n, hd)) * head_signs[:, None, :]
    sel.q[:] = mags * signs
    for h in range(NUM_KV_HEADS):
        pages = torch.from_numpy(keys[h].astype(np.float32)).view(n // ps, ps, hd)
        sel.k[h, torch.from_numpy(sel.slots[h]).long()] = pages.to(dtype)
    return sel, pos


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["peak", "negative"])
def test_extreme_logits(kind, dtype):
    sel, pos = _extreme_case(kind, dtype)
    out, lse = attention_pages(sel.q, sel.k, sel.v, sel.slots, sel.lens, scale=1.0)
    ref_out, ref_lse = attention_pages_ref(sel.q, sel.k, sel.v, sel.slots, sel.lens, scale=1.0)
    atol, rtol = KERNEL_TOL[F32]
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=rtol)
    # lse is ~1e4: one float32 ulp there is ~1e-3, so it is compared relatively.
    np.testing.assert_allclose(lse, ref_lse, atol=LSE_ATOL[F32], rtol=rtol)
    if kind == "peak":
        group = sel.q.shape[0] // NUM_KV_HEADS
        for row in range(sel.q.shape[0]):
            h, j = divmod(row, group)
            v_row = to_numpy_f32(sel.v[h, sel.slots[h, pos[h, j] // 16], pos[h, j] % 16])
            np.testing.assert_allclose(out[row], v_row, atol=atol, rtol=rtol)
            np.testing.assert_allclose(lse[row], np.abs(sel.q[row]).sum(), atol=0, rtol=rtol)
    else:
        assert (lse < -1000).all()


@pytest.fixture(scope="module")
def sel97() -> Selection:
    return make_selection([page_lens(97, 7, 16), page_lens(60, 7, 16)], 16, 64, 3, torch.float32,
                          np.random.default_rng(5))


def _numpy_pages(x: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return x.to(dtype).numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_numpy_and_torch_inputs_agree(sel97, dtype):
    """numpy pages give numpy results equal to those of the same pages as torch tensors."""
    k_np, v_np = _numpy_pages(sel97.k, dtype), _numpy_pages(sel97.v, dtype)
    out_np, lse_np = attention_pages(sel97.q, k_np, v_np, sel97.slots, sel97.lens, scale=SCALE)
    out_t, lse_t = attention_pages(torch.from_numpy(sel97.q), sel97.k.to(dtype), sel97.v.to(dtype),
                                   torch.from_numpy(sel97.slots), torch.from_numpy(sel97.lens),
                                   scale=SCALE)
    assert isinstance(out_np, np.ndarray) and isinstance(out_t, torch.Tensor)
    assert out_t.dtype == torch.float32 and lse_t.shape == (6,)
    np.testing.assert_array_equal(out_np, out_t.numpy())
    np.testing.assert_array_equal(lse_np, lse_t.numpy())
    ref = attention_pages_ref(sel97.q, k_np, v_np, sel97.slots, sel97.lens, scale=SCALE)
    _assert_partial(out_np, lse_np, *ref, 97)


def _strided(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same pages as a non-contiguous view: every other slot of a bigger arena, or the
    first head_dim channels of wider rows."""
    nkv, slots, ps, hd = x.shape
    if how == "slot_stride":
        big = torch.full((nkv, 2 * slots, ps, hd), float("nan"), dtype=x.dtype)
        big[:, ::2] = x
        return big[:, ::2]
    big = torch.full((nkv, slots, ps, hd + 16), float("nan"), dtype=x.dtype)
    big[..., :hd] = x
    return big[..., :hd]


@pytest.mark.parametrize("how", ["slot_stride", "row_stride"])
def test_non_contiguous_inputs(sel97, how):
    """Strided float32 pages (16-bit pages are always converted through a buffer, strided or
    not, so float32 is the layout-sensitive case)."""
    dtype = torch.float32
    k, v = _strided(sel97.k.to(dtype), how), _strided(sel97.v.to(dtype), how)
    assert not k.is_contiguous()
    wide_q = np.zeros((6, 128), np.float32)
    wide_q[:, ::2] = sel97.q
    slots_f_order = np.asfortranarray(sel97.slots)  # index arrays may have any layout too
    out, lse = attention_pages(wide_q[:, ::2], k, v, slots_f_order, sel97.lens, scale=SCALE)
    ref = attention_pages_ref(sel97.q, sel97.k.to(dtype), sel97.v.to(dtype), sel97.slots,
                              sel97.lens, scale=SCALE)
    _assert_partial(out, lse, *ref, 97)


def test_inputs_not_mutated(sel97):
    before = [x.copy() if isinstance(x, np.ndarray) else x.clone()
              for x in (sel97.q, sel97.k, sel97.v, sel97.slots, sel97.lens)]
    attention_pages(sel97.q, sel97.k, sel97.v, sel97.slots, sel97.lens, scale=SCALE)
    after = (sel97.q, sel97.k, sel97.v, sel97.slots, sel97.lens)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


@pytest.mark.parametrize("threads", THREADS)
def test_thread_counts(sel97, threads):
    before = numba.get_num_threads()
    out, lse = attention_pages(sel97.q, sel97.k, sel97.v, sel97.slots, sel97.lens, scale=SCALE,
                               num_threads=min(threads, numba.config.NUMBA_NUM_THREADS))
    assert numba.get_num_threads() == before
    _assert_partial(out, lse, *dense_attention_f64(sel97, SCALE), 97)


def _bad(sel: Selection, what: str) -> dict:
    args = dict(q=sel.q, k_pages=sel.k, v_pages=sel.v, slots=sel.slots, lens=sel.lens, scale=SCALE)
    slots_out = sel.slots.copy()
    slots_out[0, 0] = sel.k.shape[1]
    lens_big = sel.lens.copy()
    lens_big[0, 0] = 17
    changes = {
        "q_dtype": dict(q=sel.q.astype(np.float64)),
        "q_ndim": dict(q=sel.q[0]),
        "q_head_dim": dict(q=sel.q[:, :32]),
        "q_heads": dict(q=sel.q[:5]),
        "kv_shape": dict(v_pages=sel.v[:, :-1]),
        "kv_dtype": dict(v_pages=sel.v.to(torch.float16)),
        "k_dtype": dict(k_pages=sel.k.double(), v_pages=sel.v.double()),
        "k_numpy_dtype": dict(k_pages=sel.k.double().numpy(), v_pages=sel.v.double().numpy()),
        "k_ndim": dict(k_pages=sel.k[0], v_pages=sel.v[0]),
        "slots_ndim": dict(slots=sel.slots[0]),
        "slots_heads": dict(slots=sel.slots[:1], lens=sel.lens[:1]),
        "lens_shape": dict(slots=sel.slots[:, :-1]),
        "slots_float": dict(slots=sel.slots.astype(np.float32)),
        "slot_range": dict(slots=slots_out),
        "lens_range": dict(lens=lens_big),
        "scale": dict(scale=float("nan")),
        "threads": dict(num_threads=0),
        "starts_range": dict(starts=np.full(sel.lens.shape, 17, np.int32)),
        "starts_negative": dict(starts=np.full(sel.lens.shape, -1, np.int32)),
        "starts_shape": dict(starts=np.zeros((NUM_KV_HEADS, 3), np.int32)),
        "starts_float": dict(starts=np.zeros(sel.lens.shape, np.float32)),
    }
    args.update(changes[what])
    return args


BAD_INPUTS = [
    ("q_dtype", "q must be float32"), ("q_ndim", r"q must be \[num_heads, head_dim\]"),
    ("q_head_dim", "head_dim"), ("q_heads", "multiple of num_kv_heads"),
    ("kv_shape", "share shape and dtype"), ("kv_dtype", "share shape and dtype"),
    ("k_dtype", "float32, float16 or bfloat16"), ("k_numpy_dtype", "float32 or float16"),
    ("k_ndim", "4 dimensions"), ("slots_ndim", r"slots must be \[num_kv_heads, M\]"),
    ("slots_heads", "slots must have shape"), ("lens_shape", "lens must have shape"),
    ("slots_float", "integers"), ("slot_range", "slots with lens > 0 must lie"),
    ("lens_range", "lens must lie in 0..page_size"), ("scale", "scale must be finite"),
    ("threads", "num_threads must be"),
    ("starts_range", r"starts must lie in 0\.\.page_size \(16\)"),
    ("starts_negative", r"starts must lie in 0\.\.page_size \(16\)"),
    ("starts_shape", "starts must have shape"), ("starts_float", "starts must hold integers"),
]


@pytest.mark.parametrize("what,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_rejected(sel97, what, match):
    with pytest.raises(ValueError, match=match):
        attention_pages(**_bad(sel97, what))


@pytest.mark.parametrize("num_tokens,match", [(7 * 16 + 1, "num_tokens must lie"),
                                              (-1, "num_tokens must lie")])
def test_contiguous_bad_num_tokens(sel97, num_tokens, match):
    with pytest.raises(ValueError, match=match):
        attention_contiguous_pages(sel97.q, sel97.k, sel97.v, sel97.slots[0], num_tokens, scale=SCALE)


@pytest.mark.parametrize("num_tokens,skip", [(97, -1), (97, 98), (0, 1), (97, 2.0), (97, True)])
def test_contiguous_bad_skip(sel97, num_tokens, skip):
    match = rf"skip must be an int in 0\.\.num_tokens \({num_tokens}\)"
    with pytest.raises(ValueError, match=match):
        attention_contiguous_pages(sel97.q, sel97.k, sel97.v, sel97.slots[0], num_tokens,
                                   scale=SCALE, skip=skip)


def test_contiguous_bad_slots(sel97):
    with pytest.raises(ValueError, match="slots_1d must be 1-D"):
        attention_contiguous_pages(sel97.q, sel97.k, sel97.v, sel97.slots, 16, scale=SCALE)


@pytest.mark.gpu
def test_cuda_pages_rejected(sel97):
    """Pages must be in host memory: a CUDA tensor is refused with a hint, not copied."""
    with pytest.raises(ValueError, match="must live on the CPU"):
        attention_pages(sel97.q, sel97.k.cuda(), sel97.v.cuda(), sel97.slots, sel97.lens, scale=SCALE)


def test_one_kv_head_many_pages():
    """One KV head and many pages: the work is split into page ranges and merged by lse."""
    sel = make_selection([page_lens(1000, 63, 16), np.zeros(63, np.int32)], 16, 64, 7,
                         torch.float32, np.random.default_rng(6))
    k, v = sel.k[:1], sel.v[:1]
    out, lse = attention_pages(sel.q[:7], k, v, sel.slots[:1], sel.lens[:1], scale=SCALE,
                               num_threads=numba.config.NUMBA_NUM_THREADS)
    oracle = dense_attention_f64(sel, SCALE)
    _assert_partial(out, lse, oracle[0][:7], oracle[1][:7], 1000)


# --- first visible key: a sliding-window ring whose first page(s) hold keys out of the window ---

def _poison(arena: torch.Tensor, h: int, slot: int, rows: int) -> None:
    """NaN into the first ``rows`` rows of a page: a kernel that reads a hidden key turns NaN."""
    if rows > 0 and slot >= 0:
        arena[h, slot, :rows] = float("nan")


def _ring(num_tokens: int, skip: int, dtype: torch.dtype, gen: np.random.Generator) -> Selection:
    """Every KV head's ``num_tokens`` keys over the same shuffled slots (at least one listed
    page), with the oracle's keys (``keys``/``values``) cut by hand to ``skip .. num_tokens-1``
    and the hidden rows poisoned afterwards."""
    ps, hd, group = 16, 80, 3
    num_pages = max(1, -(-num_tokens // ps))
    num_slots = num_pages + SPARE_SLOTS
    slots = gen.permutation(num_slots)[:num_pages].astype(np.int32)
    k, v = nan_arena(num_slots, ps, hd), nan_arena(num_slots, ps, hd)
    for arena in (k, v):
        rows = torch.from_numpy(gen.standard_normal((NUM_KV_HEADS, num_tokens, hd))).float()
        for i, n in enumerate(page_lens(num_tokens, num_pages, ps)):
            arena[:, slots[i], :n] = rows[:, i * ps:i * ps + n]
    k, v = k.to(dtype), v.to(dtype)
    keys = [k[h, slots].reshape(-1, hd)[skip:num_tokens].double().numpy()
            for h in range(NUM_KV_HEADS)]
    values = [v[h, slots].reshape(-1, hd)[skip:num_tokens].double().numpy()
              for h in range(NUM_KV_HEADS)]
    for h in range(NUM_KV_HEADS):
        for i, slot in enumerate(slots):
            _poison(k, h, int(slot), min(ps, skip - i * ps))
            _poison(v, h, int(slot), min(ps, skip - i * ps))
    q = gen.standard_normal((NUM_KV_HEADS * group, hd)).astype(np.float32)
    lens = np.broadcast_to(page_lens(num_tokens, num_pages, ps), (NUM_KV_HEADS, num_pages))
    return Selection(q, k, v, np.broadcast_to(slots, lens.shape), lens, keys, values)


@pytest.mark.parametrize("entry", SKIP_ENTRIES)
@pytest.mark.parametrize("dtype", SKIP_DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens,skip", SKIP_CASES,
                         ids=[f"n{n}-skip{s}" for n, s in SKIP_CASES])
def test_contiguous_skip(num_tokens, skip, dtype, entry):
    """The checked and the trusted dense entries hide the first ``skip`` tokens, and never
    read them (they are NaN), against a float64 softmax over the visible keys."""
    sel = _ring(num_tokens, skip, dtype, np.random.default_rng(7))
    slots = np.ascontiguousarray(sel.slots[0])
    if entry == "checked":
        out, lse = attention_contiguous_pages(sel.q, sel.k, sel.v, slots, num_tokens, scale=SCALE,
                                              skip=skip)
    else:
        out, lse = attention_contiguous_pages_trusted(sel.q, kernel_pages(sel.k, "k", 4),
                                                      kernel_pages(sel.v, "v", 4), slots,
                                                      num_tokens, SCALE, skip=skip)
    _assert_partial(out, lse, *dense_attention_f64(sel, SCALE), num_tokens - skip)
    if skip == num_tokens:
        assert np.all(out == 0) and np.all(lse == -np.inf)
    else:
        assert np.isfinite(out).all() and np.isfinite(lse).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scenario", list(STARTS_SCENARIOS))
def test_pages_with_starts(scenario, dtype):
    """Per-page first visible rows: page i of KV head h gives rows starts..lens-1. A page with
    starts >= lens gives nothing and its slot (set to -1 here) is never checked or read."""
    lens_list, starts_list = STARTS_SCENARIOS[scenario]
    lens = [np.array(x, np.int32) for x in lens_list]
    sel = make_selection(lens, 16, 64, 3, dtype, np.random.default_rng(8))
    starts = np.array(starts_list, np.int32)
    keys, values = [], []
    for h in range(NUM_KV_HEADS):
        pieces = [(int(sel.slots[h, i]), int(starts[h, i]), int(sel.lens[h, i]))
                  for i in range(sel.slots.shape[1]) if sel.lens[h, i] > starts[h, i]]
        keys.append(np.concatenate([sel.k[h, s, a:b].double().numpy() for s, a, b in pieces]
                                   or [np.zeros((0, 64))]))
        values.append(np.concatenate([sel.v[h, s, a:b].double().numpy() for s, a, b in pieces]
                                     or [np.zeros((0, 64))]))
    for h in range(NUM_KV_HEADS):
        for i in range(sel.slots.shape[1]):
            _poison(sel.k, h, int(sel.slots[h, i]), int(starts[h, i]))
            _poison(sel.v, h, int(sel.slots[h, i]), int(starts[h, i]))
    sel.slots[starts >= sel.lens] = -1
    # torch index arrays for the 16-bit pages, numpy for float32: both are accepted.
    starts_arg = starts if dtype == torch.float32 else torch.from_numpy(starts)
    out, lse = attention_pages(sel.q, sel.k, sel.v, sel.slots, sel.lens, scale=SCALE,
                               starts=starts_arg)
    oracle = Selection(sel.q, sel.k, sel.v, sel.slots, sel.lens, keys, values)
    _assert_partial(out, lse, *dense_attention_f64(oracle, SCALE), 64)
    empty_heads = np.repeat([len(x) == 0 for x in keys], 3)
    assert np.all(out[empty_heads] == 0) and np.all(lse[empty_heads] == -np.inf)
    assert np.isfinite(out).all()
