"""A/B two versions of the CPU kernels in one process: the working tree's against a git revision's.

On a shared 2-core VM one benchmark case moves by 20-50% between runs, more than most kernel changes
gain. This loads ``_numba_kernels.py`` as of ``--rev`` beside the working tree's, swaps the cpu
backend's drivers between calls, and times both versions in turn, call by call, from a flushed cache
(``normkit.bench.measure_cold``), each case the median of ``--rounds``. The Python path around the
kernels is the same for both, so the ratio is the kernels'.

Run: ``.venv/bin/python benchmarks/kernel_ab.py --rev HEAD [--dtype bf16] [--small] [--only group,layer]
[--warm] [--threads 1] [--activation silu]``; ``--warm`` times back-to-back calls (the arithmetic, with the
data cached) to tell a compute change from a memory one; ``--threads 1`` times the serial drivers (what a
DataLoader worker or a process limited to one thread runs); ``--activation`` the drivers with that fused
epilogue.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from normkit.bench import DTYPES, measure, measure_cold
from normkit.cli import positive_int, seconds
from normkit.functional import _layout as L
from normkit.kernels import _numba_kernels, cpu
from normkit.kernels.contract import ACTIVATIONS

KERNELS = "src/normkit/kernels/_numba_kernels.py"
# (norm, shape, channels_last); GroupNorm with 32 groups, LayerNorm over the last dim; 7x7 planes show
# the per-slab and per-row costs, 32-128 channels channels-last the short rows, the 3-D shape
# channels_last_3d.
CASES = [
    ("batch", (8, 256, 32, 32), False), ("batch", (8, 256, 32, 32), True), ("group", (8, 256, 32, 32), False),
    ("group", (8, 256, 32, 32), True), ("layer", (8, 512, 768), False), ("instance", (32, 512, 7, 7), False),
    ("group", (32, 512, 7, 7), False), ("group", (8, 32, 64, 64), True), ("batch", (32, 64, 56, 56), True),
    ("batch", (32, 512, 7, 7), True), ("instance", (16, 128, 64, 64), True), ("instance", (32, 64, 56, 56), True),
    ("batch", (2, 32, 16, 64, 64), True),
]
SMALL = [("batch", (2, 64, 8, 8), True), ("group", (2, 64, 8, 8), False), ("layer", (2, 4, 64), False)]


def load_revision(rev: str, where: Path):
    """The kernels module as of ``rev``, imported under its own name (its own numba cache)."""
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip())
    source = subprocess.run(["git", "show", f"{rev}:{KERNELS}"], cwd=root, capture_output=True, text=True, check=True).stdout
    path = where / "kernels_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("kernels_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _view(norm: str, t: torch.Tensor, cl: bool) -> tuple[torch.Tensor, list[int], tuple[bool, bool]]:
    """The 5-D view the functional layer would build, its shape, and which of R1/R2 the affine
    parameters span (``L.param_shape``)."""
    if norm == "batch":
        shape, spans = L.per_channel_view(t, cl), (False, False)
    elif norm == "group":
        shape, spans = L.per_group_view(t, 32, cl), (not cl, cl)
    elif norm == "instance":
        shape, spans = L.per_instance_view(t, cl), (False, False)
    else:
        shape, spans = L.trailing_view(t, t.shape[-1]), (True, False)
    return L.dense(t)[0].reshape(shape), shape, spans


def _tensor(shape: tuple[int, ...], cl: bool, dtype: torch.dtype) -> torch.Tensor:
    t = torch.randn(shape).to(dtype)
    if not cl or t.dim() not in (4, 5):
        return t
    return t.to(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def operations(
    norm: str, shape: tuple[int, ...], cl: bool, dtype: torch.dtype, activation: str | None = None
) -> dict[str, tuple[Callable, Callable]]:
    """op -> (call on the case, the same call on a small input that warms the code after a flush)."""
    be = cpu.CpuBackend()
    small_shape = (2, shape[-1]) if norm == "layer" else (2, shape[1], *(min(s, 4) for s in shape[2:]))
    x5, shape5, spans = _view(norm, _tensor(shape, cl, dtype), cl)
    s5, small5, _ = _view(norm, _tensor(small_shape, cl, dtype), cl)
    features = shape[-1] if norm == "layer" else shape[1]
    wf, bf = torch.rand(features) + 0.5, torch.randn(features)
    ps, pss = L.param_shape(shape5, *spans), L.param_shape(small5, *spans)
    w, b, ws, bs = wf.reshape(ps), bf.reshape(ps), wf.reshape(pss), bf.reshape(pss)
    dy, dys = torch.randn_like(x5), torch.randn_like(s5)
    act = activation
    _, st = be.forward(x5, w, b, 1e-5, False, act)
    _, sts = be.forward(s5, ws, bs, 1e-5, False, act)
    mask = (True, True, True)
    ops = {
        "forward": (lambda: be.forward(x5, w, b, 1e-5, False, act), lambda: be.forward(s5, ws, bs, 1e-5, False, act)),
        "backward": (lambda: be.backward(dy, x5, st.mean, st.rstd, w, ps, False, True, mask, b, act),
                     lambda: be.backward(dys, s5, sts.mean, sts.rstd, ws, pss, False, True, mask, bs, act)),
    }
    if norm == "batch":
        ops["normalize"] = (lambda: be.normalize(x5, st.mean, st.rstd, w, b, act),
                            lambda: be.normalize(s5, sts.mean, sts.rstd, ws, bs, act))
        ops["eval"] = (lambda: be.normalize(x5, st.mean, st.var, w, b, act, 1e-5),  # running statistics
                       lambda: be.normalize(s5, sts.mean, sts.var, ws, bs, act, 1e-5))
    return ops


def case_name(norm: str, shape: tuple[int, ...], cl: bool) -> str:
    """A case's row name (and what `--only` matches): norm, shape, layout."""
    layout = "channels_last" if cl else "nchw" if len(shape) > 3 else "contiguous"
    return f"{norm} {'x'.join(map(str, shape))} {layout}"


