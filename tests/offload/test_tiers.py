"""Tiers: placement by budgets (DEVICE, then HOST, then DISK), exactness of every placement on
a tiny model, in-place HOST pages on a CPU-only machine, faults surfacing from the storage
layer, up-front refusal of a device budget too small, scratch questions over DISK pages."""
from __future__ import annotations

import errno

import pytest
import torch

from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.errors import CapacityError
from offload.model.model_source import resolve_model
from offload.kv.placement import Placement
from storage import StorageIOError, Tier
from storage.disk_store import PosixIO
from tests.offload.arch_pairs import ours_teacher_forced, save_tiny
from tests.tolerances import TOL
from offload.kv.page_table import cdiv

PROMPT = 300
FORCED = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny("qwen2", folder)
    ids = torch.randint(0, 512, (PROMPT,), generator=torch.Generator().manual_seed(9)).tolist()
    return folder, ids


def _engine(folder, tmp_path, **kw) -> Engine:
    kw.setdefault("page_size", 16)
    return Engine(resolve_model(str(folder), cache_dir=folder / "cache"),
                  RuntimeConfig(device="cpu", kv_dir=str(tmp_path / "kv"), staging_chunk_pages=3, **kw))


def _tiers_used(engine: Engine, seq) -> set[Tier]:
    return {t for layer in range(engine.model_config.num_layers) for t in seq.table.tiers(layer)}


@pytest.mark.parametrize("placement", [Placement.all_on(Tier.HOST), Placement.all_on(Tier.DISK),
                                       Placement(2, 3), Placement(0, 5), Placement(4, 0)],
                         ids=["host", "disk", "mixed", "host+disk", "device+disk"])
def test_every_placement_gives_the_in_memory_logits(tiny, tmp_path, placement):
    folder, ids = tiny
    reference = _engine(folder, tmp_path / "ref")
    want = ours_teacher_forced(reference, ids, FORCED, prompt_logits=16)
    engine = _engine(folder, tmp_path, placement=placement, host_memory_bytes=16 * 2**20)
    try:
        got = ours_teacher_forced(engine, ids, FORCED, prompt_logits=16)
    finally:
        engine.close()
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(got, want, atol=10 * atol, rtol=10 * rtol)  # partials split differently


def test_budgets_fill_device_then_host_then_disk(tiny, tmp_path):
    folder, ids = tiny
    probe = _engine(folder, tmp_path / "probe")
    slot = probe.arena.slot_bytes
    layers = probe.model_config.num_layers
    del probe
    engine = _engine(folder, tmp_path, device_memory_bytes=(8 + 8) * layers * slot,
                     host_memory_bytes=64 * 2**20)
    try:
        seq = engine.new_sequence()
        engine.forward(seq, ids)
        used = _tiers_used(engine, seq)
        assert Tier.DEVICE in used and Tier.HOST in used
        order = {Tier.DEVICE: 0, Tier.HOST: 1, Tier.DISK: 2}
        for layer in range(layers):
            tiers = seq.table.tiers(layer)
            # DEVICE pages first, then HOST (then DISK), the tail on DEVICE
            assert [order[t] for t in tiers[:-1]] == sorted(order[t] for t in tiers[:-1])
            assert tiers[-1] == Tier.DEVICE
        assert engine.kv.peak_bytes()["device"] <= engine.config.device_memory_bytes
    finally:
        engine.close()


def test_small_device_budget_spills_to_disk_and_stats_say_so(tiny, tmp_path):
    folder, ids = tiny
    engine = _engine(folder, tmp_path, device_memory_bytes=120_000)  # no HOST tier: DEVICE then DISK
    try:
        seq = engine.new_sequence()
        toks = list(engine.generate(seq, ids, max_new_tokens=4))
        assert len(toks) == 4 and Tier.DISK in _tiers_used(engine, seq)
        from offload.stats import RunStats
        stats = RunStats()
        seq2 = engine.new_sequence()
        list(engine.generate(seq2, ids, max_new_tokens=4, stats=stats))
        assert stats.bytes_read_per_token["disk"] > 0
        assert stats.cold_reads in ("o_direct", "fadvise_dontneed")
        assert stats.peak_bytes["disk"] > 0 and stats.disk_bytes_written > 0
    finally:
        engine.close()


