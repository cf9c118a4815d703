"""Numba kernels for HOST pages (CPU delegation): attention returning ``(out, lse)``, page
scoring (Quest, InfiniGen-style) and 4-bit pages, each with a numpy reference in
``cpu_kernels.reference``. ``cpu_kernels.flash_torch`` holds torch's fused CPU attention.

Kernels compile on first use (``cache=True`` keeps them across processes).
"""
from cpu_kernels.attention import attention_contiguous_pages, attention_contiguous_pages_trusted, attention_pages
from cpu_kernels.quant4 import (
    Quant4PagesNp,
    dequantize_pages_4bit,
    quantize_pages_4bit,
    value_group_size,
)
from cpu_kernels.scoring import page_key_bounds, partial_key_page_scores, quest_page_scores, quest_page_scores_trusted

__all__ = [
    "Quant4PagesNp",
    "attention_contiguous_pages",
    "attention_contiguous_pages_trusted",
    "attention_pages",
    "dequantize_pages_4bit",
    "page_key_bounds",
    "partial_key_page_scores",
    "quantize_pages_4bit",
    "quest_page_scores",
    "value_group_size",
]
