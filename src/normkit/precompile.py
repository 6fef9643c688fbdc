"""``normkit precompile``: compile the CPU kernels ahead of their first use.

numba compiles each kernel driver on its first call per dtype, activation and thread mode (40-100 s
each on a small machine) and caches the machine code on disk. Running this once, e.g. while building
an image or before a test session, moves that wait out of the first real call.
"""

from __future__ import annotations

import argparse
import time

from .bench import DTYPES
from .cli import comma_list
from .kernels.contract import ACTIVATIONS

MODES = {"serial": False, "parallel": True}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtypes", default="fp32,bf16,fp64", type=comma_list(DTYPES, "dtypes"),
                        help="comma-separated subset of " + ",".join(DTYPES) + " (fp16 runs the fp32 kernels)")
    parser.add_argument("--activations", default="none,relu,silu,gelu", type=comma_list(("none", *ACTIVATIONS), "activations"),
                        help="comma-separated: none (no fused activation) and any of " + ", ".join(ACTIVATIONS))
    parser.add_argument("--modes", default="serial,parallel", type=comma_list(MODES, "modes"),
                        help="comma-separated subset of " + ",".join(MODES))


def run(args: argparse.Namespace) -> int:
    from .kernels import cpu

    families = cpu.precompile(
        tuple(DTYPES[d] for d in args.dtypes),
        tuple(None if a == "none" else a for a in args.activations),
        tuple(MODES[m] for m in args.modes),
    )
    start = time.perf_counter()
    for family in families:
        now = time.perf_counter()
        print(f"{family}: {now - start:.1f} s", flush=True)
        start = now
    return 0
