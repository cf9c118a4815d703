"""Gemma 3 runner against transformers' Gemma3ForCausalLM (eager attention), and its config parsing.

Small random models (every norm weight randomized so Gemma's ``1 + weight`` matters) run 40
tokens, five times the sliding window; the real 270M checkpoint runs ~600 tokens, past its
512-token window. Mutation tests show the comparison would catch an off-by-one window, a
missing window, swapped RoPE bases and a missing soft-cap.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from offload.errors import ModelNotFoundError, UnsupportedModelError
from offload.model.gemma3 import (
    Gemma3Config,
    Gemma3Runner,
    LayerKind,
    causal_attention_ref,
    load_gemma3_checkpoint,
    reference_forward,
)
from tests.tolerances import MODEL_LOGITS_FP32_ATOL, TOL

SLIDING, FULL = LayerKind.SLIDING.value, LayerKind.GLOBAL.value
NUM_TOKENS = 40  # > 4 sliding windows of the small model
SMALL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, layer_types=[SLIDING, SLIDING, SLIDING, FULL], sliding_window=8,
    query_pre_attn_scalar=32, max_position_embeddings=256,
)
LINEAR_GLOBAL = {FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                 SLIDING: {"rope_type": "default", "rope_theta": 1e4}}
LINEAR_BOTH = {FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
               SLIDING: {"rope_type": "linear", "factor": 3.0, "rope_theta": 1e4}}
VARIANTS = {
    "plain": {},
    "final_softcap": {"final_logit_softcapping": 0.5},  # small enough to bite (|logits| reach ~0.7)
    "linear_rope_global": {"rope_parameters": LINEAR_GLOBAL},
    "linear_rope_both": {"rope_parameters": LINEAR_BOTH},
    "attention_bias_mha": {"attention_bias": True, "num_key_value_heads": 2},
    "window_1": {"sliding_window": 1},
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# The 270M's config.json values that matter here (transformers 5 keys).
BASE_270M = {
    "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "query_pre_attn_scalar": 256,
    "sliding_window": 512, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "layer_types": ([SLIDING] * 5 + [FULL]) * 3,
    "rope_parameters": {FULL: {"rope_type": "default", "rope_theta": 1e6},
                        SLIDING: {"rope_type": "default", "rope_theta": 1e4}},
}
BAD_CONFIGS = [
    ({"model_type": "llama"}, UnsupportedModelError, "not Gemma 3"),
    ({"hidden_activation": "silu"}, UnsupportedModelError, "hidden_activation 'silu'"),
    ({"rope_parameters": {FULL: {"rope_type": "yarn", "factor": 4.0}}}, UnsupportedModelError, "'yarn'"),
    ({"rope_parameters": {FULL: {"rope_type": "linear"}}}, UnsupportedModelError, "needs a 'factor'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 8.0}}, UnsupportedModelError,
     "legacy key 'type'"),
    ({"layer_types": [SLIDING] * 17 + ["chunked_attention"]}, UnsupportedModelError, "chunked_attention"),
    ({"use_bidirectional_attention": True}, UnsupportedModelError, "bidirectional"),
    ({"num_key_value_heads": 3}, ValueError, "num_kv_heads"),
    ({"sliding_window": 0}, ValueError, "sliding_window must be >= 1"),
    ({"sliding_window": None}, ValueError, "sliding_window is null"),
    ({"query_pre_attn_scalar": 0}, ValueError, "query_pre_attn_scalar must be > 0"),
    ({"final_logit_softcapping": -1.0}, ValueError, "final_logit_softcapping"),
    ({"layer_types": [SLIDING] * 17}, ValueError, "layer_types must hold num_layers"),
    ({"head_dim": 0}, ValueError, "head_dim must be >= 1"),
    ({"rope_parameters": {FULL: {"rope_type": "linear", "factor": 0.0}}}, ValueError, "rope_scaling"),
]
# (num_hidden_layers, sliding_window_pattern) for deriving layer kinds without layer_types.
PATTERNS = [(18, 6), (4, 6), (7, 3), (5, 1)]
# Real-checkpoint sequence lengths: all past the 512-token window.
# The real checkpoint costs a GGUF conversion (~45 s on 2 cores): its tests are `slow`; the
# default run checks the runner on small random-weight configs against transformers.
REAL_NUM_TOKENS = [pytest.param(600, marks=pytest.mark.slow), pytest.param(2048, marks=pytest.mark.slow)]
MUTATIONS = ["window_plus_1", "window_minus_1", "no_window", "swap_rope_bases", "no_final_softcap"]


def _hf_small(device: str, **overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hc = Gemma3TextConfig(**{**SMALL, **overrides}, attn_implementation="eager")
    torch.manual_seed(1)
    model = Gemma3ForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.to(device)


def _runner_for(model, device: str) -> Gemma3Runner:
    cfg = Gemma3Config.from_hf(model.config.to_dict())
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Gemma3Runner(cfg, weights, device=torch.device(device))


def _hf_logits(model, ids: torch.Tensor, num_last: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None], logits_to_keep=num_last).logits[0].float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_small_random_matches_transformers(variant, device):
    model = _hf_small(device, **VARIANTS[variant])
    runner = _runner_for(model, device)
    ids = torch.randint(0, SMALL["vocab_size"], (NUM_TOKENS,), device=device)
    ids_before = ids.clone()
    ours, ref = reference_forward(runner, ids), _hf_logits(model, ids)
    # CPU: the same fp32 ops in the same order (measured bitwise equal); CUDA may pick other
    # GEMM kernels for the fused q/k/v and gate/up matmuls, so the whole-model entry applies.
    atol, rtol = TOL[torch.float32] if device == "cpu" else (MODEL_LOGITS_FP32_ATOL, 0.0)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    assert torch.equal(ids, ids_before)
    cap = runner.cfg.final_logit_softcapping
    if cap is not None:
        assert ours.abs().max() < cap


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_comparison_catches_mutations(mutation):
    """Each mutant of the runner must miss transformers by far more than the tolerance."""
    model = _hf_small("cpu", final_logit_softcapping=0.5)
    runner = _runner_for(model, "cpu")
    ids = torch.randint(0, SMALL["vocab_size"], (NUM_TOKENS,))
    ref = _hf_logits(model, ids)
    if mutation == "window_plus_1":
        runner.window += 1
    elif mutation == "window_minus_1":
        runner.window -= 1
    elif mutation == "no_window":
        runner.window = NUM_TOKENS + 1
    elif mutation == "swap_rope_bases":
        runner.rope_sliding, runner.rope_global = runner.rope_global, runner.rope_sliding
    else:
        runner.cfg = Gemma3Config.from_hf({**model.config.to_dict(), "final_logit_softcapping": None})
    assert (reference_forward(runner, ids) - ref).abs().max() > 100 * TOL[torch.float32][0]


def test_runner_interface_shapes_and_no_mutation():
    model = _hf_small("cpu")
    runner = _runner_for(model, "cpu")
    cfg, t = runner.cfg, 5
    assert runner.scale == SMALL["query_pre_attn_scalar"] ** -0.5
    assert runner.window == SMALL["sliding_window"] and runner.attn_softcap is None
    assert [runner.layer_is_sliding(i) for i in range(4)] == [True, True, True, False]
    assert runner.weights_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    h = runner.embed(torch.arange(t))
    assert h.shape == (t, cfg.hidden_size) and h.dtype == torch.float32
    h_before = h.clone()
    q, k, v = runner.qkv(3, h, torch.arange(t))
    assert q.shape == (t, 2, 32) and k.shape == (t, 1, 32) and v.shape == (t, 1, 32)
    out = runner.finish_layer(3, h, torch.randn(t, 64))
    assert out.shape == h.shape and torch.equal(h, h_before)
    assert runner.logits(out).dtype == torch.float32


@pytest.mark.parametrize("window", [None, 1, 5])
def test_attention_query_blocks_agree(window):
    """The query-blocked reference equals one block over the whole sequence."""
    q, k, v = torch.randn(23, 4, 16), torch.randn(23, 2, 16), torch.randn(23, 2, 16)
    whole = causal_attention_ref(q, k, v, scale=0.25, window=window, query_block=64)
    blocked = causal_attention_ref(q, k, v, scale=0.25, window=window, query_block=5)
    torch.testing.assert_close(blocked, whole, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])
    if window == 1:  # each query sees only itself
        torch.testing.assert_close(whole, v.float().repeat_interleave(2, dim=1), atol=1e-6, rtol=0.0)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("q_scale", [1.0, 1e3])
def test_attention_matches_transformers_eager(softcap, q_scale):
    """GQA, scaling and the attention soft-cap (which transformers' Gemma 3 layer never passes,
    so the model tests cannot reach it) against transformers' eager attention function."""
    import types

    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    t, scale = 19, 0.125
    q, k, v = torch.randn(t, 4, 16) * q_scale, torch.randn(t, 2, 16), torch.randn(t, 2, 16)
    ours = causal_attention_ref(q, k, v, scale=scale, softcap=softcap)
    mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
    module = types.SimpleNamespace(num_key_value_groups=2, training=False, head_dim=16)
    ref, _ = eager_attention_forward(module, *(x.transpose(0, 1)[None] for x in (q, k, v)), mask,
                                     scaling=scale, softcap=softcap)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref[0], atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])


