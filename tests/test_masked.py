"""Masked statistics: a masked norm equals the unmasked norm on the valid positions gathered densely."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normkit
import normkit.functional as F
import normkit.nn as nk

F64 = dict(rtol=1e-9, atol=1e-10)
EPS = 1e-5


@pytest.fixture(params=["reference", "cpu"])
def backend(request):
    with normkit.backend(request.param):
        yield request.param


def layout(x, channels_last):
    return x.to(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def leaf(*shape):
    return (torch.randn(*shape, dtype=torch.float64) * 2 + 1).requires_grad_()


def padded(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with garbage (NaN, huge values) at the masked-out positions; the masked norms must not see it."""
    garbage = torch.where(torch.rand_like(x) < 0.5, float("nan"), 1e6)
    return torch.where(mask, x, garbage)


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, retain_graph=True, allow_unused=True)


def assert_grads(a, b):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **F64)


@pytest.mark.parametrize("shape", [(5, 3, 7), (4, 3, 5, 6)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_equals_dense_gather(backend, shape, channels_last):
    x = leaf(*shape)
    w, b = leaf(3), leaf(3)
    mask = torch.rand(shape[0], *shape[2:]) < 0.6
    full = mask.unsqueeze(1).expand(shape)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    out = F.batch_norm(layout(padded(x, full), channels_last), rm, rv, w, b, True, 0.1, EPS, mask=mask)
    if channels_last and x.dim() == 4:
        assert out.is_contiguous(memory_format=torch.channels_last)
    dense = x.movedim(1, -1)[mask]  # (K, C): the valid positions, one row each
    rm2, rv2 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    ref = TF.batch_norm(dense, rm2, rv2, w, b, True, 0.1, EPS)
    got = out.movedim(1, -1)[mask]
    torch.testing.assert_close(got, ref, **F64)
    torch.testing.assert_close(rm, rm2, **F64)
    torch.testing.assert_close(rv, rv2, **F64)
    g = torch.randn_like(ref)
    assert_grads(grads(got, (x, w, b), g), grads(ref, (x, w, b), g))


def test_batch_norm_channel_dependent_mask():
    x, w = leaf(6, 3, 4), leaf(3)
    mask = torch.rand(6, 3, 4) < 0.5
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    out = F.batch_norm(padded(x, mask), rm, rv, w, None, True, 0.1, EPS, mask=mask)
    for c in range(3):
        valid = x[:, c][mask[:, c]]
        mean, var = valid.mean(), valid.var(unbiased=False)
        ref = (valid - mean) / torch.sqrt(var + EPS) * w[c]
        torch.testing.assert_close(out[:, c][mask[:, c]], ref, **F64)
        torch.testing.assert_close(rm[c], 0.1 * mean.detach(), **F64)
        torch.testing.assert_close(rv[c], 0.9 + 0.1 * valid.detach().var(), **F64)


@pytest.mark.parametrize("channels_last", [False, True])
def test_instance_norm_equals_dense_gather(backend, channels_last):
    n, c, h, wd, k = 3, 4, 5, 6, 17
    x = leaf(n, c, h, wd)
    mask = torch.zeros(n, h * wd, dtype=torch.bool)
    for i in range(n):
        mask[i, torch.randperm(h * wd)[:k]] = True
    mask = mask.view(n, h, wd)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    w, b = leaf(c), leaf(c)
    full = mask.unsqueeze(1).expand(x.shape)
    out = F.instance_norm(layout(padded(x, full), channels_last), rm, rv, w, b, True, 0.1, EPS, mask=mask)
    dense = x.flatten(2)[full.flatten(2)].view(n, c, k)
    rm2, rv2 = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    ref = TF.instance_norm(dense, rm2, rv2, w, b, True, 0.1, EPS)
    got = out.flatten(2)[full.flatten(2)].view(n, c, k)
    torch.testing.assert_close(got, ref, **F64)
    torch.testing.assert_close(rm, rm2, **F64)
    torch.testing.assert_close(rv, rv2, **F64)
    g = torch.randn_like(ref)
    assert_grads(grads(got, (x, w, b), g), grads(ref, (x, w, b), g))


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_equals_per_sample_gather(backend, channels_last):
    n, c, groups = 3, 6, 2
    x, w, b = leaf(n, c, 4, 5), leaf(c), leaf(c)
    mask = torch.rand(n, 4, 5) < 0.6
    full = mask.unsqueeze(1).expand(x.shape)
    out = F.group_norm(layout(padded(x, full), channels_last), groups, w, b, EPS, mask=mask)
    for i in range(n):
        dense = x[i].flatten(1)[:, mask[i].flatten()].unsqueeze(0)  # (1, C, K)
        ref = TF.group_norm(dense, groups, w, b, EPS)
        got = out[i].flatten(1)[:, mask[i].flatten()].unsqueeze(0)
        torch.testing.assert_close(got, ref, **F64)
        g = torch.randn_like(ref)
        assert_grads(grads(got, (x, w, b), g), grads(ref, (x, w, b), g))


def test_layer_norm_equals_per_row_gather(backend):
    x, w, b = leaf(2, 5, 8), leaf(8), leaf(8)
    mask = torch.rand(2, 5, 8) < 0.7
    mask[..., :2] = True
    out = F.layer_norm(padded(x, mask), (8,), w, b, EPS, mask=mask)
    for i in range(2):
        for j in range(5):
            m = mask[i, j]
            ref = TF.layer_norm(x[i, j, m], (int(m.sum()),), w[m], b[m], EPS)
            got = out[i, j, m]
            torch.testing.assert_close(got, ref, **F64)
            g = torch.randn_like(ref)
            assert_grads(grads(got, (x, w, b), g), grads(ref, (x, w, b), g))


def test_rms_norm_equals_per_row_gather(backend):
    x, w = leaf(2, 5, 8), leaf(8)
    mask = torch.rand(2, 5, 8) < 0.7
    mask[..., :2] = True
    out = F.rms_norm(padded(x, mask), (8,), w, EPS, mask=mask)
    layer = nk.RMSNorm(8, EPS, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
    torch.testing.assert_close(layer(padded(x, mask), mask), out.detach(), **F64)
    for i in range(2):
        for j in range(5):
            m = mask[i, j]
            ref = TF.rms_norm(x[i, j, m], (int(m.sum()),), w[m], EPS)
            got = out[i, j, m]
            torch.testing.assert_close(got, ref, **F64)
            g = torch.randn_like(ref)
            assert_grads(grads(got, (x, w), g), grads(ref, (x, w), g))
    assert bool((out[~mask] == 0).all())


def test_all_valid_mask_equals_unmasked():
    x = leaf(4, 3, 5, 5)
    ones = torch.ones(4, 5, 5, dtype=torch.bool)
    torch.testing.assert_close(F.group_norm(x, 3, mask=ones), TF.group_norm(x, 3), **F64)
    torch.testing.assert_close(F.instance_norm(x, mask=ones), TF.instance_norm(x), **F64)
    torch.testing.assert_close(F.layer_norm(x, (5,), mask=torch.ones(5, dtype=torch.bool)), TF.layer_norm(x, (5,)), **F64)
    torch.testing.assert_close(F.rms_norm(x, (5,), mask=torch.ones(5, dtype=torch.bool)), TF.rms_norm(x, (5,)), **F64)


def test_empty_groups_and_running_stats_kept():
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    mask = torch.ones(4, 2, 3, dtype=torch.bool)
    mask[:, 1] = False
    mask[0, 1, 0] = True  # channel 1: a single valid value
    rm, rv = torch.full((2,), 0.5, dtype=torch.float64), torch.full((2,), 2.0, dtype=torch.float64)
    out = F.batch_norm(x, rm, rv, None, None, True, 0.1, EPS, mask=mask)
    assert rm[1] == 0.5 and rv[1] == 2.0 and rm[0] != 0.5
    assert out[:, 1].eq(0).all()
    bias = torch.randn(3, dtype=torch.float64)
    empty = F.layer_norm(x, (3,), None, bias, mask=torch.zeros(3, dtype=torch.bool))
    assert empty.eq(bias).all()


def test_padding_outputs_bias_and_gets_no_gradient():
    x, w, b = leaf(4, 3, 5), leaf(3), leaf(3)
    mask = torch.rand(4, 5) < 0.5
    mask[0] = True
    full = mask.unsqueeze(1).expand(x.shape)
    xin = padded(x, full)
    out = F.batch_norm(xin, None, None, w, b, True, eps=EPS, mask=mask)
    assert out.movedim(1, -1)[~mask].eq(b.detach()).all()
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), torch.randn_like(out))
    assert gx[~full].eq(0).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all() and torch.isfinite(gb).all()


@pytest.mark.parametrize("activation", [None, "silu"])
def test_eval_mode_with_mask_outputs_the_bias_where_masked_out(activation):
    """With the running statistics the mask keeps nothing out of the statistics, but masked-out positions
    still output the bias (after the activation), and what they hold, NaN included, reaches no output and
    no gradient: as in training."""
    x = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last)
    mask = torch.rand(4, 6, 6) < 0.5
    x[~mask.unsqueeze(1).expand_as(x)] = float("nan")
    x.requires_grad_()
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    w, b = (torch.randn(3, requires_grad=True) for _ in range(2))
    full = mask.unsqueeze(1).expand_as(x)
    for y, plain in (
        (F.batch_norm(x, rm, rv, w, b, mask=mask, activation=activation),
         F.batch_norm(x, rm, rv, w, b, activation=activation)),
        (F.instance_norm(x, rm, rv, w, b, use_input_stats=False, mask=mask, activation=activation),
         F.instance_norm(x, rm, rv, w, b, use_input_stats=False, activation=activation)),
    ):
        torch.testing.assert_close(y[full], plain[full])
        bias = b.detach().view(1, 3, 1, 1).expand_as(x)
        fill = bias if activation is None else TF.silu(bias)
        torch.testing.assert_close(y[~full], fill[~full])
        assert y.is_contiguous(memory_format=torch.channels_last)
        grads = torch.autograd.grad(y.sum(), (x, w, b))
        assert all(torch.isfinite(g).all() for g in grads) and grads[0][~full].eq(0).all()


