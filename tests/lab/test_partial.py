"""``--only`` reruns some studies and keeps the others' verdicts: the report covers every study whose runs are cached."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from normkit.lab import pipeline, plots, studies
from normkit.lab.runner import Cache
from normkit.lab.stats import HOLDS, Effect
from normkit.lab.study import Claim, Finding, Profile, Run, Table

PROFILE = Profile(mode="tiny", seeds=(0, 1))
TRAINED: list[dict] = []


def fake_study(sid: str, number: int) -> SimpleNamespace:
    """A study that trains nothing: its runs return their seed, so the test sees which runs were done again."""

    def jobs(profile: Profile) -> list[dict]:
        return [{"study": sid, "seed": s, "backend": "torch"} for s in profile.seeds]

    def run(config: dict) -> dict:
        TRAINED.append(config)
        return {"seed": config["seed"]}

    def rule(stats: dict) -> tuple[str, str]:
        """Always holds."""
        return HOLDS, "synthetic"

    def analyze(runs: list[Run], profile: Profile, out_dir: Path) -> Finding:
        fig, _ = plots.figure(1, width=1, height=1)
        return Finding(HOLDS, "synthetic", Effect("e", 1.0, 0.5, 1.5, "x"), "synthetic", {"seeds": [r.result["seed"] for r in runs]},
                       [Table("t", ["a"], [["1"]])], [plots.save(fig, out_dir, f"{sid}.png")])  # fmt: skip

    claim = Claim(sid, number, f"study {sid}", "source", "中文", "english")
    return SimpleNamespace(CLAIM=claim, jobs=jobs, run=run, rule=rule, analyze=analyze)


@pytest.fixture
def fakes(monkeypatch) -> dict[str, SimpleNamespace]:
    order = tuple(fake_study(sid, n) for n, sid in enumerate(("fake_a", "fake_b", "fake_c"), 1))
    registry = {m.CLAIM.id: m for m in order}
    monkeypatch.setattr(pipeline, "ORDER", order)
    monkeypatch.setattr(pipeline, "STUDIES", registry)
    monkeypatch.setattr(studies, "STUDIES", registry)  # where the runner looks a config's study up
    TRAINED.clear()
    return registry


def lab(out: Path, only: list[str] | None) -> dict:
    return pipeline.run_lab(PROFILE, only, out, jobs=1, console=Console(quiet=True))


def test_only_keeps_the_cached_studies_in_the_report(tmp_path, fakes):
    lab(tmp_path, None)
    cache = Cache(tmp_path / "runs")
    cache.path(fakes["fake_c"].jobs(PROFILE)[0]).unlink()  # fake_c is no longer fully cached
    damaged_config = fakes["fake_a"].jobs(PROFILE)[1]
    damaged = cache.path(damaged_config)
    damaged.write_text(damaged.read_text()[:10])
    TRAINED.clear()

    results = lab(tmp_path, ["fake_a"])
    assert TRAINED == [damaged_config]  # only the damaged run of the chosen study is done again
    assert [s["id"] for s in results["studies"]] == ["fake_a", "fake_b"]
    assert results["meta"]["left_out"] == ["fake_c"]
    assert json.loads((tmp_path / "results.json").read_text())["studies"] == results["studies"]
    assert "not in this report, as their runs are not all cached: fake_c" in (tmp_path / "report.md").read_text(encoding="utf-8")
    assert cache.get(damaged_config) == Run(damaged_config, {"seed": 1})
