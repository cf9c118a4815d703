"""storage.page_arena: slot allocation, reference counts, and byte-exact write/read."""
from __future__ import annotations

import pytest
import torch

from storage import PageArena

NUM_SLOTS = 9
NUM_KV_HEADS = 2
PAGE_SIZE = 4
HEAD_DIM = 8
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=DTYPES, ids=["fp32", "fp16", "bf16"])
def arena(request) -> PageArena:
    return PageArena(num_slots=NUM_SLOTS, num_kv_heads=NUM_KV_HEADS, page_size=PAGE_SIZE,
                       head_dim=HEAD_DIM, dtype=request.param, device="cpu")


def _fill(arena: PageArena, slots: list[int], num_tokens: int):
    """Write ``num_tokens`` random tokens into the pages ``slots``; returns k, v as
    [nkv, num_tokens, hd] in the arena dtype."""
    pos = torch.arange(num_tokens)
    slot_of = torch.tensor(slots)[pos // arena.page_size]
    k = torch.randn(num_tokens, arena.num_kv_heads, arena.head_dim)
    v = torch.randn(num_tokens, arena.num_kv_heads, arena.head_dim)
    arena.write(slot_of, pos % arena.page_size, k, v)
    return k.transpose(0, 1).to(arena.dtype), v.transpose(0, 1).to(arena.dtype)


def test_rejects_zero_slots():
    with pytest.raises(ValueError, match="num_slots must be >= 1"):
        PageArena(num_slots=0, num_kv_heads=1, page_size=4, head_dim=8, dtype=torch.float32, device="cpu")


def test_allocate_is_ascending_and_contiguous(arena):
    assert arena.allocate(3) == [0, 1, 2]
    assert arena.allocate(2) == [3, 4]
    assert arena.num_used == 5
    assert all(arena.refcount(s) == 1 for s in range(5))
    assert all(arena.refcount(s) == 0 for s in range(5, NUM_SLOTS))


def test_capacity_miss_returns_none_and_takes_nothing(arena):
    arena.allocate(NUM_SLOTS - 2)
    assert arena.allocate(3) is None
    assert arena.num_used == NUM_SLOTS - 2
    assert arena.allocate(2) == [NUM_SLOTS - 2, NUM_SLOTS - 1]
    assert arena.allocate(1) is None
    assert arena.num_used == NUM_SLOTS


def test_refcounts_incref_and_free(arena):
    slots = arena.allocate(3)
    arena.incref([slots[1]])
    arena.incref([slots[1]])
    assert arena.refcount(slots[1]) == 3
    arena.free(slots)
    assert [arena.refcount(s) for s in slots] == [0, 2, 0]
    assert arena.num_used == 1
    arena.free([slots[1], slots[1]])
    assert arena.refcount(slots[1]) == 0 and arena.num_used == 0


def test_double_free_asserts(arena):
    slots = arena.allocate(2)
    arena.free(slots)
    with pytest.raises(AssertionError, match="double free of slot 0"):
        arena.free([slots[0]])


def test_incref_of_free_slot_asserts(arena):
    with pytest.raises(AssertionError, match="incref of free slot 3"):
        arena.incref([3])


def test_freed_slots_are_reused_lowest_first(arena):
    arena.allocate(NUM_SLOTS)
    arena.free([6, 2, 4])
    assert arena.allocate(1) == [2]
    arena.free([0])
    assert arena.allocate(3) == [0, 4, 6]
    assert arena.allocate(1) is None


def test_allocate_shuffled_gives_distinct_unsorted_slots(arena):
    gen = torch.Generator().manual_seed(3)
    slots = arena.allocate_shuffled(NUM_SLOTS - 1, gen)
    assert len(set(slots)) == len(slots) == NUM_SLOTS - 1
    assert slots != sorted(slots)
    assert all(arena.refcount(s) == 1 for s in slots)
    (rest,) = set(range(NUM_SLOTS)) - set(slots)
    assert arena.allocate_shuffled(2, gen) is None and arena.num_used == NUM_SLOTS - 1
    assert arena.allocate(1) == [rest]
    arena.free(slots)
    assert arena.allocate(2) == sorted(slots)[:2]  # the heap survives the shuffle


def test_contiguous_run_round_trips_as_a_view(arena):
    slots = arena.allocate(3)
    k, v = _fill(arena, slots, 3 * PAGE_SIZE)
    rk, rv = arena.read(slots, 3 * PAGE_SIZE)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    assert rk.untyped_storage().data_ptr() == arena.k.untyped_storage().data_ptr()
    assert rv.untyped_storage().data_ptr() == arena.v.untyped_storage().data_ptr()
    assert rk.data_ptr() == arena.k[:, slots[0]].data_ptr()
    arena.k[1, slots[1], 2, 5] = 7.0  # written through the arena, seen by the view
    assert rk[1, PAGE_SIZE + 2, 5].item() == 7.0


def test_non_contiguous_run_round_trips_as_a_copy(arena):
    arena.allocate(NUM_SLOTS)
    arena.free([1, 3, 4, 7])
    slots = [7, 1, 4]  # out of order and with a gap
    k, v = _fill(arena, slots, 3 * PAGE_SIZE)
    rk, rv = arena.read(slots, 3 * PAGE_SIZE)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    assert rk.untyped_storage().data_ptr() != arena.k.untyped_storage().data_ptr()
    arena.k[:, 7].zero_()  # the gathered copy does not follow the arena
    assert torch.equal(rk, k)


@pytest.mark.parametrize("num_tokens", [1, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1, 3 * PAGE_SIZE - 1])
@pytest.mark.parametrize("contiguous", [True, False])
def test_read_trims_to_num_tokens(num_tokens, contiguous):
    arena = PageArena(num_slots=NUM_SLOTS, num_kv_heads=NUM_KV_HEADS, page_size=PAGE_SIZE,
                        head_dim=HEAD_DIM, dtype=torch.float32, device="cpu")
    slots = [2, 3, 4] if contiguous else [5, 0, 8]
    k, v = _fill(arena, slots, num_tokens)
    rk, rv = arena.read(slots, num_tokens)
    assert rk.shape == rv.shape == (NUM_KV_HEADS, num_tokens, HEAD_DIM)
    assert torch.equal(rk, k) and torch.equal(rv, v)


def test_write_casts_to_arena_dtype():
    arena = PageArena(num_slots=2, num_kv_heads=1, page_size=2, head_dim=4, dtype=torch.float16,
                        device="cpu")
    k = torch.randn(2, 1, 4, dtype=torch.float64)
    arena.write(torch.tensor([1, 1]), torch.tensor([0, 1]), k, k)
    rk, _ = arena.read([1], 2)
    assert rk.dtype == torch.float16
    assert torch.equal(rk, k.transpose(0, 1).half())


def test_copy_slot(arena):
    slots = arena.allocate(3)
    k, v = _fill(arena, slots[:1], PAGE_SIZE)
    other_k, other_v = _fill(arena, [slots[2]], PAGE_SIZE)
    arena.copy_slot(slots[0], slots[1])
    rk, rv = arena.read([slots[1]], PAGE_SIZE)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    rk0, rv0 = arena.read([slots[0]], PAGE_SIZE)
    assert torch.equal(rk0, k) and torch.equal(rv0, v)  # the source is untouched
    rk2, rv2 = arena.read([slots[2]], PAGE_SIZE)
    assert torch.equal(rk2, other_k) and torch.equal(rv2, other_v)


def test_slot_bytes_and_peak_used_bytes(arena):
    elem = torch.empty((), dtype=arena.dtype).element_size()
    assert arena.slot_bytes == 2 * NUM_KV_HEADS * PAGE_SIZE * HEAD_DIM * elem
    assert arena.peak_used_bytes == 0
    a = arena.allocate(4)
    arena.free(a[:3])
    arena.allocate(2)
    assert arena.num_used == 3
    assert arena.peak_used_bytes == 4 * arena.slot_bytes
    arena.allocate_shuffled(3, torch.Generator().manual_seed(0))
    assert arena.peak_used_bytes == 6 * arena.slot_bytes
    assert arena.allocate(10) is None
    assert arena.peak_used_bytes == 6 * arena.slot_bytes
