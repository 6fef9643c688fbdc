"""Claim 1: normalization speeds up training.

Protocol: a small CNN (2-D on digits in quick mode, 1-D on MNIST-1D in full mode) with no norm, BN, LN, IN or GN, each trained over a grid of learning rates
(SGD, momentum 0.9). Each norm is compared at its own tuned learning rate (best mean final test accuracy):
steps until the smoothed training loss reaches the loss the un-normalized net ends at, and the largest
learning rate in the grid at which no seed diverges.
"""

from __future__ import annotations

import math
from pathlib import Path

from .. import plots
from ..data import DATA_LABELS, classification
from ..models import ConvNet, norm_label
from ..stats import PERCENT, Effect, ratio_effect, verdict_from_checks
from ..study import Claim, Finding, Profile, Run, Table, accuracies, group, mean_metric
from ..training import seed_everything, train_classifier

CLAIM = Claim(
    id="faster_training",
    number=1,
    title="Normalization speeds up training",
    source="作用 1 · BN 优点 1",
    zh="归一化有助于加速神经网络的训练过程。通过规范化输入数据或特征图的分布,梯度下降算法可以更快地收敛。",
    en="Normalization speeds up training: with the distribution of inputs and feature maps normalized, "
    "gradient descent converges faster.",
)
VERSION = 1
NORMS = ("none", "bn", "ln", "in", "gn")
SMOOTH = 10


def settings(profile: Profile) -> dict:
    return {
        "data": profile.pick("digits", "digits", "mnist1d"),
        "lrs": profile.pick([0.05, 0.5], [0.01, 0.04, 0.16, 0.64], [0.01, 0.03, 0.1, 0.3, 1.0]),
        "epochs": profile.pick(1, 4, 8),
        "n_train": profile.pick(128, None, 4000),
        "widths": profile.pick([8, 8], [8, 16], [16, 32]),
        "batch_size": 64,
    }


def jobs(profile: Profile) -> list[dict]:
    s = settings(profile)
    base = profile.base(CLAIM.id, VERSION)
    return [
        {**base, "norm": n, "lr": lr, "seed": seed, "data": s["data"], "epochs": s["epochs"], "n_train": s["n_train"],
         "widths": s["widths"], "batch_size": s["batch_size"]}
        for n in NORMS for lr in s["lrs"] for seed in profile.seeds
    ]  # fmt: skip


def run(config: dict) -> dict:
    seed_everything(config["seed"])
    data = classification(config["data"]).subset(config["n_train"])
    channels, *size = data.x_train.shape[1:]
    strides = [1] + [2] * (len(config["widths"]) - 1)
    model = ConvNet(channels, tuple(size), config["widths"], 10, config["norm"], config["backend"], strides)
    history = train_classifier(
        model, data, epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"], seed=config["seed"],
        device=config["device"],
    )  # fmt: skip
    return history.to_dict()


def smoothed(losses: list[float]) -> list[float]:
    """Running mean over the last ``SMOOTH`` steps."""
    return [sum(losses[max(0, i - SMOOTH + 1) : i + 1]) / (i + 1 - max(0, i - SMOOTH + 1)) for i in range(len(losses))]


def steps_to(losses: list[float], target: float, budget: int) -> int:
    """First step whose smoothed loss is at or below ``target``; ``budget`` when never (censored, conservative)."""
    for i, value in enumerate(smoothed(losses)):
        if value <= target:
            return i + 1
    return budget


def rule(stats: dict) -> tuple[str, str]:
    """Holds when BN's speed-up interval lies above 1x and so do at least half of the other norms' intervals."""
    lows = stats["speedup_low"]
    others = [n for n in lows if n != "bn"]
    checks = {
        "BN reaches the target faster (speed-up CI > 1x)": lows["bn"] > 1,
        "most other norms do too": sum(lows[n] > 1 for n in others) * 2 >= len(others),
    }
    verdict = verdict_from_checks(checks)
    return verdict, "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items())


