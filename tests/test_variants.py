"""normkit.nn.variants against float64 references written from each paper's equations."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normkit
import normkit.nn as nk
from normkit.convert import get_norm_layer, replace_norm
from normkit.nn.variants import auto_groups, sweep_groups, weight_standardize

F64 = dict(rtol=1e-9, atol=1e-10)
EPS = 1e-5


@pytest.fixture(params=["reference", "cpu"])
def backend(request):
    with normkit.backend(request.param):
        yield request.param


def layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return x.to(memory_format=fmt) if channels_last and fmt else x


def leaf(*shape, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale + shift).requires_grad_()


def check_same(out, ref, inputs, channels_last=False):
    """Outputs and gradients (w.r.t. every tensor of ``inputs``) agree; the memory format is kept."""
    torch.testing.assert_close(out, ref, **F64)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(out.dim())
    if channels_last and fmt:
        assert out.is_contiguous(memory_format=fmt)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, g, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, g, retain_graph=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)


def check_param_grads(out, ref, m: nn.Module, twin: nn.Module, names=("weight", "bias")):
    """Gradients of ``m``'s parameters equal those of the same-named parameters of ``twin``."""
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [getattr(m, n) for n in names], g, retain_graph=True)
    want = torch.autograd.grad(ref, [getattr(twin, n) for n in names], g, retain_graph=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)


def reduce_dims(x):
    return (0, *range(2, x.dim()))


def shaped(t, x):
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def load_copy(module: nn.Module, fresh: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf), strict=True)
    return fresh


# ---------------------------------------------------------------- BatchRenorm (Ioffe 2017, Alg. 1)


def brn_reference(x, rmean, rvar, w, b, rmax, dmax, eps=EPS):
    dims = reduce_dims(x)
    mu = x.mean(dims)
    sigma = torch.sqrt(x.var(dims, unbiased=False) + eps)
    running_sigma = torch.sqrt(rvar + eps)
    r = (sigma / running_sigma).clamp(1 / rmax, rmax).detach()
    d = ((mu - rmean) / running_sigma).clamp(-dmax, dmax).detach()
    xhat = (x - shaped(mu, x)) / shaped(sigma, x) * shaped(r, x) + shaped(d, x)
    return shaped(w, x) * xhat + shaped(b, x)


@pytest.mark.parametrize("cls,shape", [(nk.BatchRenorm1d, (6, 3, 5)), (nk.BatchRenorm2d, (4, 3, 5, 4)), (nk.BatchRenorm3d, (2, 3, 3, 2, 4))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_renorm_matches_paper(backend, cls, shape, channels_last):
    m = cls(3, rmax=1.5, dmax=0.5, warmup_steps=0, ramp_steps=0, dtype=torch.float64)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.3, -2.0, 0.0]))
        m.running_var.copy_(torch.tensor([0.2, 4.0, 1.0]))
        m.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        m.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    x = leaf(*shape, scale=2.0, shift=0.5)
    rmean, rvar = m.running_mean.clone(), m.running_var.clone()
    m.num_batches_tracked.fill_(10)
    out = m(layout(x, channels_last))
    ref = brn_reference(x, rmean, rvar, m.weight, m.bias, 1.5, 0.5)
    check_same(out, ref, (x, m.weight, m.bias), channels_last)
    torch.testing.assert_close(m.running_mean, 0.9 * rmean + 0.1 * x.detach().mean(reduce_dims(x)), **F64)
    torch.testing.assert_close(m.running_var, 0.9 * rvar + 0.1 * x.detach().var(reduce_dims(x)), **F64)
    assert int(m.num_batches_tracked) == 11
    m.eval()
    ref_eval = TF.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, EPS)
    check_same(m(layout(x, channels_last)), ref_eval, (x, m.weight, m.bias), channels_last)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_renorm_is_batchnorm_when_rmax_1_dmax_0(momentum):
    m = nk.BatchRenorm2d(4, momentum=momentum, rmax=1.0, dmax=0.0, warmup_steps=0, dtype=torch.float64)
    bn = nn.BatchNorm2d(4, momentum=momentum, dtype=torch.float64)
    for _ in range(3):
        x = leaf(3, 4, 5, 5, scale=3.0, shift=1.0)
        out, ref = m(x), bn(x)
        check_same(out, ref, (x,))
        check_param_grads(out, ref, m, bn)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(m, name), getattr(bn, name), **F64)


