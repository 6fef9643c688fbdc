"""The studies, one module per claim of the article, in the article's order, then the variant studies."""

from __future__ import annotations

from types import ModuleType

from . import (
    adain_style,
    batch_noise,
    compute_overhead,
    faster_training,
    gradient_stability,
    group_choice,
    group_count,
    init_dependence,
    instance_relations,
    instance_style,
    loss_surface,
    sequences,
    small_batch,
    small_batch_fixes,
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
    small_batch_fixes,
    group_choice,
    adain_style,
)
STUDIES: dict[str, ModuleType] = {m.CLAIM.id: m for m in ORDER}


def chosen_data_users() -> list[str]:
    """Which studies (and which part of each) train on the ``--data`` images, for the help text and the report."""
    return [f"{m.CLAIM.id} ({m.CHOSEN_DATA})" for m in ORDER if hasattr(m, "CHOSEN_DATA")]
