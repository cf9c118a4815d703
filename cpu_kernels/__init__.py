"""Numba kernels for attention over HOST pages (CPU delegation).

Built by the Kernels issue; the engine's CPU path uses ``gpu_kernels.reference`` until then.
"""

__all__: list[str] = []
