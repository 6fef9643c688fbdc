"""``normkit info``: what is installed and which backend serves which device."""

from __future__ import annotations

import argparse
import platform

import torch

from . import __version__, kernels
from .kernels import _pages
from .selection import get_backend, validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def _in_force() -> str:
    """The backend in force as the layers will see it: ``NORMKIT_BACKEND`` is read unchecked at import,
    so a name no backend has is shown as the error every layer call raises."""
    name = get_backend()
    try:
        validate(name)
    except ValueError as exc:
        return f"error: {exc} (set by NORMKIT_BACKEND={name!r})"
    except ImportError as exc:
        return f"{name}, unavailable ({exc}): calls use the reference backend"
    return name


def describe() -> dict[str, object]:
    """What ``normkit info`` prints, by line title."""
    backends = {}
    for name in kernels.names():
        try:
            kernels.load(name)
            backends[name] = "available"
        except ImportError as exc:
            backends[name] = f"unavailable ({exc})"
    return {
        "normkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "cuda": torch.cuda.is_available(),
        "backend in force": _in_force(),
        "auto order": {dev: list(order) + ["reference"] for dev, order in kernels.AUTO_ORDER.items()} or "reference",
        "backends": backends,
        "output cache": f"{_pages.cached_bytes() >> 20} MB kept, at most {_pages.CACHE_LIMIT >> 20} MB "
        "(NORMKIT_OUTPUT_CACHE_MB)",
    }


def run(args: argparse.Namespace) -> int:
    for key, value in describe().items():
        print(f"{key:>17}: {value}")
    return 0
