"""Model shape and architecture options of a Llama-family decoder, read from a HF config.

Supported: Llama 2/3.x (RoPE types default, linear and llama3), Mistral without a sliding
window, Qwen2/2.5 (q/k/v bias), SmolLM (Llama). Anything else is refused with
``UnsupportedModelError`` naming the feature, so a model is never run half-supported.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from offload.errors import UnsupportedModelError

__all__ = ["ModelConfig", "SUPPORTED_ARCHS", "SUPPORTED_ROPE_TYPES"]

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of a Llama-family decoder.

    Attributes:
        arch: one of ``SUPPORTED_ARCHS``.
        rope_scaling: None, or a dict with ``rope_type`` and that type's parameters.
        qkv_bias / o_bias / mlp_bias: which projections carry a bias.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer: the sliding window in keys, or None (every layer attends globally)."""
        return (None,) * self.num_layers

    def kv_bytes_per_token(self, elem_bytes: int) -> int:
        """Bytes of K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_bytes

    def with_num_layers(self, num_layers: int) -> "ModelConfig":
        return dataclasses.replace(self, num_layers=num_layers)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x keys).

        Raises:
            UnsupportedModelError: the architecture or one of its options is not implemented.
        """
        arch = d.get("model_type")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"model_type {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)}); "
                "use a Llama, Mistral, Qwen2 or SmolLM checkpoint"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
        _refuse_sliding_window(arch, d)
        theta, scaling = _rope_from_dict(d)
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // num_heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            arch=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            qkv_bias=True if arch == "qwen2" else attention_bias,
            o_bias=False if arch == "qwen2" else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _refuse_sliding_window(arch: str, d: dict[str, Any]) -> None:
    window = d.get("sliding_window")
    if arch == "qwen2":
        used = bool(d.get("use_sliding_window", False)) and window is not None
    else:
        used = window is not None
    if used:
        raise UnsupportedModelError(
            f"this {arch} config uses sliding-window attention (sliding_window={window}), which the "
            "Llama-family runner does not implement; use a config with sliding_window null "
            "(e.g. Mistral v0.2+)"
        )


def _rope_from_dict(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either ``rope_parameters`` (transformers 5) or
    ``rope_theta`` + ``rope_scaling`` (transformers 4)."""
    params = dict(d.get("rope_parameters") or {})
    if not params:
        params = dict(d.get("rope_scaling") or {})
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    if "factor" not in params:
        raise UnsupportedModelError(f"RoPE type {rope_type!r} needs a 'factor' in the config")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise UnsupportedModelError(f"llama3 RoPE scaling needs {key!r} in the config")
    return theta, params
