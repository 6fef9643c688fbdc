"""``normkit`` command line: ``lab`` (re-measure the article's claims), ``bench`` (speed vs torch.nn), ``info``,
``precompile`` (the CPU kernels ahead of their first use); and the argument types the commands share, so that
a bad value is a usage error before anything runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Iterable

# subcommand -> module providing ``add_arguments(parser)`` and ``run(args) -> int``; imported on use.
COMMANDS = {
    "lab": ("normkit.lab.cli", "re-measure the article's claims on real training runs and write a report"),
    "bench": ("normkit.bench", "time normkit against torch.nn on the same tensors"),
    "info": ("normkit.info", "versions, backends available and the backend in force"),
    "precompile": ("normkit.precompile", "compile the CPU kernels now instead of on their first call"),
}


def count_at_least(minimum: int, expected: str, why: str = "") -> Callable[[str], int]:
    """argparse type for a count of at least ``minimum`` (``expected`` and ``why`` word the error): 0 would
    read as "unset" and fall back to a default, a negative count fails deep inside the run."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}" + (f": {why}" if why else ""))
        return number

    return parse


positive_int = count_at_least(1, "a positive integer")  # jobs, threads, rounds


def comma_list(choices: Iterable[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """argparse type for a comma-separated subset of ``choices`` (``--dtypes fp32,bf16``): an unknown name
    is a usage error that lists the choices, not a KeyError once the run has started."""
    allowed = tuple(choices)

    def parse(value: str) -> tuple[str, ...]:
        names = tuple(v for v in value.split(",") if v)
        unknown = [v for v in names if v not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown or value!r}; choose from {', '.join(allowed)}")
        return names

    return parse


def device_type(value: str) -> str:
    """argparse type for ``--device``: CUDA where torch has none is a usage error, not a failure inside torch."""
    import torch

    if value == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("no CUDA device is available")
    return value


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
