"""Architectures beyond SmolLM2, as tiny random-weight models loaded into both this runner and
transformers: Llama with llama3 RoPE scaling at positions above 8192, Qwen2 with q/k/v biases,
Mistral without a sliding window, Llama with linear RoPE scaling and MLP biases. Configs asking
for features the runner lacks are refused clearly."""
from __future__ import annotations

import json

import pytest
import torch

from offload.errors import UnsupportedModelError
from offload.model.model_config import ModelConfig
from offload.model.model_source import resolve_model
from tests.offload.arch_pairs import (hf_greedy, hf_logits, make_engine, ours_greedy,
                                      ours_teacher_forced, save_tiny)
from tests.tolerances import MODEL_LOGITS_FP32_ATOL

ARCHS = ["llama3", "qwen2", "mistral", "llama-linear"]
NEW_TOKENS = 16


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_matches_transformers(arch, tmp_path):
    hf = save_tiny(arch, tmp_path)
    engine = make_engine(tmp_path, "cpu", torch.float32, page_size=16, prefill_chunk_tokens=128)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (300,), generator=gen).tolist()
    ref = hf_greedy(hf, ids, NEW_TOKENS)
    assert ours_greedy(engine, ids, NEW_TOKENS) == ref
    ours = ours_teacher_forced(engine, ids, ref, prompt_logits=32)
    want = hf_logits(hf, ids + ref[:-1], 32 + NEW_TOKENS - 1)
    assert (ours - want).abs().max().item() <= MODEL_LOGITS_FP32_ATOL


@pytest.mark.slow  # an 8400-token prefill in both implementations
def test_llama3_rope_scaling_beyond_8192_positions(tmp_path):
    """Positions past the original 8192-token context, where llama3 scaling matters."""
    hf = save_tiny("llama3", tmp_path)
    engine = make_engine(tmp_path, "cpu", torch.float32)
    ids = torch.randint(0, 512, (8400,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = hf_greedy(hf, ids, NEW_TOKENS)
    assert ours_greedy(engine, ids, NEW_TOKENS) == ref
    ours = ours_teacher_forced(engine, ids, ref, prompt_logits=256)
    want = hf_logits(hf, ids + ref[:-1], 256 + NEW_TOKENS - 1)
    assert (ours - want).abs().max().item() <= MODEL_LOGITS_FP32_ATOL


def test_llama3_inverse_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from offload.model.rope import inverse_frequencies
    from tests.offload.arch_pairs import hf_tiny

    config, _ = hf_tiny("llama3")
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    got = inverse_frequencies(ModelConfig.from_hf_dict(config.to_dict()))
    assert torch.equal(got, want.float())
    assert isinstance(config, LlamaConfig)


def _write_config(folder, **overrides):
    cfg = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 4096, "hidden_act": "silu", "rope_theta": 10000.0}
    cfg.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("overrides, words", [
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding-window"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4096}, "sliding-window"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
])
def test_unsupported_configs_are_refused(tmp_path, overrides, words):
    folder = _write_config(tmp_path / "m", **overrides)
    with pytest.raises(UnsupportedModelError, match=words):
        resolve_model(str(folder), cache_dir=tmp_path / "cache")


def test_qwen2_without_sliding_window_is_accepted(tmp_path):
    folder = _write_config(tmp_path / "m", model_type="qwen2", use_sliding_window=False, sliding_window=4096)
    cfg = resolve_model(str(folder), cache_dir=tmp_path / "cache", random_weights=True).config
    assert cfg.qkv_bias and not cfg.o_bias
