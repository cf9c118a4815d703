"""Gemma 3 text decoder config: transformers' ``Gemma3TextConfig`` keys read into
``Gemma3Config`` (layer kinds, the two RoPE bases, sliding window), and the tensor shapes its
runner needs (``gemma3_expected_shapes``). The runner and checkpoint loading live in
``offload.model.gemma3``, which re-exports these names.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

from offload.errors import UnsupportedModelError

__all__ = ["SUPPORTED_ACTIVATIONS", "LayerKind", "Gemma3Config", "gemma3_expected_shapes"]

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)
# Defaults of transformers' Gemma3TextConfig, for keys a (sparse, nested) config.json omits.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131_072, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "bos_token_id": 2,
    "eos_token_id": 1, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "sliding_window_pattern": 6,
}


class LayerKind(enum.Enum):
    """Attention kind of a layer; the values are transformers' ``layer_types`` strings."""

    SLIDING = "sliding_attention"
    GLOBAL = "full_attention"


@dataclasses.dataclass(frozen=True, slots=True)
class Gemma3Config:
    """Shape and options of a Gemma 3 text decoder.

    Attributes:
        rope_theta / rope_scaling: RoPE base and scaling (None or ``{"rope_type": "linear",
            "factor": f}``) of the global layers.
        rope_local_base_freq / rope_local_scaling: the same for the sliding layers.
        sliding_window: keys a sliding layer's query sees, itself included.
        layer_types: one ``LayerKind`` per layer.
        final_logit_softcapping / attn_logit_softcapping: soft-cap values, None when off.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_local_base_freq: float
    sliding_window: int
    layer_types: tuple[LayerKind, ...]
    query_pre_attn_scalar: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    rope_scaling: dict[str, Any] | None = None
    rope_local_scaling: dict[str, Any] | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        rules = [(n, "must be >= 1", lambda v: v >= 1) for n in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "sliding_window", "max_position_embeddings")]
        rules += [(n, "must be > 0", lambda v: v > 0)
                  for n in ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar")]
        rules += [(n, "must be None or > 0", lambda v: v is None or v > 0)
                  for n in ("final_logit_softcapping", "attn_logit_softcapping")]
        for name, rule, ok in rules:
            if not ok(getattr(self, name)):
                raise ValueError(f"Gemma3Config.{name} {rule}, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"Gemma3Config.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if len(self.layer_types) != self.num_layers or not all(isinstance(k, LayerKind) for k in self.layer_types):
            raise ValueError(f"Gemma3Config.layer_types must hold num_layers ({self.num_layers}) LayerKind "
                             f"values, got {self.layer_types!r}")
        if self.hidden_activation not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_activation {self.hidden_activation!r} is not supported "
                                        f"(only {', '.join(SUPPORTED_ACTIVATIONS)})")
        for name in ("rope_scaling", "rope_local_scaling"):
            s = getattr(self, name)
            if s is not None and not (s.get("rope_type") == "linear" and float(s.get("factor", 0)) > 0):
                raise ValueError(f"Gemma3Config.{name} must be None or linear with factor > 0, got {s!r}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] is LayerKind.SLIDING

    @property
    def global_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_types) if k is LayerKind.GLOBAL)

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_types) if k is LayerKind.SLIDING)

    @property
    def arch(self) -> str:
        return "gemma3"

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer: the sliding window in keys, or None for a global layer."""
        return tuple(self.sliding_window if k is LayerKind.SLIDING else None for k in self.layer_types)

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def mlp_bias(self) -> bool:
        return False

    def kv_bytes_per_token(self, dtype_bytes: int, kind: LayerKind = LayerKind.GLOBAL) -> int:
        """Bytes of K and V of one token over all layers of ``kind``; by default the global
        layers, whose KV grows with the document (a sliding layer holds at most a window)."""
        num = len(self.global_layers if kind is LayerKind.GLOBAL else self.sliding_layers)
        return 2 * num * self.num_kv_heads * self.head_dim * dtype_bytes

    def with_num_layers(self, num_layers: int) -> "Gemma3Config":
        """The first ``num_layers`` layers (for quick runs); their kinds are kept."""
        return dataclasses.replace(self, num_layers=num_layers, layer_types=self.layer_types[:num_layers])

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "Gemma3Config":
        """Build from a HF ``config.json`` dict (``gemma3_text``, or ``gemma3`` with a
        ``text_config``), with transformers 4.x keys (``rope_theta``, ``rope_local_base_freq``,
        ``rope_scaling``, ``sliding_window_pattern``) or 5.x ones (``rope_parameters`` per
        layer type, ``layer_types``); absent keys take transformers' defaults.

        Raises:
            UnsupportedModelError: not Gemma 3, or an option this runner does not implement.
            ValueError: a value out of range (names the field).
        """
        model_type = d.get("model_type")
        if model_type == "gemma3" and "text_config" in d:
            d = dict(d["text_config"] or {})
            model_type = d.get("model_type", "gemma3_text")
        if model_type != "gemma3_text":
            raise UnsupportedModelError(f"model_type {model_type!r} is not Gemma 3 (expected 'gemma3_text' "
                                        "or 'gemma3' with a text_config)")
        if d.get("use_bidirectional_attention"):
            raise UnsupportedModelError("use_bidirectional_attention is not supported (causal decoding only)")
        g = {**_HF_DEFAULTS, **d}

        def num(key: str, kind: type) -> Any:
            if g[key] is None:
                raise ValueError(f"config {key} is null; Gemma 3 needs a number there")
            return kind(g[key])

        theta, scaling, local_theta, local_scaling = _rope_from_hf(d)
        eos = g["eos_token_id"]
        return cls(
            vocab_size=num("vocab_size", int), hidden_size=num("hidden_size", int),
            intermediate_size=num("intermediate_size", int), num_layers=num("num_hidden_layers", int),
            num_heads=num("num_attention_heads", int), num_kv_heads=num("num_key_value_heads", int),
            head_dim=num("head_dim", int), rms_norm_eps=num("rms_norm_eps", float),
            rope_theta=theta, rope_local_base_freq=local_theta, sliding_window=num("sliding_window", int),
            layer_types=_layer_types(d, num("num_hidden_layers", int)),
            query_pre_attn_scalar=num("query_pre_attn_scalar", float),
            max_position_embeddings=num("max_position_embeddings", int),
            tie_word_embeddings=bool(g["tie_word_embeddings"]),
            rope_scaling=scaling, rope_local_scaling=local_scaling,
            final_logit_softcapping=_opt_float(g.get("final_logit_softcapping")),
            attn_logit_softcapping=_opt_float(g.get("attn_logit_softcapping")),
            hidden_activation=str(g["hidden_activation"]), attention_bias=bool(g.get("attention_bias") or False),
            bos_token_id=g.get("bos_token_id"),
            eos_token_ids=_int_tuple(eos),
        )


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _int_tuple(v: Any) -> tuple[int, ...]:
    return () if v is None else tuple(int(e) for e in v) if isinstance(v, (list, tuple)) else (int(v),)


