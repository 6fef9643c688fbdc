"""One seed gives no interval: its bounds are undefined, no rule passes on them, and the report reads them as n/a."""

from __future__ import annotations

import argparse
import math

import pytest

from normkit.lab import cli as lab_cli
from normkit.lab.report import effect_text
from normkit.lab.stats import HOLDS, NOT, Effect, bootstrap_effect, cell, mean_ci, paired_effect, ratio_effect
from normkit.lab.studies import (
    adain_style,
    batch_noise,
    compute_overhead,
    faster_training,
    gradient_stability,
    group_choice,
    group_count,
    init_dependence,
    instance_relations,
    instance_style,
    loss_surface,
    sequences,
    small_batch,
    small_batch_fixes,
    summary,
)
from normkit.lab.study import Profile, Run


def effect(low: float) -> Effect:
    return Effect("synthetic", low + 0.01, low, low + 0.02, "acc")


def test_one_value_has_no_interval():
    m, low, high = mean_ci([0.7])
    assert m == 0.7 and math.isnan(low) and math.isnan(high)
    assert mean_ci([0.7, 0.7]) == (0.7, 0.7, 0.7)  # two agreeing seeds: a zero-width interval is an answer
    for e in (paired_effect("d", [0.9], [0.1], "acc"), ratio_effect("r", [2.0], [1.0]),
              bootstrap_effect("b", [[0.9], [0.1, 0.2]], lambda g: g[0].mean() - g[1].mean(), "acc")):  # fmt: skip
        assert math.isfinite(e.estimate) and math.isnan(e.low) and math.isnan(e.high) and not e.excludes_zero


def test_undefined_bounds_read_n_a():
    e = paired_effect("d", [0.9], [0.1], "acc")
    assert e.text() == "0.80 acc [n/a, n/a]"
    assert cell([0.5], 1, 100) == "50.0 [n/a, n/a]"
    assert effect_text(e.to_dict()) == "0.8 acc [95% CI n/a, n/a]"
    verdict, reason = group_count.rule({"effect": e, "best": 2, "worst": 8})
    assert verdict == NOT and reason.endswith("by 80.0 points [n/a, n/a]")


def undefined(stats):
    """The same stats with every interval bound (``*_low``/``*_high`` entries, Effects' bounds) NaN, as one seed gives."""
    if isinstance(stats, Effect):
        return Effect(stats.name, stats.estimate, math.nan, math.nan, stats.unit)
    if isinstance(stats, dict):
        return {k: nan_all(v) if k.endswith(("_low", "_high")) else undefined(v) for k, v in stats.items()}
    return stats


def nan_all(value):
    return {k: nan_all(v) for k, v in value.items()} if isinstance(value, dict) else math.nan


PASSING = [
    (faster_training, {"speedup_low": {"bn": 1.5, "ln": 1.2, "in": 1.1, "gn": 0.9}}),
    (gradient_stability, {"spread_reduction_low": {("mlp", "bn"): 0.5, ("cnn", "bn"): 0.5}}),
    (init_dependence, {"effect": effect(0.2)}),
    (batch_noise, {"gap_reduction_low": 0.02, "ghost_test_gain_low": 0.01, "test_acc_diff_high": 0.03}),
    (loss_surface, {"ratio_low": dict.fromkeys(loss_surface.MEASURES, 1.5)}),
    (small_batch, {"bn_degradation_low": 0.2, "excess_low": {"mlp/ln": 0.1, "cnn/in": 0.05}}),
    (compute_overhead, {"bn_over_none_low": 1.2, "ln_over_bn_low": 1.2, "gn_over_ln_high": 0.9}),
    (instance_style, {"shift_gain_low": 0.1, "psnr_gain_low": 0.5}),
    (instance_relations, {"in_deficit_low": {"brightness": 0.2, "amplitude": 0.2, "shape": 0.0},
                          "in_deficit": {"brightness": 0.3, "amplitude": 0.3, "shape": 0.0}}),  # fmt: skip
    (group_count, {"effect": effect(0.05), "best": 4, "worst": 32}),
    (sequences, {"effect": effect(0.05)}),
    (small_batch_fixes, {"bn_gap_low": 0.05, "gain_low": {"brn": {"2": 0.02, "4": 0.01}}, "shortfall": {"brn": {"2": 0.01, "4": 0.0}}}),
    (group_choice, {"best": 4, "worst": 32, "vs_worst_low": dict.fromkeys(("SwitchableNorm", "auto-G"), 0.01),
                    "vs_best_low": dict.fromkeys(("SwitchableNorm", "auto-G"), 0.0)}),  # fmt: skip
    (adain_style, {"style_gain_low": 0.1, "content_margin_low": 0.05}),
]


@pytest.mark.parametrize("module,stats", PASSING, ids=[m.CLAIM.id for m, _ in PASSING])
def test_no_rule_holds_without_intervals(module, stats):
    assert module.rule(stats)[0] == HOLDS
    assert module.rule(undefined(stats))[0] == NOT


def test_summary_counts_norms_without_an_interval_as_tied():
    ranked = summary.rank({"task": "t", "batch": 2, "scores": {"bn": [0.9], "ln": [0.5], "none": [0.1]}})
    assert ranked["best"] == "bn" and ranked["tied"] == ["bn", "ln", "none"]
    assert summary.rule({"tied_best": [ranked["tied"]], "fraction_mattering": 0.0})[0] == NOT


def test_group_count_on_one_seed_does_not_hold(tmp_path):
    profile = Profile(mode="tiny", seeds=(0,))
    accuracy = {1: 0.2, 2: 0.9, 4: 0.6, 8: 0.5}
    runs = [Run(c, {"final_test_acc": accuracy[c["groups"]], "diverged": False}) for c in group_count.jobs(profile)]
    finding = group_count.analyze(runs, profile, tmp_path)
    assert finding.effect.estimate == pytest.approx(0.7) and math.isnan(finding.effect.low)
    assert finding.verdict == NOT


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="normkit lab")
    lab_cli.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("value", ["1", "0", "-2", "x"])
def test_seeds_below_two_are_usage_errors(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse("--seeds", value)
    assert exit_.value.code == 2
    assert f"argument --seeds: expected at least 2 seeds, got '{value}': a confidence interval needs two runs" in capsys.readouterr().err


def test_two_seeds_are_enough():
    assert _parse("--seeds", "2").seeds == 2
