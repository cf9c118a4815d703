"""Soak: many questions against one ingested document in one process, with pages spilled to
DISK and DocCache hits mixed in; the process's resources are sampled as it goes.

    python bench/soak.py [--questions 200] [--every 20] [--max-new-tokens 8] [--quiet]

One ``LongDocQA`` (SmolLM2-135M by default) ingests a document under budgets that put most of
its KV on DISK (and some on HOST), then answers ``--questions`` questions in turn (a fixed list,
round robin). After every ``--every`` questions it samples the process and the cache dir, then
does one of two things, alternately:

- "same object": forget the Doc; ingest a second document (a DocCache "miss" the first time,
  then hits), ask it one question and forget it; ingest the document again (a "hit");
- "new object": close the LongDocQA and open a new one (as a later process would), which
  ingests the document from its DocCache ("hit").

A sample holds the RSS, the open file descriptors (``/proc/self/fd``), the threads, the
locked and pinned memory (``VmLck``, ``VmPin`` of ``/proc/self/status``; on CUDA also the
caching host allocator's pinned bytes), the files and bytes under the cache dir, and the KV
pages in use per tier. After a warm-up (``--warmup`` samples: one of each event), growth must
be bounded: RSS within ``--rss-bound-mib`` of the warm-up's highest, and fds, threads,
locked and pinned bytes, files, bytes and pages the same numbers as after the same kind of
event before. Every answer must also
equal the first answer to the same question. The exit status is 0 only then.

The cache dir is a new temporary one (``--cache-dir`` to choose), so that its files are the
soak's; the model is converted (once) into the usual model cache (``$OFFLOAD_CACHE`` or
``~/.cache/offload``) and read from there.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ESSAYS = ROOT.parent / "shared" / "data" / "haystack" / "paul_graham"
QUESTIONS = [
    "What is the essay about?",
    "Who is mentioned first in the essay?",
    "What does the author recommend?",
    "What is the main argument of the essay?",
    "Which companies are mentioned?",
    "What mistake does the author describe?",
    "What is the first sentence about?",
    "Who is the essay written for?",
]
SECOND_QUESTION = "What is this text about?"


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """The process and the cache dir after ``questions`` questions."""

    questions: int
    elapsed_s: float
    rss_bytes: int
    fds: int
    threads: int
    locked_kb: int  # VmLck
    pinned_kb: int  # VmPin
    cuda_pinned_bytes: int | None  # the CUDA caching host allocator's pinned bytes (None: no CUDA)
    files: int  # under the cache dir
    cache_bytes: int
    pages: tuple[int, int, int]  # KV pages in use: DEVICE, HOST, DISK
    event: str  # what was done after the sample


@dataclasses.dataclass(slots=True)
class SoakResult:
    samples: list[Sample]
    answers: int  # questions answered (the second document's included)
    differing: list[str]  # answers that differ from the first answer to the same question
    statuses: list[str]  # DocCache status of every ingest, in order


def documents() -> tuple[str, str]:
    """The soak's document (about 600 tokens) and a second, shorter one."""
    if ESSAYS.is_dir():
        text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(ESSAYS.glob("*.txt")))
    else:  # the shared essays are missing: plain generated text does as well for resources
        text = " ".join(f"Note {i}: the archive holds {i * 37 % 101} letters from {1900 + i % 90}." for i in range(900))
    return text[:2500], text[20000:21500]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cuda_pinned() -> int | None:
    import torch

    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    stats = torch.cuda.host_memory_stats()
    return int(stats.get("reserved_bytes.current", stats.get("allocated_bytes.current", 0)))


def _tree(root: Path) -> tuple[int, int]:
    files = nbytes = 0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                nbytes += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:  # removed while we walked
                continue
            files += 1
    return files, nbytes


def sample(qa, cache: Path, questions: int, t0: float) -> Sample:
    from storage import Tier

    files, nbytes = _tree(cache)
    kv = qa.engine.kv
    disk_used = kv.disk_slots_limit - kv.free_slots(Tier.DISK) if kv.disk_slots_limit is not None else 0
    pages = (kv.arena.num_used, kv.host_arena.num_used if kv.host_arena is not None else 0, disk_used)
    return Sample(questions=questions, elapsed_s=time.perf_counter() - t0, rss_bytes=_status_kb("VmRSS") * 1024,
                  fds=len(os.listdir("/proc/self/fd")), threads=_status_kb("Threads"), locked_kb=_status_kb("VmLck"), pinned_kb=_status_kb("VmPin"),
                  cuda_pinned_bytes=_cuda_pinned(), files=files, cache_bytes=nbytes, pages=pages, event="")


def make_qa(model: str, cache: Path, *, device: str | None, device_memory: str, host_memory: str,
            disk_space: str):
    from offload import LongDocQA, RuntimeConfig
    from offload.config import parse_size
    from offload.tuning.profile_store import DEFAULT_PRESETS
    from planner.profile import HardwareProfile

    import torch

    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # A preset profile: measuring one would only add time, and files under the cache dir.
    config = RuntimeConfig(device=device, device_memory_bytes=parse_size(device_memory),
                           host_memory_bytes=parse_size(host_memory), disk_space_bytes=parse_size(disk_space),
                           profile=HardwareProfile.preset(DEFAULT_PRESETS[kind.split(":")[0]]))
    return LongDocQA(model, config=config, cache_dir=cache)


