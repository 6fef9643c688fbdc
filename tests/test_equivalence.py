"""Every normkit layer next to its torch.nn twin: outputs, gradients and buffers over several steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn as tnn

import normkit
import normkit.nn as nk

# (normkit class, torch class, constructor args, input shapes)
LAYERS = {
    "BatchNorm1d": (nk.BatchNorm1d, tnn.BatchNorm1d, (5,), [(4, 5), (3, 5, 7), (2, 5, 1)]),
    "BatchNorm2d": (nk.BatchNorm2d, tnn.BatchNorm2d, (6,), [(3, 6, 5, 7), (2, 6, 1, 1), (1, 6, 3, 1)]),
    "BatchNorm3d": (nk.BatchNorm3d, tnn.BatchNorm3d, (4,), [(2, 4, 3, 5, 2), (2, 4, 1, 1, 1)]),
    "InstanceNorm1d": (nk.InstanceNorm1d, tnn.InstanceNorm1d, (5,), [(3, 5, 7), (5, 9)]),
    "InstanceNorm2d": (nk.InstanceNorm2d, tnn.InstanceNorm2d, (6,), [(3, 6, 5, 7), (6, 4, 3), (2, 6, 2, 1)]),
    "InstanceNorm3d": (nk.InstanceNorm3d, tnn.InstanceNorm3d, (4,), [(2, 4, 3, 5, 2)]),
    "GroupNorm": (nk.GroupNorm, tnn.GroupNorm, (3, 6), [(3, 6, 5, 7), (2, 6), (2, 6, 9), (2, 6, 2, 3, 2), (1, 6, 1, 1)]),
    "GroupNorm-large-C": (nk.GroupNorm, tnn.GroupNorm, (32, 512), [(2, 512, 3, 3)]),
    "LayerNorm": (nk.LayerNorm, tnn.LayerNorm, ((5, 7),), [(3, 6, 5, 7), (5, 7)]),
    "LayerNorm-1d": (nk.LayerNorm, tnn.LayerNorm, (33,), [(4, 33), (2, 3, 33), (3, 6, 5, 33)]),
    "RMSNorm": (nk.RMSNorm, tnn.RMSNorm, (33,), [(4, 33), (2, 3, 33)]),
    "RMSNorm-2d": (nk.RMSNorm, tnn.RMSNorm, ((5, 7),), [(3, 6, 5, 7)]),
}
RUNNING = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"}
# On a CUDA machine the grid also runs on the GPU (normkit's Triton backend against cuDNN / ATen CUDA).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def _options(name: str):
    """Constructor keyword variants per layer family."""
    if name in RUNNING:
        default_affine = name.startswith("Batch")
        yield "default", {}
        yield "no-affine" if default_affine else "affine", {"affine": not default_affine}
        yield "tracking-off" if default_affine else "tracking-on", {"track_running_stats": not default_affine}
        yield "momentum-none", {"momentum": None, "track_running_stats": True}
        yield "momentum-0.5-no-bias", {"momentum": 0.5, "affine": True, "bias": False, "track_running_stats": True}
    elif name.startswith("GroupNorm"):
        yield "default", {}
        yield "no-affine", {"affine": False}
        yield "no-bias", {"bias": False}
    elif name.startswith("LayerNorm"):
        yield "default", {}
        yield "no-affine", {"elementwise_affine": False}
        yield "no-bias", {"bias": False}
    else:
        yield "default", {}
        yield "no-affine", {"elementwise_affine": False}
        yield "eps", {"eps": 1e-3}


def _cases():
    for name, (_, _, _, shapes) in LAYERS.items():
        for opt_id, opts in _options(name):
            for shape in shapes:
                layouts = ["contiguous"]
                if len(shape) in (4, 5) and not name.startswith(("LayerNorm", "RMSNorm")):
                    layouts.append("channels_last")
                for layout in layouts:
                    yield pytest.param(name, opts, shape, layout, id=f"{name}-{opt_id}-{'x'.join(map(str, shape))}-{layout}")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return x
    return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _pair(name, opts, dtype, device="cpu"):
    nk_cls, t_cls, args, _ = LAYERS[name]
    try:
        theirs = t_cls(*args, **opts, dtype=dtype, device=device)
    except TypeError as exc:  # an older torch (e.g. on a GPU machine) whose twin lacks an argument
        pytest.skip(f"torch {torch.__version__}: {exc}")
    ours = nk_cls(*args, **opts, dtype=dtype, device=device)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _assert_close(a, b, dtype, what, truth=None):
    """Close to torch.nn and, below float64, at least as close to the float64 result as torch.nn is."""
    rtol, atol = TOL[dtype]
    if truth is None:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
        return
    ours, theirs = ((t.double() - truth).abs() for t in (a, b))
    bound = theirs + atol + rtol * truth.abs()
    assert bool((ours <= bound).all()), f"{what}: max error {ours.max().item():.3g} vs torch.nn's {theirs.max().item():.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name,opts,shape,layout", list(_cases()))
def test_matches_torch_nn(name, opts, shape, layout, dtype, device):
    ours, theirs = _pair(name, opts, dtype, device)
    exact = None
    if dtype != torch.float64:
        exact = LAYERS[name][1](*LAYERS[name][2], **opts, dtype=torch.float64, device=device)
        exact.load_state_dict(ours.state_dict())
    batched_one = shape[0] == 1 or (len(shape) > 2 and all(s == 1 for s in shape[2:]))
    for step, training in enumerate([True, True, False, True, False]):
        for m in (ours, theirs, exact):
            if m is not None:
                m.train(training)
        x = _layout((torch.randn(shape, dtype=torch.float64) * (step + 1) + step).to(device, dtype), layout)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        try:
            expected = theirs(xb)
        except ValueError as exc:  # torch refuses (e.g. one value per channel when training)
            assert batched_one
            with pytest.raises(ValueError, match=str(exc).replace("[", r"\[").replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
                ours(xa)
            continue
        out = ours(xa)
        xe = x.double().requires_grad_() if exact is not None else None
        y_exact = exact(xe) if exact is not None else None
        assert out.dtype == expected.dtype and out.shape == expected.shape
        if layout == "channels_last":
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert out.is_contiguous(memory_format=fmt), "memory format lost"
        _assert_close(out, expected, dtype, f"output step {step}", None if y_exact is None else y_exact.detach())
        dy = torch.randn_like(out)
        out.backward(dy)
        expected.backward(dy)
        if y_exact is not None:
            y_exact.backward(dy.double())
        _assert_close(xa.grad, xb.grad, dtype, f"input grad step {step}", None if xe is None else xe.grad)
        exact_params = list(exact.parameters()) if exact is not None else [None] * len(list(theirs.parameters()))
        for (pname, p), q, e in zip(ours.named_parameters(), theirs.parameters(), exact_params):
            _assert_close(p.grad, q.grad, dtype, f"{pname} grad step {step}", None if e is None else e.grad)
            p.grad = q.grad = None
            if e is not None:
                e.grad = None
        for (bname, buf), other in zip(ours.named_buffers(), theirs.buffers()):
            _assert_close(buf, other, dtype, f"{bname} after step {step}")
    assert ours.state_dict().keys() == theirs.state_dict().keys()



@pytest.mark.parametrize(
    "layer,shape",
    [(lambda: nk.GroupNorm(4, 8), (2, 8, 3, 5)), (lambda: nk.BatchNorm3d(8), (2, 8, 2, 3, 4)),
     (lambda: nk.InstanceNorm2d(8, affine=True), (2, 8, 3, 5)), (lambda: nk.BatchNorm2d(8).eval(), (2, 8, 3, 5))],
    ids=["group", "batch3d", "instance", "batch-eval"],
)
def test_channels_last_inputs_reach_the_kernels_without_views(layer, shape):
    """In eager mode a channels-last input goes to the kernels as it is: no permuted view of it, so the
    output's autograd node leads straight to the input, and the output and its gradient keep the layout."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    y = layer()(x)
    assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous()
    assert y.grad_fn.next_functions[0][0].variable is x, [f[0] for f in y.grad_fn.next_functions]
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("cls", ["BatchNorm2d", "InstanceNorm2d"])
def test_eval_backward_after_a_training_step_uses_the_forward_statistics(cls):
    """An eval-mode forward, a training step that updates the running buffers in place, then the first
    output's backward: no error (torch.nn raises none either) and the gradients of the forward that
    ran, the same as without the step in between. (torch.nn differentiates with the updated buffers.)"""
    opts = {"track_running_stats": True, "affine": True} if cls == "InstanceNorm2d" else {}
    grads = []
    for step_between in (False, True):
        torch.manual_seed(0)
        layer = getattr(nk, cls)(4, **opts)
        with torch.no_grad():
            layer.running_mean.fill_(0.5)
            layer.running_var.fill_(2.0)
        x = torch.randn(2, 4, 3, 3, requires_grad=True)
        layer.eval()
        y = layer(x)
        if step_between:
            layer.train()
            layer(torch.randn(2, 4, 3, 3) * 3 + 1)
            assert not torch.equal(layer.running_var, torch.full((4,), 2.0))
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        grads.append((x.grad, layer.weight.grad, layer.bias.grad))
    for without, with_step in zip(*grads):
        torch.testing.assert_close(with_step, without, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name,training", [("BatchNorm2d", True), ("BatchNorm2d", False), ("InstanceNorm2d", True),
                                           ("GroupNorm", True), ("LayerNorm", True), ("RMSNorm-2d", True)])