def test_batch_renorm_schedule_and_warmup():
    m = nk.BatchRenorm2d(2, rmax=3.0, dmax=5.0, warmup_steps=10, ramp_steps=20)
    assert m.limits(0) == (1.0, 0.0) and m.limits(10) == (1.0, 0.0)
    assert m.limits(20) == pytest.approx((2.0, 2.5)) and m.limits(30) == (3.0, 5.0) and m.limits(10**6) == (3.0, 5.0)
    bn = nn.BatchNorm2d(2)
    x = torch.randn(4, 2, 3, 3) * 2 + 1
    torch.testing.assert_close(m(x), bn(x))
    with pytest.raises(ValueError, match="rmax >= 1"):
        nk.BatchRenorm2d(2, rmax=0.5)


def test_batch_renorm_state_dict_is_batchnorm():
    bn = nn.BatchNorm2d(5)
    bn.running_mean.normal_()
    m = load_copy(bn, nk.BatchRenorm2d(5))
    back = load_copy(m, nn.BatchNorm2d(5))
    torch.testing.assert_close(back.running_mean, bn.running_mean)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 5, 3))


# ------------------------------------------------------------ GhostBatchNorm (Hoffer et al. 2017)


def ghost_reference(x, w, b, sizes, eps=EPS):
    outs = []
    for chunk in x.split(sizes):
        dims = reduce_dims(chunk)
        mu, var = chunk.mean(dims), chunk.var(dims, unbiased=False)
        outs.append(shaped(w, x) * (chunk - shaped(mu, x)) / torch.sqrt(shaped(var, x) + eps) + shaped(b, x))
    return torch.cat(outs)


@pytest.mark.parametrize(
    "shape,ghost,sizes",
    [((8, 3, 4, 4), 4, [4, 4]), ((10, 3, 3, 5), 4, [4, 4, 2]), ((9, 3), 4, [4, 5]), ((7, 3, 6), 3, [3, 3, 1])],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_ghost_batch_norm_matches_paper(backend, shape, ghost, sizes, channels_last):
    m = nk.GhostBatchNorm(3, ghost_batch_size=ghost, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        m.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    x = leaf(*shape, scale=2.0, shift=0.5)
    out = m(layout(x, channels_last))
    check_same(out, ghost_reference(x, m.weight, m.bias, sizes), (x, m.weight, m.bias), channels_last)
    chunks = x.detach().split(sizes)
    weights = torch.tensor([len(c) for c in chunks], dtype=torch.float64) / x.shape[0]
    mean = sum(w * c.mean(reduce_dims(c)) for w, c in zip(weights, chunks))
    var = sum(w * c.var(reduce_dims(c)) for w, c in zip(weights, chunks))
    torch.testing.assert_close(m.running_mean, 0.1 * mean, **F64)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * var, **F64)
    m.eval()
    ref = TF.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, EPS)
    check_same(m(layout(x, channels_last)), ref, (x,), channels_last)


def test_ghost_batch_norm_running_var_where_float32_products_overflow():
    """Per-channel variance 1e38 fits float32, the ghost batches' count-weighted variances did not: each is now
    weighted by its share of the batch (running_var was inf; torch's BatchNorm overflows here too, normkit's
    does not)."""
    torch.manual_seed(0)
    x = torch.randn(64, 2, 4, 4) * 1e19
    m = nk.GhostBatchNorm(2, ghost_batch_size=32)
    m(x)
    chunks = x.double().split(32)
    var = sum(c.var((0, 2, 3)) for c in chunks) / len(chunks)
    torch.testing.assert_close(m.running_var.double(), 0.9 + 0.1 * var, rtol=1e-5, atol=0)
    assert m.running_var.dtype == torch.float32