def test_group_norm_mask_keeps_layout_and_dtype():
    x = torch.randn(4, 3, 6, 6, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    mask = torch.rand(4, 6, 6) < 0.5
    y = F.group_norm(x, 3, mask=mask)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(y.float()).all()


def test_mask_errors():
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="bool"):
        F.batch_norm(x, None, None, training=True, mask=torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="does not broadcast"):
        F.batch_norm(x, None, None, training=True, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"a mask one dim short is the input's shape without the channel dim"):
        F.group_norm(torch.randn(2, 3, 4, 5), 3, mask=torch.ones(3, 1, 4, 5, dtype=torch.bool))  # (C, H, W)-like


def test_masked_double_backward():
    x = leaf(3, 2, 4)
    mask = torch.rand(3, 4) < 0.7
    mask[0] = True

    def f(t):
        return F.batch_norm(t, None, None, training=True, eps=EPS, mask=mask)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("channels_last", [False, True])
def test_layers_take_mask(channels_last):
    x = leaf(4, 6, 3, 5)
    mask = torch.rand(4, 3, 5) < 0.6
    full = mask.unsqueeze(1).expand(x.shape)
    xin = layout(padded(x, full), channels_last)
    dense = x.movedim(1, -1)[mask]
    layers = [
        (nk.BatchNorm2d(6, dtype=torch.float64), lambda: nn.BatchNorm1d(6, dtype=torch.float64), lambda o: o.movedim(1, -1)[mask], dense),
        (nk.BatchRenorm2d(6, rmax=1.0, dmax=0.0, dtype=torch.float64), lambda: nn.BatchNorm1d(6, dtype=torch.float64), lambda o: o.movedim(1, -1)[mask], dense),
    ]
    for layer, make_ref, pick, d in layers:
        ref_layer = make_ref()
        torch.testing.assert_close(pick(layer(xin, mask=mask)), ref_layer(d), **F64)
        torch.testing.assert_close(layer.running_var, ref_layer.running_var, **F64)
    gn = nk.GroupNorm(3, 6, dtype=torch.float64)
    torch.testing.assert_close(gn(xin, mask), F.group_norm(xin, 3, gn.weight, gn.bias, mask=mask), **F64)
    inn = nk.InstanceNorm1d(6, track_running_stats=True, dtype=torch.float64)
    seq = leaf(6, 7)
    seq_mask = torch.arange(7) < 5
    torch.testing.assert_close(inn(seq, seq_mask)[:, :5], TF.instance_norm(seq[:, :5].unsqueeze(0)).squeeze(0), **F64)
    ln = nk.LayerNorm(5, dtype=torch.float64)
    lmask = torch.arange(5) < 3
    torch.testing.assert_close(ln(x, lmask)[..., :3], TF.layer_norm(x[..., :3], (3,)), **F64)


