"""``normkit bench`` runs end to end on a tiny configuration and writes the documented JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numba
import pytest
import torch

from normkit import bench
from normkit.kernels import _pages
from normkit.cli import main

RESULT_KEYS = {
    "norm", "shape", "layout", "mode", "dtype", "torch_ms", "normkit_ms", "speedup",
    "torch_gbps", "normkit_gbps", "pct_copy", "megabytes", "torch_faults", "normkit_faults",
}


def _tiny(path: Path, backend: str = "reference") -> list[str]:
    """A tiny run of every norm, layout, mode and dtype. The harness is what is checked, so normkit runs
    on the reference backend: on the cpu one, bfloat16 with a fused SiLU would compile kernels nothing
    else in the default run needs (the entry-point test below runs the cpu backend)."""
    return [
        "bench", "--quick", "--dtypes", "fp32,bf16", "--shape", "2,8,6,6", "--shape", "4,16",
        "--min-time", "0.001", "--rounds", "1", "--backend", backend, "--json", str(path),
    ]


def test_bench_writes_results_and_summary(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(_tiny(out)) == 0
    data = json.loads(out.read_text())
    meta, results = data["meta"], data["results"]
    assert meta["copy_gbps"] > 0 and meta["copy_into_new_gbps"] > 0 and meta["quick"] is True
    assert meta["output_cache_mb"] == _pages.CACHE_LIMIT >> 20
    norms = {r["norm"] for r in results}
    assert norms == {"batch", "instance", "group", "group+silu", "layer", "rms"}
    assert {r["layout"] for r in results if r["norm"] == "group"} == {"nchw", "channels_last"}
    assert {r["mode"] for r in results} == {"fwd-train", "fwd-eval", "fwd+bwd"}
    assert {r["dtype"] for r in results} == {"fp32", "bf16"}
    for r in results:
        assert set(r) == RESULT_KEYS
        assert r["torch_ms"] > 0 and r["normkit_ms"] > 0
        assert r["torch_faults"] >= 0 and r["normkit_faults"] >= 0
    for dtype in ("fp32", "bf16"):
        summary = meta["summary"][dtype]
        assert {"geomean_speedup_fwd", "geomean_speedup_fwd_bwd", "min_speedup", "slower_than_torch",
                "large_fwd_pct_copy", "large_fwd_pct_copy_into_new", "channels_last_over_nchw_time"} <= set(summary)
    assert "geomean speed-up" in capsys.readouterr().out


def test_benchmarks_entry_point(tmp_path):
    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_bench.py"
    args = [a for a in _tiny(out, "cpu")[1:]] + ["--norms", "layer", "--modes", "fwd-train", "--dtypes", "fp32"]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
    assert json.loads(out.read_text())["results"][0]["norm"] == "layer"


def test_json_keeps_the_cases_measured_before_an_interruption(tmp_path, monkeypatch):
    out, measured = tmp_path / "bench.json", []
    real = bench.run_case

    def first_then_stop(*args, **kwargs):
        if measured:
            raise KeyboardInterrupt
        measured.append(real(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(bench, "run_case", first_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(_tiny(out))
    data = json.loads(out.read_text())
    assert [r["norm"] for r in data["results"]] == [measured[0].norm]
    assert data["meta"]["summary"] and data["meta"]["seconds"] > 0


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="normkit bench")
    bench.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dtypes", "fp32,xyz"], "argument --dtypes: unknown dtypes ['xyz']; choose from fp32, bf16, fp64, fp16"),
        (["--dtypes", ""], "argument --dtypes: unknown dtypes ''; choose from fp32, bf16, fp64, fp16"),
        (["--norms", "foo"], "argument --norms: unknown norms ['foo']; choose from batch, instance, group, group+silu, layer, rms"),
        (["--modes", "bar"], "argument --modes: unknown modes ['bar']; choose from fwd-train, fwd-eval, fwd+bwd"),
        (["--shape", "abc"], "argument --shape: expected a positive integer, got 'abc'"),
        (["--shape", "8,0,4"], "argument --shape: expected a positive integer, got '0'"),
        (["--backend", "nosuch"], "argument --backend: unknown normkit backend 'nosuch'; choose one of ('auto', 'reference'"),
        (["--threads", "-1"], "argument --threads: expected a positive integer, got '-1'"),
        (["--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
        (["--rounds", "0"], "argument --rounds: expected a positive integer, got '0'"),
        (["--min-time", "nan"], "argument --min-time: expected a finite number of seconds >= 0, got 'nan'"),
        (["--min-time", "-1"], "argument --min-time: expected a finite number of seconds >= 0, got '-1'"),
        (["--json", "no/such/folder/x.json"], "argument --json: cannot write 'no/such/folder/x.json': there is no folder"),
        (["--json", "."], "argument --json: cannot write '.': it is a folder"),
    ],
)
def test_bad_option_values_are_usage_errors(argv, message, capsys):
    """Rejected while parsing, so before any timing: usage, the error with the valid choices, status 2."""
    with pytest.raises(SystemExit) as exit_:
        _parse(*argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: normkit bench") and f"error: {message}" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be made")
def test_json_into_a_folder_that_takes_no_files_is_a_usage_error(capsys):
    """Permissions do not tell (root writes anywhere they allow): making a file is tried."""
    with pytest.raises(SystemExit) as exit_:
        _parse("--json", "/proc/x.json")
    assert exit_.value.code == 2
    assert "cannot write '/proc/x.json': no file can be made in '/proc'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["bench", "--quick"], ["lab", "--tiny"]], ids=["bench", "lab"])
def test_cuda_without_a_cuda_device_is_a_usage_error(command, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--device", "cuda"])
    assert exit_.value.code == 2
    assert "error: argument --device: no CUDA device is available" in capsys.readouterr().err


def test_threads_beyond_numbas_are_a_usage_error(capsys):
    """torch would take the threads, normkit's kernels would not: the comparison would run two thread counts under
    one label."""
    most = numba.config.NUMBA_NUM_THREADS
    assert _parse("--threads", str(most)).threads == most
    with pytest.raises(SystemExit) as exit_:
        _parse("--threads", str(most + 1))
    assert exit_.value.code == 2
    assert f"argument --threads: expected at most {most} (NUMBA_NUM_THREADS" in capsys.readouterr().err


def test_json_is_strict_where_a_summary_has_no_rows(tmp_path):
    """A forward+backward-only run has no forward geomean: null, not the bare NaN strict parsers refuse."""
    out = tmp_path / "bench.json"
    assert main([*_tiny(out), "--modes", "fwd+bwd", "--norms", "layer"]) == 0

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    summary = json.loads(out.read_text(), parse_constant=refuse)["meta"]["summary"]["fp32"]
    assert summary["geomean_speedup_fwd"] is None and summary["geomean_speedup_fwd_bwd"] > 0


def test_a_bad_value_stops_the_command_before_it_times_anything(monkeypatch, capsys):
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a: pytest.fail("timing started"))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--quick", "--norms", "batch,foo"])
    assert exit_.value.code == 2 and "unknown norms ['foo']" in capsys.readouterr().err


def test_parsed_options_make_the_cases():
    """Shapes go to the norms that take them (3 to 5 dims for the per-channel and group norms), and every
    case builds its layers."""
    args = _parse("--quick", "--dtypes", "fp64", "--modes", "fwd+bwd", "--shape", "2,8,6,6", "--shape", "2,4,2,2,2,3")
    assert args.threads is None and args.backend == "auto"
    got = bench.cases(args)
    assert {(norm, shape) for norm, shape, *_ in got} == {
        *((norm, (2, 8, 6, 6)) for norm in ("batch", "instance", "group", "group+silu")),
        *((norm, shape) for norm in ("layer", "rms") for shape in ((2, 8, 6, 6), (2, 4, 2, 2, 2, 3))),
    }
    assert {(mode, dtype) for *_, mode, dtype in got} == {("fwd+bwd", "fp64")}
    for norm, shape, *_ in got:
        bench._modules(norm, shape)


def test_any_channel_count_gets_a_group_count_that_divides_it():
    """``--shape`` may give channels that 32 does not divide: the group norms take a divisor, as many
    groups as 32 allows."""
    args = _parse("--quick", "--norms", "group,group+silu", "--dtypes", "fp32", "--shape", "2,48,4,4", "--shape", "2,6,4,4")
    for norm, shape, *_ in bench.cases(args):
        theirs, ours = bench._modules(norm, shape)
        assert ours.num_groups == {48: 16, 6: 2}[shape[1]] == theirs.num_groups


def test_cases_torch_refuses_are_skipped_with_its_reason(capsys):
    """One value per channel in training: torch.nn raises, so the case is named and left out, not a
    traceback halfway through the run; the evaluation case of the same shape stays."""
    kept = bench.runnable(_parse("--norms", "batch,layer", "--dtypes", "fp32", "--modes", "fwd-train,fwd-eval",
                                 "--shape", "1,8,1,1"))
    assert ("batch", (1, 8, 1, 1), "nchw", "fwd-train", "fp32") not in kept
    assert ("batch", (1, 8, 1, 1), "nchw", "fwd-eval", "fp32") in kept and ("layer", (1, 8, 1, 1), "contiguous", "fwd-train", "fp32") in kept
    assert "skipped batch 1x8x1x1 nchw fwd-train fp32: torch.nn refuses it (Expected more than 1 value" in capsys.readouterr().err


def test_a_backend_that_does_not_serve_the_device_is_refused(monkeypatch):
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a: pytest.fail("timing started"))
    with pytest.raises(SystemExit, match="the triton backend does not serve cpu tensors"):
        main(["bench", "--quick", "--backend", "triton"])


@pytest.mark.parametrize("argv", [("--quick", "--norms", "layer", "--modes", "fwd-eval"), ("--norms", "batch", "--shape", "64")])
def test_a_selection_without_cases_is_an_error(argv):
    with pytest.raises(SystemExit, match="no case to time"):
        bench.runnable(_parse(*argv))


def test_quick_times_eval_where_it_differs_from_training():
    got = {(norm, mode) for norm, _, _, mode, _ in bench.cases(_parse("--quick"))}
    assert {("batch", "fwd-eval"), ("instance", "fwd-eval")} <= got
    assert ("group", "fwd-eval") not in got and ("layer", "fwd-eval") not in got


def test_cuda_graph_timing_needs_a_cuda_device():
    with pytest.raises(SystemExit, match="--cuda-graph needs --device cuda"):
        main(["bench", "--quick", "--cuda-graph"])


def test_markdown_table_has_a_row_per_case_and_the_three_modes(tmp_path):
    out = tmp_path / "bench.json"
    main(_tiny(out))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_table.py"
    text = subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True, text=True).stdout
    results = json.loads(out.read_text())["results"]
    keys = {(r["norm"], tuple(r["shape"]), r["layout"], r["dtype"]) for r in results}
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| norm")]
    assert len(rows) == len(keys)
    assert "| norm | shape | layout | dtype | fwd-train | fwd-eval | fwd+bwd |" in text
    batch = next(r for r in results if r["norm"] == "batch" and r["mode"] == "fwd-eval")
    assert f"{batch['speedup']:.2f}x" in text


def test_cold_timing_flushes_the_cache_before_every_call(tmp_path, monkeypatch):
    """Each timed call follows a flush and its own warm-up; the sides take turns, call by call, the
    first of each sweep alternating, and each gets its own median."""
    events = []
    real_fill = torch.Tensor.fill_

    def fill(t, value):
        if t.numel() * t.element_size() == bench.FLUSH_BYTES:
            events.append("flush")
        return real_fill(t, value)

    def side(name, seconds):
        def call():
            events.append(name)
            time.sleep(seconds)
        return call

    monkeypatch.setattr(bench, "FLUSH_BYTES", 1 << 20)
    monkeypatch.setattr(torch.Tensor, "fill_", fill)
    warms = [lambda: events.append("warm a"), lambda: events.append("warm b")]
    medians = bench.measure_cold([side("a", 0.002), side("b", 0.0)], 0.0, torch.empty(bench.FLUSH_BYTES // 4), warms)
    assert medians[0] >= 0.002 > medians[1] >= 0
    ab = ["flush", "warm a", "a", "flush", "warm b", "b"]
    ba = ab[3:] + ab[:3]
    assert events == ["a", "b"] + (ab + ba) * 3  # six sweeps: three in each order
    out = tmp_path / "bench.json"
    assert main(_tiny(out)[:-2] + ["--cold", "--norms", "layer", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["timing"] == "eager, caches flushed"


def test_cold_timing_does_not_combine_with_graph_replay(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda passes its own check
    with pytest.raises(SystemExit, match="--cold"):
        main(["bench", "--quick", "--device", "cuda", "--cuda-graph", "--cold"])


def test_faults_per_call_counts_fresh_pages():
    """An output above glibc's mmap threshold is fresh pages on every call: 64 MB, 16,384 pages of 4 KB
    (fewer where the kernel backs it with huge pages, still more than a few)."""
    cpu = torch.device("cpu")
    assert bench.faults_per_call(lambda: torch.empty(16 << 20).fill_(1.0), cpu) > 16
    assert math.isnan(bench.faults_per_call(lambda: None, torch.device("meta")))


@pytest.mark.slow
def test_kernel_ab_compares_a_revision_with_the_tree():
    """The A/B tool loads the kernels of a git revision beside the working tree's (compiles them again)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_ab.py"
    out = subprocess.run(
        [sys.executable, str(script), "--small", "--rounds", "1", "--min-time", "0.01", "--threads", "1"], check=True,
        capture_output=True, text=True,
    )
    assert "tree / rev" in out.stdout and "layer 2x4x64 contiguous backward" in out.stdout
    assert re.search(r"threads\s+1,", out.stdout)  # the title may wrap


