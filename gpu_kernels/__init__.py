"""Attention kernels for pages on the device (Triton), each with a plain-torch reference.

One op per module, each a ``_<op>_kernel`` plus a typed launcher that falls back to its
reference where Triton cannot run (``dispatch.use_triton``):

- ``paged_attention``: paged decode attention (GQA, split-KV, sliding window) and its sparse
  variant over selected pages, returning ``(out, lse)``;
- ``merge``: log-sum-exp merge of any number of partials;
- ``scoring``: Quest page bounds and InfiniGen-style partial-key page scores;
- ``quant4``: 4-bit pages (keys per channel, values per token group) and
  ``paged_attention_4bit``: decode attention that dequantizes inside the kernel.

``reference`` holds the plain-torch version of every op: the spec the kernels are tested
against and the CPU fallback. Kernel modules import triton, so they are imported on use.
"""
from gpu_kernels.reference import attention_partial_ref, merge_partials_ref

__all__ = ["attention_partial_ref", "merge_partials_ref"]
