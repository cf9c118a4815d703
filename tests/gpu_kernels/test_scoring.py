"""Page scoring: Quest bounds (Tang et al. 2024), InfiniGen-style partial-key scores (Lee et
al. 2024) and the page min / max metadata.

References against float64 computations written here (plus the properties that make the
scores useful: a Quest bound is >= every true score of its page and equals the best one for
one-token pages; partial-key scores over all channels are the true page maxima), and the
Triton kernels (interpreted on CPU, compiled on CUDA) against the references. All scoring
arithmetic is fp32 on exactly upcast inputs, so the fp32 tolerance applies to every dtype.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from gpu_kernels.reference_sparse import partial_key_page_scores_ref, quest_page_scores_ref
from gpu_kernels.scoring import page_key_bounds, partial_key_page_scores, quest_page_scores
from tests.tolerances import KERNEL_TOL

HEAD_DIMS = [64, 80, 128, 256]
GROUPS = [1, 3, 4, 7]
PAGE_SIZES = [16, 32]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NUM_KV_HEADS = 2
SCALE = 0.3
ATOL, RTOL = KERNEL_TOL[torch.float32]
# (head_dim, group, page_size, dtype, seq_lens of the batch): every listed value at least once,
# tail pages, an empty sequence, 4096 keys once.
CASES = [
    (64, 1, 16, torch.float32, (1, 15, 97)),
    (80, 3, 32, torch.float16, (31, 32, 33)),
    (128, 4, 16, torch.bfloat16, (16, 17, 0)),
    (256, 7, 32, torch.float32, (97,)),
    (128, 4, 32, torch.bfloat16, (4096,)),
]
FULL_CASES = [(hd, g, ps, dt, lens)
              for hd, g, ps, dt in itertools.product(HEAD_DIMS, GROUPS, PAGE_SIZES, DTYPES)
              for lens in [(1, ps - 1, ps), (ps + 1, 97)]]
CUDA_CASES = [(hd, g, 16, torch.bfloat16, (32768, 4096, 17)) for hd, g in zip(HEAD_DIMS, GROUPS)]


def make_case(head_dim, group, page_size, dtype, seq_lens, *, device="cpu", extra_slots=3):
    """q, the key arena (shuffled distinct slots, spare slots), a block table with one column
    past the longest sequence, seq_lens and pages per sequence."""
    batch = len(seq_lens)
    max_pages = -(-max(seq_lens) // page_size) + 1
    num_slots = batch * max_pages + extra_slots
    k_cache = torch.randn(NUM_KV_HEADS, num_slots, page_size, head_dim).to(dtype)
    table = torch.randperm(num_slots)[: batch * max_pages].view(batch, max_pages)
    q = torch.randn(batch, NUM_KV_HEADS * group, head_dim).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    num_pages = ((lens + page_size - 1) // page_size).to(torch.int32)
    return tuple(t.to(device) for t in (q, k_cache, table.to(torch.int32), lens, num_pages))


def keep_channels(k_cache, head_dim, rank):
    """channels [nkv, rank] int32 (a different random subset per KV head) and k_partial."""
    channels = torch.stack([torch.randperm(head_dim)[:rank] for _ in range(NUM_KV_HEADS)])
    channels = channels.to(torch.int32).to(k_cache.device)
    k_partial = torch.stack([k_cache[h][..., channels[h].long()] for h in range(NUM_KV_HEADS)])
    return channels, k_partial


def true_page_max(q, k_cache, table, lens, scale):
    """float64 [B, nkv, max_pages]: max over the group's heads and the page's valid keys of
    scale * q·k (-inf past the sequence)."""
    batch, num_heads, _ = q.shape
    group, page_size = num_heads // NUM_KV_HEADS, k_cache.shape[2]
    res = torch.full((batch, NUM_KV_HEADS, table.shape[1]), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        n = int(lens[b])
        for h in range(NUM_KV_HEADS):
            qh = q[b, h * group:(h + 1) * group].double().cpu()
            for p in range(-(-n // page_size)):
                keys = k_cache[h, int(table[b, p]), : min(page_size, n - p * page_size)]
                res[b, h, p] = (qh @ keys.double().cpu().T).max() * scale
    return res


def quest_float64(q, k_min, k_max, table, num_pages, scale):
    """The Quest bound straight from its definition, float64, one query head at a time."""
    batch, num_heads, _ = q.shape
    group = num_heads // NUM_KV_HEADS
    res = torch.full((batch, NUM_KV_HEADS, table.shape[1]), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        slots = table[b, : int(num_pages[b])].long().cpu()
        for head in range(num_heads):
            h = head // group
            qj = q[b, head].double().cpu()
            lo, hi = k_min[h, slots].double().cpu(), k_max[h, slots].double().cpu()
            bound = torch.maximum(qj * lo, qj * hi).sum(dim=-1) * scale  # [n]
            res[b, h, : len(slots)] = torch.maximum(res[b, h, : len(slots)], bound)
    return res


def partial_float64(q, channels, k_partial, table, lens, scale):
    """Partial-key page scores from their definition, float64, token by token per page."""
    batch, num_heads, _ = q.shape
    group, page_size = num_heads // NUM_KV_HEADS, k_partial.shape[2]
    res = torch.full((batch, NUM_KV_HEADS, table.shape[1]), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        n = int(lens[b])
        for h in range(NUM_KV_HEADS):
            qs = q[b, h * group:(h + 1) * group][:, channels[h].long()].double().cpu()  # [g, r]
            for p in range(-(-n // page_size)):
                for t in range(min(page_size, n - p * page_size)):
                    kt = k_partial[h, int(table[b, p]), t].double().cpu()
                    res[b, h, p] = max(float(res[b, h, p]), float((qs @ kt).max()) * scale)
    return res


def assert_scores_close(got, want):
    """Same -inf pattern, finite entries within the fp32 tolerance."""
    got, want = got.cpu(), want.cpu()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin].to(want.dtype), want[fin], atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# Metadata


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_page_key_bounds_match_hand_loop(dtype):
    k_cache = torch.randn(NUM_KV_HEADS, 5, 16, 80).to(dtype)
    num_tokens = torch.tensor([16, 1, 0, 7, 15], dtype=torch.int32)
    k_min, k_max = page_key_bounds(k_cache, num_tokens=num_tokens)
    full_min, full_max = page_key_bounds(k_cache)
    assert k_min.dtype == dtype and k_min.shape == (NUM_KV_HEADS, 5, 80)
    for s, n in enumerate(num_tokens.tolist()):
        for h in range(NUM_KV_HEADS):
            rows = k_cache[h, s, :n]
            want_min = rows.min(dim=0).values if n else torch.zeros(80, dtype=dtype)
            want_max = rows.max(dim=0).values if n else torch.zeros(80, dtype=dtype)
            assert torch.equal(k_min[h, s], want_min) and torch.equal(k_max[h, s], want_max)
            assert torch.equal(full_min[h, s], k_cache[h, s].min(dim=0).values)
            assert torch.equal(full_max[h, s], k_cache[h, s].max(dim=0).values)


def test_page_key_bounds_bad_inputs():
    k_cache = torch.randn(2, 5, 16, 64)
    with pytest.raises(ValueError, match="k_cache must be"):
        page_key_bounds(k_cache[0])
    with pytest.raises(ValueError, match="num_tokens must be an int32"):
        page_key_bounds(k_cache, num_tokens=torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_tokens must have shape"):
        page_key_bounds(k_cache, num_tokens=torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_tokens must lie in"):
        page_key_bounds(k_cache, num_tokens=torch.full((5,), 17, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# Quest


@pytest.mark.parametrize("case", CASES, ids=str)
def test_quest_reference_matches_float64_and_bounds_true_scores(case):
    q, k_cache, table, lens, num_pages = make_case(*case)
    k_min, k_max = page_key_bounds(k_cache)
    got = quest_page_scores_ref(q, k_min, k_max, table, num_pages, scale=SCALE)
    assert_scores_close(got, quest_float64(q, k_min, k_max, table, num_pages, SCALE))
    truth = true_page_max(q, k_cache, table, lens, SCALE)
    fin = torch.isfinite(truth)
    assert bool((got.double()[fin] >= truth[fin] - (ATOL + RTOL * truth[fin].abs())).all())


@pytest.mark.parametrize("impl", [quest_page_scores, quest_page_scores_ref], ids=["triton", "ref"])
@pytest.mark.parametrize("group", [1, 4])
def test_quest_is_exact_for_one_token_pages(impl, group):
    q, k_cache, table, lens, num_pages = make_case(80, group, 1, torch.float16, (1, 40, 7))
    got = impl(q, *page_key_bounds(k_cache), table, num_pages, scale=SCALE)
    assert_scores_close(got, true_page_max(q, k_cache, table, lens, SCALE))


def run_quest_triton(case, device="cpu"):
    q, k_cache, table, lens, num_pages = make_case(*case, device=device)
    k_min, k_max = page_key_bounds(k_cache)
    got = quest_page_scores(q, k_min, k_max, table, num_pages, scale=SCALE)
    assert got.device == q.device
    assert_scores_close(got, quest_page_scores_ref(q, k_min, k_max, table, num_pages, scale=SCALE))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_quest_triton_matches_reference(case):
    run_quest_triton(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES, ids=str)
def test_quest_triton_matches_reference_full(case):
    run_quest_triton(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_quest_triton_matches_reference_cuda(case):
    run_quest_triton(case, device="cuda")


# ---------------------------------------------------------------------------------------------
# Partial-key scores


def rank_for(head_dim: int) -> int:
    return head_dim // 4  # 16, 20, 32, 64: one not a power of two


# The token-by-token float64 loop is too slow for 4096 keys.
@pytest.mark.parametrize("case", [c for c in CASES if max(c[4]) <= 1024], ids=str)
def test_partial_reference_matches_float64(case):
    q, k_cache, table, lens, _ = make_case(*case)
    channels, k_partial = keep_channels(k_cache, case[0], rank_for(case[0]))
    got = partial_key_page_scores_ref(q, channels, k_partial, table, lens, scale=SCALE)
    assert_scores_close(got, partial_float64(q, channels, k_partial, table, lens, SCALE))


@pytest.mark.parametrize("impl", [partial_key_page_scores, partial_key_page_scores_ref],
                         ids=["triton", "ref"])
def test_partial_with_all_channels_is_the_true_page_max(impl):
    q, k_cache, table, lens, _ = make_case(64, 3, 16, torch.bfloat16, (97, 1, 32))
    channels = torch.arange(64, dtype=torch.int32).flip(0).expand(NUM_KV_HEADS, 64).contiguous()
    k_partial = k_cache.flip(-1)  # channel order matches `channels` (a strided view)
    got = impl(q, channels, k_partial, table, lens, scale=SCALE)
    assert_scores_close(got, true_page_max(q, k_cache, table, lens, SCALE))


def run_partial_triton(case, device="cpu"):
    q, k_cache, table, lens, _ = make_case(*case, device=device)
    channels, k_partial = keep_channels(k_cache, case[0], rank_for(case[0]))
    got = partial_key_page_scores(q, channels, k_partial, table, lens, scale=SCALE)
    want = partial_key_page_scores_ref(q, channels, k_partial, table, lens, scale=SCALE)
    assert_scores_close(got, want)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_partial_triton_matches_reference(case):
    run_partial_triton(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES, ids=str)
def test_partial_triton_matches_reference_full(case):
    run_partial_triton(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_partial_triton_matches_reference_cuda(case):
    run_partial_triton(case, device="cuda")


# ---------------------------------------------------------------------------------------------
# Both kernels: strided inputs, out=, no mutation, extreme values, bad inputs


def test_strided_inputs_out_and_no_mutation():
    q, k_cache, table, lens, num_pages = make_case(128, 4, 16, torch.float16, (97, 40, 3))
    q_view = q.transpose(0, 1).contiguous().transpose(0, 1)
    k_min, k_max = page_key_bounds(k_cache)
    k_min_view = k_min.transpose(0, 1).contiguous().transpose(0, 1)
    channels, k_partial = keep_channels(k_cache, 128, 24)
    k_partial_view = k_partial.transpose(1, 2).contiguous().transpose(1, 2)
    inputs = (q_view, k_min_view, k_max, k_partial_view, channels, table, lens, num_pages)
    saved = [t.clone() for t in inputs]
    store = torch.full((NUM_KV_HEADS, 3, 2 * table.shape[1]), 5.0)
    for kernel, ref, args in (
            (quest_page_scores, quest_page_scores_ref, (q_view, k_min_view, k_max, table, num_pages)),
            (partial_key_page_scores, partial_key_page_scores_ref,
             (q_view, channels, k_partial_view, table, lens))):
        out = store.transpose(0, 1)[..., ::2]  # [B, nkv, max_pages], strided
        res = kernel(*args, scale=SCALE, out=out)
        assert res.data_ptr() == out.data_ptr()
        assert bool((store[..., 1::2] == 5.0).all())
        assert_scores_close(out, ref(*args, scale=SCALE).double())
    assert all(torch.equal(a, b) for a, b in zip(inputs, saved))


def test_extreme_values():
    """Scores around +-1e4 stay finite and match (relative fp32 tolerance)."""
    q, k_cache, table, lens, num_pages = make_case(64, 3, 16, torch.float32, (97, 33))
    q = q * 300.0
    k_min, k_max = page_key_bounds(k_cache)
    quest = quest_page_scores(q, k_min, k_max, table, num_pages, scale=1.0)
    assert float(quest[torch.isfinite(quest)].abs().max()) > 1e3
    assert_scores_close(quest, quest_float64(q, k_min, k_max, table, num_pages, 1.0))
    channels, k_partial = keep_channels(k_cache, 64, 64)
    partial = partial_key_page_scores(q, channels, k_partial, table, lens, scale=1.0)
    assert_scores_close(partial, true_page_max(q, k_cache, table, lens, 1.0))


QUEST_BAD = [
    (lambda a: {**a, "q": a["q"].int()}, "q must be"),
    (lambda a: {**a, "k_max": a["k_max"][..., :64]}, "k_min and k_max must both be"),
    (lambda a: {**a, "q": a["q"][:, :5]}, "multiple of num_kv_heads"),
    (lambda a: {**a, "block_table": a["block_table"].long()}, "block_table must be an int32"),
    (lambda a: {**a, "num_pages": a["num_pages"] + 100}, "num_pages must lie in"),
    (lambda a: {**a, "block_table": a["block_table"] - 100}, "block_table entries in use"),
    (lambda a: {**a, "scale": 0.0}, "scale must be"),
    (lambda a: {**a, "out": torch.empty(3, 2, 1)}, "out must be a float32"),
]
PARTIAL_BAD = [
    (lambda a: {**a, "k_partial": a["k_partial"][0]}, "k_partial must be"),
    (lambda a: {**a, "channels": a["channels"][:, :3]}, "channels must have shape"),
    (lambda a: {**a, "channels": a["channels"] + 200}, "channels must be ids"),
    (lambda a: {**a, "seq_lens": a["seq_lens"].float()}, "seq_lens must be an int32"),
    (lambda a: {**a, "seq_lens": a["seq_lens"] + 10_000}, "seq_lens must lie in"),
    (lambda a: {**a, "scale": float("nan")}, "scale must be"),
]


@pytest.mark.parametrize("mutate,match", QUEST_BAD)
def test_quest_bad_inputs_rejected(mutate, match):
    q, k_cache, table, _, num_pages = make_case(80, 3, 16, torch.float32, (40, 17, 1))
    k_min, k_max = page_key_bounds(k_cache)
    args = mutate(dict(q=q, k_min=k_min, k_max=k_max, block_table=table, num_pages=num_pages,
                       scale=1.0, out=None))
    with pytest.raises(ValueError, match=match):
        quest_page_scores(args.pop("q"), args.pop("k_min"), args.pop("k_max"),
                          args.pop("block_table"), args.pop("num_pages"), **args)


@pytest.mark.parametrize("mutate,match", PARTIAL_BAD)
def test_partial_bad_inputs_rejected(mutate, match):
    q, k_cache, table, lens, _ = make_case(80, 3, 16, torch.float32, (40, 17, 1))
    channels, k_partial = keep_channels(k_cache, 80, 20)
    args = mutate(dict(q=q, channels=channels, k_partial=k_partial, block_table=table,
                       seq_lens=lens, scale=1.0))
    with pytest.raises(ValueError, match=match):
        partial_key_page_scores(args.pop("q"), args.pop("channels"), args.pop("k_partial"),
                                args.pop("block_table"), args.pop("seq_lens"), **args)


def test_fallback_without_triton_fills_out(monkeypatch):
    """Where Triton cannot run, the launchers answer with the references, into out."""
    import gpu_kernels.scoring as module

    monkeypatch.setattr(module, "use_triton", lambda t: False)
    q, k_cache, table, lens, num_pages = make_case(64, 4, 16, torch.float32, (40, 3))
    k_min, k_max = page_key_bounds(k_cache)
    out = torch.full((2, NUM_KV_HEADS, table.shape[1]), 9.0)
    assert quest_page_scores(q, k_min, k_max, table, num_pages, scale=SCALE, out=out) is out
    assert_scores_close(out, quest_float64(q, k_min, k_max, table, num_pages, SCALE))
    channels, k_partial = keep_channels(k_cache, 64, 16)
    assert partial_key_page_scores(q, channels, k_partial, table, lens, scale=SCALE, out=out) is out
    assert_scores_close(out, partial_float64(q, channels, k_partial, table, lens, SCALE))
