"""``normkit bench``: normkit against torch.nn in one process, on the same tensors.

Every norm x layout x mode (forward train, forward eval, forward+backward) x dtype over realistic
activation shapes, and GroupNorm followed by SiLU (``group+silu``: torch's two modules against
normkit's ``GroupNormAct``, whose activation runs in the norm's epilogue). Speed is reported as
time, effective bandwidth (forward moves 2 bytes of tensor per byte of input: read x, write y;
forward+backward 5: plus read x, dy and write dx), the speed-up over torch.nn, and the share of
the bandwidth of a large in-place copy measured in the same run. A copy into a new tensor is
measured too: outputs above the allocator's mmap threshold (32 MB with glibc) are fresh pages every
call, and the page faults can cost more than the copy itself; below it, whether an output reuses
pages or faults in fresh ones depends on the heap's state, so each side's minor page faults per call
are reported with its time (CPU). ``--cold`` flushes the caches before
every timed call (then warms the code on a small input), as a training step finds its activations:
back-to-back calls on tensors that fit in the last-level cache measure the cache, not the memory.
There the two sides are called in turn, call by call, so that both see the machine in one state.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numba
import torch
from torch.utils import benchmark

from . import __version__, kernels
from .cli import comma_list, device_type, positive_int, seconds, writable_path
from .kernels import _pages
from .kernels.cpu import SERIAL_BELOW
from .selection import backend, validate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64, "fp16": torch.float16}
MODES = ("fwd-train", "fwd-eval", "fwd+bwd")
TRAFFIC = {"fwd-train": 2, "fwd-eval": 2, "fwd+bwd": 5}
LARGE_BYTES = 64 << 20
# Written before every call with ``--cold``: more than the last-level cache of any one CPU socket or GPU.
FLUSH_BYTES = 256 << 20

# norm -> (input shapes, layouts). ResNet/UNet activations, a 3-D volume, transformer tokens; the
# last of each (a ResNet's last stage, one sequence) is small enough that the per-call cost shows.
CONV_SHAPES = [(32, 64, 112, 112), (32, 64, 56, 56), (8, 256, 32, 32), (16, 128, 64, 64), (2, 32, 16, 64, 64), (32, 512, 7, 7)]
TOKEN_SHAPES = [(8, 512, 768), (4, 2048, 1024), (1, 128, 768)]
FULL = {
    "batch": (CONV_SHAPES, ("nchw", "channels_last")),
    "instance": (CONV_SHAPES, ("nchw", "channels_last")),
    "group": (CONV_SHAPES, ("nchw", "channels_last")),
    "group+silu": (CONV_SHAPES, ("nchw", "channels_last")),
    "layer": (TOKEN_SHAPES, ("contiguous",)),
    "rms": (TOKEN_SHAPES, ("contiguous",)),
}
QUICK = {
    "batch": ([(8, 256, 32, 32)], ("nchw", "channels_last")),
    "instance": ([(8, 256, 32, 32)], ("nchw", "channels_last")),
    "group": ([(8, 256, 32, 32)], ("nchw", "channels_last")),
    "group+silu": ([(8, 256, 32, 32)], ("nchw", "channels_last")),
    "layer": ([(8, 512, 768)], ("contiguous",)),
    "rms": ([(8, 512, 768)], ("contiguous",)),
}


@dataclass
class Result:
    norm: str
    shape: list[int]
    layout: str
    mode: str
    dtype: str
    torch_ms: float
    normkit_ms: float
    speedup: float
    torch_gbps: float
    normkit_gbps: float
    pct_copy: float
    megabytes: float
    torch_faults: float
    normkit_faults: float


def _backend_name(name: str) -> str:
    """argparse type for ``--backend``: a backend the layers could not use is a usage error."""
    try:
        return validate(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    except ImportError as exc:
        raise argparse.ArgumentTypeError(f"backend {name!r} is unavailable: {exc}") from None


def _shape(value: str) -> tuple[int, ...]:
    """argparse type for ``--shape``: comma-separated positive sizes."""
    return tuple(positive_int(v) for v in value.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``normkit bench`` options; every value is checked here, before any timing starts."""
    parser.add_argument("--quick", action="store_true", help="one shape per norm, short timings (under a minute)")
    parser.add_argument("--json", metavar="PATH", type=writable_path, help="also write the results and summary as JSON")
    parser.add_argument("--device", default="cpu", type=device_type, choices=("cpu", "cuda"))
    parser.add_argument("--backend", default="auto", type=_backend_name, help="normkit backend to time (default: auto)")
    parser.add_argument("--dtypes", default="fp32,bf16", type=comma_list(DTYPES, "dtypes"),
                        help="comma-separated subset of " + ",".join(DTYPES))
    parser.add_argument("--norms", default=",".join(FULL), type=comma_list(FULL, "norms"),
                        help="comma-separated subset of " + ",".join(FULL))
    parser.add_argument("--modes", default=",".join(MODES), type=comma_list(MODES, "modes"),
                        help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--shape", action="append", default=[], type=_shape, metavar="N,C,...",
                        help="replace the default shapes (repeatable); the last dim is the feature size for layer/rms, "
                        "the other norms take shapes of 3 to 5 dims")
    parser.add_argument("--threads", type=_thread_count, default=None,
                        help="torch.set_num_threads for both sides (default: as is)")
    parser.add_argument("--min-time", type=seconds, default=None, help="seconds of timing per measurement")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="alternating repeats of both sides; each keeps its best median (robust to load spikes); "
                        "with --cold, rounds x min-time of calls in turn, each side's median")
    parser.add_argument("--cold", action="store_true",
                        help="flush the caches before every timed call (a training step reads activations from memory); "
                        "torch.nn and normkit are called in turn")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="on CUDA, time replays of each side captured in a CUDA graph (kernel time alone)")


