"""``--data`` reaches only the studies that name a part in ``CHOSEN_DATA``; help and report say which."""

from __future__ import annotations

import argparse

from normkit.lab import cli as lab_cli
from normkit.lab.report import render_markdown
from normkit.lab.studies import chosen_data_users


def test_help_names_the_studies_on_the_chosen_data():
    assert chosen_data_users() == ["instance_style (style-shift classifiers)"]
    parser = argparse.ArgumentParser(prog="normkit lab")
    lab_cli.add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    assert "image data for instance_style (style-shift classifiers) only" in help_text
    assert "image studies" not in help_text


def test_report_header_says_which_studies_use_the_data():
    meta = {"mode": "quick", "seeds": [0, 1], "backend": "auto", "device": "cpu", "data": "cifar10", "data_used_by": chosen_data_users(),
            "runs_total": 4, "runs_reused": 0, "wall_time_s": 1.0, "left_out": []}  # fmt: skip
    md = render_markdown({"meta": meta, "studies": [], "figures": {"cube": "cube.png"}})
    assert "image data cifar10 for instance_style (style-shift classifiers) only (every other study uses the data its setting names)" in md
    assert "data `cifar10`" not in md and "not in this report" not in md
