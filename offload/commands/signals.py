"""SIGTERM handled like SIGINT by the commands that run a model.

Python turns SIGINT into ``KeyboardInterrupt``, so every ``finally`` and ``except
BaseException`` on the way out runs: the DISK tier's files are removed (``Engine.close``, or
its finalizer at exit), a DocCache build in progress is aborted. SIGTERM's default action
kills the process with none of that. ``sigterm_raises`` makes SIGTERM raise ``Terminated``
(a ``KeyboardInterrupt``, so the same cleanup paths catch it) in the main thread instead.
What SIGKILL leaves, the next engine start or ``offload cache gc`` removes
(``storage.run_dirs``).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Terminated", "sigterm_raises", "TERMINATED_STATUS"]

TERMINATED_STATUS = 128 + signal.SIGTERM
"""The exit status of a command ended by SIGTERM (143), as shells report a signal's death."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised in the main thread by ``sigterm_raises``)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001 - a signal handler
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread; the previous
    handler is restored after. Outside the main thread (where Python cannot set handlers)
    it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
