"""Gemma 3 text decoder: per-layer math, checkpoint loading and a plain reference forward (the
config lives in ``offload.model.gemma3_config`` and is re-exported here).

Gemma 3 differs from the Llama family in every piece of a layer, so it has its own runner with
``LlamaRunner``'s interface; RoPE and the safetensors file list are shared. Checked against
transformers' ``Gemma3ForCausalLM``: each layer is sliding-window (query i sees keys
i - window < j <= i) or global (causal) as ``layer_types`` says, with its own RoPE base; RMSNorm
scales by ``1 + weight`` in fp32 before casting back, also per head on q and k, and on each
sublayer's output before its residual add; embeddings are scaled by sqrt(hidden); the MLP is
gelu-tanh gated; scores are scaled by ``query_pre_attn_scalar ** -0.5``; final logits are
soft-capped (``cap * tanh(x / cap)``) when configured.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors import safe_open

from offload.errors import ModelNotFoundError
from offload.model.gemma3_config import Gemma3Config, LayerKind, gemma3_expected_shapes
from offload.model.model_config import ModelConfig
from offload.model.llama import count_weight_bytes
from offload.model.matvec import make_linear, weight_matrices
from offload.model.rope import RotaryEmbedding
from offload.model.weights import safetensors_files

__all__ = [
    "LayerKind", "Gemma3Config", "Gemma3Runner", "gemma3_expected_shapes", "load_gemma3_checkpoint",
    "load_gemma3_weights", "gemma3_random_weights", "causal_attention_ref", "reference_forward",
]

logger = logging.getLogger(__name__)

_RopeSpec = collections.namedtuple("_RopeSpec", "head_dim rope_theta rope_scaling")  # one layer kind's RoPE


@dataclasses.dataclass(slots=True)
class Gemma3LayerWeights:
    """One decoder layer. Norm gains are stored as fp32 ``1 + weight`` (what Gemma's RMSNorm
    multiplies by); q/k/v and gate/up are concatenated so each is one matmul."""

    w_qkv: torch.Tensor  # [(nq + 2 nkv) * head_dim, hidden]
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor  # [hidden, nq * head_dim]
    b_o: torch.Tensor | None
    w_gate_up: torch.Tensor  # [2 * intermediate, hidden]
    w_down: torch.Tensor  # [hidden, intermediate]
    q_norm: torch.Tensor  # [head_dim] fp32
    k_norm: torch.Tensor  # [head_dim] fp32
    ln_in: torch.Tensor  # [hidden] fp32, before attention
    ln_post_attn: torch.Tensor  # [hidden] fp32, on the attention output
    ln_pre_ff: torch.Tensor  # [hidden] fp32, before the MLP
    ln_post_ff: torch.Tensor  # [hidden] fp32, on the MLP output


def _gain(w: torch.Tensor) -> torch.Tensor:
    return 1.0 + w.float()


class Gemma3Runner:
    """Weights and per-layer math of a Gemma 3 text decoder (interface of ``LlamaRunner``).

    Args:
        weights: Hugging Face-named tensors (see ``gemma3_expected_shapes``), already on
            ``device`` in the compute dtype; the dict is consumed.

    Attributes:
        scale: attention score scale, ``query_pre_attn_scalar ** -0.5``.
        window: keys a sliding layer's query sees (itself included).
        attn_softcap: attention-score soft-cap (None in released Gemma 3 configs).
    """

    def __init__(self, cfg: Gemma3Config, weights: dict[str, torch.Tensor], *, device: torch.device,
                 row_kernel: bool = True) -> None:
        self.cfg = cfg
        self.device = device
        self.embed_tokens = weights.pop("model.embed_tokens.weight")
        self.dtype = self.embed_tokens.dtype
        # transformers rounds sqrt(hidden) to the compute dtype before multiplying.
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=torch.float32).to(device, self.dtype)
        self.norm = _gain(weights.pop("model.norm.weight"))
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else weights.pop("lm_head.weight")
        self.layers = [self._take_layer(weights, i) for i in range(cfg.num_layers)]
        # offload.model.rope reads only head_dim, rope_theta and rope_scaling of its config.
        self.rope_global = RotaryEmbedding(cast(ModelConfig, _RopeSpec(cfg.head_dim, cfg.rope_theta,
                                                                       cfg.rope_scaling)), device)
        self.rope_sliding = RotaryEmbedding(cast(ModelConfig, _RopeSpec(cfg.head_dim, cfg.rope_local_base_freq,
                                                                        cfg.rope_local_scaling)), device)
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.window = cfg.sliding_window
        self.attn_softcap = cfg.attn_logit_softcapping
        self.weights_bytes = self._count_bytes()
        self.linear = make_linear(device, self.dtype, weight_matrices(self), row_kernel=row_kernel)

    def _count_bytes(self) -> int:
        return count_weight_bytes(self)

    def _take_layer(self, w: dict[str, torch.Tensor], i: int) -> Gemma3LayerWeights:
        p = f"model.layers.{i}."
        biases = [w.pop(p + f"self_attn.{x}_proj.bias", None) for x in "qkvo"]
        b_qkv = None if any(b is None for b in biases[:3]) else torch.cat(biases[:3], dim=0)  # type: ignore[arg-type]
        return Gemma3LayerWeights(
            w_qkv=torch.cat([w.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"], dim=0),
            b_qkv=b_qkv,
            w_o=w.pop(p + "self_attn.o_proj.weight"),
            b_o=biases[3],
            w_gate_up=torch.cat([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")], dim=0),
            w_down=w.pop(p + "mlp.down_proj.weight"),
            q_norm=_gain(w.pop(p + "self_attn.q_norm.weight")),
            k_norm=_gain(w.pop(p + "self_attn.k_norm.weight")),
            ln_in=_gain(w.pop(p + "input_layernorm.weight")),
            ln_post_attn=_gain(w.pop(p + "post_attention_layernorm.weight")),
            ln_pre_ff=_gain(w.pop(p + "pre_feedforward_layernorm.weight")),
            ln_post_ff=_gain(w.pop(p + "post_feedforward_layernorm.weight")),
        )

    def layer_is_sliding(self, layer: int) -> bool:
        return self.cfg.is_sliding(layer)

    def rms_norm(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """Gemma RMSNorm over the last dim: normalize and scale in fp32, then cast back
        (Llama casts before scaling)."""
        if x.dtype == torch.float32:  # torch's op computes the same steps in the same order, in one call
            return F.rms_norm(x, (x.shape[-1],), gain, self.cfg.rms_norm_eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return (xf * gain).to(x.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] int64 -> [T, hidden] in the compute dtype, scaled by sqrt(hidden)."""
        return F.embedding(ids, self.embed_tokens) * self.embed_scale

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normed, projected, per-head-normed and rotated q [T, nq, hd], k [T, nkv, hd] and
        v [T, nkv, hd] (v is neither normed nor rotated). positions: [T] int64."""
        cfg, lw = self.cfg, self.layers[layer]
        nq, nkv, hd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
        t = h.shape[0]
        qkv = self.linear(self.rms_norm(h, lw.ln_in), lw.w_qkv, lw.b_qkv)
        q = self.rms_norm(qkv[:, :nq].view(t, cfg.num_heads, hd), lw.q_norm)
        k = self.rms_norm(qkv[:, nq : nq + nkv].view(t, cfg.num_kv_heads, hd), lw.k_norm)
        v = qkv[:, nq + nkv :].view(t, cfg.num_kv_heads, hd)
        rope = self.rope_sliding if cfg.is_sliding(layer) else self.rope_global
        cos, sin = rope.cos_sin(positions, h.dtype)
        return RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin), v

    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """o_proj, post-attention norm and residual, then pre-feed-forward norm, gelu-tanh
        gated MLP, post-feed-forward norm and residual. h: [T, hidden]; attn: [T, nq * head_dim]
        in the compute dtype."""
        return self.mlp(layer, self.attn_out(layer, h, attn))

    def attn_out(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual stream after the attention block: h + post-norm(o_proj(attn))."""
        lw = self.layers[layer]
        return h + self.rms_norm(self.linear(attn, lw.w_o, lw.b_o), lw.ln_post_attn)

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The gated MLP block with its pre- and post-norms and residual."""
        lw = self.layers[layer]
        gate, up = self.linear(self.rms_norm(h, lw.ln_pre_ff), lw.w_gate_up).chunk(2, dim=-1)
        mlp = self.linear(F.gelu(gate, approximate="tanh") * up, lw.w_down)
        return h + self.rms_norm(mlp, lw.ln_post_ff)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, vocab] float32 (final norm, lm head, soft-cap if configured)."""
        out = self.linear(self.rms_norm(h, self.norm), self.lm_head)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out.float()