@pytest.mark.parametrize("ghost", [8, 64])
def test_ghost_batch_norm_with_whole_batch_is_batchnorm(ghost):
    m, bn = nk.GhostBatchNorm(4, ghost_batch_size=ghost, dtype=torch.float64), nn.BatchNorm2d(4, dtype=torch.float64)
    x = leaf(8, 4, 3, 3, scale=2.0)
    check_same(m(x), bn(x), (x,))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(m, name), getattr(bn, name), **F64)
    assert load_copy(m, nn.BatchNorm2d(4, dtype=torch.float64)) is not None


def test_ghost_batch_norm_errors():
    with pytest.raises(ValueError, match="ghost_batch_size"):
        nk.GhostBatchNorm(3, ghost_batch_size=0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nk.GhostBatchNorm(3, ghost_batch_size=1)(torch.randn(4, 3))



@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda: nk.EvoNormS0(4, num_groups=0), ValueError, "num_groups must be positive, got 0"),
        (lambda: nk.EvoNormS0(4, num_groups=-2), ValueError, "num_groups must be positive, got -2"),
        (lambda: nk.EvoNormS0(4, num_groups=2.0), TypeError, "num_groups must be an integer, got 2.0"),
        (lambda: nk.EvoNormS0(4, num_groups=3), ValueError, r"num_channels \(4\) must be divisible by num_groups \(3\)"),
        (lambda: sweep_groups(8, float, [0]), ValueError, "num_groups must be positive, got 0"),
        (lambda: sweep_groups(8, float, [-2, 2]), ValueError, "num_groups must be positive, got -2"),
        (lambda: nk.GhostBatchNorm(4, ghost_batch_size=2.5), TypeError, "ghost_batch_size must be an integer, got 2.5"),
        (lambda: nk.GhostBatchNorm(4, ghost_batch_size=-1), ValueError, "ghost_batch_size must be positive, got -1"),
        (lambda: nk.GroupNormAct(0, 4), ValueError, "num_groups must be positive, got 0"),
        (lambda: nk.GroupNormAct(-2, 4), ValueError, "num_groups must be positive, got -2"),
        (lambda: get_norm_layer("gnact0:silu")(8), ValueError, "num_groups must be positive, got 0"),
        (lambda: nk.BatchRenorm2d(4, warmup_steps=2.5), TypeError, "warmup_steps must be an integer, got 2.5"),
        (lambda: nk.BatchRenorm2d(4, ramp_steps=-1), ValueError, "ramp_steps must be non-negative, got -1"),
    ],
)
def test_variant_arguments_are_checked_at_construction(make, error, message):
    """A zero, negative or fractional count fails where it is given, not in the first forward or after
    a silent truncation."""
    with pytest.raises(error, match=message):
        make()


def test_variant_counts_accept_any_integer_type():
    import numpy as np

    evo = nk.EvoNormS0(4, num_groups=np.int64(2))
    assert evo.num_groups == 2 and type(evo.num_groups) is int
    brn = nk.BatchRenorm2d(4, warmup_steps=0, ramp_steps=0)
    assert (brn.warmup_steps, brn.ramp_steps) == (0, 0)
    assert sweep_groups(8, float, [np.int64(4)])[0] == 4


# -------------------------------------------------------- SwitchableNorm (Luo et al. 2019, eq. 3–5)


