"""The studies, one module per claim of the article, in the article's order."""

from __future__ import annotations

from types import ModuleType

from . import (
    batch_noise,
    compute_overhead,
    faster_training,
    gradient_stability,
    group_count,
    init_dependence,
    instance_relations,
    instance_style,
    loss_surface,
    sequences,
    small_batch,
    summary,
)

ORDER: tuple[ModuleType, ...] = (
    faster_training,
    gradient_stability,
    init_dependence,
    batch_noise,
    loss_surface,
    small_batch,
    compute_overhead,
    instance_style,
    instance_relations,
    group_count,
    sequences,
    summary,
)
STUDIES: dict[str, ModuleType] = {m.CLAIM.id: m for m in ORDER}
