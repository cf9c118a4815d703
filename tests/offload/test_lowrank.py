"""Low-rank pre-RoPE keys (offload/kv/lowrank.py), each against an independent reference.

- unrotate_keys: a random-weight runner's rotated keys (its own ``qkv``) at positions
  5000..5031, unrotated, against the key projection computed here in float64 from the layer's
  input and weights with no RoPE at all (SmolLM2's shape; Gemma 3 270M's shape with its per-head
  key norm, a sliding and a global layer, whose RoPE bases differ);
- factorize/rebuild: exact-rank matrices come back, errors against Eckart-Young computed with
  numpy's float64 eigenvalues, rebuild rows against numpy products;
- page errors against a per-page float64 loop; outliers are the pages given large noise.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from offload.kv.lowrank import (
    SvdMethod, choose_rank, factorize, frobenius_error, layer_rope, outlier_pages, page_errors, rank_errors,
    rebuild, rebuild_rotated, unrotate_keys,
)
from offload.model.gemma3 import Gemma3Config, Gemma3Runner, gemma3_random_weights
from offload.model.llama import LlamaRunner
from offload.model.model_config import ModelConfig
from offload.model.rope import RotaryEmbedding
from offload.model.shapes import NAMED_SHAPES
from offload.model.weights import random_weights
from tests.tolerances import TOL

CPU = torch.device("cpu")
POSITIONS = torch.arange(5000, 5032)
METHODS = [SvdMethod.FULL, SvdMethod.LOWRANK]
CENTER = [False, True]
# (T, num_kv_heads, head_dim, rank): a non-power-of-2 width, T not a multiple of the page
SHAPES = [(300, 2, 16, 5), (257, 3, 24, 8), (64, 1, 32, 1)]
PAGE = 16


def _ref_rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain.double()


def _llama_case() -> tuple[LlamaRunner, int, torch.Tensor, torch.Tensor]:
    cfg = ModelConfig.from_hf_dict({**NAMED_SHAPES["smollm2-135m"], "vocab_size": 256, "num_hidden_layers": 1})
    w = random_weights(cfg, dtype=torch.float32, device=CPU)
    ln = torch.rand(cfg.hidden_size) + 0.5  # a non-trivial gain
    w["model.layers.0.input_layernorm.weight"] = ln.clone()
    wk = w["model.layers.0.self_attn.k_proj.weight"].clone()
    h = torch.randn(len(POSITIONS), cfg.hidden_size)
    ref = (_ref_rms(h, ln, cfg.rms_norm_eps) @ wk.double().T).view(len(POSITIONS), cfg.num_kv_heads, cfg.head_dim)
    return LlamaRunner(cfg, w, device=CPU), 0, h, ref


def _gemma_case(layer: int) -> tuple[Gemma3Runner, int, torch.Tensor, torch.Tensor]:
    d = {**NAMED_SHAPES["gemma3-270m"], "vocab_size": 256, "num_hidden_layers": 2,
         "layer_types": ["sliding_attention", "full_attention"]}
    cfg = Gemma3Config.from_hf(d)
    w = gemma3_random_weights(cfg, dtype=torch.float32, device=CPU)
    p = f"model.layers.{layer}."
    ln, kn = torch.randn(cfg.hidden_size) * 0.3, torch.randn(cfg.head_dim) * 0.3  # gains 1 + w
    w[p + "input_layernorm.weight"], w[p + "self_attn.k_norm.weight"] = ln.clone(), kn.clone()
    wk = w[p + "self_attn.k_proj.weight"].clone()
    h = torch.randn(len(POSITIONS), cfg.hidden_size) * 3
    k = (_ref_rms(h, 1 + ln, cfg.rms_norm_eps) @ wk.double().T).view(len(POSITIONS), cfg.num_kv_heads, cfg.head_dim)
    return Gemma3Runner(cfg, w, device=CPU), layer, h, _ref_rms(k, 1 + kn, cfg.rms_norm_eps)


CASES = {"smollm2": _llama_case, "gemma3_sliding": lambda: _gemma_case(0), "gemma3_global": lambda: _gemma_case(1)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unrotate_keys_gives_the_projection_without_rope(case):
    runner, layer, h, ref = CASES[case]()
    _, k, _ = runner.qkv(layer, h, POSITIONS)
    cos, sin = layer_rope(runner, layer).cos_sin(POSITIONS, torch.float32)
    pre = unrotate_keys(k, cos, sin)
    assert pre.dtype == torch.float32 and pre.shape == ref.shape
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(pre.double(), ref, atol=atol, rtol=rtol)
    assert (k.double() - ref).abs().max() > 0.1  # the rotation at these positions is not a no-op


def test_gemma3_layers_use_their_own_rope():
    runner, layer, h, ref = _gemma_case(1)
    assert layer_rope(runner, 1) is runner.rope_global and layer_rope(runner, 0) is runner.rope_sliding
    _, k, _ = runner.qkv(layer, h, POSITIONS)
    wrong = unrotate_keys(k, *runner.rope_sliding.cos_sin(POSITIONS, torch.float32))
    assert (wrong.double() - ref).abs().max() > 0.1  # the test above would catch a swapped base


def test_unrotate_keys_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="cos/sin"):
        unrotate_keys(torch.zeros(4, 2, 8), torch.zeros(3, 8), torch.zeros(3, 8))


def _low_rank(t: int, nkv: int, hd: int, rank: int, noise: float = 0.0) -> torch.Tensor:
    k = torch.randn(t, rank) @ torch.randn(rank, nkv * hd) + 0.7  # an offset, as keys have
    return (k + noise * torch.randn(t, nkv * hd)).view(t, nkv, hd)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("center", CENTER)
def test_exact_rank_keys_are_rebuilt(shape, method, center):
    t, nkv, hd, r = shape
    keys = _low_rank(t, nkv, hd, r)
    # uncentered, the offset adds one dimension
    f = factorize(keys, r if center else r + 1, center=center, method=method)
    assert f.a.shape == (t, f.rank) and f.b.shape == (f.rank, nkv * hd) and (f.mean is not None) == center
    assert frobenius_error(keys, f) < 1e-5
    full = rebuild(f, torch.arange(t))
    assert float((full - keys).norm() / keys.norm()) < 1e-5


@pytest.mark.parametrize("center", CENTER)
def test_error_is_non_increasing_and_matches_eckart_young(center):
    keys = _low_rank(200, 2, 16, 6, noise=0.3)
    flat = keys.reshape(200, -1).double().numpy()
    centered = flat - flat.mean(axis=0) if center else flat
    eig = np.sort(np.linalg.eigvalsh(centered.T @ centered))[::-1].clip(min=0)  # s_i^2, float64
    total = (flat**2).sum()
    errors = [frobenius_error(keys, factorize(keys, r, center=center)) for r in range(1, 33)]
    expected = [math.sqrt(eig[r:].sum() / total) for r in range(1, 33)]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:]))
    np.testing.assert_allclose(errors, expected, atol=1e-5)
    np.testing.assert_allclose(rank_errors(keys, range(1, 33), center=center), expected, atol=1e-6)


def test_centered_factors_are_never_worse():
    keys = _low_rank(200, 2, 16, 6, noise=0.3)
    for r in (1, 3, 6, 10):
        centered = frobenius_error(keys, factorize(keys, r, center=True))
        assert centered <= frobenius_error(keys, factorize(keys, r)) + 1e-6


@pytest.mark.parametrize("center", CENTER)
def test_rebuild_of_a_subset_is_those_rows(center):
    keys = _low_rank(301, 3, 8, 4, noise=0.2)
    f = factorize(keys, 7, center=center)
    idx = torch.randperm(301)[:50]
    ref = f.a.double().numpy()[idx.numpy()] @ f.b.double().numpy()
    if center:
        ref = ref + f.mean.double().numpy()
    got = rebuild(f, idx)
    assert got.shape == (50, 3, 8)
    np.testing.assert_allclose(got.reshape(50, -1).numpy(), ref, atol=1e-5, rtol=1.3e-6)
    torch.testing.assert_close(got, rebuild(f, torch.arange(301))[idx], atol=1e-5, rtol=1.3e-6)


def test_rebuild_rotated_of_exact_rank_keys_gives_the_rotated_keys():
    keys = _low_rank(96, 2, 64, 4)  # SmolLM2's head_dim
    rope = RotaryEmbedding(ModelConfig.from_hf_dict(NAMED_SHAPES["smollm2-135m"]), CPU)
    positions = torch.arange(7000, 7096)
    rotated = RotaryEmbedding.apply(keys, *rope.cos_sin(positions, torch.float32))
    pre = unrotate_keys(rotated, *rope.cos_sin(positions, torch.float32))
    f = factorize(pre, 5)
    idx = torch.tensor([0, 5, 95, 40])
    torch.testing.assert_close(rebuild_rotated(f, idx, positions[idx], rope), rotated[idx], atol=1e-4, rtol=1e-4)


def test_page_errors_match_a_per_page_loop():
    keys = _low_rank(250, 2, 16, 3, noise=0.5)
    f = factorize(keys, 4)
    got = page_errors(keys, f, PAGE)
    k = keys.reshape(250, -1).double()
    kh = rebuild(f, torch.arange(250)).reshape(250, -1).double()
    ref = [float((k[p:p + PAGE] - kh[p:p + PAGE]).norm() / k[p:p + PAGE].norm()) for p in range(0, 250, PAGE)]
    assert got.shape == (math.ceil(250 / PAGE),)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


def test_outlier_pages_are_the_noisy_ones():
    keys = _low_rank(64 * PAGE, 2, 16, 4, noise=0.01)
    noisy = [3, 17, 40, 63]
    for p in noisy:
        keys[p * PAGE:(p + 1) * PAGE] += 5 * torch.randn(PAGE, 2, 16)
    f = factorize(keys, 8)
    errors = page_errors(keys, f, PAGE)
    worst = outlier_pages(errors, 4 / 64)
    assert sorted(worst.tolist()) == noisy
    assert errors[worst].min() > errors[[p for p in range(64) if p not in noisy]].max()
    kept = frobenius_error(keys, f, page_size=PAGE, exact_pages=worst)
    assert kept < 0.2 * frobenius_error(keys, f)
    assert outlier_pages(errors, 0.0).numel() == 0 and outlier_pages(errors, 1 / 100).numel() == 1


def _spectrum_keys(s: list[float], t: int = 128, d: int = 64) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(t, d, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


def test_choose_rank_is_the_smallest_multiple_of_8_meeting_the_target():
    spectra = [[0.9**i for i in range(64)], [0.85**i for i in range(64)]]
    keys = [_spectrum_keys(s).float().view(128, 2, 32) for s in spectra]

    def mean_error(r):  # analytical: the singular values are known
        return np.mean([math.sqrt(sum(x * x for x in s[r:]) / sum(x * x for x in s)) for s in spectra])

    for target in (0.3, 0.1, 0.05, 0.01, 1e-4):
        expected = next((r for r in range(8, 64, 8) if mean_error(r) <= target), 64)
        assert choose_rank(keys, target) == expected, target
    assert choose_rank(keys, 1.0) == 8


def test_bad_inputs_are_rejected():
    keys = _low_rank(20, 1, 8, 2)
    with pytest.raises(ValueError, match="rank must be between 1 and"):
        factorize(keys, 9)
    with pytest.raises(ValueError, match="pre_keys must be"):
        factorize(keys.view(20, 8), 2)
    with pytest.raises(ValueError, match="share must be in"):
        outlier_pages(torch.zeros(4), 1.5)
    with pytest.raises(ValueError, match="target must be in"):
        choose_rank([keys], 0.0)
    with pytest.raises(ValueError, match="one width"):
        choose_rank([keys, torch.zeros(20, 2, 8)], 0.1)
    with pytest.raises(ValueError, match="do not match"):
        page_errors(keys[:10], factorize(keys, 2), 4)
