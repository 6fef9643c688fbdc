"""``normkit`` command line: ``lab`` (re-measure the article's claims), ``bench`` (speed vs torch.nn), ``info``,
``precompile`` (the CPU kernels ahead of their first use); and the argument types the commands share, so that
a bad value is a usage error before anything runs."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

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


def seconds(value: str) -> float:
    """argparse type for a duration: a finite number of seconds, 0 or more (NaN would time forever)."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (0.0 <= number < math.inf):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {value!r}")
    return number


def _can_create_in(folder: str) -> bool:
    """Whether a file can be made in ``folder``: tried, as permissions alone do not tell (root, read-only
    and virtual file systems)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def writable_path(value: str) -> str:
    """argparse type for an output file: its folder must exist and take files, or the run would fail
    after its work."""
    folder = os.path.dirname(os.path.abspath(value))
    if os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: it is a folder")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: there is no folder {folder!r}")
    if not _can_create_in(folder):
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: no file can be made in {folder!r}")
    return value


def writable_folder(value: str) -> Path:
    """argparse type for an output folder, made later if missing: it may not be a file, and files must be
    creatable in it or in the nearest folder above it that exists."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write into {value!r}: it is a file")
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not _can_create_in(str(existing)):
        raise argparse.ArgumentTypeError(f"cannot write into {value!r}: no file can be made in {str(existing)!r}")
    return path


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
            _command(name).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    return int(_command(args.command).run(args) or 0)


def _command(name: str) -> ModuleType:
    """The module of command ``name``; a package of the lab's optional extra missing is a message saying
    what to install."""
    try:
        return importlib.import_module(COMMANDS[name][0])
    except ImportError as err:
        if name != "lab" or err.name is None or err.name.startswith("normkit"):
            raise
        raise SystemExit(f"normkit lab needs {err.name!r}, in the optional extra: pip install 'normkit[lab]'") from err


if __name__ == "__main__":
    sys.exit(main())
