"""Gemma 3 through the paged engine: sliding-window rings on DEVICE, global layers on the tiers.

Small random models (saved as real checkpoints, every norm weight randomized) run prompts of
five windows with pages of 4 tokens and prefill chunks of 16, so chunks, pages and windows
cross one another; the real 270M runs essay prompts of 2K and 8K tokens (``slow``: its GGUF
conversion alone takes ~45 s on 2 cores). The oracle is
transformers' ``Gemma3ForCausalLM``: eager attention for the small models and at 2K, sdpa at
8K (eager's [heads, 8K, 8K] score matrices per layer are slow on CPU).
"""
from __future__ import annotations

import functools

import pytest
import torch

from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.errors import CapacityError
from offload.model.model_source import resolve_model
from offload.kv.page_table import LayerKind
from offload.kv.paged_kv import ring_pages
from offload.kv.placement import Placement
from offload.stats import RunStats
from storage import Tier
from tests.tolerances import MODEL_LOGITS_FP32_ATOL, TOL
from offload.kv.page_table import cdiv

GLOBAL, SLIDING = LayerKind.GLOBAL.value, LayerKind.SLIDING.value  # as stats and JSON name them

SL, FU = "sliding_attention", "full_attention"
WINDOW, PAGE = 8, 4
SMALL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, layer_types=[SL, SL, FU, SL, SL, FU], sliding_window=WINDOW,
    query_pre_attn_scalar=32, max_position_embeddings=256,
)
PROMPT, NEW = 40, 20
PLACEMENTS = {
    "device": Placement.all_on(Tier.DEVICE),
    "host": Placement.all_on(Tier.HOST),
    "disk": Placement.all_on(Tier.DISK),
    "mixed": Placement(device_pages=2, host_pages=3),  # DEVICE, HOST and DISK in every global layer
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(transformers model, our ModelSource of the same checkpoint)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(3)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**SMALL, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("gemma3-small")
    model.save_pretrained(folder)
    return model, resolve_model(str(folder), cache_dir=folder)


def _engine(source, tmp_path, **kw) -> Engine:
    kw = {"device": "cpu", "page_size": PAGE, "prefill_chunk_tokens": 16, "kv_dir": str(tmp_path / "kv"),
          "host_memory_bytes": 16 * 2**20, **kw}
    return Engine(source, RuntimeConfig(**kw))


def _run(engine: Engine, ids: list[int], seq=None):
    seq = seq if seq is not None else engine.new_sequence()
    logits: list[torch.Tensor] = []
    toks = list(engine.generate(seq, ids, max_new_tokens=NEW, num_prompt_logits=len(ids), record_logits=logits))
    return seq, toks, torch.cat(logits)


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("where", list(PLACEMENTS))
def test_small_model_matches_transformers(small, tmp_path, where, device):
    model, source = small
    engine = _engine(source, tmp_path, placement=PLACEMENTS[where], device=device)
    ids = torch.randint(0, SMALL["vocab_size"], (PROMPT,)).tolist()
    seq, toks, ours = _run(engine, ids)
    ref = _hf_logits(model.to(device), ids + toks[:-1]).cpu()  # teacher-forced on our tokens
    model.to("cpu")
    # CPU: the same fp32 math up to summation order; CUDA GEMMs may differ more (whole-model entry).
    atol, rtol = (TOL[torch.float32][0] * 10, TOL[torch.float32][1] * 10) if device == "cpu" else (
        MODEL_LOGITS_FP32_ATOL, 0.0)
    torch.testing.assert_close(ours.cpu(), ref, atol=atol, rtol=rtol)
    assert toks == ref[PROMPT - 1:].argmax(-1).tolist()  # = transformers' greedy tokens, by induction
    held = engine.kv.held_bytes(seq)
    if where != "device":
        assert held[LayerKind.GLOBAL][Tier.DEVICE] < held[LayerKind.GLOBAL][Tier.HOST] + held[LayerKind.GLOBAL][Tier.DISK]
    engine.close()


@pytest.mark.parametrize("planner", ["lp", "greedy"])
def test_planned_spill_matches_transformers(small, tmp_path, planner):
    """Budgets instead of a placement: the planner places the global layers' pages, the rings
    are counted in the DEVICE room, and the answer is still exact."""
    model, source = small
    engine = _engine(source, tmp_path, device_memory_bytes=28 * 1024, planner=planner)
    ids = torch.randint(0, SMALL["vocab_size"], (PROMPT,)).tolist()
    seq, toks, ours = _run(engine, ids)
    torch.testing.assert_close(ours, _hf_logits(model, ids + toks[:-1]), atol=1e-4, rtol=1e-5)
    assert engine.last_problem is not None and engine.last_problem.num_layers == 2  # the global layers
    held = engine.kv.held_bytes(seq)
    assert held[LayerKind.GLOBAL][Tier.HOST] + held[LayerKind.GLOBAL][Tier.DISK] > 0
    engine.close()


def test_sliding_layers_keep_a_device_ring(small, tmp_path):
    model, source = small
    engine = _engine(source, tmp_path, placement=PLACEMENTS["disk"])
    ids = torch.randint(0, SMALL["vocab_size"], (PROMPT,)).tolist()
    seq = engine.new_sequence()
    stats = RunStats()
    toks = list(engine.generate(seq, ids, max_new_tokens=NEW, stats=stats))
    ring = ring_pages(WINDOW, PAGE)
    for layer, window in enumerate(engine.windows):
        first, n = seq.table.first_live(layer), seq.table.num_pages(layer)
        live = seq.table.tiers(layer)[first:n]
        if window is None:
            assert first == 0 and n == cdiv(seq.num_tokens, PAGE)
        else:
            assert 0 < len(live) <= ring and set(live) == {Tier.DEVICE}
            assert first * PAGE <= seq.num_tokens - WINDOW  # everything older was dropped
    per_tok = stats.bytes_read_per_token_by_kind
    assert per_tok[SLIDING][Tier.DISK.value] == 0 and per_tok[SLIDING][Tier.HOST.value] == 0
    assert per_tok[SLIDING][Tier.DEVICE.value] > 0 and per_tok[GLOBAL][Tier.DISK.value] > 0
    # Measured writes: the global layers wrote every token once, K and V, fp32.
    written = stats.kv_written_bytes_by_kind
    tokens = seq.num_tokens
    per_token = 2 * 1 * SMALL["num_key_value_heads"] * SMALL["head_dim"] * 4  # per global layer
    assert sum(written[GLOBAL].values()) == 2 * per_token * tokens
    assert written[GLOBAL][Tier.DISK.value] > 0 and written[SLIDING][Tier.DISK.value] == 0
    # Sliding layers skip tokens that land only in pages already out of the window.
    assert sum(written[SLIDING].values()) < 4 * per_token * tokens
    assert stats.kv_bytes_per_token == 2 * per_token
    assert stats.kv_held_bytes_by_kind[SLIDING][Tier.DEVICE.value] <= 4 * ring * engine.kv.page_bytes
    assert len(toks) == NEW
    engine.close()


def test_questions_on_forks_leave_the_documents_ring(small, tmp_path):
    """Ask twice: a question slides the window on its fork; the document's ring keeps its
    pages and their bytes, and the second question gets the first one's answer."""
    _, source = small
    engine = _engine(source, tmp_path, placement=PLACEMENTS["mixed"])
    doc = engine.new_sequence()
    engine.forward(doc, torch.randint(0, SMALL["vocab_size"], (PROMPT,)).tolist())
    sliding = [i for i, w in enumerate(engine.windows) if w is not None]
    before = {i: (doc.table.first_live(i), list(doc.table.slots(i))) for i in sliding}
    content = {i: engine.arena.k[:, before[i][1][before[i][0]:]].clone() for i in sliding}
    used = engine.arena.num_used
    question = torch.randint(0, SMALL["vocab_size"], (3 * WINDOW,)).tolist()  # slides past the ring
    answers = []
    for _ in range(2):
        fork = engine.fork(doc)
        _, toks, _ = _run(engine, question, fork)
        engine.release(fork)
        answers.append(toks)
        for i in sliding:
            assert (doc.table.first_live(i), list(doc.table.slots(i))) == before[i]
            assert torch.equal(engine.arena.k[:, before[i][1][before[i][0]:]], content[i])
        assert engine.arena.num_used == used
    assert answers[0] == answers[1]
    engine.close()


def test_window_mask_errors_are_caught(small, tmp_path):
    """The comparison would catch a window one key too wide or too narrow in the engine."""
    model, source = small
    ids = torch.randint(0, SMALL["vocab_size"], (PROMPT,)).tolist()
    for delta in (1, -1):
        engine = _engine(source, tmp_path, placement=PLACEMENTS["device"])
        engine.windows = tuple(None if w is None else w + delta for w in engine.windows)
        _, toks, ours = _run(engine, ids)
        ref = _hf_logits(model, ids + toks[:-1])
        assert (ours - ref).abs().max() > 100 * TOL[torch.float32][0]
        engine.close()


def test_device_budget_counts_the_rings(small, tmp_path):
    """A DEVICE budget that holds the global layers' tails but not the rings is refused up
    front with the minimum; that minimum works."""
    _, source = small
    page_bytes = 2 * PAGE * SMALL["head_dim"] * 4
    engine = _engine(source, tmp_path, device_memory_bytes=10 * page_bytes)  # < 4 rings of 3 pages
    seq = engine.new_sequence()
    with pytest.raises(CapacityError, match="sliding-window rings") as e:
        engine.check_request(seq, PROMPT, NEW)
    minimum = int(str(e.value).split("at least ")[1].split("MiB")[0])
    engine.close()
    engine = _engine(source, tmp_path, device_memory_bytes=minimum * 2**20)
    engine.check_request(engine.new_sequence(), PROMPT, NEW)
    engine.close()


# ----- the real Gemma 3 270M -----------------------------------------------------------------
REAL_NEW, REAL_PROMPT_LOGITS = 32, 64


@pytest.fixture(scope="module")
def gemma3_source(gemma3_checkpoint):
    return resolve_model(str(gemma3_checkpoint), cache_dir=gemma3_checkpoint.parent)


@pytest.fixture(scope="module")
def gemma3_prompt(gemma3_source, essays_text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gemma3_source.tokenizer_dir))

    @functools.lru_cache(maxsize=None)
    def make(n: int) -> tuple[int, ...]:
        ids = tok(essays_text[: n * 8]).input_ids[:n]
        assert len(ids) == n
        return tuple(ids)

    return make


