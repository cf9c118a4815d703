"""Key bounds: per page and KV head, the channel-wise min and max of a global layer's keys.

Quest (Tang et al. 2024) scores a page against the live query by the upper bound
``sum_c max(q_c * kmin_c, q_c * kmax_c)`` of q . k over the page's keys. The bounds are kept
for every run and every mode, so one DocCache serves every mode:

- prefill and decode update them as keys are appended (``PagedKV.append``): a new page takes
  its tokens' min and max, the partly filled tail page folds each new token in;
- a DocCache restore derives them from the restored pages' keys (the same stored values, so
  the same bounds as the prefill that wrote them: the DocCache file holds pages only, and a
  verified page yields verified bounds);
- a fork (a question over a document) copies them: its tail page then diverges;
- with 4-bit pages, a page's bounds are set again from its packed keys once it is packed
  (``replace_pages``), so they are what a DocCache restore of the packed bytes derives.

They live on the compute device in the KV dtype (a key's min and max are keys' values: no
rounding), ``2 * num_kv_heads * head_dim`` values per page, that is ``1 / page_size`` of the
page's K/V bytes. Sliding-window layers (rings that are always attended whole) keep none.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["KeyBounds"]


class KeyBounds:
    """The key bounds of one sequence's global layers.

    Args:
        layers: the layers that keep bounds (the global ones).
        num_layers, num_kv_heads, head_dim, page_size: the KV's shape.
        dtype, device: the KV dtype and the compute device.
    """

    def __init__(self, layers: Sequence[int], *, num_layers: int, num_kv_heads: int, head_dim: int,
                 page_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.layers = frozenset(layers)
        self.num_kv_heads, self.head_dim, self.page_size = num_kv_heads, head_dim, page_size
        self.dtype, self.device = dtype, device
        self.tokens = [0] * num_layers
        # Per layer: lo, hi [num_kv_heads, capacity, head_dim] (grown by doubling); None until a key arrives.
        self._lo: list[torch.Tensor | None] = [None] * num_layers
        self._hi: list[torch.Tensor | None] = [None] * num_layers
        # numpy views of lo / hi per layer where numpy has the dtype (CPU float32 / float16).
        cpu = torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float16)
        self._numpy: list[tuple[np.ndarray, np.ndarray] | None] | None = [None] * num_layers if cpu else None

    @property
    def page_bytes(self) -> int:
        """Bytes of one page's bounds (its min and max)."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def num_pages(self, layer: int) -> int:
        return -(-self.tokens[layer] // self.page_size)

    def nbytes(self) -> int:
        """Bytes held (capacity included)."""
        return sum(2 * t.numel() * t.element_size() for t in self._lo if t is not None)

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """lo, hi [num_kv_heads, pages, head_dim] of ``layer``'s pages so far (views)."""
        lo, hi = self._lo[layer], self._hi[layer]
        if lo is None or hi is None:
            raise ValueError(f"layer {layer} keeps no key bounds (a sliding layer, or no key yet)")
        n = self.num_pages(layer)
        return lo[:, :n], hi[:, :n]

    def update(self, layer: int, start: int, k: torch.Tensor) -> None:
        """Fold keys k [T, num_kv_heads, head_dim] of tokens ``start .. start + T - 1`` in
        (``start`` must be the layer's token count: keys arrive in order)."""
        if layer not in self.layers or k.shape[0] == 0:
            return
        if start != self.tokens[layer]:
            raise ValueError(f"key bounds of layer {layer} hold {self.tokens[layer]} tokens; keys from {start} "
                             "cannot be folded in (keys arrive in order)")
        ps, t = self.page_size, k.shape[0]
        end = start + t
        lo, hi = self._room(layer, -(-end // ps))
        if t == 1 and self._numpy is not None:  # a decode step on the CPU: numpy, not four torch calls
            lo_np, hi_np = self._numpy[layer]
            key = k[0].numpy()
            p = start // ps
            if start % ps:
                np.minimum(lo_np[:, p], key, out=lo_np[:, p])
                np.maximum(hi_np[:, p], key, out=hi_np[:, p])
            else:
                lo_np[:, p] = key
                hi_np[:, p] = key
            self.tokens[layer] = end
            return
        kt = k.to(device=self.device, dtype=self.dtype).transpose(0, 1)  # [nkv, T, hd]
        p, off, i = start // ps, start % ps, 0
        if off:  # the partly filled page: fold the tokens that complete (or extend) it
            i = min(t, ps - off)
            torch.minimum(lo[:, p], kt[:, :i].amin(dim=1), out=lo[:, p])
            torch.maximum(hi[:, p], kt[:, :i].amax(dim=1), out=hi[:, p])
            p += 1
        full = (t - i) // ps
        if full:
            pages = kt[:, i:i + full * ps].reshape(self.num_kv_heads, full, ps, self.head_dim)
            lo[:, p:p + full] = pages.amin(dim=2)
            hi[:, p:p + full] = pages.amax(dim=2)
            p, i = p + full, i + full * ps
        if i < t:  # a new, partly filled last page
            lo[:, p] = kt[:, i:].amin(dim=1)
            hi[:, p] = kt[:, i:].amax(dim=1)
        self.tokens[layer] = end

    def replace_pages(self, layer: int, pids: Sequence[int], k: torch.Tensor) -> None:
        """Set the bounds of full pages ``pids`` (already folded in) from their keys k
        [num_kv_heads, len(pids), page_size, head_dim]: a 4-bit page's bounds are those of
        its packed keys, as a DocCache restore derives them."""
        if layer not in self.layers or not pids:
            return
        lo, hi = self._lo[layer], self._hi[layer]
        assert lo is not None and hi is not None and max(pids) < self.num_pages(layer)
        index = torch.tensor(list(pids), dtype=torch.int64, device=self.device)
        kd = k.to(device=self.device, dtype=self.dtype)
        lo.index_copy_(1, index, kd.amin(dim=2))
        hi.index_copy_(1, index, kd.amax(dim=2))

    def _room(self, layer: int, pages: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self._lo[layer], self._hi[layer]
        if lo is None or hi is None or lo.shape[1] < pages:
            cap = max(pages, 64, 2 * (lo.shape[1] if lo is not None else 0))
            shape = (self.num_kv_heads, cap, self.head_dim)
            new_lo = torch.empty(shape, dtype=self.dtype, device=self.device)
            new_hi = torch.empty_like(new_lo)
            n = self.num_pages(layer)
            if lo is not None and hi is not None and n:
                new_lo[:, :n] = lo[:, :n]
                new_hi[:, :n] = hi[:, :n]
            self._lo[layer], self._hi[layer] = lo, hi = new_lo, new_hi
            if self._numpy is not None:
                self._numpy[layer] = (new_lo.numpy(), new_hi.numpy())
        return lo, hi

    def copy(self) -> KeyBounds:
        """An independent copy (a fork's: its later keys do not reach this one)."""
        other = KeyBounds(sorted(self.layers), num_layers=len(self.tokens), num_kv_heads=self.num_kv_heads,
                          head_dim=self.head_dim, page_size=self.page_size, dtype=self.dtype, device=self.device)
        other.tokens = list(self.tokens)
        for layer in self.layers:
            lo, hi = self._lo[layer], self._hi[layer]
            if lo is not None and hi is not None:
                n = self.num_pages(layer)
                # Room for the fork's own pages, so its first decode steps do not grow it.
                new_lo, new_hi = other._room(layer, n + 64)
                new_lo[:, :n] = lo[:, :n]
                new_hi[:, :n] = hi[:, :n]
        return other
