"""Plain-torch references of the reward op (docs/method.md section 4): they materialise the upsampled map.

``reward_reference`` is the ground truth the kernels are tested against (float64, the full
``H x W`` image per rollout). ``reward_public_way`` is the public Saliency-R1 code's per-rollout
formula, with its y-bound bug fixed: the baseline the benchmarks time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _upsample(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``relu(grid)`` ([h', w']) resized bilinearly (half-pixel centres) to ``[height, width]``."""
    return F.interpolate(grid.relu()[None, None], size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0]


def reward_reference(maps: torch.Tensor, map_sizes: torch.Tensor, image_sizes: torch.Tensor,
                     boxes: torch.Tensor, box_counts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """What ``torch.ops.saliency.reward`` computes, by materialising every upsampled map in float64.

    Args:
        maps: float ``[B, h_max, w_max]``; rollout ``b``'s map fills the top-left ``map_sizes[b]`` corner.
        map_sizes: int ``[B, 2]``, ``(h', w')``.
        image_sizes: int ``[B, 2]``, ``(H, W)`` in pixels.
        boxes: int ``[B, K_max, 4]``, inclusive ``(x_lo, y_lo, x_hi, y_hi)``, clamped to the image.
        box_counts: int ``[B]``, boxes used per rollout.
        valid: float ``[B]``, multiplier.

    Returns:
        float32 ``[B]`` on ``maps.device``: ``valid * mass in the union of the boxes / total mass``,
        0 where the total mass is 0 or there is no box.
    """
    out = torch.zeros(maps.shape[0], dtype=torch.float64)
    for b in range(maps.shape[0]):
        h, w = (int(v) for v in map_sizes[b])
        height, width = (int(v) for v in image_sizes[b])
        image = _upsample(maps[b, :h, :w].double().cpu(), height, width)
        union = torch.zeros(height, width, dtype=torch.bool)
        for x_lo, y_lo, x_hi, y_hi in boxes[b, : int(box_counts[b])].tolist():
            # Clamping the slice bounds to the image; an empty slice is a box wholly off the image.
            union[max(y_lo, 0): max(y_hi + 1, 0), max(x_lo, 0): max(x_hi + 1, 0)] = True
        total = image.sum()
        if total > 0:
            out[b] = float(valid[b]) * image[union].sum() / total
    return out.to(torch.float32).to(maps.device)


def reward_public_way(saliency: torch.Tensor, image_size: tuple[int, int], bbox: str | list[str]) -> float:
    """One rollout's reward the public Saliency-R1 code's way, with its y-bound bug fixed.

    The public ``think_saliency_reward`` takes the map already resized to the image with
    ``cv2.resize`` (bilinear, half-pixel centres, which ``interpolate(align_corners=False)``
    matches when upsampling), parses the box string, and sums an inclusive slice. It scales the
    box's lower y bound by the image width; here it is scaled by the height (docs/method.md section 4).
    It handles one box; given several, this sums the union of their slices (one resize).

    Args:
        saliency: ``[h', w']`` raw map (relu is applied here, as the public code does before resizing).
        image_size: ``(H, W)`` in pixels.
        bbox: one normalised box as the data writes it, ``"[x1,y1,x2,y2]"``, or a list of them.

    Returns:
        ``mass inside the box(es) / total mass`` (NaN where the total mass is 0, as the public code gives).

    >>> grid = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    >>> round(reward_public_way(grid, (4, 4), "[0.5,0.0,1.0,1.0]"), 4)
    0.875
    >>> round(reward_public_way(grid, (4, 4), ["[0.5,0.0,1.0,0.4]", "[0.75,0.0,1.0,1.0]"]), 4)
    0.6875
    """
    height, width = image_size
    image = _upsample(saliency, height, width)
    if isinstance(bbox, str):
        x1, y1, x2, y2 = (float(v) for v in bbox[1:-1].split(","))
        x_lo, y_lo, x_hi, y_hi = (math.floor(width * x1), math.floor(height * y1), math.floor(width * x2),
                                  math.floor(height * y2))
        return float(image[y_lo: y_hi + 1, x_lo: x_hi + 1].sum() / image.sum())
    union = torch.zeros(height, width, dtype=torch.bool, device=image.device)
    for box in bbox:
        x1, y1, x2, y2 = (float(v) for v in box[1:-1].split(","))
        union[math.floor(height * y1): math.floor(height * y2) + 1, math.floor(width * x1): math.floor(width * x2) + 1] = True
    return float(image[union].sum() / image.sum())
