"""The model-randomisation sanity check of a saliency method (Adebayo et al., 2018), cascading from the top.

The weights of the top language layers are replaced by random ones (matrices drawn from the model's
initialisation, ``N(0, initializer_range)``; norms and biases kept): the top layer, the top half, every
language layer, and last every language layer and the vision encoder. At each step the maps of the SAME
completions are recomputed and compared with the original by Spearman's rank correlation over the grid cells.
A map that explains the model must change when the model does: correlations near 1 fail the check.
The weights are restored afterwards, bit for bit.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

FAIL_CORRELATION = 0.5
"""A map whose mean rank correlation with the original stays at or above this with the whole model
randomised (the last step) fails the check."""


def cascade_levels(num_layers: int) -> list[tuple[str, int, bool]]:
    """The steps of the cascade: ``(name, top language layers randomised, vision encoder randomised too)``.

    >>> [name for name, _, _ in cascade_levels(28)], [name for name, _, _ in cascade_levels(2)]
    (['top_1', 'top_14', 'top_28', 'top_28+vision'], ['top_1', 'top_2', 'top_2+vision'])
    """
    counts = sorted({1, math.ceil(num_layers / 2), num_layers})
    return [(f"top_{count}", count, False) for count in counts] + [(f"top_{num_layers}+vision", num_layers, True)]


@contextlib.contextmanager
def randomised_top_layers(adapter, count: int, *, vision: bool = False, seed: int = 0):
    """Inside the block, the top ``count`` language layers (and with ``vision`` the vision encoder) hold random
    weight matrices (seeded: the same weights for every batch); the original weights are back on exit."""
    layers = list(adapter.text_model.layers)[-count:] + ([adapter.vision_encoder] if vision else [])
    std = getattr(getattr(adapter.model.config, "text_config", adapter.model.config), "initializer_range", 0.02)
    generator = torch.Generator().manual_seed(seed)
    saved = []
    with torch.no_grad():
        for layer in layers:
            for parameter in layer.parameters():
                if parameter.dim() < 2:
                    continue
                saved.append((parameter, parameter.detach().clone()))
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std
                parameter.copy_(noise.to(parameter.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, original in saved:
                parameter.copy_(original)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0
        start = end + 1
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two maps of the same shape (ties get their average rank); 0 when
    either map is constant (no ranking to compare).

    >>> spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0]))
    1.0
    >>> spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0]))
    -1.0
    """
    x = _average_ranks(a.detach().double().flatten().cpu().numpy())
    y = _average_ranks(b.detach().double().flatten().cpu().numpy())
    x, y = x - x.mean(), y - y.mean()
    norm = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / norm) if norm > 0 else 0.0
