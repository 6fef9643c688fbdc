"""Slow checks: the Ray executor against a local Ray instance, and the report in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from normkit.lab.pipeline import run_lab
from normkit.lab.study import Profile

pytestmark = pytest.mark.slow
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]  # fmt: skip


def test_ray_executor_fills_the_same_cache(tmp_path):
    ray = pytest.importorskip("ray")
    profile = Profile(mode="tiny", seeds=(0, 1))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        by_ray = run_lab(profile, ["group_count"], tmp_path / "ray", executor="ray", console=Console(quiet=True))
    finally:
        ray.shutdown()
    local = run_lab(profile, ["group_count"], tmp_path / "local", jobs=1, console=Console(quiet=True))
    assert by_ray["meta"]["runs_total"] == local["meta"]["runs_total"] > 0
    assert by_ray["studies"][0]["stats"] == local["studies"][0]["stats"]
    again = run_lab(profile, ["group_count"], tmp_path / "ray", jobs=1, console=Console(quiet=True))
    assert again["meta"]["runs_reused"] == again["meta"]["runs_total"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (make browser)")
    return path


PROBE = """<script>window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.insertAdjacentHTML('beforeend', `<pre id="probe">images=${imgs.length} broken=${bad}</pre>`);
});</script>"""


def test_report_renders_in_headless_chromium(tiny_lab, tmp_path):
    browser = chromium()
    _, out = tiny_lab
    page = tmp_path / "probe.html"
    page.write_text((out / "report.html").read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, *profile, "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    expected = 1 + sum(len(s["figures"]) for s in json.loads((out / "results.json").read_text())["studies"])
    assert f"images={expected} broken=0" in dom
    shot = tmp_path / "report.png"
    subprocess.run([browser, *CHROMIUM_FLAGS, "--user-data-dir=" + str(tmp_path / "profile2"), "--window-size=1200,3000",
                    f"--screenshot={shot}", (out / "report.html").as_uri()], capture_output=True, timeout=120)  # fmt: skip
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(shot).stat().st_size > 10_000
