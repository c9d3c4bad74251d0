"""Faithfulness of saliency maps: deletion and insertion curves (``docs/method.md`` section 8).

For one sample, its generated completion and a map: the map is upsampled bilinearly to the image's
pixels and the pixels ranked; deletion replaces the top fraction ``r`` with a baseline, insertion keeps
only the top ``r`` over the baseline; each perturbed image is scored by the mean probability of the
completion's answer tokens, teacher-forced. A faithful map makes the deletion curve fall fast and the
insertion curve rise fast. All perturbed images of a sample go through the model in batched forwards;
the two ends of every curve (the original image, the all-baseline image) are shared by every source and
scored once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

MAP_SOURCES = ("cot", "direct", "both", "attention", "random", "gaussian")
"""The maps compared: the three saliency paths, the answer rows' raw attention on the image (averaged over
layers, heads and answer tokens), a seeded random ranking and a centred Gaussian."""
BASELINES = ("black", "mean", "blur")
REPORTED_POINTS = (("deletion", 0.05), ("deletion", 0.15), ("deletion", 0.30), ("insertion", 0.30))
"""The curve points the paper's Table 1 reports."""


@dataclass(frozen=True)
class FaithfulnessOptions:
    """How the curves are drawn.

    Args:
        steps: the fraction grid is ``i / steps`` for ``i = 0..steps``, plus 0.05, 0.15 and 0.30.
        baseline: what removed pixels become: ``"black"``, ``"mean"`` (the image's mean colour) or
            ``"blur"`` (a Gaussian blur of the image, radius 5 % of its longer side).
        seed: seed of the random ranking (each sample's own stream: ``seed`` and the sample's index).
        batch_size: perturbed images per teacher-forced forward.
    """

    steps: int = 16
    baseline: str = "black"
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def fractions(self) -> list[float]:
        return fraction_grid(self.steps)


def fraction_grid(steps: int) -> list[float]:
    """``i / steps`` for ``i = 0..steps`` and the reported points 0.05, 0.15, 0.30, ascending, no repeats.

    >>> fraction_grid(4)
    [0.0, 0.05, 0.15, 0.25, 0.3, 0.5, 0.75, 1.0]
    """
    grid = {round(i / steps, 12) for i in range(steps + 1)} | {fraction for _, fraction in REPORTED_POINTS}
    return sorted(grid)


# ---------------------------------------------------------------------------------------- rankings


def upsample_map(saliency: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The raw map (signed: no ``relu``, so negative cells rank below zero ones) upsampled bilinearly to
    ``[H, W]`` with half-pixel centres, as the reward upsamples it."""
    grid = saliency.detach().to(torch.float64)[None, None]
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def pixel_ranking(scores: torch.Tensor) -> torch.Tensor:
    """Flat pixel indices of ``scores [H, W]`` from the highest score down; ties in raster order.

    >>> pixel_ranking(torch.tensor([[0.0, 2.0], [2.0, 1.0]])).tolist()
    [1, 2, 3, 0]
    """
    return torch.argsort(-scores.flatten(), stable=True)


def gaussian_scores(height: int, width: int) -> torch.Tensor:
    """A centred Gaussian over the image, standard deviation a quarter of each side: the centre bias."""
    y = (torch.arange(height, dtype=torch.float64) + 0.5 - height / 2) / (height / 4)
    x = (torch.arange(width, dtype=torch.float64) + 0.5 - width / 2) / (width / 4)
    return torch.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))


def random_scores(height: int, width: int, seed: int, index: int) -> torch.Tensor:
    """Uniform noise per pixel, from a stream seeded by ``seed`` and the sample's ``index``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.rand(height, width, generator=generator, dtype=torch.float64)


def source_rankings(maps: dict[str, torch.Tensor], image_size: tuple[int, int], *, seed: int,
                    index: int) -> dict[str, torch.Tensor]:
    """Pixel rankings of every map source of one sample: ``maps`` holds the grid maps
    (``cot``, ``direct``, ``both``, ``attention``); ``random`` and ``gaussian`` are added here."""
    height, width = image_size
    rankings = {name: pixel_ranking(upsample_map(grid, height, width)) for name, grid in maps.items()}
    rankings["random"] = pixel_ranking(random_scores(height, width, seed, index))
    rankings["gaussian"] = pixel_ranking(gaussian_scores(height, width))
    return rankings


# ---------------------------------------------------------------------------------------- perturbations


def baseline_pixels(pixels: np.ndarray, kind: str) -> np.ndarray:
    """What removed pixels become, ``uint8 [H, W, 3]`` like ``pixels``."""
    if kind == "black":
        return np.zeros_like(pixels)
    if kind == "mean":
        return np.broadcast_to(pixels.reshape(-1, 3).mean(0).round().astype(np.uint8), pixels.shape).copy()
    if kind == "blur":
        radius = max(2.0, 0.05 * max(pixels.shape[:2]))
        return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius)))
    raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")


