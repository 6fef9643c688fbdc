"""Outputs backed by huge pages on Linux.

An output larger than glibc's mmap threshold (32 MB at most) is fresh memory on every call, and the
kernel faults it in 4 KB at a time as the first write touches it: on a 2-core VM a 98 MB output took
26 ms to write, against 5.3 ms in 2 MB pages (561 faults instead of 25,089). torch does the same for every
allocation when ``THP_MEM_ALLOC_ENABLE=1`` is set before it starts; here it applies to the backend's
own outputs whatever the environment. The hint is ``madvise(MADV_HUGEPAGE)`` on the 2 MB-aligned
interior of the new tensor, before anything is written there: the tensor stays an ordinary torch
allocation, and as the whole interior is written at once, no memory is held beyond what it uses.
Where transparent huge pages are off, or the call fails, nothing changes.

Where the kernel finds no free 2 MB pages it compacts memory on the fault (``defrag``: ``madvise``),
and a hinted write can stall for tens of milliseconds; on a VM the host may do the same. The time from
the advice until the backend has written the output is measured (``observe``), and the hint is left
off for a while where such stalls come often.
"""

from __future__ import annotations

import ctypes
import sys
import time

import torch
from torch import Tensor

HUGE_PAGE = 1 << 21
MADV_HUGEPAGE = 14  # Linux's value (<sys/mman.h>); other systems number their advice differently
# glibc's largest mmap threshold: larger outputs are fresh memory on every call. Smaller ones are mostly
# reused heap memory, and there the hint cost more than it saved: on memory fragmented by a training
# step the kernel compacts memory to find 2 MB pages before the first write can proceed. In a
# UNet2DModel step, GroupNorm's kernel on 8x192x32x32 (a 6.3 MB output) took 5.4 ms with the hint and
# 1.3 ms without; the whole step 199-206 ms against 205-209 with the hint from 4 MB up (torch.nn 192-193).
# `normkit bench --cold` on the 8-26 MB shapes agreed: speed-up geomean 1.64-1.65x against 1.38-1.57x.
MIN_BYTES = 32 << 20
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


def hint(t: Tensor) -> Tensor:
    """Ask for huge pages under ``t``'s whole 2 MB pages (a fresh tensor, not yet written); ``t``."""
    global _pause, _advised, _advised_at
    nbytes = t.numel() * t.element_size()
    if madvise is None or nbytes < MIN_BYTES:
        return t
    if _pause:
        _pause -= 1
        return t
    start = t.data_ptr()
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    if hi > lo:
        madvise(lo, hi - lo, MADV_HUGEPAGE)
        _advised, _advised_at = start, time.perf_counter()
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


def empty_like(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.empty_like(t, dtype=dtype)`` in the layout of the dense ``t`` (contiguous or channels-last),
    in huge pages where it is large enough to profit."""
    return hint(torch.empty_like(t, dtype=dtype))
