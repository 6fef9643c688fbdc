"""One seed gives no interval: its bounds are undefined and the report reads them as n/a (no rule passes on
them: ``test_rules``)."""

from __future__ import annotations

import argparse
import math

import pytest

from normkit.lab import cli as lab_cli
from normkit.lab.report import effect_text
from normkit.lab.stats import NOT, bootstrap_effect, cell, mean_ci, paired_effect, ratio_effect
from normkit.lab.studies import group_count
from normkit.lab.study import Profile, Run

def test_one_value_has_no_interval():
    m, low, high = mean_ci([0.7])
    assert m == 0.7 and math.isnan(low) and math.isnan(high)
    assert mean_ci([0.7, 0.7]) == (0.7, 0.7, 0.7)  # two agreeing seeds: a zero-width interval is an answer
    for e in (paired_effect("d", [0.9], [0.1], "acc"), ratio_effect("r", [2.0], [1.0]),
              bootstrap_effect("b", [[0.9], [0.1]], lambda g: g[0].mean() - g[1].mean(), "acc")):  # fmt: skip
        assert math.isfinite(e.estimate) and math.isnan(e.low) and math.isnan(e.high) and not e.excludes_zero


def test_undefined_bounds_read_n_a():
    e = paired_effect("d", [0.9], [0.1], "acc")
    assert e.text() == "0.80 acc [n/a, n/a]"
    assert cell([0.5], 1, 100) == "50.0 [n/a, n/a]"
    assert effect_text(e.to_dict()) == "0.8 acc [95% CI n/a, n/a]"
    verdict, reason = group_count.rule({"effect": e, "best": 2, "worst": 8})
    assert verdict == NOT and reason.endswith("by 80.0 points [n/a, n/a]")


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


def test_accuracy_intervals_stay_within_0_and_100_percent():
    """A t-interval over a few seeds near 100% reaches past it; accuracy cells cut it to the range (NaN bounds of
    one seed stay n/a)."""
    from normkit.lab.stats import PERCENT

    assert cell([0.99, 1.0, 1.0], 1, 100) == "99.7 [98.2, 101.1]"
    assert cell([0.99, 1.0, 1.0], 1, 100, PERCENT) == "99.7 [98.2, 100.0]"
    assert cell([0.01, 0.0, 0.0], 1, 100, PERCENT) == "0.3 [0.0, 1.8]"
    assert cell([1.0], 1, 100, PERCENT) == "100.0 [n/a, n/a]"
