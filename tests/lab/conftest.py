"""One tiny lab run shared by the lab tests: every study at smoke-test size, two seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from normkit.lab.pipeline import run_lab
from normkit.lab.study import Profile

TINY = Profile(mode="tiny", seeds=(0, 1))


@pytest.fixture(scope="session")
def tiny_profile() -> Profile:
    return TINY


@pytest.fixture(scope="session")
def tiny_lab(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("lab")
    # inline: at this size spawning workers costs more than it saves, and each worker would compile the
    # kernels again from a cold cache (the pool is tested in test_runner)
    run_lab(TINY, None, out, jobs=1, console=Console(quiet=True))
    return json.loads((out / "results.json").read_text()), out