def measure(fn: Callable[[], object], min_time: float) -> float:
    """Median seconds per call after a warm-up (``blocked_autorange``). The timer runs with the
    process's thread count (torch's Timer would otherwise drop to one thread). On CUDA it
    synchronizes at block boundaries only, so launches queue as in a training loop: a case costs
    the larger of its GPU time and its host overhead."""
    fn()
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median


def measure_cold(
    fns: Sequence[Callable[[], object]], min_time: float, flush: torch.Tensor, warms: Sequence[Callable[[], object]]
) -> list[float]:
    """Median seconds per call of each of ``fns``, called in turn call by call, each call after writing
    ``flush`` (larger than the last-level cache) and then calling its ``warm``: in a training step the
    backward reads activations the forward wrote long before, from memory, while the code that runs
    every layer stays cached. ``warm`` (the same call on a small input) brings that code and both
    thread pools back, so that the flush evicts the data alone. On a shared machine the cache also
    holds other tenants' data, so back-to-back calls on the same tensors (``measure``) can reward work
    that only pays off while everything stays cached. Calling the sides in turn (the first of each
    sweep alternating) gives them the same machine: a shared VM's memory bandwidth can drift by 1.5-2x
    within minutes, and a block of one side's calls followed by a block of the other's put two identical
    operations (GroupNorm in training and eval mode) up to 1.3x apart. ``min_time`` (seconds per
    function) counts the flushes too: a call of microseconds would otherwise take thousands of them."""
    cuda = flush.device.type == "cuda"
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    started = time.perf_counter()
    sweeps = 0
    while sweeps < 6 or sweeps % 2 or time.perf_counter() - started < min_time * len(fns):
        for i in order:
            flush.fill_(1.0)
            warms[i]()
            if cuda:
                torch.cuda.synchronize(flush.device)
            start = time.perf_counter()
            fns[i]()
            if cuda:
                torch.cuda.synchronize(flush.device)
            times[i].append(time.perf_counter() - start)
        order.reverse()
        sweeps += 1
    return [statistics.median(t) for t in times]


def faults_per_call(fn: Callable[[], object], device: torch.device, calls: int = 5) -> float:
    """Minor page faults per call of ``fn`` in the heap state the timing left (NaN off the CPU, or
    where the platform does not count them)."""
    try:
        import resource
    except ImportError:
        return math.nan
    if device.type != "cpu":
        return math.nan
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once into a CUDA graph (after a warm-up on a side stream, as capture requires):
    replaying it times the kernels alone, without Python or launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device: torch.device, min_time: float, nbytes: int = 256 << 20) -> tuple[float, float]:
    """GB/s (read + write) of copying a large tensor into a new one, and into an existing one."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    fresh = measure(lambda: x.clone(), min_time)
    inplace = measure(lambda: y.copy_(x), min_time)
    return 2 * nbytes / fresh / 1e9, 2 * nbytes / inplace / 1e9


class _GroupNormSiLU(torch.nn.GroupNorm):
    """torch's GroupNorm then SiLU, with GroupNorm's state_dict keys."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(super().forward(input))


