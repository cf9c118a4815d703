"""Low-rank pre-RoPE keys: the calibration and measurement step of ShadowKV (Sun et al., 2024).

A layer's keys before RoPE are close to low rank (RoPE mixes each pair of channels by an angle
that changes with the position, which spreads the post-RoPE keys over many more dimensions).
ShadowKV keeps, per layer, the rank-r factors of the pre-RoPE keys of every KV head side by side,

    K  [T, D] (D = num_kv_heads * head_dim)  ~  A [T, r] @ B [r, D]   (A = U_r S_r, B = V_r^T)

and for a sparse decode step rebuilds only the keys of the pages it attends, ``A[tokens] @ B``,
then rotates them at their positions. The pages the factors reconstruct worst ("outliers") are
kept exact. This module computes and checks the factors; the engine does not use them yet.

Mean-free or not: ``factorize(..., center=False)`` (the default) factors the keys as they are,
as ShadowKV does; ``center=True`` removes the per-channel mean over the tokens first and keeps
it (``KeyFactors.mean``, D floats) so the rank is spent on the spread around it. Centered rank
r is never worse than uncentered rank r (the best affine rank-r fit passes through the mean)
and never better than uncentered rank r + 1 (it is a rank-(r + 1) matrix). On real keys it
buys next to nothing: ``bench/lowrank_keys.py`` at 8K tokens measured mean errors 0.0029 /
0.0059 below the uncentered ones at r = 16 and <= 0.0012 from r = 64 up (SmolLM2-135M / Gemma 3
270M), the same ``choose_rank`` at 0.05 and 0.1; the option stays for models with larger means.

Which SVD (``SvdMethod``), measured by ``bench/lowrank_keys.py`` on real 8K keys, fp32, this
machine's 2 shared CPU cores (median of 5, 2 threads): ``torch.linalg.svd`` (thin) 0.062-0.067 s
for 8131 x 192 (SmolLM2) and 0.10-0.12 s for 8076 x 256 (Gemma 3), whatever the rank;
``torch.svd_lowrank`` (q = r + 8, niter 2) 0.015 / 0.027 s at r = 16, 0.032 / 0.056 s at
r = 64, 0.099 / 0.108 s at r = 128, and 0.4-2 % larger errors. At the ranks the keys need
(64-128 of 192/256) the randomized SVD saves at most 2x and nothing at r = 128, so FULL (exact,
every rank from one call: ``rank_errors``, ``choose_rank``) is the default; LOWRANK is kept
for wide layers (D = 1024 and up) where the thin SVD's T D^2 grows and small ranks suffice.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence

import torch

from offload.model.rope import RotaryEmbedding

__all__ = ["SvdMethod", "KeyFactors", "unrotate_keys", "layer_rope", "factorize", "rebuild",
           "rebuild_rotated", "page_errors", "frobenius_error", "outlier_pages", "rank_errors",
           "choose_rank", "RANK_STEP"]

RANK_STEP = 8  # ranks choose_rank tries: multiples of this (a GEMM-friendly width)
_LOWRANK_OVERSAMPLE = 8  # extra columns of svd_lowrank's random projection (Halko et al. 2011)
_LOWRANK_NITER = 2  # its power iterations


class SvdMethod(enum.Enum):
    """How ``factorize`` computes the SVD (see the module docstring for the timings)."""

    FULL = "full"  # torch.linalg.svd, thin: exact
    LOWRANK = "lowrank"  # torch.svd_lowrank: randomized, q = rank + 8 columns


@dataclasses.dataclass(frozen=True, slots=True)
class KeyFactors:
    """Rank-r factors of one layer's pre-RoPE keys: ``keys[t] ~ a[t] @ b (+ mean)``.

    Attributes:
        a: [T, r] float32, ``U_r * S_r`` (one row per token).
        b: [r, D] float32, ``V_r^T``, D = num_kv_heads * head_dim (KV heads side by side).
        mean: [D] float32 per-channel mean over the tokens that was removed before the SVD,
            or None (uncentered: the default, as ShadowKV).
        num_kv_heads, head_dim: the keys' head shape (D = their product).
    """

    a: torch.Tensor
    b: torch.Tensor
    mean: torch.Tensor | None
    num_kv_heads: int
    head_dim: int

    @property
    def rank(self) -> int:
        return int(self.b.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.a.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of a, b and the mean."""
        tensors = [self.a, self.b] + ([] if self.mean is None else [self.mean])
        return sum(t.numel() * t.element_size() for t in tensors)


def unrotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo ``RotaryEmbedding.apply``: the pre-RoPE keys.

    ``apply`` maps each channel pair (x1, x2) = (x[i], x[i + hd/2]) to (x1 c - x2 s, x2 c + x1 s);
    the inverse rotation is the same map with -s. Computed in float32 with the cos/sin the
    keys were rotated with (for 16-bit compute those are rounded values, so the inverse is exact
    only to that rounding).

    Args:
        keys: [T, num_kv_heads, head_dim] rotated keys, any float dtype.
        cos, sin: [T, head_dim] from ``RotaryEmbedding.cos_sin(positions, dtype)`` of the keys'
            positions, with the layer's RoPE (``layer_rope``).

    Returns:
        [T, num_kv_heads, head_dim] float32 pre-RoPE keys. For Gemma 3 that is after the
        per-head key norm (the norm precedes RoPE).
    """
    if keys.dim() != 3 or cos.shape != (keys.shape[0], keys.shape[2]) or sin.shape != cos.shape:
        raise ValueError(f"keys must be [T, heads, head_dim] and cos/sin [T, head_dim]; got keys "
                         f"{tuple(keys.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    return RotaryEmbedding.apply(keys.float(), cos.float(), -sin.float())


def layer_rope(runner: object, layer: int) -> RotaryEmbedding:
    """The RoPE a runner rotates ``layer``'s keys with: Gemma 3's sliding and global layers use
    different bases (``rope_sliding`` / ``rope_global``); a Llama-family runner has one ``rope``."""
    if hasattr(runner, "rope_global"):
        sliding = runner.layer_is_sliding(layer)  # type: ignore[attr-defined]
        return runner.rope_sliding if sliding else runner.rope_global  # type: ignore[attr-defined]
    return runner.rope  # type: ignore[attr-defined]


def _flat(pre_keys: torch.Tensor) -> torch.Tensor:
    """[T, nkv, hd] -> [T, nkv * hd] float32 (heads side by side)."""
    if pre_keys.dim() != 3 or pre_keys.shape[0] < 1:
        raise ValueError(f"pre_keys must be [T >= 1, num_kv_heads, head_dim], got {tuple(pre_keys.shape)}")
    return pre_keys.reshape(pre_keys.shape[0], -1).float()


def factorize(pre_keys: torch.Tensor, rank: int, *, center: bool = False,
              method: SvdMethod = SvdMethod.FULL) -> KeyFactors:
    """Rank-``rank`` factors of one layer's pre-RoPE keys (the best rank-r approximation in
    Frobenius norm with ``SvdMethod.FULL``; randomized with ``LOWRANK``).

    Args:
        pre_keys: [T, num_kv_heads, head_dim] (``unrotate_keys``), any float dtype, any device.
        rank: 1 <= rank <= min(T, D).
        center: remove (and keep) the per-channel mean first; see the module docstring.

    Raises:
        ValueError: rank out of range, or pre_keys not 3-D.
    """
    k = _flat(pre_keys)
    t, d = k.shape
    if not 1 <= rank <= min(t, d):
        raise ValueError(f"rank must be between 1 and min(T, D) = {min(t, d)}, got {rank}")
    mean = k.mean(dim=0) if center else None
    if mean is not None:
        k = k - mean
    if method == SvdMethod.FULL:
        u, s, vh = torch.linalg.svd(k, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, v = torch.svd_lowrank(k, q=min(rank + _LOWRANK_OVERSAMPLE, t, d), niter=_LOWRANK_NITER)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    return KeyFactors(a=(u * s).contiguous(), b=vh.contiguous(), mean=mean,
                      num_kv_heads=int(pre_keys.shape[1]), head_dim=int(pre_keys.shape[2]))


def rebuild(factors: KeyFactors, token_index: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys of the tokens ``token_index`` ([n] int64 rows of the factored keys) from
    the factors: [n, num_kv_heads, head_dim] float32."""
    k = factors.a[token_index] @ factors.b
    if factors.mean is not None:
        k = k + factors.mean
    return k.view(-1, factors.num_kv_heads, factors.head_dim)


def rebuild_rotated(factors: KeyFactors, token_index: torch.Tensor, positions: torch.Tensor,
                    rope: RotaryEmbedding) -> torch.Tensor:
    """What a sparse step would attend: ``rebuild`` then RoPE at ``positions`` ([n] int64, the
    tokens' positions) with the layer's ``rope``: [n, num_kv_heads, head_dim] float32."""
    cos, sin = rope.cos_sin(positions, torch.float32)
    return RotaryEmbedding.apply(rebuild(factors, token_index), cos, sin)


def _page_sq_norms(x: torch.Tensor, page_size: int) -> torch.Tensor:
    """Per page of ``page_size`` rows (the last one may be short): the sum of squares, float64."""
    t = x.shape[0]
    num_pages = math.ceil(t / page_size)
    rows = x.double().pow(2).sum(dim=1)
    padded = torch.zeros(num_pages * page_size, dtype=torch.float64, device=x.device)
    padded[:t] = rows
    return padded.view(num_pages, page_size).sum(dim=1)


