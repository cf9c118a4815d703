"""The 4-bit DocCache's record layout: a packed page is one record (its blob), an exact page
the records its bytes fill; pages expand back to exact size with each blob at their start."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from offload.kv.doc_records import CompactRecords

R, PAGE = 96, 400  # an exact page fills 5 records (480 bytes, 80 of padding)


def _pages(packed: list[bool], seed: int = 0) -> torch.Tensor:
    """Pages [n, PAGE] uint8 as the engine hands them over: random bytes, a packed page's
    blob in its first R bytes and zeros after."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 256, size=(len(packed), PAGE), dtype=np.uint8)
    for i, p in enumerate(packed):
        if p:
            rows[i, R:] = 0
    return torch.from_numpy(rows)


def test_records_hold_each_blob_alone_and_each_exact_page_whole():
    rec = CompactRecords(record_bytes=R, page_bytes=PAGE)
    packed = [False, True, True, True, False, False]
    pages = _pages(packed)
    out = rec.pack(pages, packed)
    assert rec.exact_records == 5
    assert rec.offsets(packed).tolist() == [0, 5, 6, 7, 8, 13, 18]
    # Written out by hand: page 0 at record 0 (5 records), blobs at 5, 6, 7, pages 4 and 5 at 8 and 13.
    want = pages[0].numpy().tobytes() + bytes(80)
    want += b"".join(pages[i, :R].numpy().tobytes() for i in (1, 2, 3))
    want += b"".join(pages[i].numpy().tobytes() + bytes(80) for i in (4, 5))
    assert out.tobytes() == want
    assert torch.equal(rec.expand(torch.from_numpy(out.copy()), packed), pages)


@pytest.mark.parametrize("start,count", [(0, 6), (1, 3), (2, 4), (4, 2)])
def test_a_piece_of_consecutive_pages_expands_from_its_own_records(start, count):
    """A restore reads a layer in pieces: the records from a piece's first page's offset on
    expand to exactly its pages."""
    rec = CompactRecords(record_bytes=R, page_bytes=PAGE)
    packed = [False, True, True, True, False, False]
    pages = _pages(packed, seed=1)
    flat = rec.pack(pages, packed)
    offs = rec.offsets(packed)
    piece = flat[offs[start] * R: offs[start + count] * R]
    assert torch.equal(rec.expand(torch.from_numpy(piece.copy()), packed[start:start + count]),
                       pages[start:start + count])


def test_too_few_record_bytes_are_refused():
    rec = CompactRecords(record_bytes=R, page_bytes=PAGE)
    with pytest.raises(ValueError, match="bytes of records for pages that fill 6 records"):
        rec.expand(torch.zeros(5 * R, dtype=torch.uint8), [False, True])