def test_masked_statistics_where_float32_squares_overflow():
    """Masked statistics of float32 input of scale 1e20 stay in float64 (the variance overflows
    float32): outputs as the float64 computation, the running variance inf as torch's would be."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5) * 1e20
    mask = torch.rand(3, 5, 5) > 0.3
    bn, bn64 = nk.BatchNorm2d(4), nk.BatchNorm2d(4).double()
    torch.testing.assert_close(bn(x, mask=mask).double(), bn64(x.double(), mask=mask), rtol=1e-5, atol=1e-5)
    assert torch.isinf(bn.running_var).all()
    lmask = torch.rand(3, 4, 5, 5) > 0.3
    ln, ln64 = nk.LayerNorm(5), nk.LayerNorm(5).double()
    torch.testing.assert_close(ln(x, mask=lmask).double(), ln64(x.double(), mask=lmask), rtol=1e-5, atol=1e-5)


MASKED_CALLS = {
    "batch": lambda x, m: F.batch_norm(x, None, None, torch.ones(x.shape[1]), torch.full((x.shape[1],), 0.3), True, mask=m),
    "batch-eval": lambda x, m: F.batch_norm(x, torch.zeros(x.shape[1]), torch.ones(x.shape[1]), None, torch.full((x.shape[1],), 0.3), mask=m),
    "instance": lambda x, m: F.instance_norm(x, bias=torch.full((x.shape[1],), 0.3), mask=m),
    "group": lambda x, m: F.group_norm(x, 2, None, torch.full((x.shape[1],), 0.3), mask=m),
}


@pytest.mark.parametrize("call", list(MASKED_CALLS))
def test_a_mask_in_another_layout_than_the_input(backend, call):
    """A whole-shape contiguous mask with a channels-last input (the common case), and a transposed one with a
    contiguous input, give the results of a mask in the input's layout, in the input's layout (both raised or
    came back NCHW)."""
    x = torch.randn(3, 4, 5, 6)
    mask = torch.rand(3, 4, 5, 6) < 0.7
    want = MASKED_CALLS[call](x, mask)
    cl = x.to(memory_format=torch.channels_last)
    got = MASKED_CALLS[call](cl, mask)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want)
    flipped = mask.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(MASKED_CALLS[call](x, flipped), want)


@pytest.mark.parametrize("op", [F.layer_norm, F.rms_norm])
def test_row_norms_take_a_transposed_mask(backend, op):
    x = torch.randn(3, 4)
    mask = torch.rand(4, 3).t() < 0.7
    torch.testing.assert_close(op(x, [4], mask=mask), op(x, [4], mask=mask.contiguous()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("call", list(MASKED_CALLS))
def test_masked_out_positions_are_the_bias_in_half_precision(backend, dtype, call):
    """The mean written into masked-out positions is rounded to the input's dtype, so they normalized to a few
    hundredths instead of 0 (inputs near 20); they output exactly the bias."""
    x = (torch.randn(3, 4, 5, 6) + 20).to(dtype)
    mask = torch.rand(3, 4, 5, 6) < 0.7
    y = MASKED_CALLS[call](x, mask)
    assert y.dtype == dtype and (y[~mask] == torch.tensor(0.3, dtype=dtype)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_out_positions_after_an_activation_and_the_bias_gradient_in_half_precision(backend, dtype):
    """relu of a bias of -0.01 is 0 at every masked-out position (24 of 32 were not), and each position counts
    once in the bias gradient, masked out or not."""
    x = (torch.randn(3, 4, 32) + 20).to(dtype)
    mask = torch.rand(3, 4, 32) < 0.7
    bias = torch.full((32,), -0.01, dtype=dtype, requires_grad=True)
    y = F.layer_norm(x, [32], None, bias, mask=mask, activation="relu")
    assert y[~mask].eq(0).all()
    y = F.layer_norm(x, [32], None, bias, mask=mask)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(bias.grad, torch.full((32,), 12.0, dtype=dtype))