def test_kernel_ab_swaps_the_driver_the_backend_calls():
    """A swap must reach the driver a call runs: the backend caches each set-up with its driver, so a
    swap the cache did not see would time one version twice (every ratio 1.0). Inside
    ``versioned_setups`` the versions alternate call by call; afterwards the backend is as it was."""
    import importlib.util

    from normkit.kernels import cpu

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_ab.py"
    spec = importlib.util.spec_from_file_location("kernel_ab_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    other = {family: {act: (object(), object()) for act in table} for family, table in cpu.DRIVERS.items()}
    ours = cpu.DRIVERS
    setup = cpu._call

    def serial_driver():
        call = cpu._call("forward", (1, 1, 2, 3, 40), (1, 1, 3, 1), torch.float32, None, 1, 1)
        return call.driver, call.launch.loops

    serial_driver()
    with tool.versioned_setups():
        for _ in range(2):
            tool.use(other)
            driver, loops = serial_driver()
            assert driver is other[f"forward_{loops}"][None][1]
            tool.use(ours)
            driver, loops = serial_driver()
            assert driver is ours[f"forward_{loops}"][None][1]
        tool.use(other)
    assert cpu._call is setup and cpu.DRIVERS is ours
    driver, loops = serial_driver()
    assert driver is ours[f"forward_{loops}"][None][1]
    try:  # outside the context a swap still reaches the call's driver
        tool.use(other)
        driver, loops = serial_driver()
        assert driver is other[f"forward_{loops}"][None][1]
    finally:
        tool.use(ours)
    driver, loops = serial_driver()
    assert driver is ours[f"forward_{loops}"][None][1]


def test_kernel_ab_selects_cases_by_name():
    """``--only``: the cases whose name has one of the words; a word matching none stops the run."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_ab.py"
    spec = importlib.util.spec_from_file_location("kernel_ab_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.select(tool.CASES, "") == tool.CASES
    chosen = tool.select(tool.CASES, "layer,8x32x64")
    assert [tool.case_name(*c) for c in chosen] == ["layer 8x512x768 contiguous", "group 8x32x64x64 channels_last"]
    with pytest.raises(SystemExit, match="matches none"):
        tool.select(tool.CASES, "nosuchnorm")


def test_kernel_ab_times_the_drivers_with_the_fused_activation():
    """``--activation``: the timed calls run the epilogue (the forward is the plain one through it)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_ab.py"
    spec = importlib.util.spec_from_file_location("kernel_ab_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    torch.manual_seed(0)
    plain = tool.operations("group", (2, 64, 4, 4), False, torch.float32)
    torch.manual_seed(0)
    fused = tool.operations("group", (2, 64, 4, 4), False, torch.float32, "silu")
    (y, _), (z, _) = plain["forward"][0](), fused["forward"][0]()
    torch.testing.assert_close(z, torch.nn.functional.silu(y))
    dx = fused["backward"][0]().dx
    assert dx.shape == y.shape and not torch.equal(dx, plain["backward"][0]().dx)


@pytest.mark.slow
def test_clients_time_the_norm_calls_inside_a_training_step():
    """``clients.py --per-call``: the UNet's GroupNorm forward and backward node, both models, one line each."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "clients.py"
    out = subprocess.run([sys.executable, str(script), "--per-call"], check=True, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if "inside a step" in line]
    assert len(lines) == 2 and "forward" in lines[0] and "backward" in lines[1]
    assert all("torch.nn" in line and "normkit" in line and "(medians of" in line for line in lines)


@pytest.mark.parametrize("norm,shape", [("group", s) for s in bench.CONV_SHAPES] + [("layer", s) for s in bench.TOKEN_SHAPES])
def test_cold_warm_up_takes_the_timed_calls_paths(norm, shape):
    """The warm-up input of ``--cold`` keeps the layer's channels or features, fits in the shape, and has
    at least ``WARM_ELEMENTS`` elements where the shape has them, past the cpu backend's serial limit:
    the code it brings back into cache (parallel or serial driver) is the code the timed call runs."""
    from normkit.kernels import cpu

    warm = bench._warm_shape(shape, norm)
    assert len(warm) == len(shape) and all(w <= s for w, s in zip(warm, shape))
    assert warm[1 if norm == "group" else -1] == shape[1 if norm == "group" else -1]
    assert math.prod(warm) >= min(math.prod(shape), bench.WARM_ELEMENTS) >= min(math.prod(shape), cpu.SERIAL_BELOW)
    assert (cpu.threads_for(math.prod(warm)) > 1) == (cpu.threads_for(math.prod(shape)) > 1)
