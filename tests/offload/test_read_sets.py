"""Read sets: one per layer and decode step, and everyone consumes exactly it.

A selector that returns a random subset of each layer's pages on a placement spread over
DEVICE, HOST and DISK: the read-ahead's chunks, the CUDA fetch-ahead's keys and the pages
attention uses must equal that subset, and ``bytes_read_per_token`` its bytes. Attention is
checked against an independent reference: softmax attention over the chosen pages' tokens,
taken from an exact read of the whole layer.
"""
from __future__ import annotations

import random

import pytest
import torch

from offload.config import DecodeKernel, RuntimeConfig
from offload.engine import Engine
from offload.kv.page_table import cdiv
from offload.kv.placement import Placement
from offload.kv.reads import PageChoice, Route, RouteRule, fetch_keys
from offload.model.model_config import ModelConfig
from offload.model.model_source import ModelSource
from offload.stats import RunStats
from planner import HardwareProfile
from storage import Tier
from storage.aligned import AlignedBuffer
from tests.tolerances import TOL

MiB = 2**20
PAGE = 16
PROMPT = 21 * PAGE + 5  # 22 pages per layer, the last partly filled
DECODE = 4


def _config() -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096, tie_word_embeddings=True)


class RandomSubset:
    """Each layer's pages chosen at random before the query; with ``after_query``, chosen
    again once the query exists (another random subset)."""

    def __init__(self, seed: int, *, after_query: bool = False) -> None:
        self.rng = random.Random(seed)
        self.after_query = after_query
        self.ahead: dict[tuple[int, int], tuple[int, ...]] = {}  # (step, layer) -> pages before the query
        self.chosen: dict[tuple[int, int], tuple[int, ...]] = {}  # (step, layer) -> final pages
        self.step = 0
        self.fallback, self.bounds_bytes, self.selection_s = "", 0, 0.0  # the PageSelector's accounting

    def choose(self, seq, layer, *, length, query):
        live = range(seq.table.first_live(layer), cdiv(length, PAGE))
        pages = tuple(sorted(self.rng.sample(list(live), k=max(1, len(live) // 2))))
        if query is None and layer == 0:
            self.step += 1
        if query is None:
            self.ahead[(self.step, layer)] = pages
        if query is not None or not self.after_query:
            self.chosen[(self.step, layer)] = pages
        return PageChoice(pages=pages, needs_query=self.after_query and query is None)


def _engine(tmp_path, kernel: DecodeKernel, device: str = "cpu") -> Engine:
    placement = Placement(device_pages=(4, 6, 3), host_pages=(5, 3, 8), delegated_share=(0.5, 1.0, 0.0))
    config = RuntimeConfig(device=device, dtype=torch.float32, page_size=PAGE, device_memory_bytes=4 * MiB,
                           host_memory_bytes=12 * MiB, disk_space_bytes=16 * MiB, kv_dir=str(tmp_path),
                           placement=placement, staging_chunk_pages=3, staging_buffers=2, decode_kernel=kernel,
                           profile=HardwareProfile.preset("cpu-2core"), shuffle_pages_seed=3)
    return Engine(ModelSource("tiny-read-sets", _config(), None, None), config)


def _page_kv(engine: Engine, seq, layer: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [num_kv_heads, tokens, head_dim] of one page, read from its tier directly (the
    arenas' tensors, or a synchronous read of the layer's DISK file): not through the reader."""
    kv = engine.kv
    tier, slot = seq.table.tiers(layer)[page], seq.table.slots(layer)[page]
    n = min(PAGE, seq.lengths[layer] - page * PAGE)
    if tier == Tier.DISK:
        buf = AlignedBuffer(kv.disk.disk_page_bytes)
        kv.disk.submit_read(layer, slot, 1, buf.memoryview()).wait()
        pages = kv.layout.pages(buf, 1)[0].clone()  # [2, nkv, ps, hd]
        return pages[0, :, :n].to(engine.device), pages[1, :, :n].to(engine.device)
    pool = kv.pool_of(tier)
    return pool.k[:, slot, :n].to(engine.device), pool.v[:, slot, :n].to(engine.device)


def _reference(engine: Engine, seq, layer: int, pages: tuple[int, ...], q: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q [1, heads, hd] over the tokens of ``pages`` (float64)."""
    cfg = engine.model_config
    kvs = [_page_kv(engine, seq, layer, p) for p in pages]
    k = torch.cat([k for k, _ in kvs], 1).double()
    v = torch.cat([v for _, v in kvs], 1).double()
    qg = q.view(cfg.num_kv_heads, cfg.group_size, cfg.head_dim).double()
    w = torch.softmax(torch.einsum("hgd,htd->hgt", qg, k) * engine.runner.scale, dim=-1)
    return torch.einsum("hgt,htd->hgd", w, v).reshape(1, -1)


KERNELS = [("cpu", DecodeKernel.NUMBA), ("cpu", DecodeKernel.TORCH),
           pytest.param("cuda", DecodeKernel.AUTO, marks=pytest.mark.gpu)]  # CUDA: Triton + fetch-ahead


@pytest.mark.parametrize("device, kernel", KERNELS)
@pytest.mark.parametrize("after_query", [False, True], ids=["ahead", "after-query"])
def test_random_subset_is_what_everyone_reads(tmp_path, monkeypatch, device, kernel, after_query):
    engine = _engine(tmp_path, kernel, device)
    try:
        selector = RandomSubset(seed=7, after_query=after_query)
        seq = engine.new_sequence()
        engine.prefill(seq, [i % 256 for i in range(PROMPT)])
        engine.selector = selector
        planned, attended, checks = [], {}, []
        real_plan = engine.kv.readahead.plan
        monkeypatch.setattr(engine.kv.readahead, "plan", lambda chunks: (planned.append(list(chunks)),
                                                                         real_plan(chunks))[1])
        real_call = engine.decode_attention.__call__

        def attend(reads, q):
            out = real_call(reads, q)
            attended[(selector.step, reads.layer)] = tuple(reads.pages())
            if reads.layer == 1:  # an independent reference for one layer per step
                checks.append((out, _reference(engine, seq, reads.layer, tuple(reads.pages()), q)))
            return out

        monkeypatch.setattr(type(engine.decode_attention), "__call__", lambda self, r, q: attend(r, q))
        stats = RunStats()
        list(engine.generate(seq, [5], max_new_tokens=DECODE + 1, stats=stats))
        steps = DECODE
        # Attention used exactly the chosen pages, and its result is attention over them.
        assert attended == selector.chosen
        assert len(attended) == steps * engine.model_config.num_layers
        for out, ref in checks:
            atol, rtol = TOL[torch.float32]
            torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
        # The read-ahead was given exactly the chosen DISK pages of each step, layer by layer.
        decode_plans = planned[-steps:]
        on_demand = 0
        for step, chunks in zip(range(1, steps + 1), decode_plans):
            for layer in range(engine.model_config.num_layers):
                tiers = seq.table.tiers(layer)
                disk_pages = [p for c in chunks if c.layer == layer for p in c.page_ids]
                assert disk_pages == [p for p in selector.ahead[(step, layer)] if tiers[p] == Tier.DISK]
                late = set(selector.chosen[(step, layer)]) - set(selector.ahead[(step, layer)])
                on_demand += any(tiers[p] == Tier.DISK for p in late)
        assert engine.kv.readahead.unplanned == 0  # nothing read out of plan (which would drop it)
        # Pages chosen only once the query existed were read on demand, and only then.
        assert (engine.kv.readahead.on_demand > 0) == (on_demand > 0)
        assert after_query or engine.kv.readahead.on_demand == 0
        # bytes_read_per_token: the chosen pages' bytes, per tier.
        want = {t.value: 0 for t in Tier}
        for (step, layer), pages in attended.items():
            tiers = seq.table.tiers(layer)
            for p in pages:
                want[tiers[p].value] += engine.kv.page_bytes
        assert stats.bytes_read_per_token == {t: b // steps for t, b in want.items()}
        f = engine.kv.fetcher
        if f is not None:  # CUDA: every piece copied ahead was one attention took
            assert f.fetched_pieces > 0 and f.taken_pieces == f.fetched_pieces
    finally:
        engine.close()


def test_fetch_keys_name_exactly_the_pieces_that_cross_to_the_device(tmp_path):
    """The CUDA fetch-ahead's keys (computed here without a GPU) cover exactly the chosen HOST
    pages not delegated and the chosen DISK pages, once each."""
    engine = _engine(tmp_path, DecodeKernel.TORCH)
    try:
        seq = engine.new_sequence()
        engine.prefill(seq, [i % 256 for i in range(PROMPT)])
        rng = random.Random(1)
        rule = RouteRule(device_paged=True, cuda=True)
        for layer in range(engine.model_config.num_layers):
            live = list(range(cdiv(seq.lengths[layer], PAGE)))
            pages = sorted(rng.sample(live, 12))
            reads = engine.kv.reader.layer_reads(seq, layer, rule=rule, pages=pages, host_share=0.5)
            assert reads.pages() == pages
            tiers, slots = seq.table.tiers(layer), seq.table.slots(layer)
            host = [p for p in pages if tiers[p] == Tier.HOST]
            delegated = host[:round(0.5 * len(host))]
            got_host, got_disk = [], []
            for key, n in fetch_keys(reads, max_pages=2, page_size=PAGE):
                if key[0] == Tier.DISK:
                    c = key[1]
                    got_disk += c.page_ids
                    assert n == c.num_pages
                else:
                    assert key[1] == layer and n == len(key[2]) <= 2
                    got_host += list(key[2])
            assert got_disk == [p for p in pages if tiers[p] == Tier.DISK]
            assert sorted(got_host) == sorted(slots[p] for p in host if p not in delegated)
            cpu = [p for piece in reads.pieces if piece.route == Route.PAGED_CPU for p in piece.page_ids]
            assert cpu == delegated
    finally:
        engine.close()


def test_scattered_disk_pages_share_a_chunk_and_planned_chunks_survive_the_query(tmp_path):
    """A selection's scattered DISK pages are read as one chunk (extents of consecutive file
    positions, at most ``staging_chunk_pages`` pages), not one chunk per run. Once the query
    exists, the planned chunks that still hold a named page are kept as they were (read
    ahead; the piece takes the named part of the chunk); the pages added go to chunks of their
    own (on demand); a planned chunk with no page left is dropped."""
    engine = _engine(tmp_path, DecodeKernel.NUMBA)
    try:
        seq = engine.new_sequence()
        engine.prefill(seq, [i % 256 for i in range(PROMPT)])
        reader, rule = engine.kv.reader, engine.decode_attention.routes
        layer = 2  # 3 DEVICE, 8 HOST, 11 DISK pages, slots shuffled
        tiers, slots = seq.table.tiers(layer), seq.table.slots(layer)
        disk = [p for p in range(cdiv(PROMPT, PAGE)) if tiers[p] == Tier.DISK]
        assert len(disk) >= 8
        before = reader.layer_reads(seq, layer, rule=rule, pages=disk[0:8:2])  # 4 scattered pages
        chunks = before.chunks()
        assert [c.page_ids for c in chunks] == [disk[0:6:2], [disk[6]]]  # 3 pages per chunk at most
        for c in chunks:
            for e in c.extents:
                assert [slots[e.first_page + i] for i in range(e.num_pages)] == list(
                    range(e.disk_slot, e.disk_slot + e.num_pages))
        # the query keeps the first chunk's pages, drops disk[6], adds disk[1] and disk[7]
        chosen = sorted([*disk[0:6:2], disk[1], disk[7]])
        after = reader.layer_reads(seq, layer, rule=rule, pages=chosen, planned=set(chunks))
        assert after.pages() == chosen
        ahead, on_demand = after.chunks(ahead=True), after.chunks(ahead=False)
        assert ahead == [chunks[0]]
        assert [c.page_ids for c in on_demand] == [[disk[1], disk[7]]]
        # a query that keeps only some of a planned chunk's pages takes that part of it
        part = reader.layer_reads(seq, layer, rule=rule, pages=[disk[0], disk[4]], planned=set(chunks))
        (piece,) = [p for p in part.pieces if p.tier == Tier.DISK]
        assert piece.chunk == chunks[0] and piece.ahead and piece.page_ids == (disk[0], disk[4])
        assert piece.chunk_positions() == [0, 2] and piece.tokens == 2 * PAGE
    finally:
        engine.close()
