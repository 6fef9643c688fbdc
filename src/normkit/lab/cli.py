"""``normkit lab`` arguments and entry point."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..cli import count_at_least, device_type, positive_int, writable_folder
from .data import DataUnavailable
from .stats import HOLDS, NOT, PARTLY

STYLE = {HOLDS: "green", PARTLY: "yellow", NOT: "red"}


# Every verdict rests on a 95% interval over seeds, and one run has none.
seed_count = count_at_least(2, "at least 2 seeds", "a confidence interval needs two runs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``normkit lab`` options."""
    from .studies import STUDIES, chosen_data_users

    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small runs, 3 seeds, <= 5 min on 2 cores (default)")
    size.add_argument("--full", dest="mode", action="store_const", const="full", help="larger runs and sweeps, 5 seeds, <= 60 min")
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help="smoke-test size (seconds); numbers mean nothing")
    parser.set_defaults(mode="quick")
    parser.add_argument("--only", nargs="+", metavar="STUDY", choices=list(STUDIES), help=f"run only these studies: {', '.join(STUDIES)}")
    parser.add_argument("--seeds", type=seed_count, help="seeds per configuration, at least 2 (default 3 quick, 5 full)")
    parser.add_argument("--device", type=device_type, choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", choices=["auto", "reference", "torch"], default="auto",
                        help="normkit backend for the models' norms, or torch to use torch.nn's layers")  # fmt: skip
    parser.add_argument("--out", type=writable_folder, default=Path("lab-out"), help="results, cache and report directory (default lab-out/)")
    parser.add_argument("--force", action="store_true", help="rerun every job even when its result is cached")
    parser.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1, help="parallel worker processes (default: all cores)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local", help="local process pool, or a Ray cluster")
    parser.add_argument("--ray-address", help="Ray cluster address, with --executor ray (default: start or join a local one)")
    parser.add_argument("--data", choices=["digits", "cifar10", "imagefolder"], default="digits",
                        help=f"image data for {', '.join(chosen_data_users())} only: bundled digits, or user files via torchvision; "
                        "every other study keeps the data its setting names")  # fmt: skip
    parser.add_argument("--data-dir", help="where --data cifar10 / imagefolder files already are (nothing is downloaded)")


def verdict_table(results: dict) -> Table:
    table = Table(title="normkit lab: verdicts")
    for column in ("#", "claim", "verdict", "effect [95% CI]"):
        table.add_column(column)
    from .report import effect_text

    for s in results["studies"]:
        table.add_row(str(s["number"]), s["title"], f"[{STYLE[s['verdict']]}]{s['verdict']}[/]", f"{s['effect']['name']}: {effect_text(s['effect'])}")
    return table


def run(args: argparse.Namespace) -> int:
    """Run the lab and print the verdict table and the report's path."""
    from .data import image_dataset
    from .pipeline import run_lab
    from .study import Profile

    console = Console()
    if args.ray_address is not None and args.executor != "ray":
        console.print("[red]--ray-address names a Ray cluster: it needs --executor ray[/]")
        return 2
    seeds = args.seeds if args.seeds is not None else 5 if args.mode == "full" else 3 if args.mode == "quick" else 2
    profile = Profile(mode=args.mode, seeds=tuple(range(seeds)), backend=args.backend, device=args.device, data=args.data, data_dir=args.data_dir)
    try:
        if args.data != "digits":
            image_dataset(args.data, args.data_dir)
        results = run_lab(profile, args.only, args.out, force=args.force, jobs=args.jobs, executor=args.executor,
                          ray_address=args.ray_address, console=console)  # fmt: skip
    except DataUnavailable as err:
        console.print(f"[red]{err}[/]")
        return 2
    console.print(verdict_table(results))
    console.print(f"wall time {results['meta']['wall_time_s']:.0f} s, {results['meta']['runs_reused']}/{results['meta']['runs_total']} runs reused")
    console.print(f"Report: {(Path(args.out) / 'report.html').resolve()}", soft_wrap=True)
    return 0
