"""Converters, the norm factory, FrozenBatchNorm2d and LayerNorm2d."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normkit.nn as nk
from normkit.convert import (
    UnsupportedNormWarning,
    convert_sync_batchnorm,
    freeze_batchnorm,
    fuse_conv_bn_eval,
    get_norm_layer,
    replace_norm,
    to_normkit,
    to_torch,
)
from normkit.distributed import SyncBatchNorm
from normkit.nn.frozen import FrozenBatchNorm2d
from normkit.nn.layernorm2d import LayerNorm2d

F64 = dict(rtol=1e-9, atol=1e-10)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norms = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(), nn.GroupNorm(4, c), nn.InstanceNorm2d(c, affine=True, track_running_stats=True)
        )

    def forward(self, x):
        return self.norms(self.conv(x))


class Zoo(nn.Module):
    """Every torch.nn norm type, nested modules, containers, a weight-tied pair and a module used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.sync = nn.SyncBatchNorm(8, momentum=None)
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.pool = nn.Linear(36, 1)
        self.heads = nn.ModuleDict(
            {"bn": nn.BatchNorm1d(8), "ln": nn.LayerNorm(8), "tied": nn.LayerNorm(8), "rms": nn.RMSNorm(8, eps=1e-6)}
        )
        self.heads["tied"].weight = self.heads["ln"].weight
        self.seq1d = nn.Sequential(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), nn.InstanceNorm1d(6, affine=True))
        self.seq3d = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.InstanceNorm3d(4))
        self.shared = nn.LayerNorm(6, elementwise_affine=True, bias=False)

    def forward(self, x4, x3, x5):
        h = self.sync(self.stem(x4))
        for block in self.blocks:
            h = block(h)
        v = self.pool(h.flatten(2)).squeeze(-1)
        heads = self.heads
        y1 = heads["rms"](heads["tied"](heads["ln"](heads["bn"](v))))
        y2 = self.shared(self.shared(self.seq1d(x3)))
        return y1, y2, self.seq3d(x5)


def _randomize(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + 1)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
    return model


def _inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    shapes = [(5, 3, 6, 6), (5, 4, 8), (5, 2, 4, 4, 4)]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def _run(model: nn.Module, inputs):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    outs = model(*xs)
    sum(o.square().sum() * (i + 1) for i, o in enumerate(outs)).backward()
    return [o.detach() for o in outs], [x.grad for x in xs]


def _assert_same_results(a: nn.Module, b: nn.Module, inputs, **tol) -> None:
    for m in (a, b):
        m.zero_grad(set_to_none=True)
    outs_a, grads_a = _run(a, inputs)
    outs_b, grads_b = _run(b, inputs)
    torch.testing.assert_close(outs_b, outs_a, **tol)
    torch.testing.assert_close(grads_b, grads_a, **tol)
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        torch.testing.assert_close(params_b[name].grad, params_a[name].grad, **tol, msg=name)
    torch.testing.assert_close(dict(b.named_buffers()), dict(a.named_buffers()), **tol)


def _norm_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if "Norm" in type(m).__name__}


def test_round_trip_every_layer_type() -> None:
    original = _randomize(Zoo().double())
    model = copy.deepcopy(original)
    params = dict(model.named_parameters(remove_duplicate=False))
    keys = list(model.state_dict())
    converted = to_normkit(model)
    assert converted is model
    assert _norm_types(converted) == {
        nk.BatchNorm1d, nk.BatchNorm2d, nk.BatchNorm3d, nk.InstanceNorm1d, nk.InstanceNorm2d, nk.InstanceNorm3d,
        nk.GroupNorm, nk.LayerNorm, nk.RMSNorm, SyncBatchNorm,
    }
    assert list(converted.state_dict()) == keys
    for name, p in converted.named_parameters(remove_duplicate=False):
        assert p is params[name], name
    assert converted.heads["tied"].weight is converted.heads["ln"].weight
    for mode in ("train", "eval"):
        getattr(original, mode)(), getattr(converted, mode)()
        _assert_same_results(original, converted, _inputs(), **F64)
    converted.load_state_dict(original.state_dict(), strict=True)
    back = to_torch(converted)
    assert _norm_types(back) == _norm_types(original)
    assert list(back.state_dict()) == keys
    back.train(), original.train()
    _assert_same_results(original, back, _inputs(), **F64)


