"""Claim 2: normalization reduces vanishing/exploding gradients in deep networks.

Protocol: plain (no residual) 20-layer MLP and 20-layer 1-D CNN on MNIST-1D with PyTorch's default init,
with and without normalization. Per-layer weight-gradient norms at init and along training; the spread is
|log10(first-layer / last-layer gradient norm)| -- 0 means gradients reach every layer at the same scale.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch.nn as tnn
import torch.nn.functional as F

from .. import plots
from ..data import mnist1d
from ..models import MLP, ConvNet, norm_label
from ..stats import cell, paired_effect, verdict_from_checks
from ..study import Claim, Finding, Profile, Run, Table, group, values
from ..training import seed_everything, train_classifier

CLAIM = Claim(
    id="gradient_stability",
    number=2,
    title="Normalization reduces vanishing and exploding gradients in deep networks",
    source="作用 2",
    zh="归一化能减少梯度爆炸和梯度消失问题,这在深层网络中尤为重要。它通过保持激活值的稳定性,提高了训练的稳定性。",
    en="Normalization reduces exploding and vanishing gradients, which matters most in deep networks; by keeping "
    "activations stable it makes training more stable.",
)
VERSION = 1
ARCHS = {"mlp": ("none", "bn", "ln"), "cnn": ("none", "bn", "gn4")}


def settings(profile: Profile) -> dict:
    return {
        "depth": profile.pick(6, 20, 30),
        "width": {"mlp": profile.pick(16, 32, 64), "cnn": profile.pick(8, 8, 16)},
        "epochs": profile.pick(1, 1, 2),
        "n_train": profile.pick(128, 1024, 2000),
        "lr": 0.02,
        "batch_size": 64,
    }


def jobs(profile: Profile) -> list[dict]:
    s = settings(profile)
    base = profile.base(CLAIM.id, VERSION)
    return [
        {**base, "arch": arch, "norm": n, "seed": seed, "depth": s["depth"], "width": s["width"][arch], "epochs": s["epochs"],
         "n_train": s["n_train"], "lr": s["lr"], "batch_size": s["batch_size"]}
        for arch, norms in ARCHS.items() for n in norms for seed in profile.seeds
    ]  # fmt: skip


def build(config: dict) -> tnn.Module:
    if config["arch"] == "mlp":
        return MLP(40, config["width"], config["depth"], 10, config["norm"], config["backend"])
    return ConvNet(1, (40,), [config["width"]] * config["depth"], 10, config["norm"], config["backend"])


def weight_grad_norms(model: tnn.Module) -> list[float]:
    """Gradient norm of each linear/conv weight, input side first."""
    return [
        float(m.weight.grad.norm()) if m.weight.grad is not None else 0.0
        for m in model.modules()
        if isinstance(m, (tnn.Linear, tnn.Conv1d))
    ]


def log_ratio(norms: list[float]) -> float:
    """log10(first / last layer gradient norm); +-inf-free (clamped at 1e-30)."""
    return math.log10(max(norms[0], 1e-30) / max(norms[-1], 1e-30))


def run(config: dict) -> dict:
    seed_everything(config["seed"])
    data = mnist1d().subset(config["n_train"])
    model = build(config).to(config["device"])
    x, y = data.x_train[:256].to(config["device"]), data.y_train[:256].to(config["device"])
    F.cross_entropy(model(x), y).backward()
    at_init = weight_grad_norms(model)
    model.zero_grad(set_to_none=True)
    trace: list[list[float]] = []

    def record(step: int, m: tnn.Module) -> None:
        if step % 4 == 0:
            trace.append(weight_grad_norms(m))

    history = train_classifier(
        model, data, epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"], seed=config["seed"],
        device=config["device"], on_step=record,
    )  # fmt: skip
    during = [sum(layer) / len(trace) for layer in zip(*trace)] if trace else at_init
    result = history.to_dict()
    result.update(
        init_norms=at_init,
        train_norms=during,
        spread_init=abs(log_ratio(at_init)),
        spread_train=abs(log_ratio(during)),
        log_ratio_init=log_ratio(at_init),
        initial_loss=history.step_loss[0],
        final_loss=sum(history.step_loss[-10:]) / len(history.step_loss[-10:]),
    )
    return result


def rule(stats: dict) -> tuple[str, str]:
    """Each (architecture, norm) is a check: its gradient spread at init is below no-norm's with the CI above 0.
    All checks -> holds, some -> holds partly, none -> does not hold here."""
    checks = {f"{arch}: {norm} narrows the spread": low > 0 for (arch, norm), low in stats["spread_reduction_low"].items()}
    verdict = verdict_from_checks(checks)
    return verdict, "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items())


def analyze(runs: list[Run], profile: Profile, out_dir: Path) -> Finding:
    s = settings(profile)
    by = group(runs, "arch", "norm")
    effects, rows = {}, []
    for arch, norms in ARCHS.items():
        for n in norms:
            rs = by[(arch, n)]
            if n != "none":
                effects[(arch, n)] = paired_effect(
                    f"{arch}: spread(no norm) - spread({n})", values(by[(arch, "none")], "spread_init"), values(rs, "spread_init"), "decades"
                )
            rows.append([
                arch.upper(), norm_label(n), cell(values(rs, "log_ratio_init"), 2), cell(values(rs, "spread_train"), 2),
                f"{sum(r.result['diverged'] for r in rs)}/{len(rs)}", cell(values(rs, "final_loss"), 3),
                effects[(arch, n)].text() if n != "none" else "baseline",
            ])  # fmt: skip
    stats = {
        "spread_reduction": {f"{a}/{n}": e.estimate for (a, n), e in effects.items()},
        "spread_reduction_low": {(a, n): e.low for (a, n), e in effects.items()},
    }
    verdict, reason = rule(stats)
    stats["spread_reduction_low"] = {f"{a}/{n}": v for (a, n), v in stats["spread_reduction_low"].items()}

    fig, axes = plots.figure(2, 2, width=4.6, height=3.2)
    for col, (arch, norms) in enumerate(ARCHS.items()):
        for row, key in enumerate(("init_norms", "train_norms")):
            ax = axes[row * 2 + col]
            for n in norms:
                layers = list(zip(*[r.result[key] for r in by[(arch, n)]]))
                plots.line_ci(ax, list(range(1, len(layers) + 1)), layers, norm_label(n), n)
            ax.set(yscale="log", xlabel="layer (input -> output)", ylabel="weight-gradient norm",
                   title=f"{arch.upper()}, {'at init' if row == 0 else 'mean during training'}")  # fmt: skip
            ax.legend(fontsize=7)
    figures = [plots.save(fig, out_dir, f"{CLAIM.id}.png")]
    headline = effects[("mlp", "bn")]
    return Finding(
        verdict=verdict,
        reason=reason,
        effect=headline,
        setting=(
            f"MNIST-1D ({s['n_train']} signals); plain {s['depth']}-layer MLP (width {s['width']['mlp']}) and {s['depth']}-layer "
            f"1-D CNN (width {s['width']['cnn']}), PyTorch default init, SGD lr {s['lr']} momentum 0.9, batch {s['batch_size']}, "
            f"{s['epochs']} epoch(s). Spread = |log10(first-layer / last-layer weight-gradient norm)|."
        ),
        stats=stats,
        tables=[Table("Gradient flow per architecture and norm", ["arch", "norm", "log10(first/last) at init", "spread during training",
                      "diverged", "final train loss", "spread reduction vs none [95% CI]"], rows)],  # fmt: skip
        figures=figures,
    )
