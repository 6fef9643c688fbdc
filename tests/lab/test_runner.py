"""Cache keys, atomic writes, and executors: the same config gives the same numbers inline and in a pool."""

from __future__ import annotations

import json
import os
import stat

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


def test_damaged_or_foreign_entries_count_as_missing(tmp_path):
    cache = Cache(tmp_path)
    config = {"study": "demo", "seed": 3}
    cache.put(Run(config, {"acc": 0.5}), seconds=1.0)
    path = cache.path(config)
    text = path.read_text()
    for damaged in (text[: len(text) // 2], "", "[1, 2]", '"run"', '{"config": {"study": "demo", "seed": 3}}', b"\xff\xfe"):
        path.write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
        assert cache.get(config) is None, damaged
    other = {"study": "demo", "seed": 4}
    path.write_text(json.dumps({"config": other, "result": {"acc": 0.9}, "seconds": 1.0}))
    assert cache.get(config) is None
    cache.put(Run(config, {"acc": 0.6}), seconds=1.0)
    assert cache.get(config) == Run(config, {"acc": 0.6})


def test_cache_files_get_the_umask_permissions(tmp_path):
    cache = Cache(tmp_path)
    old = os.umask(0o022)
    try:
        cache.put(Run({"study": "demo", "seed": 0}, {"acc": 0.5}), seconds=1.0)
        os.umask(0o027)
        cache.put(Run({"study": "demo", "seed": 1}, {"acc": 0.5}), seconds=1.0)
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.path({"study": "demo", "seed": 0}).stat().st_mode) == 0o644
    assert stat.S_IMODE(cache.path({"study": "demo", "seed": 1}).stat().st_mode) == 0o640
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == sorted(f"{job_key({'study': 'demo', 'seed': s})}.json" for s in (0, 1))


def test_runs_of_other_code_or_torch_are_not_reused(tmp_path):
    """Every config carries a digest of normkit's sources and torch's version: a run stored by other
    code (a changed module constant without a version bump) or another torch is done again."""
    import torch

    from normkit.lab.study import code_digest

    config = group_count.jobs(Profile(mode="tiny", seeds=(0,)))[0]
    assert (config["code"], config["torch"]) == (code_digest(), torch.__version__)
    cache = Cache(tmp_path)
    cache.put(Run(config, {"final_test_acc": 0.5}), 1.0)
    assert cache.get(config) is not None
    assert cache.get({**config, "code": "0" * 16}) is None
    assert cache.get({**config, "torch": "1.0"}) is None
