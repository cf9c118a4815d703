"""The one table of tolerances (atol, rtol) used by the tests.

Data movement is exact. Compute tolerances follow the dtype; long reductions in 16-bit
types get the looser entry.
"""
import torch

EXACT = (0.0, 0.0)
TOL = {
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-3, 1.6e-2),
}
LONG_REDUCTION_16BIT = (1e-2, 1e-2)
# Logits of a whole model run against transformers in fp32 (acceptance criterion b).
MODEL_LOGITS_FP32_ATOL = 1e-3

# Attention kernels (Triton, Numba) against their references: (atol, rtol) by input dtype.
# Outputs accumulate in fp32; 16-bit inputs are rounded once on the way in, so the relative
# tolerance is the input type's: fp32 1e-5, fp16 1e-3, bf16 1.6e-2 (2**-6, bf16's half-ulp
# is 2**-8 and scores sum up to 256 products). Reductions over more than 1024 keys in 16-bit
# types use KERNEL_TOL_LONG (the order of summation differs between kernel and reference).
KERNEL_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
KERNEL_TOL_LONG = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# log-sum-exp values are compared with an absolute tolerance (they are logs).
LSE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
# 4-bit pages: dequantized values lie within half a quantization step of the input, where a
# step is (max - min) / 15 of the group (plus fp16 rounding of scale and min).
QUANT4_STEP_FRACTION = 0.5 + 1e-2


def kernel_tol(dtype: torch.dtype, num_keys: int = 0) -> tuple[float, float]:
    """(atol, rtol) for a kernel output over ``num_keys`` keys in ``dtype``."""
    return (KERNEL_TOL_LONG if num_keys > 1024 else KERNEL_TOL)[dtype]
