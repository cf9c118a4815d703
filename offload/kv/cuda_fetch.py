"""Fetch-ahead on CUDA: the next layer's HOST and DISK pages copied to the device on a side
stream while the current layer computes.

Decode on CUDA attends DEVICE pages in place; the pages of a layer that live on HOST (not
delegated to the CPU) or on DISK must first cross PCIe. Copied on the compute stream, each
copy waits for the layer's compute before it and the next layer's attention waits for it: the
link and the GPU take turns. Here the engine, once it has queued layer l's kernels, asks for
layer l + 1's pages (``KVReader.fetch_ahead``, from that layer's read set); they are copied on this side stream, so the
copies run while the GPU still computes layer l, and layer l + 1's attention waits only on an
event of its own piece (``take``), never on a host synchronize::

    compute stream   | layer l: qkv  attention  mlp | layer l+1: qkv  wait(ev)  attention ...
    copy stream      |        H2D of layer l+1's pieces, ev recorded after each |

Sources are pinned: HOST pages are copied head by head from the pinned HOST arena (each
head's run of slots is contiguous there) or gathered into a pinned buffer first when their
slots are not consecutive; a DISK chunk is copied from its read-ahead staging buffer into a
pinned buffer (so the staging buffer returns to the reader at once), sent whole, and reordered
from page-major to head-major by a kernel on the side stream. Destinations are allocated
while the side stream is current (the caching allocator ties them to it) and marked with
``record_stream`` when the compute stream takes them, so their memory is not reused before
the attention that reads them has run.

A layer's fetched pieces hold at most ``max_pages`` pages of device memory (the engine
counts them in its DEVICE working set); pieces past that are copied when attention asks for
them, as without fetch-ahead. Pieces are keyed by where the pages live (tier, layer, slots),
so a forked sequence that shares them can take them too; pieces not taken are dropped at the
next ``begin_layer`` (the engine calls it at the start of each pass and before each layer's
fetch).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import torch

__all__ = ["CudaFetchAhead", "FetchedPiece"]


@dataclasses.dataclass(frozen=True, slots=True)
class FetchedPiece:
    """K and V [num_kv_heads, tokens, head_dim] on the device, ready once ``event`` is done."""

    k: torch.Tensor
    v: torch.Tensor
    pages: int
    event: torch.cuda.Event


class CudaFetchAhead:
    """Copies pieces of pages to a CUDA device on a side stream (see the module docstring).

    Args:
        device: the CUDA device attention runs on.
        max_pages: pages one layer's fetched pieces may hold on the device at once.
    """

    def __init__(self, device: torch.device, *, max_pages: int) -> None:
        if device.type != "cuda":
            raise ValueError(f"CudaFetchAhead needs a CUDA device, got {device}")
        if max_pages < 1:
            raise ValueError(f"max_pages must be >= 1, got {max_pages}")
        self.device = device
        self.max_pages = max_pages
        self.stream = torch.cuda.Stream(device)
        self._ready: dict[Hashable, FetchedPiece] = {}
        self._held_pages = 0
        self.fetched_pieces = 0  # pieces copied on the side stream (stats and tests)
        self.taken_pieces = 0  # of those, pieces attention used

    # ----- producing ----------------------------------------------------------------------
    def room(self, pages: int) -> bool:
        """Whether a piece of ``pages`` pages still fits this layer's allowance."""
        return self._held_pages + pages <= self.max_pages

    def put_run(self, key: Hashable, k_src: torch.Tensor, v_src: torch.Tensor, tokens: int) -> None:
        """A run of pinned HOST pages, ``k_src``/``v_src`` [num_kv_heads, pages, page_size,
        head_dim] (a view of the arena, each head's pages contiguous, or a pinned gather);
        the first ``tokens`` tokens are kept."""
        nkv, pages, ps, hd = k_src.shape
        with torch.cuda.stream(self.stream):
            k = torch.empty((nkv, pages, ps, hd), dtype=k_src.dtype, device=self.device)
            v = torch.empty_like(k)
            if k_src.is_contiguous():
                k.copy_(k_src, non_blocking=True)
                v.copy_(v_src, non_blocking=True)
            else:  # one contiguous run per head: DMA straight from the pinned arena
                for h in range(nkv):
                    k[h].copy_(k_src[h], non_blocking=True)
                    v[h].copy_(v_src[h], non_blocking=True)
            self._finish(key, k.view(nkv, pages * ps, hd)[:, :tokens], v.view(nkv, pages * ps, hd)[:, :tokens],
                         pages)

    def put_pages(self, key: Hashable, pages_src: torch.Tensor, tokens: int) -> None:
        """A staged DISK chunk, ``pages_src`` [pages, 2, num_kv_heads, page_size, head_dim]
        (page-major, as on disk, in host memory the caller may reuse once this returns)."""
        pages, _, nkv, ps, hd = pages_src.shape
        pinned = torch.empty(pages_src.shape, dtype=pages_src.dtype, pin_memory=True)
        pinned.copy_(pages_src)
        with torch.cuda.stream(self.stream):
            raw = pinned.to(self.device, non_blocking=True)  # the host allocator keeps `pinned` until it is done
            k = raw[:, 0].permute(1, 0, 2, 3).reshape(nkv, pages * ps, hd)[:, :tokens]
            v = raw[:, 1].permute(1, 0, 2, 3).reshape(nkv, pages * ps, hd)[:, :tokens]
            self._finish(key, k, v, pages)

    def _finish(self, key: Hashable, k: torch.Tensor, v: torch.Tensor, pages: int) -> None:
        event = torch.cuda.Event()
        event.record(self.stream)
        old = self._ready.pop(key, None)
        if old is not None:
            self._held_pages -= old.pages
        self._ready[key] = FetchedPiece(k, v, pages, event)
        self._held_pages += pages
        self.fetched_pieces += 1

    # ----- consuming ----------------------------------------------------------------------
    def take(self, key: Hashable) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The piece fetched under ``key`` for use on the current stream (which waits for its
        copy), or None if it was not fetched."""
        piece = self._ready.pop(key, None)
        if piece is None:
            return None
        self._held_pages -= piece.pages
        current = torch.cuda.current_stream(self.device)
        current.wait_event(piece.event)
        piece.k.record_stream(current)
        piece.v.record_stream(current)
        self.taken_pieces += 1
        return piece.k, piece.v

    def begin_layer(self) -> None:
        """Drop pieces nobody took (a layer's allowance starts empty)."""
        self._ready.clear()
        self._held_pages = 0


    @property
    def held_pages(self) -> int:
        return self._held_pages