@pytest.fixture(scope="module")
def hf_gemma3_reference(gemma3_checkpoint, gemma3_prompt):
    """n -> (greedy ids, logits [64 + 31, vocab]) of transformers on the n-token prompt."""
    from transformers import Gemma3ForCausalLM

    @functools.lru_cache(maxsize=None)
    def run(n: int):
        attn = "eager" if n <= 2048 else "sdpa"
        model = Gemma3ForCausalLM.from_pretrained(str(gemma3_checkpoint), dtype=torch.float32,
                                                  attn_implementation=attn).eval()
        ids = torch.tensor([gemma3_prompt(n)])
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=REAL_NEW, min_new_tokens=REAL_NEW, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            prompt_logits = model(ids, logits_to_keep=REAL_PROMPT_LOGITS).logits[0].float()
        step_logits = torch.stack([x[0].float() for x in out.logits[1:]])
        return out.sequences[0, n:].tolist(), torch.cat([prompt_logits, step_logits])

    return run


@pytest.mark.parametrize("n", [2048, pytest.param(8192, marks=pytest.mark.slow)])
@pytest.mark.parametrize("where", [pytest.param("device", marks=pytest.mark.slow),
                                   pytest.param("disk", marks=pytest.mark.slow)])
def test_real_gemma3_matches_transformers(gemma3_source, gemma3_prompt, hf_gemma3_reference, tmp_path, n, where):
    """Greedy 32 tokens identical to transformers' generate; teacher-forced logits within 1e-3
    at the last 64 prompt positions and every generated one."""
    hf_tokens, hf_logits = hf_gemma3_reference(n)
    engine = Engine(gemma3_source, RuntimeConfig(device="cpu", placement=PLACEMENTS[where],
                                                 kv_dir=str(tmp_path / "kv"), host_memory_bytes=64 * 2**20))
    seq = engine.new_sequence()
    logits: list[torch.Tensor] = []
    stats = RunStats()
    toks = list(engine.generate(seq, list(gemma3_prompt(n)), max_new_tokens=REAL_NEW, stats=stats,
                                num_prompt_logits=REAL_PROMPT_LOGITS, record_logits=logits))
    ours = torch.cat(logits)[: REAL_PROMPT_LOGITS + REAL_NEW - 1]
    assert toks == hf_tokens
    torch.testing.assert_close(ours, hf_logits, atol=MODEL_LOGITS_FP32_ATOL, rtol=0.0)
    if where == "disk":
        per_tok = stats.bytes_read_per_token_by_kind
        assert per_tok[GLOBAL][Tier.DISK.value] > 0 and per_tok[SLIDING][Tier.DISK.value] == 0
    engine.close()


