"""Choosing GroupNorm's group count: a rule (``auto_groups``) and a short validation sweep (``sweep_groups``).

Con answered: GroupNorm makes you choose G. Wu & He ("Group Normalization", ECCV 2018, Table 3) find
a broad optimum: 32 groups (or 16 channels per group) is best on ImageNet, and the extremes G = 1
(LayerNorm) and G = C (InstanceNorm) are worst. ``auto_groups`` encodes that: the divisor of C
closest to ``target`` groups that keeps at least ``min_group_size`` channels per group. When the
rule is not enough, ``sweep_groups`` scores candidate counts on a short validation run and picks
the best.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ._checks import check_count


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def auto_groups(num_channels: int, target: int = 32, min_group_size: int = 2) -> int:
    """Group count for ``num_channels``: the divisor nearest ``target`` with >= ``min_group_size``
    channels per group (ties go to more groups); 1 when no divisor qualifies.

    ``auto_groups(256) == 32``, ``auto_groups(64) == 32``, ``auto_groups(48) == 24``, ``auto_groups(16) == 8``.
    """
    if num_channels < 1:
        raise ValueError(f"num_channels must be positive, got {num_channels}")
    allowed = [g for g in divisors(num_channels) if num_channels // g >= min_group_size] or [1]
    return min(allowed, key=lambda g: (abs(g - target), -g))


def sweep_groups(
    num_channels: int, score: Callable[[int], float], candidates: Iterable[int] | None = None
) -> tuple[int, dict[int, float]]:
    """Best group count by a short validation sweep: ``score(G)`` (higher is better, e.g. validation
    accuracy after a few epochs) for each candidate divisor of ``num_channels``; returns (best G, scores).

    The default candidates are the powers of two dividing C plus ``auto_groups(C)``.
    """
    pool = candidates if candidates is not None else {
        *(g for g in divisors(num_channels) if g & (g - 1) == 0), auto_groups(num_channels)
    }
    scores: dict[int, float] = {}
    for g in sorted(set(pool)):
        if num_channels % check_count(g, "num_groups"):
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({g})")
        scores[g] = float(score(g))
    if not scores:
        raise ValueError("sweep_groups needs at least one candidate group count")
    return max(scores, key=scores.__getitem__), scores


__all__ = ["auto_groups", "divisors", "sweep_groups"]
