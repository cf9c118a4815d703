#!/usr/bin/env bash
# GPU check: exercises every CUDA path that has landed, most important first, and writes
# everything to one log ($OUT/gpu_check.log on the device machine, bench/out/ elsewhere).
# Runs on a CPU-only machine too (CUDA parts skip), so it is tested there. Finishes in under
# 8 minutes on one H100 (each step has its own timeout).
# Usage: bash bench/gpu_check.sh [--full]   (PYTHON defaults to python3; PYTHONPATH=. is set;
#        --full also runs the CPU test suite on that machine's Python at the end)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-bench/out}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Wheels carried in .whl/ (bench/gpu_wheels.sh: KvikIO for the kvikio disk backend).
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
has_cuda=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
{
  echo "== gpu_check $(date -u +%FT%TZ)"
  $PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"
  $PY -c "from storage import kvikio_status as s; print('kvikio disk backend:', s() or 'available')"

  echo "== 1. CUDA tests (pytest -m gpu: compiled Triton kernels against their references, engine exactness)"
  timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu -rs -s tests 2>&1 | grep -vE "Writing model shards|it/s\]" | tail -40

  echo "== 1b. sparse decode and 4-bit pages on CUDA (issues 18, 19): --random-weights llama-3.1-8b --num-layers 4, bf16, 32K tokens, global KV on DISK: exact vs --sparse quest and speculative at F=0.1 (Triton scoring) vs --kv-format 4bit (Triton quantize, DISK pages dequantized on read), 3 reps each"
  if [ "$has_cuda" = 1 ]; then
    stmp=$(mktemp -d)
    $PY -c "import random; random.seed(2); print(''.join(random.choice('abcdefghij ') for _ in range(32768)), end='')" > "$stmp/p.txt"
    for mode in exact quest speculative 4bit; do
      flags=""; [ "$mode" != exact ] && flags="--sparse $mode --sparse-budget 0.1"
      [ "$mode" = 4bit ] && flags="--kv-format 4bit"
      for rep in 1 2 3; do
        timeout 90 $PY -m offload generate --model llama-3.1-8b --random-weights --num-layers 4 --dtype bf16 \
          --prompt-file "$stmp/p.txt" --max-new-tokens 16 --ignore-eos --json --quiet --cache-dir "$stmp/cache" \
          --device-memory 64MiB --host-memory 0 $flags \
          | $PY -c "import json,sys; s=json.load(sys.stdin)['stats']; print('$mode rep $rep:', {k: s[k] for k in ('decode_tok_s','kv_fraction_read_max','kv_fraction_fetched','selection_s','fetch_wait_s','sync_miss_bytes_per_token','speculation_hit_rate','sparse_fallback','bytes_read_per_token')})"
      done
    done
  else
    echo "skipped: no CUDA"
  fi

  echo "== 1c. the sweep on CUDA (issue 22): offload bench, llama-3.1-8b shape, 32 layers, bf16, synthetic KV (random K/V written, no prefill), 32K and 128K tokens, exact / quest / speculative / 4bit, pages all on DEVICE and all on DISK; results.json and report.md in \$OUT/sweep (render the plots locally: offload bench --render)"
  if [ "$has_cuda" = 1 ]; then
    timeout 300 $PY -m offload bench --model llama-3.1-8b --random-weights --num-layers 32 --dtype bf16 \
      --synthetic-kv --contexts 32K,128K --allow-long-context --modes exact,quest,speculative,4bit --placements device,disk \
      --decode-tokens 8 --reps 3 --quiet --cache-dir "$(mktemp -d)" --out "$OUTDIR/sweep" 2>&1 | tail -30
    sed -n '/^## /,$p' "$OUTDIR/sweep/report.md" 2>/dev/null | head -60
  else
    echo "skipped: no CUDA"
  fi

  echo "== 1d. DocCache restore on CUDA (issue 21, Cake): llama-3.1-8b shape, 4 layers, bf16, a 32K-token document: every page loaded vs a forced 0.3 split (recomputed while the rest loads) vs the planner's split, measured against predicted (FLOP model at 50% of the profile's matmul rate), same answer tokens"
  if [ "$has_cuda" = 1 ]; then
    timeout 200 $PY bench/cake_restore.py --model llama-3.1-8b --random-weights --num-layers 4 --dtype bf16 \
      --tokens 32768 --prefill-chunk 1024 --device-memory 1GiB --host-memory 1GiB --reps 2 2>&1 \
      | grep -vE "Writing model shards|it/s\]" | tail -14
  else
    echo "skipped: no CUDA"
  fi

  echo "== 2. kernel benchmark (achieved GB/s against a device-memory reduction in the same run)"
  if [ "$has_cuda" = 1 ]; then
    timeout 90 $PY bench/bench_kernels.py --device cuda --repeat 5 --probe-mib 2048 --json-out "$OUTDIR/bench_kernels.json"
  else
    timeout 90 $PY bench/bench_kernels.py --device cpu --repeat 3 --probe-mib 256 --cpu-tokens 8192
  fi

  echo "== 3. decode/prefill on CUDA: --random-weights llama-3.1-8b --num-layers 4 --dtype bf16, 8K prompt"
  if [ "$has_cuda" = 1 ]; then
    tmp=$(mktemp -d)
    $PY -c "import random; random.seed(0); print(''.join(random.choice('abcdefghij ') for _ in range(8192)), end='')" > "$tmp/prompt.txt"
    for rep in 1 2 3; do
      timeout 60 $PY -m offload generate --model llama-3.1-8b --random-weights --num-layers 4 --dtype bf16 \
        --prompt-file "$tmp/prompt.txt" --max-new-tokens 32 --ignore-eos --json --quiet --cache-dir "$tmp/cache" \
        | $PY -c "import json,sys; s=json.load(sys.stdin)['stats']; print(f\"rep $rep: prefill {s['prefill_tokens']} tok at {s['prefill_tok_s']:.0f} tok/s, decode {s['decode_tok_s']:.1f} tok/s, KV on device {s['peak_bytes']['device']/2**20:.0f} MiB\")"
    done
  else
    echo "skipped: no CUDA"
  fi

  echo "== 4. tiers on CUDA: llama-3.1-8b shape, 4 layers, bf16, 32K-token prompt, --device-memory 256MiB --host-memory 1GiB"
  if [ "$has_cuda" = 1 ]; then
    $PY -c "import random; random.seed(1); print(''.join(random.choice('abcdefghij ') for _ in range(32768)), end='')" > "$tmp/p32k.txt"
    timeout 90 $PY -m offload generate --model llama-3.1-8b --random-weights --num-layers 4 --dtype bf16 \
      --prompt-file "$tmp/p32k.txt" --max-new-tokens 16 --ignore-eos --json --quiet --cache-dir "$tmp/cache" \
      --device-memory 256MiB --host-memory 1GiB \
      | $PY -c "import json,sys; s=json.load(sys.stdin)['stats']; print({k: s[k] for k in ('prefill_tok_s','decode_tok_s','peak_bytes','bytes_read_per_token','fetch_wait_s','compute_s','cold_reads')})"
  else
    echo "skipped: no CUDA"
  fi

  echo "== 4b. Gemma 3 on CUDA: --random-weights gemma3-270m, bf16, 32K-token prompt, rings on device, global layers spilled"
  if [ "$has_cuda" = 1 ]; then
    timeout 90 $PY -m offload generate --model gemma3-270m --random-weights --dtype bf16 \
      --prompt-file "$tmp/p32k.txt" --max-new-tokens 16 --ignore-eos --json --quiet --cache-dir "$tmp/cache" \
      --device-memory 64MiB --host-memory 128MiB \
      | $PY -c "import json,sys; s=json.load(sys.stdin)['stats']; print({k: s[k] for k in ('prefill_tok_s','decode_tok_s','peak_bytes','bytes_read_per_token_by_kind','kv_held_bytes_by_kind','cold_reads')})"
  else
    echo "skipped: no CUDA"
  fi

  echo "== 4c. offload bench on CUDA (issue 3 e): --random-weights llama-3.1-8b --num-layers 8, bf16, 32K tokens: all-DEVICE, pinned HOST, DISK, and a split with fetch-ahead on a side stream vs --no-overlap"
  if [ "$has_cuda" = 1 ]; then
    timeout 180 $PY -m offload bench --model llama-3.1-8b --random-weights --num-layers 8 --tokens 32768 \
      --decode-tokens 16 --reps 3 --quiet --cache-dir "$tmp/cache" --json-out "$OUTDIR/bench_cuda_32k.json" 2>&1 | tail -20
  else
    echo "skipped: no CUDA"
  fi

  echo "== 5. planner on this machine: offload profile --quick (CUDA copies, Triton attention, GEMV probes), then offload plan with it"
  ptmp=$(mktemp -d)
  timeout 60 $PY -m offload profile --quick --cache-dir "$ptmp" 2>&1 | tail -14
  timeout 30 $PY -m offload plan --model llama-3.1-8b --context 131072 --device-memory 24GiB --host-memory 64GiB \
    --cache-dir "$ptmp" --quiet --greedy 2>&1 | grep -E "Plan|device |host |disk |Predicted|bottleneck|Greedy"

  if [ "${1:-}" = "--full" ]; then
    echo "== 6. the CPU test suite on this machine's Python (portability; real-model tests skip without the packages)"
    timeout 240 $PY -m pytest -q -p no:cacheprovider -x tests 2>&1 | tail -5
  fi
  echo "== done"
} 2>&1 | tee "$LOG"
