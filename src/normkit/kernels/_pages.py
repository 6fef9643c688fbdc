"""Large outputs: reused memory in huge pages.

An output larger than glibc's mmap threshold (32 MB at most) is fresh memory on every call, and the
kernel faults it in, zeroing each page, as the first write touches it: on a 2-core VM a 98 MB output took
26 ms to write in 4 KB pages, 5.3 ms in 2 MB pages (561 faults instead of 25,089), and about 2.5 ms
into memory written before. So the backend's outputs of ``MIN_BYTES`` and more come from blocks that
are kept when their tensor is freed and handed to the next output of their size (``empty_like``), as
torch's CUDA allocator keeps device memory: in a training loop each step's activations and gradients
take the memory of the step before's. At most ``CACHE_LIMIT`` bytes of freed blocks are kept
(``NORMKIT_OUTPUT_CACHE_MB``; 0 turns the cache off), ``empty_cache`` returns them. An output from a
block is an ordinary tensor on memory torch did not allocate (its storage cannot be resized).

A new block of ``HINT_BYTES`` and more asks for huge pages (``madvise(MADV_HUGEPAGE)``, what torch does
for every allocation under ``THP_MEM_ALLOC_ENABLE=1``) over its 2 MB-aligned memory before anything is
written there; without the cache each output that large is advised the same way. Where transparent huge pages are off, or the call
fails, nothing changes.

Where the kernel finds no free 2 MB pages it compacts memory on the fault (``defrag``: ``madvise``),
and a hinted write can stall for tens of milliseconds; on a VM the host may do the same. The time from
the advice until the backend has written the output is measured (``observe``), and the hint is left
off for a while where such stalls come often.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import warnings
import weakref

import numpy as np
import torch
from torch import Tensor

HUGE_PAGE = 1 << 21
MADV_HUGEPAGE = 14  # Linux's value (<sys/mman.h>); other systems number their advice differently
# Outputs from kept blocks: from 16 MB, where glibc's heap often stops handing back memory it had (in one
# `normkit bench --cold` run the cpu backend faulted in fresh pages, 1,000-11,000 a call, in half of the
# 25 MB cases and a third of the 16 MB ones) and where a block's set-up (about 12 µs from a flushed
# cache, against 5 for torch.empty_like) is small beside the kernel.
MIN_BYTES = 16 << 20
# New memory asked into huge pages: from glibc's largest mmap threshold, above which torch's outputs are
# fresh memory on every call. Smaller ones are mostly reused heap memory, and there the hint (given on
# every call, before the cache) cost more than it saved: on memory fragmented by a training step the
# kernel compacts memory to find 2 MB pages before the first write can proceed. In a
# UNet2DModel step, GroupNorm's kernel on 8x192x32x32 (a 6.3 MB output) took 5.4 ms with the hint and
# 1.3 ms without; the whole step 199-206 ms against 205-209 with the hint from 4 MB up (torch.nn 192-193).
# `normkit bench --cold` on the 8-26 MB shapes agreed: speed-up geomean 1.64-1.65x against 1.38-1.57x.
HINT_BYTES = 32 << 20
# A call that wrote a hinted output more slowly than this many bytes a second was stalled by the faults
# (on a 2-core VM, GroupNorm on 16x128x64x64, a 33.5 MB output: 3.3-4.1 ms a call where huge pages
# were served, 8.5-10 ms without the hint, 18-92 ms for stretches of calls with it; torch.nn 9 ms).
STALL_BYTES_PER_S = 2e9
# Stalls come and go: in one stretch on that VM 15% of hinted calls stalled (median 3.2 ms, mean about
# 9.4 ms), in others most did, often in the first calls of a process and rarely later. When STALLS of the
# last WINDOW hinted calls stalled, the hint is left off for PAUSE large outputs, then tried again with a
# fresh window. (Pausing after two stalls in eight, and doubling the pause after each stalled retry,
# stayed paused after the stalls had stopped; the first stalled calls of a process often pass.)
STALLS = 4
WINDOW = 8
PAUSE = 64
_pause = 0
_recent = 0  # the last WINDOW hinted calls, one bit each: 1 stalled
_advised = 0  # the address of the last output advised
_advised_at = 0.0  # and when


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


madvise = _madvise()


def hint_range(start: int, nbytes: int) -> None:
    """Ask for huge pages under the whole 2 MB pages of ``nbytes`` fresh bytes at ``start``, not yet
    written, unless the hint is paused (``observe``)."""
    global _pause, _advised, _advised_at
    if madvise is None:
        return
    if _pause:
        _pause -= 1
        return
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    if hi > lo:
        madvise(lo, hi - lo, MADV_HUGEPAGE)
        _advised, _advised_at = start, time.perf_counter()


def hint(t: Tensor) -> Tensor:
    """``hint_range`` over the fresh tensor ``t`` when it is large (``HINT_BYTES``); ``t``."""
    nbytes = t.numel() * t.element_size()
    if nbytes >= HINT_BYTES:
        hint_range(t.data_ptr(), nbytes)
    return t


def observe(t: Tensor) -> None:
    """The output ``t`` is written: if it was advised, note whether that took longer than
    ``STALL_BYTES_PER_S`` allows since the advice, and pause the hint where that happened too often
    (see ``STALLS``)."""
    global _pause, _advised, _recent
    if t.data_ptr() != _advised:
        return
    _advised = 0
    stalled = (time.perf_counter() - _advised_at) * STALL_BYTES_PER_S > t.numel() * t.element_size()
    _recent = ((_recent << 1) | stalled) & ((1 << WINDOW) - 1)
    if stalled and _recent.bit_count() >= STALLS:
        _pause, _recent = PAUSE, 0


def _cache_limit() -> int:
    """Bytes of freed blocks kept: ``NORMKIT_OUTPUT_CACHE_MB``, by default an eighth of the memory, at
    most 1 GiB. A value that is not a whole number is named in a warning and the default used: the
    setting changes speed, never results."""
    mb = os.environ.get("NORMKIT_OUTPUT_CACHE_MB")
    if mb is not None:
        try:
            return max(0, int(mb)) << 20
        except ValueError:
            warnings.warn(
                f"NORMKIT_OUTPUT_CACHE_MB={mb!r} is not a whole number of megabytes (0 turns the cache off); "
                "using the default", stacklevel=2,
            )
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        memory = 8 << 30
    return min(1 << 30, memory // 8)


CACHE_LIMIT = _cache_limit()
_free: dict[int, list[tuple[np.ndarray, int]]] = {}  # freed blocks and their addresses, by size (2 MB multiples)
_cached = 0  # their bytes
_lock = threading.RLock()  # re-entrant: a block may come back (garbage collection) while one is taken
_live: dict[int, tuple[weakref.ref, int, np.ndarray, int]] = {}  # blocks in use, by id of the array's weakref
# numpy's type for each output dtype (bfloat16: its bits)
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16, torch.bfloat16: np.uint16}


def _reset_lock() -> None:
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere processes do not fork
    os.register_at_fork(after_in_child=_reset_lock)


def cached_bytes() -> int:
    """Bytes of freed output blocks kept for reuse."""
    return _cached


def empty_cache() -> None:
    """Return the memory kept for large CPU outputs to the system (``normkit.empty_cache``)."""
    global _cached
    with _lock:
        _free.clear()
        _cached = 0


def _freed(ref: weakref.ref) -> None:
    """The array of a block's tensor is gone with its storage: keep the block for the next output of its
    size, within the limit."""
    global _cached
    entry = _live.pop(id(ref), None)
    if entry is None:
        return
    _, size, block, addr = entry
    with _lock:
        if _cached + size <= CACHE_LIMIT:
            _free.setdefault(size, []).append((block, addr))
            _cached += size


def _block(size: int) -> tuple[np.ndarray, int]:
    """``size`` bytes at a 2 MB boundary and their address: a freed block of that size, or new memory
    (asked into huge pages from ``HINT_BYTES``)."""
    global _cached, _advised
    with _lock:
        kept = _free.get(size)
        if kept:
            _cached -= size
            block, addr = kept.pop()
            if addr == _advised:  # advised when new, and written since: not to be timed again
                _advised = 0
            return block, addr
    raw = np.empty(size + HUGE_PAGE, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    block = raw[start:start + size]
    addr = block.ctypes.data
    if size >= HINT_BYTES:
        hint_range(addr, size)
    return block, addr


def _from_block(t: Tensor, dtype: torch.dtype, nbytes: int) -> Tensor:
    """An empty tensor of ``t``'s shape and strides on a block. Its storage holds a numpy array of the
    block made for it (``torch.from_numpy``: no view of another tensor), whose end gives the block back.
    12 µs from a flushed cache, against 29 with a finalizer and ``set_`` (torch.empty_like 5)."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    block, addr = _block(size)
    item = dtype.itemsize
    arr = np.ndarray(t.shape, _NUMPY[dtype], block, 0, tuple(s * item for s in t.stride()))
    ref = weakref.ref(arr, _freed)
    _live[id(ref)] = (ref, size, block, addr)
    out = torch.from_numpy(arr)
    if dtype == torch.bfloat16:  # from uint16 to bfloat16 in place, not by a view
        out = torch.empty(0, dtype=dtype).set_(out.untyped_storage(), 0, t.shape, t.stride())
    return out


def empty_like(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.empty_like(t, dtype=dtype)`` in the layout of the dense ``t`` (contiguous or channels-last):
    from a kept block where it is large enough (``MIN_BYTES``), else an ordinary allocation (advised
    into huge pages from ``HINT_BYTES`` when the cache is off)."""
    dtype = t.dtype if dtype is None else dtype
    nbytes = t.numel() * dtype.itemsize
    if nbytes < MIN_BYTES:
        return torch.empty_like(t, dtype=dtype)
    if CACHE_LIMIT and dtype in _NUMPY:
        return _from_block(t, dtype, nbytes)
    return hint(torch.empty_like(t, dtype=dtype))
