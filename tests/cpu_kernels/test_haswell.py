"""The Numba kernels compiled for an AVX2-only CPU (Haswell) still run and agree with the numpy
references: nothing may require AVX-512 (this machine has it, the machines we target may not).

A subprocess compiles everything from scratch (fresh NUMBA_CACHE_DIR, so no cached AVX-512
code is reused) with NUMBA_CPU_NAME=haswell. NUMBA_CPU_FEATURES is set to "" as well: with a
CPU name alone Numba keeps the host's feature flags (AVX-512 included), while an empty list
means "the named CPU's own features". The subprocess reports its results as JSON (each
comparison uses tests/tolerances.py) and whether the attention kernel's machine code touches a
512-bit register.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tolerances import KERNEL_TOL, LSE_ATOL

ROOT = Path(__file__).resolve().parents[2]

# numpy only (no torch import) and one page dtype, to keep the from-scratch compile short.
SCRIPT = r"""
import json, sys
import numba
import numpy as np
import cpu_kernels as ck
from cpu_kernels import reference as ref
from cpu_kernels.attention import _attend_range_nb

ATOL, RTOL, LSE_ATOL = (float(x) for x in sys.argv[1:4])
gen = np.random.default_rng(0)
nkv, group, ps, hd, num_slots = 2, 3, 16, 64, 12
q = gen.standard_normal((nkv * group, hd)).astype(np.float32)
k = gen.standard_normal((nkv, num_slots, ps, hd)).astype(np.float32)
v = gen.standard_normal((nkv, num_slots, ps, hd)).astype(np.float32)
slots = np.stack([gen.permutation(num_slots)[:5] for _ in range(nkv)]).astype(np.int32)
lens = np.array([[16, 16, 16, 16, 9], [16, 3, 0, 0, 0]], np.int32)
res = {"cpu_name": numba.config.CPU_NAME, "features": numba.config.CPU_FEATURES}
out, lse = ck.attention_pages(q, k, v, slots, lens, scale=0.125, num_threads=2)
r_out, r_lse = ref.attention_pages_ref(q, k, v, slots, lens, scale=0.125)
res["attention_out"] = bool(np.allclose(out, r_out, atol=ATOL, rtol=RTOL))
res["attention_lse"] = bool(np.allclose(lse, r_lse, atol=LSE_ATOL, rtol=0))
k_min, k_max = k.min(axis=2), k.max(axis=2)
res["quest"] = bool(np.allclose(ck.quest_page_scores(q, k_min, k_max, slots[0]),
                               ref.quest_page_scores_ref(q, k_min, k_max, slots[0]),
                               atol=ATOL, rtol=RTOL))
qp = ck.quantize_pages_4bit(k, v)
rp = ref.quantize_pages_4bit_ref(k, v)
res["quant_equal"] = all(np.array_equal(getattr(qp, n), getattr(rp, n))
                         for n in ("k_q", "k_scale", "k_min", "v_q", "v_scale", "v_min"))
res["dequant_equal"] = all(np.array_equal(a, b) for a, b in zip(ck.dequantize_pages_4bit(qp),
                                                                ref.dequantize_pages_4bit_ref(rp)))
asm = "".join(_attend_range_nb.inspect_asm(sig) for sig in _attend_range_nb.signatures)
res["asm_ymm"] = "ymm" in asm
res["asm_zmm"] = "zmm" in asm
print("RESULT " + json.dumps(res))
"""


@pytest.mark.slow  # recompiles every Numba kernel in a fresh interpreter
def test_kernels_compiled_for_haswell(tmp_path):
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="",
               NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    tols = [*KERNEL_TOL[torch.float32], LSE_ATOL[torch.float32]]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, tols)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    assert res["cpu_name"] == "haswell" and res["features"] == ""
    checks = ["attention_out", "attention_lse", "quest", "quant_equal", "dequant_equal"]
    assert {c: res[c] for c in checks} == dict.fromkeys(checks, True)
    assert res["asm_ymm"] and not res["asm_zmm"]  # vectorized with AVX2, no AVX-512 register
