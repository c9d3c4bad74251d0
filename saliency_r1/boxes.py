"""Boxes in the data's normalised form, parsed, converted to pixels and packed for ``saliency_r1.ops.reward``.

The Saliency-R1 data gives each evidence box as ``[x1, y1, x2, y2]`` in ``[0, 1]`` (fractions of the
image width and height), often as a string such as ``"[0.12,0.30,0.55,0.81]"``. The op takes inclusive
integer pixel ranges; ``docs/method.md`` section 4 fixes the conversion for an ``H x W`` image:

    x_lo = floor(W * x1),  y_lo = floor(H * y1),  x_hi = floor(W * x2),  y_hi = floor(H * y2)

(the public code scales ``y1`` by the width: a bug, not followed here). :func:`parse_box` is the one
validation of a box, wherever it comes from: values in ``[0, 1]``, ``x1 < x2`` and ``y1 < y2``. (The op
itself takes pixel boxes and clamps them to the image.)
"""

from __future__ import annotations

import ast
import json
import math
import numbers
from collections.abc import Sequence

import numpy as np

import torch

Box = tuple[float, float, float, float]
PixelBox = tuple[int, int, int, int]


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _as_python(value):
    """Tensors and NumPy arrays (a data set column may hold either) as nested lists."""
    return value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else value


def _literal(text: str):
    try:
        return json.loads(text)  # the data's form, and ten times faster than literal_eval
    except ValueError:
        pass
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise ValueError(f"box string {text!r} is not a list of numbers such as '[0.12,0.30,0.55,0.81]'") from None


def parse_box(box) -> Box:
    """One normalised box ``[x1, y1, x2, y2]`` from a string, list or tuple of four numbers, checked: the
    one validation of boxes, wherever they come from (data, the reward's inputs, ``explain``).

    Raises:
        ValueError: not four numbers, a NaN or infinite value, a value outside ``[0, 1]``, ``x2 < x1`` or
            ``y2 < y1``, or an empty box (``x1 == x2`` or ``y1 == y2``).

    >>> parse_box("[0.12,0.30,0.55,0.81]")
    (0.12, 0.3, 0.55, 0.81)
    >>> parse_box((0, 0, 1, 1))
    (0.0, 0.0, 1.0, 1.0)
    >>> parse_box("[0.5, 0.2, 0.1, 0.9]")
    Traceback (most recent call last):
    ...
    ValueError: box [0.5, 0.2, 0.1, 0.9] has x2 < x1 (need x1 < x2 and y1 < y2)
    >>> parse_box([0.1, 0.1, 5, 5])
    Traceback (most recent call last):
    ...
    ValueError: box [0.1, 0.1, 5, 5] lies outside the image (normalised values must be in [0, 1])
    """
    value = _as_python(_literal(box) if isinstance(box, str) else box)
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_is_number(v) for v in value):
        raise ValueError(f"a box must be four numbers [x1, y1, x2, y2], got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box {list(value)} holds a NaN or infinite value")
    if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        raise ValueError(f"box {list(value)} lies outside the image (normalised values must be in [0, 1])")
    if x2 < x1:
        raise ValueError(f"box {list(value)} has x2 < x1 (need x1 < x2 and y1 < y2)")
    if y2 < y1:
        raise ValueError(f"box {list(value)} has y2 < y1 (need x1 < x2 and y1 < y2)")
    if x2 == x1 or y2 == y1:
        raise ValueError(f"box {list(value)} is empty (need x1 < x2 and y1 < y2)")
    return x1, y1, x2, y2


