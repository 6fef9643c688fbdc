"""Claim 4: batch norm regularizes through the noise of mini-batch statistics.

Protocol: an MLP trained long on a small MNIST-1D subset (so it can overfit), with no norm, BN at batch 64,
and ghost BN whose statistics come from chunks of 16 and 4 examples (more noise, same batch and LR).
Statistic: the train-minus-test accuracy gap. Also: the BN models evaluated with running statistics (eval
mode) versus with the statistics of each test batch.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import plots
from ..data import mnist1d
from ..models import MLP, norm_label
from ..stats import PERCENT, cell, paired_effect, verdict_from_checks
from ..study import Claim, Finding, Profile, Run, Table, accuracies, accuracy_curves, group, values
from ..training import seed_everything, train_classifier

CLAIM = Claim(
    id="batch_noise",
    number=4,
    title="Normalization regularizes through batch noise",
    source="作用 3 · BN 优点 3",
    zh="归一化可以起到正则化的效果,减少模型的过拟合。通过在训练过程中引入噪声,归一化可以增强模型的泛化能力。",
    en="Normalization has a regularizing effect and reduces overfitting: the noise it introduces during training "
    "improves generalization.",
)
VERSION = 2
NORMS = ("none", "bn", "ghost16", "ghost4")
CLASSES = 10  # MNIST-1D


def settings(profile: Profile) -> dict:
    return {
        "n_train": profile.pick(128, 1024, 1024),
        "epochs": profile.pick(2, 20, 60),
        "width": profile.pick(32, 128, 256),
        "lr": 0.05,
        "batch_size": 64,
    }


def jobs(profile: Profile) -> list[dict]:
    s = settings(profile)
    base = profile.base(CLAIM.id, VERSION)
    return [{**base, "norm": n, "seed": seed, **s} for n in NORMS for seed in profile.seeds]


@torch.no_grad()
def batch_stat_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Test accuracy when every norm uses the statistics of its test batch (train mode, on a copy)."""
    model = copy.deepcopy(model).train()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x) - batch + 1, batch))
    return correct / (len(x) // batch * batch)


def run(config: dict) -> dict:
    seed_everything(config["seed"])
    data = mnist1d().subset(config["n_train"])
    model = MLP(40, config["width"], 2, 10, config["norm"], config["backend"])
    history = train_classifier(
        model, data, epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"], seed=config["seed"],
        device=config["device"],
    )  # fmt: skip
    result = history.to_dict()
    result["gap"] = result["final_train_acc"] - result["final_test_acc"]
    x, y = data.x_test.to(config["device"]), data.y_test.to(config["device"])
    result["test_acc_batch_stats"] = batch_stat_accuracy(model, x, y, config["batch_size"]) if config["norm"] != "none" else None
    return result


def rule(stats: dict) -> tuple[str, str]:
    """Needed: BN's train/test gap is below no-norm's (CI of the difference > 0) and BN's test accuracy is
    not below no-norm's (CI upper end >= 0): a narrower gap from underfitting alone does not count as
    regularization. Extra: more batch noise (ghost batches of 16) raises test accuracy over BN at 64 (CI > 0)."""
    checks = {
        "BN narrows the generalization gap": stats["gap_reduction_low"] > 0,
        "more batch noise (ghost 16) raises test accuracy": stats["ghost_test_gain_low"] > 0,
        "BN does not cost test accuracy": stats["test_acc_diff_high"] >= 0,
    }
    needed = ["BN narrows the generalization gap", "BN does not cost test accuracy"]
    verdict = verdict_from_checks(checks, needed=needed)
    return verdict, "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items())


def gaps_of(runs: list[Run]) -> list[float]:
    """Train-minus-test gap of each run, in seed order; 0 for a run that diverged (both accuracies at
    chance), so that it counts rather than dropping out of the paired statistics as NaN."""
    return [0.0 if r.result.get("diverged") else float(r.result["gap"]) for r in sorted(runs, key=lambda r: r.config["seed"])]


def analyze(runs: list[Run], profile: Profile, out_dir: Path) -> Finding:
    s = settings(profile)
    by = group(runs, "norm")
    gaps = {n: gaps_of(by[(n,)]) for n in NORMS}
    gap_effect = paired_effect("train/test gap: no norm - BN", gaps["none"], gaps["bn"], "acc")
    ghost_effect = paired_effect("train/test gap: BN(64) - ghost BN(4)", gaps["bn"], gaps["ghost4"], "acc")
    acc_effect = paired_effect("test accuracy: BN - no norm", accuracies(by[("bn",)], CLASSES), accuracies(by[("none",)], CLASSES), "acc")
    ghost_gain = paired_effect("test accuracy: ghost BN(16) - BN(64)", accuracies(by[("ghost16",)], CLASSES), accuracies(by[("bn",)], CLASSES), "acc")
    stats = {
        "gap_reduction": gap_effect.estimate,
        "gap_reduction_low": gap_effect.low,
        "ghost_reduction": ghost_effect.estimate,
        "ghost_test_gain": ghost_gain.estimate,
        "ghost_test_gain_low": ghost_gain.low,
        "test_acc_diff": acc_effect.estimate,
        "test_acc_diff_high": acc_effect.high,
    }
    verdict, reason = rule(stats)
    rows = [
        [norm_label(n), cell(values(by[(n,)], "final_train_acc"), 1, 100, PERCENT), cell(accuracies(by[(n,)], CLASSES), 1, 100, PERCENT),
         cell(gaps[n], 1, 100), cell(values(by[(n,)], "test_acc_batch_stats"), 1, 100, PERCENT) if n != "none" else "-"]
        for n in NORMS
    ]  # fmt: skip

    fig, (ax_gap, ax_curve) = plots.figure(2)
    plots.bars_ci(ax_gap, [norm_label(n) for n in NORMS], [gaps[n] for n in NORMS], ["none", "bn", "gn", "in"], scale=100)
    ax_gap.set(ylabel="train - test accuracy (points)", title="Generalization gap")
    for n, kind in zip(NORMS, ["none", "bn", "gn", "in"]):
        curves = accuracy_curves(by[(n,)], CLASSES)
        plots.line_ci(ax_curve, list(range(1, len(curves[0]) + 1)), list(zip(*curves)), norm_label(n), kind, 100, PERCENT)
    ax_curve.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy during training")
    ax_curve.legend(fontsize=7)
    figures = [plots.save(fig, out_dir, f"{CLAIM.id}.png")]
    eval_vs_batch = paired_effect(
        "BN test accuracy: running stats - batch stats", accuracies(by[("bn",)], CLASSES), values(by[("bn",)], "test_acc_batch_stats"), "acc"
    )
    return Finding(
        verdict=verdict,
        reason=reason,
        effect=gap_effect,
        setting=(
            f"MNIST-1D, {s['n_train']} training signals (small, to overfit); MLP 2x{s['width']}, batch {s['batch_size']}, "
            f"{s['epochs']} epochs, SGD lr {s['lr']} momentum 0.9. Ghost BN k = statistics over chunks of k examples of the same batch."
        ),
        stats=stats,
        tables=[Table("Accuracy % [95% CI]", ["model", "train acc", "test acc", "gap (points)", "test acc, batch statistics"], rows)],
        figures=figures,
        notes=[
            f"Test accuracy with BN: running statistics (eval mode) minus per-batch statistics: {eval_vs_batch.text(3)}.",
            f"Test accuracy BN minus no norm: {acc_effect.text(3)}; ghost BN(4) gap reduction over BN(64): {ghost_effect.text(3)}; "
            f"ghost BN(16) test accuracy over BN(64): {ghost_gain.text(3)}.",
        ],
    )
