"""Load a Llama-family checkpoint's tensors (safetensors) or make random ones of its shape."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from offload.errors import ModelNotFoundError
from offload.model.model_config import ModelConfig

__all__ = ["load_checkpoint", "random_weights", "expected_shapes", "safetensors_files"]

logger = logging.getLogger(__name__)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the runner needs, in Hugging Face naming."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if cfg.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                       p + "self_attn.v_proj.bias": (kv_out,)}
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            shapes |= {p + "mlp.gate_proj.bias": (cfg.intermediate_size,),
                       p + "mlp.up_proj.bias": (cfg.intermediate_size,), p + "mlp.down_proj.bias": (h,)}
    return shapes


def safetensors_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [ckpt / n for n in names]
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{ckpt} holds no *.safetensors weights; pass a checkpoint directory")
    return files


def load_checkpoint(
    ckpt: Path, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Read the tensors the runner needs, cast to ``dtype`` on ``device``.

    Raises:
        ModelNotFoundError: a tensor is missing or has the wrong shape.
    """
    shapes = expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for path in safetensors_files(ckpt):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in shapes:
                    out[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    missing = [n for n in shapes if n not in out]
    if missing:
        raise ModelNotFoundError(
            f"checkpoint {ckpt} lacks {len(missing)} tensors (first: {missing[0]}); is it a "
            f"{cfg.arch} checkpoint matching its config.json?"
        )
    for name, shape in shapes.items():
        if tuple(out[name].shape) != shape:
            raise ModelNotFoundError(f"tensor {name} in {ckpt} has shape {tuple(out[name].shape)}, expected {shape}")
    return out


def random_weights(
    cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random tensors of the model's shape (normal, std 0.02; norms 1; biases small).

    For throughput runs and for exactness tests that load the same tensors into both this
    runner and a transformers model.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        out[name] = t
    return out
