#!/usr/bin/env bash
# Downloads the wheels the GPU machine lacks (NVIDIA KvikIO for the kvikio disk backend) into
# .whl/ (git-ignored), for Python 3.12 and CUDA 13 as on the lent H200 machines. The device
# call then carries .whl and bench/gpu_check.sh installs them into /tmp/site before testing.
# Usage: bash bench/gpu_wheels.sh [cu13|cu12]
set -eu
cd "$(dirname "$0")/.."
cuda=${1:-cu13}
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "kvikio-$cuda==26.10.*" "libkvikio-$cuda==26.10.*" "rapids-logger==0.3.*"
ls -la .whl
