"""LSH sampling (MagicPIG) on real keys and values: SmolLM2 and Gemma 3 with their weights, a
2K-token essay prefill, one decode query of the first global layer.

On real K/V (keys with a strong common offset, attention with heavy sinks) the kernels still
agree with the float64 reference, and the sampled piece's softmax denominator stays an
unbiased estimate of the exact sum over the sampled region, averaged over hyperplane seeds.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cpu_kernels.lsh import LshTables
from cpu_kernels.lsh_attention import sampled_attention
from cpu_kernels.reference_lsh import lsh_attention_ref

PROMPT = 2048


def _real_qkv(model: str, cache_dir, essays_text) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:
    """q [heads, hd] of one decode step at the first global layer, that layer's K and V
    [nkv, PROMPT + 1, hd] as stored, the softmax scale and the page size."""
    from transformers import AutoTokenizer

    from offload.config import RuntimeConfig
    from offload.engine import Engine
    from offload.model.model_source import resolve_model

    try:
        source = resolve_model(model, cache_dir=cache_dir, show_progress=False)
    except Exception as e:  # the package is missing: the Makefile installs it
        pytest.skip(f"{model} unavailable: {e}")
    ids = AutoTokenizer.from_pretrained(str(source.tokenizer_dir)).encode(essays_text)[:PROMPT + 1]
    engine = Engine(source, RuntimeConfig(device="cpu"))
    try:
        layer = engine.global_layers[0]
        seq = engine.new_sequence()
        engine.prefill(seq, ids[:PROMPT])
        seen = {}
        real = type(engine.decode_attention).__call__

        def attend(self, reads, q):
            if reads.layer == layer:
                seen["q"] = q.reshape(q.shape[-2], q.shape[-1]).float().numpy().copy()
            return real(self, reads, q)
        type(engine.decode_attention).__call__ = attend
        try:
            engine.decode_step(seq, ids[PROMPT])
        finally:
            type(engine.decode_attention).__call__ = real
        groups = list(engine.kv.reader.layer_groups(seq, layer, 1 << 30))
        k = torch.cat([g.k for g in groups], 1).float().numpy()
        v = torch.cat([g.v for g in groups], 1).float().numpy()
        return seen["q"], k, v, engine.runner.scale, engine.config.page_size
    finally:
        engine.close()


@pytest.mark.slow  # two real models, a 2K prefill each: about a minute
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_lsh_on_real_keys_and_values(model, cache_dir, essays_text):
    q, k, v, scale, ps = _real_qkv(model, cache_dir, essays_text)
    n = k.shape[1]
    lo, hi = ps, (n // ps - 3) * ps  # sink page, then up to the window and tail
    slots = np.arange(-(-n // ps), dtype=np.int32)
    pad = slots.size * ps - n
    k_pages = np.pad(k, ((0, 0), (0, pad), (0, 0))).reshape(k.shape[0], -1, ps, k.shape[2])
    v_pages = np.pad(v, ((0, 0), (0, pad), (0, 0))).reshape(v.shape[0], -1, ps, v.shape[2])
    # The kernels against the float64 reference, at the runtime's default K and L.
    t = LshTables(k, bits=10, tables=150, seed=1)
    cand = t.retrieve(q, lo=lo, hi=hi, min_hits=2)
    assert cand.count.sum() > 0
    out, lse = sampled_attention(q, k_pages, v_pages, slots, cand, t.mean, bits=10, tables=150, min_hits=2,
                                 scale=scale)
    ref_out, ref_lse = lsh_attention_ref(q, k, v, t.planes, bits=10, min_hits=2, lo=lo, hi=hi, scale=scale)
    has = np.isfinite(ref_lse)
    np.testing.assert_allclose(out[has], ref_out[has], atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(lse[has], ref_lse[has], atol=1e-4, rtol=0)
    # The denominator: E[exp(lse)] over seeds is the exact sum of exp(score) over [lo, hi).
    nkv, group = k.shape[0], q.shape[0] // k.shape[0]
    scores = np.einsum("hgd,htd->hgt", q.reshape(nkv, group, -1).astype(np.float64), k[:, lo:hi]) * scale
    exact_lse = np.log(np.exp(scores).sum(-1)).reshape(-1)
    ratios = []
    for seed in range(60):
        t = LshTables(k, bits=6, tables=24, seed=seed)
        c = t.retrieve(q, lo=lo, hi=hi, min_hits=2)
        _, lse = sampled_attention(q, k_pages, v_pages, slots, c, t.mean, bits=6, tables=24, min_hits=2, scale=scale)
        ratios.append(np.exp(lse.astype(np.float64) - exact_lse))
    ratio, se = np.mean(ratios, axis=0), np.std(ratios, axis=0) / np.sqrt(len(ratios))
    assert (np.abs(ratio - 1.0) <= 4 * se + 0.05).all(), (ratio, se)