def test_in_place_activation_after_the_norm(name, training, backend):
    """``ReLU(inplace=True)`` after a norm changes its output in place, which autograd allows on a
    layer's own output: every backend hands one out, not a view of its temporaries."""
    ours, theirs = _pair(name, {}, torch.float32)
    ours.train(training), theirs.train(training)
    shape = (2, 6, 5, 7) if name != "LayerNorm" else (3, 6, 5, 7)
    x = torch.randn(shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with normkit.backend(backend):
        out = torch.nn.functional.relu(ours(xa), inplace=True)
        out.backward(torch.ones_like(out))
    expected = torch.nn.functional.relu(theirs(xb), inplace=True)
    expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["BatchNorm2d", "GroupNorm", "LayerNorm", "RMSNorm-2d"])
def test_empty_batch_gives_zero_parameter_gradients(name):
    """An empty batch's output is empty, and the parameters still get gradients, zeros as torch.nn's.
    (torch.nn's affine InstanceNorm raises an IndexError on an empty batch; normkit's returns one.)"""
    ours, theirs = _pair(name, {}, torch.float32)
    x = torch.randn(0, 6, 5, 7)
    out, expected = ours(x.clone().requires_grad_()), theirs(x.clone().requires_grad_())
    assert out.shape == expected.shape
    out.sum().backward()
    expected.sum().backward()
    for (pname, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert q.grad is not None and p.grad is not None, pname
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize(
    "name,shape,perm",
    [("BatchNorm1d", (4, 7, 5), (0, 2, 1)), ("InstanceNorm1d", (3, 9, 5), (0, 2, 1)), ("GroupNorm", (3, 4, 6), (0, 2, 1)),
     ("BatchNorm2d", (2, 6, 7, 5), (0, 1, 3, 2)), ("GroupNorm", (3, 3, 6, 2), (0, 2, 1, 3)),
     ("BatchNorm2d", (2, 5, 7, 6), (0, 3, 1, 2)), ("RMSNorm", (2, 4, 33, 3), (0, 3, 1, 2)),
     ("RMSNorm", (33, 5), (1, 0)), ("LayerNorm-1d", (2, 4, 33, 3), (0, 3, 1, 2))],
    ids=["bn1d-transposed", "in1d-transposed", "gn-3d-transposed", "bn2d-permuted", "gn-4d-permuted", "bn2d-channels_last",
         "rms-channels_last", "rms-transposed", "ln-channels_last"],
)
def test_output_strides_follow_torch_nn(name, shape, perm):
    """Strided inputs give outputs in torch.nn's layout: contiguous, except channels-last 4-D/5-D
    input, which stays channels-last, and RMSNorm's, which keeps the input's strides. A transposed
    sequence (N, L, C) -> (N, C, L) is no channels-last tensor: its output must allow ``view`` as
    torch's does."""
    ours, theirs = _pair(name, {}, torch.float32)
    x = torch.randn(shape).permute(*perm)
    out, expected = ours(x), theirs(x)
    assert out.stride() == expected.stride()
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=1e-5)


