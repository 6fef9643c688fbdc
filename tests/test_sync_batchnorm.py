"""SyncBatchNorm against single-process BatchNorm on the concatenated batch, over real gloo process groups.

Each world size is one spawned job that runs every case (uneven and empty per-rank batches, dtypes,
affine, momentum, layouts, DDP) and reports all mismatches together, so a failure names its cases.
Spawned processes use the reference backend: loading a compiled backend in every fresh process costs
more than the cases themselves, and the backends are held to the reference by their own tests.
"""

from __future__ import annotations

import copy
import itertools
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normkit
import normkit.nn as nk
from normkit.distributed import SyncBatchNorm

JOB_TIMEOUT_S = 120
C = 3
LAYOUTS = {"2d": (), "3d": (4,), "4d": (2, 3), "4d_cl": (2, 3)}
BATCHES = {2: [(3, 5), (0, 4), (1, 1)], 3: [(2, 0, 5), (0, 3, 1)]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, job) -> None:
    """One rank. A rank whose checks all passed leaves through ``os._exit(0)``: the interpreter's
    teardown in a spawned gloo rank sometimes aborts in C++ ("terminate called without an active
    exception", after every check and ``destroy_process_group`` had returned), which would fail the
    job on torch's exit rather than on a result."""
    torch.set_num_threads(1)
    normkit.set_backend("reference")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        failures = job(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if failures:
        raise AssertionError(f"rank {rank}: {len(failures)} mismatch(es):\n" + "\n".join(failures))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(job, world: int) -> None:
    """Run ``job(rank, world)`` on ``world`` gloo ranks; fail on any rank's error or past the time limit."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), job), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed job did not finish within {JOB_TIMEOUT_S}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def _close(failures: list[str], name: str, actual, expected, dtype: torch.dtype) -> None:
    """Record a mismatch; bfloat16 is judged against its largest value (sums of rounded per-rank terms)."""
    scale = float(torch.as_tensor(expected).abs().max()) if torch.as_tensor(expected).numel() else 0.0
    tol = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}.get(
        dtype, dict(rtol=2e-2, atol=2e-2 * max(scale, 1.0))
    )
    try:
        torch.testing.assert_close(actual, expected, **tol)
    except AssertionError as err:
        failures.append(f"{name}: {str(err).splitlines()[0:3]}")


def _reference_bn(layout: str):
    return {"2d": nn.BatchNorm1d, "3d": nn.BatchNorm1d, "4d": nn.BatchNorm2d, "4d_cl": nn.BatchNorm2d}[layout]


def _check_case(rank: int, batches, dtype, affine: bool, momentum, layout: str, seed: int) -> list[str]:
    failures: list[str] = []
    tag = f"batches={batches} {dtype} affine={affine} momentum={momentum} {layout}"
    gen = torch.Generator().manual_seed(seed)
    ref = _reference_bn(layout)(C, momentum=momentum, affine=affine, dtype=dtype)
    sync = SyncBatchNorm(C, momentum=momentum, affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.randn(C, generator=gen, dtype=dtype))
            ref.bias.copy_(torch.randn(C, generator=gen, dtype=dtype))
            sync.weight.copy_(ref.weight)
            sync.bias.copy_(ref.bias)
    start, n = sum(batches[:rank]), batches[rank]
    for step in range(2):
        shape = (sum(batches), C, *LAYOUTS[layout])
        full = (torch.randn(shape, generator=gen, dtype=dtype) * (step + 2) + 3 * step).requires_grad_()
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        local = full.detach()[start : start + n].clone()
        if layout == "4d_cl":
            local = local.contiguous(memory_format=torch.channels_last)
        local.requires_grad_()
        y_ref = ref(full)
        (y_ref * dy).sum().backward()
        y = sync(local)
        (y * dy[start : start + n]).sum().backward()
        where = f"{tag} step={step}"
        _close(failures, f"{where} output", y, y_ref.detach()[start : start + n], dtype)
        _close(failures, f"{where} input grad", local.grad, full.grad[start : start + n], dtype)
        if layout == "4d_cl" and n > 1 and not y.is_contiguous(memory_format=torch.channels_last):
            failures.append(f"{where}: output lost channels_last")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            _close(failures, f"{where} {name}", getattr(sync, name), getattr(ref, name), dtype)
        if affine:
            for name in ("weight", "bias"):
                grad = getattr(sync, name).grad.clone()
                dist.all_reduce(grad)
                _close(failures, f"{where} {name} grad (summed over ranks)", grad, getattr(ref, name).grad, dtype)
    sync.eval()
    ref.eval()
    with _no_collectives():
        y = sync(local.detach())
    _close(failures, f"{tag} eval output", y, ref(full.detach())[start : start + n].detach(), dtype)
    return failures


class _no_collectives:
    """Make any all-reduce fail inside the block: eval mode must not communicate."""

    def __enter__(self):
        self.saved = dist.all_reduce

        def refuse(*args, **kwargs):
            raise AssertionError("eval-mode SyncBatchNorm called all_reduce")

        dist.all_reduce = refuse

    def __exit__(self, *exc):
        dist.all_reduce = self.saved


def _ddp_case(rank: int, world: int, batches, channels_last: bool = False) -> list[str]:
    """DDP + SyncBatchNorm gradients equal 1/world of the single-process full-batch gradients; an
    in-place ReLU follows the norm (its channels-last output is no view)."""
    failures: list[str] = []
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nk.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 16, 3)
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    full_model = copy.deepcopy(model)
    from normkit.convert import convert_sync_batchnorm

    ddp = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(model))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sum(batches), 2, 4, 4, generator=gen).contiguous(memory_format=fmt)
    dy = torch.randn(sum(batches), 3, generator=gen)
    start, n = sum(batches[:rank]), batches[rank]
    (ddp(x[start : start + n]) * dy[start : start + n]).sum().backward()
    (full_model(x) * dy).sum().backward()
    for (name, p), q in zip(model.named_parameters(), full_model.parameters()):
        _close(failures, f"DDP batches={batches} {name} grad", p.grad * world, q.grad, torch.float32)
    _close(failures, f"DDP batches={batches} running_var", model[1].running_var, full_model[1].running_var, torch.float32)
    return failures


def _act_case(rank: int, batches, act_layer, channels_last: bool) -> list[str]:
    """convert_sync_batchnorm of BatchNormAct2d keeps the activation: outputs, gradients and running
    statistics of the single-process BatchNormAct2d on the full batch."""
    from normkit.convert import convert_sync_batchnorm

    failures: list[str] = []
    tag = f"act={act_layer} batches={batches} channels_last={channels_last}"
    torch.manual_seed(3)
    full = nk.BatchNormAct2d(C, act_layer=act_layer)
    with torch.no_grad():
        full.weight.uniform_(0.5, 1.5)
        full.bias.uniform_(-0.5, 0.5)
    sync = convert_sync_batchnorm(copy.deepcopy(full))
    if type(sync) is not nk.SyncBatchNormAct2d:
        return [f"{tag}: converted to {type(sync).__name__}"]
    gen = torch.Generator().manual_seed(4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(sum(batches), C, 3, 4, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(sum(batches), C, 3, 4, generator=gen)
    start, n = sum(batches[:rank]), batches[rank]
    local = x.detach()[start : start + n].clone().requires_grad_()
    y_full, y = full(x), sync(local)
    (y_full * dy).sum().backward()
    (y * dy[start : start + n]).sum().backward()
    _close(failures, f"{tag} output", y, y_full.detach()[start : start + n], torch.float32)
    _close(failures, f"{tag} input grad", local.grad, x.grad[start : start + n], torch.float32)
    _close(failures, f"{tag} running_var", sync.running_var, full.running_var, torch.float32)
    for name in ("weight", "bias"):
        grad = getattr(sync, name).grad.clone()
        dist.all_reduce(grad)
        _close(failures, f"{tag} {name} grad (summed over ranks)", grad, getattr(full, name).grad, torch.float32)
    return failures


def _compile_case(rank: int, world: int, batches) -> list[str]:
    """torch.compile of a model holding SyncBatchNorm (graph breaks allowed at the collectives, as
    torch's own SyncBatchNorm has them) gives the eager results."""
    failures: list[str] = []
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), SyncBatchNorm(4), nn.ReLU())
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)
    gen = torch.Generator().manual_seed(2)
    start, n = sum(batches[:rank]), batches[rank]
    x = torch.randn(sum(batches), 2, 4, 4, generator=gen)[start : start + n]
    dy = torch.randn(n, 4, 4, 4, generator=gen)
    for step in range(2):
        y_c, y_e = compiled(x * (step + 1)), eager(x * (step + 1))
        (y_c * dy).sum().backward()
        (y_e * dy).sum().backward()
        _close(failures, f"compiled batches={batches} step={step} output", y_c, y_e, torch.float32)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        _close(failures, f"compiled batches={batches} {name} grad", p.grad, q.grad, torch.float32)
    _close(failures, f"compiled batches={batches} running_var", model[1].running_var, eager[1].running_var, torch.float32)
    return failures