class _Run:
    """One soak's LongDocQA, its Doc and what it has recorded."""

    def __init__(self, make: Callable[[], Any], max_new_tokens: int) -> None:
        self.make = make
        self.max_new_tokens = max_new_tokens
        self.result = SoakResult(samples=[], answers=0, differing=[], statuses=[])
        self.first: dict[str, list[int]] = {}  # the first answer to each question
        self.doc_text, self.second_text = documents()
        self.qa = make()
        self.doc = self.ingest(self.doc_text)

    def ingest(self, text: str) -> Any:
        doc = self.qa.ingest(text)
        self.result.statuses.append(doc.stats.doc_cache)
        return doc

    def ask(self, doc: Any, question: str, key: str) -> None:
        ids = self.qa.ask(doc, question, max_new_tokens=self.max_new_tokens).token_ids
        self.result.answers += 1
        if self.first.setdefault(key, ids) != ids:
            self.result.differing.append(f"{key!r} after {self.result.answers} answers: {ids} != {self.first[key]}")

    def same_object(self) -> str:
        """Forget the Doc; the second document asked once and forgotten; the document again."""
        self.qa.forget(self.doc)
        second = self.ingest(self.second_text)
        self.ask(second, SECOND_QUESTION, "second document")
        self.qa.forget(second)
        del second  # a Doc holds its engine: kept, it would keep a closed object's memory
        self.doc = self.ingest(self.doc_text)
        return f"same object: 2nd doc, re-ingest ({'/'.join(self.result.statuses[-2:])})"

    def new_object(self) -> str:
        """Close the LongDocQA, drop it (as a later process would start afresh), open another."""
        self.qa.close()
        self.qa = self.doc = None
        self.qa = self.make()
        self.doc = self.ingest(self.doc_text)
        return f"new object: ingest ({self.result.statuses[-1]})"

    def close(self) -> None:
        if self.qa is not None:
            self.qa.close()


def soak(model: str, cache: Path, *, questions: int, every: int, max_new_tokens: int = 8,
         device: str | None = None, device_memory: str = "24MiB", host_memory: str = "24MiB",
         disk_space: str = "512MiB", on_answer: Callable[[int], None] | None = None,
         on_sample: Callable[[Sample], None] | None = None) -> SoakResult:
    """Runs the soak (see the module docstring) in this process and returns its samples."""
    from storage import Tier

    run = _Run(functools.partial(make_qa, model, cache, device=device, device_memory=device_memory,
                                 host_memory=host_memory, disk_space=disk_space), max_new_tokens)
    try:
        layers = range(run.qa.engine.model_config.num_layers)
        if not any(Tier.DISK in run.doc._seq.table.tiers(layer) for layer in layers):
            raise SystemExit("the document's KV did not reach DISK; lower --device-memory and --host-memory")
        t0 = time.perf_counter()
        for i in range(questions):
            question = QUESTIONS[i % len(QUESTIONS)]
            run.ask(run.doc, question, question)
            if on_answer is not None:
                on_answer(i + 1)
            if (i + 1) % every:
                continue
            s = sample(run.qa, cache, i + 1, t0)
            event = run.same_object() if (i + 1) // every % 2 else run.new_object()
            run.result.samples.append(dataclasses.replace(s, event=event))
            if on_sample is not None:
                on_sample(run.result.samples[-1])
    finally:
        run.close()
    return run.result


EXACT_FIELDS = ("fds", "threads", "locked_kb", "pinned_kb", "cuda_pinned_bytes", "files", "cache_bytes", "pages")
"""Figures that must come back to the same numbers (RSS only within a bound)."""


def rss_growth(result: SoakResult, warmup: int) -> int:
    """Highest RSS of a sample after the warm-up minus the highest of the warm-up (bytes)."""
    return (max(s.rss_bytes for s in result.samples[warmup:])
            - max(s.rss_bytes for s in result.samples[:warmup]))


