"""Progress display for long work (prefill) and one-line notices, on stderr, off when asked."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["PrefillProgress", "say"]


def say(line: str) -> None:
    """One notice line on stderr (e.g. that a run waits for another process)."""
    print(line, file=sys.stderr, flush=True)


class PrefillProgress:
    """A tqdm bar over layers with the prefill rate in tokens/s; a no-op when disabled.

    Used as ``on_layer`` callback of ``Engine.forward``; call ``close()`` afterwards.
    """

    def __init__(self, desc: str, num_tokens: int, *, enabled: bool) -> None:
        self._bar = None
        self._tokens = num_tokens
        self._t0 = time.perf_counter()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(desc=desc, unit="layer", leave=False, dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            return
        self._bar.total = total
        self._bar.n = done
        elapsed = time.perf_counter() - self._t0
        rate = self._tokens * done / total / elapsed if elapsed > 0 else 0.0
        self._bar.set_postfix_str(f"{self._tokens} tok, {rate:,.0f} tok/s", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def callback(self) -> Callable[[int, int], None]:
        return self