def _refusals_case(rank: int) -> list[str]:
    """Bad input raises torch's error on every rank before any exchange (none waits for the others); an
    empty batch on every rank gives an empty output and leaves the running statistics, as BatchNorm."""
    failures: list[str] = []
    cases = [
        ("int input", SyncBatchNorm(2), torch.ones(2, 2, dtype=torch.long), NotImplementedError, "not implemented for 'Long'"),
        ("eps=0", SyncBatchNorm(2, eps=0.0), torch.ones(2, 2), ValueError, "eps must be positive"),
        ("channels", SyncBatchNorm(3), torch.randn(2, 4), RuntimeError, "running_mean should contain 4 elements not 3"),
        ("dtypes", SyncBatchNorm(2), torch.randn(2, 2, dtype=torch.float64), RuntimeError, "mixed dtype"),
        ("mask", SyncBatchNorm(2), torch.randn(2, 2), NotImplementedError, "mask= is not supported"),
    ]
    for name, layer, x, error, words in cases:
        try:
            layer(x, torch.ones(2, 1, dtype=torch.bool)) if name == "mask" else layer(x)
            failures.append(f"rank {rank} {name}: no error")
        except error as err:
            if words not in str(err):
                failures.append(f"rank {rank} {name}: {err}")
    layer = SyncBatchNorm(3)
    x = torch.randn(0, 3, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    if y.shape != x.shape or not torch.equal(layer.running_var, torch.ones(3)) or layer.weight.grad.abs().sum() != 0:
        failures.append(f"rank {rank} empty everywhere: {tuple(y.shape)} {layer.running_var} {layer.weight.grad}")
    return failures


def _job(rank: int, world: int) -> list[str]:
    failures: list[str] = []
    layouts = itertools.cycle(LAYOUTS)
    grid = itertools.product(BATCHES[world], (torch.float32, torch.float64), (True, False), (0.1, None))
    for seed, (batches, dtype, affine, momentum) in enumerate(grid):
        failures += _check_case(rank, batches, dtype, affine, momentum, next(layouts), seed)
    failures += _check_case(rank, BATCHES[world][0], torch.bfloat16, True, 0.1, "4d_cl", 99)
    failures += _ddp_case(rank, world, BATCHES[world][0])
    failures += _ddp_case(rank, world, BATCHES[world][1])
    failures += _ddp_case(rank, world, BATCHES[world][0], channels_last=True)
    for act_layer, channels_last in (("relu", False), ("silu", True), ("gelu", False), (nn.Tanh, True)):
        failures += _act_case(rank, BATCHES[world][0], act_layer, channels_last)
    if world == 2:
        failures += _compile_case(rank, world, BATCHES[world][0])
        failures += _refusals_case(rank)
    return failures


@pytest.mark.parametrize("world", [2, 3])
def test_sync_batchnorm_matches_full_batch_batchnorm(world: int) -> None:
    _spawn(_job, world)


def test_sync_batchnorm_act_without_process_group_is_batchnorm_act() -> None:
    torch.manual_seed(0)
    ref = nk.BatchNormAct2d(C, act_layer="silu")
    sync = nk.SyncBatchNormAct2d(C, act_layer="silu")
    x = torch.randn(4, C, 3, 3)
    torch.testing.assert_close(sync(x), ref(x))
    assert list(sync.state_dict()) == list(nn.BatchNorm2d(C).state_dict())
    with pytest.raises(ValueError, match="expected 4D input"):
        sync(torch.randn(4, C))


def test_without_process_group_falls_back_to_batch_norm() -> None:
    torch.manual_seed(0)
    ref, sync = nn.BatchNorm2d(C), SyncBatchNorm(C)
    x = torch.randn(4, C, 3, 3, requires_grad=True)
    torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)
    sync.eval(), ref.eval()
    torch.testing.assert_close(sync(x), ref(x))


