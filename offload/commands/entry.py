"""The ``offload`` command's entry point: ``offload bench --render FILE`` is answered from the
JSON alone, before anything imports torch; every other command goes to ``offload.commands.cli``."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"] and any(a == "--render" or a.startswith("--render=") for a in argv):
        from offload.commands import bench_render

        return bench_render.main([a.removeprefix("--render=") for a in argv[1:] if a != "--render"])
    from offload.commands.cli import main as cli_main

    return cli_main(argv)
