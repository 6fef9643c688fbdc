"""Every study at tiny size: it runs, its finding follows the schema, its numbers are finite where they must be."""

from __future__ import annotations

import json
import math

import pytest

from normkit.lab.runner import Cache
from normkit.lab.schema import validate
from normkit.lab.stats import VERDICTS
from normkit.lab.studies import ORDER, STUDIES


def test_results_follow_the_schema(tiny_lab):
    results, out = tiny_lab
    assert validate(results) == []
    json.loads((out / "results.json").read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert [s["id"] for s in results["studies"]] == [m.CLAIM.id for m in ORDER]
    assert len(ORDER) == 15


@pytest.mark.parametrize("study_id", list(STUDIES))
def test_study_finding(tiny_lab, tiny_profile, study_id):
    results, out = tiny_lab
    finding = next(s for s in results["studies"] if s["id"] == study_id)
    assert finding["verdict"] in VERDICTS
    assert math.isfinite(finding["effect"]["estimate"])
    assert finding["effect"]["low"] <= finding["effect"]["estimate"] <= finding["effect"]["high"]
    assert finding["setting"] and finding["rule"] and finding["reason"]
    assert finding["tables"] and all(len(row) == len(t["columns"]) for t in finding["tables"] for row in t["rows"])
    for name in finding["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert finding["n_runs"] == len(STUDIES[study_id].jobs(tiny_profile))


@pytest.mark.parametrize("study_id", [s for s in STUDIES if s != "summary"])
def test_every_run_is_cached_with_its_config(tiny_lab, tiny_profile, study_id):
    _, out = tiny_lab
    cache = Cache(out / "runs")
    for config in STUDIES[study_id].jobs(tiny_profile):
        run = cache.get(config)
        assert run is not None and run.config == config
