"""A compact Markdown table of ``normkit bench --json`` results: one row per norm, shape, layout and
dtype, the three modes side by side (torch time / normkit time, speed-up, normkit's share of the copy
bandwidth). Several files are merged in order; a later file's case replaces an earlier one's.

Run: ``python benchmarks/bench_table.py results.json [more.json ...]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODES = ("fwd-train", "fwd-eval", "fwd+bwd")


def _cell(r: dict | None) -> str:
    if r is None:
        return "—"
    return f"{r['torch_ms'] * 1e3:.1f} / {r['normkit_ms'] * 1e3:.1f} µs ({r['speedup']:.2f}x, {r['pct_copy']:.0f}%)"


def table(paths: list[Path]) -> str:
    rows: dict[tuple, dict[str, dict]] = {}
    meta = {}
    for path in paths:
        data = json.loads(path.read_text())
        meta = data["meta"]
        for r in data["results"]:
            key = (r["norm"], "x".join(map(str, r["shape"])), r["layout"], r["dtype"])
            rows.setdefault(key, {})[r["mode"]] = r
    lines = [
        f"{meta.get('device', '?')}, {meta.get('timing', 'eager')} timing, torch {meta.get('torch', '?')}, "
        f"copy {meta.get('copy_gbps', float('nan')):.0f} GB/s",
        "",
        "| norm | shape | layout | dtype | " + " | ".join(MODES) + " |",
        "|---|---|---|---|" + "---|" * len(MODES),
    ]
    for (norm, shape, layout, dtype), modes in rows.items():
        lines.append(f"| {norm} | {shape} | {layout} | {dtype} | " + " | ".join(_cell(modes.get(m)) for m in MODES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("paths", nargs="+", type=Path, help="JSON files written by normkit bench --json")
    paths = parser.parse_args(argv).paths
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    print(table(paths))


if __name__ == "__main__":
    main()