def sn_reference(x, mean_logits, var_logits, w, b, running=None, eps=EPS):
    spatial = tuple(range(2, x.dim()))
    mu_in, var_in = x.mean(spatial, keepdim=True), x.var(spatial, unbiased=False, keepdim=True)
    mu_ln, var_ln = x.mean((1, *spatial), keepdim=True), x.var((1, *spatial), unbiased=False, keepdim=True)
    if running is None:
        mu_bn, var_bn = x.mean((0, *spatial), keepdim=True), x.var((0, *spatial), unbiased=False, keepdim=True)
    else:
        mu_bn, var_bn = shaped(running[0], x), shaped(running[1], x)
    wm, wv = torch.softmax(mean_logits, 0), torch.softmax(var_logits, 0)
    mu = wm[0] * mu_in + wm[1] * mu_ln + wm[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    return shaped(w, x) * (x - mu) / torch.sqrt(var + eps) + shaped(b, x)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "cls,shape", [(nk.SwitchableNorm1d, (3, 4, 7)), (nk.SwitchableNorm2d, (3, 4, 5, 6)), (nk.SwitchableNorm3d, (2, 4, 3, 2, 4))]
)
def test_switchable_norm_matches_paper(backend, channels_last, cls, shape):
    m = cls(4, dtype=torch.float64)
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.3, -0.2, 1.0]))
        m.var_weight.copy_(torch.tensor([-1.0, 0.5, 0.2]))
        m.weight.normal_()
        m.bias.normal_()
    x = leaf(*shape, scale=2.0, shift=1.0)
    params = (x, m.weight, m.bias, m.mean_weight, m.var_weight)
    check_same(m(layout(x, channels_last)), sn_reference(x, m.mean_weight, m.var_weight, m.weight, m.bias), params, channels_last)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * x.detach().var(reduce_dims(x)), **F64)
    with pytest.raises(ValueError, match="expected"):
        m(x.detach().unsqueeze(-1))
    m.eval()
    ref = sn_reference(x, m.mean_weight, m.var_weight, m.weight, m.bias, (m.running_mean, m.running_var))
    check_same(m(layout(x, channels_last)), ref, params, channels_last)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_switchable_norm_one_hot_is_the_chosen_norm(which):
    m = nk.SwitchableNorm2d(6, affine=False, dtype=torch.float64)
    with torch.no_grad():
        logits = torch.full((3,), -1e4, dtype=torch.float64)
        logits[which] = 0.0
        m.mean_weight.copy_(logits)
        m.var_weight.copy_(logits)
    x = leaf(4, 6, 5, 5, scale=3.0, shift=2.0)
    chosen = [
        lambda t: TF.instance_norm(t, eps=EPS),
        lambda t: TF.group_norm(t, 1, eps=EPS),
        lambda t: TF.batch_norm(t, None, None, training=True, eps=EPS),
    ][which]
    check_same(m(x), chosen(x), (x,))


def test_switchable_norm_state_dict_roundtrip():
    m = nk.SwitchableNorm2d(4)
    m(torch.randn(2, 4, 3, 3))
    with torch.no_grad():
        m.mean_weight.normal_()
    fresh = load_copy(m, nk.SwitchableNorm2d(4)).eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fresh(x), m.eval()(x))
    assert set(m.state_dict()) == {
        "weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var", "num_batches_tracked"
    }


# ------------------------------------------------------------ group count rule and sweep (Wu & He)


def test_auto_groups_rule_and_sweep():
    assert [auto_groups(c) for c in (256, 64, 48, 16, 3, 1)] == [32, 32, 24, 8, 1, 1]
    assert auto_groups(64, target=8, min_group_size=16) == 4
    best, scores = sweep_groups(32, lambda g: -abs(g - 8))
    assert best == 8 and set(scores) == {1, 2, 4, 8, 16, 32}
    with pytest.raises(ValueError, match="divisible"):
        sweep_groups(12, float, candidates=[5])
    gn = get_norm_layer("gn:auto")(48)
    assert isinstance(gn, nk.GroupNorm) and gn.num_groups == 24


# ----------------------------------------------------------------- EvoNorm (Liu et al. 2020, Fig. 1)