def _modules(norm: str, shape: tuple[int, ...]) -> tuple[torch.nn.Module, torch.nn.Module]:
    import normkit.nn as nk

    if norm in ("layer", "rms"):
        cls = "LayerNorm" if norm == "layer" else "RMSNorm"
        return getattr(torch.nn, cls)(shape[-1]), getattr(nk, cls)(shape[-1])
    c, dims = shape[1], len(shape) - 2
    groups = math.gcd(32, c)  # 32 groups (the usual choice) where the channels allow, else a divisor
    if norm == "group":
        return torch.nn.GroupNorm(groups, c), nk.GroupNorm(groups, c)
    if norm == "group+silu":
        return _GroupNormSiLU(groups, c), nk.GroupNormAct(groups, c, act_layer="silu")
    cls = f"{'BatchNorm' if norm == 'batch' else 'InstanceNorm'}{dims}d"
    kwargs = {} if norm == "batch" else {"affine": True, "track_running_stats": True}
    return getattr(torch.nn, cls)(c, **kwargs), getattr(nk, cls)(c, **kwargs)


def _input(shape: tuple[int, ...], layout: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


# Elements of the warm-up input of ``--cold``: small next to the data, large enough that torch and
# normkit both take their multi-threaded paths (the cpu backend's start at ``SERIAL_BELOW``), so that
# the code the warm-up brings back into cache is the code the timed call runs.
WARM_ELEMENTS = max(1 << 16, SERIAL_BELOW)


def _warm_shape(shape: tuple[int, ...], norm: str) -> tuple[int, ...]:
    """The layer's channel or feature count with at least ``WARM_ELEMENTS`` elements where ``shape``
    has them (at most ``shape``): the same code, threads included, on little data."""
    if norm in ("layer", "rms"):
        rows = min(math.prod(shape[:-1]), max(1, -(-WARM_ELEMENTS // shape[-1])))
        return (1,) * (len(shape) - 2) + (rows, shape[-1])
    dims = len(shape) - 2
    side = max(2, math.ceil((WARM_ELEMENTS / (2 * shape[1])) ** (1 / dims)))
    spatial = tuple(min(side, n) for n in shape[2:])
    batch = min(shape[0], max(2, -(-WARM_ELEMENTS // (shape[1] * math.prod(spatial)))))
    return (batch, shape[1]) + spatial


def _step(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str) -> Callable[[], object]:
    params = [p for p in module.parameters() if p.requires_grad]
    module.train(mode != "fwd-eval")
    if mode == "fwd+bwd":
        xg = x.detach().requires_grad_()
        return lambda: torch.autograd.grad(module(xg), [xg, *params], dy)

    def forward() -> object:
        with torch.no_grad():
            return module(x)

    return forward


def run_case(
    norm: str, shape: tuple[int, ...], layout: str, mode: str, dtype: str, device: torch.device,
    copy_gbps: float, min_time: float, rounds: int, cuda_graph: bool = False, flush: torch.Tensor | None = None,
) -> Result:
    """Time torch.nn and normkit alternately on the same tensors; each keeps its best median of
    ``rounds``. With ``flush``, the caches are flushed before every call and the two sides are called
    in turn for ``rounds`` times ``min_time`` each (``measure_cold``); each side's median over them."""
    theirs, ours = (m.to(device=device, dtype=DTYPES[dtype]) for m in _modules(norm, shape))
    ours.load_state_dict(theirs.state_dict())
    x = _input(shape, layout, DTYPES[dtype], device)
    dy = torch.randn_like(x)
    fns = tuple(_step(m, x, dy, mode) for m in (theirs, ours))
    if cuda_graph:
        fns = tuple(graphed(fn) for fn in fns)
    if flush is not None:
        small = _input(_warm_shape(shape, norm), layout, DTYPES[dtype], device)
        warms = tuple(_step(m, small, torch.randn_like(small), mode) for m in (theirs, ours))
    if flush is None:
        best = [math.inf, math.inf]
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                best[i] = min(best[i], measure(fn, min_time))
    else:
        best = measure_cold(fns, min_time * rounds, flush, warms)
    faults = [faults_per_call(fn, device) for fn in fns]
    nbytes = x.numel() * x.element_size()
    moved = TRAFFIC[mode] * nbytes / 1e9
    return Result(
        norm, list(shape), layout, mode, dtype, best[0] * 1e3, best[1] * 1e3, best[0] / best[1],
        moved / best[0], moved / best[1], 100 * moved / best[1] / copy_gbps, nbytes / 2**20, *faults,
    )


def _geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def summarize(results: list[Result], copy_inplace: float, copy_new: float) -> dict[str, object]:
    """The numbers the targets are stated in (bandwidth shares against both copies). Speed-up summaries
    are over the plain norms; norm+activation rows are summarized on their own."""
    out: dict[str, object] = {}
    for dtype in sorted({r.dtype for r in results}):
        fused = {f"{r.norm} {r.shape} {r.layout} {r.mode}": r.speedup for r in results if r.dtype == dtype and "+" in r.norm}
        rows = [r for r in results if r.dtype == dtype and "+" not in r.norm]
        out[dtype] = {
            "norm_act_speedup": fused,
            "geomean_speedup_fwd": _geomean([r.speedup for r in rows if r.mode != "fwd+bwd"]),
            "geomean_speedup_fwd_bwd": _geomean([r.speedup for r in rows if r.mode == "fwd+bwd"]),
            "min_speedup": min((r.speedup for r in rows), default=math.nan),
            "slower_than_torch": [f"{r.norm} {r.shape} {r.layout} {r.mode}" for r in rows if r.speedup < 1.0],
            "large_fwd_pct_copy": {
                f"{r.norm} {r.shape} {r.layout} {r.mode}": r.pct_copy
                for r in rows if r.mode != "fwd+bwd" and r.megabytes >= LARGE_BYTES / 2**20
            },
            "large_fwd_pct_copy_into_new": {
                f"{r.norm} {r.shape} {r.layout} {r.mode}": r.pct_copy * copy_inplace / copy_new
                for r in rows if r.mode != "fwd+bwd" and r.megabytes >= LARGE_BYTES / 2**20
            },
            "channels_last_over_nchw_time": {
                f"{r.norm} {r.shape} {r.mode}": r.normkit_ms / nchw.normkit_ms
                for r in rows if r.layout == "channels_last" and r.norm in ("group", "instance")
                for nchw in rows
                if nchw.layout == "nchw" and (nchw.norm, nchw.shape, nchw.mode) == (r.norm, r.shape, r.mode)
            },
        }
    return out


def _table(results: list[Result], meta: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"normkit ({meta['backend']}) vs torch.nn on {meta['device']}, {meta['threads']} threads, "
                  f"{meta['timing']} timing: "
                  f"large copy {meta['copy_gbps']:.1f} GB/s in place (= 100% copy), "
                  f"{meta['copy_into_new_gbps']:.1f} GB/s into a new tensor")
    for col in ("norm", "shape", "layout", "mode", "dtype", "torch ms", "normkit ms", "speedup",
                "torch GB/s", "normkit GB/s", "% copy", "faults/call"):
        table.add_column(col, justify="left" if col in ("norm", "shape", "layout", "mode", "dtype") else "right")
    for r in results:
        style = "red" if r.speedup < 1.0 else None
        table.add_row(r.norm, "x".join(map(str, r.shape)), r.layout, r.mode, r.dtype, f"{r.torch_ms:.3f}",
                      f"{r.normkit_ms:.3f}", f"{r.speedup:.2f}x", f"{r.torch_gbps:.1f}", f"{r.normkit_gbps:.1f}",
                      f"{r.pct_copy:.0f}", f"{r.torch_faults:.0f} / {r.normkit_faults:.0f}", style=style)
    console = Console(width=180)
    console.print(table)
    for dtype, s in meta["summary"].items():
        fwd, bwd, low = (
            f"{v:.2f}x" if v == v else "n/a"
            for v in (s["geomean_speedup_fwd"], s["geomean_speedup_fwd_bwd"], s["min_speedup"])
        )
        console.print(f"[bold]{dtype}[/]: geomean speed-up forward {fwd}, forward+backward {bwd}, min {low}")
        if s["norm_act_speedup"]:
            fused = ", ".join(f"{k} {v:.2f}x" for k, v in s["norm_act_speedup"].items())
            console.print(f"[bold]{dtype}[/] norm+activation vs torch's two modules: {fused}")


def cases(args: argparse.Namespace) -> list[tuple[str, tuple[int, ...], str, str, str]]:
    """(norm, shape, layout, mode, dtype) to run. Eval differs from train for BatchNorm and
    InstanceNorm (running statistics), so ``--quick`` times eval for those alone."""
    grid = QUICK if args.quick else FULL
    out = []
    for norm in args.norms:
        shapes, layouts = grid[norm]
        if args.shape:
            shapes = args.shape if norm in ("layer", "rms") else [s for s in args.shape if 3 <= len(s) <= 5]
        for shape in shapes:
            for layout in layouts:
                if layout == "channels_last" and len(shape) not in (4, 5):
                    continue
                for mode in args.modes:
                    if args.quick and mode == "fwd-eval" and norm not in ("batch", "instance"):
                        continue
                    for dtype in args.dtypes:
                        out.append((norm, shape, layout, mode, dtype))
    return out


def refusal(norm: str, shape: tuple[int, ...], mode: str) -> str | None:
    """torch.nn's error for a case it cannot run (one value per channel in training, ...), found on the
    meta device without data; None where it runs."""
    theirs, _ = _modules(norm, shape)
    theirs.to("meta").train(mode != "fwd-eval")
    try:
        with torch.no_grad():
            theirs(torch.empty(shape, device="meta"))
    except (ValueError, RuntimeError) as err:
        return str(err)
    return None


def runnable(args: argparse.Namespace) -> list[tuple[str, tuple[int, ...], str, str, str]]:
    """``cases(args)`` without those torch.nn refuses (each named on stderr); none left is a usage error."""
    chosen = cases(args)
    if not chosen:
        raise SystemExit(
            "no case to time: batch, instance, group and group+silu take shapes of 3 to 5 dims, and --quick times "
            "fwd-eval for batch and instance only"
        )
    kept = []
    for case in chosen:
        why = refusal(case[0], case[1], case[3])
        if why is None:
            kept.append(case)
        else:
            print(f"skipped {case[0]} {'x'.join(map(str, case[1]))} {case[2]} {case[3]} {case[4]}: torch.nn refuses it ({why})", file=sys.stderr)
    if not kept:
        raise SystemExit("no case to time: torch.nn refuses every one selected")
    return kept


def _thread_count(value: str) -> int:
    """``--threads``: at most numba's thread count, which caps the cpu backend's kernels; beyond it torch would
    run more threads than normkit under one label."""
    threads = positive_int(value)
    if threads > numba.config.NUMBA_NUM_THREADS:
        raise argparse.ArgumentTypeError(
            f"expected at most {numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS, the most normkit's kernels run), got {value!r}"
        )
    return threads


def _json_value(value: object) -> object:
    """``value`` with every non-finite float as None: strict JSON has no NaN (a geomean over no rows, fault
    counts off the CPU)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _write_json(path: str, meta: dict[str, object], results: list[Result]) -> None:
    with open(path, "w") as fh:
        json.dump(_json_value({"meta": meta, "results": [asdict(r) for r in results]}), fh, indent=1, allow_nan=False)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit("--cuda-graph needs --device cuda")
    if args.cuda_graph and args.cold:
        raise SystemExit("--cold times eager calls; it does not combine with --cuda-graph")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.backend != "auto" and not kernels.load(args.backend).supports(torch.empty(2, 2, device=device), None):
        raise SystemExit(f"the {args.backend} backend does not serve {device.type} tensors: every call would time the reference")
    todo = runnable(args)
    min_time = args.min_time if args.min_time is not None else (0.02 if args.quick else 0.1)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 5)
    started = time.perf_counter()
    copy_new_gbps, copy_gbps = copy_bandwidth(device, min_time)
    meta: dict[str, object] = {
        "device": device.type if device.type != "cuda" else torch.cuda.get_device_name(device),
        "backend": args.backend,
        "timing": "cuda-graph replay" if args.cuda_graph else "eager, caches flushed" if args.cold else "eager",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "normkit": __version__,
        "machine": platform.machine(),
        "copy_gbps": copy_gbps,
        "copy_into_new_gbps": copy_new_gbps,
        "output_cache_mb": _pages.CACHE_LIMIT >> 20,  # the cpu backend's kept outputs (NORMKIT_OUTPUT_CACHE_MB)
        "quick": args.quick,
    }
    results: list[Result] = []

    def record() -> None:
        """Summary and JSON after every case, so an interrupted run keeps what it measured."""
        meta["summary"] = summarize(results, copy_gbps, copy_new_gbps)
        meta["seconds"] = time.perf_counter() - started
        if args.json:
            _write_json(args.json, meta, results)

    flush = torch.empty(FLUSH_BYTES // 4, device=device) if args.cold else None
    record()
    with backend(args.backend):
        for norm, shape, layout, mode, dtype in todo:
            results.append(
                run_case(norm, shape, layout, mode, dtype, device, copy_gbps, min_time, rounds, args.cuda_graph, flush)
            )
            if args.cuda_graph:
                torch.cuda.empty_cache()  # each case's graphs held a private memory pool
            record()
    _table(results, meta)
    return 0
