"""Runs are independent jobs: a results cache keyed by each config's hash, and executors that fill it.

The cache writes each finished run to a temporary file and renames it into place, so a lab killed at any
moment leaves only complete results behind and the next invocation runs only what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from .study import Run


def _canonical(config: dict) -> str:
    """A config as JSON with sorted keys: what it is stored as, so a tuple and its stored list compare equal."""
    return json.dumps(config, sort_keys=True)


def job_key(config: dict) -> str:
    """Stable short hash of a run config (sorted JSON)."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()[:20]


class Cache:
    """One JSON file per finished run under ``root/<study>/<key>.json``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, config: dict) -> Path:
        return self.root / config["study"] / f"{job_key(config)}.json"

    def get(self, config: dict) -> Run | None:
        """The stored run of ``config``, or None when there is none we can trust: a file that is unreadable, not a
        run, or stored for another config (damaged, copied, or from a hash collision) counts as missing, so the run
        is done again and its file replaced."""
        try:
            stored = json.loads(self.path(config).read_text())
            if _canonical(stored["config"]) != _canonical(config) or not isinstance(stored["result"], dict):
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return Run(stored["config"], stored["result"])

    def put(self, run: Run, seconds: float) -> None:
        """Atomic write: temp file in the same directory, then ``os.replace``. The temp file is opened with mode
        0666 so the process umask decides the permissions, as for any other file the lab writes."""
        path = self.path(run.config)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{secrets.token_hex(8)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w") as f:
            json.dump({"config": run.config, "result": run.result, "seconds": seconds}, f)
        os.replace(tmp, path)


def execute(config: dict) -> tuple[dict, dict, float]:
    """Run one job in this process: one thread, the config's backend, the owning study's ``run``. Both
    settings are restored afterwards: an inline run must not leave its caller single-threaded."""
    import torch

    import normkit

    from .studies import STUDIES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.ExitStack() as scope:
            if config["backend"] != "torch":
                scope.enter_context(normkit.backend(config["backend"]))
            start = time.perf_counter()
            result = STUDIES[config["study"]].run(config)
            return config, result, time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


Done = Callable[[dict, dict, float], None]


def run_local(configs: list[dict], jobs: int, done: Done) -> None:
    """A process pool sized to ``jobs``; ``jobs == 1`` runs inline (no process start-up, easy to debug)."""
    if jobs <= 1:
        for config in configs:
            done(*execute(config))
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        pending = {pool.submit(execute, c) for c in configs}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                done(*future.result())


def run_ray(configs: list[dict], address: str | None, done: Done) -> None:
    """The same jobs as Ray tasks (one CPU each); results come back here and land in the same cache."""
    try:
        import ray
    except ImportError as err:
        raise SystemExit("--executor ray needs the optional extra: pip install 'normkit[ray]'") from err
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(execute)
    pending = [remote.remote(c) for c in configs]
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        for ref in finished:
            done(*ray.get(ref))


def unique(configs: Iterable[dict]) -> list[dict]:
    """Configs deduplicated by key (studies may share runs), order kept."""
    seen: dict[str, dict] = {}
    for config in configs:
        seen.setdefault(job_key(config), config)
    return list(seen.values())
