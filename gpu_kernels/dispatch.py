"""When a Triton kernel can run on given tensors, and when the torch reference must.

Triton compiles for CUDA tensors. Without a GPU it runs only in its interpreter
(``TRITON_INTERPRET=1``, read when a kernel is decorated), which takes CPU tensors; the
tests use that to check the kernels on a CPU machine. Everywhere else the launchers fall
back to the plain-torch reference of the same op (``gpu_kernels.reference``).
"""
from __future__ import annotations

import os

import torch

__all__ = ["interpreting", "use_triton"]


def interpreting() -> bool:
    """True when Triton kernels are interpreted (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when a Triton kernel can run on tensors living where ``t`` lives."""
    if t.is_cuda:
        return not interpreting()
    return t.device.type == "cpu" and interpreting()
