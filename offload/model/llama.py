"""Llama-family decoder layer math (Llama 2/3.x, Mistral, Qwen2, SmolLM).

The runner holds the weights and computes one layer's pieces on a chunk of tokens; the
engine decides the schedule (layer-wise prefill, decode) and where K/V pages live. Numerics
follow the Hugging Face implementation so exact mode reproduces its tokens: RMSNorm in fp32,
RoPE cos/sin in fp32, softmax in fp32.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from offload.model.model_config import ModelConfig
from offload.model.matvec import make_linear, weight_matrices
from offload.model.rope import RotaryEmbedding

__all__ = ["LlamaRunner", "LayerWeights", "count_weight_bytes"]


@dataclasses.dataclass(slots=True)
class LayerWeights:
    """One decoder layer. q/k/v and gate/up are concatenated so each is one matmul."""

    w_qkv: torch.Tensor  # [(nq + 2 nkv) * head_dim, hidden]
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor  # [hidden, nq * head_dim]
    b_o: torch.Tensor | None
    w_gate_up: torch.Tensor  # [2 * intermediate, hidden]
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor  # [hidden, intermediate]
    b_down: torch.Tensor | None
    ln_in: torch.Tensor  # [hidden]
    ln_post: torch.Tensor  # [hidden]


def count_weight_bytes(runner: object) -> int:
    """Bytes of a runner's weights: embeddings, final norm, the LM head when untied, and every
    tensor field of its layers' weight dataclasses."""
    tensors = [runner.embed_tokens, runner.norm] + ([] if runner.cfg.tie_word_embeddings else [runner.lm_head])
    for lw in runner.layers:
        tensors += [getattr(lw, f.name) for f in dataclasses.fields(lw)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(t is None for t in ts) else torch.cat(ts, dim=0)  # type: ignore[arg-type]


class LlamaRunner:
    """Weights and per-layer math of a Llama-family decoder.

    Args:
        cfg: model shape.
        weights: Hugging Face-named tensors (see ``offload.model.weights.expected_shapes``), already
            on ``device`` in the compute dtype; the dict is consumed.
    """

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], *, device: torch.device,
                 row_kernel: bool = True) -> None:
        self.cfg = cfg
        self.device = device
        self.embed_tokens = weights.pop("model.embed_tokens.weight")
        self.dtype = self.embed_tokens.dtype
        self.norm = weights.pop("model.norm.weight")
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else weights.pop("lm_head.weight")
        self.layers = [self._take_layer(weights, i) for i in range(cfg.num_layers)]
        self.rope = RotaryEmbedding(cfg, device)
        self.scale = cfg.head_dim**-0.5
        self.weights_bytes = self._count_bytes()
        self.linear = make_linear(device, self.dtype, weight_matrices(self), row_kernel=row_kernel)

    def _count_bytes(self) -> int:
        return count_weight_bytes(self)

    @staticmethod
    def _take_layer(w: dict[str, torch.Tensor], i: int) -> LayerWeights:
        p = f"model.layers.{i}."

        def get(name: str) -> torch.Tensor | None:
            return w.pop(p + name, None)

        return LayerWeights(
            w_qkv=torch.cat([w.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"], dim=0),
            b_qkv=_cat([get(f"self_attn.{x}_proj.bias") for x in "qkv"]),
            w_o=w.pop(p + "self_attn.o_proj.weight"),
            b_o=get("self_attn.o_proj.bias"),
            w_gate_up=torch.cat([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")], dim=0),
            b_gate_up=_cat([get("mlp.gate_proj.bias"), get("mlp.up_proj.bias")]),
            w_down=w.pop(p + "mlp.down_proj.weight"),
            b_down=get("mlp.down_proj.bias"),
            ln_in=w.pop(p + "input_layernorm.weight"),
            ln_post=w.pop(p + "post_attention_layernorm.weight"),
        )


    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # torch's op computes the same steps in the same order, in one call
            return F.rms_norm(x, (x.shape[-1],), weight, self.cfg.rms_norm_eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return weight * xf.to(x.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] int64 -> [T, hidden]."""
        return F.embedding(ids, self.embed_tokens)

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normed, projected and rotated q [T, nq, hd], k [T, nkv, hd] and v [T, nkv, hd]."""
        cfg, lw = self.cfg, self.layers[layer]
        x = self.rms_norm(h, lw.ln_in)
        qkv = self.linear(x, lw.w_qkv, lw.b_qkv)
        nq, nkv, hd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
        t = h.shape[0]
        cos, sin = self.rope.cos_sin(positions, h.dtype)
        # q and k sit side by side in qkv's rows: one rotation of both heads' sets.
        qk = RotaryEmbedding.apply(qkv[:, : nq + nkv].view(t, cfg.num_heads + cfg.num_kv_heads, hd), cos, sin)
        v = qkv[:, nq + nkv :].view(t, cfg.num_kv_heads, hd)
        return qk[:, : cfg.num_heads], qk[:, cfg.num_heads :], v

    def attn_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The layer's normed input [T, hidden], what ``qkv`` projects (KVPR keeps it on HOST)."""
        return self.rms_norm(h, self.layers[layer].ln_in)

    def kv_from_input(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v [T, nkv, hd] (k rotated at ``positions``) recomputed from the normed input
        ``x`` [T, hidden] (``attn_input``): the key and value rows of the projection alone."""
        cfg, lw = self.cfg, self.layers[layer]
        nq, nkv, hd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads, cfg.head_dim
        kv = F.linear(x, lw.w_qkv[nq:], None if lw.b_qkv is None else lw.b_qkv[nq:])
        t = x.shape[0]
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        k = RotaryEmbedding.apply(kv[:, : nkv * hd].view(t, nkv, hd), cos, sin)
        return k, kv[:, nkv * hd:].view(t, nkv, hd)

    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual after o_proj, then the MLP block. attn: [T, nq * head_dim]."""
        return self.mlp(layer, self.attn_out(layer, h, attn))

    def attn_out(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual stream after the attention block: h + o_proj(attn)."""
        lw = self.layers[layer]
        return h + self.linear(attn, lw.w_o, lw.b_o)

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The MLP block with its norm and residual."""
        lw = self.layers[layer]
        gate, up = self.linear(self.rms_norm(h, lw.ln_post), lw.w_gate_up, lw.b_gate_up).chunk(2, dim=-1)
        return h + self.linear(F.silu(gate) * up, lw.w_down, lw.b_down)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, vocab] float32."""
        return self.linear(self.rms_norm(h, self.norm), self.lm_head).float()
