"""Real models taken over by normkit: diffusers' UNet2DModel, transformers' GPT-2 and a ResNet.

Models are small, randomly initialised and built offline. After ``to_normkit`` their outputs and
every parameter gradient match the original; the ResNet goes through ``fuse_conv_bn_eval`` and
``freeze_batchnorm`` with unchanged eval outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit.nn as nk
from normkit.convert import freeze_batchnorm, fuse_conv_bn_eval, replace_norm, to_normkit, to_torch
from normkit.nn.frozen import FrozenBatchNorm2d

TOL = dict(rtol=1e-4, atol=1e-5)


def _norm_classes(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if "Norm" in type(m).__name__}


def _assert_outputs_and_grads_match(original: nn.Module, converted: nn.Module, run) -> None:
    out_a, out_b = run(original), run(converted)
    torch.testing.assert_close(out_b, out_a, **TOL)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    grads_a = {n: p.grad for n, p in original.named_parameters()}
    grads_b = {n: p.grad for n, p in converted.named_parameters()}
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, **TOL, msg=name)


def test_diffusers_unet2d() -> None:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[test]')")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )
    converted = to_normkit(copy.deepcopy(unet))
    assert _norm_classes(unet) == {nn.GroupNorm} and _norm_classes(converted) == {nk.GroupNorm}
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 10])
    _assert_outputs_and_grads_match(unet, converted, lambda m: m(x, t).sample)
    assert list(converted.state_dict()) == list(unet.state_dict())
    assert _norm_classes(to_torch(converted)) == {nn.GroupNorm}


def test_transformers_gpt2() -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    gpt = transformers.GPT2LMHeadModel(config)
    converted = to_normkit(copy.deepcopy(gpt))
    assert _norm_classes(gpt) == {nn.LayerNorm} and _norm_classes(converted) == {nk.LayerNorm}
    assert converted.lm_head.weight is converted.transformer.wte.weight
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    _assert_outputs_and_grads_match(gpt, converted, lambda m: m(ids).logits)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """A torchvision-style ResNet, two stages deep."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _trained_resnet() -> ResNet:
    """A ResNet whose BatchNorms hold non-trivial running statistics and affine parameters."""
    torch.manual_seed(0)
    model = ResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16) * 2 + 1)
    return model.eval()


def test_resnet_to_normkit_then_fused() -> None:
    model = _trained_resnet()
    x = torch.randn(4, 3, 16, 16)
    expected = model(x)
    converted = to_normkit(copy.deepcopy(model))
    torch.testing.assert_close(converted(x), expected, **TOL)
    fused = fuse_conv_bn_eval(converted)
    assert not _norm_classes(fused)
    torch.testing.assert_close(fused(x), expected, **TOL)
    xc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(xc), expected, **TOL)


def test_resnet_frozen_trains_without_touching_statistics() -> None:
    model = _trained_resnet()
    x = torch.randn(4, 3, 16, 16)
    expected = model(x)
    frozen = freeze_batchnorm(copy.deepcopy(model)).train()
    assert _norm_classes(frozen) == {FrozenBatchNorm2d}
    assert len(list(frozen.parameters())) == len([p for n, p in model.named_parameters() if "bn" not in n and "downsample.1" not in n])
    torch.testing.assert_close(frozen(x), expected, **TOL)
    frozen(x).sum().backward()
    assert all(p.grad is not None for p in frozen.parameters())
    torch.testing.assert_close(frozen(x), expected, **TOL)
    reloaded = freeze_batchnorm(ResNet())
    reloaded.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(reloaded(x), expected, **TOL)
    torch.testing.assert_close(fuse_conv_bn_eval(frozen.eval())(x), expected, **TOL)


def test_resnet_batchnorm_to_groupnorm_trains() -> None:
    model = replace_norm(_trained_resnet().train(), "gn:4")
    assert _norm_classes(model) == {nk.GroupNorm}
    loss = model(torch.randn(2, 3, 16, 16)).square().mean()
    loss.backward()
    assert torch.isfinite(loss)
