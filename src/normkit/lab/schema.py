"""The layout of ``results.json``, documented once and checked by ``validate`` (the tests and the report use it).

    {
      "schema": "normkit-lab/1",
      "meta": {mode, seeds[], backend, device, data, data_used_by[] ("<study> (<part>)" trained on data),
               executor, jobs, started_utc, wall_time_s, compute_time_s, runs_total, runs_reused (both over the
               studies run this time), left_out[] (study ids not reported: their runs are not all cached),
               machine{...}, versions{package: version}},
      "figures": {"cube": "<png file name>"},
      "studies": [                               # one per claim, in the article's order
        {
          "id", "number", "title",
          "claim": {"source": where in the article, "zh": original text, "en": English rendering},
          "verdict": "holds" | "holds partly" | "does not hold here",
          "reason": which checks of the rule passed,
          "rule": the verdict rule, as written next to the study,
          "effect": {"name", "estimate", "low", "high", "unit", "g"},   # 95% CI; g = Hedges' g or null
          "setting": the protocol actually run (data, model, optimizer, sizes),
          "stats": the numbers the rule decided on (study-specific keys),
          "tables": [{"title", "columns": [..], "rows": [[..], ..]}],
          "figures": ["<png file name>", ..],    # next to results.json, also embedded in report.html
          "notes": ["..."],
          "n_runs": number of training runs behind the study
        }
      ]
    }

Units: ``acc`` is an accuracy fraction (0.05 = 5 points), ``x`` a ratio, ``dB`` and ``decades`` as named.
"""

from __future__ import annotations

from .stats import VERDICTS

SCHEMA_VERSION = "normkit-lab/1"
STUDY_KEYS = ("id", "number", "title", "claim", "verdict", "reason", "rule", "effect", "setting", "stats", "tables", "figures", "notes", "n_runs")
EFFECT_KEYS = ("name", "estimate", "low", "high", "unit", "g")


def validate(results: dict) -> list[str]:
    """Problems found in a results document (empty when it follows the schema)."""
    problems = []
    if results.get("schema") != SCHEMA_VERSION:
        problems.append(f"schema is {results.get('schema')!r}, expected {SCHEMA_VERSION!r}")
    for key in ("meta", "studies", "figures"):
        if key not in results:
            problems.append(f"missing top-level key {key!r}")
    for study in results.get("studies", []):
        sid = study.get("id", "?")
        problems += [f"{sid}: missing {k!r}" for k in STUDY_KEYS if k not in study]
        problems += [f"{sid}: effect missing {k!r}" for k in EFFECT_KEYS if k not in study.get("effect", {})]
        if study.get("verdict") not in VERDICTS:
            problems.append(f"{sid}: verdict {study.get('verdict')!r} is not one of {VERDICTS}")
        if not study.get("figures"):
            problems.append(f"{sid}: no figure")
        for claim_key in ("zh", "en", "source"):
            if not study.get("claim", {}).get(claim_key):
                problems.append(f"{sid}: claim has no {claim_key!r}")
    return problems
