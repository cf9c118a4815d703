"""4-bit pages in the paged KV (``PagedKV(packed=...)``): which pages are packed and where
they live, what decode attention over them returns (against float64 attention over the
values the pages hold: exact pages as written, packed pages as the numpy reference quantizer
and dequantizer give them), eviction, forks and releases that leave nothing behind, and the
key bounds of packed pages."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cpu_kernels.reference import dequantize_pages_4bit_ref, quantize_pages_4bit_ref
from offload.attention.decode import DecodeAttention
from offload.config import DecodeKernel
from offload.kv.paged_kv import PagedKV
from offload.kv.placement import Placement
from offload.kv.quant_pages import PackedPools, Quant4Layout
from storage import PackedArena, PageArena, Tier
from storage.disk_store import DiskExtentStore

NKV, GROUP, HD, PS, LAYERS = 2, 3, 32, 8, 2
WINDOW = 2
SCALE = 0.2


def _kv(tmp_path, *, device_packed=64, host_packed=64, exact=48, disk=True) -> PagedKV:
    layout = Quant4Layout(NKV, PS, HD)
    arenas = {Tier.DEVICE: PackedArena(num_slots=device_packed, slot_bytes=layout.page_bytes, device="cpu")}
    if host_packed:
        arenas[Tier.HOST] = PackedArena(num_slots=host_packed, slot_bytes=layout.page_bytes, device="cpu",
                                        tier=Tier.HOST)
    arena = PageArena(num_slots=exact, num_kv_heads=NKV, page_size=PS, head_dim=HD, dtype=torch.float32,
                      device="cpu")
    store = DiskExtentStore(tmp_path / "disk", num_layers=LAYERS, page_bytes=layout.page_bytes) if disk else None
    return PagedKV(arena, LAYERS, disk=store, packed=PackedPools(layout, arenas, window_pages=WINDOW),
                   staging_chunk_pages=4, staging_buffers=2)


def _stored_values(k: torch.Tensor, v: torch.Tensor, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The values a 4-bit paged KV holds for tokens k, v [T, NKV, HD]: pages 1 .. n - WINDOW - 1
    through the reference quantizer, the sink, window and tail as written."""
    kk, vv = k.double().numpy().copy(), v.double().numpy().copy()
    packed_below = max(1, n_tokens // PS - WINDOW)
    for p in range(1, packed_below):
        sl = slice(p * PS, (p + 1) * PS)
        kp = k[sl].permute(1, 0, 2).unsqueeze(1)  # [NKV, 1, PS, HD]
        vp = v[sl].permute(1, 0, 2).unsqueeze(1)
        kd, vd = dequantize_pages_4bit_ref(quantize_pages_4bit_ref(kp, vp))
        kk[sl], vv[sl] = kd[:, 0].transpose(1, 0, 2), vd[:, 0].transpose(1, 0, 2)
    return kk, vv


def _attention_f64(q: torch.Tensor, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """q [NKV * GROUP, HD] over keys/values [T, NKV, HD] in float64."""
    out = np.zeros((NKV * GROUP, HD))
    for h in range(NKV):
        qh = q[h * GROUP:(h + 1) * GROUP].double().numpy()
        s = qh @ keys[:, h].T * SCALE
        w = np.exp(s - s.max(axis=1, keepdims=True))
        out[h * GROUP:(h + 1) * GROUP] = w @ values[:, h] / w.sum(axis=1, keepdims=True)
    return out


def _attend(kv: PagedKV, seq, layer: int, q: torch.Tensor, kernel: DecodeKernel) -> np.ndarray:
    attn = DecodeAttention(kv, num_kv_heads=NKV, group_size=GROUP, head_dim=HD, scale=SCALE,
                           device=torch.device("cpu"), scores_bytes=2**20, kernel=kernel)
    reads = kv.reader.layer_reads(seq, layer, rule=attn.routes)
    return attn(reads, q.view(1, NKV * GROUP, HD)).view(NKV * GROUP, HD).double().numpy()


# Pages by tier: 3 on DEVICE, 4 on HOST, the rest on DISK.
SPLIT = Placement(device_pages=3, host_pages=4)


@pytest.mark.parametrize("kernel", [DecodeKernel.NUMBA, DecodeKernel.TORCH])
@pytest.mark.parametrize("chunks", [[150], [20, 61, 69]], ids=["one-append", "three-appends"])
def test_prefill_packs_out_of_window_pages_where_placed(tmp_path, kernel, chunks):
    kv = _kv(tmp_path)
    seq = kv.new_sequence()
    gen = torch.Generator().manual_seed(0)
    n = sum(chunks)
    k, v = torch.randn(n, NKV, HD, generator=gen), torch.randn(n, NKV, HD, generator=gen)
    k[..., 5] *= 20  # an outlier key channel
    for layer in range(LAYERS):
        at = 0
        for c in chunks:
            kv.append(seq, layer, k[at:at + c], v[at:at + c], SPLIT)
            at += c
    kv.writes.flush()
    full = n // PS  # 18 full pages, a tail of 6 tokens
    packed, tiers = seq.table.packed(0), seq.table.tiers(0)
    assert packed == [False] + [True] * (full - WINDOW - 1) + [False] * (WINDOW + 1)
    assert [tiers[p] for p in range(1, full - WINDOW)] == [SPLIT.tier_of(p) for p in range(1, full - WINDOW)]
    assert all(tiers[p] == Tier.DEVICE for p in (0, full - 2, full - 1, full))  # exact pages on DEVICE
    q = torch.randn(NKV * GROUP, HD, generator=gen)
    want = _attention_f64(q, *_stored_values(k, v, n))
    for layer in range(LAYERS):
        np.testing.assert_allclose(_attend(kv, seq, layer, q, kernel), want, atol=2e-5, rtol=1e-4)
    # the bounds of a packed page are its packed keys' (a DocCache restore derives the same)
    lo, hi = seq.bounds.get(0)
    kk, _ = _stored_values(k, v, n)
    page = kk[PS:2 * PS]  # page 1, packed
    np.testing.assert_array_equal(lo[:, 1].numpy(), page.min(axis=0).astype(np.float32))
    np.testing.assert_array_equal(hi[:, 1].numpy(), page.max(axis=0).astype(np.float32))
    kv.release(seq)
    kv.close()
    assert kv.arena.num_used == 0 and all(a.num_used == 0 for a in kv.packed.arenas.values())


def test_decode_packs_the_page_leaving_the_window_and_evicts_when_device_is_full(tmp_path):
    """Decode steps: each page that leaves the exact window is packed onto DEVICE; with a
    packed DEVICE arena of 3 slots, older packed pages move to HOST, then DISK."""
    kv = _kv(tmp_path, device_packed=3, host_packed=2)
    seq = kv.new_sequence()
    gen = torch.Generator().manual_seed(1)
    n0, steps = 5 * PS + 3, 4 * PS
    k, v = torch.randn(n0 + steps, NKV, HD, generator=gen), torch.randn(n0 + steps, NKV, HD, generator=gen)
    for layer in range(LAYERS):
        kv.append(seq, layer, k[:n0], v[:n0])
    for t in range(n0, n0 + steps):
        kv.prepare_decode(seq)
        for layer in range(LAYERS):
            kv.append(seq, layer, k[t:t + 1], v[t:t + 1])
    n = n0 + steps
    full = n // PS
    assert seq.table.packed(1) == [False] + [True] * (full - WINDOW - 1) + [False] * (WINDOW + 1)
    tiers = {t for layer in range(LAYERS) for t in seq.table.tiers(layer)[1:full - WINDOW]}
    assert tiers == {Tier.DEVICE, Tier.HOST, Tier.DISK}  # the arenas were too small for all
    assert kv.io.evicted_pages > 0
    q = torch.randn(NKV * GROUP, HD, generator=gen)
    want = _attention_f64(q, *_stored_values(k, v, n))
    np.testing.assert_allclose(_attend(kv, seq, 1, q, DecodeKernel.NUMBA), want, atol=2e-5, rtol=1e-4)
    kv.release(seq)
    kv.close()


def test_fork_shares_packed_pages_and_packs_its_own_window(tmp_path):
    """A fork's decode packs pages it shares with its parent into slots of its own; the
    parent's pages and answers are unchanged; releasing both frees every slot."""
    kv = _kv(tmp_path)
    doc = kv.new_sequence()
    gen = torch.Generator().manual_seed(2)
    n0, steps = 9 * PS + 2, 2 * PS
    k, v = torch.randn(n0 + steps, NKV, HD, generator=gen), torch.randn(n0 + steps, NKV, HD, generator=gen)
    for layer in range(LAYERS):
        kv.append(doc, layer, k[:n0], v[:n0], SPLIT)
    q = torch.randn(NKV * GROUP, HD, generator=gen)
    before = _attend(kv, doc, 0, q, DecodeKernel.NUMBA)
    fork = kv.fork(doc)
    for t in range(n0, n0 + steps):
        kv.prepare_decode(fork)
        for layer in range(LAYERS):
            kv.append(fork, layer, k[t:t + 1], v[t:t + 1])
    assert sum(fork.table.packed(0)) == sum(doc.table.packed(0)) + 2
    np.testing.assert_array_equal(_attend(kv, doc, 0, q, DecodeKernel.NUMBA), before)
    want = _attention_f64(q, *_stored_values(k, v, n0 + steps))
    np.testing.assert_allclose(_attend(kv, fork, 0, q, DecodeKernel.NUMBA), want, atol=2e-5, rtol=1e-4)
    kv.release(fork)
    kv.release(doc)
    kv.close()
    assert kv.arena.num_used == 0 and all(a.num_used == 0 for a in kv.packed.arenas.values())
    assert kv.free_slots(Tier.DISK) == 1 << 40


def test_bytes_read_count_packed_pages_as_stored(tmp_path):
    kv = _kv(tmp_path)
    seq = kv.new_sequence()
    k, v = torch.randn(100, NKV, HD), torch.randn(100, NKV, HD)
    kv.append(seq, 0, k, v, SPLIT)
    kv.writes.flush()
    reads = kv.reader.layer_reads(seq, 0, rule=DecodeAttention(
        kv, num_kv_heads=NKV, group_size=GROUP, head_dim=HD, scale=SCALE, device=torch.device("cpu"),
        scores_bytes=2**20).routes)
    kv.reader.count(reads)
    packed_bytes = kv.packed.layout.page_bytes
    disk_slot = kv.disk.disk_page_bytes
    full = 100 // PS
    packed_pages = [p for p in range(1, full - WINDOW)]
    by_tier = {t: 0 for t in Tier}
    for p in packed_pages:
        tier = SPLIT.tier_of(p)
        by_tier[tier] += disk_slot if tier == Tier.DISK else packed_bytes
    by_tier[Tier.DEVICE] += (1 + WINDOW + 1) * kv.page_bytes  # sink, window, tail: exact
    assert {t: kv.io.bytes_read[t] for t in Tier} == by_tier
    kv.release(seq)
    kv.close()
