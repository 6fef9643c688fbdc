"""Choosing the kernel backend: ``set_backend``, the ``backend`` context manager, ``NORMKIT_BACKEND``."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

from torch import Tensor

from . import kernels
from .kernels.contract import Backend

_default = os.environ.get("NORMKIT_BACKEND") or "auto"
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("normkit_backend", default=None)


def validate(name: str) -> str:
    """``name`` if it names a usable backend ("auto" or one ``kernels.load`` can load): the check every way
    of choosing one (set_backend, backend(...), the CLI, ``normkit info``) makes."""
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
    _default = validate(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside the block (per thread / async task)."""
    token = _override.set(validate(name))
    try:
        yield
    finally:
        _override.reset(token)


@functools.cache
def _candidates(name: str, device: str) -> tuple[Backend, ...]:
    """The loadable backends that ``name`` tries on ``device``, in order (the reference follows)."""
    names = kernels.AUTO_ORDER.get(device, ()) if name == "auto" else (name,)
    try:
        return tuple(impl for impl in map(kernels.try_load, names) if impl is not None)
    except ValueError as err:  # a name no backend has: only NORMKIT_BACKEND is not checked where it is given
        raise ValueError(f"{err} (set by NORMKIT_BACKEND={name!r})") from None


def resolve(x5: Tensor, weight: Tensor | None) -> Backend:
    """The backend that serves this call; unsupported cases fall back to the reference. Runs on
    every call: the candidates are looked up once per backend name and device type."""
    for impl in _candidates(_override.get() or _default, "cpu" if x5.is_cpu else x5.device.type):
        if impl.supports(x5, weight):
            return impl
    return kernels.load("reference")