def test_layers_are_instances_of_their_torch_twins():
    """Code that picks layers by class (``swa_utils.update_bn``, weight-decay groups, FSDP's mixed
    precision, torch's SyncBatchNorm converter) finds normkit's layers as it finds torch.nn's."""
    from normkit.distributed import SyncBatchNorm

    for ours, theirs in ((nk.BatchNorm1d(3), tnn.BatchNorm1d), (nk.BatchNorm2d(3), tnn.BatchNorm2d),
                         (nk.BatchNorm3d(3), tnn.BatchNorm3d), (nk.InstanceNorm1d(3), tnn.InstanceNorm1d),
                         (nk.InstanceNorm2d(3), tnn.InstanceNorm2d), (nk.InstanceNorm3d(3), tnn.InstanceNorm3d),
                         (nk.GroupNorm(1, 3), tnn.GroupNorm), (nk.LayerNorm(3), tnn.LayerNorm), (nk.RMSNorm(3), tnn.RMSNorm),
                         (SyncBatchNorm(3), tnn.modules.batchnorm._BatchNorm)):
        assert isinstance(ours, theirs), type(ours)
    assert not isinstance(SyncBatchNorm(3), tnn.SyncBatchNorm)  # DistributedDataParallel refuses those on the CPU


def test_swa_update_bn_recomputes_normkit_running_statistics():
    batches = [torch.randn(8, 3, 4, 4) * 5 + 2, torch.randn(8, 3, 4, 4) * 5 + 2]
    ours, theirs = nk.BatchNorm2d(3), tnn.BatchNorm2d(3)
    for layer in (ours, theirs):
        torch.optim.swa_utils.update_bn(batches, tnn.Sequential(layer))
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())
    assert int(ours.num_batches_tracked) == 2


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "name,args,shape",
    [("LayerNorm", (8,), (2, 3, 8)), ("RMSNorm", (8,), (2, 3, 8)), ("GroupNorm", (2, 4), (2, 4, 5)),
     ("BatchNorm2d", (4,), (2, 4, 5, 5)), ("InstanceNorm1d", (4,), (2, 4, 6))],
)
def test_shape_inference_on_the_meta_device(name, args, shape, training):
    """As torch.nn's: a model built on ``meta`` runs to learn its shapes (no values to branch on)."""
    x = torch.empty(shape, device="meta", requires_grad=True)
    ours = getattr(nk, name)(*args, device="meta").train(training)
    y = ours(x)
    assert y.is_meta and y.shape == getattr(tnn, name)(*args, device="meta").train(training)(x).shape
    y.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape
    mask = torch.ones(shape[0], *shape[2:], dtype=torch.bool, device="meta")
    if name in ("BatchNorm2d", "GroupNorm") and training:
        assert ours(x, mask).shape == shape


def test_unknown_names_in_normkit_nn_say_where_to_look():
    with pytest.raises(AttributeError, match="it is in normkit.nn.variants"):
        nk.auto_groups
    assert nk.Conv2d is tnn.Conv2d