def evo_s0_reference(x, v, w, b, groups, eps=EPS):
    n, c, h, wd = x.shape
    var = x.view(n, groups, -1).var(2, unbiased=False).view(n, groups, 1)
    std = torch.sqrt(var + eps).expand(n, groups, c // groups * h * wd).reshape(x.shape)
    return x * torch.sigmoid(shaped(v, x) * x) / std * shaped(w, x) + shaped(b, x)


def evo_b0_reference(x, v, w, b, batch_var, eps=EPS):
    inst_std = torch.sqrt(x.var((2, 3), unbiased=False, keepdim=True) + eps)
    den = torch.maximum(torch.sqrt(shaped(batch_var, x) + eps), shaped(v, x) * x + inst_std)
    return x / den * shaped(w, x) + shaped(b, x)


def randomized(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


@pytest.mark.parametrize("channels_last", [False, True])
def test_evonorm_s0_matches_paper(backend, channels_last):
    m = randomized(nk.EvoNormS0(8, num_groups=4, dtype=torch.float64))
    x = leaf(3, 8, 4, 5, scale=2.0, shift=0.5)
    ref = evo_s0_reference(x, m.v, m.weight, m.bias, 4)
    check_same(m(layout(x, channels_last)), ref, (x, m.v, m.weight, m.bias), channels_last)
    m.eval()
    check_same(m(layout(x, channels_last)), ref, (x,), channels_last)
    assert nk.EvoNormS0(64).num_groups == 32
    with pytest.raises(ValueError, match="divisible"):
        nk.EvoNormS0(6, num_groups=4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_evonorm_b0_matches_paper(backend, channels_last):
    m = randomized(nk.EvoNormB0(6, dtype=torch.float64))
    x = leaf(4, 6, 3, 5, scale=2.0, shift=0.5)
    ref = evo_b0_reference(x, m.v, m.weight, m.bias, x.var((0, 2, 3), unbiased=False))
    check_same(m(layout(x, channels_last)), ref, (x, m.v, m.weight, m.bias), channels_last)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * x.detach().var((0, 2, 3)), **F64)
    m.eval()
    ref = evo_b0_reference(x, m.v, m.weight, m.bias, m.running_var)
    check_same(m(layout(x, channels_last)), ref, (x, m.v), channels_last)
    fresh = load_copy(m, nk.EvoNormB0(6, dtype=torch.float64)).eval()
    torch.testing.assert_close(fresh(x), m(x), **F64)
    assert set(m.state_dict()) == {"weight", "bias", "v", "running_var"}
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 6, 3, dtype=torch.float64))


# ------------------------------------------------------ weight standardization (Qiao et al. 2019)


@pytest.mark.parametrize("channels_last", [False, True])
def test_ws_conv_matches_paper(backend, channels_last):
    conv = nk.WSConv2d(3, 5, 3, padding=1, dtype=torch.float64)
    x = leaf(2, 3, 6, 6)
    w = conv.weight
    w_hat = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), unbiased=False, keepdim=True) + EPS)
    ref = TF.conv2d(x, w_hat, conv.bias, padding=1)
    check_same(conv(layout(x, channels_last)), ref, (x, conv.weight, conv.bias), channels_last)
    plain = nn.Conv2d(3, 5, 3, padding=1, dtype=torch.float64)
    assert load_copy(plain, nk.WSConv2d(3, 5, 3, padding=1, dtype=torch.float64)) is not None


def test_weight_standardize_and_gn_ws():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
    weight = model[0].weight
    replace_norm(weight_standardize(model), "gn:4")
    assert type(model[0]) is nk.WSConv2d and model[0].weight is weight and type(model[3]) is nk.WSConv2d
    assert isinstance(model[1], nk.GroupNorm) and model[1].num_groups == 4
    assert model(torch.randn(1, 3, 6, 6)).shape == (1, 8, 4, 4)


# ------------------------------------------------------------------ AdaIN (Huang & Belongie 2017)


def adain_reference(x, s, eps=EPS):
    mx, sx = x.mean((2, 3), keepdim=True), torch.sqrt(x.var((2, 3), unbiased=False, keepdim=True) + eps)
    ms, ss = s.mean((2, 3), keepdim=True), torch.sqrt(s.var((2, 3), unbiased=False, keepdim=True) + eps)
    return ss * (x - mx) / sx + ms


