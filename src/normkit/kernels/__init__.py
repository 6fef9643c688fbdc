"""Kernel backends behind one contract (``contract.Backend``), loaded lazily by name.

``auto`` tries the backends listed for the tensor's device type in order and falls back to the
reference backend, which serves every case.
"""

from __future__ import annotations

import importlib
from functools import cache

from .contract import Backend

# name -> (module, class); modules are imported on first use so importing normkit compiles nothing.
_REGISTRY: dict[str, tuple[str, str]] = {
    "reference": ("normkit.kernels.reference", "ReferenceBackend"),
    "triton": ("normkit.kernels.triton", "TritonBackend"),
    "cpu": ("normkit.kernels.cpu", "CpuBackend"),
}
# device type -> backends ``auto`` tries before the reference.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpu",), "cuda": ("triton",)}


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


@cache
def load(name: str) -> Backend:
    """The backend instance for ``name``; raises ImportError when its dependencies are missing."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown normkit backend {name!r}; choose one of {('auto',) + names()}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)()


def try_load(name: str) -> Backend | None:
    try:
        return load(name)
    except ImportError:
        return None
