"""Choosing the kernel backend: ``set_backend``, the ``backend`` context manager, ``NORMKIT_BACKEND``."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from torch import Tensor

from . import kernels
from .kernels.contract import Backend

_default = os.environ.get("NORMKIT_BACKEND", "auto")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("normkit_backend", default=None)


def _validate(name: str) -> str:
    if name == "auto":
        return name
    kernels.load(name)  # raises ValueError for unknown names, ImportError when unavailable
    return name


def get_backend() -> str:
    """The backend name in force: the innermost ``backend(...)`` block, else ``set_backend``."""
    return _override.get() or _default


def set_backend(name: str) -> None:
    """Set the process-wide backend: ``auto``, ``reference``, or another registered backend."""
    global _default
    _default = _validate(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside the block (per thread / async task)."""
    token = _override.set(_validate(name))
    try:
        yield
    finally:
        _override.reset(token)


def resolve(x5: Tensor, weight: Tensor | None) -> Backend:
    """The backend that serves this call; unsupported cases fall back to the reference."""
    name = get_backend()
    candidates = kernels.AUTO_ORDER.get(x5.device.type, ()) if name == "auto" else (name,)
    for candidate in candidates:
        impl = kernels.try_load(candidate)
        if impl is not None and impl.supports(x5, weight):
            return impl
    return kernels.load("reference")