@pytest.mark.parametrize("style_batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_adain_matches_paper(backend, style_batch, channels_last):
    x = leaf(3, 4, 5, 6, scale=2.0, shift=1.0)
    s = leaf(style_batch, 4, 7, 3, scale=0.5, shift=-3.0)
    out = nk.AdaptiveInstanceNorm()(layout(x, channels_last), layout(s, channels_last))
    check_same(out, adain_reference(x, s), (x, s), channels_last)
    swapped = nk.AdaptiveInstanceNorm()(x.detach(), s.detach())
    torch.testing.assert_close(swapped.mean((2, 3)), s.detach().mean((2, 3)).expand(3, 4), **F64)
    with pytest.raises(ValueError, match="does not match"):
        nk.AdaptiveInstanceNorm()(x, torch.randn(2, 4, 3, 3, dtype=torch.float64))


@pytest.mark.parametrize("channels_last", [False, True])
def test_adain_without_eps_keeps_a_constant_style_channel(channels_last):
    """eps = 0 and a constant style channel (a dead ReLU): sigma(s) = 0, so the output is mu(s) there (the folded
    mean divided by 0: NaN before) and the content's gradient 0; the rest as the definition (whose gradient for
    the constant style channel, through sqrt at 0, is NaN)."""
    x = leaf(2, 3, 4, 4, scale=2.0)
    s = torch.relu(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    s[:, 1] = 0.25
    s.requires_grad_()
    out = nk.AdaptiveInstanceNorm(eps=0.0)(layout(x, channels_last), layout(s, channels_last))
    ref = adain_reference(x, s, eps=0.0)
    torch.testing.assert_close(out, ref, **F64)
    assert torch.equal(out[:, 1].detach(), torch.full_like(out[:, 1], 0.25))
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (x, s), g, retain_graph=True), torch.autograd.grad(ref, (x, s), g)):
        torch.testing.assert_close(a, b, equal_nan=True, **F64)
    assert not torch.autograd.grad(out, x, g)[0].isnan().any()


# ------------------------------------------------------------------- norm + activation, frozen BN


