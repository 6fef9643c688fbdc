"""``normkit precompile``: compile the CPU kernels ahead of their first use.

numba compiles each kernel driver on its first call per dtype, activation and thread mode (40-100 s
each on a small machine) and caches the machine code on disk. Running this once, e.g. while building
an image or before a test session, moves that wait out of the first real call.
"""

from __future__ import annotations

import argparse
import time

from .bench import DTYPES

MODES = {"serial": False, "parallel": True}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtypes", default="fp32,bf16,fp64",
                        help="comma-separated subset of " + ",".join(DTYPES) + " (fp16 runs the fp32 kernels)")
    parser.add_argument("--activations", default="none,relu,silu,gelu",
                        help="comma-separated: none (no fused activation) and any of relu, silu, gelu")
    parser.add_argument("--modes", default="serial,parallel", help="comma-separated subset of " + ",".join(MODES))


def _pick(value: str, choices: dict, what: str) -> tuple:
    names = [v for v in value.split(",") if v]
    unknown = [v for v in names if v not in choices]
    if unknown or not names:
        raise SystemExit(f"unknown {what} {unknown or value!r}; choose from {', '.join(choices)}")
    return tuple(choices[v] for v in names)


def run(args: argparse.Namespace) -> int:
    from .kernels import cpu
    from .kernels.contract import ACTIVATIONS

    families = cpu.precompile(
        _pick(args.dtypes, DTYPES, "dtypes"),
        _pick(args.activations, {"none": None, **{a: a for a in ACTIVATIONS}}, "activations"),
        _pick(args.modes, MODES, "modes"),
    )
    start = time.perf_counter()
    for family in families:
        now = time.perf_counter()
        print(f"{family}: {now - start:.1f} s", flush=True)
        start = now
    return 0
