"""The variant studies: rules flip across their thresholds, runs are shared where configs agree, findings read right."""

from __future__ import annotations

from normkit.lab.stats import HOLDS, NOT, PARTLY
from normkit.lab.studies import ORDER, STUDIES, adain_style, group_choice, group_count, small_batch_fixes

VARIANT_STUDIES = (small_batch_fixes, group_choice, adain_style)


def small_batch_stats(gain_low: dict, shortfall: dict, bn_gap_low: float = 0.05) -> dict:
    return {"bn_gap_low": bn_gap_low, "gain_low": gain_low, "shortfall": shortfall}


def test_small_batch_fixes_rule():
    closes = small_batch_stats({"brn": {"2": 0.02, "4": 0.01}, "ln": {"2": -0.1, "4": -0.1}},
                               {"brn": {"2": 0.01, "4": 0.0}, "ln": {"2": 0.2, "4": 0.2}})  # fmt: skip
    assert small_batch_fixes.rule(closes)[0] == HOLDS
    far = small_batch_stats({"brn": {"2": 0.02, "4": 0.01}}, {"brn": {"2": 0.1, "4": 0.0}})
    assert small_batch_fixes.rule(far)[0] == PARTLY
    none = small_batch_stats({"brn": {"2": -0.02, "4": -0.01}}, {"brn": {"2": 0.0, "4": 0.0}})
    assert small_batch_fixes.rule(none)[0] == NOT
    no_gap = small_batch_stats(closes["gain_low"], closes["shortfall"], bn_gap_low=-0.01)
    verdict, reason = small_batch_fixes.rule(no_gap)
    assert verdict == NOT and "BN trails at batch 2: no" in reason


def test_group_choice_rule():
    def stats(worst_low: dict, best_low: dict) -> dict:
        return {"best": 4, "worst": 32, "vs_worst_low": worst_low, "vs_best_low": best_low}

    names = ("SwitchableNorm", "auto-G")
    assert group_choice.rule(stats(dict.fromkeys(names, 0.01), {"SwitchableNorm": 0.0, "auto-G": -0.1}))[0] == HOLDS
    assert group_choice.rule(stats(dict.fromkeys(names, -0.01), {"SwitchableNorm": -0.01, "auto-G": -0.1}))[0] == PARTLY
    assert group_choice.rule(stats(dict.fromkeys(names, -0.01), dict.fromkeys(names, -0.05)))[0] == NOT


def test_adain_style_rule():
    assert adain_style.rule({"style_gain_low": 0.1, "content_margin_low": 0.05})[0] == HOLDS
    assert adain_style.rule({"style_gain_low": 0.1, "content_margin_low": -0.01})[0] == PARTLY
    assert adain_style.rule({"style_gain_low": -0.1, "content_margin_low": -0.01})[0] == NOT


def test_variant_studies_are_registered():
    ids = [m.CLAIM.id for m in ORDER]
    for module in VARIANT_STUDIES:
        assert STUDIES[module.CLAIM.id] is module and module.CLAIM.id in ids


def test_group_choice_reuses_the_group_count_runs(tiny_profile):
    jobs = group_choice.jobs(tiny_profile)
    assert group_count.jobs(tiny_profile) == jobs[: len(group_count.jobs(tiny_profile))]
    own = [c for c in jobs if c["study"] == group_choice.CLAIM.id]
    assert len(own) == len(tiny_profile.seeds) and {c["norm"] for c in own} == {"sn"}


def test_small_batch_fixes_tiny_size(tiny_profile):
    s = small_batch_fixes.settings(tiny_profile)
    assert set(small_batch_fixes.SMALL) | {small_batch_fixes.REFERENCE} <= set(s["batches"]) and "bn" in s["norms"]
    quick = small_batch_fixes.settings(type(tiny_profile)(mode="quick"))
    assert len(small_batch_fixes.jobs(type(tiny_profile)(mode="quick"))) == len(quick["norms"]) * len(quick["batches"]) * 3


def test_variant_findings(tiny_lab, tiny_profile):
    results, out = tiny_lab
    found = {s["id"]: s for s in results["studies"]}
    sb = found[small_batch_fixes.CLAIM.id]
    assert set(sb["stats"]["gain"]) == {"brn", "gnws"} and set(sb["stats"]["gain"]["brn"]) == {"2", "4"}
    gc = found[group_choice.CLAIM.id]
    assert gc["stats"]["auto"] in group_count.settings(tiny_profile).get("groups")
    ad = found[adain_style.CLAIM.id]
    assert (out / ad["figures"][0]).exists() and 0.0 <= ad["stats"]["content"] <= 1.0
