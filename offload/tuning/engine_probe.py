"""The engine probe of ``offload profile``: fixed times of the real engine's decode step.

It builds ``offload.engine.Engine`` on a tiny random-weight model, so it sits above the
engine in the import graph; the other probes (``offload.tuning.profile_probes``) need no
engine, and the engine itself never imports this module (it only reads saved profiles,
``offload.tuning.profile_store``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.kv.placement import Placement
from offload.model.model_config import ModelConfig
from offload.model.model_source import ModelSource
from offload.tuning.profile_probes import median_seconds

__all__ = ["engine_overheads", "tiny_model_config"]

logger = logging.getLogger(__name__)

MiB = 2**20


def tiny_model_config() -> ModelConfig:
    """The tiny Llama whose decode step is all overhead (launches, Python): 4 layers of
    hidden 64, 2 query heads and 1 KV head of 32, vocabulary 256."""
    return ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4,
                       num_heads=2, num_kv_heads=1, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096, tie_word_embeddings=True)


def engine_overheads(device: torch.device, dtype: torch.dtype, kv_dir: Path, *, steps: int = 20,
                     warmup: int = 3) -> tuple[float, float]:
    """Fixed times of ``offload.engine.Engine``'s decode step, from a tiny random-weight model
    (``tiny_model_config``; ``ModelSource.weights_dir`` None) whose compute is negligible:

    - per layer: the median step with every page on DEVICE, divided by the layer count;
    - per extra attention piece: the same with each layer's pages spread over DEVICE, HOST and
      DISK (two more pieces: the HOST call and one staged DISK chunk of 42 pages, read as the
      engine reads a chunk, in pieces, with their merge), minus the DEVICE-only step, divided
      by 2 x layers (0 when noise makes it negative).

    The DISK tier lives in a fresh directory under ``kv_dir``, removed when the engine closes.

    Returns:
        (seconds per layer and step, seconds per extra attention piece).
    """
    cfg = tiny_model_config()
    device_only = _tiny_step_s(device, dtype, kv_dir, None, steps=steps, warmup=warmup)
    spread = _tiny_step_s(device, dtype, kv_dir, Placement(device_pages=1, host_pages=1), steps=steps, warmup=warmup)
    return device_only / cfg.num_layers, max(0.0, (spread - device_only) / (2 * cfg.num_layers))


def _tiny_step_s(device: torch.device, dtype: torch.dtype, kv_dir: Path, placement: Placement | None, *,
                 steps: int, warmup: int, prompt_tokens: int = 44 * 32 + 8) -> float:
    """Median decode step of the tiny model after a ``prompt_tokens`` prompt (44 full pages of
    32 tokens and a partial tail), under ``placement`` (None: all DEVICE)."""
    cfg = tiny_model_config()
    source = ModelSource("profile-tiny-llama", cfg, None, None)
    # The tiny engine never plans (so never needs the hardware profile being measured): the
    # DEVICE-only run fits its 16 MiB arena, the spread run has a placement.
    tiers = (dict(placement=placement, host_memory_bytes=16 * MiB, disk_space_bytes=16 * MiB) if placement
             else dict(disk_space_bytes=0))
    config = RuntimeConfig(device=str(device), dtype=dtype, device_memory_bytes=16 * MiB, kv_dir=str(kv_dir), **tiers)
    engine = Engine(source, config)
    try:
        seq = engine.new_sequence()
        engine.forward(seq, [i % cfg.vocab_size for i in range(prompt_tokens)])
        token = [1]

        def step() -> None:
            engine.forward(seq, token)
            engine.sync()

        t = median_seconds(step, steps, warmup=warmup)
        engine.release(seq)
    finally:
        engine.close()
    return t