def test_module_used_twice_stays_shared() -> None:
    norm = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), norm, nn.Conv2d(4, 4, 1), norm)
    to_normkit(model)
    assert model[1] is model[3] and isinstance(model[1], nk.BatchNorm2d)


def test_root_norm_is_returned_converted() -> None:
    ln = nn.LayerNorm(4)
    out = to_normkit(ln)
    assert isinstance(out, nk.LayerNorm) and out.weight is ln.weight and isinstance(ln, nn.LayerNorm)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.BatchNorm2d(4, momentum=None, affine=False),
        lambda: nn.InstanceNorm2d(4, track_running_stats=True),
        lambda: nn.GroupNorm(2, 4, bias=False),
        lambda: nn.LayerNorm((3, 4), elementwise_affine=False),
        lambda: nn.RMSNorm(4),
        lambda: nn.SyncBatchNorm(4),
    ],
)
def test_twin_has_every_attribute_a_fresh_layer_has(make) -> None:
    """The twin is built from the original's state, so it must hold everything normkit's own __init__ sets."""
    torch_layer = make()
    twin = to_normkit(torch_layer)
    fresh = type(twin).__new__(type(twin))
    init_args = {nk.GroupNorm: (2, 4), nk.LayerNorm: ((3, 4),)}.get(type(twin), (4,))
    fresh.__init__(*init_args)
    assert set(vars(fresh)) <= set(vars(twin))
    assert set(vars(torch_layer)) <= set(vars(to_torch(twin)))