# ----- needles: found in exactly the cases where transformers finds them ----------------------
NEEDLE_CASES = [pytest.param(n, d, marks=pytest.mark.slow) for n, d in
                [(4096, 0.5), (4096, 0.25), (4096, 0.75), (8192, 0.25), (8192, 0.5), (8192, 0.75),
                 (16384, 0.25), (16384, 0.5), (16384, 0.75)]]


@pytest.fixture(scope="module")
def needle_runtime(gemma3_checkpoint, essays_text):
    """(our LongDocQA with budgets that spill to disk, transformers' greedy generator)."""
    from bench.needle_gemma3 import hf_generator, make_qa

    qa = make_qa(str(gemma3_checkpoint), cache_dir=gemma3_checkpoint.parent)
    yield qa, hf_generator(gemma3_checkpoint)
    qa.close()


@pytest.mark.parametrize("n, depth", NEEDLE_CASES)
def test_needle_found_exactly_where_transformers_finds_it(needle_runtime, essays_text, n, depth):
    from bench.needle_gemma3 import HEADER, row
    from offload.commands.needle import NEEDLES, run_needle_case

    qa, generate = needle_runtime
    needle = NEEDLES[[0.25, 0.5, 0.75].index(depth)]
    case = run_needle_case(qa, generate, essays_text, num_tokens=n, depth=depth, needle=needle)
    print("\n" + HEADER + "\n" + row(case))
    assert abs(case.tokens - n) < n // 50
    assert case.found_ours == case.found_reference
    assert case.same_tokens, (case.ours, case.reference)
    assert case.kv_disk_read_per_token > 0  # the global layers' KV was read from disk
