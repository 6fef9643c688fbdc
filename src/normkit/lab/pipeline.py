"""One lab invocation: collect the studies' jobs, run what the cache lacks, analyze, write results and report."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import report
from .runner import Cache, job_key, run_local, run_ray, unique
from .schema import SCHEMA_VERSION
from .studies import ORDER, STUDIES, chosen_data_users
from .study import Profile, Run


def versions() -> dict[str, str]:
    """Versions of everything that can move the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("normkit", "torch", "numpy", "scipy", "matplotlib", "scikit-learn", "mnist1d", "rich"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine(device: str) -> dict[str, str | int]:
    import torch

    info: dict[str, str | int] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                                  "cpu_count": os.cpu_count() or 1}  # fmt: skip
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def strict_json(value):
    """The same document with NaN/inf as null and numpy scalars as Python numbers, so any JSON parser reads it."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=console, transient=False,
    )  # fmt: skip


def run_lab(
    profile: Profile,
    study_ids: list[str] | None,
    out_dir: Path,
    *,
    force: bool = False,
    jobs: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
    console: Console | None = None,
) -> dict:
    """Run (or reuse) every job of the chosen studies (all when ``study_ids`` is None), then write results.json,
    report.html and report.md for them and for every other study whose runs are all cached, so rerunning a few
    studies keeps the others' verdicts; the studies left out are named in ``meta["left_out"]``."""
    console = console or Console()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    studies = [m for m in ORDER if study_ids is None or m.CLAIM.id in study_ids]
    configs = {m.CLAIM.id: m.jobs(profile) for m in studies}
    cache = Cache(out_dir / "runs")
    all_configs = unique(c for cs in configs.values() for c in cs)
    pending = [c for c in all_configs if force or cache.get(c) is None]
    owners: dict[str, list[str]] = {}
    for sid, cs in configs.items():
        for c in cs:
            owners.setdefault(job_key(c), []).append(sid)
    compute = 0.0

    with _progress(console) as progress:
        overall = progress.add_task("all runs", total=len(all_configs), completed=len(all_configs) - len(pending))
        tasks = {}
        for sid, cs in configs.items():
            done_already = sum(1 for c in cs if not force and cache.get(c) is not None)
            tasks[sid] = progress.add_task(f"{STUDIES[sid].CLAIM.number:>2}. {sid}", total=len(cs), completed=done_already)

        def done(config: dict, result: dict, seconds: float) -> None:
            nonlocal compute
            compute += seconds
            cache.put(Run(config, result), seconds)
            progress.advance(overall)
            for sid in owners[job_key(config)]:
                progress.advance(tasks[sid])

        alone = {job_key(c) for m in studies if getattr(m, "TIMES_THE_MACHINE", False) for c in configs[m.CLAIM.id]}
        shared = [c for c in pending if job_key(c) not in alone]
        if executor == "ray":
            run_ray(shared, ray_address, done)
        else:
            run_local(shared, jobs, done)
        run_local([c for c in pending if job_key(c) in alone], 1, done)  # timings: here, one at a time, nothing beside them

    reported = [m for m in ORDER if m in studies or all(cache.get(c) is not None for c in m.jobs(profile))]
    left_out = [m.CLAIM.id for m in ORDER if m not in reported]
    if left_out:
        console.print(f"Not in this report (their runs are not all cached): {', '.join(left_out)}")
    findings = []
    for module in reported:
        runs = [cache.get(c) for c in module.jobs(profile)]
        finding = module.analyze(runs, profile, out_dir)
        findings.append({"id": module.CLAIM.id, "number": module.CLAIM.number, "title": module.CLAIM.title, "claim": {
            "source": module.CLAIM.source, "zh": module.CLAIM.zh, "en": module.CLAIM.en}, "rule": " ".join(module.rule.__doc__.split()),
            "n_runs": len(runs), **finding.to_dict()})  # fmt: skip
    results = {
        "schema": SCHEMA_VERSION,
        "meta": {
            "mode": profile.mode,
            "seeds": list(profile.seeds),
            "backend": profile.backend,
            "device": profile.device,
            "data": profile.data,
            "data_used_by": chosen_data_users(),
            "executor": executor,
            "jobs": jobs,
            "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": time.perf_counter() - started,
            "compute_time_s": compute,
            "runs_total": len(all_configs),
            "runs_reused": len(all_configs) - len(pending),
            "left_out": left_out,
            "machine": machine(profile.device),
            "versions": versions(),
        },
        "studies": findings,
    }
    results["figures"] = {"cube": report.cube_figure(out_dir)}
    results["meta"]["wall_time_s"] = time.perf_counter() - started
    results = strict_json(results)
    tmp = out_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False))
    os.replace(tmp, out_dir / "results.json")
    report.write(results, out_dir)
    return results
