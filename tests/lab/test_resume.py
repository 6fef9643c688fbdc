"""A lab killed midway resumes: finished runs are reused, never rewritten, and no partial file is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ARGS = ["lab", "--tiny", "--seeds", "2", "--only", "init_dependence", "batch_noise", "--jobs", "1"]


def finished_runs(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/*.json")}


def lab(out: Path, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from normkit.cli import main; sys.exit(main())", *ARGS, "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_killed_lab_resumes(tmp_path):
    out = tmp_path / "lab"
    proc = lab(out)
    deadline = time.monotonic() + 120
    while len(finished_runs(out)) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = finished_runs(out)
    assert len(before) >= 4
    for path in before:  # only complete results carry the .json name
        json.loads(path.read_text())
    assert not (out / "results.json").exists(), "the run was supposed to be killed before finishing"

    second = lab(out)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    after = finished_runs(out)
    assert all(after[p] == mtime for p, mtime in before.items()), "finished runs were recomputed"
    total = len(after)
    assert f"{len(before)}/{total} runs reused" in output
    assert (out / "report.html").exists()
