"""4-bit page blobs (offload.kv.quant_pages) against the reference quantizer of the kernels,
field by field and bit for bit; the fused CPU kernel reading an arena of blobs in place; the
packed arena's slots."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cpu_kernels.attention_4bit import attention_pages_4bit
from cpu_kernels.reference import attention_pages_ref, dequantize_pages_4bit_ref, quantize_pages_4bit_ref
from offload.kv.quant_pages import Quant4Layout
from storage import PackedArena, Tier
from storage.aligned import DISK_ALIGNMENT
from tests.tolerances import KERNEL_TOL, LSE_ATOL

FIELDS = ("k_q", "k_scale", "k_min", "v_q", "v_scale", "v_min")
# (num_kv_heads, page_size, head_dim): SmolLM2-135M, Gemma 3 270M, Llama-3.1-8B, head_dim 80
SHAPES = [(3, 32, 64), (1, 32, 256), (8, 32, 128), (2, 16, 80)]


def _pages(nkv, n, ps, hd, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(nkv, n, ps, hd, generator=gen)
    k[..., 2] *= 30  # an outlier channel
    return k, torch.randn(nkv, n, ps, hd, generator=gen)


def _padded(layout: Quant4Layout) -> int:
    return -(-layout.page_bytes // DISK_ALIGNMENT) * DISK_ALIGNMENT


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"kv{s[0]}-ps{s[1]}-d{s[2]}")
@pytest.mark.parametrize("padded", [False, True], ids=["packed", "disk-slots"])
def test_blobs_hold_the_reference_quantization(shape, padded):
    nkv, ps, hd = shape
    layout = Quant4Layout(nkv, ps, hd)
    stride = _padded(layout) if padded else layout.page_bytes
    raw = torch.full((5, stride), 0xEE, dtype=torch.uint8)
    k, v = _pages(nkv, 5, ps, hd)
    layout.quantize_into(raw, k, v)
    ref = quantize_pages_4bit_ref(k, v)
    got_np, got_torch = layout.numpy_views(raw), layout.views(raw)
    for name in FIELDS:
        want = getattr(ref, name)
        np.testing.assert_array_equal(getattr(got_np, name).view(np.uint8), want.view(np.uint8), err_msg=name)
        np.testing.assert_array_equal(getattr(got_torch, name).numpy().view(np.uint8), want.view(np.uint8))
    assert (raw[:, layout.page_bytes:] == 0xEE).all()  # the padding is never written
    kd, vd = layout.dequantize(raw)
    rk, rv = dequantize_pages_4bit_ref(ref)
    np.testing.assert_array_equal(kd.numpy(), rk)
    np.testing.assert_array_equal(vd.numpy(), rv)


def test_fields_tile_the_blob_and_sizes_are_a_sixth():
    """Every byte of a blob belongs to exactly one field (written through the views), and the
    sizes quoted in the module docstring hold."""
    layout = Quant4Layout(3, 32, 64)
    raw = torch.zeros((2, layout.page_bytes), dtype=torch.uint8)
    for t in layout.views(raw).tensors():
        t.view(torch.uint8).add_(1)
    assert (raw == 1).all()
    fp32_page = 2 * 3 * 32 * 64 * 4
    assert layout.page_bytes == 7680 and _padded(layout) == 8192
    assert _padded(layout) / fp32_page < 0.2
    gemma = Quant4Layout(1, 32, 256)
    assert gemma.page_bytes == 10240 and _padded(gemma) / (2 * 32 * 256 * 4) == 0.1875


def test_kernel_attends_an_arena_of_blobs_in_place():
    """A shuffled selection of slots of a packed arena, through the strided views."""
    nkv, ps, hd, group = 3, 32, 64, 3
    layout = Quant4Layout(nkv, ps, hd)
    arena = PackedArena(num_slots=8, slot_bytes=layout.page_bytes, device="cpu", tier=Tier.HOST)
    slots = arena.allocate(8)
    k, v = _pages(nkv, 8, ps, hd, seed=4)
    layout.quantize_into(arena.data, k, v)
    pages = layout.numpy_views(arena.data)
    chosen = np.array([[6, 1, 3]] * nkv, dtype=np.int32)
    lens = np.full(chosen.shape, ps, dtype=np.int32)
    q = np.random.default_rng(0).standard_normal((nkv * group, hd)).astype(np.float32)
    out, lse = attention_pages_4bit(q, pages, chosen, lens, scale=0.125)
    kd, vd = dequantize_pages_4bit_ref(quantize_pages_4bit_ref(k, v))
    ref_out, ref_lse = attention_pages_ref(q, kd, vd, chosen, lens, scale=0.125)
    np.testing.assert_allclose(out, ref_out, atol=KERNEL_TOL[torch.float32][0], rtol=KERNEL_TOL[torch.float32][1])
    np.testing.assert_allclose(lse, ref_lse, atol=LSE_ATOL[torch.float32], rtol=0)
    assert slots == list(range(8))


def test_packed_arena_rows_and_refcounts():
    arena = PackedArena(num_slots=4, slot_bytes=16, device="cpu")
    a = arena.allocate(3)
    assert a == [0, 1, 2] and arena.num_used == 3 and arena.peak_used_bytes == 48
    blobs = torch.arange(3 * 20, dtype=torch.uint8).view(3, 20)
    arena.write_rows([2, 0, 1], blobs)  # a wider source: the slot's bytes are taken
    assert torch.equal(arena.rows([2, 0, 1]), blobs[:, :16])
    assert arena.rows([0, 1]).data_ptr() == arena.data.data_ptr()  # a run is a view
    arena.incref([1])
    arena.free([0, 1, 2])
    assert arena.num_used == 1 and arena.refcount(1) == 1
    assert arena.allocate(4) is None
    with pytest.raises(ValueError, match="slot_bytes"):
        PackedArena(num_slots=1, slot_bytes=0, device="cpu")
    with pytest.raises(ValueError, match="DISK"):
        PackedArena(num_slots=1, slot_bytes=8, device="cpu", tier=Tier.DISK)


def test_bad_layouts_and_buffers_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        Quant4Layout(1, 32, 72)
    layout = Quant4Layout(1, 16, 64)
    with pytest.raises(ValueError, match="uint8"):
        layout.views(torch.zeros((1, layout.page_bytes), dtype=torch.float32))
    with pytest.raises(ValueError, match="stride"):
        layout.numpy_views(np.zeros((1, layout.page_bytes - 2), dtype=np.uint8))
