"""Pointing game and energy-based pointing game (docs/method.md section 7)."""

import doctest

import pytest
import torch

import saliency_r1.metrics as metrics
from saliency_r1.metrics import energy_in_boxes, pixel_boxes, pointing_game_hit, upsample
from saliency_r1.ops import reward


def test_doctests():
    assert doctest.testmod(metrics).failed == 0


def _brute_force_hit(saliency, size, boxes, tolerance):
    """Every box pixel's distance to the maximum, TorchRay's disk test written out."""
    full = upsample(saliency, *size)
    if full.max() <= 0:
        return False
    y, x = divmod(int(full.argmax()), size[1])
    ys, xs = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    near = (ys - y) ** 2 + (xs - x) ** 2 <= tolerance ** 2
    inside = torch.zeros(size, dtype=torch.bool)
    for x_lo, y_lo, x_hi, y_hi in boxes:
        inside[y_lo:y_hi + 1, x_lo:x_hi + 1] = True
    return bool((near & inside).any())


@pytest.mark.parametrize("grid, size", [((4, 4), (112, 112)), ((3, 7), (42, 123)), ((6, 5), (168, 140))])
def test_pointing_game_matches_brute_force(grid, size):
    g = torch.Generator().manual_seed(grid[0] * 10 + grid[1])
    for trial in range(20):
        saliency = torch.randn(grid, generator=g)
        x = sorted(torch.randint(0, size[1], (2,), generator=g).tolist())
        y = sorted(torch.randint(0, size[0], (2,), generator=g).tolist())
        boxes = [(x[0], y[0], x[1], y[1])]
        for tolerance in (0, 15):
            assert pointing_game_hit(saliency, size, boxes, tolerance) == \
                _brute_force_hit(saliency, size, boxes, tolerance)


def test_pointing_game_tolerance_and_empty_map():
    grid = torch.zeros(4, 4)
    grid[0, 0] = 1.0  # maximum of the upsampled 112 px image at its top-left pixel
    assert pointing_game_hit(grid, (112, 112), [(15, 0, 30, 5)])       # 15 px away: hit
    assert not pointing_game_hit(grid, (112, 112), [(16, 0, 30, 5)])   # 16 px away: miss
    assert not pointing_game_hit(torch.zeros(4, 4), (112, 112), [(0, 0, 111, 111)])
    assert not pointing_game_hit(-torch.ones(4, 4), (112, 112), [(0, 0, 111, 111)])  # relu: no mass
    with pytest.raises(ValueError, match="saliency"):
        pointing_game_hit(torch.zeros(16), (112, 112), [(0, 0, 1, 1)])


@pytest.mark.parametrize("grid, size", [((4, 4), (112, 112)), ((6, 42), (123, 431)), ((5, 3), (100, 60))])
def test_energy_matches_the_reward_op(grid, size):
    g = torch.Generator().manual_seed(sum(grid))
    maps = torch.randn(3, *grid, generator=g)
    boxes = [[[0.1, 0.2, 0.5, 0.6]], [[0.0, 0.0, 0.3, 1.0], [0.2, 0.5, 0.9, 0.9]], [[0.5, 0.5, 1.0, 1.0]]]
    pixel = [pixel_boxes(b, *size) for b in boxes]
    ours = torch.tensor([energy_in_boxes(maps[i], size, pixel[i]) for i in range(3)])
    padded = torch.zeros(3, 2, 4, dtype=torch.int64)
    for i, bs in enumerate(pixel):
        padded[i, :len(bs)] = torch.tensor(bs)
    op = reward(maps, torch.tensor([grid] * 3), torch.tensor([size] * 3), padded,
                torch.tensor([len(b) for b in pixel]), torch.ones(3))
    torch.testing.assert_close(ours, op, rtol=1e-5, atol=1e-6)


def test_pixel_boxes_floor_rule_and_clamp():
    # docs/method.md section 4: x by the width, y by the height (the public code scales y_lo by the width).
    assert pixel_boxes([[0.25, 0.5, 0.75, 1.0]], 40, 80) == [(20, 20, 60, 39)]


def test_energy_agrees_with_the_reward_on_boxes_at_the_edges():
    from saliency_r1.rewards import saliency_in_box

    grid = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    for box in ([0.99, 0.0, 1.0, 1.0], [0.0, 0.99, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]):
        energy = energy_in_boxes(grid, (40, 40), pixel_boxes([box], 40, 40))
        assert energy == pytest.approx(float(saliency_in_box([grid], [[box]], [(40, 40)])[0]), abs=1e-6)
