"""offload.kv.paged_kv: page grouping, appends across pages, copy-on-write forks, capacity errors."""
from __future__ import annotations

import pytest
import torch

from offload.errors import CapacityError
from offload.kv.page_table import MIN_VIEW_PAGES, group_pages
from offload.kv.paged_kv import PagedKV
from storage import PageArena
from offload.kv.page_table import cdiv

NUM_KV_HEADS = 2
HEAD_DIM = 8
PAGE_SIZE = 4
NUM_LAYERS = 2
# Appends of these sizes cross page boundaries from every offset (1 + 3 + 5 + 4 + 8 = 21 tokens).
CHUNKS = [1, 3, 5, 4, 8]
SHUFFLE = [None, 7]
MAX_PAGES = [1, 2, 3, 5, 100]
SLOT_LISTS = [
    [],
    [4],
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],          # one long run
    [9, 3, 7, 1],                             # no runs at all
    [5, 6, 0, 1, 2, 3, 4, 11, 2, 3],          # short run, long run, singles
    [0, 1, 2, 3, 10, 11, 12, 13, 14, 20, 21],  # two long runs back to back, then a short one
    [3, 2, 1, 0, 8, 9, 10],                   # descending slots are not a run
]


def _kv(num_slots: int, *, shuffle_seed=None, num_layers=NUM_LAYERS) -> PagedKV:
    arena = PageArena(num_slots=num_slots, num_kv_heads=NUM_KV_HEADS, page_size=PAGE_SIZE,
                        head_dim=HEAD_DIM, dtype=torch.float32, device="cpu")
    return PagedKV(arena, num_layers, shuffle_seed=shuffle_seed)


def _tokens(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, NUM_KV_HEADS, HEAD_DIM), torch.randn(n, NUM_KV_HEADS, HEAD_DIM)


def _read_back(kv: PagedKV, seq, layer: int, max_tokens: int = 1 << 20):
    """The layer's K and V as [nkv, length, hd], assembled from ``groups`` (checking that the
    groups tile the positions in order)."""
    ks, vs, pos = [], [], 0
    for g in kv.reader.layer_groups(seq, layer, max_tokens):
        assert g.start_pos == pos
        assert g.k.shape == g.v.shape and g.k.shape[0] == NUM_KV_HEADS and g.k.shape[2] == HEAD_DIM
        pos += g.k.shape[1]
        ks.append(g.k.clone())
        vs.append(g.v.clone())
    assert pos == seq.lengths[layer]
    if not ks:
        return torch.empty(NUM_KV_HEADS, 0, HEAD_DIM), torch.empty(NUM_KV_HEADS, 0, HEAD_DIM)
    return torch.cat(ks, dim=1), torch.cat(vs, dim=1)


def _append_all(kv: PagedKV, seq, chunks):
    """Append ``chunks`` token counts to every layer; returns the expected [nkv, L, hd] per layer."""
    want = [([], []) for _ in range(kv.num_layers)]
    for n in chunks:
        for layer in range(kv.num_layers):
            k, v = _tokens(n)
            kv.append(seq, layer, k, v)
            want[layer][0].append(k.transpose(0, 1))
            want[layer][1].append(v.transpose(0, 1))
    return [(torch.cat(ks, dim=1), torch.cat(vs, dim=1)) for ks, vs in want]


@pytest.mark.parametrize("max_pages", MAX_PAGES)
@pytest.mark.parametrize("slots", SLOT_LISTS)
def test_group_pages_cover_every_page_once_in_order(slots, max_pages):
    groups = list(group_pages(slots, max_pages))
    page = 0
    for first, group, contiguous in groups:
        assert first == page
        assert 1 <= len(group) <= max_pages
        if contiguous:  # the flag is a promise the arena relies on to return a view
            assert group == list(range(group[0], group[0] + len(group)))
        assert group == slots[first : first + len(group)]
        page += len(group)
    assert page == len(slots)


@pytest.mark.parametrize("max_pages", MAX_PAGES)
def test_group_pages_keep_long_runs_contiguous(max_pages):
    run = list(range(20, 20 + 2 * MIN_VIEW_PAGES + 1))
    slots = [3, 9, *run, 1]
    for first, group, contiguous in group_pages(slots, max_pages):
        pages = range(first, first + len(group))
        if any(2 <= p < 2 + len(run) for p in pages):
            # a group touching the run lies inside it and is itself one run of slots
            assert all(2 <= p < 2 + len(run) for p in pages)
            assert group == list(range(group[0], group[0] + len(group)))
            assert contiguous
    run_groups = [g for f, g, _ in group_pages(slots, max_pages) if 2 <= f < 2 + len(run)]
    assert len(run_groups) == cdiv(len(run), max_pages)


def test_group_pages_pack_short_runs_together():
    slots = [8, 2, 5, 6, 0]
    assert list(group_pages(slots, 3)) == [(0, [8, 2, 5], False), (3, [6, 0], False)]


@pytest.mark.parametrize("max_tokens", [1, PAGE_SIZE, 3 * PAGE_SIZE - 1, 1000])
@pytest.mark.parametrize("shuffle_seed", SHUFFLE)
def test_append_across_pages_reads_back_exactly(shuffle_seed, max_tokens):
    kv = _kv(16, shuffle_seed=shuffle_seed)
    seq = kv.new_sequence()
    want = _append_all(kv, seq, CHUNKS)
    length = sum(CHUNKS)
    assert seq.lengths == [length] * NUM_LAYERS and seq.num_tokens == length
    for layer in range(NUM_LAYERS):
        assert seq.table.num_pages(layer) == cdiv(length, PAGE_SIZE)
        for g in kv.reader.layer_groups(seq, layer, max_tokens):
            assert g.k.shape[1] <= max(max_tokens, PAGE_SIZE)
        k, v = _read_back(kv, seq, layer, max_tokens)
        assert torch.equal(k, want[layer][0]) and torch.equal(v, want[layer][1])


