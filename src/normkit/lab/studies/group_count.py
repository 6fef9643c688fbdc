"""Claim 10: group norm needs its number of groups chosen.

Protocol: the same CNN (2-D on digits in quick mode, 1-D on MNIST-1D in full mode) with GroupNorm for every G dividing the channel count, from G=1
(LayerNorm-like: one group over all channels) to G=C (InstanceNorm-like). Statistic: accuracy of the best G
minus the worst G, both picked on the other seeds and compared on each held-out seed (``stats.held_out``); how
much a poor choice of G costs.
"""

from __future__ import annotations

from pathlib import Path

from .. import plots
from ..data import DATA_LABELS, classification
from ..models import ConvNet
from ..stats import PERCENT, bounds, cell, graded, held_out, paired_effect
from ..study import Claim, Finding, Profile, Run, Table, accuracies, group
from ..training import seed_everything, train_classifier

CLAIM = Claim(
    id="group_count",
    number=10,
    title="Group norm needs its group count chosen",
    source="GN 缺点",
    zh="需要选择合适的组数,可能需要一些超参数调优。",
    en="GN requires choosing a suitable number of groups, which may need some hyper-parameter tuning.",
)
VERSION = 1
PRACTICAL = 0.02


def settings(profile: Profile) -> dict:
    channels = profile.pick(8, 32, 64)
    return {
        "channels": channels,
        "groups": [g for g in (1, 2, 4, 8, 16, 32, 64) if g <= channels],
        "data": profile.pick("digits", "digits", "mnist1d"),
        "n_train": profile.pick(256, None, 4000),
        "epochs": profile.pick(1, 5, 8),
        "layers": 2,
        "lr": 0.1,
        "batch_size": 64,
    }


def jobs(profile: Profile) -> list[dict]:
    s = settings(profile)
    base = profile.base(CLAIM.id, VERSION)
    return [
        {**base, "groups": g, "seed": seed, "data": s["data"], "channels": s["channels"], "layers": s["layers"], "n_train": s["n_train"], "epochs": s["epochs"], "lr": s["lr"],
         "batch_size": s["batch_size"]}
        for g in s["groups"] for seed in profile.seeds
    ]  # fmt: skip


def run(config: dict) -> dict:
    seed_everything(config["seed"])
    data = classification(config["data"]).subset(config["n_train"])
    channels, *size = data.x_train.shape[1:]
    c = config["channels"]
    layers = config["layers"]
    model = ConvNet(channels, tuple(size), [c] * layers, 10, f"gn{config['groups']}", config["backend"], strides=[1] + [2] * (layers - 1))
    history = train_classifier(model, data, epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"], seed=config["seed"],
                               device=config["device"])  # fmt: skip
    result = history.to_dict()
    result["step_loss"] = result["step_loss"][-20:]
    return result


def rule(stats: dict) -> tuple[str, str]:
    """Best-minus-worst G accuracy, each seed's pair picked on the other seeds (paired t CI): above 2 points ->
    holds, above 0 -> holds partly, else does not hold here."""
    verdict = graded(stats["effect"], PRACTICAL)
    e = stats["effect"]
    return verdict, f"best G={stats['best']} beats worst G={stats['worst']} by {100 * e.estimate:.1f} points {bounds(e.low, e.high, '.1f', 100)}"


def analyze(runs: list[Run], profile: Profile, out_dir: Path) -> Finding:
    s = settings(profile)
    by = group(runs, "groups")
    acc = {g: accuracies(by[(g,)], 10) for g in s["groups"]}
    best = max(s["groups"], key=lambda g: sum(acc[g]))
    worst = min(s["groups"], key=lambda g: sum(acc[g]))
    effect = paired_effect("accuracy: best G - worst G, picked on the other seeds", held_out(acc, 0), held_out(acc, -1), "acc")
    stats = {"effect": effect, "best": best, "worst": worst}
    verdict, reason = rule(stats)
    stats["effect"] = effect.to_dict()
    stats["mean_acc"] = {str(g): sum(v) / len(v) for g, v in acc.items()}

    fig, (ax,) = plots.figure(1, width=6)
    plots.line_ci(ax, s["groups"], [acc[g] for g in s["groups"]], "GroupNorm", "gn", 100, PERCENT)
    ax.set(xscale="log", xlabel="number of groups G (1 = LN-like, C = IN-like)", ylabel="test accuracy (%)", title=f"C = {s['channels']} channels")
    ax.set_xticks(s["groups"], [str(g) for g in s["groups"]])
    figures = [plots.save(fig, out_dir, f"{CLAIM.id}.png")]
    rows = [[str(g) + (" (LN-like)" if g == 1 else " (IN-like)" if g == s["channels"] else ""), cell(acc[g], 1, 100, PERCENT)] for g in s["groups"]]
    return Finding(
        verdict=verdict,
        reason=reason,
        effect=effect,
        setting=(
            f"{DATA_LABELS[s['data']]}, {s['n_train'] or 'all'} training examples; CNN with {s['layers']} conv layers of C={s['channels']} channels, GroupNorm(G) after each, "
            f"G in {s['groups']}, {s['epochs']} epochs, SGD lr {s['lr']} momentum 0.9, batch {s['batch_size']}."
        ),
        stats=stats,
        tables=[Table("Test accuracy % per group count [95% CI]", ["G", "test accuracy"], rows)],
        figures=figures,
    )