def test_carries_training_mode_device_dtype_memory_format_and_hooks() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, dtype=torch.float64)).double().eval()
    model = model.to(memory_format=torch.channels_last)
    calls = []
    model[1].register_forward_hook(lambda m, i, o: calls.append(o.is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    expected = model(x)
    to_normkit(model)
    bn = model[1]
    assert not bn.training and bn.weight.dtype == torch.float64 and bn.running_mean.dtype == torch.float64
    torch.testing.assert_close(model(x), expected, **F64)
    assert calls == [True, True]


def _register_every_hook(norm: nn.Module, calls: list) -> list:
    """One hook of each kind torch keeps on a module; each records its name and the module it was given."""

    def record(name):
        return lambda module, *args: calls.append((name, module))

    return [
        norm.register_forward_pre_hook(record("forward_pre")),
        norm.register_forward_pre_hook(record("forward_pre_kwargs"), with_kwargs=True),
        norm.register_forward_hook(record("forward")),
        norm.register_forward_hook(record("forward_kwargs"), with_kwargs=True, always_call=True),
        norm.register_full_backward_pre_hook(record("backward_pre")),
        norm.register_full_backward_hook(record("backward")),
        norm.register_state_dict_pre_hook(record("state_dict_pre")),
        norm.register_state_dict_post_hook(record("state_dict")),
        norm.register_load_state_dict_pre_hook(record("load_state_dict_pre")),
        norm.register_load_state_dict_post_hook(record("load_state_dict_post")),
    ]


@pytest.mark.parametrize("convert,make", [(to_normkit, nn.BatchNorm2d), (to_torch, nk.BatchNorm2d)])
def test_hooks_carry_over_and_old_handles_still_remove_them(convert, make) -> None:
    norm, calls = make(3), []
    handles = _register_every_hook(norm, calls)
    model = convert(nn.Sequential(norm))
    assert type(model[0]) is not make
    del norm
    gc.collect()

    def exercise() -> set:
        calls.clear()
        model(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
        model.load_state_dict(model.state_dict())
        assert all(module is model[0] for _, module in calls)
        return {name for name, _ in calls}

    assert len(exercise()) == len(handles)
    for handle in handles:
        handle.remove()
    assert exercise() == set()


class MyNorm(nn.Module):
    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True)


class ScaledLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return 2 * super().forward(x)


def test_unsupported_norms_are_left_untouched_with_a_warning() -> None:
    model = nn.Sequential(nn.Linear(4, 4), MyNorm(), ScaledLayerNorm(4), nn.LayerNorm(4))
    with pytest.warns(UnsupportedNormWarning, match=r"1 \(MyNorm\).*2 \(ScaledLayerNorm\)"):
        to_normkit(model)
    assert type(model[1]) is MyNorm and type(model[2]) is ScaledLayerNorm and type(model[3]) is nk.LayerNorm


def test_normkit_only_layers_convert_silently() -> None:
    layers = [
        FrozenBatchNorm2d(4), LayerNorm2d(4), nk.BatchRenorm1d(4), nk.BatchRenorm2d(4), nk.BatchRenorm3d(4),
        nk.GhostBatchNorm(4), nk.SwitchableNorm1d(4), nk.SwitchableNorm2d(4), nk.SwitchableNorm3d(4),
        nk.EvoNormS0(4), nk.EvoNormB0(4), nk.BatchNormAct2d(4), nk.GroupNormAct(2, 4), nk.AdaptiveInstanceNorm(),
        nk.SyncBatchNormAct2d(4),
    ]
    model = nn.ModuleList(layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_normkit(model) is model
    assert [type(m) for m in model] == [type(m) for m in layers]


def test_model_without_norms_converts_silently() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_normkit(model) is model and to_torch(model) is model


def test_replace_norm_batchnorm_to_groupnorm_keeps_affine_and_placement() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Sequential(nn.BatchNorm2d(8))).double()
    _randomize(model)
    model[3].eval()
    weight = model[1].weight.detach().clone()
    replace_norm(model, "gn:4")
    gn = model[1]
    assert type(gn) is nk.GroupNorm and gn.num_groups == 4 and gn.num_channels == 8
    assert gn.weight.dtype == torch.float64 and torch.equal(gn.weight.detach(), weight)
    assert gn.training and not model[3][0].training
    z = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(gn(z), TF.group_norm(z, 4, gn.weight, gn.bias), **F64)
    assert model(torch.randn(2, 3, 6, 6, dtype=torch.float64)).shape == (2, 8, 4, 4)


def test_replace_norm_other_kinds() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.LayerNorm(4))
    replace_norm(model, "ln2d")
    assert type(model[1]) is LayerNorm2d and type(model[2]) is nn.LayerNorm
    replace_norm(model, "frozenbn")
    assert type(model[1]) is FrozenBatchNorm2d
    replace_norm(model, "none")
    assert type(model[1]) is nn.Identity
    model = replace_norm(nn.BatchNorm2d(8), "in", affine=True)
    assert type(model) is nk.InstanceNorm2d and model.affine


@pytest.mark.parametrize(
    "norm",
    [lambda: nn.InstanceNorm2d(4), lambda: nn.GroupNorm(2, 4, affine=False), lambda: LayerNorm2d(4, elementwise_affine=False)],
)
def test_replace_norm_places_layers_without_tensors_like_the_model(norm) -> None:
    inner = nn.Sequential(nn.ReLU(), norm())
    model = nn.Sequential(nn.Conv2d(3, 4, 1), inner)
    assert next(inner.parameters(), None) is None
    bn = replace_norm(copy.deepcopy(model).to("meta"), "bn")[1][1]
    assert bn.weight.device.type == "meta" and bn.running_mean.device.type == "meta"
    bn = replace_norm(copy.deepcopy(model).double(), "bn")[1][1]
    assert bn.weight.dtype == torch.float64 and bn.running_var.dtype == torch.float64


def test_freeze_batchnorm_places_layers_without_tensors_like_the_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False, track_running_stats=False)).double()
    frozen = freeze_batchnorm(model)[1]
    assert type(frozen) is FrozenBatchNorm2d and frozen.running_var.dtype == torch.float64


