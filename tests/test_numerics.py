"""normkit stays within the float32 error bound on adversarial inputs for every layer and layout."""

from __future__ import annotations

import pytest
import torch

import normkit.nn as nk
from normkit.numerics import CASES, LAYERS, applies, max_error


def _params():
    for layer, (_, _, layouts) in LAYERS.items():
        for case in CASES:
            if not applies(layer, case):
                continue
            for layout in layouts if not case.long else ("contiguous",):
                yield pytest.param(layer, case, layout, id=f"{layer}-{case.name}-{layout}")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("layer,case,layout", list(_params()))
def test_error_within_float32_bound(layer, case, layout, device):
    err = max_error(layer, case, layout, nk, device)
    bound = case.bound(layer)
    if bound == 0:
        assert err == 0.0, f"constant input must normalize to exactly beta, max error {err}"
    else:
        assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"
