"""Matplotlib helpers shared by the studies: one look for every figure, lines and bars with 95% intervals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .stats import clip_ci, mean_ci  # noqa: E402

COLORS = {"none": "#7f7f7f", "bn": "#1f77b4", "bnmask": "#17becf", "ln": "#d62728", "in": "#2ca02c", "gn": "#ff7f0e", "rms": "#9467bd"}


def color(kind: str) -> str:
    """A stable colour per norm family, so every figure reads the same."""
    return COLORS.get(kind, COLORS.get(kind[:2], "#17becf"))


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    """A figure with a grid of axes, always returned as a flat list."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, list(axes.flat)


def save(fig, out_dir: Path, name: str, tight_layout: bool = True) -> str:
    """Write ``name`` as PNG under ``out_dir`` and return the file name the report links to."""
    if tight_layout:
        fig.tight_layout()
    path = Path(out_dir) / name
    fig.savefig(path, dpi=90, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return path.name


def line_ci(
    ax, xs: Sequence[float], groups: Sequence[Sequence[float]], label: str, kind: str, scale: float = 1.0,
    within: tuple[float, float] | None = None,
) -> None:
    """Mean over seeds as a line, the 95% t-interval (cut to ``within``) as a band."""
    stats = [clip_ci(mean_ci([v * scale for v in g]), within) for g in groups]
    means = [s[0] for s in stats]
    ax.plot(xs, means, marker="o", ms=3, label=label, color=color(kind))
    ax.fill_between(xs, [s[1] for s in stats], [s[2] for s in stats], color=color(kind), alpha=0.18)


def bars_ci(
    ax, labels: Sequence[str], groups: Sequence[Sequence[float]], kinds: Sequence[str], scale: float = 1.0,
    within: tuple[float, float] | None = None,
) -> None:
    """One bar per group (mean over seeds) with the 95% t-interval (cut to ``within``) as an error bar."""
    stats = [clip_ci(mean_ci([v * scale for v in g]), within) for g in groups]
    means = [s[0] for s in stats]
    errors = [[m - s[1] for m, s in zip(means, stats)], [s[2] - m for m, s in zip(means, stats)]]
    ax.bar(range(len(labels)), means, yerr=errors, capsize=3, color=[color(k) for k in kinds])
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
