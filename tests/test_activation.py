"""The ``activation=`` epilogue of the functional API: equal to torch's norm followed by torch's
activation, on every backend that runs here, in every dtype and layout, forward and backward; and
backward keeps only the norm's input alive, not the pre-activation."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as TF

import normkit
import normkit.functional as F
import normkit.nn as nk

ACTS = {"relu": TF.relu, "silu": TF.silu, "gelu": TF.gelu}
_GEN = torch.Generator().manual_seed(7)
RM, RV = torch.randn(6, generator=_GEN, dtype=torch.float64), torch.rand(6, generator=_GEN, dtype=torch.float64) + 0.5
# (normkit call, torch call, input shape); both take (x, weight, bias, activation / act function).
CASES = {
    "batch-train": (
        lambda x, w, b, a: F.batch_norm(x, None, None, w, b, True, activation=a),
        lambda x, w, b: TF.batch_norm(x, None, None, w, b, True), (3, 6, 4, 5),
    ),
    "batch-eval": (
        lambda x, w, b, a: F.batch_norm(x, RM.to(x), RV.to(x), w, b, False, activation=a),
        lambda x, w, b: TF.batch_norm(x, RM.to(x), RV.to(x), w, b, False), (3, 6, 4, 5),
    ),
    "instance": (
        lambda x, w, b, a: F.instance_norm(x, weight=w, bias=b, activation=a),
        lambda x, w, b: TF.instance_norm(x, weight=w, bias=b), (3, 6, 4, 5),
    ),
    "group": (
        lambda x, w, b, a: F.group_norm(x, 3, w, b, activation=a),
        lambda x, w, b: TF.group_norm(x, 3, w, b), (3, 6, 4, 5),
    ),
    "layer": (
        lambda x, w, b, a: F.layer_norm(x, [6], w, b, activation=a),
        lambda x, w, b: TF.layer_norm(x, [6], w, b), (3, 5, 6),
    ),
    "rms": (
        lambda x, w, b, a: F.rms_norm(x, [6], w, activation=a),
        lambda x, w, b: TF.rms_norm(x, [6], w), (3, 5, 6),
    ),
}
# (backend, device): every backend that runs here; Triton's fused epilogue when a GPU is present.
BACKENDS = [("reference", "cpu"), ("cpu", "cpu")] + ([("triton", "cuda")] if torch.cuda.is_available() else [])
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}


def _inputs(shape, dtype, channels_last, device="cpu"):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    w, b = (torch.rand(6, dtype=torch.float64, device=device) + 0.5, torch.randn(6, dtype=torch.float64, device=device))
    return [t.to(dtype).requires_grad_() for t in (x, w, b)]


def _backend_dtype_activation():
    """Every backend x dtype x activation. The cpu backend compiles its kernels once per dtype and
    activation (several seconds per driver from a cold cache): float32 runs by default, float64 and
    bfloat16 in the slow run."""
    for backend, device in BACKENDS:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for activation in ACTS:
                slow = backend == "cpu" and dtype != torch.float32
                yield pytest.param(
                    backend, device, dtype, activation, id=f"{backend}-{dtype}-{activation}",
                    marks=[pytest.mark.slow] if slow else [],
                )


@pytest.mark.parametrize("backend,device,dtype,activation", list(_backend_dtype_activation()))
@pytest.mark.parametrize(
    "case,channels_last",
    [(c, False) for c in CASES] + [(c, True) for c in CASES if len(CASES[c][2]) == 4],
)
def test_activation_is_norm_then_torch_activation(backend, device, dtype, activation, case, channels_last):
    fn, torch_fn, shape = CASES[case]
    inputs = _inputs(shape, dtype, channels_last, device)
    with normkit.backend(backend):
        out = fn(*inputs, activation)
    z = torch_fn(*(t.double() for t in inputs))
    ref = ACTS[activation](z)
    assert out.dtype == dtype
    assert out.dim() != 4 or out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    dy = torch.randn_like(ref)
    if activation == "relu" and dtype == torch.bfloat16:
        # Which side of ReLU's kink a pre-activation within bfloat16 rounding of 0 lands on is
        # decided by rounding; no gradient flows from those positions in this comparison.
        dy = dy * (z.abs() > 0.05)
    with normkit.backend(backend):
        grads = torch.autograd.grad(out, inputs, dy.to(dtype), allow_unused=True)
    refs = torch.autograd.grad(ref, inputs, dy, allow_unused=True)
    for i, (g, r) in enumerate(zip(grads, refs)):
        assert (g is None) == (r is None)
        if r is None:
            continue
        tol = dict(TOL[dtype])
        if i:  # parameter gradients sum over the batch: rounding errors add up like sqrt(count)
            tol["atol"] *= (inputs[0].numel() / r.numel()) ** 0.5
        torch.testing.assert_close(g.double(), r.double(), **tol)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
def test_far_tails_and_non_finite_values_match_torch(backend, device, activation):
    """float32 pre-activations past exp's range, within it near its ends, infinite and NaN: the forward and
    the gradient are torch's in float64 (a clamped exponent once gave silu(-1e30) = -6e-9). With weight 0
    the pre-activation is the bias, exactly."""
    z = torch.tensor([-1e30, -200.0, -100.0, -88.5, -87.5, -87.0, -20.0, -1.0, 0.0, 0.5, 20.0, 87.5, 88.5, 89.0,
                      100.0, 1e30, float("inf"), float("-inf"), float("nan")], device=device)
    if activation == "gelu":  # torch's own float32 gelu(inf) is NaN in its vector loop and inf in its tail
        z = z[z != float("inf")]
    x = torch.randn(3, z.numel(), device=device)
    weight = torch.zeros_like(z, requires_grad=True)
    bias = z.clone().requires_grad_()
    with normkit.backend(backend):
        out = F.layer_norm(x, [z.numel()], weight, bias, activation=activation)
        dbias, = torch.autograd.grad(out, bias, torch.ones_like(out))
    z64 = z.double().requires_grad_()
    ref = ACTS[activation](z64).expand(out.shape)
    dref, = torch.autograd.grad(ref, z64, torch.ones_like(ref))
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-37, equal_nan=True)
    torch.testing.assert_close(dbias, dref.float(), rtol=1e-5, atol=1e-37, equal_nan=True)


def test_nan_in_gives_nan_out():
    x = torch.randn(2, 6, 3, 3)
    x[0, 0, 1, 1] = float("nan")
    for a in ACTS:
        y = F.group_norm(x, 3, activation=a)
        assert y[0, :2].isnan().all() and not y[1].isnan().any()


def test_unknown_activation_is_a_clear_error():
    x = torch.randn(2, 6, 3, 3)
    for call in (
        lambda: F.group_norm(x, 3, activation="tanh"),
        lambda: F.batch_norm(x, None, None, training=True, activation="tanh"),
        lambda: F.layer_norm(x, [3], activation="tanh", mask=torch.ones(3, dtype=torch.bool)),
        lambda: F.rms_norm(x[:0], [3], activation="tanh"),
    ):
        with pytest.raises(ValueError, match="unknown activation 'tanh'"):
            call()


def _saved_elements(fn, x) -> int:
    """Elements of the tensors autograd keeps for backward that are as large as the input."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(n for n in sizes if n >= x.numel())


def test_backward_keeps_only_the_input():
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    fused = nk.GroupNormAct(4, 8, act_layer="silu")
    composed = torch.nn.Sequential(torch.nn.GroupNorm(4, 8), torch.nn.SiLU())
    assert _saved_elements(fused, x) == x.numel()
    assert _saved_elements(composed, x) == 2 * x.numel()
