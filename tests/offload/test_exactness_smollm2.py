"""Exact mode against transformers: SmolLM2-135M fp32 on CPU, essay prompts.

64 greedy tokens identical to ``generate`` with its default cache; teacher-forced logits
within 1e-3 at the last 64 prompt positions and every generated position. The reference is
transformers' model loaded from the packaged GGUF itself.
"""
from __future__ import annotations

import functools

import pytest
import torch

from offload.config import DecodeKernel, RuntimeConfig
from offload.engine import Engine
from offload.kv.placement import Placement
from storage import Tier
from tests.tolerances import MODEL_LOGITS_FP32_ATOL

NEW_TOKENS = 64
PROMPT_LOGITS = 64


@pytest.fixture(scope="module")
def hf_reference(hf_smollm2_from_gguf, essay_prompt):
    """n -> (generated ids, logits [64 + 63, vocab]) of transformers on the n-token prompt."""

    @functools.lru_cache(maxsize=None)
    def run(n: int):
        model = hf_smollm2_from_gguf
        ids = essay_prompt(n)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
            gen = out.sequences[0, n:].tolist()
            prompt_logits = model(torch.tensor([ids]), logits_to_keep=PROMPT_LOGITS).logits[0].float()
        # generate's logits at step i are those of position n - 1 + i, i.e. teacher-forced on
        # the tokens it produced; the first equals the prompt's last.
        step_logits = torch.stack([x[0].float() for x in out.logits[1:]])
        return gen, torch.cat([prompt_logits, step_logits])

    return run


def _ours(engine: Engine, ids: list[int]):
    seq = engine.new_sequence()
    logits: list[torch.Tensor] = []
    try:
        toks = list(engine.generate(seq, ids, max_new_tokens=NEW_TOKENS, num_prompt_logits=PROMPT_LOGITS,
                                    record_logits=logits))
    finally:
        engine.release(seq)
    return toks, torch.cat(logits)[: PROMPT_LOGITS + NEW_TOKENS - 1]


def _check(engine, hf_reference, essay_prompt, n):
    """Greedy tokens and logits of ``engine`` on the n-token essay prompt against transformers."""
    ids = essay_prompt(n)
    hf_tokens, hf_logits = hf_reference(n)
    tokens, logits = _ours(engine, ids)
    assert tokens == hf_tokens
    assert logits.shape == hf_logits.shape
    err = (logits - hf_logits).abs().max().item()
    assert err <= MODEL_LOGITS_FP32_ATOL, f"max |logit diff| {err:.2e} at {n} tokens"


# The default run checks real weights against transformers through the mixed placement below
# (DEVICE, HOST and DISK pages in every layer); all-DEVICE runs here and in
# test_shuffled_noncontiguous_pages_stay_exact, both slow.
@pytest.mark.slow
@pytest.mark.parametrize("n", [1024, 4096])
def test_greedy_and_logits_match_transformers(smollm2_engine, hf_reference, essay_prompt, n):
    _check(smollm2_engine, hf_reference, essay_prompt, n)


@pytest.mark.slow
def test_greedy_and_logits_match_transformers_8k(smollm2_engine, hf_reference, essay_prompt):
    _check(smollm2_engine, hf_reference, essay_prompt, 8192 - NEW_TOKENS)


@pytest.mark.slow  # 30 s of the default run; tests/offload/test_decode_kernels.py shuffles slots on a tiny model
def test_shuffled_noncontiguous_pages_stay_exact(smollm2_source, hf_reference, essay_prompt):
    """Pages in random, non-contiguous arena slots (real paging, gathers), small pages and
    small prefill chunks: still the same tokens and logits."""
    engine = Engine(smollm2_source, RuntimeConfig(device="cpu", page_size=16, prefill_chunk_tokens=300,
                                                  shuffle_pages_seed=1234, device_memory_bytes=256 * 2**20))
    seq = engine.new_sequence()
    engine.forward(seq, essay_prompt(64))
    slots = seq.table.slots(0)
    assert slots != sorted(slots), "pages should sit in shuffled slots"
    engine.release(seq)
    _check(engine, hf_reference, essay_prompt, 1024)


# The default run checks the mixed placement at 512 tokens (4 pages each on DEVICE and HOST, 8 on
# DISK in two 4-page staging chunks per layer, read ahead and staged); the other placements, 1K and
# 4K, are `slow`.
# Placements of the Tiers issue: every full page on HOST, on DISK, and a mix of all three; and
# the Kernels issue's CPU delegation: HOST pages attended by the Numba page kernel and
# merged with the DEVICE part computed by another kernel (torch's fused op), in every layer
# or in every other layer.
PLACEMENTS = {
    "all-host": Placement.all_on(Tier.HOST),
    "all-disk": Placement.all_on(Tier.DISK),
    "mixed": Placement(device_pages=4, host_pages=4),  # pages 8.. on DISK
    "host-delegated": Placement(device_pages=8, host_pages=None).with_delegation(range(30)),
    "mixed-delegated": Placement(device_pages=4, host_pages=4).with_delegation(range(0, 30, 2)),
}
KERNELS = {"host-delegated": DecodeKernel.TORCH, "mixed-delegated": DecodeKernel.TORCH}


def _tiered_engine(source, tmp_path, name, **kw) -> Engine:
    kernel = KERNELS.get(name, DecodeKernel.AUTO)
    return Engine(source, RuntimeConfig(device="cpu", placement=PLACEMENTS[name], host_memory_bytes=512 * 2**20,
                                        kv_dir=str(tmp_path), staging_chunk_pages=4, decode_kernel=kernel, **kw))


# The delegated placements (the TORCH kernel over HOST pages in place) run in the slow suite:
# tests/offload/test_read_sets.py covers that route against a dense reference by default. So
# do all-host and all-disk: "mixed" reads DEVICE, HOST and DISK pages in every layer, and the
# single-tier placements run at 4K and 8K there.
_FAST = ("mixed",)


@pytest.mark.parametrize("name", [n if n in _FAST else pytest.param(n, marks=pytest.mark.slow) for n in PLACEMENTS])
@pytest.mark.parametrize("n", [512] + [pytest.param(n, marks=pytest.mark.slow) for n in (1024, 4096)])
def test_tiered_placements_match_transformers(smollm2_source, hf_reference, essay_prompt, tmp_path, name, n):
    engine = _tiered_engine(smollm2_source, tmp_path, name)
    try:
        _check(engine, hf_reference, essay_prompt, n)
        read = engine.kv.io.bytes_read
        if name not in ("all-host", "host-delegated"):
            assert read[Tier.DISK] > 0
        if name != "all-disk":
            assert read[Tier.HOST] > 0
        if name.endswith("delegated"):  # HOST pages went through the CPU page kernel, in place
            assert engine.kv.io.cpu_attended_bytes[Tier.HOST] > 0
            assert engine.kv.io.cpu_attended_bytes[Tier.DEVICE] == 0  # the DEVICE part: torch's op
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_tiered_placements_match_transformers_8k(smollm2_source, hf_reference, essay_prompt, tmp_path, name):
    engine = _tiered_engine(smollm2_source, tmp_path, name)
    try:
        _check(engine, hf_reference, essay_prompt, 8192 - NEW_TOKENS)
    finally:
        engine.close()
