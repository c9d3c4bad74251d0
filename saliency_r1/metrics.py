"""Interpretability metrics of docs/method.md section 7: pointing game and energy-based pointing game.

Both read one saliency map per sample (``[h', w']``, raw: ``relu`` is applied here), the image size
``(H, W)`` and the sample's boxes as inclusive pixel ranges ``(x_lo, y_lo, x_hi, y_hi)``
(:func:`pixel_boxes` converts normalised boxes by docs/method.md section 4's floor rule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saliency_r1.boxes import parse_boxes, to_pixel_box


def pixel_boxes(boxes, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """Normalised ``[x1, y1, x2, y2]`` boxes (checked by :func:`saliency_r1.boxes.parse_box`) to inclusive
    pixel ranges, clamped to the image as the reward op clamps them (``x2 = 1`` maps to ``x_hi = W``).

    >>> pixel_boxes([[0.1, 0.2, 0.5, 1.0], [0.9, 0.0, 1.0, 1.0]], 100, 50)
    [(5, 20, 25, 99), (45, 0, 49, 99)]
    """
    out = []
    for box in parse_boxes(boxes):
        x_lo, y_lo, x_hi, y_hi = to_pixel_box(box, (height, width))
        out.append((x_lo, y_lo, min(x_hi, width - 1), min(y_hi, height - 1)))
    return out


def upsample(saliency: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``relu(map)`` upsampled bilinearly to ``[H, W]`` with half-pixel centres (docs/method.md section 4)."""
    grid = saliency.detach().float().clamp(min=0)[None, None]
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def pointing_game_hit(saliency: torch.Tensor, image_size: tuple[int, int], boxes, tolerance: float = 15.0) -> bool:
    """Whether a box pixel lies within ``tolerance`` px of the upsampled map's maximum.

    Args:
        saliency: ``[h', w']`` raw map.
        image_size: ``(H, W)``.
        boxes: inclusive pixel ranges ``[(x_lo, y_lo, x_hi, y_hi), ...]``.
        tolerance: radius in pixels (15, TorchRay's convention).

    A map without positive mass (an invalid completion's) points nowhere: a miss. The upsampled
    map is materialised (evaluation only; ``H x W`` floats per sample), and ties for the maximum
    go to the first pixel in raster order.

    >>> grid = torch.zeros(4, 4); grid[3, 0] = 1.0   # bottom-left cell of a 112 px image
    >>> pointing_game_hit(grid, (112, 112), [(0, 80, 20, 111)]), pointing_game_hit(grid, (112, 112), [(80, 0, 111, 20)])
    (True, False)
    """
    if saliency.dim() != 2:
        raise ValueError(f"saliency must be [h', w'], got shape {tuple(saliency.shape)}")
    height, width = image_size
    full = upsample(saliency, height, width)
    if not bool(full.max() > 0):
        return False
    index = int(full.argmax())
    y, x = divmod(index, width)
    for x_lo, y_lo, x_hi, y_hi in boxes:
        # Distance from the maximum to the nearest pixel of the box.
        dx = max(x_lo - x, 0, x - x_hi)
        dy = max(y_lo - y, 0, y - y_hi)
        if dx * dx + dy * dy <= tolerance * tolerance:
            return True
    return False


def energy_in_boxes(saliency: torch.Tensor, image_size: tuple[int, int], boxes) -> float:
    """Energy-based pointing game of one sample, materialised: mass of the upsampled ``relu(map)``
    inside the union of the boxes over its total mass (0 without mass). The training reward
    computes the same number without materialising (``saliency_r1.ops.reward``); this is its
    evaluation-side reference.

    >>> energy_in_boxes(torch.ones(2, 2), (10, 10), [(0, 0, 4, 9)])
    0.5
    """
    height, width = image_size
    full = upsample(saliency, height, width)
    total = float(full.sum())
    if total <= 0:
        return 0.0
    inside = torch.zeros_like(full, dtype=torch.bool)
    for x_lo, y_lo, x_hi, y_hi in boxes:
        inside[y_lo:y_hi + 1, x_lo:x_hi + 1] = True  # index [y, x]: rows are y (Score-CAM's code swaps them)
    return float(full[inside].sum()) / total
