"""Attention kernels for pages on the device.

``reference`` holds the plain-torch version of every op; it is the spec the Triton kernels
(Kernels issue) are tested against, and the fallback the engine uses where Triton is absent.
"""
from gpu_kernels.reference import attention_partial_ref, merge_partials_ref

__all__ = ["attention_partial_ref", "merge_partials_ref"]
