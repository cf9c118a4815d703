"""Page arenas and selections for the Numba kernel tests (nothing here calls cpu_kernels).

Arenas start as NaN and only the rows of listed tokens get values, so a kernel that reads a
padding row, an unlisted slot or a token past a page's length returns NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_KV_HEADS = 2
SPARE_SLOTS = 3


@dataclass
class Selection:
    """q, K/V arenas [nkv, num_slots, ps, hd] (torch, ``dtype``), slots / lens [nkv, M] int32
    and, per KV head, its keys and values in order as float64 [L_h, hd] (the dense view)."""

    q: np.ndarray
    k: torch.Tensor
    v: torch.Tensor
    slots: np.ndarray
    lens: np.ndarray
    keys: list[np.ndarray]
    values: list[np.ndarray]


def page_lens(num_tokens: int, num_pages: int, page_size: int) -> np.ndarray:
    """Valid tokens of each of ``num_pages`` pages holding ``num_tokens`` tokens in order."""
    return np.clip(num_tokens - page_size * np.arange(num_pages), 0, page_size).astype(np.int32)


def nan_arena(num_slots: int, page_size: int, head_dim: int) -> torch.Tensor:
    return torch.full((NUM_KV_HEADS, num_slots, page_size, head_dim), float("nan"))


def make_selection(lens_per_head: list[np.ndarray], page_size: int, head_dim: int, group: int,
                   dtype: torch.dtype, gen: np.random.Generator) -> Selection:
    """Random q and pages: KV head h lists len(lens_per_head[h]) distinct shuffled slots, page
    i holding lens_per_head[h][i] tokens (0 allowed: its slot is then -1, never read)."""
    num_listed = max(len(x) for x in lens_per_head)
    num_slots = NUM_KV_HEADS * num_listed + SPARE_SLOTS
    k, v = nan_arena(num_slots, page_size, head_dim), nan_arena(num_slots, page_size, head_dim)
    slots = np.full((NUM_KV_HEADS, num_listed), -1, dtype=np.int32)
    lens = np.zeros((NUM_KV_HEADS, num_listed), dtype=np.int32)
    perm = gen.permutation(num_slots)
    for h, head_lens in enumerate(lens_per_head):
        for i, n in enumerate(head_lens):
            lens[h, i] = n
            if n > 0:
                slots[h, i] = perm[h * num_listed + i]
                k[h, slots[h, i], :n] = torch.from_numpy(gen.standard_normal((n, head_dim)))
                v[h, slots[h, i], :n] = torch.from_numpy(gen.standard_normal((n, head_dim)))
    k, v = k.to(dtype), v.to(dtype)
    keys = [_dense(k, h, slots[h], lens[h]) for h in range(NUM_KV_HEADS)]
    values = [_dense(v, h, slots[h], lens[h]) for h in range(NUM_KV_HEADS)]
    q = gen.standard_normal((NUM_KV_HEADS * group, head_dim)).astype(np.float32)
    return Selection(q, k, v, slots, lens, keys, values)


def _dense(arena: torch.Tensor, h: int, slots: np.ndarray, lens: np.ndarray) -> np.ndarray:
    rows = [arena[h, s, :n].double().numpy() for s, n in zip(slots, lens) if n > 0]
    return np.concatenate(rows) if rows else np.zeros((0, arena.shape[-1]))


def to_numpy_f32(x) -> np.ndarray:
    """Values of a tensor or array as float32 numpy (for comparisons)."""
    return x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
