"""A diverged run scores chance accuracy in every study, so a NaN never makes one group both the best and the worst."""

from __future__ import annotations

import math

import pytest

from normkit.lab.studies import group_count
from normkit.lab.study import Profile, Run, accuracies

PROFILE = Profile(mode="tiny", seeds=(0, 1))


def run(seed: int, acc: float, diverged: bool = False) -> Run:
    return Run({"seed": seed}, {"final_test_acc": acc, "diverged": diverged})


def test_diverged_or_missing_accuracy_scores_chance():
    runs = [run(2, math.nan, True), run(0, 0.8), run(1, 0.7, True), run(3, math.nan)]
    assert accuracies(runs, 10) == [0.8, 0.1, 0.1, 0.1]
    assert accuracies(runs, 2) == [0.8, 0.5, 0.5, 0.5]


def test_group_count_ranks_a_diverged_group_worst(tmp_path):
    accuracy = {1: math.nan, 2: 0.9, 4: 0.8, 8: 0.5}
    runs = [Run(c, {"final_test_acc": accuracy[c["groups"]] + 0.01 * c["seed"], "diverged": math.isnan(accuracy[c["groups"]])})
            for c in group_count.jobs(PROFILE)]  # fmt: skip
    finding = group_count.analyze(runs, PROFILE, tmp_path)
    assert (finding.stats["best"], finding.stats["worst"]) == (2, 1)
    assert finding.effect.estimate == pytest.approx(0.905 - 0.1)
    assert finding.stats["mean_acc"]["1"] == pytest.approx(0.1)


def test_a_diverged_style_classifier_scores_chance():
    """A classifier that diverges in its first steps has no test accuracy to report: both accuracies
    are chance, not an error from an empty history."""
    from normkit.lab.studies import instance_style

    config = next(c for c in instance_style.jobs(PROFILE) if c["part"] == "classify")
    result = instance_style.run({**config, "lr": 1e12})
    assert result["diverged"] and result["clean_acc"] == result["shifted_acc"] == pytest.approx(0.1)


@pytest.mark.parametrize("epochs_before", [0, 1])
def test_batch_noise_counts_a_diverged_run(tmp_path, epochs_before):
    """A run that diverged (in its first epoch, or later) has a short test-accuracy curve and no finite
    gap: the study plots it at chance from then on and counts its gap as 0 (both accuracies at chance)
    rather than failing on the curve or dropping the seed from the paired statistics."""
    from normkit.lab.studies import batch_noise

    def result(config: dict) -> dict:
        diverged = config["norm"] == "none" and config["seed"] == 1
        acc = 0.5 + 0.1 * (config["norm"] != "none") + 0.01 * config["seed"]
        return {
            "final_train_acc": math.nan if diverged else acc + 0.2, "final_test_acc": math.nan if diverged else acc,
            "gap": math.nan if diverged else 0.2 - 0.1 * (config["norm"] != "none") - 0.01 * config["seed"],
            "test_acc": [0.4] * epochs_before if diverged else [0.4, acc], "test_acc_batch_stats": acc,
            "diverged": diverged,
        }

    runs = [Run(c, result(c)) for c in batch_noise.jobs(PROFILE)]
    finding = batch_noise.analyze(runs, PROFILE, tmp_path)
    gaps = batch_noise.gaps_of([r for r in runs if r.config["norm"] == "none"])
    assert gaps == [0.2, 0.0]
    assert finding.effect.estimate == pytest.approx((0.2 - 0.1 + 0.0 - 0.09) / 2)


def test_a_diverged_sequence_model_scores_four_class_chance():
    """The sequence task has 4 classes (which of tokens 1..4 occurs most): a model that diverges is
    recorded as such and scores 0.25, not the 0.5 of a 2-class task."""
    from normkit.lab.data import token_sequences
    from normkit.lab.studies import sequences

    assert sorted(set(token_sequences(500, seed=0)[2].tolist())) == list(range(sequences.CLASSES))
    config = next(c for c in sequences.jobs(PROFILE) if c["norm"] == "ln")
    result = sequences.run({**config, "lr": 1e12})
    assert result["diverged"]
    assert accuracies([Run(config, result)], sequences.CLASSES) == [0.25]
