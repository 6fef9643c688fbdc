"""normkit: fast, exact, drop-in normalization layers for PyTorch on one shared core."""

from . import functional, nn
from .selection import backend, get_backend, set_backend

__version__ = "0.1.0"
__all__ = ["backend", "functional", "get_backend", "nn", "set_backend", "__version__"]
