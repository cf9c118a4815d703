"""Command-line arguments checked before anything heavy runs: one-line errors, flag names.

Every ``offload`` command parses with ``OneLineParser``: a usage mistake prints one line,
``offload: error: ...`` with the flag and the fix, and exits 2 (argparse's default prints the
whole usage first). The checks here run before a model loads, so a bad value costs no wait.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from offload.config import check_sparse_budget, parse_size
from offload.errors import InputError
from offload.sampling import SamplingConfig

__all__ = ["OneLineParser", "size_flag", "flag_error", "check_generation_flags", "sparse_fields", "read_text", "STDIN"]

STDIN = Path("-")  # a path argument of "-" means standard input, as Unix tools read it


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"offload: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def size_flag(flag: str, value: str | None, *, minimum: int = 0) -> int | None:
    """The bytes a size flag gives, or None when it was not given.

    Raises:
        InputError: not a size, or below ``minimum``; names the flag.
    """
    if value is None:
        return None
    try:
        size = parse_size(value)
    except ValueError:
        raise InputError(f"{flag} {value!r} is not a size; write e.g. 512MiB, 2GiB or a number of bytes") from None
    if size < minimum:
        raise InputError(f"{flag} {value} is too small: it must be at least {minimum} byte"
                         f"{'s' if minimum != 1 else ''}; give e.g. 512MiB")
    return size


def flag_error(error: InputError, flags: dict[str, str]) -> InputError:
    """``error`` from a config's own check, with the field it names put as the flag that set it
    (``flags``: field -> flag): the config owns each bound, the CLI only renames."""
    message = str(error)
    for field in sorted(flags, key=len, reverse=True):
        if message.startswith(field + " ") or message.startswith(f"{field}="):
            message = flags[field] + message[len(field):]
            break
    return InputError(message.replace(", or None for the default", ", or leave the flag out for the default"))


def check_generation_flags(args: argparse.Namespace) -> None:
    """The generation flags every generating command has, checked before the model loads
    (the page size and prefill chunk by ``RuntimeConfig``, built before it too).

    Raises:
        InputError: naming the flag and the values it takes.
    """
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    try:
        SamplingConfig(temperature=args.temperature, top_p=args.top_p)
    except InputError as e:
        raise flag_error(e, {"temperature": "--temperature", "top_p": "--top-p"}) from None
    if args.num_layers is not None and args.num_layers < 1:
        raise InputError(f"--num-layers must be at least 1, got {args.num_layers}")


def sparse_fields(args: argparse.Namespace) -> dict[str, object]:
    """``--sparse``, ``--sparse-budget`` and ``--sparse-cache`` as RuntimeConfig fields (none given: exact).

    Raises:
        InputError: a budget without a sparse mode, or outside (0, 1].
    """
    mode, budget = getattr(args, "sparse", None), getattr(args, "sparse_budget", None)
    if budget is not None and mode in (None, "exact"):
        raise InputError(f"--sparse-budget applies to a sparse mode; add --sparse quest (got --sparse-budget "
                         f"{budget} with {'no --sparse' if mode is None else '--sparse exact'})")
    fields: dict[str, object] = {}
    if mode is not None:
        fields["sparse"] = mode
    if budget is not None:
        fields["sparse_budget"] = check_sparse_budget(budget, "--sparse-budget")
    cache = getattr(args, "sparse_cache", None)
    if cache is not None:
        if mode in (None, "exact"):
            raise InputError(f"--sparse-cache keeps the DISK pages a sparse step read; add --sparse quest (got "
                             f"--sparse-cache {cache} with {'no --sparse' if mode is None else '--sparse exact'})")
        fields["sparse_cache_bytes"] = size_flag("--sparse-cache", cache)
    return fields


def read_text(path: Path, what: str, flag: str) -> str:
    """A UTF-8 text file's contents, or standard input's when ``path`` is ``-``.

    Raises:
        InputError: missing, a directory, unreadable, not UTF-8, or empty.
    """
    name = "standard input" if path == STDIN else str(path)
    try:
        if path == STDIN:
            if sys.stdin is None:
                raise InputError(f"{flag} - reads standard input, and there is none; pipe the {what} in")
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
            text = data.decode("utf-8")
        else:
            text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} {name} does not exist; check the path given to {flag}") from None
    except IsADirectoryError:
        raise InputError(f"{what} {name} is a directory; give {flag} a text file") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {name} is not UTF-8 text; convert it to UTF-8") from None
    except OSError as e:
        raise InputError(f"{what} {name} cannot be read ({e.strerror}); check its permissions") from None
    if "\x00" in text:
        raise InputError(f"{what} {name} holds NUL bytes, so it is binary, not text; give {flag} a text file")
    if not text.strip():
        raise InputError(f"{what} {name} is empty; give {flag} a file with text")
    return text