def test_replace_norm_leaves_norm_activation_layers() -> None:
    """Replaced by a plain norm, their activation would be gone."""
    model = nn.Sequential(nk.BatchNormAct2d(8, act_layer="silu"), nk.SyncBatchNormAct2d(8), nk.GroupNormAct(2, 8), nn.BatchNorm2d(8))
    replace_norm(model, "gn4")
    assert [type(m) for m in model] == [nk.BatchNormAct2d, nk.SyncBatchNormAct2d, nk.GroupNormAct, nk.GroupNorm]


def test_replace_norm_copies_statistics_into_frozen() -> None:
    bn = _randomize(nn.BatchNorm2d(4)).eval()
    frozen = replace_norm(nn.Sequential(bn), "frozenbn")[0]
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x))


def test_replace_norm_indivisible_groups_names_the_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 48, 1), nn.Sequential(nn.BatchNorm2d(48), nn.Conv2d(48, 20, 1), nn.BatchNorm2d(20)))
    with pytest.raises(ValueError, match=r"'1\.2' \(BatchNorm2d, 20 channels\).*'gn:8'.*divisible"):
        replace_norm(model, "gn:8")


def test_replace_norm_leaves_the_children_of_new_layers_as_built() -> None:
    """Each layer is replaced once, by its own new layer. The walk kept replacements by the ``id`` of the
    freed originals, so a new layer's child (the ``act`` of BatchNormAct2d) built at a freed original's address
    was swapped for another replacement: 2-5 of 16 layers per run."""
    model = nn.Sequential(*[nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4)) for _ in range(32)])
    out = replace_norm(model, "bnact:silu")
    layers = [layer for block in out for layer in block]
    assert all(type(layer) is nk.BatchNormAct2d and type(layer.act) is nn.Identity for layer in layers)
    assert len({id(layer) for layer in layers}) == 64 and not any(".act." in k for k in out.state_dict())


def test_replace_norm_takes_a_factory_of_norm_and_activation() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()), nn.BatchNorm2d(8))
    out = replace_norm(model, lambda c: nn.Sequential(nn.GroupNorm(4, c), nn.ReLU()))
    for block in (out[1][0], out[2]):
        assert [type(m) for m in block] == [nn.GroupNorm, nn.ReLU]
    assert out(torch.randn(2, 3, 4, 4)).shape == (2, 8, 4, 4)


def test_replace_norm_keeps_frozen_parameters_frozen() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.BatchNorm2d(8))
    model[1].requires_grad_(False)
    out = replace_norm(model, "gn:4")
    assert [p.requires_grad for p in out[1].parameters()] == [False, False]
    assert [p.requires_grad for p in out[2].parameters()] == [True, True]