def test_mask_without_process_group_as_batch_norm() -> None:
    torch.manual_seed(0)
    x, mask = torch.randn(4, C, 3, 3), torch.rand(4, 1, 3, 3) > 0.3
    ours, local = SyncBatchNorm(C), nk.BatchNorm2d(C)
    torch.testing.assert_close(ours(x, mask), local(x, mask))
    torch.testing.assert_close(ours.running_var, local.running_var)


def test_state_dict_and_constructor_match_torch() -> None:
    theirs = nn.SyncBatchNorm(5, eps=1e-3, momentum=None, affine=True, track_running_stats=True)
    ours = SyncBatchNorm(5, eps=1e-3, momentum=None, affine=True, track_running_stats=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        theirs.running_mean.uniform_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert ours.process_group is None and SyncBatchNorm(5, affine=False).weight is None
    assert SyncBatchNorm(5, track_running_stats=False).running_mean is None


def test_input_errors_match_torch() -> None:
    with pytest.raises(ValueError, match="expected at least 2D input"):
        SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        SyncBatchNorm(0)(torch.randn(2, 0))


def test_ddp_example_runs_under_torchrun() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "normkit.examples.ddp_train", "--steps", "10"]
    env = {**os.environ, "NORMKIT_BACKEND": "reference"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 rank(s) over gloo" in done.stdout
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("local BN", "SyncBN"))]
    assert [row[-5] for row in rows] == ["2", "4"], done.stdout