# float64 with a fused activation compiles the cpu kernels once per activation, which nothing else in
# the default run needs: the cpu backend runs these in the slow run (the kernels' fused activations are
# checked in float32 by test_cpu_backend and test_activation).
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.slow)], indirect=True)
@pytest.mark.parametrize("act,ref_act", [("relu", TF.relu), ("silu", TF.silu), ("gelu", TF.gelu), (None, lambda t: t)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_norm_act_is_norm_then_activation(backend, act, ref_act, channels_last):
    bn = nn.BatchNorm2d(4, dtype=torch.float64)
    m = load_copy(randomized(bn), nk.BatchNormAct2d(4, act_layer=act, dtype=torch.float64))
    x = leaf(3, 4, 5, 5)
    out, ref = m(layout(x, channels_last)), ref_act(bn(x))
    check_same(out, ref, (x,), channels_last)
    check_param_grads(out, ref, m, bn)
    torch.testing.assert_close(m.running_mean, bn.running_mean, **F64)
    gn = randomized(nn.GroupNorm(2, 4, dtype=torch.float64))
    g = load_copy(gn, nk.GroupNormAct(2, 4, act_layer=act, dtype=torch.float64))
    out, ref = g(layout(x, channels_last)), ref_act(gn(x))
    check_same(out, ref, (x,), channels_last)
    check_param_grads(out, ref, g, gn)
    with pytest.raises(ValueError, match="unknown activation"):
        nk.BatchNormAct2d(4, act_layer="tanhh")


def test_norm_act_module_class_and_replace_norm_leaves_it():
    m = nk.GroupNormAct(2, 4, act_layer=nn.Hardswish)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(m(x), TF.hardswish(TF.group_norm(x, 2, m.weight, m.bias)))
    model = nn.Sequential(nk.BatchNormAct2d(4), nk.GroupNormAct(2, 4))
    replace_norm(model, "gn:2")
    assert type(model[0]) is nk.BatchNormAct2d and type(model[1]) is nk.GroupNormAct


@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_batch_norm_is_eval_batchnorm(channels_last):
    bn = randomized(nn.BatchNorm2d(4, dtype=torch.float64))
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    frozen = load_copy(bn, nk.FrozenBatchNorm2d(4, dtype=torch.float64))
    x = leaf(3, 4, 5, 5)
    check_same(frozen.train()(layout(x, channels_last)), bn.eval()(x), (x,), channels_last)


# --------------------------------------------------------------- factory, replace_norm, state_dict


@pytest.mark.parametrize(
    "spec,cls,attrs",
    [
        ("brn", nk.BatchRenorm2d, {}), ("brn1d", nk.BatchRenorm1d, {}), ("brn3d", nk.BatchRenorm3d, {}),
        ("gbn", nk.GhostBatchNorm, {"ghost_batch_size": 32}), ("gbn:16", nk.GhostBatchNorm, {"ghost_batch_size": 16}),
        ("sn", nk.SwitchableNorm2d, {}), ("evos0", nk.EvoNormS0, {"num_groups": 8}), ("EvoB0", nk.EvoNormB0, {}),
        ("bnact", nk.BatchNormAct2d, {"act_name": "relu"}), ("bnact:silu", nk.BatchNormAct2d, {"act_name": "silu"}),
        ("gnact", nk.GroupNormAct, {"num_groups": 8}), ("gnact4:gelu", nk.GroupNormAct, {"num_groups": 4, "act_name": "gelu"}),
    ],
)
def test_factory_specs(spec, cls, attrs):
    layer = get_norm_layer(spec)(16)
    assert type(layer) is cls
    for k, v in attrs.items():
        assert getattr(layer, k) == v


@pytest.mark.parametrize("spec", ["brn", "gbn:2", "sn", "evos0", "evob0"])
def test_replace_norm_to_and_from_variants(spec):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    replace_norm(model, spec)
    assert type(model[1]) is type(get_norm_layer(spec)(8)) and model[1].weight.eq(2.0).all()
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    replace_norm(model, "bn")
    assert type(model[1]) is nk.BatchNorm2d and model[1].weight.eq(2.0).all()


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nk.BatchRenorm2d(4, warmup_steps=0), (4, 4, 3, 3)),
        (lambda: nk.GhostBatchNorm(4, ghost_batch_size=2), (6, 4, 3, 3)),
        (lambda: nk.SwitchableNorm2d(4), (4, 4, 3, 3)),
        (lambda: nk.EvoNormS0(4, 2), (4, 4, 3, 3)),
        (lambda: nk.EvoNormB0(4), (4, 4, 3, 3)),
        (lambda: nk.BatchNormAct2d(4, act_layer="silu"), (4, 4, 3, 3)),
        (lambda: nk.GroupNormAct(2, 4), (4, 4, 3, 3)),
        (lambda: nk.WSConv2d(4, 4, 1), (4, 4, 3, 3)),
    ],
)
def test_state_dict_roundtrip(make, shape):
    m = randomized(make())
    for _ in range(2):
        m(torch.randn(shape) * 2 + 1)
    fresh = load_copy(m, make())
    m.eval(), fresh.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(fresh(x), m(x))
    for (k, a), (_, b) in zip(m.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


# ---------------------------------------------------------------- edge cases every variant shares


@pytest.mark.parametrize("shape", [(0, 2, 3, 3), (4, 2, 0, 3)])
@pytest.mark.parametrize("make", [lambda: nk.SwitchableNorm2d(2), lambda: nk.EvoNormB0(2), lambda: nk.BatchRenorm2d(2)])
def test_an_empty_batch_leaves_the_running_statistics(make, shape):
    """As BatchNorm: an empty training batch (no values to average) must not blend NaN into the buffers,
    which would turn every later evaluation output into NaN."""
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("running")}
    assert m(torch.randn(shape)).shape == shape
    for k, v in before.items():
        torch.testing.assert_close(m.state_dict()[k], v, msg=k)
    assert m.eval()(torch.randn(2, 2, 3, 3)).isfinite().all()


@pytest.mark.parametrize(
    "call,op",
    [
        (lambda x: nk.LayerNorm2d(4)(x), "LayerNormKernelImpl"),
        (lambda x: nk.SwitchableNorm2d(4)(x), "batch_norm"),
        (lambda x: nk.EvoNormS0(4, 2)(x), "GroupNormKernelImpl"),
        (lambda x: nk.EvoNormB0(4)(x), "batch_norm"),
        (lambda x: nk.AdaptiveInstanceNorm()(x, x), "batch_norm"),
    ],
)
def test_integer_input_is_refused(call, op):
    """Layers built of torch ops would otherwise compute in integers and return truncated values."""
    with pytest.raises(NotImplementedError, match=f'"{op}" not implemented for \'Long\''):
        call(torch.arange(2 * 4 * 9).view(2, 4, 3, 3))