def select(cases: list, only: str) -> list:
    """The cases whose name has one of the comma-separated words of ``only`` (all when it is empty); none
    matching is an error, not an empty table."""
    if not only:
        return cases
    chosen = [c for c in cases if any(w in case_name(*c) for w in only.split(","))]
    if not chosen:
        raise SystemExit(f"--only {only!r} matches none of: " + ", ".join(case_name(*c) for c in cases))
    return chosen


def use(drivers: dict) -> None:
    """Make the cpu backend call ``drivers``. Outside ``versioned_setups`` the backend's cached set-ups
    hold the old drivers, so they are dropped; inside it they are keyed by the table and kept."""
    cpu.DRIVERS = drivers
    if hasattr(cpu._call, "cache_clear"):
        cpu._call.cache_clear()


@contextlib.contextmanager
def versioned_setups() -> Iterator[None]:
    """Key the cpu backend's cached call set-up (``cpu._call``, which holds the driver it picked from
    ``cpu.DRIVERS``) by the driver table too, so that swapping versions between two timed calls costs a
    lookup, not a set-up inside the timed call."""
    original = cpu._call
    keyed = functools.lru_cache(maxsize=1024)(lambda _tables, *args: original.__wrapped__(*args))
    cpu._call = lambda *args: keyed(id(cpu.DRIVERS), *args)
    try:
        yield
    finally:
        cpu._call = original
        use(_numba_kernels.DRIVERS)


def _as(drivers: dict, fn: Callable) -> Callable:
    """``fn`` run on ``drivers``."""
    def run():
        use(drivers)
        return fn()
    return run


def compare(
    old, cases, dtype: torch.dtype, rounds: int, min_time: float, warm_caches: bool = False,
    activation: str | None = None,
) -> list[tuple[str, float, float]]:
    """(case, revision ms, working tree ms): from a flushed cache the two versions called in turn, call by
    call, for ``min_time`` each per round; ``warm_caches``: back-to-back calls (the kernels' compute alone),
    the versions alternating round by round, the first of each round swapped every round."""
    flush = torch.empty(64 << 20)
    versions = (old.DRIVERS, _numba_kernels.DRIVERS)
    rows = []
    with versioned_setups():
        for norm, shape, cl in cases:
            for op, (call, warm) in operations(norm, shape, cl, dtype, activation).items():
                calls = [_as(v, call) for v in versions]
                for fn in calls:  # compile both before timing
                    fn()
                times: tuple[list[float], list[float]] = ([], [])
                for i in range(rounds):
                    if warm_caches:
                        order = (0, 1) if i % 2 == 0 else (1, 0)  # ABBA: no order bias
                        for k in order:
                            times[k].append(measure(calls[k], min_time) * 1e3)
                    else:
                        pair = measure_cold(calls, min_time, flush, [_as(v, warm) for v in versions])
                        for k in (0, 1):
                            times[k].append(pair[k] * 1e3)
                rows.append((f"{case_name(norm, shape, cl)} {op}", statistics.median(times[0]), statistics.median(times[1])))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="git revision to compare the working tree with")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp64"))
    parser.add_argument("--rounds", type=positive_int, default=6)
    parser.add_argument("--min-time", type=seconds, default=0.3, help="seconds per measurement")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--warm", action="store_true", help="no cache flush: data stays cached between calls")
    parser.add_argument("--only", default="", help="comma-separated words: only the cases whose name has one")
    parser.add_argument("--threads", type=positive_int, help="torch.set_num_threads for the run (default: as is)")
    parser.add_argument("--activation", choices=ACTIVATIONS, help="the drivers with this fused activation")
    args = parser.parse_args(argv)
    known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.rev}^{{commit}}"], capture_output=True)
    if known.returncode:
        parser.error(f"argument --rev: {args.rev!r} is no git revision here")
    cases = select(SMALL if args.small else CASES, args.only)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as where:
        old = load_revision(args.rev, Path(where))
        rows = compare(old, cases, DTYPES[args.dtype], args.rounds, args.min_time, args.warm, args.activation)
    caches = "caches warm" if args.warm else "caches flushed"
    act = f", {args.activation}" if args.activation else ""
    table = Table(title=f"cpu kernels, {args.dtype}{act}, {caches}, threads {torch.get_num_threads()}, median of {args.rounds}: "
                        f"{args.rev} vs working tree")
    for col in ("case", f"{args.rev} ms", "tree ms", "tree / rev"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for name, then, now in rows:
        table.add_row(name, f"{then:.3f}", f"{now:.3f}", f"{now / then:.3f}", style="red" if now > 1.05 * then else None)
    Console(width=140).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