def _residual_and_norm(pre_keys: torch.Tensor, factors: KeyFactors, page_size: int) -> tuple[torch.Tensor, ...]:
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    k = _flat(pre_keys)
    if k.shape[0] != factors.num_tokens or k.shape[1] != factors.b.shape[1]:
        raise ValueError(f"pre_keys {tuple(pre_keys.shape)} do not match factors of {factors.num_tokens} tokens "
                         f"x {factors.b.shape[1]} channels")
    full = rebuild(factors, torch.arange(k.shape[0], device=k.device)).reshape(k.shape)
    return _page_sq_norms(k - full, page_size), _page_sq_norms(k, page_size)


def page_errors(pre_keys: torch.Tensor, factors: KeyFactors, page_size: int) -> torch.Tensor:
    """Relative L2 (Frobenius) reconstruction error per page, ``||K_p - K^_p|| / ||K_p||``.

    Args:
        pre_keys: [T, num_kv_heads, head_dim], the keys ``factors`` were made from.
        page_size: tokens per page; page p holds tokens [p * page_size, (p + 1) * page_size).

    Returns:
        [ceil(T / page_size)] float32 (an all-zero page counts 0 when rebuilt as zeros).
    """
    res, norm = _residual_and_norm(pre_keys, factors, page_size)
    return (res.sqrt() / norm.sqrt().clamp_min(torch.finfo(torch.float32).tiny)).float()


def frobenius_error(pre_keys: torch.Tensor, factors: KeyFactors, *, page_size: int = 1,
                    exact_pages: torch.Tensor | None = None) -> float:
    """Relative Frobenius error ``||K - K^|| / ||K||`` of the whole layer, with the pages
    ``exact_pages`` ([k] int64 page ids of ``page_size`` tokens, e.g. ``outlier_pages``) kept exact."""
    res, norm = _residual_and_norm(pre_keys, factors, page_size)
    if exact_pages is not None:
        res = res.clone()
        res[exact_pages] = 0.0
    return float(res.sum().sqrt() / norm.sum().sqrt().clamp_min(1e-300))


def outlier_pages(errors: torch.Tensor, share: float) -> torch.Tensor:
    """The worst-reconstructed pages: the ``ceil(share * num_pages)`` largest ``errors``
    ([num_pages], ``page_errors``), as [k] int64 page ids, worst first (empty for share 0).

    Raises:
        ValueError: share outside [0, 1] or errors not 1-D.
    """
    if errors.dim() != 1:
        raise ValueError(f"errors must be [num_pages], got {tuple(errors.shape)}")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    count = math.ceil(share * errors.numel())
    return torch.topk(errors, count).indices if count else torch.zeros(0, dtype=torch.int64)


def rank_errors(pre_keys: torch.Tensor, ranks: Sequence[int], *, center: bool = False) -> list[float]:
    """Relative Frobenius error of the best rank-r approximation for each r in ``ranks``, from
    one thin SVD: ``sqrt(sum_{i > r} s_i^2) / ||K||`` (float64 sums; with ``center`` the
    singular values of the centered keys, the norm still the keys' own).

    Raises:
        ValueError: a rank outside [0, D].
    """
    k = _flat(pre_keys)
    d = k.shape[1]
    if any(not 0 <= r <= d for r in ranks):
        raise ValueError(f"ranks must lie in [0, D = {d}], got {list(ranks)}")
    total = k.double().pow(2).sum()
    s = torch.linalg.svdvals(k - k.mean(dim=0) if center else k).double()
    tail = torch.flip(torch.cumsum(torch.flip(s.pow(2), [0]), 0), [0])  # tail[i] = sum_{j >= i} s_j^2
    tail = torch.cat([tail, tail.new_zeros(1)])
    return [float(tail[min(r, s.numel())].clamp_min(0).sqrt() / total.sqrt().clamp_min(1e-300)) for r in ranks]


def choose_rank(pre_keys_by_layer: Sequence[torch.Tensor], target: float, *, center: bool = False,
                step: int = RANK_STEP) -> int:
    """The smallest rank, a multiple of ``step``, whose mean relative Frobenius error over the
    layers is <= ``target`` (D, the full width, if no smaller one is: its error is 0).

    Args:
        pre_keys_by_layer: per layer [T_l, num_kv_heads, head_dim] pre-RoPE keys, one width D.
        target: in (0, 1].

    Raises:
        ValueError: no layers, widths differ, or target outside (0, 1].
    """
    if not pre_keys_by_layer:
        raise ValueError("choose_rank needs the keys of at least one layer")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    widths = {int(k.shape[1] * k.shape[2]) for k in pre_keys_by_layer}
    if len(widths) != 1:
        raise ValueError(f"every layer's keys must have one width D = heads * head_dim, got {sorted(widths)}")
    d = widths.pop()
    ranks = list(range(step, d, step))
    if not ranks:
        return d
    errors = torch.tensor([rank_errors(k, ranks, center=center) for k in pre_keys_by_layer]).mean(dim=0)
    meets = (errors <= target).nonzero()
    return ranks[int(meets[0])] if meets.numel() else d