def parse_boxes(boxes) -> list[Box]:
    """One box or a list of boxes, in any form :func:`parse_box` takes, as a list of boxes.

    A string may hold one box or a list of them; a list may hold numbers (one box) or boxes. An empty
    list means no box (the reward is then 0).

    >>> parse_boxes("[0.1,0.2,0.5,0.6]")
    [(0.1, 0.2, 0.5, 0.6)]
    >>> parse_boxes(["[0,0,0.5,0.5]", [0.5, 0.5, 1, 1]])
    [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]
    >>> parse_boxes("[[0,0,0.5,0.5],[0.5,0.5,1,1]]")
    [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]
    >>> parse_boxes(np.array([[0, 0, 0.5, 0.5]], dtype=np.float32))
    [(0.0, 0.0, 0.5, 0.5)]
    """
    value = _as_python(_literal(boxes) if isinstance(boxes, str) else boxes)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"boxes must be a box or a list of boxes, got {boxes!r}")
    if value and all(_is_number(v) for v in value):
        return [parse_box(value)]
    return [parse_box(box) for box in value]


def to_pixel_box(box, image_size: tuple[int, int]) -> PixelBox:
    """A normalised box as the inclusive pixel ranges ``(x_lo, y_lo, x_hi, y_hi)`` of an ``(H, W)`` image.

    >>> to_pixel_box("[0.12,0.30,0.55,0.81]", (100, 200))
    (24, 30, 110, 81)
    >>> to_pixel_box([0, 0, 1, 1], (100, 200))  # x_hi = W lies past the image; the op clamps it
    (0, 0, 200, 100)
    """
    return _to_pixels(parse_box(box), image_size_pair(image_size, "image_size"))


def _to_pixels(box: Box, image_size: tuple[int, int]) -> PixelBox:
    x1, y1, x2, y2 = box
    height, width = image_size
    return math.floor(width * x1), math.floor(height * y1), math.floor(width * x2), math.floor(height * y2)


def image_size_pair(size, name: str) -> tuple[int, int]:
    """``size`` as ``(H, W)``, two positive integers; ``name`` is the argument named in the error."""
    if isinstance(size, torch.Tensor):
        size = size.tolist()
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise ValueError(f"{name} must be (H, W), two integers, got {size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{name} = {tuple(size)} must be positive")
    return size[0], size[1]


def pack_boxes(boxes: Sequence, image_sizes: Sequence, device: torch.device | str | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rollout's normalised boxes as pixel boxes, padded into the op's ``boxes`` and ``box_counts``.

    Args:
        boxes: ``B`` entries, each one box or a list of boxes in any form :func:`parse_boxes` takes.
        image_sizes: ``B`` pairs ``(H, W)``.
        device: where the tensors go (default: CPU).

    Returns:
        ``boxes`` int64 ``[B, K_max, 4]`` (``K_max`` the most boxes of any rollout, unused rows 0) and
        ``box_counts`` int64 ``[B]``.

    >>> pixel, counts = pack_boxes(["[0,0,0.5,0.5]", ["[0,0,0.1,0.1]", [0.5, 0.5, 1, 1]]], [(10, 10), (20, 40)])
    >>> pixel.tolist(), counts.tolist()
    ([[[0, 0, 5, 5], [0, 0, 0, 0]], [[0, 0, 4, 2], [20, 10, 40, 20]]], [1, 2])
    """
    if len(boxes) != len(image_sizes):
        raise ValueError(f"boxes has {len(boxes)} entries but image_sizes has {len(image_sizes)}")
    pixel = []
    for b, (entry, size) in enumerate(zip(boxes, image_sizes)):
        size = image_size_pair(size, f"image_sizes[{b}]")
        pixel.append([_to_pixels(box, size) for box in parse_boxes(entry)])
    k_max = max((len(p) for p in pixel), default=0)
    padded = [p + [(0, 0, 0, 0)] * (k_max - len(p)) for p in pixel]
    packed = torch.tensor(padded, dtype=torch.int64).reshape(len(pixel), k_max, 4)
    counts = torch.tensor([len(p) for p in pixel], dtype=torch.int64)
    return packed.to(device), counts.to(device)


__all__ = ["image_size_pair", "pack_boxes", "parse_box", "parse_boxes", "to_pixel_box"]
