"""LSH sampling (MagicPIG, Chen et al., ICLR 2025) on the CPU: the Numba tables, retrieval and
weighted attention against the float64 reference of ``cpu_kernels.reference_lsh``; the
collision probability against scipy's binomial tail and against a Monte Carlo count over fresh
hyperplanes; and the estimator's own properties (its denominator unbiased, its output nearing
exact attention as the number of tables grows, the sampled region never overlapping the
exactly attended pages).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cpu_kernels.lsh import SEGMENT_TOKENS, Candidates, LshTables, hash_planes, query_codes, simhash_codes, thin
from cpu_kernels.lsh_attention import inclusion_probability, sampled_attention
from cpu_kernels.reference_lsh import (
    inclusion_probability_ref,
    lsh_attention_ref,
    lsh_candidates_ref,
    lsh_codes_ref,
)
from gpu_kernels.reference import attention_partial_ref, merge_partials_ref
from tests.tolerances import KERNEL_TOL, LSE_ATOL

PAGE_SIZE = 16
SCALE = 0.125
NO_CAP = 10**9
# (num_kv_heads, group, head_dim, bits, tables, min_hits, row cap, DISK share of pages, page cap)
CASES = [(1, 4, 64, 6, 40, 2, NO_CAP, 0.0, NO_CAP), (2, 3, 64, 6, 40, 2, 120, 0.0, NO_CAP),
         (3, 1, 80, 4, 12, 1, 50, 0.5, 20), (1, 2, 128, 8, 100, 3, NO_CAP, 0.3, NO_CAP),
         (2, 2, 64, 5, 30, 2, 60, 1.0, 15)]


def _data(seed: int, nkv: int, group: int, head_dim: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys with a common offset (as real keys have: centring matters), values, and queries of
    which the first points near one key."""
    rng = np.random.default_rng(seed)
    keys = (rng.standard_normal((nkv, n, head_dim)) + 0.7).astype(np.float32)
    values = rng.standard_normal((nkv, n, head_dim)).astype(np.float32)
    q = rng.standard_normal((nkv * group, head_dim)).astype(np.float32)
    q[0] = 2.0 * (keys[0, n // 2] - keys[0].mean(axis=0))
    return keys, values, q


def _arena(x: np.ndarray, perm: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """[nkv, n, hd] tokens as pages [nkv, num_slots, PAGE_SIZE, hd] at slots ``perm[page]``."""
    nkv, n, hd = x.shape
    pages = -(-n // PAGE_SIZE)
    padded = np.zeros((nkv, pages * PAGE_SIZE, hd), dtype=np.float32)
    padded[:, :n] = x
    arena = np.zeros((nkv, len(perm), PAGE_SIZE, hd), dtype=np.float32)
    arena[:, perm[:pages]] = padded.reshape(nkv, pages, PAGE_SIZE, hd)
    return torch.from_numpy(arena).to(dtype)


def test_codes_match_reference():
    keys, _, q = _data(0, 2, 3, 64, 5000)
    planes = hash_planes(11, 2, 64, 7, 9)
    mean = keys.mean(axis=1)
    codes = simhash_codes(keys, planes, 7, mean)
    for h in range(2):
        np.testing.assert_array_equal(codes[h], lsh_codes_ref(keys[h] - mean[h], planes[h], 7))
    qc = query_codes(q, planes, 7)
    for g in range(6):
        np.testing.assert_array_equal(qc[g], lsh_codes_ref(q[g:g + 1], planes[g // 3], 7)[:, 0])


def test_planes_come_from_the_seed():
    np.testing.assert_array_equal(hash_planes(5, 2, 64, 4, 3), hash_planes(5, 2, 64, 4, 3))
    assert not np.array_equal(hash_planes(5, 2, 64, 4, 3), hash_planes(6, 2, 64, 4, 3))


def _retrieve(t: LshTables, q: np.ndarray, *, lo: int, hi: int, min_hits: int, row_cap: int, disk_share: float,
              page_cap: int, salt: int) -> tuple[Candidates, np.ndarray]:
    """Retrieval thinned as a step would: DISK pages (a seeded share of them) capped to
    ``page_cap``, memory rows to ``row_cap`` per KV head. Returns the candidates and the
    DISK mask."""
    pages = -(-t.num_tokens // PAGE_SIZE)
    disk = np.random.default_rng(salt).random(pages) < disk_share
    cand = t.retrieve(q, lo=lo, hi=hi, min_hits=min_hits)
    nkv = t.mean.shape[0]
    thin(cand, group=q.shape[0] // nkv, page_size=PAGE_SIZE, disk_page=disk, row_caps=np.full(nkv, row_cap),
         page_cap=page_cap, salt=salt, scratch=t.scratch(q.shape[0])[0])
    return cand, disk


@pytest.mark.parametrize("nkv,group,hd,bits,tables,min_hits,row_cap,disk_share,page_cap", CASES)
def test_candidates_match_reference(nkv, group, hd, bits, tables, min_hits, row_cap, disk_share, page_cap):
    n, lo, hi, salt = 3000, PAGE_SIZE, 3000 - 3 * PAGE_SIZE, 99
    keys, _, q = _data(1, nkv, group, hd, n)
    t = LshTables(keys, bits=bits, tables=tables, seed=3)
    cand, disk = _retrieve(t, q, lo=lo, hi=hi, min_hits=min_hits, row_cap=row_cap, disk_share=disk_share,
                           page_cap=page_cap, salt=salt)
    ref, factors = lsh_candidates_ref(q, keys, t.planes, bits=bits, min_hits=min_hits, lo=lo, hi=hi, salt=salt,
                                      page_size=PAGE_SIZE, disk_page=disk, row_caps=np.full(nkv, row_cap),
                                      page_cap=page_cap)
    for g in range(nkv * group):
        order = np.argsort(cand.tokens[g, :cand.count[g]])
        mine = cand.tokens[g, :cand.count[g]][order]
        np.testing.assert_array_equal(mine, ref[g])
        assert ((mine >= lo) & (mine < hi)).all()  # never in the exactly attended pages
        np.testing.assert_allclose(cand.log_factor[g, :cand.count[g]][order], factors[g], rtol=1e-6, atol=1e-7)
    assert (t.scratch(nkv * group) == 0).all()  # the scratch is left zero
    assert cand.ids_scanned > 0
    kept_pages = {int(x) // PAGE_SIZE for r in ref for x in r if disk[x // PAGE_SIZE]}
    assert len(kept_pages) <= page_cap
    for h in range(nkv):
        rows = {int(x) for r in ref[h * group:(h + 1) * group] for x in r if not disk[x // PAGE_SIZE]}
        assert len(rows) <= row_cap


def test_segments_and_appended_tokens():
    """Tokens past a 32K segment and tokens appended after the build (scanned in the tail) are
    retrieved as the reference retrieves them, centred by the build's mean."""
    n0, n1 = SEGMENT_TOKENS + 700, 500
    keys, _, q = _data(2, 1, 2, 64, n0 + n1)
    t = LshTables(keys[:, :n0], bits=5, tables=6, seed=1)
    t.extend(keys[:, n0:n0 + 200])
    t.extend(keys[:, n0 + 200:])
    assert t.num_tokens == n0 + n1 and t.built == n0
    cand = t.retrieve(q, lo=100, hi=n0 + n1 - 50, min_hits=2)
    ref, _ = lsh_candidates_ref(q, keys, t.planes, bits=5, min_hits=2, lo=100, hi=n0 + n1 - 50,
                                mean=keys[:, :n0].mean(axis=1))
    for g in range(2):
        np.testing.assert_array_equal(np.sort(cand.tokens[g, :cand.count[g]]), ref[g])
    assert any((r >= SEGMENT_TOKENS).any() for r in ref) and any((r >= n0).any() for r in ref)
    t.truncate(n0 + 10)
    assert t.num_tokens == n0 + 10
    with pytest.raises(ValueError, match="bucketed"):
        t.truncate(n0 - 1)


# bf16 pages compile another specialization of the kernel (seconds on a fresh clone): slow suite.
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("nkv,group,hd,bits,tables,min_hits,row_cap,disk_share,page_cap", CASES[1:4])
def test_attention_matches_reference(dtype, nkv, group, hd, bits, tables, min_hits, row_cap, disk_share, page_cap):
    """Pages at shuffled slots, split between two arenas (each call attends its own rows):
    merged, they equal the float64 reference over the same candidates."""
    n, lo, hi, salt = 2000, PAGE_SIZE, 2000 - 2 * PAGE_SIZE, 5
    keys, values, q = _data(3, nkv, group, hd, n)
    if dtype != torch.float32:  # the reference sees the values the kernel widens
        keys = torch.from_numpy(keys).to(dtype).float().numpy()
        values = torch.from_numpy(values).to(dtype).float().numpy()
    t = LshTables(keys, bits=bits, tables=tables, seed=4)
    cand, disk = _retrieve(t, q, lo=lo, hi=hi, min_hits=min_hits, row_cap=row_cap, disk_share=disk_share,
                           page_cap=page_cap, salt=salt)
    pages = -(-n // PAGE_SIZE)
    perm = np.random.default_rng(0).permutation(pages + 5).astype(np.int32)
    k_arena, v_arena = _arena(keys, perm, dtype), _arena(values, perm, dtype)
    first = np.where(np.arange(pages) % 2 == 0, perm[:pages], -1).astype(np.int32)
    second = np.where(np.arange(pages) % 2 == 1, perm[:pages], -1).astype(np.int32)
    parts = [sampled_attention(q, k_arena, v_arena, s, cand, t.mean, bits=bits, tables=tables, min_hits=min_hits,
                               scale=SCALE) for s in (first, second)]
    out, lse = merge_partials_ref([torch.from_numpy(o) for o, _ in parts], [torch.from_numpy(s) for _, s in parts])
    ref_out, ref_lse = lsh_attention_ref(q, keys, values, t.planes, bits=bits, min_hits=min_hits, lo=lo, hi=hi,
                                         scale=SCALE, salt=salt, page_size=PAGE_SIZE, disk_page=disk,
                                         row_caps=np.full(nkv, row_cap), page_cap=page_cap)
    atol, rtol = KERNEL_TOL[torch.float32]
    np.testing.assert_allclose(out.numpy(), ref_out, atol=10 * atol, rtol=10 * rtol)
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=10 * LSE_ATOL[torch.float32], rtol=0)


def test_attention_rejects_bad_inputs():
    keys, values, q = _data(4, 1, 2, 64, 64)
    t = LshTables(keys, bits=4, tables=8, seed=0)
    cand = t.retrieve(q, lo=0, hi=64, min_hits=1)
    arena = _arena(keys, np.arange(4, dtype=np.int32), torch.float32)
    with pytest.raises(ValueError, match="beyond"):
        sampled_attention(q, arena, arena, np.zeros(1, dtype=np.int32), cand, t.mean, bits=4, tables=8,
                          min_hits=1, scale=SCALE)
    with pytest.raises(ValueError, match="does not fit"):
        sampled_attention(q[:, :32], arena, arena, np.arange(4, dtype=np.int32), cand, t.mean, bits=4, tables=8,
                          min_hits=1, scale=SCALE)
    with pytest.raises(ValueError, match="bits"):
        LshTables(keys, bits=17, tables=8, seed=0)


@pytest.mark.parametrize("bits,tables,min_hits", [(6, 40, 2), (10, 150, 2), (2, 5, 1), (16, 300, 3), (8, 1, 1)])
def test_inclusion_probability_closed_form(bits, tables, min_hits):
    cos = np.linspace(-0.999, 1.0, 401)
    ref = inclusion_probability_ref(cos, bits=bits, tables=tables, min_hits=min_hits)
    np.testing.assert_allclose(inclusion_probability(cos, bits=bits, tables=tables, min_hits=min_hits), ref,
                               rtol=1e-9)
    assert inclusion_probability(1.0, bits=bits, tables=tables, min_hits=min_hits)[0] == 1.0


@pytest.mark.parametrize("angle_deg", [20.0, 50.0, 80.0])
def test_inclusion_probability_matches_monte_carlo(angle_deg):
    """Fresh hyperplanes per trial: how often a key at a given angle to the query is retrieved
    lies within 4 standard errors of the closed form."""
    bits, tables, min_hits, trials, hd = 4, 12, 2, 4000, 32
    rng = np.random.default_rng(int(angle_deg))
    theta = np.deg2rad(angle_deg)
    q = np.zeros(hd)
    q[0] = 1.0
    key = np.zeros(hd)
    key[0], key[1] = np.cos(theta), np.sin(theta)
    planes = rng.standard_normal((trials, tables * bits, hd))
    same = ((planes @ q > 0) == (planes @ key > 0)).reshape(trials, tables, bits).all(axis=2)
    freq = (same.sum(axis=1) >= min_hits).mean()
    p = inclusion_probability(np.cos(theta), bits=bits, tables=tables, min_hits=min_hits)[0]
    assert abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / trials) + 1e-3, (freq, p)


def _exact_region(q, keys, values, lo, hi):
    """Exact (out, lse) of every query head over tokens [lo, hi)."""
    nkv = keys.shape[0]
    group = q.shape[0] // nkv
    qg = torch.from_numpy(q).double().view(nkv, group, 1, -1)
    out, lse = attention_partial_ref(qg, torch.from_numpy(keys[:, lo:hi]).double(),
                                     torch.from_numpy(values[:, lo:hi]).double(), scale=SCALE)
    return out.reshape(q.shape[0], -1).numpy(), lse.reshape(-1).numpy()


def test_denominator_is_unbiased():
    """Averaged over 80 hyperplane seeds, exp(lse) of the sampled piece estimates the exact sum
    of exp(score) over the region (importance weights 1 / P)."""
    n, lo, hi = 1500, 32, 1400
    keys, values, q = _data(5, 1, 2, 32, n)
    _, exact_lse = _exact_region(q, keys, values, lo, hi)
    sums = []
    arena = _arena(keys, np.arange(-(-n // PAGE_SIZE), dtype=np.int32), torch.float32)
    varena = _arena(values, np.arange(-(-n // PAGE_SIZE), dtype=np.int32), torch.float32)
    for seed in range(80):
        t = LshTables(keys, bits=3, tables=6, seed=seed)
        cand = t.retrieve(q, lo=lo, hi=hi, min_hits=2)
        _, lse = sampled_attention(q, arena, varena, np.arange(arena.shape[1], dtype=np.int32), cand, t.mean,
                                   bits=3, tables=6, min_hits=2, scale=SCALE)
        sums.append(np.exp(lse.astype(np.float64) - exact_lse))
    ratio = np.mean(sums, axis=0)  # E[estimate / exact] per query head
    se = np.std(sums, axis=0) / np.sqrt(len(sums))
    assert (np.abs(ratio - 1.0) <= 4 * se + 0.02).all(), (ratio, se)


def test_estimate_nears_exact_as_tables_grow():
    """Sampled piece over the middle, exact pieces over sink and window, merged: the error
    against exact attention over every token falls as L grows (K fixed), and is small once the
    sampled region is nearly all retrieved (no token counted twice: a double count would
    leave the error high)."""
    n, lo, hi = 1200, 32, 1100
    keys, values, q = _data(6, 2, 2, 32, n)
    exact_out, _ = _exact_region(q, keys, values, 0, n)
    errors = []
    for tables in (4, 16, 64, 256):
        err = []
        for seed in range(5):
            t = LshTables(keys, bits=3, tables=tables, seed=seed)
            cand = t.retrieve(q, lo=lo, hi=hi, min_hits=2)
            slots = np.arange(-(-n // PAGE_SIZE), dtype=np.int32)
            part = sampled_attention(q, _arena(keys, slots, torch.float32), _arena(values, slots, torch.float32),
                                     slots, cand, t.mean, bits=3, tables=tables, min_hits=2, scale=SCALE)
            pieces = [_exact_region(q, keys, values, 0, lo), part, _exact_region(q, keys, values, hi, n)]
            out, _ = merge_partials_ref([torch.from_numpy(np.asarray(o, dtype=np.float64)) for o, _ in pieces],
                                        [torch.from_numpy(np.asarray(s, dtype=np.float64)) for _, s in pieces])
            err.append(np.linalg.norm(out.numpy() - exact_out) / np.linalg.norm(exact_out))
        errors.append(float(np.mean(err)))
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < 0.02, errors
