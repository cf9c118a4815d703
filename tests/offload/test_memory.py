"""Layer-wise prefill never materialises all layers' KV: peak RSS growth from a 2K to an 8K
prompt stays far below the extra all-layer KV it would take (the pages live in the arena,
which is touched before measuring)."""
from __future__ import annotations

import os
import subprocess

import pytest
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import resource, sys, torch
from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.model.model_config import ModelConfig
from offload.model.model_source import ModelSource
torch.set_num_threads(2)
cfg = ModelConfig(arch="llama", vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=16,
                  num_heads=4, num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e4,
                  max_position_embeddings=16384, tie_word_embeddings=True)
eng = Engine(ModelSource("mem", cfg, None, None), RuntimeConfig(device="cpu", device_memory_bytes=320 * 2**20))
eng.arena.k.zero_(); eng.arena.v.zero_()  # the arena counts in RSS from the start
seq = eng.new_sequence(); eng.forward(seq, list(range(300))); eng.release(seq)  # warm-up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = int(sys.argv[1])
seq = eng.new_sequence(); eng.forward(seq, [i % 1000 for i in range(n)])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, eng.kv_bytes_per_token)
"""


def _growth(n: int) -> tuple[int, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(n)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    growth, per_token = map(int, r.stdout.split())
    return growth, per_token


@pytest.mark.slow  # two subprocess prefills of 2K and 8K tokens
def test_prefill_peak_memory_does_not_grow_with_all_layers_kv():
    g2, per_token = _growth(2048)
    g8, _ = _growth(8192)
    all_layers_kv = (8192 - 2048) * per_token  # 192 MiB for this shape
    print(f"peak RSS growth: 2K {g2 / 2**20:.1f} MiB, 8K {g8 / 2**20:.1f} MiB; "
          f"extra all-layer KV would be {all_layers_kv / 2**20:.0f} MiB")
    assert g8 - g2 < 0.25 * all_layers_kv
