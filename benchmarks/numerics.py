"""Print normkit's and torch.nn's max error on the adversarial cases of ``normkit.numerics``.

Run: ``.venv/bin/python benchmarks/numerics.py [--markdown] [--device cuda]``
"""

from __future__ import annotations

import argparse

import torch.nn as tnn
from rich.console import Console
from rich.table import Table

import normkit.nn as nk
from normkit.cli import device_type
from normkit.numerics import CASES, LAYERS, applies, max_error


def rows(device: str = "cpu"):
    for layer, (_, _, layouts) in LAYERS.items():
        for case in CASES:
            if not applies(layer, case):
                continue
            for layout in layouts if not case.long else ("contiguous",):
                theirs = max_error(layer, case, layout, tnn, device)
                ours = max_error(layer, case, layout, nk, device)
                yield layer, layout, case.name, case.bound(layer), ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--device", type=device_type, choices=["cpu", "cuda"], default="cpu", help="where both layers run (the float64 truth is on the CPU)")
    args = parser.parse_args()
    header = ["layer", "layout", "case", "bound", "normkit", "torch.nn", "normkit ok", "torch ok"]
    data = [
        (layer, layout, case, f"{bound:.2g}", f"{ours:.3g}", f"{theirs:.3g}", str(ours <= bound), str(theirs <= bound))
        for layer, layout, case, bound, ours, theirs in rows(args.device)
    ]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in data:
            print("| " + " | ".join(row) + " |")
        return
    table = Table(*header, title=f"max abs error vs float64 (float32 input) on {args.device}")
    for row in data:
        table.add_row(*row)
    Console(width=180).print(table)  # a narrow terminal or a pipe would cut the numbers


if __name__ == "__main__":
    main()