_PREFIX_MAP = (("model.language_model.", "model."), ("language_model.model.", "model."),
               ("language_model.lm_head.", "lm_head."))


def load_gemma3_checkpoint(
    ckpt_dir: Path, *, dtype: torch.dtype, device: torch.device
) -> tuple[Gemma3Config, dict[str, torch.Tensor]]:
    """Read ``config.json`` and the tensors the runner needs, cast to ``dtype`` on ``device``.
    Names under ``model.language_model.`` / ``language_model.model.`` (multimodal checkpoints)
    are read as ``model.``; vision tensors are skipped.

    Raises:
        ModelNotFoundError: no config.json, or a tensor is missing or has the wrong shape.
        UnsupportedModelError: the config is not a supported Gemma 3 text decoder.
    """
    ckpt_dir = Path(ckpt_dir)
    config_path = ckpt_dir / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{ckpt_dir} has no config.json; pass a Gemma 3 checkpoint directory")
    with open(config_path) as f:
        cfg = Gemma3Config.from_hf(json.load(f))
    return cfg, load_gemma3_weights(ckpt_dir, cfg, dtype=dtype, device=device)


def load_gemma3_weights(ckpt_dir: Path, cfg: Gemma3Config, *, dtype: torch.dtype,
                        device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of ``cfg``'s runner from a checkpoint directory (see ``load_gemma3_checkpoint``).

    Raises:
        ModelNotFoundError: a tensor is missing or has the wrong shape.
    """
    ckpt_dir = Path(ckpt_dir)
    shapes = gemma3_expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for path in safetensors_files(ckpt_dir):
        with safe_open(str(path), framework="pt") as sf:
            for name in sf.keys():
                ours = next((new + name[len(old):] for old, new in _PREFIX_MAP if name.startswith(old)), name)
                if ours in shapes:
                    out[ours] = sf.get_tensor(name).to(device=device, dtype=dtype)
    missing = [n for n in shapes if n not in out]
    if missing:
        raise ModelNotFoundError(f"checkpoint {ckpt_dir} lacks {len(missing)} tensors (first: {missing[0]}); "
                                 "is it a Gemma 3 checkpoint matching its config.json?")
    for name, shape in shapes.items():
        if tuple(out[name].shape) != shape:
            raise ModelNotFoundError(f"tensor {name} in {ckpt_dir} has shape {tuple(out[name].shape)}, "
                                     f"expected {shape}")
    logger.debug("loaded %d Gemma 3 tensors from %s", len(out), ckpt_dir)
    return out


def gemma3_random_weights(cfg: Gemma3Config, *, dtype: torch.dtype, device: torch.device,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the model's shape for throughput runs: normal (std 0.02) projections
    and embeddings, norm weights 0 (a gain of 1: Gemma's norms scale by ``1 + weight``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in gemma3_expected_shapes(cfg).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t.zero_()
        else:
            t.normal_(0.0, 0.02, generator=gen)
        out[name] = t
    return out


def causal_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int | None = None,
    softcap: float | None = None, query_block: int = 512,
) -> torch.Tensor:
    """Plain causal (optionally sliding-window) grouped-query attention over one sequence, in
    fp32. Query i sees key j iff ``j <= i`` and, with a window, ``i - window < j`` (transformers'
    sliding-window mask); scores ``scale * q.k`` are soft-capped (``cap * tanh(s / cap)``) if asked.

    Args:
        q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] (same device).
        query_block: queries per step (bounds the score matrix to [heads, block, T]).

    Returns:
        [T, num_heads, head_dim] float32.
    """
    t, nq, _ = q.shape
    group = nq // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [nq, T, hd]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    key_pos = torch.arange(t, device=q.device)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for q0 in range(0, t, query_block):
        q1 = min(t, q0 + query_block)
        scores = torch.matmul(q[q0:q1].float().transpose(0, 1), kf.transpose(1, 2)) * scale  # [nq, b, T]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        qpos = key_pos[q0:q1, None]
        visible = key_pos[None, :] <= qpos
        if window is not None:
            visible &= key_pos[None, :] > qpos - window
        scores = scores.masked_fill(~visible, -math.inf)
        out[q0:q1] = torch.matmul(torch.softmax(scores, dim=-1), vf).transpose(0, 1)
    return out


@torch.no_grad()
def reference_forward(runner: Gemma3Runner, ids: torch.Tensor, *, num_last: int | None = None) -> torch.Tensor:
    """Whole-sequence forward with plain attention: the oracle the paged engine is checked against.

    Args:
        ids: [T] int64 token ids on the runner's device (positions 0..T-1).
        num_last: logits of only the last ``num_last`` positions (saves vocab x T floats).

    Returns:
        [T or num_last, vocab] float32 logits.
    """
    t = ids.shape[0]
    positions = torch.arange(t, device=ids.device)
    h = runner.embed(ids)
    for layer in range(runner.cfg.num_layers):
        q, k, v = runner.qkv(layer, h, positions)
        window = runner.window if runner.layer_is_sliding(layer) else None
        attn = causal_attention_ref(q, k, v, scale=runner.scale, window=window, softcap=runner.attn_softcap)
        h = runner.finish_layer(layer, h, attn.reshape(t, -1).to(h.dtype))
    return runner.logits(h if num_last is None else h[t - min(num_last, t):])
