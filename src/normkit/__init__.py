"""normkit: fast, exact, drop-in normalization layers for PyTorch on one shared core."""

from . import functional, nn
from .selection import backend, get_backend, set_backend

__version__ = "0.1.0"


def empty_cache() -> None:
    """Return the memory normkit keeps for large CPU outputs (16 MB and more, for reuse by the next
    output of their size) to the system, as ``torch.cuda.empty_cache`` does for CUDA memory."""
    from .kernels import _pages

    _pages.empty_cache()


__all__ = ["backend", "empty_cache", "functional", "get_backend", "nn", "set_backend", "__version__"]
