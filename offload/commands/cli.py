"""The ``offload`` command line: ``ingest``, ``ask``, ``generate``, ``cache``, ``bench``, ``profile``, ``plan``.

Errors the user can fix print one line ``offload: error: ...`` on stderr and exit with
status 2, without a traceback. Ctrl-C (SIGINT, status 130) and SIGTERM (status 143) end a run
cleanly: its DISK-tier files are removed (``offload.commands.signals``).

``ingest``, ``ask`` and ``generate`` build their engine through ``LongDocQA``: with budgets that
may spill (``--device-memory``, ``--disk-space``) and no hardware profile saved under the cache
dir, it measures one first (a few seconds, once per machine; ``offload.tuning.profile.profile_for``)
and says so in one line on stderr, also with ``--quiet`` (which hides only the step lines).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from offload.commands.args import (OneLineParser, check_generation_flags, flag_error, read_text, size_flag,
                                   sparse_fields)
from offload.config import (KV_FORMATS, RECOMPUTE_MODES, SPARSE_MODES, RuntimeConfig, check_restore_recompute,
                            parse_dtype)
from offload.commands.signals import TERMINATED_STATUS, Terminated, sigterm_raises
from offload.errors import InputError, OffloadError, StorageIOError
from offload.sampling import SamplingConfig

__all__ = ["main", "build_parser", "runtime_config_from_args"]

logger = logging.getLogger(__name__)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and runtime")
    g.add_argument("--model", default="smollm2-135m",
                   help="model name (smollm2-135m, gemma3-270m; shapes llama-3.1-8b, qwen2.5-7b, ... with "
                        "--random-weights), a .gguf file or a checkpoint directory")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="where converted models live (default $OFFLOAD_CACHE or ~/.cache/offload)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    g.add_argument("--dtype", default=None, help="compute dtype: fp32, bf16, fp16 (default fp32 on CPU, bf16 on CUDA)")
    g.add_argument("--kv-dtype", default=None, help="KV page dtype (default: the compute dtype)")
    g.add_argument("--device-memory", default=None,
                   help="budget of the DEVICE KV arena, e.g. 512MiB (default: half the available RAM on CPU; "
                        "the full context, at most half the free memory, on CUDA)")
    g.add_argument("--host-memory", default=None,
                   help="budget of the HOST tier (its pages and the DISK staging area), e.g. 64MiB (default 0)")
    g.add_argument("--disk-space", default=None,
                   help="budget of the DISK tier, e.g. 20GiB; 0 disables it (default: half the free "
                        "space when --device-memory is given, else no disk tier)")
    g.add_argument("--disk-backend", choices=("auto", "posix", "kvikio"), default="auto",
                   help="file I/O of the DISK tier and DocCaches: kvikio (NVIDIA KvikIO, needs CUDA and "
                        "the kvikio package) or posix (a thread pool); auto = kvikio where it can run")
    g.add_argument("--page-size", type=int, default=32, help="tokens per KV page (default 32)")
    g.add_argument("--prefill-chunk", type=int, default=None,
                   help="tokens per prefill chunk (default 4096 on a CPU, 1024 on CUDA)")
    g.add_argument("--random-weights", action="store_true", help="random weights of the model's shape (throughput runs)")
    g.add_argument("--num-layers", type=int, default=None, help="with --random-weights: use only this many layers")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling and random weights")
    g.add_argument("--sparse", choices=SPARSE_MODES, default=None,
                   help="which pages a decode step attends: exact (all, the default), quest (the pages whose "
                        "key bounds score highest against the query, within --sparse-budget) or speculative "
                        "(quest's pages, predicted and read one layer ahead)")
    g.add_argument("--sparse-budget", type=float, default=None, metavar="F",
                   help="with --sparse: the share of exact attention's K/V bytes a decode step may read, "
                        "in (0, 1] (default 0.1)")
    g.add_argument("--sparse-cache", default=None, metavar="SIZE",
                   help="with --sparse: memory that keeps the DISK pages a decode step read for the next steps "
                        "(e.g. 64MiB; a step's pages change little: later steps read them from memory; "
                        "CPU, exact pages; default 0: none)")
    g.add_argument("--kv-format", choices=KV_FORMATS, default="exact",
                   help="how pages out of the recent window are stored: exact (the default) or 4bit (4-bit codes "
                        "with per-group scales, about a sixth of fp32's bytes wherever they live; the sink page, "
                        "the last 2 full pages and the tail stay exact on DEVICE)")
    g.add_argument("--recompute", choices=RECOMPUTE_MODES, default="none",
                   help="none (default); kvpr: a share of the HOST pages keeps the layer's input, K/V recomputed "
                        "when read (MHA models); auto: kvpr where the model allows it; lowrank: not executed yet")
    g.add_argument("--allow-long-context", action="store_true",
                   help="allow prompts longer than the model's context window")
    o = p.add_argument_group("generation and output")
    o.add_argument("--max-new-tokens", type=int, default=128)
    o.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    o.add_argument("--top-p", type=float, default=1.0)
    o.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    o.add_argument("--verbose", "-v", action="store_true", help="log setup details")


def _add_doc_cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DocCache (documents' KV kept on disk between runs)")
    g.add_argument("--cache-limit", default=None,
                   help="bound of the DocCache store, e.g. 20GiB; least recently used DocCaches are evicted "
                        "(default: a quarter of the free disk space plus what the store holds)")
    g.add_argument("--no-rebuild", action="store_true",
                   help="fail with an error instead of rebuilding a DocCache that fails verification")
    g.add_argument("--no-doc-cache", action="store_true", help="neither reuse nor save the document's KV")
    g.add_argument("--restore-recompute", type=float, default=None, metavar="FRACTION",
                   help="on a DocCache hit, recompute this share of the document from its tokens while the rest "
                        "loads (Cake), in [0, 1): 0 loads every page; default: the planner's split (load only "
                        "where recompute does not pay, as on a CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="offload", description="Tiered KV-cache offloading runtime for long-context LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    ingest = sub.add_parser("ingest", help="prefill a document once and keep its KV as a DocCache; prints its id")
    ingest.add_argument("doc", type=Path, help="text file with the document (- reads standard input)")
    _add_model_args(ingest)
    _add_doc_cache_args(ingest)
    ask = sub.add_parser("ask", help="answer a question about a document (chat template or completion prompt)")
    ask.add_argument("--doc", type=Path, required=True, help="text file with the document (- reads standard input)")
    ask.add_argument("--question", required=True)
    _add_model_args(ask)
    _add_doc_cache_args(ask)
    gen = sub.add_parser("generate", help="continue raw text (no template)")
    gen.add_argument("--prompt-file", type=Path, required=True, help="text file with the prompt (- reads standard input)")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    _add_model_args(gen)
    sub.add_parser("bench", help="prefill/decode of every placement beside the HF peers (offload bench --help)")
    sub.add_parser("profile", help="measure this machine's hardware profile for the planner (offload profile --help)")
    sub.add_parser("plan", help="plan where a model's KV cache lives, without running it (offload plan --help)")
    sub.add_parser("cache", help="list, verify, remove or clean up DocCaches (offload cache --help)")
    return parser


# RuntimeConfig's fields as the flags that set them, for the messages of its checks.
_FLAGS = {"device_memory_bytes": "--device-memory", "host_memory_bytes": "--host-memory",
          "disk_space_bytes": "--disk-space", "page_size": "--page-size", "prefill_chunk_tokens": "--prefill-chunk",
          "disk_backend": "--disk-backend", "kv_dtype": "--kv-dtype", "dtype": "--dtype", "device": "--device",
          "sparse_budget": "--sparse-budget", "sparse": "--sparse", "sparse_cache_bytes": "--sparse-cache",
          "kv_format": "--kv-format", "recompute": "--recompute", "restore_recompute": "--restore-recompute"}


def runtime_config_from_args(args: argparse.Namespace) -> RuntimeConfig:
    """The one mapping of CLI options to a RuntimeConfig.

    Raises:
        InputError: a bad value, named by its flag (not by the config field it sets).
    """
    try:
        return RuntimeConfig(
            device=args.device,
            dtype=parse_dtype(args.dtype) if args.dtype else None,
            kv_dtype=parse_dtype(args.kv_dtype) if args.kv_dtype else None,
            device_memory_bytes=size_flag("--device-memory", args.device_memory, minimum=1),
            host_memory_bytes=size_flag("--host-memory", args.host_memory),
            disk_space_bytes=size_flag("--disk-space", args.disk_space),
            page_size=args.page_size,
            prefill_chunk_tokens=args.prefill_chunk,
            seed=args.seed,
            disk_backend=args.disk_backend,
            kv_format=args.kv_format,
            recompute=args.recompute,
            restore_recompute=getattr(args, "restore_recompute", None),
            **sparse_fields(args),
        )
    except InputError as e:
        raise flag_error(e, _FLAGS) from None


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model, run before one loads (a mistake costs no wait).

    Raises:
        InputError: naming the flag and the fix.
    """
    check_generation_flags(args)
    sparse_fields(args)
    if args.command == "ask" and not args.question.strip():
        raise InputError("--question is empty; ask something about the document")
    if args.command in ("ask", "ingest"):
        size_flag("--cache-limit", args.cache_limit, minimum=1)
        check_restore_recompute(args.restore_recompute, "--restore-recompute")
    if args.recompute == "lowrank":
        raise InputError("--recompute lowrank is not executed by the engine yet; use none, kvpr or auto")


