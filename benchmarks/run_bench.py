"""Rerun the normkit-vs-torch.nn benchmark: ``python benchmarks/run_bench.py --quick --json out.json``.

The same code as ``normkit bench``; see ``normkit.bench`` for the options.
"""

from __future__ import annotations

import argparse
import sys

from normkit import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_bench", description=bench.__doc__)
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
