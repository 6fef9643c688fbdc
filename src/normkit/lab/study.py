"""What every study module provides, and the records passed between runner, studies and report.

A study module defines ``CLAIM``, ``jobs(profile)`` (the run configs), ``run(config)`` (one training run,
executed in a worker), ``analyze(runs, profile, out_dir)`` (statistics, figures, verdict) and ``rule(stats)``
(the verdict, from numbers only, so a test can feed it synthetic numbers on either side of its threshold).
A study that measures speed sets ``TIMES_THE_MACHINE = True``: its runs then go last, one at a time, in the
lab's own process, so no other run of the lab competes with the timings.
A study that trains on the image data chosen with ``--data`` names the part that does in ``CHOSEN_DATA``; every
other study keeps the data its setting names, whatever ``--data`` says.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .stats import Effect

MODES = ("tiny", "quick", "full")


@dataclass(frozen=True)
class Claim:
    """One claim of the article: where it is, the original Chinese and an English rendering."""

    id: str
    number: int
    title: str
    source: str
    zh: str
    en: str


@dataclass(frozen=True)
class Profile:
    """How big the runs are (``tiny`` for tests, ``quick``, ``full``) and where they run."""

    mode: str = "quick"
    seeds: tuple[int, ...] = (0, 1, 2)
    backend: str = "auto"
    device: str = "cpu"
    data: str = "digits"
    data_dir: str | None = None

    def pick(self, tiny: Any, quick: Any, full: Any) -> Any:
        """The setting for this profile's mode."""
        return {"tiny": tiny, "quick": quick, "full": full}[self.mode]

    def base(self, study: str, version: int) -> dict:
        """Fields every run config carries: they are part of the cache key. ``code`` and ``torch`` make a
        stored run count only for the code and torch that made it: a module constant or a kernel changed
        without a ``version`` bump would otherwise report old numbers under the new setting."""
        return {"study": study, "v": version, "mode": self.mode, "backend": self.backend, "device": self.device,
                "code": code_digest(), "torch": torch.__version__}  # fmt: skip


@lru_cache(maxsize=1)
def code_digest() -> str:
    """A short hash of normkit's Python sources (the lab, its models and the kernels they run)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Run:
    """A finished run: its config and what ``run(config)`` returned."""

    config: dict
    result: dict


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Finding:
    """A study's outcome as the report shows it; ``stats`` holds the numbers the rule decided on."""

    verdict: str
    reason: str
    effect: Effect
    setting: str
    stats: dict
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["effect"] = self.effect.to_dict()
        return out


def group(runs: list[Run], *keys: str) -> dict[tuple, list[Run]]:
    """Runs bucketed by the given config fields, seeds pooled, in first-seen order."""
    buckets: dict[tuple, list[Run]] = {}
    for run in runs:
        buckets.setdefault(tuple(run.config[k] for k in keys), []).append(run)
    return {k: sorted(v, key=lambda r: r.config["seed"]) for k, v in buckets.items()}


def values(runs: list[Run], metric: str) -> list[float]:
    """One metric from each run, in seed order."""
    return [float(r.result[metric]) for r in sorted(runs, key=lambda r: r.config["seed"])]


def accuracies(runs: list[Run], classes: int) -> list[float]:
    """Final test accuracy of each run, in seed order. A run that diverged, or has no finite accuracy, scores chance
    (1 / ``classes``): it predicts no better than a guess, and a NaN would rank its group both best and worst."""
    chance = 1.0 / classes
    return [chance if r.result.get("diverged") or not math.isfinite(r.result["final_test_acc"]) else float(r.result["final_test_acc"])
            for r in sorted(runs, key=lambda r: r.config["seed"])]  # fmt: skip


def accuracy_curves(runs: list[Run], classes: int) -> list[list[float]]:
    """Each run's test accuracy per epoch (``test_acc``), in seed order; a run that diverged stopped
    early and scores chance (1 / ``classes``) from then on, so every curve spans the longest."""
    curves = [list(r.result["test_acc"]) for r in sorted(runs, key=lambda r: r.config["seed"])]
    epochs = max(1, max(len(c) for c in curves))
    return [c + [1.0 / classes] * (epochs - len(c)) for c in curves]


def mean_metric(runs: list[Run], metric: str) -> float:
    """Mean of a metric over seeds; -inf when any seed has no finite value (e.g. it diverged)."""
    vals = values(runs, metric)
    if not vals or any(v != v or v in (float("inf"), float("-inf")) for v in vals):
        return float("-inf")
    return sum(vals) / len(vals)