@pytest.mark.parametrize(
    "spec,cls",
    [
        ("bn", nk.BatchNorm2d), ("BN", nk.BatchNorm2d), ("bn1d", nk.BatchNorm1d), ("bn2d", nk.BatchNorm2d),
        ("bn3d", nk.BatchNorm3d), ("ln", nk.LayerNorm), ("ln2d", LayerNorm2d), ("in", nk.InstanceNorm2d),
        ("in2d", nk.InstanceNorm2d), ("gn32", nk.GroupNorm), ("gn:16", nk.GroupNorm), ("gn", nk.GroupNorm),
        ("rms", nk.RMSNorm), ("frozenbn", FrozenBatchNorm2d), ("syncbn", SyncBatchNorm), ("none", nn.Identity),
        (None, nn.Identity), (nn.BatchNorm2d, nn.BatchNorm2d), (nk.GroupNorm, nk.GroupNorm),
        (lambda c: nn.GroupNorm(c // 2, c), nn.GroupNorm),
    ],
)
def test_get_norm_layer(spec, cls) -> None:
    layer = get_norm_layer(spec)(64)
    assert type(layer) is cls
    groups = {"gn32": 32, "gn": 32, "gn:16": 16}.get(spec if isinstance(spec, str) else "", None)
    if groups is not None:
        assert layer.num_groups == groups
    if cls in (nk.BatchNorm2d, LayerNorm2d, nk.GroupNorm):
        assert sum(p.numel() for p in layer.parameters()) == 128


def test_get_norm_layer_passes_keyword_arguments() -> None:
    assert get_norm_layer(nn.GroupNorm)(64, num_groups=8).num_groups == 8
    assert get_norm_layer("bn")(4, momentum=None, dtype=torch.float64).running_mean.dtype == torch.float64


def test_get_norm_layer_unknown_lists_valid_specs() -> None:
    with pytest.raises(ValueError, match=r"unknown norm layer spec 'batchy'.*bn2d.*rms.*gn:<G>"):
        get_norm_layer("batchy")
    with pytest.raises(ValueError, match="groups must be positive"):
        get_norm_layer("gn0")
    with pytest.raises(TypeError, match="nn.Module subclass"):
        get_norm_layer(int)


def test_convert_sync_batchnorm_shares_state() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nk.BatchNorm1d(4)), nn.LayerNorm(4))
    weight = model[1].weight
    group = object()
    convert_sync_batchnorm(model, process_group=group)
    assert type(model[1]) is SyncBatchNorm and type(model[2][0]) is SyncBatchNorm and type(model[3]) is nn.LayerNorm
    assert model[1].weight is weight and model[1].process_group is group
    assert SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2)).num_features == 2


class TorchSubclassBatchNorm(nn.BatchNorm2d):
    pass


class NormkitSubclassBatchNorm(nk.BatchNorm1d):
    pass


def test_convert_sync_batchnorm_converts_what_torch_converts() -> None:
    def zoo() -> nn.Sequential:
        return nn.Sequential(
            TorchSubclassBatchNorm(4), nn.SyncBatchNorm(4), NormkitSubclassBatchNorm(4), SyncBatchNorm(4),
            nk.BatchRenorm2d(4), nk.GhostBatchNorm(4), nn.InstanceNorm2d(4), nk.BatchNormAct2d(4, act_layer="silu"),
            nk.SyncBatchNormAct2d(4, act_layer=nn.Tanh),
        )

    group = object()
    model = zoo()
    weight = model[0].weight
    ours = convert_sync_batchnorm(model, process_group=group)
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(zoo())
    assert type(theirs[0]) is nn.SyncBatchNorm and type(theirs[1]) is nn.SyncBatchNorm
    for i in range(4):
        assert type(ours[i]) is SyncBatchNorm and ours[i].process_group is group, i
    assert ours[0].weight is weight
    assert [type(m) for m in ours[4:7]] == [nk.BatchRenorm2d, nk.GhostBatchNorm, nn.InstanceNorm2d]
    assert [type(m) for m in theirs[7:]] == [nn.SyncBatchNorm, nn.SyncBatchNorm]  # their activations are gone
    for i in (7, 8):
        assert type(ours[i]) is nk.SyncBatchNormAct2d and ours[i].process_group is group, i
    assert ours[7].activation == "silu" and isinstance(ours[8].act, nn.Tanh)


class BatchNormWithChildren(nn.BatchNorm2d):
    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.aux = nn.Sequential(nn.Identity(), nn.BatchNorm2d(c))


