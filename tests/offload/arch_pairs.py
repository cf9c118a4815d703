"""Tiny random-weight models loaded into both this runner and the transformers class.

Used by the CPU architecture tests and, on a lent GPU, by the CUDA exactness tests: the
same tensors on both sides (transformers saves its checkpoint, our runner loads it).
"""
from __future__ import annotations

from pathlib import Path

import torch

from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.model.model_source import resolve_model

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, head_dim=16, initializer_range=0.1,
            max_position_embeddings=16384, rms_norm_eps=1e-5)


def hf_tiny(arch: str, **dims):
    """(HF config, model class) of a tiny model of ``arch``; ``dims`` override the TINY sizes."""
    import transformers as tr

    base = dict(TINY, **dims)

    if arch == "llama3":
        kw = dict(base, attention_bias=True, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
        return tr.LlamaConfig(**kw), tr.LlamaForCausalLM
    if arch == "qwen2":
        kw = dict(base, tie_word_embeddings=False, use_sliding_window=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        return tr.Qwen2Config(**kw), tr.Qwen2ForCausalLM
    if arch == "mistral":
        kw = dict(base, sliding_window=None, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        return tr.MistralConfig(**kw), tr.MistralForCausalLM
    if arch == "llama-linear":
        kw = dict(base, mlp_bias=True, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
        return tr.LlamaConfig(**kw), tr.LlamaForCausalLM
    raise ValueError(arch)


def save_tiny(arch: str, folder: Path, seed: int = 0, **dims):
    """Build a tiny HF model with random weights (biases too), save it; return the HF model."""
    config, cls = hf_tiny(arch, **dims)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)  # transformers zero-initialises biases; make them matter
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model


def make_engine(folder: Path, device: str, dtype: torch.dtype, **kw) -> Engine:
    source = resolve_model(str(folder), cache_dir=folder / "cache")
    return Engine(source, RuntimeConfig(device=device, dtype=dtype, device_memory_bytes=64 * 2**20, **kw))


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    dev = next(model.parameters()).device
    with torch.inference_mode():
        x = torch.tensor([ids], device=dev)
        # An explicit mask: random ids contain the pad id, which generate would otherwise mask.
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def hf_logits(model, ids: list[int], last: int) -> torch.Tensor:
    dev = next(model.parameters()).device
    with torch.inference_mode():
        return model(torch.tensor([ids], device=dev), logits_to_keep=last).logits[0].float().cpu()


def ours_teacher_forced(engine: Engine, ids: list[int], forced: list[int], prompt_logits: int) -> torch.Tensor:
    """Our logits at the prompt's last positions, then after each forced token (all but the last)."""
    seq = engine.new_sequence()
    try:
        rows = [engine.forward(seq, ids, num_logits=prompt_logits)]
        rows += [engine.forward(seq, [t]) for t in forced[:-1]]
    finally:
        engine.release(seq)
    return torch.cat(rows).cpu()


def ours_greedy(engine: Engine, ids: list[int], new_tokens: int) -> list[int]:
    seq = engine.new_sequence()
    try:
        return list(engine.generate(seq, ids, max_new_tokens=new_tokens))
    finally:
        engine.release(seq)
