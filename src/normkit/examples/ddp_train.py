"""DDP training with SyncBatchNorm against per-rank BatchNorm at small per-rank batches.

    torchrun --nproc-per-node 2 -m normkit.examples.ddp_train [--batch 2] [--steps 150]

Runs on CPU with gloo. Both runs start from the same weights and see the same data; the only
difference is whether BatchNorm statistics come from the rank's own few samples or from the batch
of all ranks. Without torchrun it runs as a single rank, where both modes coincide.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import time

import torch
import torch.distributed as dist
from torch import nn

import normkit.nn as nk
from normkit.convert import convert_sync_batchnorm

CLASSES = 4


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class templates with noise and a random per-sample contrast and offset, so batch statistics vary."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    x = templates[labels] + 1.5 * torch.randn(n, 3, 8, 8, generator=gen)
    contrast = torch.rand(n, 1, 1, 1, generator=gen) * 1.5 + 0.5
    offset = torch.randn(n, 1, 1, 1, generator=gen)
    return x * contrast + offset, labels


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nk.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nk.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES),
    )


def train(model: nn.Module, data, batch: int, steps: int, rank: int, world: int) -> dict[str, float]:
    """Train under DDP on this rank's slice of each global batch; evaluate with running statistics."""
    x, y = data
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    order = torch.Generator().manual_seed(1)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randperm(x.shape[0], generator=order)[: batch * world][rank * batch : (rank + 1) * batch]
        loss = nn.functional.cross_entropy(ddp(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    elapsed = time.perf_counter() - start
    train_loss = torch.stack(losses[-30:]).mean()
    dist.all_reduce(train_loss)
    model.eval()
    test_x, test_y = make_data(1024, seed=2)
    with torch.no_grad():
        logits = model(test_x)
    return {
        "train loss": train_loss.item() / world,
        "eval loss": nn.functional.cross_entropy(logits, test_y).item(),
        "eval acc": (logits.argmax(1) == test_y).float().mean().item(),
        "seconds": elapsed,
    }


def _init_process_group() -> None:
    """Join torchrun's group, or make a one-rank group when started without torchrun."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="samples per rank per step")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    _init_process_group()
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    data = make_data(2048, seed=1)
    base = make_model()
    results = {
        "local BN": (args.batch, train(copy.deepcopy(base), data, args.batch, args.steps, rank, world)),
        "SyncBN": (args.batch * world, train(convert_sync_batchnorm(copy.deepcopy(base)), data, args.batch, args.steps, rank, world)),
    }
    if rank == 0:
        print(f"normkit DDP example: {world} rank(s) over gloo, {args.batch} samples per rank, {args.steps} steps")
        print(f"{'mode':<10} {'BN batch':>8} {'train loss':>11} {'eval loss':>10} {'eval acc':>9} {'seconds':>8}")
        for mode, (bn_batch, r) in results.items():
            print(
                f"{mode:<10} {bn_batch:>8} {r['train loss']:>11.3f} {r['eval loss']:>10.3f} "
                f"{r['eval acc']:>9.1%} {r['seconds']:>8.2f}"
            )
        print("BN batch: samples behind each BatchNorm statistic; eval uses the running statistics.")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