def test_host_pages_are_attended_in_place_on_cpu(tiny, tmp_path):
    folder, ids = tiny
    engine = _engine(folder, tmp_path, placement=Placement.all_on(Tier.HOST), host_memory_bytes=16 * 2**20)
    try:
        seq = engine.new_sequence()
        engine.forward(seq, ids)
        groups = [g for g in engine.kv.reader.layer_groups(seq, 0, 1 << 20) if g.tier == Tier.HOST]
        host = engine.host_arena
        lo = host.k.data_ptr()
        hi = lo + host.k.numel() * host.k.element_size()
        assert groups and all(lo <= g.k.data_ptr() < hi for g in groups)  # views, never copies
    finally:
        engine.close()


class _FailingReads(PosixIO):
    def __init__(self, short: bool) -> None:
        self.short = short

    def preadv(self, fd, buffers, offset):
        if self.short:
            return super().preadv(fd, buffers, offset) // 2
        raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("short", [False, True], ids=["eio", "short-read"])
def test_read_fault_surfaces_with_the_file_name(tiny, tmp_path, short):
    folder, ids = tiny
    engine = _engine(folder, tmp_path, placement=Placement.all_on(Tier.DISK))
    try:
        seq = engine.new_sequence()
        engine.forward(seq, ids)
        engine.kv.writes.flush()
        engine.disk._io = _FailingReads(short)  # inject the fault at the storage layer
        with pytest.raises(StorageIOError, match=r"layer_000\.kv.*(short read|Input/output error)"):
            engine.forward(seq, [1])
    finally:
        engine.disk._io = PosixIO()
        engine.close()


def test_device_budget_too_small_is_refused_up_front(tiny, tmp_path):
    folder, ids = tiny
    engine = _engine(folder, tmp_path, device_memory_bytes=20_000, host_memory_bytes=16 * 2**20)
    try:
        with pytest.raises(CapacityError, match=r"tail pages.*--device-memory \(RuntimeConfig.device_memory_bytes\) "
                                                r"of at least \d+MiB"):
            engine.check_request(engine.new_sequence(), len(ids), 8)
        assert engine.arena.num_used == 0
    finally:
        engine.close()


def test_questions_over_disk_pages_are_scratch(tiny, tmp_path):
    folder, ids = tiny
    engine = _engine(folder, tmp_path, placement=Placement(1, 1), host_memory_bytes=16 * 2**20)
    try:
        doc = engine.new_sequence()
        engine.forward(doc, ids)
        disk_used = engine.kv.free_slots(Tier.DISK)
        answers = []
        for q in ([3, 4, 5], [9, 8, 7], [3, 4, 5]):
            fork = engine.fork(doc)
            answers.append(list(engine.generate(fork, q, max_new_tokens=6)))
            engine.release(fork)
        assert answers[0] == answers[2]
        assert engine.kv.free_slots(Tier.DISK) == disk_used
    finally:
        engine.close()


def test_close_removes_the_disk_tier_files(tiny, tmp_path):
    folder, ids = tiny
    engine = _engine(folder, tmp_path, placement=Placement.all_on(Tier.DISK))
    seq = engine.new_sequence()
    engine.forward(seq, ids)
    root = engine.disk.root
    assert any(root.iterdir())
    engine.close()
    assert not root.exists()


