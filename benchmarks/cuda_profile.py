"""Where the time of a normkit call goes on a CUDA device: the numbers for tuning the Triton backend.

For each case: the device time of every kernel in one forward and one forward+backward, normkit and
torch.nn side by side (torch.profiler); the host time of an eager normkit forward by function
(cProfile), against torch.nn's eager call; and a sweep of the Triton planner's limits (largest
streamed tile, largest group handled whole, programs per multiprocessor) timed from CUDA-graph
replays, so a better default shows up as a faster row.

Run on a CUDA machine: ``python benchmarks/cuda_profile.py [--cases gn-cl,bn-cl] [--sweep gn-cl]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats

import torch
from torch.profiler import ProfilerActivity, profile

from normkit import bench, kernels
from normkit.functional import _layout as L

# name -> (norm, shape, layout), as in ``normkit bench``.
CASES = {
    "gn-cl": ("group", (32, 64, 56, 56), "channels_last"),
    "gn-nchw": ("group", (32, 64, 56, 56), "nchw"),
    "bn-cl": ("batch", (32, 64, 56, 56), "channels_last"),
    "bn-nchw-small": ("batch", (8, 256, 32, 32), "nchw"),
    "in-cl": ("instance", (16, 128, 64, 64), "channels_last"),
    "ln": ("layer", (8, 512, 768), "contiguous"),
    "rms": ("rms", (4, 2048, 1024), "contiguous"),
}
REPEATS = 10


def _steps(norm: str, shape: tuple[int, ...], layout: str, mode: str):
    device = torch.device("cuda")
    theirs, ours = (m.to(device) for m in bench._modules(norm, shape))
    ours.load_state_dict(theirs.state_dict())
    x = bench._input(shape, layout, torch.float32, device)
    dy = torch.randn_like(x)
    return bench._step(theirs, x, dy, mode), bench._step(ours, x, dy, mode)


def kernel_times(fn) -> list[tuple[str, float, float]]:
    """(kernel, µs per call, launches per call) of ``fn`` on the device, largest first."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEATS):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if total:
            rows.append((e.key, total / REPEATS, e.count / REPEATS))
    return sorted(rows, key=lambda r: -r[1])


def host_profile(fn, calls: int = 200) -> str:
    """The top host-side functions of ``calls`` eager calls, by own time."""
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    return out.getvalue()


def sweep(norm: str, shape: tuple[int, ...], layout: str) -> None:
    """Graph-replay time of normkit's forward and forward+backward for planner limits around the defaults."""
    triton = kernels.load("triton")
    defaults = (triton.max_tile, triton.max_fused, triton.programs)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    configs = [(t, defaults[1], k) for t in (1024, 2048, 4096, 8192) for k in (4, 8)]
    configs += [(defaults[0], f, 4) for f in (4096, 16384)]
    print(f"  sweep (max_tile, max_fused, programs per SM): fwd-train µs / fwd+bwd µs; defaults {defaults[:2]}, 4 per SM")
    try:
        for max_tile, max_fused, per_sm in configs:
            triton.max_tile, triton.max_fused, triton.programs = max_tile, max_fused, per_sm * sms
            times = []
            for mode in ("fwd-train", "fwd+bwd"):
                ours = _steps(norm, shape, layout, mode)[1]
                times.append(bench.measure(bench.graphed(ours), 0.02) * 1e6)
            tile = triton.tile(torch.empty(_view_shape(norm, shape, layout), device="meta"))
            print(f"    ({max_tile:5d}, {max_fused:5d}, {per_sm}) {tile}: {times[0]:8.1f} / {times[1]:8.1f}")
    finally:
        triton.max_tile, triton.max_fused, triton.programs = defaults


def _view_shape(norm: str, shape: tuple[int, ...], layout: str) -> list[int]:
    x = torch.empty(shape, device="meta")
    cl = layout == "channels_last"
    if norm in ("layer", "rms"):
        return L.trailing_view(x, shape[-1])
    if norm == "batch":
        return L.per_channel_view(x, cl)
    if norm == "instance":
        return L.per_instance_view(x, cl)
    return L.per_group_view(x, math.gcd(32, shape[1]), cl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--sweep", default="gn-cl,bn-cl", help="cases that get the planner sweep ('' for none)")
    parser.add_argument("--host-profile", default="gn-nchw", help="case whose eager forward gets a cProfile")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for name in args.cases.split(","):
        norm, shape, layout = CASES[name]
        print(f"== {name}: {norm} {'x'.join(map(str, shape))} {layout} fp32")
        for mode in ("fwd-train", "fwd+bwd"):
            for side, fn in zip(("torch", "normkit"), _steps(norm, shape, layout, mode)):
                rows = kernel_times(fn)
                total = sum(r[1] for r in rows)
                print(f"  {mode} {side}: {total:.1f} µs of kernels")
                for key, us, count in rows[:8]:
                    print(f"    {us:8.1f} µs  x{count:4.1f}  {key[:90]}")
        if name in args.sweep.split(","):
            sweep(norm, shape, layout)
    if args.host_profile:
        norm, shape, layout = CASES[args.host_profile]
        theirs, ours = _steps(norm, shape, layout, "fwd-train")
        print(f"== host time of one eager forward, {args.host_profile}: torch {bench.measure(theirs, 0.2) * 1e6:.1f} µs, "
              f"normkit {bench.measure(ours, 0.2) * 1e6:.1f} µs")
        print(host_profile(ours))


if __name__ == "__main__":
    main()
