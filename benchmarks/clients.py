"""Whole models before and after ``to_normkit``: ``python benchmarks/clients.py [--per-call]``.

A diffusers UNet2DModel (GroupNorm), a transformers GPT-2 (LayerNorm), a channels-last CNN
(BatchNorm and GroupNorm on channels-last activations) and a ResNet stem at ImageNet resolution
(BatchNorm on large activations; both torch.nn only), randomly initialised, timed for
one training step (forward + backward) in the same process, alternating, best median of each. ``--per-call`` times the UNet's GroupNorm calls on 8x64x32x32 inside its training steps
instead: each module's forward, and its backward node (between hooks on the output's grad_fn), as
medians over six steps of each model. A norm's share of a step is below the step-to-step noise of a
small machine; inside the step its calls run with the caches as training leaves them. Needs the
test extras (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import statistics
import time

import torch

from normkit.bench import measure
from normkit.convert import to_normkit


def _unet():
    import diffusers

    model = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32, attention_head_dim=32,
    )
    x, t = torch.randn(8, 3, 32, 32), torch.tensor([3] * 8)
    return model, lambda m: m(x, t).sample.square().mean()


def _gpt2():
    import transformers

    config = transformers.GPT2Config(
        vocab_size=512, n_positions=128, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    ids = torch.randint(0, 512, (8, 128))
    return transformers.GPT2LMHeadModel(config), lambda m: m(ids, labels=ids).loss


def _cnn_channels_last():
    """Conv-BatchNorm-ReLU and conv-GroupNorm-SiLU blocks at 64 and 128 channels, in channels-last memory
    format (as torch recommends for convolutions on the CPU): the layout normkit's norms take as it is."""
    from torch import nn

    def block(c: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(8, c), nn.SiLU())

    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), *[block(64) for _ in range(3)], nn.Conv2d(64, 128, 3, stride=2, padding=1),
        *[block(128) for _ in range(3)],
    ).to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    return model, lambda m: m(x).square().mean()


def _resnet_stem():
    """A ResNet stem and first stage at ImageNet resolution, 16x3x224x224: BatchNorm on 16x64x112x112
    (51 MB) and 16x64x56x56 activations, sizes at which torch.nn's outputs are fresh pages every step."""
    from torch import nn

    class Basic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64))

        def forward(self, x):
            return torch.relu(x + self.body(x))

    model = nn.Sequential(
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1), Basic(), Basic(),
    )
    x = torch.randn(16, 3, 224, 224)
    return model, lambda m: m(x).square().mean()


def _timed_calls(cls: type[torch.nn.Module], shape: tuple[int, ...], times: dict[str, list[float]], tag: str):
    """Wrap ``cls.forward`` to record, for inputs of ``shape``, the forward's and the backward node's µs."""
    forward = cls.forward

    def timed(self, x):
        start = time.perf_counter_ns()
        y = forward(self, x)
        if tuple(x.shape) == shape:
            times[f"{tag} forward"].append((time.perf_counter_ns() - start) / 1e3)
            if y.grad_fn is not None:
                began = []
                y.grad_fn.register_prehook(lambda grads: began.append(time.perf_counter_ns()))
                y.grad_fn.register_hook(
                    lambda inputs, grads: times[f"{tag} backward"].append((time.perf_counter_ns() - began[0]) / 1e3)
                )
        return y

    cls.forward = timed


def per_call(shape: tuple[int, ...] = (8, 64, 32, 32), steps: int = 6) -> None:
    import normkit.nn as nk

    torch.manual_seed(0)
    model, loss = _unet()
    converted = to_normkit(copy.deepcopy(model))
    times: dict[str, list[float]] = collections.defaultdict(list)
    _timed_calls(torch.nn.GroupNorm, shape, times, "torch.nn")
    _timed_calls(nk.GroupNorm, shape, times, "normkit")
    for record in (False, True):
        times.clear()
        for _ in range(steps if record else 2):
            loss(model).backward()
            loss(converted).backward()
    size = "x".join(map(str, shape))
    for what in ("forward", "backward"):
        ours, theirs = (statistics.median(times[f"{tag} {what}"]) for tag in ("normkit", "torch.nn"))
        print(f"UNet2DModel GroupNorm {size} {what} inside a step: torch.nn {theirs:.1f} µs, normkit {ours:.1f} µs, "
              f"{theirs / ours:.2f}x (medians of {len(times[f'normkit {what}'])} calls)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-call", action="store_true", help="time the UNet's GroupNorm calls inside its steps")
    if parser.parse_args().per_call:
        per_call()
        return
    torch.manual_seed(0)
    for name, build in (
        ("UNet2DModel 8x3x32x32", _unet), ("GPT-2 8x128 tokens", _gpt2), ("channels-last CNN 16x3x32x32", _cnn_channels_last),
        ("ResNet stem 16x3x224x224", _resnet_stem),
    ):
        model, loss = build()
        converted = to_normkit(copy.deepcopy(model))
        steps = [lambda m=m: loss(m).backward() for m in (model, converted)]
        best = [math.inf, math.inf]
        for _ in range(3):
            for i, step in enumerate(steps):
                best[i] = min(best[i], measure(step, 1.0))
        print(f"{name}: torch.nn {best[0] * 1e3:.1f} ms, normkit {best[1] * 1e3:.1f} ms per step, "
              f"{best[0] / best[1]:.2f}x ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
