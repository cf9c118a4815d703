"""Fetch-ahead on CUDA (offload/kv/cuda_fetch.py): pieces copied on a side stream equal their
sources; the allowance and the hand-over. The CUDA cases skip without a GPU."""
from __future__ import annotations

import pytest
import torch

from offload.kv.cuda_fetch import CudaFetchAhead
from offload.kv.paged_kv import PagedKV
from storage import PageArena, Tier

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_needs_a_cuda_device_and_a_positive_allowance():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        CudaFetchAhead(torch.device("cpu"), max_pages=4)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="max_pages must be >= 1"):
            CudaFetchAhead(torch.device("cuda"), max_pages=0)


def test_paged_kv_on_cpu_has_no_fetcher():
    arena = PageArena(num_slots=4, num_kv_heads=1, page_size=4, head_dim=8, dtype=torch.float32, device="cpu")
    kv = PagedKV(arena, 1)
    kv.enable_fetch_ahead(16)
    assert kv.fetcher is None  # CPU: HOST pages are attended in place, nothing crosses a link


@pytest.mark.gpu
@cuda
def test_runs_and_chunks_arrive_equal_to_their_sources():
    g = torch.Generator().manual_seed(0)
    arena_k = torch.randn(2, 10, 4, 8, generator=g).pin_memory()  # [heads, slots, page, dim]
    arena_v = torch.randn(2, 10, 4, 8, generator=g).pin_memory()
    f = CudaFetchAhead(torch.device("cuda"), max_pages=8)
    f.put_run("run", arena_k[:, 3:6], arena_v[:, 3:6], tokens=10)  # a view: per-head DMA
    gathered_k = arena_k[:, [7, 1]].contiguous().pin_memory()
    gathered_v = arena_v[:, [7, 1]].contiguous().pin_memory()
    f.put_run("gather", gathered_k, gathered_v, tokens=8)
    assert f.held_pages == 5 and f.room(3) and not f.room(4)
    staged = torch.randn(3, 2, 2, 4, 8, generator=g)  # a DISK chunk: [pages, K/V, heads, page, dim]
    f.put_pages("chunk", staged, tokens=11)  # its values: test_chunk_is_reordered_head_major
    k, v = f.take("run")
    torch.testing.assert_close(k.cpu(), arena_k[:, 3:6].reshape(2, 12, 8)[:, :10], rtol=0, atol=0)
    torch.testing.assert_close(v.cpu(), arena_v[:, 3:6].reshape(2, 12, 8)[:, :10], rtol=0, atol=0)
    k, v = f.take("gather")
    torch.testing.assert_close(k.cpu(), arena_k[:, [7, 1]].reshape(2, 8, 8), rtol=0, atol=0)
    k, v = f.take("chunk")
    assert k.shape == (2, 11, 8) and v.shape == (2, 11, 8)
    assert f.take("chunk") is None and f.held_pages == 0
    assert f.fetched_pieces == 3 and f.taken_pieces == 3


@pytest.mark.gpu
@cuda
def test_chunk_is_reordered_head_major():
    g = torch.Generator().manual_seed(1)
    staged = torch.randn(3, 2, 2, 4, 8, generator=g)
    want_k = staged[:, 0].permute(1, 0, 2, 3).reshape(2, 12, 8)[:, :11].clone()
    want_v = staged[:, 1].permute(1, 0, 2, 3).reshape(2, 12, 8)[:, :11].clone()
    f = CudaFetchAhead(torch.device("cuda"), max_pages=3)
    f.put_pages(("disk", 0), staged, tokens=11)
    staged.zero_()
    k, v = f.take(("disk", 0))
    torch.testing.assert_close(k.cpu(), want_k, rtol=0, atol=0)
    torch.testing.assert_close(v.cpu(), want_v, rtol=0, atol=0)


@pytest.mark.gpu
@cuda
def test_begin_layer_drops_pieces_not_taken():
    f = CudaFetchAhead(torch.device("cuda"), max_pages=4)
    f.put_pages("a", torch.ones(2, 2, 1, 4, 8), tokens=8)
    assert f.held_pages == 2
    f.begin_layer()
    assert f.held_pages == 0 and f.take("a") is None