def test_converters_reach_the_children_of_a_converted_layer() -> None:
    """As torch's convert_sync_batchnorm: a replaced layer's own submodules are converted as well."""
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Identity(), BatchNormWithChildren(4)))
    assert type(theirs[1].aux[1]) is nn.SyncBatchNorm
    ours = convert_sync_batchnorm(nn.Sequential(nn.Identity(), BatchNormWithChildren(4)))
    assert type(ours[1]) is SyncBatchNorm and type(ours[1].aux[1]) is SyncBatchNorm
    root = convert_sync_batchnorm(BatchNormWithChildren(4))
    assert type(root) is SyncBatchNorm and type(root.aux[1]) is SyncBatchNorm
    inner = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Identity(), BatchNormWithChildren(4))
    model[1].aux[1] = inner
    shared = to_normkit(nn.Sequential(model, inner))
    assert type(shared[0][1].aux[1]) is nk.BatchNorm2d and shared[0][1].aux[1] is shared[1]


def test_convert_sync_batchnorm_output_without_process_group() -> None:
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    x = torch.randn(3, 3, 4, 4)
    expected = copy.deepcopy(model)(x)
    torch.testing.assert_close(convert_sync_batchnorm(model)(x), expected)


def test_frozen_batchnorm_matches_eval_batchnorm_and_loads_checkpoints() -> None:
    bn = _randomize(nn.BatchNorm2d(6, eps=1e-3)).eval()
    model = freeze_batchnorm(nn.Sequential(nn.Conv2d(2, 6, 1), bn))
    frozen = model[1]
    assert type(frozen) is FrozenBatchNorm2d and frozen.eps == 1e-3
    assert list(frozen.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert not list(frozen.parameters())
    x = torch.randn(3, 6, 4, 4, requires_grad=True)
    for mode in ("train", "eval"):
        getattr(frozen, mode)()
        torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)
    xc = x.detach().contiguous(memory_format=torch.channels_last)
    assert frozen(xc).is_contiguous(memory_format=torch.channels_last)
    fresh = FrozenBatchNorm2d(6, eps=1e-3)
    fresh.load_state_dict(bn.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), bn(x), rtol=1e-5, atol=1e-6)
    assert "FrozenBatchNorm2d(6, eps=0.001)" == repr(fresh)
    (fresh(x).sum()).backward()
    assert x.grad is not None


class TwoPath(nn.Module):
    """Attribute-style conv/bn pairs (found by tracing), a shared conv (not foldable) and a Linear+BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3), nk.BatchNorm2d(8)
        self.up, self.bn3 = nn.ConvTranspose2d(8, 4, 2, stride=2), FrozenBatchNorm2d(4)
        self.shared_conv, self.bn4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.fc, self.bn5 = nn.Linear(4, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn3(self.up(self.bn2(self.conv2(x))))
        x = self.bn4(self.shared_conv(x)) + self.shared_conv(x)
        return self.bn5(self.fc(torch.flatten(TF.adaptive_avg_pool2d(x, 1), 1)))


def test_fuse_conv_bn_eval_traced_model() -> None:
    model = _randomize(TwoPath()).eval()
    with torch.no_grad():
        model.bn3.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    fuse_conv_bn_eval(model)
    for name in ("bn1", "bn2", "bn3", "bn5"):
        assert type(getattr(model, name)) is nn.Identity, name
    assert type(model.bn4) is nn.BatchNorm2d
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("groups,cin,cout", [(1, 3, 8), (2, 4, 8), (8, 8, 8), (8, 8, 16), (2, 6, 4)])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_fuse_grouped_conv_transpose(groups: int, cin: int, cout: int, dims: int, bias: bool) -> None:
    conv = getattr(nn, f"ConvTranspose{dims}d")(cin, cout, 3, stride=2, groups=groups, bias=bias)
    norm = getattr(nn, f"BatchNorm{dims}d")(cout)
    model = _randomize(nn.Sequential(conv, norm).double()).eval()
    x = torch.randn(2, cin, *[4] * dims, dtype=torch.float64)
    expected = model(x)
    fuse_conv_bn_eval(model)
    assert type(model[1]) is nn.Identity and model[0].weight.shape == conv.weight.shape
    torch.testing.assert_close(model(x), expected, **F64)


class FlatHead(nn.Module):
    """Linear + BatchNorm1d pairs after the flatten and view forms of a 2-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(12, 8), nn.BatchNorm1d(8)
        self.fc2, self.bn2 = nn.Linear(8, 6), nn.BatchNorm1d(6, affine=False)
        self.fc3, self.bn3 = nn.Linear(12, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        h = self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x.flatten(1))))))
        return h + self.bn3(self.fc3(x.view(x.size(0), -1)))