def perturbed(pixels: np.ndarray, baseline: np.ndarray, ranking: torch.Tensor, count: int, mode: str) -> np.ndarray:
    """``pixels`` with its top ``count`` ranked pixels replaced by ``baseline`` (``deletion``), or
    ``baseline`` with only those pixels kept from ``pixels`` (``insertion``)."""
    top = ranking[:count].numpy()
    source, target = (baseline, pixels) if mode == "deletion" else (pixels, baseline)
    out = target.reshape(-1, 3).copy()
    out[top] = source.reshape(-1, 3)[top]
    return out.reshape(pixels.shape)


def pixel_count(fraction: float, total: int) -> int:
    return int(round(fraction * total))


# ---------------------------------------------------------------------------------------- scoring


def answer_probabilities(model, processor, adapter, images: list[Image.Image], question: str,
                         completion_ids: torch.Tensor, answer_index: list[int], *, system_prompt: str,
                         batch_size: int) -> torch.Tensor:
    """Mean probability of the answer tokens of ``completion_ids`` (1-D, the generated completion) given
    each image and ``question``, teacher-forced: float64 ``[len(images)]`` on the host."""
    from saliency_r1.logps import completion_logps
    from saliency_r1.prompts import prompt_inputs

    device = next(model.parameters()).device
    index = torch.as_tensor(answer_index, dtype=torch.long, device=device)
    scores = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        inputs = prompt_inputs(processor, adapter, [{"image": image, "problem": question} for image in chunk],
                               system_prompt).to(device)
        ids = completion_ids.to(device).expand(len(chunk), -1)
        mask = torch.ones(ids.shape, dtype=torch.float32, device=device)
        with torch.no_grad():
            logps = completion_logps(model, dict(inputs), ids, mask, temperature=1.0)
        scores.append(logps.index_select(1, index).double().exp().mean(1).cpu())
    return torch.cat(scores)


def deletion_insertion(model, processor, adapter, image: Image.Image, question: str, completion_ids: torch.Tensor,
                       answer_index: list[int], rankings: dict[str, torch.Tensor], options: FaithfulnessOptions, *,
                       system_prompt: str) -> dict[str, dict[str, list[float]]]:
    """Deletion and insertion curves of every ranking of one sample.

    Returns:
        ``{source: {"deletion": [score at each r], "insertion": [...]}}`` over ``options.fractions``.
    """
    pixels = np.asarray(image.convert("RGB"))
    baseline = baseline_pixels(pixels, options.baseline)
    total = pixels.shape[0] * pixels.shape[1]
    fractions = options.fractions
    # Each perturbed image once: the original (deletion at 0, insertion at 1) and the baseline (deletion at
    # 1, insertion at 0) are the same for every source.
    keys: dict[tuple, int] = {}
    images: list[Image.Image] = []

    def slot(key: tuple, make) -> int:
        if key not in keys:
            keys[key] = len(images)
            images.append(Image.fromarray(make()))
        return keys[key]

    layout: dict[str, dict[str, list[int]]] = {}
    for name, ranking in rankings.items():
        layout[name] = {}
        for mode in ("deletion", "insertion"):
            slots = []
            for fraction in fractions:
                count = pixel_count(fraction, total)
                kept = total - count if mode == "deletion" else count  # original pixels left in the image
                if kept == total:
                    slots.append(slot(("original",), lambda: pixels))
                elif kept == 0:
                    slots.append(slot(("baseline",), lambda: baseline))
                else:
                    slots.append(slot((name, mode, count),
                                      lambda r=ranking, c=count, m=mode: perturbed(pixels, baseline, r, c, m)))
            layout[name][mode] = slots
    scores = answer_probabilities(model, processor, adapter, images, question, completion_ids, answer_index,
                                  system_prompt=system_prompt, batch_size=options.batch_size).tolist()
    return {name: {mode: [scores[s] for s in slots] for mode, slots in modes.items()} for name, modes in layout.items()}


def area_under_curve(fractions: list[float], values: list[float]) -> float:
    """Trapezoidal area over ``r`` in ``[0, 1]``.

    >>> area_under_curve([0.0, 0.5, 1.0], [1.0, 0.5, 0.0])
    0.5
    """
    return float(np.trapezoid(values, fractions)) if hasattr(np, "trapezoid") else float(np.trapz(values, fractions))


def curve_summary(fractions: list[float], curves: dict[str, list[float]]) -> dict[str, float]:
    """AUCs and the reported points (probabilities, not x100) of one source's two curves."""
    out = {"deletion_auc": area_under_curve(fractions, curves["deletion"]),
           "insertion_auc": area_under_curve(fractions, curves["insertion"])}
    for mode, fraction in REPORTED_POINTS:
        out[f"{mode}_{round(fraction * 100)}"] = curves[mode][fractions.index(fraction)]
    return out