@pytest.mark.parametrize("num_tokens", REAL_NUM_TOKENS)
def test_real_checkpoint_matches_transformers(gemma3_checkpoint, essays_text, num_tokens):
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(gemma3_checkpoint))
    ids = tok(essays_text[: num_tokens * 10], return_tensors="pt").input_ids[0, :num_tokens]
    cfg, weights = load_gemma3_checkpoint(gemma3_checkpoint, dtype=torch.float32, device=torch.device("cpu"))
    assert len(ids) == num_tokens > cfg.sliding_window
    ours = reference_forward(Gemma3Runner(cfg, weights, device=torch.device("cpu")), ids, num_last=64)
    model = Gemma3ForCausalLM.from_pretrained(str(gemma3_checkpoint), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    ref = _hf_logits(model, ids, num_last=64)
    diff = (ours - ref).abs().max().item()
    print(f"gemma3-270m {num_tokens} tokens, last 64 positions: max |logit diff| {diff:.3g}")
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    assert diff <= MODEL_LOGITS_FP32_ATOL


@pytest.mark.slow
def test_real_config_parsed(gemma3_checkpoint):
    from transformers import AutoConfig

    d = json.loads((gemma3_checkpoint / "config.json").read_text())
    cfg, hf = Gemma3Config.from_hf(d), AutoConfig.from_pretrained(str(gemma3_checkpoint))
    assert [k.value for k in cfg.layer_types] == list(hf.layer_types)
    assert cfg.rope_theta == hf.rope_parameters[FULL]["rope_theta"] == 1e6
    assert cfg.rope_local_base_freq == hf.rope_parameters[SLIDING]["rope_theta"] == 1e4
    assert (cfg.sliding_window, cfg.query_pre_attn_scalar, cfg.head_dim) == (512, 256, 256)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (18, 4, 1)
    assert cfg.global_layers == (5, 11, 17) and len(cfg.sliding_layers) == 15
    assert cfg.final_logit_softcapping is None and cfg.rope_scaling is None and cfg.tie_word_embeddings
    # The figure: 3 global layers x 1 KV head x 256 x 2 (K and V) x dtype bytes.
    for dtype_bytes in (4, 2):
        assert cfg.kv_bytes_per_token(dtype_bytes, LayerKind.GLOBAL) == 3 * 1 * 256 * 2 * dtype_bytes
    assert cfg.kv_bytes_per_token(4, LayerKind.SLIDING) == 15 * 1 * 256 * 2 * 4


@pytest.mark.parametrize("num_layers,pattern", PATTERNS)
def test_layer_kinds_derived_like_transformers(num_layers, pattern):
    from transformers import Gemma3TextConfig

    hf = Gemma3TextConfig(num_hidden_layers=num_layers, sliding_window_pattern=pattern)
    d = {k: v for k, v in BASE_270M.items() if k != "layer_types"}
    cfg = Gemma3Config.from_hf({**d, "num_hidden_layers": num_layers, "sliding_window_pattern": pattern})
    assert [k.value for k in cfg.layer_types] == list(hf.layer_types)


def test_transformers4_keys_and_nested_text_config():
    from transformers import Gemma3TextConfig

    old = {k: v for k, v in BASE_270M.items() if k not in ("rope_parameters", "layer_types")}
    old |= {"rope_theta": 1e5, "rope_local_base_freq": 2e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    cfg = Gemma3Config.from_hf(old)
    hf = Gemma3TextConfig(**{k: v for k, v in old.items() if k != "model_type"})
    assert hf.rope_parameters[FULL]["rope_type"] == "linear"
    assert cfg.rope_theta == hf.rope_parameters[FULL]["rope_theta"]
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": hf.rope_parameters[FULL]["factor"]}
    assert cfg.rope_local_base_freq == hf.rope_parameters[SLIDING]["rope_theta"] and cfg.rope_local_scaling is None
    assert [k.value for k in cfg.layer_types] == list(hf.layer_types)
    nested = Gemma3Config.from_hf({"model_type": "gemma3", "text_config": dict(BASE_270M)})
    assert nested == Gemma3Config.from_hf(BASE_270M)
    assert nested.with_num_layers(6).global_layers == (5,)


@pytest.mark.parametrize("patch,error,match", BAD_CONFIGS)
def test_bad_configs_rejected(patch, error, match):
    d = copy.deepcopy(BASE_270M) | patch
    with pytest.raises(error, match=match):
        Gemma3Config.from_hf(d)
    assert BASE_270M["sliding_window"] == 512  # the base dict is not mutated


def test_loader_reads_multimodal_prefix_and_rejects_missing(tmp_path):
    model = _hf_small("cpu")
    d = model.config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": d}))
    tensors = {k.replace("model.", "model.language_model.", 1): v.contiguous()
               for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tensors["vision_tower.patch.weight"] = torch.zeros(3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg, weights = load_gemma3_checkpoint(tmp_path, dtype=torch.float32, device=torch.device("cpu"))
    assert cfg == Gemma3Config.from_hf(d)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k != "lm_head.weight")
    ids = torch.randint(0, SMALL["vocab_size"], (NUM_TOKENS,))
    logits = reference_forward(Gemma3Runner(cfg, weights, device=torch.device("cpu")), ids)
    torch.testing.assert_close(logits, _hf_logits(model, ids), atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])
    del tensors["model.language_model.layers.2.self_attn.k_norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelNotFoundError, match="layers.2.self_attn.k_norm"):
        load_gemma3_checkpoint(tmp_path, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_gemma3_checkpoint(tmp_path / "nowhere", dtype=torch.float32, device=torch.device("cpu"))
