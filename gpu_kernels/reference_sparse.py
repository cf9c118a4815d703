"""Plain-torch references for page scoring and 4-bit pages (the spec, and the CPU fallback).

Page scoring picks the pages a sparse decode step attends to:
- Quest (Tang et al. 2024): an upper bound of q·k over a page from the per-channel min and
  max of its keys, ``sum_c max(q_c * kmin_c, q_c * kmax_c)``.
- InfiniGen (Lee et al. 2024): approximate scores from a few key channels of every token.

4-bit pages (one page = ``page_size`` tokens of one layer, all KV heads; full pages only):
- keys per channel over the page's tokens (KIVI, Liu et al. 2024: outlier channels break
  per-token groups): ``k_scale``, ``k_min`` float16 [num_kv_heads, P, head_dim];
- values per token in groups of G consecutive channels (FlexGen, Sheng et al. 2023), G = 32
  if head_dim % 32 == 0 else 16: ``v_scale``, ``v_min`` float16 [num_kv_heads, P,
  page_size, head_dim // G];
- scale = (max - min) / 15 rounded to float16; with s, m the float16 scale and min back in
  float32, code = clamp(floor((x - m) / s + 0.5), 0, 15), and 0 where s == 0;
- codes packed two per byte, ``[num_kv_heads, P, page_size, head_dim // 2]`` uint8: byte j
  holds channel 2j in its low nibble and channel 2j+1 in its high nibble;
- dequantized value: code * s + m in float32.
Quantized pages form an arena indexed by slot exactly like the full-precision one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Quant4Pages",
    "dequantize_pages_4bit_ref",
    "page_key_bounds_ref",
    "paged_decode_attention_4bit_ref",
    "partial_key_page_scores_ref",
    "quantize_pages_4bit_ref",
    "quest_page_scores_ref",
    "value_group_size",
]

QUANT4_LEVELS = 15  # codes 0..15


def value_group_size(head_dim: int) -> int:
    """Channels per value group: 32 if head_dim % 32 == 0 else 16 (head_dim % 16 == 0)."""
    if head_dim < 16 or head_dim % 16:
        raise ValueError(f"head_dim must be a positive multiple of 16 for 4-bit pages, got {head_dim}")
    return 32 if head_dim % 32 == 0 else 16


@dataclass(frozen=True, slots=True)
class Quant4Pages:
    """An arena of 4-bit KV pages; slot p holds page p (see the module docstring).

    Invariants (checked on construction): the six tensors share one device; codes are uint8,
    scales and mins float16; shapes agree as documented, with head_dim a multiple of 16.
    The tensors may be strided views (e.g. a slot range of a bigger arena).
    """

    k_q: torch.Tensor  # [num_kv_heads, num_slots, page_size, head_dim // 2] uint8
    k_scale: torch.Tensor  # [num_kv_heads, num_slots, head_dim] float16
    k_min: torch.Tensor  # [num_kv_heads, num_slots, head_dim] float16
    v_q: torch.Tensor  # [num_kv_heads, num_slots, page_size, head_dim // 2] uint8
    v_scale: torch.Tensor  # [num_kv_heads, num_slots, page_size, head_dim // G] float16
    v_min: torch.Tensor  # [num_kv_heads, num_slots, page_size, head_dim // G] float16

    def __post_init__(self) -> None:
        tensors = {name: getattr(self, name) for name in
                   ("k_q", "k_scale", "k_min", "v_q", "v_scale", "v_min")}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"Quant4Pages.{name} must be a torch.Tensor, got {type(t).__name__}")
        if self.k_q.dim() != 4:
            raise ValueError(f"Quant4Pages.k_q must be [num_kv_heads, num_slots, page_size, "
                             f"head_dim // 2], got {tuple(self.k_q.shape)}")
        nkv, slots, ps, half = self.k_q.shape
        group = value_group_size(2 * half)
        want = {"k_q": (nkv, slots, ps, half), "k_scale": (nkv, slots, 2 * half),
                "k_min": (nkv, slots, 2 * half), "v_q": (nkv, slots, ps, half),
                "v_scale": (nkv, slots, ps, 2 * half // group),
                "v_min": (nkv, slots, ps, 2 * half // group)}
        for name, t in tensors.items():
            dtype = torch.uint8 if name.endswith("_q") else torch.float16
            if tuple(t.shape) != want[name] or t.dtype != dtype or t.device != self.k_q.device:
                raise ValueError(f"Quant4Pages.{name} must be {dtype} {want[name]} on "
                                 f"{self.k_q.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")

    @classmethod
    def empty(cls, num_kv_heads: int, num_slots: int, page_size: int, head_dim: int, *,
              device: torch.device | str = "cpu") -> Quant4Pages:
        """An uninitialized arena (e.g. the ``out=`` of ``quantize_pages_4bit``)."""
        groups = head_dim // value_group_size(head_dim)
        codes = (num_kv_heads, num_slots, page_size, head_dim // 2)
        per_channel = (num_kv_heads, num_slots, head_dim)
        per_group = (num_kv_heads, num_slots, page_size, groups)

        def new(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        return cls(new(codes, torch.uint8), new(per_channel, torch.float16),
                   new(per_channel, torch.float16), new(codes, torch.uint8),
                   new(per_group, torch.float16), new(per_group, torch.float16))

    def take_slots(self, slots: torch.Tensor) -> Quant4Pages:
        """A new arena holding the pages at ``slots`` ([n] integer tensor), in that order."""
        idx = slots.long().to(self.k_q.device)
        return Quant4Pages(*(t.index_select(1, idx) for t in self.tensors()))

    def slot_range(self, start: int, stop: int) -> Quant4Pages:
        """A view of slots ``start .. stop-1`` (writes go to this arena)."""
        return Quant4Pages(*(t[:, start:stop] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(k_q, k_scale, k_min, v_q, v_scale, v_min)."""
        return (self.k_q, self.k_scale, self.k_min, self.v_q, self.v_scale, self.v_min)

    @property
    def num_kv_heads(self) -> int:
        return self.k_q.shape[0]

    @property
    def num_slots(self) -> int:
        return self.k_q.shape[1]

    @property
    def page_size(self) -> int:
        return self.k_q.shape[2]

    @property
    def head_dim(self) -> int:
        return 2 * self.k_q.shape[3]

    @property
    def group_size(self) -> int:
        """Channels per value group (G)."""
        return value_group_size(self.head_dim)

    @property
    def nbytes(self) -> int:
        """Bytes held by the six tensors' elements."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


# ---------------------------------------------------------------------------------------------
# 4-bit pages


def _quantize_groups(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, x's shape), fp16 scale and fp16 min over ``dim`` (kept) of fp32 ``x``."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    # A tensor divisor: torch on CUDA multiplies by the reciprocal of a Python scalar instead,
    # which can differ from the division by an ulp.
    scale16 = ((hi - lo) / torch.full_like(hi, QUANT4_LEVELS)).to(torch.float16)
    min16 = lo.to(torch.float16)
    s, m = scale16.float(), min16.float()
    safe = torch.where(s == 0, torch.ones_like(s), s)
    codes = torch.floor((x - m) / safe + 0.5).clamp_(0, QUANT4_LEVELS)
    codes = torch.where(s == 0, torch.zeros_like(codes), codes)
    return codes.to(torch.uint8), scale16, min16


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """[..., D] codes 0..15 -> [..., D // 2] bytes (channel 2j low nibble, 2j+1 high)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """[..., D // 2] bytes -> [..., D] codes as float32."""
    codes = torch.stack((packed & 15, packed >> 4), dim=-1)
    return codes.reshape(*packed.shape[:-1], -1).float()


def quantize_pages_4bit_ref(k_pages: torch.Tensor, v_pages: torch.Tensor, *,
                            out: Quant4Pages | None = None) -> Quant4Pages:
    """4-bit pages of full K/V pages (spec of ``gpu_kernels.quant4.quantize_pages_4bit``).

    Args:
        k_pages, v_pages: [num_kv_heads, P, page_size, head_dim] float32/float16/bfloat16,
            every page full; head_dim a multiple of 16.
        out: optional arena of exactly that size to write into.

    Returns:
        The quantized pages (``out`` when given).
    """
    nkv, num_pages, ps, hd = k_pages.shape
    group = value_group_size(hd)
    k_codes, k_scale, k_min = _quantize_groups(k_pages.float(), dim=2)  # stats [nkv, P, 1, hd]
    v = v_pages.float().reshape(nkv, num_pages, ps, hd // group, group)
    v_codes, v_scale, v_min = _quantize_groups(v, dim=4)  # stats [nkv, P, ps, hd // G, 1]
    res = Quant4Pages(_pack(k_codes), k_scale.squeeze(2), k_min.squeeze(2),
                      _pack(v_codes.reshape(nkv, num_pages, ps, hd)), v_scale.squeeze(4),
                      v_min.squeeze(4))
    if out is None:
        return res
    for dst, src in zip(out.tensors(), res.tensors()):
        dst.copy_(src)
    return out


def dequantize_pages_4bit_ref(qp: Quant4Pages, *,
                              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) pages [num_kv_heads, num_slots, page_size, head_dim] in ``dtype`` (computed in
    float32 as code * scale + min, then cast)."""
    nkv, slots, ps, hd = qp.num_kv_heads, qp.num_slots, qp.page_size, qp.head_dim
    k = _unpack(qp.k_q) * qp.k_scale.float()[:, :, None, :] + qp.k_min.float()[:, :, None, :]
    v_codes = _unpack(qp.v_q).reshape(nkv, slots, ps, hd // qp.group_size, qp.group_size)
    v = v_codes * qp.v_scale.float()[..., None] + qp.v_min.float()[..., None]
    return k.to(dtype), v.reshape(nkv, slots, ps, hd).to(dtype)


def paged_decode_attention_4bit_ref(
    q: torch.Tensor, qp: Quant4Pages, block_table: torch.Tensor, seq_lens: torch.Tensor, *,
    scale: float, window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over 4-bit pages: dequantize the sequence's pages, then plain fp32
    attention (spec of ``gpu_kernels.paged_attention_4bit.paged_decode_attention_4bit``).

    Args:
        q: [B, num_heads, head_dim] float; query head ``h*group + j`` uses KV head h.
        qp: the 4-bit arena.
        block_table: [B, max_pages] int32 slots; seq_lens: [B] int32 key counts.
        scale: softmax scale; window: when given only the last ``window`` keys are visible.

    Returns:
        out [B, num_heads, head_dim] float32 (zeros where no key is visible), lse [B,
        num_heads] float32 (-inf there).
    """
    batch, num_heads, hd = q.shape
    nkv, ps = qp.num_kv_heads, qp.page_size
    out = torch.zeros(batch, num_heads, hd, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(batch):
        n = int(seq_lens[b])
        lo = 0 if window is None else max(0, n - window)
        if n <= lo:
            continue
        k, v = dequantize_pages_4bit_ref(qp.take_slots(block_table[b, : -(-n // ps)]))
        k = k.reshape(nkv, -1, hd)[:, lo:n]  # [nkv, L, hd]
        v = v.reshape(nkv, -1, hd)[:, lo:n]
        qg = q[b].float().reshape(nkv, num_heads // nkv, hd)
        scores = torch.matmul(qg, k.transpose(1, 2)) * scale  # [nkv, group, L]
        out[b] = torch.matmul(torch.softmax(scores, dim=-1), v).reshape(num_heads, hd)
        lse[b] = torch.logsumexp(scores, dim=-1).reshape(num_heads)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Page scoring


def page_key_bounds_ref(k_cache: torch.Tensor, *, num_tokens: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page channel min and max of the keys (Quest metadata).

    Args:
        k_cache: [num_kv_heads, num_slots, page_size, head_dim] any float dtype.
        num_tokens: optional [num_slots] int32: valid tokens of each slot (its first ones);
            the others are ignored. A slot with none gets min = max = 0.

    Returns:
        k_min, k_max: [num_kv_heads, num_slots, head_dim] in k_cache's dtype.
    """
    if num_tokens is None:
        return k_cache.amin(dim=2), k_cache.amax(dim=2)
    rows = torch.arange(k_cache.shape[2], device=k_cache.device)
    valid = (rows[None, :] < num_tokens.to(k_cache.device).long()[:, None])[None, :, :, None]
    k_min = k_cache.masked_fill(~valid, float("inf")).amin(dim=2)
    k_max = k_cache.masked_fill(~valid, float("-inf")).amax(dim=2)
    empty = (num_tokens.to(k_cache.device) <= 0)[None, :, None]
    return k_min.masked_fill(empty, 0), k_max.masked_fill(empty, 0)


def quest_page_scores_ref(q: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor,
                          block_table: torch.Tensor, num_pages: torch.Tensor, *,
                          scale: float = 1.0) -> torch.Tensor:
    """Quest upper bounds [B, num_kv_heads, max_pages] float32 (spec of
    ``gpu_kernels.scoring.quest_page_scores``): for query head j and page p,
    ``scale * sum_c max(q_jc * kmin_pc, q_jc * kmax_pc)``, max over the KV group's query
    heads, -inf for p >= num_pages[b]."""
    batch, num_heads, hd = q.shape
    nkv, max_pages = k_min.shape[0], block_table.shape[1]
    res = torch.full((batch, nkv, max_pages), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(batch):
        n = int(num_pages[b])
        slots = block_table[b, :n].long()
        qg = q[b].float().reshape(nkv, 1, num_heads // nkv, hd)  # [nkv, 1, group, hd]
        lo = k_min[:, slots].float()[:, :, None, :]  # [nkv, n, 1, hd]
        hi = k_max[:, slots].float()[:, :, None, :]
        bound = torch.maximum(qg * lo, qg * hi).sum(dim=-1) * scale  # [nkv, n, group]
        res[b, :, :n] = bound.amax(dim=-1)
    return res


def partial_key_page_scores_ref(q: torch.Tensor, channels: torch.Tensor, k_partial: torch.Tensor,
                                block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                                scale: float = 1.0) -> torch.Tensor:
    """InfiniGen-style page scores [B, num_kv_heads, max_pages] float32 from a subset of key
    channels (spec of ``gpu_kernels.scoring.partial_key_page_scores``): per token,
    ``scale * max_j sum_i q[j, channels[h, i]] * k_partial[h, slot, t, i]``; per page the max
    over its tokens before ``seq_lens[b]``; -inf for pages past the sequence."""
    batch, num_heads, _ = q.shape
    nkv, _, ps, _ = k_partial.shape
    group = num_heads // nkv
    max_pages = block_table.shape[1]
    res = torch.full((batch, nkv, max_pages), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(batch):
        n = int(seq_lens[b])
        num_used = -(-n // ps)
        slots = block_table[b, :num_used].long()
        visible = torch.arange(num_used * ps, device=q.device).view(num_used, ps) < n
        for h in range(nkv):
            qs = q[b, h * group:(h + 1) * group][:, channels[h].long()].float()  # [group, r]
            kp = k_partial[h, slots].float()  # [num_used, ps, r]
            s = torch.einsum("gr,ptr->gpt", qs, kp).amax(dim=0) * scale  # [num_used, ps]
            res[b, h, :num_used] = s.masked_fill(~visible, float("-inf")).amax(dim=-1)
    return res
