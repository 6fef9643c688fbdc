"""gradcheck / gradgradcheck in float64 and torch.compile(fullgraph=True) over the custom ops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import forward_ad, gradcheck, gradgradcheck
from torch.profiler import ProfilerActivity, profile

import normkit
import normkit.functional as F
import normkit.nn as nk
from normkit.distributed import SyncBatchNorm
from normkit.functional import _core
from normkit.kernels.contract import ACTIVATIONS

D = dict(dtype=torch.float64)
RM, RV = torch.randn(4, **D), torch.rand(4, **D) + 0.5

FUNCS = {
    "batch_norm-train": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True), (3, 4, 5)),
    "batch_norm-train-channels_last": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True), (2, 4, 3, 2)),
    "batch_norm-eval": (lambda x, w, b: F.batch_norm(x, RM, RV, w, b, False), (3, 4, 5)),
    "instance_norm": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), (2, 4, 5)),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), (2, 4, 3)),
    "group_norm-channels_last": (lambda x, w, b: F.group_norm(x, 2, w, b), (2, 4, 3, 2)),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, [4], w, b), (3, 4)),
    "rms_norm": (lambda x, w, b: F.rms_norm(x, [4], w * b), (3, 4)),
    "group_norm-silu": (lambda x, w, b: F.group_norm(x, 2, w, b, activation="silu"), (2, 4, 3)),
    "batch_norm-eval-gelu": (lambda x, w, b: F.batch_norm(x, RM, RV, w, b, False, activation="gelu"), (3, 4, 5)),
    "layer_norm-gelu": (lambda x, w, b: F.layer_norm(x, [4], w, b, activation="gelu"), (3, 4)),
}


def _inputs(name, shape):
    x = torch.randn(shape, **D)
    if name.endswith("channels_last"):
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.rand(4, **D) + 0.5, torch.randn(4, **D)
    return tuple(t.requires_grad_() for t in (x, w, b))


def _gradcheck_cases():
    """Every function on the default backend; those with a fused activation there only in the slow run
    (float64 with an activation compiles the cpu kernels once more per activation) and on the reference
    backend in the default run, which checks the core's autograd around the activation."""
    for name in FUNCS:
        fused = "-" in name and name.rsplit("-", 1)[1] in ACTIVATIONS
        yield pytest.param(name, "auto", id=name, marks=[pytest.mark.slow] if fused else [])
        if fused:
            yield pytest.param(name, "reference", id=f"{name}-reference")


@pytest.mark.parametrize("name,backend", list(_gradcheck_cases()))
def test_gradcheck_and_gradgradcheck(name, backend):
    fn, shape = FUNCS[name]
    inputs = _inputs(name, shape)
    with normkit.backend(backend):
        assert gradcheck(fn, inputs)
        assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_custom_ops_pass_opcheck(activation):
    x = torch.randn(2, 6, 5)
    w, b = torch.rand(6, requires_grad=True), torch.randn(6, requires_grad=True)  # as the modules hold them
    shape, pshape = [2, 2, 3, 1, 5], [2, 3, 1, 1]
    torch.library.opcheck(_core._norm_batch, (x.requires_grad_(), shape, w, b, 1e-5, False, activation, pshape))
    w4, b4 = w.detach().view(pshape).requires_grad_(), b.detach().view(pshape).requires_grad_()
    torch.library.opcheck(_core._norm_batch, (x, shape, w4, b4, 1e-5, False, activation, None))
    mean, rstd = torch.randn(2, 2, 1), torch.rand(2, 2, 1) + 0.5
    torch.library.opcheck(_core._norm_fixed, (x, shape, mean, rstd, w, b, activation, None, pshape))
    torch.library.opcheck(_core._norm_fixed, (x, shape, mean.flatten(), rstd.flatten(), w4, b4, activation, 1e-5, None))