def test_batch_renorm_warm_up_lasts_warmup_steps():
    assert nk.BatchRenorm2d(2, warmup_steps=0, ramp_steps=0).limits(0) == (3.0, 5.0)
    m = nk.BatchRenorm2d(2, warmup_steps=3, ramp_steps=0)
    assert [m.limits(s) for s in range(5)] == [(1.0, 0.0)] * 3 + [(3.0, 5.0)] * 2


def test_batch_renorm_masked_out_positions_output_the_bias():
    """As BatchNorm with ``mask=``, also after warm-up, when r and d fold into the affine."""
    m = nk.BatchRenorm2d(2, warmup_steps=0, ramp_steps=0)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([2.0, 3.0]))
        m.bias.copy_(torch.tensor([0.5, -0.5]))
    mask = torch.ones(4, 3, 3, dtype=torch.bool)
    mask[:, 0] = False
    y = m(torch.randn(4, 2, 3, 3) + 4, mask)
    torch.testing.assert_close(y[:, :, 0], m.bias.detach().view(1, 2, 1).expand(4, 2, 3))


def test_evonorm_keeps_the_input_dtype():
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    assert nk.EvoNormS0(4, 2)(x).dtype == torch.bfloat16 and nk.EvoNormB0(4)(x).dtype == torch.bfloat16
    assert nk.EvoNormS0(4, 2).double()(x.float()).dtype == torch.float32


def test_ghost_batch_norm_on_empty_planes_and_wrong_channels():
    assert nk.GhostBatchNorm(3, ghost_batch_size=2)(torch.randn(8, 3, 0, 4)).shape == (8, 3, 0, 4)
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
        nk.GhostBatchNorm(4, affine=False, ghost_batch_size=2)(torch.randn(6, 3, 2, 2))


def test_variant_argument_errors():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    act = nk.BatchNormAct2d(3, act_layer=nn.ReLU())
    torch.testing.assert_close(act(x), torch.relu(nn.BatchNorm2d(3)(x)))
    with pytest.raises(TypeError, match="EvoNormB0 needs a float momentum"):
        nk.EvoNormB0(3, momentum=None)
    with pytest.raises(ValueError, match="rmax >= 1"):
        nk.BatchRenorm2d(3, rmax=float("nan"))


# The variants whose statistics come from ``masked.moments``: (constructor, number of inputs).
MOMENT_VARIANTS = [
    (lambda: nk.SwitchableNorm2d(4), 1),
    (lambda: nk.EvoNormS0(4, 2), 1),
    (lambda: nk.EvoNormB0(4), 1),
    (lambda: nk.AdaptiveInstanceNorm(), 2),
]


@pytest.mark.parametrize("make,inputs", MOMENT_VARIANTS)
def test_variants_compile_without_graph_breaks(make, inputs):
    """Their statistics come from torch ops (``masked.moments``), whose overflow test must not branch
    on values where torch.compile traces (``fullgraph=True`` refuses a data-dependent branch)."""
    torch._dynamo.reset()
    m = make()
    xs = [torch.randn(2, 4, 3, 3) for _ in range(inputs)]
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*xs), make()(*xs))


@pytest.mark.parametrize("make,inputs", MOMENT_VARIANTS)
def test_variants_exact_where_float32_squares_overflow(make, inputs):
    """float32 input of scale 1e20: the variance (1e40) overflows float32, the statistics do not; the
    output and the input's gradient equal the float64 computation (they were NaN)."""
    torch.manual_seed(0)
    xs = [(torch.randn(3, 4, 5, 5) * 1e20).requires_grad_() for _ in range(inputs)]
    y = make()(*xs)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    y64 = make().double()(*x64)
    y64.backward(dy.double())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    grad = x64[0].grad
    torch.testing.assert_close(xs[0].grad.double(), grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())