def test_layers_of_different_lengths_during_prefill():
    kv = _kv(8)
    seq = kv.new_sequence()
    k, v = _tokens(6)
    kv.append(seq, 0, k, v)
    assert seq.lengths == [6, 0]
    assert list(kv.reader.layer_groups(seq, 1, 100)) == []
    rk, rv = _read_back(kv, seq, 0)
    assert torch.equal(rk, k.transpose(0, 1)) and torch.equal(rv, v.transpose(0, 1))


@pytest.mark.parametrize("shuffle_seed", SHUFFLE)
def test_fork_of_partial_page_is_copy_on_write(shuffle_seed):
    kv = _kv(16, shuffle_seed=shuffle_seed)
    parent = kv.new_sequence()
    want = _append_all(kv, parent, [10])  # 10 tokens: two full pages and a partial third
    slots = [parent.table.slots(layer) for layer in range(NUM_LAYERS)]
    refs = [[kv.arena.refcount(s) for s in layer] for layer in slots]

    fork = kv.fork(parent)
    for layer in range(NUM_LAYERS):
        fslots = fork.table.slots(layer)
        assert fslots[:2] == slots[layer][:2]      # full pages shared
        assert fslots[2] != slots[layer][2]        # partial page copied
        assert [kv.arena.refcount(s) for s in slots[layer]] == [2, 2, 1]
    fork_want = _append_all(kv, fork, [5])

    for layer in range(NUM_LAYERS):
        k, v = _read_back(kv, parent, layer)
        assert torch.equal(k, want[layer][0]) and torch.equal(v, want[layer][1])
        fk, fv = _read_back(kv, fork, layer)
        assert torch.equal(fk, torch.cat([want[layer][0], fork_want[layer][0]], dim=1))
        assert torch.equal(fv, torch.cat([want[layer][1], fork_want[layer][1]], dim=1))

    kv.release(fork)
    kv.release(fork)  # idempotent
    assert [[kv.arena.refcount(s) for s in layer] for layer in slots] == refs
    assert kv.arena.num_used == NUM_LAYERS * 3
    kv.release(parent)
    assert kv.arena.num_used == 0


def test_parent_appends_after_fork_do_not_touch_fork():
    kv = _kv(16)
    parent = kv.new_sequence()
    want = _append_all(kv, parent, [6])
    fork = kv.fork(parent)
    _append_all(kv, parent, [7])
    for layer in range(NUM_LAYERS):
        k, v = _read_back(kv, fork, layer)
        assert torch.equal(k, want[layer][0]) and torch.equal(v, want[layer][1])


def test_fork_of_page_aligned_sequence_shares_every_page():
    kv = _kv(16)
    parent = kv.new_sequence()
    want = _append_all(kv, parent, [2 * PAGE_SIZE])
    used = kv.arena.num_used
    fork = kv.fork(parent)
    assert kv.arena.num_used == used
    for layer in range(NUM_LAYERS):
        assert fork.table.slots(layer) == parent.table.slots(layer)
        assert all(kv.arena.refcount(s) == 2 for s in parent.table.slots(layer))
    _append_all(kv, fork, [3])
    for layer in range(NUM_LAYERS):
        k, v = _read_back(kv, parent, layer)
        assert torch.equal(k, want[layer][0]) and torch.equal(v, want[layer][1])
    kv.release(fork)
    assert all(kv.arena.refcount(s) == 1 for layer in range(NUM_LAYERS) for s in parent.table.slots(layer))


def test_capacity_error_names_device_memory_and_takes_nothing():
    kv = _kv(3, num_layers=1)
    seq = kv.new_sequence()
    k, v = _tokens(3 * PAGE_SIZE + 1)
    with pytest.raises(CapacityError, match="--device-memory"):
        kv.append(seq, 0, k, v)
    assert kv.arena.num_used == 0
    assert seq.lengths == [0] and seq.table.num_pages(0) == 0
    kv.append(seq, 0, k[:-1], v[:-1])  # what fits still fits
    assert kv.arena.num_used == 3


def test_capacity_error_on_a_later_append():
    kv = _kv(4)
    seq = kv.new_sequence()
    _append_all(kv, seq, [2 * PAGE_SIZE])
    k, v = _tokens(1)
    with pytest.raises(CapacityError, match=r"raise --device-memory"):
        kv.append(seq, 0, k, v)
    assert seq.lengths == [2 * PAGE_SIZE] * NUM_LAYERS


def test_fork_that_runs_out_of_capacity_leaves_arena_unchanged():
    kv = _kv(5)  # parent takes 4 slots; the fork needs 2 (one tail page per layer)
    parent = kv.new_sequence()
    _append_all(kv, parent, [PAGE_SIZE + 2])
    refs = [kv.arena.refcount(s) for s in range(5)]
    with pytest.raises(CapacityError, match="--device-memory"):
        kv.fork(parent)
    assert [kv.arena.refcount(s) for s in range(5)] == refs
    kv.release(parent)
    assert kv.arena.num_used == 0