def _layer_types(d: dict[str, Any], num_layers: int) -> tuple[LayerKind, ...]:
    """``layer_types`` as given, or derived as transformers does: every ``pattern``-th layer
    (1-based) is global, the others sliding."""
    names = d.get("layer_types")
    if names is None:
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern")
                      or _HF_DEFAULTS["sliding_window_pattern"])
        return tuple(LayerKind.GLOBAL if (i + 1) % pattern == 0 else LayerKind.SLIDING for i in range(num_layers))
    known = {k.value: k for k in LayerKind}
    for name in names:
        if name not in known:
            raise UnsupportedModelError(f"layer type {name!r} is not supported (supported: {', '.join(known)})")
    return tuple(known[n] for n in names)


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float, dict[str, Any] | None]:
    """(global theta, global scaling, sliding theta, sliding scaling). transformers 4.x's
    ``rope_scaling`` applies to the global layers only."""
    params = d.get("rope_parameters")
    if params and set(params) <= {k.value for k in LayerKind}:
        glob = dict(params.get(LayerKind.GLOBAL.value) or {})
        loc = dict(params.get(LayerKind.SLIDING.value) or {})
    else:
        glob, loc = dict(params or d.get("rope_scaling") or {}), {}
    glob.setdefault("rope_theta", d.get("rope_theta") or _HF_DEFAULTS["rope_theta"])
    loc.setdefault("rope_theta", d.get("rope_local_base_freq") or _HF_DEFAULTS["rope_local_base_freq"])
    return (*_one_rope(glob, LayerKind.GLOBAL), *_one_rope(loc, LayerKind.SLIDING))


def _one_rope(p: dict[str, Any], kind: LayerKind) -> tuple[float, dict[str, Any] | None]:
    if "rope_type" not in p and p.get("type", "default") != "default":
        # transformers 5 reads only "rope_type" for Gemma 3 and would silently run default RoPE.
        raise UnsupportedModelError(f"RoPE scaling on {kind.value} layers uses the legacy key 'type'; "
                                    "write 'rope_type' so that transformers and this runner agree")
    rope_type = p.get("rope_type", "default")
    if rope_type == "default":
        return float(p["rope_theta"]), None
    if rope_type != "linear":
        raise UnsupportedModelError(f"RoPE type {rope_type!r} on {kind.value} layers is not supported "
                                    "(supported: default, linear)")
    if "factor" not in p:
        raise UnsupportedModelError(f"linear RoPE scaling on {kind.value} layers needs a 'factor'")
    return float(p["rope_theta"]), {"rope_type": "linear", "factor": float(p["factor"])}




def gemma3_expected_shapes(cfg: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the runner needs, in Hugging Face naming."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q_out, h), p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h), p + "self_attn.o_proj.weight": (h, q_out),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        shapes |= {p + f"{n}.weight": (h,) for n in ("input_layernorm", "post_attention_layernorm",
                                                     "pre_feedforward_layernorm", "post_feedforward_layernorm")}
        if cfg.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                       p + "self_attn.v_proj.bias": (kv_out,), p + "self_attn.o_proj.bias": (h,)}
    return shapes
