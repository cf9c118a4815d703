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
