"""Claim 12: the choice of normalization matters -- a decision table from the other studies' runs.

Each study that trains classifiers contributes rows (task x batch size) with per-norm accuracies over seeds;
this study ranks the norms in every row. It reuses those runs (same configs, same cache entries) and trains
nothing of its own.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import plots
from ..models import norm_label
from ..stats import Effect, bounds, held_out, mean_ci, paired_effect, verdict_from_checks
from ..study import Claim, Finding, Profile, Run, Table
from . import faster_training, instance_relations, sequences, small_batch

CLAIM = Claim(
    id="summary",
    number=12,
    title="Choosing the right normalization matters",
    source="总结",
    zh="不同的归一化方法有各自的适用场景和优劣,选择合适的归一化方法对模型性能的提升至关重要。",
    en="Each normalization method has its own use cases, strengths and weaknesses; choosing the right one is crucial "
    "for model performance.",
)
SOURCES = (faster_training, small_batch, instance_relations, sequences)
PRACTICAL = 0.02


def jobs(profile: Profile) -> list[dict]:
    return [config for study in SOURCES for config in study.jobs(profile)]


def rank(row: dict) -> dict:
    """Best, runner-up and worst norm of one row (by mean over seeds) with paired margins; ``tied`` holds the norms
    whose gap to the best has a CI reaching 0 or no CI at all (with few seeds, several norms often tie). The margins
    compare, on each seed, the norms ranked on the other seeds (``stats.held_out``): ranked on the seeds they are
    compared on, norms that do not differ show margins."""
    scores = row["scores"]
    means = {n: float(np.mean(v)) for n, v in scores.items()}
    order = sorted(means, key=means.get, reverse=True)
    best, second, worst = order[0], order[1], order[-1]
    top = held_out(scores, 0)
    tied = [best] + [n for n in order[1:] if not paired_effect("", top, scores[n], "acc").low > 0]
    return {
        "task": row["task"],
        "batch": row["batch"],
        "best": best,
        "tied": tied,
        "second": second,
        "worst": worst,
        "means": means,
        "margin": paired_effect("best - runner-up", top, held_out(scores, 1), "acc"),
        "spread": paired_effect("best - worst", top, held_out(scores, -1), "acc"),
    }


def rule(stats: dict) -> tuple[str, str]:
    """Two checks: no single norm is among the best (tied within CI) in every setting, and in at least half of the
    settings the best norm beats the worst by more than 2 points (CI). Both -> holds, one -> holds partly."""
    always_best = set.intersection(*(set(t) for t in stats["tied_best"]))
    checks = {
        "no one norm is (tied) best everywhere": not always_best,
        "a wrong choice costs > 2 points in at least half the settings": stats["fraction_mattering"] >= 0.5,
    }
    verdict = verdict_from_checks(checks)
    return verdict, "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items())


def analyze(runs: list[Run], profile: Profile, out_dir: Path) -> Finding:
    rows = []
    for study in SOURCES:
        own = [r for r in runs if r.config["study"] == study.CLAIM.id]
        rows += [rank(row) for row in study.decision_rows(own, profile)]
    mattering = [r["spread"].low > PRACTICAL for r in rows]
    stats = {"tied_best": [r["tied"] for r in rows], "fraction_mattering": sum(mattering) / len(rows)}
    verdict, reason = rule(stats)
    gaps = [r["spread"].estimate for r in rows]
    m, lo, hi = mean_ci(gaps)
    effect = Effect("mean accuracy lost by the worst norm vs the best, over settings", m, lo, hi, "acc")
    table = [
        [r["task"], str(r["batch"]), " = ".join(norm_label(n) for n in r["tied"]), f"{100 * r['means'][r['best']]:.1f}", norm_label(r["second"]),
         f"{100 * r['margin'].estimate:.1f} {bounds(r['margin'].low, r['margin'].high, '.1f', 100)}", norm_label(r["worst"]),
         f"{100 * r['spread'].estimate:.1f}"]
        for r in rows
    ]  # fmt: skip

    norms = sorted({n for r in rows for n in r["means"]}, key=lambda n: ["none", "bn", "ln", "gn", "gn2", "in", "rms"].index(n))
    grid = np.array([[100 * r["means"].get(n, math.nan) for n in norms] for r in rows])
    fig, (ax,) = plots.figure(1, width=7, height=0.32 * len(rows) + 1.6)
    ax.imshow(grid - np.nanmax(grid, axis=1, keepdims=True), cmap="RdYlGn", vmin=-20, vmax=0, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(norms)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(norms)), [norm_label(n) for n in norms], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r['task']}, b={r['batch']}" for r in rows], fontsize=7)
    ax.set_title("Test accuracy % (colour: points behind the row's best)")
    figures = [plots.save(fig, out_dir, f"{CLAIM.id}.png")]
    stats["rows"] = [{"task": r["task"], "batch": r["batch"], "best": r["best"], "tied": r["tied"], "margin": r["margin"].to_dict(),
                      "worst": r["worst"], "spread": r["spread"].to_dict()} for r in rows]  # fmt: skip
    return Finding(
        verdict=verdict,
        reason=reason,
        effect=effect,
        setting="Built from the runs of studies 1, 6, 9 and 11 (same seeds); no extra training.",
        stats=stats,
        tables=[Table("Decision table: best norm per task and batch size (ties: within the 95% CI of the best)", ["task", "batch", "best", "acc %", "runner-up",
                      "margin over runner-up, pts [95% CI]", "worst", "best - worst, pts"], table)],  # fmt: skip
        figures=figures,
    )
