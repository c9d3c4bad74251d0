"""Normalised boxes to pixel ranges (docs/method.md section 4), packing, and saliency_in_box."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

import saliency_r1.boxes
from saliency_r1.boxes import pack_boxes, parse_box, parse_boxes, to_pixel_box
from saliency_r1.rewards import pack_maps, saliency_in_box
from saliency_r1.kernels.reference.reward import reward_reference


def test_docstring_examples():
    result = doctest.testmod(saliency_r1.boxes)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("box", ["[0.12,0.30,0.55,0.81]", " [0.12, 0.30, 0.55, 0.81] ", "(0.12, 0.3, 0.55, 0.81)",
                                 [0.12, 0.3, 0.55, 0.81], (0.12, 0.3, 0.55, 0.81), torch.tensor([0.12, 0.3, 0.55, 0.81],
                                                                                                dtype=torch.float64)])
def test_parse_box_forms(box):
    assert parse_box(box) == (0.12, 0.3, 0.55, 0.81)


@pytest.mark.parametrize("box, message", [([0.5, 0.5, 0.5, 0.5], "is empty"), ([0.1, 0.1, 5, 5], "outside the image"),
                                          ([-0.1, 0.0, 0.5, 0.5], "outside the image")])
def test_one_validation_of_boxes_everywhere(box, message):
    """The data loader, the reward's inputs and explain all refuse what a record may not hold (explain
    once clamped [0.1, 0.1, 5, 5] silently, while the loader rejected it)."""
    from saliency_r1.data.loader import parse_normalised_boxes
    from saliency_r1.rewards import saliency_in_box

    for parse in (parse_box, parse_normalised_boxes):
        with pytest.raises(ValueError, match=message):
            parse(box)
    with pytest.raises(ValueError, match=message):
        saliency_in_box([torch.ones(2, 2)], [box], [(8, 8)])


@pytest.mark.parametrize("box,message", [
    ("[0.1,0.2,0.3]", r"four numbers"),
    ([0.1, 0.2, 0.3, 0.4, 0.5], r"four numbers"),
    (["0.1", 0.2, 0.3, 0.4], r"four numbers"),
    ([True, 0.2, 0.3, 0.4], r"four numbers"),
    ("[0.1,0.2,0.3,oops]", r"is not a list of numbers"),
    ("", r"is not a list of numbers"),
    (0.5, r"four numbers"),
    ([0.1, float("nan"), 0.3, 0.4], r"NaN or infinite"),
    ([0.1, 0.2, float("inf"), 0.4], r"NaN or infinite"),
    ([0.6, 0.2, 0.3, 0.4], r"x2 < x1"),
    ("[0.1,0.5,0.3,0.4]", r"y2 < y1"),
])
def test_parse_box_rejects_malformed_boxes(box, message):
    with pytest.raises(ValueError, match=message):
        parse_box(box)


def test_parse_boxes_forms():
    one = (0.1, 0.2, 0.5, 0.6)
    two = (0.0, 0.0, 1.0, 1.0)
    assert parse_boxes("[0.1,0.2,0.5,0.6]") == [one]
    assert parse_boxes([0.1, 0.2, 0.5, 0.6]) == [one]
    assert parse_boxes("[[0.1,0.2,0.5,0.6],[0,0,1,1]]") == [one, two]
    assert parse_boxes(["[0.1,0.2,0.5,0.6]", (0, 0, 1, 1)]) == [one, two]
    assert parse_boxes([]) == []
    with pytest.raises(ValueError, match=r"a box or a list of boxes"):
        parse_boxes(3)
    with pytest.raises(ValueError, match=r"x2 < x1"):
        parse_boxes(["[0.1,0.2,0.5,0.6]", "[0.9,0.2,0.5,0.6]"])


@pytest.mark.parametrize("size", [(1, 1), (100, 200), (448, 1024), (37, 3)])
def test_to_pixel_box_follows_the_spec(size):
    H, W = size
    x1, y1, x2, y2 = 0.13, 0.29, 0.57, 0.83
    # Floor of the scaled value; y bounds scale by the height (the public code scales y1 by the width).
    assert to_pixel_box([x1, y1, x2, y2], size) == (math.floor(W * x1), math.floor(H * y1), math.floor(W * x2),
                                                    math.floor(H * y2))


def test_to_pixel_box_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"image_size = \(0, 5\) must be positive"):
        to_pixel_box([0, 0, 1, 1], (0, 5))
    with pytest.raises(ValueError, match=r"image_size must be \(H, W\)"):
        to_pixel_box([0, 0, 1, 1], (5.0, 5))


def test_pack_boxes_pads_and_counts():
    boxes, counts = pack_boxes([[], "[0,0,1,1]", ["[0,0,0.5,0.5]", "[0.5,0.5,1,1]"]], [(10, 20), (4, 4), (8, 6)])
    assert boxes.dtype == torch.int64 and counts.tolist() == [0, 1, 2]
    assert boxes.tolist() == [[[0, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, 4, 4], [0, 0, 0, 0]], [[0, 0, 3, 4], [3, 4, 6, 8]]]
    empty, none = pack_boxes([[], []], [(3, 3), (3, 3)])
    assert empty.shape == (2, 0, 4) and none.tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"boxes has 1 entries but image_sizes has 2"):
        pack_boxes(["[0,0,1,1]"], [(3, 3), (3, 3)])
    with pytest.raises(ValueError, match=r"image_sizes\[1\] = \(3, -3\) must be positive"):
        pack_boxes(["[0,0,1,1]", "[0,0,1,1]"], [(3, 3), (3, -3)])


def test_pack_maps_pads_with_zeros_and_promotes():
    maps, sizes = pack_maps([torch.ones(2, 3, dtype=torch.bfloat16), torch.full((4, 1), 2.0)])
    assert maps.dtype == torch.float32 and maps.shape == (2, 4, 3) and sizes.tolist() == [[2, 3], [4, 1]]
    assert maps[0, 2:].eq(0).all() and maps[1, :, 1:].eq(0).all() and maps[1, :, 0].eq(2).all()


@pytest.mark.parametrize("maps,error,message", [
    ([], ValueError, r"maps is empty"),
    ([torch.ones(3)], ValueError, r"maps\[0\] must be a non-empty \[h', w'\] map, got shape \(3,\)"),
    ([torch.ones(2, 2), torch.ones(0, 2)], ValueError, r"maps\[1\] must be a non-empty"),
    ([torch.ones(2, 2, dtype=torch.int64)], TypeError, r"maps\[0\] must be floating point"),
    ([torch.ones(2, 2), torch.ones(2, 2, device="meta")], ValueError, r"maps\[1\] is on meta"),
])
def test_pack_maps_rejects_bad_maps(maps, error, message):
    with pytest.raises(error, match=message):
        pack_maps(maps)


def test_saliency_reward_matches_the_reference():
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(16, 16, generator=gen), torch.randn(20, 37, generator=gen), torch.randn(1, 1, generator=gen).abs()]
    sizes = [(448, 448), (560, 1036), (3, 9)]
    boxes = ["[0.1,0.2,0.6,0.7]", ["[0,0,0.3,0.3]", [0.2, 0.2, 0.9, 0.5]], (0.0, 0.0, 1.0, 1.0)]
    valid = [1.0, 0.5, 1.0]
    packed, map_sizes = pack_maps(maps)
    pixel, counts = pack_boxes(boxes, sizes)
    expected = reward_reference(packed, map_sizes, torch.tensor(sizes), pixel, counts, torch.tensor(valid))
    got = saliency_in_box(maps, boxes, sizes, valid)
    torch.testing.assert_close(got, expected, rtol=2.0 ** -23, atol=1e-12)
    assert got[2] == 1.0
    torch.testing.assert_close(saliency_in_box(maps, boxes, sizes), expected / torch.tensor(valid), rtol=2.0 ** -23,
                               atol=1e-12)


def test_saliency_reward_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match=r"one entry per rollout, got 1, 2 and 1"):
        saliency_in_box([torch.ones(2, 2)], ["[0,0,1,1]", "[0,0,1,1]"], [(4, 4)])
    with pytest.raises(ValueError, match=r"valid must hold one value per rollout \(1\)"):
        saliency_in_box([torch.ones(2, 2)], ["[0,0,1,1]"], [(4, 4)], valid=[1.0, 0.0])


def test_numpy_boxes_are_accepted():
    # A data set column may arrive as NumPy arrays or NumPy scalars.
    as_arrays = parse_boxes(np.array([[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 1.0, 1.0]], dtype=np.float32))
    as_scalars = parse_boxes([[np.float64(0.1), np.float32(0.2), 0.5, np.int64(1)]])
    assert np.allclose(as_arrays, [(0.1, 0.2, 0.5, 0.6), (0.5, 0.5, 1.0, 1.0)])
    assert np.allclose(as_scalars, [(0.1, 0.2, 0.5, 1.0)])
