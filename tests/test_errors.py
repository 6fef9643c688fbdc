"""Bad input raises what torch.nn raises (type and message); NaN/Inf propagate; empty tensors as torch."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF

import normkit.functional as NF
import normkit.nn as nk


def _both(build):
    """Run ``build(module_namespace, functional_namespace)`` for torch and normkit; return outcomes."""
    outcomes = []
    for ns, fns in ((tnn, TF), (nk, NF)):
        torch.manual_seed(0)
        try:
            build(ns, fns)
            outcomes.append(None)
        except Exception as exc:  # noqa: BLE001 - the point is to compare whatever torch raises
            outcomes.append((type(exc), str(exc)))
    return outcomes


BAD = {
    "bn2d-3d-input": lambda nn, F: nn.BatchNorm2d(4)(torch.randn(2, 4, 3)),
    "bn1d-4d-input": lambda nn, F: nn.BatchNorm1d(4)(torch.randn(2, 4, 3, 3)),
    "bn1d-1d-input": lambda nn, F: nn.BatchNorm1d(4)(torch.randn(4)),
    "bn3d-4d-input": lambda nn, F: nn.BatchNorm3d(4)(torch.randn(2, 4, 3, 3)),
    "bn-channel-mismatch": lambda nn, F: nn.BatchNorm2d(4)(torch.randn(2, 5, 3, 3)),
    "bn-one-value-train": lambda nn, F: nn.BatchNorm2d(4)(torch.randn(1, 4, 1, 1)),
    "bn1d-one-row-train": lambda nn, F: nn.BatchNorm1d(4)(torch.randn(1, 4)),
    "bn-eval-no-stats": lambda nn, F: F.batch_norm(torch.randn(2, 4, 3), None, None, training=False),
    "bn-running-size": lambda nn, F: F.batch_norm(torch.randn(2, 4, 3), torch.zeros(3), torch.ones(3)),
    "bn-weight-size": lambda nn, F: F.batch_norm(torch.randn(2, 4, 3), None, None, torch.ones(3), training=True),
    "bn-bias-size": lambda nn, F: F.batch_norm(torch.randn(3, 4), None, None, torch.ones(4), torch.ones(3), training=True),
    "bn-integer-input": lambda nn, F: F.batch_norm(torch.randint(0, 3, (2, 4, 3)), None, None, training=True),
    "in-one-spatial-train": lambda nn, F: nn.InstanceNorm2d(4)(torch.randn(2, 4, 1, 1)),
    "in2d-2d-input": lambda nn, F: nn.InstanceNorm2d(4)(torch.randn(2, 4)),
    "in-affine-channel-mismatch": lambda nn, F: nn.InstanceNorm2d(4, affine=True)(torch.randn(2, 5, 3, 3)),
    "in-fixed-no-stats": lambda nn, F: F.instance_norm(torch.randn(2, 4, 3), use_input_stats=False),
    "in-running-size": lambda nn, F: F.instance_norm(torch.randn(2, 4, 3), torch.zeros(3), torch.ones(3)),
    "gn-not-divisible-ctor": lambda nn, F: nn.GroupNorm(3, 4),
    "gn-channel-mismatch": lambda nn, F: nn.GroupNorm(2, 4)(torch.randn(2, 5, 3, 3)),
    "gn-1d-input": lambda nn, F: nn.GroupNorm(2, 4)(torch.randn(4)),
    "gn-one-value-per-group": lambda nn, F: F.group_norm(torch.randn(1, 2, 1), 2),
    "gn-weight-shape": lambda nn, F: F.group_norm(torch.randn(2, 4, 3), 2, torch.ones(3)),
    "gn-bias-shape": lambda nn, F: F.group_norm(torch.randn(2, 4, 3), 2, torch.ones(4), torch.ones(3)),
    "ln-wrong-shape": lambda nn, F: nn.LayerNorm(4)(torch.randn(2, 5)),
    "ln-too-few-dims": lambda nn, F: nn.LayerNorm([3, 4])(torch.randn(4)),
    "ln-empty-normalized-shape": lambda nn, F: F.layer_norm(torch.randn(2, 4), []),
    "ln-weight-shape": lambda nn, F: F.layer_norm(torch.randn(2, 4), [4], torch.ones(3)),
    "ln-integer-input": lambda nn, F: F.layer_norm(torch.randint(0, 3, (2, 4)), [4]),
    "rms-wrong-shape": lambda nn, F: nn.RMSNorm(4)(torch.randn(2, 5)),
    "bn-one-buffer-train": lambda nn, F: F.batch_norm(torch.randn(2, 4, 3), torch.zeros(4), None, training=True),
    "bn-one-buffer-eval": lambda nn, F: F.batch_norm(torch.randn(2, 4, 3), torch.zeros(4), None),
    "in-one-buffer": lambda nn, F: F.instance_norm(torch.randn(2, 4, 3), None, torch.ones(4)),
    "bn-eval-buffer-wants-grad": lambda nn, F: F.batch_norm(torch.randn(2, 4, 3), torch.zeros(4, requires_grad=True), torch.ones(4)),
    "bn-train-buffer-wants-grad": lambda nn, F: F.batch_norm(
        torch.randn(2, 4, 3), torch.zeros(4), torch.ones(4, requires_grad=True), training=True),
    "in-buffer-wants-grad": lambda nn, F: F.instance_norm(torch.randn(2, 4, 3), torch.zeros(4, requires_grad=True), torch.ones(4)),
    "bn-eps-zero-train": lambda nn, F: F.batch_norm(torch.randn(2, 4, 3), None, None, training=True, eps=0.0),
    "bn-eps-negative-eval": lambda nn, F: F.batch_norm(torch.randn(2, 4, 3), torch.zeros(4), torch.ones(4), eps=-1e-5),
    "bn-momentum-none": lambda nn, F: F.batch_norm(torch.randn(2, 4, 3), torch.zeros(4), torch.ones(4), momentum=None),
    "bn-1d-input-train": lambda nn, F: F.batch_norm(torch.randn(5), None, None, training=True),
    "bn-1d-input-eval": lambda nn, F: F.batch_norm(torch.randn(5), torch.zeros(1), torch.ones(1)),
    "in-weight-size": lambda nn, F: F.instance_norm(torch.randn(4, 3, 5), weight=torch.ones(4)),
    "gn-negative-groups": lambda nn, F: F.group_norm(torch.randn(2, 4, 3), -1),
    "gn-float-groups": lambda nn, F: F.group_norm(torch.randn(2, 4, 3), 1.5),
    "gn-integer-input": lambda nn, F: F.group_norm(torch.ones(2, 4, 3, dtype=torch.long), 1),
    "gn-integer-input-float-weight": lambda nn, F: nn.GroupNorm(1, 4)(torch.ones(2, 4, 3, dtype=torch.long)),
    "ln-integer-input-float-weight": lambda nn, F: nn.LayerNorm(3)(torch.ones(2, 4, 3, dtype=torch.long)),
    "ln-int-normalized-shape": lambda nn, F: F.layer_norm(torch.randn(2, 4), 4),
    "rms-int-normalized-shape": lambda nn, F: F.rms_norm(torch.randn(2, 4), 4),
    "bn-double-input-float-module": lambda nn, F: nn.BatchNorm1d(4)(torch.randn(2, 4, 3, dtype=torch.float64)),
    "bn-float-input-half-module": lambda nn, F: nn.BatchNorm1d(4).half()(torch.randn(2, 4, 3)),
    "bn-eval-float-input-bfloat16-buffers": lambda nn, F: F.batch_norm(
        torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)),
    "bn-bfloat16-parameters-float-buffers": lambda nn, F: F.batch_norm(
        torch.randn(2, 4, 3, dtype=torch.bfloat16), torch.zeros(4), torch.ones(4), torch.ones(4, dtype=torch.bfloat16),
        torch.zeros(4, dtype=torch.bfloat16), training=True),
    "ln-double-input-float-module": lambda nn, F: nn.LayerNorm(3)(torch.randn(2, 3, dtype=torch.float64)),
    "ln-float-weight-double-bias": lambda nn, F: F.layer_norm(torch.randn(2, 3), [3], torch.ones(3), torch.zeros(3, dtype=torch.float64)),
    "gn-float-input-bfloat16-module": lambda nn, F: nn.GroupNorm(1, 4).bfloat16()(torch.randn(2, 4, 3)),
    "in-double-input-float-affine": lambda nn, F: nn.InstanceNorm1d(4, affine=True)(torch.randn(2, 4, 3, dtype=torch.float64)),
    "bn-training-none": lambda nn, F: F.batch_norm(torch.randn(2, 4, 3), torch.zeros(4), torch.ones(4), training=None),
    "in-momentum-none": lambda nn, F: F.instance_norm(torch.randn(2, 4, 3), torch.zeros(4), torch.ones(4), momentum=None),
    "in-use-input-stats-none": lambda nn, F: F.instance_norm(torch.randn(2, 4, 3), use_input_stats=None),
    "in-use-input-stats-int": lambda nn, F: F.instance_norm(torch.randn(2, 4, 3), use_input_stats=0),
    "ln-eps-none": lambda nn, F: F.layer_norm(torch.randn(2, 4), [4], eps=None),
    "gn-eps-none": lambda nn, F: F.group_norm(torch.randn(2, 4, 3), 2, eps=None),
    "rms-eps-string": lambda nn, F: F.rms_norm(torch.randn(2, 4), [4], eps="0.1"),
    "gn-bool-groups": lambda nn, F: F.group_norm(torch.randn(2, 4, 3), True),
    "ln-float-in-normalized-shape": lambda nn, F: F.layer_norm(torch.randn(2, 4), (4.0,)),
    "ln-bool-in-normalized-shape": lambda nn, F: F.layer_norm(torch.randn(2, 1), [True]),
    "rms-input-fewer-dims": lambda nn, F: F.rms_norm(torch.randn(3), [2, 3]),
    "bn-eps-1d-tensor": lambda nn, F: F.batch_norm(torch.randn(2, 4, 3), torch.zeros(4), torch.ones(4), eps=torch.tensor([0.1])),
    "gn-groups-1d-tensor": lambda nn, F: F.group_norm(torch.randn(2, 4, 3), torch.tensor([2])),
    "in-weight-2d": lambda nn, F: F.instance_norm(torch.randn(4, 3, 5), weight=torch.ones(1, 3)),
    "in-running-mean-2d": lambda nn, F: F.instance_norm(torch.randn(4, 3, 5), torch.zeros(1, 3), torch.ones(3)),
    "in-integer-input-no-buffers-eval": lambda nn, F: F.instance_norm(torch.ones(2, 4, 3, dtype=torch.long), use_input_stats=False),
}
# Mixed precision torch allows on the CPU: a bfloat16/float16 input with float32 parameters and buffers.
MIXED_OK = {
    "bn-bfloat16-input-float-module": lambda nn, F: nn.BatchNorm1d(4)(torch.randn(2, 4, 3, dtype=torch.bfloat16)),
    "ln-half-input-float-module": lambda nn, F: nn.LayerNorm(3)(torch.randn(2, 3, dtype=torch.float16)),
    "gn-bfloat16-input-float-module": lambda nn, F: nn.GroupNorm(2, 4)(torch.randn(2, 4, 3, dtype=torch.bfloat16)),
    "bn-eval-no-grad-buffer-wants-grad": lambda nn, F: torch.no_grad()(F.batch_norm)(
        torch.randn(2, 4, 3), torch.zeros(4, requires_grad=True), torch.ones(4)),
}


# Scalars torch's argument parser takes as numbers: 0-dim tensors and numpy scalars (same outputs and buffers).
SCALARS = {
    "bn-momentum-tensor": lambda nn, F: F.batch_norm(
        torch.randn(3, 4, 5), torch.zeros(4), torch.ones(4), training=True, momentum=torch.tensor(0.3)),
    "in-momentum-tensor": lambda nn, F: F.instance_norm(torch.randn(3, 4, 5), torch.zeros(4), torch.ones(4), momentum=torch.tensor(0.3)),
    "gn-groups-tensor": lambda nn, F: F.group_norm(torch.randn(3, 4, 5), torch.tensor(2)),
    "gn-module-groups-numpy": lambda nn, F: nn.GroupNorm(np.int64(2), 4)(torch.randn(3, 4, 5)),
    "ln-shape-tensor": lambda nn, F: F.layer_norm(torch.randn(3, 4, 5), [torch.tensor(5)]),
    "ln-eps-tensor": lambda nn, F: F.layer_norm(torch.randn(3, 4, 5), [5], eps=torch.tensor(1e-3)),
    "rms-eps-numpy": lambda nn, F: F.rms_norm(torch.randn(3, 4, 5), [5], eps=np.float32(1e-3)),
    "rms-complex": lambda nn, F: nn.RMSNorm(5, dtype=torch.complex64)(torch.randn(3, 4, 5, dtype=torch.complex64)),
}


@pytest.mark.parametrize("case", list(SCALARS))
def test_scalar_arguments_as_torch_takes_them(case):
    outputs = []
    for ns, fns in ((tnn, TF), (nk, NF)):
        torch.manual_seed(0)
        outputs.append(SCALARS[case](ns, fns))
    torch.testing.assert_close(outputs[1], outputs[0])


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _dtype_call(F, op: str, x_dtype, w_dtype, s_dtype):
    x = torch.randn(3, 4, 5, dtype=x_dtype)
    w = None if w_dtype is None else torch.ones(5 if op in ("layer_norm", "rms_norm") else 4, dtype=w_dtype)
    stats = () if s_dtype is None else (torch.zeros(4, dtype=s_dtype), torch.ones(4, dtype=s_dtype))
    if op == "batch_norm":
        stats = stats or (torch.zeros(4, dtype=x_dtype), torch.ones(4, dtype=x_dtype))
        return F.batch_norm(x, *stats, w, w, training=True), stats
    if op == "batch_norm_eval":
        stats = stats or (torch.zeros(4, dtype=x_dtype), torch.ones(4, dtype=x_dtype))
        return F.batch_norm(x, *stats, w, w), stats
    if op == "instance_norm":
        return F.instance_norm(x, *(stats or (None, None)), w, w), stats
    if op == "layer_norm":
        return F.layer_norm(x, [5], w, w), stats
    if op == "group_norm":
        return F.group_norm(x, 2, w, w), stats
    return F.rms_norm(x, [5], w), stats


@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_eval", "instance_norm", "layer_norm", "group_norm", "rms_norm"])
def test_mixed_dtypes_as_torch(op):
    """Every input/parameter/buffer dtype combination: torch's error (type and words), or its output dtype,
    values and running statistics (ATen's ``check_mixed_data_type`` and InstanceNorm's any-dtype buffers)."""
    stat_dtypes = (None, *_DTYPES) if op.startswith(("batch", "instance")) else (None,)
    for x_dtype, w_dtype, s_dtype in itertools.product(_DTYPES, (None, *_DTYPES), stat_dtypes):
        outcomes = []
        for F in (TF, NF):
            torch.manual_seed(0)
            try:
                outcomes.append(_dtype_call(F, op, x_dtype, w_dtype, s_dtype))
            except Exception as exc:  # noqa: BLE001 - compared with torch's
                outcomes.append((type(exc), str(exc)))
        where = f"{op} x={x_dtype} w={w_dtype} stats={s_dtype}"
        theirs, ours = outcomes
        if isinstance(theirs[0], type):
            assert ours == theirs, where
            continue
        assert not isinstance(ours[0], type), f"{where}: {ours}"
        tol = dict(rtol=2e-2, atol=2e-2) if _DTYPES.index(x_dtype) > 1 or s_dtype in (torch.bfloat16, torch.float16) else {}
        torch.testing.assert_close(ours[0], theirs[0], **tol, msg=where)
        for a, b in zip(ours[1], theirs[1]):
            torch.testing.assert_close(a, b, **tol, msg=where)


# torch's message here reports the weight's shape as the bias's; normkit reports the bias's own shape.
SAME_UP_TO_SHAPES = {"gn-bias-shape"}


@pytest.mark.parametrize("case", list(MIXED_OK))
def test_accepted_where_torch_accepts(case):
    assert _both(MIXED_OK[case]) == [None, None]


@pytest.mark.parametrize("case", list(BAD))
def test_same_exception_as_torch(case):
    theirs, ours = _both(BAD[case])
    assert theirs is not None, "torch accepts this input; the case is not bad input"
    assert ours is not None, f"normkit accepted bad input; torch raises {theirs}"
    if case in SAME_UP_TO_SHAPES:
        assert ours[0] is theirs[0] and ours[1].split("of shape")[0] == theirs[1].split("of shape")[0]
        assert "bias of shape [3]" in ours[1]
    else:
        assert ours == theirs


def test_instance_norm_warns_like_torch_when_features_mismatch_without_affine():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nk.InstanceNorm2d(4)(torch.randn(2, 5, 3, 3))
    assert any("does not match num_features" in str(w.message) for w in caught)


EMPTY = {
    "bn-empty-batch": (lambda nn: nn.BatchNorm2d(4), (0, 4, 3, 3)),
    "bn-empty-length": (lambda nn: nn.BatchNorm1d(4), (2, 4, 0)),
    "in-empty-batch": (lambda nn: nn.InstanceNorm1d(4), (0, 4, 3)),
    "in-empty-length": (lambda nn: nn.InstanceNorm1d(4), (2, 4, 0)),
    "gn-empty-batch": (lambda nn: nn.GroupNorm(2, 4), (0, 4, 3)),
    "gn-empty-spatial": (lambda nn: nn.GroupNorm(2, 4), (2, 4, 0)),
    "ln-empty-rows": (lambda nn: nn.LayerNorm(4), (0, 4)),
    "ln-empty-normalized": (lambda nn: nn.LayerNorm(0), (2, 0)),
    "rms-empty-rows": (lambda nn: nn.RMSNorm(4), (0, 4)),
}


@pytest.mark.parametrize("case", list(EMPTY))
def test_empty_tensors_behave_as_torch(case):
    make, shape = EMPTY[case]
    theirs, ours = make(tnn), make(nk)
    x = torch.randn(shape, requires_grad=True)
    y_t, y_o = theirs(x), ours(x)
    assert y_o.shape == y_t.shape and y_o.dtype == y_t.dtype
    y_o.sum().backward()
    for a, b in zip(ours.buffers(), theirs.buffers()):
        torch.testing.assert_close(a, b, equal_nan=True)


NAN_CASES = {
    "bn": (lambda: nk.BatchNorm2d(3), (4, 3, 5, 5), lambda x: x[:, 1]),
    "in": (lambda: nk.InstanceNorm2d(3), (4, 3, 5, 5), lambda x: x[2, 1]),
    "gn": (lambda: nk.GroupNorm(3, 6), (4, 6, 5, 5), lambda x: x[2, 2:4]),
    "ln": (lambda: nk.LayerNorm(8), (4, 8), lambda x: x[2]),
    "rms": (lambda: nk.RMSNorm(8), (4, 8), lambda x: x[2]),
    "gn-2d": (lambda: nk.GroupNorm(2, 8), (5, 8), lambda x: x[1, 4:]),
    "ln-rows": (lambda: nk.LayerNorm(16), (64, 16), lambda x: x[5]),
}


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize(
    "case,layout",
    [(c, lay) for c, (_, shape, _) in NAN_CASES.items() for lay in ("contiguous", "channels_last")[: 2 if len(shape) == 4 else 1]],
)
def test_non_finite_input_poisons_exactly_its_group(case, layout, value):
    make, shape, group = NAN_CASES[case]
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    poisoned = torch.zeros(shape, dtype=torch.bool)
    group(poisoned).fill_(True)
    first = torch.zeros(shape, dtype=torch.bool)
    first[tuple(poisoned.nonzero()[0])] = True
    x = x.masked_fill(first | (poisoned & (torch.rand(shape) < 0.3)), value).requires_grad_()
    y = make()(x)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(x.grad[~poisoned]).all(), "a non-finite input leaked into other groups' gradients"
    y = y.detach()
    assert not torch.isfinite(y[~torch.isfinite(x)]).any(), "a non-finite input was hidden"
    # RMSNorm divides finite elements by an infinite RMS, which gives 0 for them, as in float64 math.
    whole_group = not (case == "rms" and value == math.inf)
    if whole_group:
        assert not torch.isfinite(y[poisoned]).any(), "a non-finite input was hidden in its group"
    assert torch.isfinite(y[~poisoned]).all(), "a non-finite input leaked into other groups"


_META = torch.empty(3, device="meta")


@pytest.mark.parametrize(
    "call",
    [
        lambda f, x: f.layer_norm(x, [3], None, _META),
        lambda f, x: f.layer_norm(x, [3], _META),
        lambda f, x: f.rms_norm(x, [3], _META),
        lambda f, x: f.group_norm(x, 3, None, _META),
        lambda f, x: f.batch_norm(x, None, None, _META, training=True),
        lambda f, x: f.batch_norm(x, _META, _META.clone(), training=True),
        lambda f, x: f.batch_norm(x, _META, _META.clone(), training=False),
        lambda f, x: f.instance_norm(x, None, None, None, _META),
    ],
)
def test_tensors_on_another_device_refused_as_torch(call):
    """A parameter or buffer on another device than a CPU input: torch's error (the kernels would read
    its address: a crash for a bias or buffer, a weight silently left out)."""
    x = torch.randn(2, 3, 3)
    with pytest.raises(RuntimeError) as theirs:
        call(TF, x)
    with pytest.raises(RuntimeError) as ours:
        call(NF, x)
    assert str(ours.value) == str(theirs.value)