def analyze(runs: list[Run], profile: Profile, out_dir: Path) -> Finding:
    s = settings(profile)
    by = group(runs, "norm", "lr")
    mean_acc = {k: mean_metric(v, "final_test_acc") for k, v in by.items()}
    tuned = {n: max(s["lrs"], key=lambda lr: mean_acc[(n, lr)]) for n in NORMS}
    stable = {n: max([lr for lr in s["lrs"] if not any(r.result["diverged"] for r in by[(n, lr)])], default=math.nan) for n in NORMS}
    budget = max(len(r.result["step_loss"]) for r in runs)
    base_runs = by[("none", tuned["none"])]
    target = sum(smoothed(r.result["step_loss"])[-1] for r in base_runs) / len(base_runs)
    steps = {n: [steps_to(r.result["step_loss"], target, budget) for r in by[(n, tuned[n])]] for n in NORMS}
    effects = {n: ratio_effect(f"speed-up of {norm_label(n)}", steps["none"], steps[n]) for n in NORMS if n != "none"}
    stats = {
        "target_loss": target,
        "tuned_lr": tuned,
        "max_stable_lr": stable,
        "steps_to_target": steps,
        "speedup": {n: e.estimate for n, e in effects.items()},
        "speedup_low": {n: e.low for n, e in effects.items()},
    }
    verdict, reason = rule(stats)

    fig, (ax_loss, ax_acc) = plots.figure(2)
    for n in NORMS:
        rs = by[(n, tuned[n])]
        length = min(len(r.result["step_loss"]) for r in rs)
        curves = [smoothed(r.result["step_loss"])[:length] for r in rs]
        plots.line_ci(ax_loss, list(range(1, length + 1)), list(zip(*curves)), f"{norm_label(n)} (lr {tuned[n]})", n)
        accs = [r.result["test_acc"] for r in rs if not r.result["diverged"]]
        if accs:
            plots.line_ci(ax_acc, list(range(1, len(accs[0]) + 1)), list(zip(*accs)), norm_label(n), n, 100, PERCENT)
    ax_loss.axhline(target, ls="--", color="k", lw=0.8, label="target")
    ax_loss.set(xlabel="step", ylabel="training loss (smoothed)", yscale="log", title="At each norm's tuned LR")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    ax_loss.legend(fontsize=7)
    ax_acc.legend(fontsize=7)
    figures = [plots.save(fig, out_dir, f"{CLAIM.id}.png")]

    rows = [
        [norm_label(n), str(tuned[n]), f"{sum(steps[n]) / len(steps[n]):.0f}", effects[n].text() if n in effects else "1 (baseline)",
         str(stable[n]), f"{100 * mean_acc[(n, tuned[n])]:.1f}"]
        for n in NORMS
    ]  # fmt: skip
    headline = effects["bn"]
    return Finding(
        verdict=verdict,
        reason=reason,
        effect=Effect("BN speed-up in steps to target loss (no norm / BN)", headline.estimate, headline.low, headline.high, "x", headline.g),
        setting=(
            f"{DATA_LABELS[s['data']]}, {s['n_train'] or 'all'} training examples; CNN widths {s['widths']}, batch {s['batch_size']}, "
            f"{s['epochs']} epochs, SGD momentum 0.9, LR grid {s['lrs']}; target loss {target:.3f} = the final smoothed loss "
            f"of the un-normalized net at its tuned LR; runs that never reach it count as the full budget ({budget} steps)."
        ),
        stats=stats,
        tables=[Table("Per norm at its tuned learning rate", ["norm", "tuned LR", "steps to target", "speed-up vs none [95% CI]",
                      "largest stable LR", "test acc %"], rows)],  # fmt: skip
        figures=figures,
    )


def decision_rows(runs: list[Run], profile: Profile) -> list[dict]:
    """Classification of MNIST-1D signals with a CNN at batch 64: test accuracy per norm at its tuned LR."""
    s = settings(profile)
    by = group(runs, "norm", "lr")
    scores = {}
    for n in NORMS:
        best = max(s["lrs"], key=lambda lr: mean_metric(by[(n, lr)], "final_test_acc"))
        scores[n] = accuracies(by[(n, best)], 10)
    return [{"task": f"{s['data']}, CNN", "batch": s["batch_size"], "metric": "test accuracy", "scores": scores}]