def _twins(name):
    """A normkit layer and its torch.nn twin with the same (non-trivial) state, and an input for one sample."""
    make, shape = {
        "layer_norm": (lambda m: m.LayerNorm(4), (2, 4)),
        "group_norm": (lambda m: m.GroupNorm(2, 4), (2, 4, 5)),
        "group_norm-channels_last": (lambda m: m.GroupNorm(2, 4), (2, 4, 3, 2)),
        "instance_norm": (lambda m: m.InstanceNorm1d(4, affine=True), (4, 5)),
        "rms_norm": (lambda m: m.RMSNorm(4), (2, 4)),
        "batch_norm-eval": (lambda m: m.BatchNorm1d(4).eval(), (3, 4)),
        "batch_norm-untracked": (lambda m: m.BatchNorm1d(4, track_running_stats=False), (3, 4)),
    }[name]
    ours, theirs = make(nk), make(torch.nn)
    for t in list(ours.parameters()) + list(ours.buffers()):
        if t.is_floating_point():
            t.data.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    if name.endswith("channels_last"):
        x = x.to(memory_format=torch.channels_last)
    return ours, theirs, x


def _transformed(transform, layer, x):
    """``layer`` under a functorch transform, on ``x`` (one sample) or a batch of three."""
    batch = torch.stack([x, 2 * x + 1, -x])
    if transform == "vmap":
        return torch.func.vmap(layer)(batch)
    if transform == "vmap-no_grad":
        with torch.no_grad():
            return torch.func.vmap(layer)(batch)
    if transform == "grad":
        return torch.func.grad(lambda t: layer(t).square().sum())(x)
    if transform == "jacrev":
        return torch.func.jacrev(layer)(x)
    if transform == "jvp":
        return torch.stack(torch.func.jvp(layer, (x,), (torch.ones_like(x),)))
    if transform == "vmap-grad":
        return torch.func.vmap(torch.func.grad(lambda t: layer(t).tanh().sum()))(batch)
    params = dict(layer.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(params)
    return torch.cat([g.flatten() for g in grads.values()])


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("transform", ["vmap", "vmap-no_grad", "grad", "jacrev", "jvp", "vmap-grad", "functional_call-grad"])
@pytest.mark.parametrize(
    "name",
    ["layer_norm", "group_norm", "group_norm-channels_last", "instance_norm", "rms_norm", "batch_norm-eval",
     "batch_norm-untracked"],
)
def test_functorch_transforms_match_torch_nn(name, transform, backend):
    """The kernels read raw memory, which no transform can follow: under one the core runs torch ops,
    so every transform gives what it gives on torch.nn's layer."""
    ours, theirs, x = _twins(name)
    with normkit.backend(backend):
        got = _transformed(transform, ours, x)
    # torch.nn's GroupNorm fails on a channels-last sample under vmap (a view of its strides)
    torch.testing.assert_close(got, _transformed(transform, theirs, x.contiguous()), atol=1e-5, rtol=1e-5)


def test_ensembles_vmap_over_stacked_parameters():
    layers = [nk.GroupNorm(2, 4) for _ in range(3)]
    for layer in layers:
        torch.nn.init.uniform_(layer.weight, 0.5, 1.5)
        torch.nn.init.uniform_(layer.bias)
    params, buffers = torch.func.stack_module_state(layers)
    x = torch.randn(2, 4, 5)
    got = torch.func.vmap(lambda p, b: torch.func.functional_call(layers[0], (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(got, torch.stack([layer(x) for layer in layers]))


def test_vmap_refuses_to_update_unbatched_running_stats_as_torch_does():
    x = torch.randn(3, 5, 4, 6)
    with pytest.raises(RuntimeError) as theirs:
        torch.func.vmap(torch.nn.BatchNorm1d(4))(x)
    with pytest.raises(RuntimeError) as ours:
        torch.func.vmap(nk.BatchNorm1d(4))(x)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_jit_trace_records_the_computation(train):
    """A traced model computes on new inputs of the traced shape (running statistics included) as a
    traced torch.nn model does, not the kernels' outputs frozen at tracing time."""
    def model(m):
        return torch.nn.Sequential(m.BatchNorm2d(3), m.GroupNorm(3, 3), m.LayerNorm(5)).train(train)

    ours, theirs = model(nk), model(torch.nn)
    first, x = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5) * 3 + 1
    traced_ours, traced_theirs = torch.jit.trace(ours, first), torch.jit.trace(theirs, first)
    torch.testing.assert_close(traced_ours(x), traced_theirs(x))
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


class SmallCNN(nk.Module):
    """The article's four layers in one network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nk.Conv2d(3, 8, 3, padding=1)
        self.bn = nk.BatchNorm2d(8)
        self.gn = nk.GroupNorm(2, 8)
        self.inorm = nk.InstanceNorm2d(8, affine=True)
        self.ln = nk.LayerNorm([8, 6, 6])
        self.rms = nk.RMSNorm(6)
        self.bnact = nk.BatchNormAct2d(8, act_layer="silu")
        self.gnact = nk.GroupNormAct(4, 8, act_layer="gelu")

    def forward(self, x):
        x = self.gn(self.bn(self.conv(x)).relu())
        return self.rms(self.ln(self.gnact(self.bnact(self.inorm(x))))).sum()


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_compile_fullgraph_matches_eager(channels_last):
    torch._dynamo.reset()
    model = SmallCNN()
    x = torch.randn(4, 3, 6, 6)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    eager = SmallCNN()
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    for training in (True, False):
        model.train(training)
        eager.train(training)
        out, ref = compiled(x), eager(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
        if training:
            out.backward()
            ref.backward()
            for p, q in zip(model.parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)
    for a, b in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "layer", [nk.LayerNorm(16), nk.GroupNorm(2, 4), nk.BatchNorm2d(4), nk.InstanceNorm2d(4, affine=True)]
)
def test_eager_backward_makes_no_zero_gradients_for_the_statistics(layer):
    """The statistics are outputs of the eager autograd.Function too; autograd would otherwise fill a
    zero gradient for each of them on every backward (a kernel launch each on a GPU)."""
    x = torch.randn(3, 4, 5, 16 if isinstance(layer, nk.LayerNorm) else 6, requires_grad=True)
    dy = torch.randn_like(x)
    with normkit.backend("cpu"):  # the reference's fused backward builds a zero mean of its own
        y = layer(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y.backward(dy)
    fills = ("aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like")
    filled = [e.key for e in prof.key_averages() if e.key in fills]
    assert not filled, filled
    assert x.grad is not None and layer.weight.grad is not None


def test_fx_symbolic_trace_keeps_each_layer_whole():
    """FX's tracer keeps torch.nn's layers as ``call_module`` nodes; a normkit layer's forward checks
    shapes a Proxy cannot answer, so it makes itself such a node, and a model converted to normkit
    still traces (feature extractors, FX quantization and fusion passes rely on it)."""
    model = torch.nn.Sequential(
        nk.WSConv2d(3, 8, 3), nk.BatchNorm2d(8), nk.GroupNorm(2, 8), nk.InstanceNorm2d(8, affine=True),
        nk.LayerNorm2d(8), nk.FrozenBatchNorm2d(8), SyncBatchNorm(8), nk.BatchRenorm2d(8, warmup_steps=0),
        nk.GhostBatchNorm(8, ghost_batch_size=2), nk.SwitchableNorm2d(8), nk.EvoNormB0(8), nk.EvoNormS0(8),
        nk.BatchNormAct2d(8), nk.SyncBatchNormAct2d(8, act_layer="silu"), nk.GroupNormAct(2, 8), nk.LayerNorm(4),
        nk.RMSNorm(4),
    )
    every_forward = {getattr(nk, name).forward for name in nk.__all__} - {nk.AdaptiveInstanceNorm.forward}
    assert every_forward <= {type(m).forward for m in model}
    twin = copy.deepcopy(model)
    graph_module = torch.fx.symbolic_trace(model)
    nodes = [(n.op, n.target) for n in graph_module.graph.nodes if n.op not in ("placeholder", "output")]
    assert nodes == [("call_module", str(i)) for i in range(len(model))]
    x = torch.randn(4, 3, 6, 6)
    for _ in range(2):
        torch.testing.assert_close(graph_module(x), twin(x))
    torch.testing.assert_close(graph_module.state_dict(), twin.state_dict())
    twin.eval(), graph_module.eval()
    torch.testing.assert_close(graph_module(x), twin(x))


def test_fx_symbolic_trace_keeps_a_two_input_layer_whole():
    class Stylize(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.adain = nk.AdaptiveInstanceNorm()

        def forward(self, content, style):
            return self.adain(content, style).relu()

    graph_module = torch.fx.symbolic_trace(Stylize())
    assert [n.op for n in graph_module.graph.nodes] == ["placeholder", "placeholder", "call_module", "call_method", "output"]
    content, style = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 4, 4) * 2 + 1
    torch.testing.assert_close(graph_module(content, style), Stylize()(content, style))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_compile_fullgraph_eval_batchnorm_without_grad(affine):
    """Inference: no input wants a gradient, so eval-mode BatchNorm takes its statistics as they are;
    the compiler must see nothing it cannot trace on that path."""
    torch._dynamo.reset()
    layer = nk.BatchNorm2d(4, affine=affine).eval()
    layer.running_mean.uniform_()
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", ["group_norm", "layer_norm", "batch_norm-train", "batch_norm-eval", "rms_norm",
                                  "group_norm-silu"])
def test_forward_mode_ad_matches_torch(name, backend):
    """``torch.autograd.forward_ad`` dual tensors carry their tangent through every norm (the kernels
    would drop it silently)."""
    ours = {
        "group_norm": lambda v: F.group_norm(v, 2), "layer_norm": lambda v: F.layer_norm(v, [5]),
        "batch_norm-train": lambda v: F.batch_norm(v, None, None, training=True),
        "batch_norm-eval": lambda v: F.batch_norm(v, RM, RV), "rms_norm": lambda v: F.rms_norm(v, [5]),
        "group_norm-silu": lambda v: F.group_norm(v, 2, activation="silu"),
    }[name]
    theirs = {
        "group_norm": lambda v: TF.group_norm(v, 2), "layer_norm": lambda v: TF.layer_norm(v, [5]),
        "batch_norm-train": lambda v: TF.batch_norm(v, None, None, training=True),
        "batch_norm-eval": lambda v: TF.batch_norm(v, RM, RV), "rms_norm": lambda v: TF.rms_norm(v, [5]),
        "group_norm-silu": lambda v: TF.silu(TF.group_norm(v, 2)),
    }[name]
    x, tangent = torch.randn(3, 4, 5, **D), torch.randn(3, 4, 5, **D)
    with normkit.backend(backend), forward_ad.dual_level():
        got = forward_ad.unpack_dual(ours(forward_ad.make_dual(x, tangent)))
        want = forward_ad.unpack_dual(theirs(forward_ad.make_dual(x, tangent)))
    assert got.tangent is not None
    torch.testing.assert_close(got.primal, want.primal)
    torch.testing.assert_close(got.tangent, want.tangent)


def test_fx_symbolic_trace_of_a_lone_layer_says_what_to_trace():
    """A layer cannot be a node of its own graph: tracing it alone is a clear error, not a graph that
    calls a submodule named ''."""
    with pytest.raises(torch.fx.proxy.TraceError, match=r"root of this trace.*nn.Sequential"):
        torch.fx.symbolic_trace(nk.LayerNorm(4))
    graph_module = torch.fx.symbolic_trace(torch.nn.Sequential(nk.LayerNorm(4)))
    x = torch.randn(2, 4)
    torch.testing.assert_close(graph_module(x), torch.nn.functional.layer_norm(x, (4,)))
