"""The records of a 4-bit DocCache: a packed page as its blob alone, so the DocCache keeps the
format's bytes, not an exact page's.

The DocStore holds records of one size per DocCache. A 4-bit DocCache's record is one packed
page's blob (``Quant4Layout.page_bytes``: SmolLM2 7680 bytes against 49152 for its exact fp32
page). Its pages, layer by layer and in page order::

    packed page   (a global layer's pages 1 .. packed_below - 1)   1 record: the blob
    exact page    (the sink page, the recent window and the tail;  cdiv(page bytes, record)
                   a sliding layer's ring)                          records: K then V, zero padded

Which pages are packed is the engine's rule for the document's length
(``PagedKV.packed_below``), so the records need no index: the save checks that the table
follows the rule, the restore derives the same offsets and expands a piece back into pages
of exact size with each blob at the start of its page's bytes, the form
``KVWriter.restore_pages`` takes. An exact DocCache's record is its page, as before.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from offload.kv.page_table import cdiv

if TYPE_CHECKING:
    from offload.engine import Engine

__all__ = ["CompactRecords", "compact_records", "packed_flags", "stored_bytes"]


@dataclasses.dataclass(frozen=True, slots=True)
class CompactRecords:
    """The record layout of a 4-bit DocCache (``record_bytes``: a blob; ``page_bytes``: an
    exact page's K and V)."""

    record_bytes: int
    page_bytes: int

    @property
    def exact_records(self) -> int:
        """Records an exact page fills."""
        return cdiv(self.page_bytes, self.record_bytes)

    def offsets(self, packed: list[bool]) -> np.ndarray:
        """[pages + 1] int64: the first record of each page (and the total at the end)."""
        sizes = np.where(np.asarray(packed, dtype=bool), 1, self.exact_records)
        return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def pack(self, pages: torch.Tensor, packed: list[bool]) -> np.ndarray:
        """Pages [n, page_bytes] uint8 (a packed page's blob at its start) -> the records'
        bytes [records * record_bytes] uint8."""
        offs = self.offsets(packed)
        out = np.zeros((int(offs[-1]), self.record_bytes), dtype=np.uint8)
        rows = pages.numpy()
        flat = out.reshape(-1)
        for i, is_packed in enumerate(packed):
            at = int(offs[i]) * self.record_bytes
            if is_packed:
                flat[at:at + self.record_bytes] = rows[i, :self.record_bytes]
            else:
                flat[at:at + self.page_bytes] = rows[i]
        return flat

    def expand(self, records: torch.Tensor, packed: list[bool]) -> torch.Tensor:
        """The records of consecutive pages (``packed``: theirs) -> pages [n, page_bytes]
        uint8, each blob at the start of its page (the rest zero)."""
        offs = self.offsets(packed)
        data = records.view(torch.uint8)[: int(offs[-1]) * self.record_bytes]
        if data.numel() != int(offs[-1]) * self.record_bytes:
            raise ValueError(f"{data.numel()} bytes of records for pages that fill {int(offs[-1])} records")
        rows = data.view(-1, self.record_bytes)
        out = torch.zeros(len(packed), self.page_bytes, dtype=torch.uint8)
        flags = torch.as_tensor(np.asarray(packed, dtype=bool))
        at = torch.from_numpy(offs[:-1])
        if bool(flags.any()):
            out[flags, :self.record_bytes] = rows[at[flags]]
        flat = data.view(-1)
        for i in torch.nonzero(~flags).flatten().tolist():
            start = int(offs[i]) * self.record_bytes
            out[i] = flat[start:start + self.page_bytes]
        return out


def compact_records(engine: "Engine", page_bytes: int) -> CompactRecords | None:
    """The engine's 4-bit record layout; None for exact pages (a record is a page)."""
    layout = engine.packed_layout
    if layout is None:
        return None
    return CompactRecords(record_bytes=layout.page_bytes, page_bytes=page_bytes)


def packed_flags(engine: "Engine", layer: int, first: int, pages: int, tokens: int) -> list[bool]:
    """Per stored page of ``layer`` (pages ``first .. first + pages - 1``), whether a
    ``tokens``-token document keeps it packed (``PagedKV.packed_below``)."""
    below = engine.kv.packed_below(layer, tokens)
    return [0 < p < below for p in range(first, first + pages)]


def stored_bytes(engine: "Engine", records: CompactRecords | None, tokens: int, page_bytes: int) -> int:
    """Bytes the DocCache of a ``tokens``-token document holds: every page of a global layer,
    a sliding layer's ring, as records."""
    ps = engine.config.page_size
    n = cdiv(tokens, ps)
    total = 0
    for layer, window in enumerate(engine.windows):
        first = 0 if window is None else max(0, tokens - window) // ps
        if records is None:
            total += (n - first) * page_bytes
        else:
            flags = packed_flags(engine, layer, first, n - first, tokens)
            total += int(records.offsets(flags)[-1]) * records.record_bytes
    return total
