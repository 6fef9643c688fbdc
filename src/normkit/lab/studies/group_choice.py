"""Beyond the article: does SwitchableNorm or the auto-G rule remove GroupNorm's group-count choice (GN con)?

Protocol: the group-count study's CNN and runs (same configs, shared cache: every fixed G is trained once),
plus the same CNN with SwitchableNorm (1d or 2d as the data; Luo et al. 2019: a learned mix of IN/LN/BN statistics) after each
conv. auto-G is ``normkit.nn.variants.auto_groups(C)``, read off the fixed-G runs. Statistic: accuracy of
SwitchableNorm and of auto-G minus the best and the worst fixed G, paired by seed.
"""

from __future__ import annotations

from pathlib import Path

from ... import convert
from ...nn.variants import auto_groups
from .. import plots
from ..data import DATA_LABELS, classification
from ..models import ConvNet
from ..stats import HOLDS, NOT, PARTLY, PERCENT, cell, held_out, paired_effect
from ..study import Claim, Finding, Profile, Run, Table, accuracies, group
from ..training import seed_everything, train_classifier
from . import group_count

CLAIM = Claim(
    id="group_choice",
    number=14,
    title="SwitchableNorm and the auto-G rule remove the group-count choice",
    source="GN 缺点 · normkit.nn.variants",
    zh="需要选择合适的组数,可能需要一些超参数调优。",
    en="GN requires choosing a suitable number of groups, which may need some hyper-parameter tuning. Here: does a "
    "learned mix of statistics (SwitchableNorm) or a fixed rule (auto-G) match the best G without a sweep?",
)
VERSION = 1
PRACTICAL = 0.02


def jobs(profile: Profile) -> list[dict]:
    s = group_count.settings(profile)
    base = profile.base(CLAIM.id, VERSION)
    own = [
        {**base, "norm": "sn", "seed": seed, "data": s["data"], "channels": s["channels"], "layers": s["layers"], "n_train": s["n_train"],
         "epochs": s["epochs"], "lr": s["lr"], "batch_size": s["batch_size"]}
        for seed in profile.seeds
    ]  # fmt: skip
    return group_count.jobs(profile) + own


def run(config: dict) -> dict:
    seed_everything(config["seed"])
    data = classification(config["data"]).subset(config["n_train"])
    channels, *size = data.x_train.shape[1:]
    c, layers = config["channels"], config["layers"]
    model = ConvNet(channels, tuple(size), [c] * layers, 10, "bn", config["backend"], strides=[1] + [2] * (layers - 1))
    convert.replace_norm(model, f"sn{len(size)}d" if config["norm"] == "sn" else config["norm"])
    history = train_classifier(model, data, epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"], seed=config["seed"],
                               device=config["device"])  # fmt: skip
    result = history.to_dict()
    result["step_loss"] = result["step_loss"][-20:]
    return result


def rule(stats: dict) -> tuple[str, str]:
    """For SwitchableNorm and for auto-G, two checks: it beats the worst fixed G (CI of the paired difference above 0)
    and it is within 2 points of the best fixed G (CI lower bound of its difference above -2 points), the best and
    worst G of each seed picked on the other seeds (``stats.held_out``). Holds: one of
    them passes both; holds partly: some check passes; else does not hold here."""
    names = ("SwitchableNorm", "auto-G")
    checks = {n: (stats["vs_worst_low"][n] > 0, stats["vs_best_low"][n] > -PRACTICAL) for n in names}
    verdict = HOLDS if any(all(c) for c in checks.values()) else PARTLY if any(any(c) for c in checks.values()) else NOT
    return verdict, "; ".join(
        f"{n}: beats worst G={stats['worst']} {'yes' if c[0] else 'no'}, within 2 pts of best G={stats['best']} {'yes' if c[1] else 'no'}"
        for n, c in checks.items()
    )


def analyze(runs: list[Run], profile: Profile, out_dir: Path) -> Finding:
    s = group_count.settings(profile)
    fixed = group([r for r in runs if r.config["study"] == group_count.CLAIM.id], "groups")
    acc = {g: accuracies(fixed[(g,)], 10) for g in s["groups"]}
    sn = accuracies([r for r in runs if r.config["study"] == CLAIM.id], 10)
    auto = auto_groups(s["channels"])
    best = max(s["groups"], key=lambda g: sum(acc[g]))
    worst = min(s["groups"], key=lambda g: sum(acc[g]))
    contenders = {"SwitchableNorm": sn, "auto-G": acc[auto]}
    vs_best = {n: paired_effect(f"{n} - best G", v, held_out(acc, 0), "acc") for n, v in contenders.items()}
    vs_worst = {n: paired_effect(f"{n} - worst G", v, held_out(acc, -1), "acc") for n, v in contenders.items()}
    stats = {
        "best": best, "worst": worst, "auto": auto,
        "vs_best": {n: e.estimate for n, e in vs_best.items()}, "vs_best_low": {n: e.low for n, e in vs_best.items()},
        "vs_worst": {n: e.estimate for n, e in vs_worst.items()}, "vs_worst_low": {n: e.low for n, e in vs_worst.items()},
    }  # fmt: skip
    verdict, reason = rule(stats)

    fig, (ax,) = plots.figure(1, width=6)
    labels = [f"G={g}" for g in s["groups"]] + ["auto-G", "SwitchableNorm"]
    kinds = ["gn"] * len(s["groups"]) + ["gn", "sn"]
    plots.bars_ci(ax, labels, [acc[g] for g in s["groups"]] + [acc[auto], sn], kinds, 100, PERCENT)
    ax.set(ylabel="test accuracy (%)", title=f"C = {s['channels']} channels; auto-G = {auto}")
    ax.tick_params(axis="x", labelrotation=45)
    figures = [plots.save(fig, out_dir, f"{CLAIM.id}.png")]
    rows = [[f"GroupNorm G={g}" + (" (best)" if g == best else " (worst)" if g == worst else "") + (" = auto-G" if g == auto else ""),
             cell(acc[g], 1, 100, PERCENT)] for g in s["groups"]] + [["SwitchableNorm", cell(sn, 1, 100, PERCENT)]]  # fmt: skip
    return Finding(
        verdict=verdict,
        reason=reason,
        effect=vs_best["SwitchableNorm"],
        setting=(
            f"As the group-count study: {DATA_LABELS[s['data']]}, {s['n_train'] or 'all'} training examples, CNN with {s['layers']} conv "
            f"layers of C={s['channels']} channels, {s['epochs']} epochs, SGD lr {s['lr']} momentum 0.9, batch {s['batch_size']}; the fixed-G "
            f"runs are that study's. SwitchableNorm (1d or 2d as the data) replaces each GroupNorm; auto-G = auto_groups({s['channels']}) = {auto}. "
            "Each seed compares the contenders with the best and worst G picked on the other seeds (the G marked best and worst here: on all seeds)."
        ),
        stats=stats,
        tables=[Table("Test accuracy % [95% CI]", ["norm", "test accuracy"], rows)],
        figures=figures,
        notes=[f"{e.name}: {e.text(3)}" for e in (*vs_best.values(), *vs_worst.values())],
    )