class MixedRank(nn.Module):
    """Untraceable: Linear + BatchNorm1d on a 3-D input, then a flattened MLP head, in nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3)
        )

    def forward(self, x):
        return self.head(self.body(x)) if x.sum() > -1e9 else x


def test_fuse_linear_batchnorm1d_only_where_input_is_2d() -> None:
    x3 = torch.randn(2, 8, 5, dtype=torch.float64)
    model = _randomize(nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8)).double()).eval()
    expected = model(x3)
    fuse_conv_bn_eval(model)
    assert type(model[1]) is nn.BatchNorm1d
    torch.testing.assert_close(model(x3), expected, **F64)

    head = _randomize(FlatHead().double()).eval()
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    expected = head(x)
    fuse_conv_bn_eval(head)
    assert all(type(getattr(head, f"bn{i}")) is nn.Identity for i in (1, 2, 3))
    torch.testing.assert_close(head(x), expected, **F64)

    mixed = _randomize(MixedRank().double()).eval()
    expected = mixed(x3)
    fuse_conv_bn_eval(mixed)
    assert type(mixed.body[1]) is nn.BatchNorm1d
    assert type(mixed.head[2]) is nn.Identity and type(mixed.head[5]) is nn.Identity
    torch.testing.assert_close(mixed(x3), expected, **F64)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.body(x) if x.sum() > -1e9 else x


def test_fuse_conv_bn_eval_falls_back_to_sequential_neighbours() -> None:
    model = _randomize(Untraceable()).eval()
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    fuse_conv_bn_eval(model)
    assert type(model.body[1]) is nn.Identity
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_fuse_conv_bn_eval_keeps_norms_with_an_activation() -> None:
    """A synced BatchNorm + activation is a BatchNorm to isinstance, but not an affine map: folded, its
    activation was dropped. It stays, as BatchNormAct2d does; plain BatchNorms beside it still fold."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nk.SyncBatchNormAct2d(4), nn.Conv2d(4, 4, 1), nk.BatchNormAct2d(4, act_layer="silu"),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
    )
    model = _randomize(model).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    fuse_conv_bn_eval(model)
    assert [type(m) for m in model[1::2]] == [nk.SyncBatchNormAct2d, nk.BatchNormAct2d, nn.Identity]
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_fuse_conv_bn_eval_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match=r"eval mode"):
        fuse_conv_bn_eval(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layernorm2d_matches_permuted_layer_norm(channels_last: bool, dtype: torch.dtype) -> None:
    layer = _randomize(LayerNorm2d(6, dtype=dtype))
    x = torch.randn(3, 6, 5, 4, dtype=dtype) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = layer(x)
    ref = TF.layer_norm(x.permute(0, 2, 3, 1), (6,), layer.weight, layer.bias, 1e-6).permute(0, 3, 1, 2)
    dy = torch.randn_like(y)
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(
        torch.autograd.grad(y, (x, layer.weight, layer.bias), dy),
        torch.autograd.grad(ref, (x, layer.weight, layer.bias), dy),
        **tol,
    )
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_layernorm2d_state_dict_and_errors() -> None:
    layer = LayerNorm2d(4)
    layer.load_state_dict(nn.LayerNorm(4).state_dict(), strict=True)
    assert layer.eps == 1e-6 and LayerNorm2d(4, elementwise_affine=False).weight is None
    with pytest.raises(RuntimeError, match=r"expected input with shape \[N, 4, \*\]"):
        layer(torch.randn(2, 3, 5, 5))
    assert layer(torch.randn(0, 4, 2, 2)).shape == (0, 4, 2, 2)
