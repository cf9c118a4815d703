"""The ``offload`` command's entry point: ``offload bench --render FILE`` is answered from the
JSON alone, before anything imports torch; every other command goes to ``offload.commands.cli``."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from offload.commands import bench_render  # imports no torch

    argv = sys.argv[1:] if argv is None else argv
    render = bench_render.render_argv(argv)
    if render is not None:
        return bench_render.main(render)
    from offload.commands.cli import main as cli_main

    return cli_main(argv)
