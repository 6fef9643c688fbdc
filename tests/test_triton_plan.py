"""The Triton planner's tiles: a tile marked flat has rows that are one contiguous run in memory
(what lets the kernels load them as 2-D blocks), and the layouts that need it get it."""

from __future__ import annotations

import pytest
import torch

from normkit.functional import _layout as L
from normkit.kernels._triton_plan import ROW_SPAN, choose_tile, next_pow2


def _row_offsets(tile, r2: int) -> list[int]:
    """Memory offsets of one tile row: groups b < BB side by side, each a run of r2 elements."""
    return [b * r2 + k for b in range(tile.bb) for k in range(min(tile.br2, r2))]


@pytest.mark.parametrize("r1", [1, 7, 64, 3136, 100352])
@pytest.mark.parametrize("b", [1, 2, 5, 32, 64, 256])
@pytest.mark.parametrize("r2", [1, 2, 3, 8, 12, 64, 1024, 3136])
def test_flat_exactly_when_a_row_is_contiguous(r1, b, r2):
    tile = choose_tile(r1, b, r2)
    contiguous = _row_offsets(tile, r2) == list(range(tile.bb * tile.br2))
    assert tile.flat == (tile.bb > 1 and contiguous)


@pytest.mark.parametrize(
    "name, view, flat",
    [
        ("groupnorm channels_last C/G=2", lambda x: L.per_group_view(x, 32, True), True),
        ("groupnorm channels_last C/G=3", lambda x: L.per_group_view(x[:, :48], 16, True), False),
        ("batchnorm channels_last", lambda x: L.per_channel_view(x, True), True),
        ("instancenorm channels_last", lambda x: L.per_instance_view(x, True), True),
        ("groupnorm nchw", lambda x: L.per_group_view(x, 32, False), False),
        ("batchnorm nchw", lambda x: L.per_channel_view(x, False), False),
    ],
)
def test_layouts_that_get_flat_tiles(name, view, flat):
    _, _, r1, b, r2 = view(torch.empty(8, 64, 32, 32, device="meta"))
    assert choose_tile(r1, b, r2).flat == flat, name


@pytest.mark.parametrize("r1", [1, 2, 7, 64, 3136])
@pytest.mark.parametrize("b", [1, 5, 64])
@pytest.mark.parametrize("r2", [1, 2, 12, 1024, 3136, 5000, 8192, 9000])
@pytest.mark.parametrize("max_tile", [512, 2048, 8192])
def test_fused_exactly_when_the_padded_group_fits(r1, b, r2, max_tile):
    """Whether a group is read once depends on MAX_FUSED alone, not on the streamed tile size; a
    tile covers whole groups when fused and stays within max_tile elements when streamed."""
    tile = choose_tile(r1, b, r2, max_tile=max_tile, max_fused=8192)
    side_by_side = min(next_pow2(b), max(1, ROW_SPAN // next_pow2(r2)))
    assert tile.fused == (next_pow2(r1) * side_by_side * next_pow2(r2) <= 8192)
    if tile.fused:
        assert tile.br1 >= r1 and tile.br2 >= r2
    else:
        assert tile.elements <= max_tile