def test_decode_growth_writes_older_pages_back_when_device_is_full(tiny, tmp_path):
    """A DEVICE budget of 4 pages per layer, a 40-token prompt (3 pages) and 60 new tokens:
    older non-sink pages move to DISK as the tail grows, and the tokens stay those of the
    in-memory run."""
    folder, ids = tiny
    reference = _engine(folder, tmp_path / "ref")
    seq = reference.new_sequence()
    want = list(reference.generate(seq, ids[:40], max_new_tokens=60))
    slot = reference.arena.slot_bytes
    layers = reference.model_config.num_layers
    engine = _engine(folder, tmp_path, device_memory_bytes=4 * layers * slot)
    try:
        seq = engine.new_sequence()
        got = list(engine.generate(seq, ids[:40], max_new_tokens=60))
        assert got == want
        assert engine.kv.io.evicted_pages > 0
        # Pages moved before each step's reads were planned: decode never read out of plan.
        assert engine.kv.readahead is not None and engine.kv.readahead.unplanned == 0
        tiers0 = seq.table.tiers(0)
        assert tiers0[0] == Tier.DEVICE and tiers0[-1] == Tier.DEVICE  # sink and tail stay
        assert Tier.DISK in tiers0
    finally:
        engine.close()


@pytest.mark.parametrize("tokens", [16 * 7, 16 * 7 + 5])
def test_restore_from_disk_layout_pages_equals_the_token_path(tiny, tmp_path, tokens):
    """``restore_pages`` (a DocCache hit: pages as DISK stores them) places and stores exactly
    what ``restore`` (token order) does, on every tier of a mixed placement, with a partly
    filled last page; the tiers' bytes read back equal the tokens given."""
    folder, _ = tiny
    engine = _engine(folder, tmp_path, placement=Placement(2, 3), host_memory_bytes=16 * 2**20)
    try:
        kv, cfg, ps = engine.kv, engine.model_config, 16
        gen = torch.Generator().manual_seed(3)
        n = cdiv(tokens, ps)
        pages = torch.randn(n, 2, cfg.num_kv_heads, ps, cfg.head_dim, generator=gen)
        pages[-1, :, :, tokens - (n - 1) * ps:] = 0.0  # the padding a DocCache stores
        tok = pages.permute(1, 0, 3, 2, 4).reshape(2, n * ps, cfg.num_kv_heads, cfg.head_dim)[:, :tokens]
        by_tokens, by_pages, by_pieces = engine.new_sequence(), engine.new_sequence(), engine.new_sequence()
        placement = Placement(2, 3)
        for layer in range(cfg.num_layers):
            kv.writes.restore(by_tokens, layer, 0, tok[0], tok[1], placement)
            kv.writes.restore_pages(by_pages, layer, 0, pages, tokens, placement)
            for p0 in range(0, n, 3):  # pieces of 3 pages, each continuing the last
                piece = pages[p0: p0 + 3]
                kv.writes.restore_pages(by_pieces, layer, p0 * ps, piece, min(3 * ps, tokens - p0 * ps), placement)
        kv.writes.flush()
        for layer in range(cfg.num_layers):
            want = [(g.start_pos, g.k.clone(), g.v.clone()) for g in kv.reader.layer_groups(by_tokens, layer, 1 << 20)]
            for seq in (by_pages, by_pieces):
                assert seq.table.tiers(layer) == by_tokens.table.tiers(layer)
                assert seq.lengths[layer] == by_tokens.lengths[layer] == tokens
                assert set(seq.table.tiers(layer)) == {Tier.DEVICE, Tier.HOST, Tier.DISK}
                got = [(g.start_pos, g.k.clone(), g.v.clone()) for g in kv.reader.layer_groups(seq, layer, 1 << 20)]
                assert [g[0] for g in got] == [w[0] for w in want]
                k_got = torch.cat([g[1] for g in got], dim=1)
                v_got = torch.cat([g[2] for g in got], dim=1)
                assert torch.equal(k_got, torch.cat([w[1] for w in want], dim=1))
                assert torch.equal(k_got, tok[0].transpose(0, 1)) and torch.equal(v_got, tok[1].transpose(0, 1))
        with pytest.raises(ValueError, match="shape"):
            kv.writes.restore_pages(engine.new_sequence(), 0, 0, pages, tokens + ps)
        with pytest.raises(ValueError, match="page-aligned end"):  # a gap after the restored pages
            kv.writes.restore_pages(by_pages, 0, tokens + ps, pages[:1], ps)
    finally:
        engine.close()