def _run(args: argparse.Namespace) -> int:
    check_args(args)
    config = runtime_config_from_args(args)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    text = (read_text(args.doc, "document", "--doc" if args.command == "ask" else "the document argument")
            if args.command in ("ask", "ingest") else read_text(args.prompt_file, "prompt file", "--prompt-file"))
    doc_cache = {}
    if args.command in ("ask", "ingest"):
        doc_cache = dict(doc_cache=not args.no_doc_cache, rebuild=not args.no_rebuild,
                         cache_limit_bytes=size_flag("--cache-limit", args.cache_limit, minimum=1))
    from offload.api import LongDocQA  # heavy imports only after every argument is checked

    qa = LongDocQA(args.model, config=config, cache_dir=args.cache_dir, random_weights=args.random_weights,
                   num_layers=args.num_layers, show_progress=not args.quiet,
                   allow_long_context=args.allow_long_context, **doc_cache)
    if args.command == "ingest":
        try:  # its only job is the DocCache: one that cannot be saved fails before the prefill
            doc = qa.ingest(text, require_doc_cache=not args.no_doc_cache)
        finally:
            qa.close()
        s = doc.stats
        if args.json:
            print(json.dumps({"doc_id": doc.doc_id, "tokens": doc.num_tokens, "stats": s.to_dict()}))
        else:
            print(doc.doc_id)
            print(f"[{doc.num_tokens} tokens; DocCache {s.doc_cache or 'off'}; {s.ttft_s:.2f} s"
                  + (f"; evicted {len(s.doc_cache_evicted)}" if s.doc_cache_evicted else "")
                  + (f"; restore: {s.restore_plan}" if s.restore_plan else "") + "]", file=sys.stderr)
        return 0
    try:  # an error or an interrupt before the stream still removes this run's DISK files
        if args.command == "ask":
            doc = qa.ingest(text)
            if doc.stats.doc_cache == "not saved":  # answered all the same
                print(f"offload: the document was not cached: {doc.stats.doc_cache_reason}", file=sys.stderr)
            stream = qa.ask_stream(doc, args.question, max_new_tokens=args.max_new_tokens, sampling=sampling)
        else:
            stream = qa.generate_stream(text, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                        ignore_eos=args.ignore_eos)
    except BaseException:
        qa.close()
        raise
    printed = False
    try:
        for piece in stream:
            if not args.json:
                print(piece, end="", flush=True)
                printed = True
    except KeyboardInterrupt:
        if printed:
            print(flush=True)  # the partial answer ends its line before "offload: interrupted"
        raise
    finally:
        qa.close()
    answer = stream.answer
    assert answer is not None
    result: dict[str, Any] = answer.to_dict()
    if args.command == "ask":
        result["stats"]["document_tokens"] = doc.num_tokens
        result["stats"]["doc_id"] = doc.doc_id
        result["stats"]["ingest"] = doc.stats.to_dict()
    if args.json:
        print(json.dumps(result))
    else:
        print()
        s = answer.stats
        print(("" if not s.doc_cache else f"[DocCache {s.doc_cache}: document ingested in "
               f"{doc.stats.ttft_s:.2f} s]\n")
              + f"[{s.prefill_tokens} prompt tokens, {s.generated_tokens} generated; "
              f"prefill {s.prefill_tok_s:,.0f} tok/s, decode {s.decode_tok_s:,.1f} tok/s; "
              "KV peak " + ", ".join(f"{t} {b / 2**20:.1f} MiB" for t, b in s.peak_bytes.items())
              + (f"; read per token: disk {s.bytes_read_per_token.get('disk', 0) / 2**20:.2f} MiB "
                 f"({s.cold_reads}, {s.disk_backend})" if s.peak_bytes.get("disk") else "")
              + (f"; sliding-window rings {rings / 2**20:.1f} MiB on device"
                 if (rings := s.kv_held_bytes_by_kind.get("sliding", {}).get("device")) else "") + "]",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from offload.commands import bench_render  # from the JSON alone: no model

    render = bench_render.render_argv(argv)
    if render is not None:
        return bench_render.main(render)
    if argv[:1] == ["bench"]:  # its own options: offload bench --help
        from offload.commands import bench

        return bench.main(argv[1:])
    if argv[:1] == ["profile"]:
        from offload.tuning import profile

        return profile.main(argv[1:])
    if argv[:1] == ["plan"]:
        from offload.commands import plan_cmd

        return plan_cmd.main(argv[1:])
    if argv[:1] == ["cache"]:
        from offload.commands import cache_cmd

        return cache_cmd.main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line printed) or --help
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    try:
        with sigterm_raises():  # SIGTERM cleans up as SIGINT does: the run's DISK files go
            return _run(args)
    except (OffloadError, StorageIOError, ValueError) as e:
        fix = ("; check that disk (free space, the kernel log) and run again: DocCaches are verified before "
               "use, so a failed read leaves none of them damaged" if isinstance(e, StorageIOError) else "")
        print(f"offload: error: {e}{fix}", file=sys.stderr)
        return 2
    except Terminated:
        print("offload: terminated", file=sys.stderr)
        return TERMINATED_STATUS
    except KeyboardInterrupt:
        print("offload: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
