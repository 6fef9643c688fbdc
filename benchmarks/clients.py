"""Whole models before and after ``to_normkit``: ``python benchmarks/clients.py``.

A diffusers UNet2DModel (GroupNorm) and a transformers GPT-2 (LayerNorm), randomly initialised,
timed for one training step (forward + backward) in the same process, alternating, best median of
each. Needs the test extras (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import copy
import math

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


def main() -> None:
    torch.manual_seed(0)
    for name, build in (("UNet2DModel 8x3x32x32", _unet), ("GPT-2 8x128 tokens", _gpt2)):
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
