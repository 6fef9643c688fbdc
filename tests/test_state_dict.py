"""state_dict compatibility with torch.nn both ways, old checkpoints, reset and repr."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as tnn

import normkit.nn as nk

CONFIGS = {
    "BatchNorm1d": ((5,), {}),
    "BatchNorm2d-no-track": ((5,), {"track_running_stats": False}),
    "BatchNorm3d-no-affine": ((5,), {"affine": False}),
    "BatchNorm2d-no-bias": ((5,), {"bias": False}),
    "InstanceNorm2d": ((5,), {}),
    "InstanceNorm1d-tracked-affine": ((5,), {"affine": True, "track_running_stats": True}),
    "InstanceNorm3d-tracked": ((5,), {"track_running_stats": True}),
    "GroupNorm": ((5, 10), {}),
    "GroupNorm-no-affine": ((5, 10), {"affine": False}),
    "LayerNorm": (((3, 4),), {}),
    "LayerNorm-no-bias": ((4,), {"bias": False}),
    "RMSNorm": ((4,), {"eps": 1e-6}),
    "RMSNorm-no-affine": ((4,), {"elementwise_affine": False}),
}


def _classes(key):
    name = key.split("-")[0]
    return getattr(nk, name), getattr(tnn, name)


def _randomize(module):
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand_like(t) + 0.25)
        for b in module.buffers():
            if not b.is_floating_point():
                b.fill_(7)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_state_dict_round_trips_with_torch(key):
    ours_cls, theirs_cls = _classes(key)
    args, kwargs = CONFIGS[key]
    theirs = theirs_cls(*args, **kwargs)
    _randomize(theirs)
    ours = ours_cls(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = theirs_cls(*args, **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (k, a), b in zip(theirs.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert {k: v is None for k, v in ours._parameters.items()} == {k: v is None for k, v in theirs._parameters.items()}
    assert {k: v is None for k, v in ours._buffers.items()} == {k: v is None for k, v in theirs._buffers.items()}
    assert repr(ours) == repr(theirs)
    assert getattr(ours, "_version", 1) == getattr(theirs, "_version", 1)


@pytest.mark.parametrize("key", ["BatchNorm1d", "InstanceNorm1d-tracked-affine"])
def test_old_checkpoint_without_num_batches_tracked_loads(key):
    ours_cls, theirs_cls = _classes(key)
    args, kwargs = CONFIGS[key]
    old = theirs_cls(*args, **kwargs).state_dict()
    del old["num_batches_tracked"]
    old._metadata = OrderedDict({"": {"version": 1}})
    ours = ours_cls(*args, **kwargs)
    ours.num_batches_tracked.fill_(3)
    ours.load_state_dict(old, strict=True)
    assert ours.num_batches_tracked.item() == 3


def test_instance_norm_rejects_pre_0_4_running_stats_like_torch():
    sd = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    messages = []
    for cls in (tnn.InstanceNorm1d, nk.InstanceNorm1d):
        state = OrderedDict(sd)
        state._metadata = OrderedDict({"": {}})
        with pytest.raises(RuntimeError) as exc:
            cls(3).load_state_dict(state)
        messages.append(str(exc.value).replace("normkit.nn.instancenorm.", ""))
    assert messages[0].split("Unexpected")[1] == messages[1].split("Unexpected")[1]


@pytest.mark.parametrize("key", [k for k in CONFIGS if not k.startswith(("LayerNorm", "RMSNorm", "GroupNorm"))])
def test_reset_running_stats_and_parameters(key):
    ours_cls, _ = _classes(key)
    args, kwargs = CONFIGS[key]
    m = ours_cls(*args, **kwargs)
    _randomize(m)
    m.reset_parameters()
    fresh = ours_cls(*args, **kwargs)
    for a, b in zip(m.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_momentum_none_is_cumulative_average():
    bn = nk.BatchNorm1d(3, momentum=None)
    xs = [torch.randn(8, 3) * (i + 1) + i for i in range(4)]
    for x in xs:
        bn(x)
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in xs]).mean(0))
    assert bn.num_batches_tracked.item() == 4


def test_device_and_dtype_factory_kwargs():
    m = nk.GroupNorm(2, 4, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64
    bn = nk.BatchNorm2d(4, dtype=torch.bfloat16)
    assert bn.running_mean.dtype == torch.bfloat16 and bn.num_batches_tracked.dtype == torch.long
