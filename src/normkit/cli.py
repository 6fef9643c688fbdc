"""``normkit`` command line: ``lab`` (re-measure the article's claims), ``bench`` (speed vs torch.nn), ``info``,
``precompile`` (the CPU kernels ahead of their first use)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module providing ``add_arguments(parser)`` and ``run(args) -> int``; imported on use.
COMMANDS = {
    "lab": ("normkit.lab.cli", "re-measure the article's claims on real training runs and write a report"),
    "bench": ("normkit.bench", "time normkit against torch.nn on the same tensors"),
    "info": ("normkit.info", "versions, backends available and the backend in force"),
    "precompile": ("normkit.precompile", "compile the CPU kernels now instead of on their first call"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="normkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
