"""Cache keys, atomic writes, and executors: the same config gives the same numbers inline and in a pool."""

from __future__ import annotations

import json

from normkit.lab.runner import Cache, execute, job_key, run_local, unique
from normkit.lab.studies import group_count
from normkit.lab.study import Profile, Run

PROFILE = Profile(mode="tiny", seeds=(0, 1))


def test_job_key_is_stable_and_order_free():
    a = {"study": "x", "seed": 0, "lr": 0.1}
    b = {"lr": 0.1, "seed": 0, "study": "x"}
    assert job_key(a) == job_key(b)
    assert job_key(a) != job_key({**a, "seed": 1})
    assert len(unique([a, b, {**a, "seed": 1}])) == 2


def test_cache_roundtrip_leaves_only_complete_files(tmp_path):
    cache = Cache(tmp_path)
    config = {"study": "demo", "seed": 3}
    assert cache.get(config) is None
    cache.put(Run(config, {"acc": 0.5}), seconds=1.0)
    assert cache.get(config) == Run(config, {"acc": 0.5})
    files = list((tmp_path / "demo").iterdir())
    assert [f.name for f in files] == [f"{job_key(config)}.json"]
    assert json.loads(files[0].read_text())["seconds"] == 1.0


def test_pool_and_inline_give_identical_numbers():
    configs = group_count.jobs(PROFILE)[:2]
    inline = {job_key(c): r for c, r, _ in map(execute, configs)}
    pooled = {}
    run_local(configs, 2, lambda c, r, s: pooled.__setitem__(job_key(c), r))
    assert pooled == inline
