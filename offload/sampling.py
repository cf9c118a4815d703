"""Next-token choice: greedy, or temperature with nucleus (top-p) sampling (Holtzman et al., 2020)."""
from __future__ import annotations

import dataclasses

import math

import torch

from offload.errors import InputError

__all__ = ["SamplingConfig", "Sampler", "top_p_mask"]


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingConfig:
    """How to pick tokens.

    Attributes:
        temperature: 0 means greedy (argmax); > 0 samples from softmax(logits / temperature).
        top_p: keep the smallest set of most likely tokens whose mass reaches top_p (1 keeps all).
        seed: seed of the sampling generator; runs with the same seed reproduce.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InputError(f"{name} takes a number, got {type(value).__name__} {value!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask [V] of the nucleus: the most likely tokens, in order, up to and including
    the first one at which the cumulative mass reaches ``top_p``."""
    if top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)  # a float cumsum may reach 1 early
    sorted_p, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_p, dim=0) - sorted_p  # mass strictly before each token
    keep_sorted = before < top_p
    keep_sorted[0] = True
    mask = torch.zeros_like(keep_sorted)
    mask[order] = keep_sorted
    return mask


class Sampler:
    """Picks tokens from logits according to a ``SamplingConfig``."""

    def __init__(self, cfg: SamplingConfig) -> None:
        self.cfg = cfg
        self._gen = torch.Generator().manual_seed(cfg.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] float32 on any device -> chosen token id."""
        if self.cfg.is_greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / self.cfg.temperature, dim=-1)
        if self.cfg.top_p < 1.0:
            probs = torch.where(top_p_mask(probs, self.cfg.top_p), probs, torch.zeros_like(probs))
        return int(torch.multinomial(probs, 1, generator=self._gen))