def problems(result: SoakResult, *, warmup: int, rss_bound_mib: float) -> list[str]:
    """What is unbounded or wrong after the first ``warmup`` (>= 3) samples (empty: none).

    The events alternate, and what the cache dir holds depends on the last one (the DISK
    tier's files keep the size the second document gave them until a new object starts
    afresh), so each sample after the warm-up is compared with the one two before it, after
    the same kind of event: every figure but the RSS must be equal. The first sample comes
    before any event, hence a warm-up of at least 3. The RSS may exceed the warm-up's highest
    by at most ``rss_bound_mib``."""
    if warmup < 3:
        raise ValueError(f"warmup must be >= 3 samples (the first, then one after each kind of event), got {warmup}")
    out = [f"an answer changed: {d}" for d in result.differing]
    if result.statuses.count("miss") != 2 or set(result.statuses) - {"miss", "hit"}:
        out.append(f"DocCache statuses: {result.statuses}; want one miss for each document, then hits only")
    samples = result.samples
    if len(samples) <= warmup:
        return out + [f"only {len(samples)} samples: fewer than the warm-up's {warmup} plus one"]
    growth = rss_growth(result, warmup)
    if growth > rss_bound_mib * 2**20:
        out.append(f"RSS grew {growth / 2**20:.1f} MiB past the warm-up's highest (bound {rss_bound_mib} MiB)")
    for k in range(warmup, len(samples)):
        for field in EXACT_FIELDS:
            now, then = getattr(samples[k], field), getattr(samples[k - 2], field)
            if now != then:
                out.append(f"{field} after {samples[k].questions} questions is {now}, after "
                           f"{samples[k - 2].questions} (the same event before it) {then}")
    return out


def table(samples: list[Sample]) -> str:
    head = (f"{'questions':>9} {'time s':>7} {'RSS MiB':>8} {'fds':>4} {'threads':>7} {'VmLck kB':>8} {'VmPin kB':>8} "
            f"{'CUDA pinned MiB':>15} {'files':>5} {'cache MiB':>9} {'pages D/H/K':>14}  then")
    rows = [head]
    for s in samples:
        pinned = "-" if s.cuda_pinned_bytes is None else f"{s.cuda_pinned_bytes / 2**20:.1f}"
        pages = "/".join(map(str, s.pages))
        rows.append(f"{s.questions:>9} {s.elapsed_s:>7.1f} {s.rss_bytes / 2**20:>8.1f} {s.fds:>4} {s.threads:>7} {s.locked_kb:>8} "
                    f"{s.pinned_kb:>8} {pinned:>15} {s.files:>5} {s.cache_bytes / 2**20:>9.2f} {pages:>14}  {s.event}")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Soak: many questions against one document spilled to DISK, with "
                                "DocCache hits; resources sampled as it goes (see the module docstring).")
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--every", type=int, default=20, help="questions between samples (and DocCache events)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: a new temporary directory")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--device-memory", default="24MiB")
    p.add_argument("--host-memory", default="24MiB")
    p.add_argument("--disk-space", default="512MiB")
    p.add_argument("--warmup", type=int, default=3,
                   help="samples before growth is judged (>= 3: the first, then one after each kind of event)")
    p.add_argument("--rss-bound-mib", type=float, default=32.0)
    p.add_argument("--quiet", action="store_true", help="no progress: only the table and the verdict")
    return p


def report(result: SoakResult, args: argparse.Namespace) -> int:
    """Prints the figures and the verdict; 0 when bounded, else 1."""
    print(f"soak: {args.questions} questions on {args.model}, {args.max_new_tokens} new tokens each, a sample "
          f"every {args.every} (budgets: DEVICE {args.device_memory}, HOST {args.host_memory}, DISK "
          f"{args.disk_space}); {result.answers} answers; DocCache statuses: {' '.join(result.statuses)}")
    print(table(result.samples))
    found = problems(result, warmup=args.warmup, rss_bound_mib=args.rss_bound_mib)
    for line in found:
        print(f"FAILED: {line}")
    if not found:
        base, growth = result.samples[args.warmup - 1], rss_growth(result, args.warmup)
        print(f"bounded: after the warm-up ({base.questions} questions) the RSS stayed within "
              f"{growth / 2**20:+.1f} MiB of the warm-up's highest (bound {args.rss_bound_mib} MiB); fds, threads, "
              "locked and pinned bytes, files, bytes and pages came back to the same numbers after each kind of "
              "event; every answer equal to the first answer to its question")
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.questions < 1 or args.every < 1 or args.warmup < 3 or args.questions // args.every <= args.warmup:
        p.error(f"--questions {args.questions} with --every {args.every} gives {args.questions // args.every} "
                f"samples; more than --warmup ({args.warmup}, itself at least 3) are needed")

    from offload.model.model_source import default_cache_dir, resolve_model

    source = resolve_model(args.model, cache_dir=default_cache_dir(), show_progress=not args.quiet)
    model = str(source.weights_dir) if source.weights_dir is not None else args.model
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=args.questions, desc="soak", unit="question", dynamic_ncols=True)
        print(table([]), flush=True)

    def on_sample(s: Sample) -> None:
        if bar is not None:
            bar.write(table([s]).splitlines()[1])

    with tempfile.TemporaryDirectory(prefix="offload-soak-") as tmp:
        result = soak(model, args.cache_dir or Path(tmp), questions=args.questions, every=args.every,
                      max_new_tokens=args.max_new_tokens, device=args.device, device_memory=args.device_memory,
                      host_memory=args.host_memory, disk_space=args.disk_space,
                      on_answer=(lambda _: bar.update(1)) if bar is not None else None, on_sample=on_sample)
    if bar is not None:
        bar.close()
    return report(result, args)


if __name__ == "__main__":
    sys.exit(main())
