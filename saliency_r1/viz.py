"""Pictures of an explanation: saliency over the image, what each reasoning token looked at, and which
reasoning tokens the answer read.

Everything draws on ``matplotlib.figure.Figure`` objects (no pyplot state, any backend) and
:func:`save_png` writes them. Maps are shown as docs/method.md section 4 stretches them for the reward:
``relu``, then bilinear upsampling with half-pixel centres over the original image.

>>> fig = plot_explanation(explanation)          # doctest: +SKIP
>>> save_png(fig, "explanation.png")              # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from saliency_r1.metrics import upsample

HEAT_CMAP = "jet"
TEXT_CMAP = "Oranges"


def upsample_map(saliency: torch.Tensor, height: int, width: int) -> np.ndarray:
    """``relu(saliency)`` (``[h', w']``) stretched over ``height x width`` pixels (bilinear, half-pixel centres)."""
    if saliency.dim() != 2:
        raise ValueError(f"saliency must be [h', w'], got shape {tuple(saliency.shape)}")
    return upsample(saliency, height, width).cpu().numpy()


def _normalised_boxes(boxes) -> list[tuple[float, float, float, float]]:
    from saliency_r1.boxes import parse_boxes

    return [] if boxes is None else list(parse_boxes(boxes))


def _figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas: text extents can be measured while drawing, and it saves as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def overlay(ax, image, saliency: torch.Tensor, *, boxes=None, alpha: float = 0.5, title: str | None = None,
            stretch: str = "peak", colorbar: bool = False) -> None:
    """Draw ``image`` with its saliency map on top (and the evidence boxes, normalised ``[x1, y1, x2, y2]``),
    with a colour bar of the map's values when ``colorbar``.

    ``stretch``: ``"peak"`` maps ``0..max`` to the colour scale (saliency: zero means no evidence);
    ``"range"`` maps ``min..max`` (attention maps, which are positive everywhere and often nearly flat).
    """
    if stretch not in ("peak", "range"):
        raise ValueError(f"stretch must be 'peak' or 'range', got {stretch!r}")
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    heat = upsample_map(saliency, height, width)
    low = float(heat.min()) if stretch == "range" else 0.0
    peak = float(heat.max())
    ax.imshow(pixels)
    if peak > low:
        shown = ax.imshow(heat, cmap=HEAT_CMAP, alpha=alpha, vmin=low, vmax=peak)
        if colorbar:
            bar = ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, format="%.2g")
            bar.ax.tick_params(labelsize=7)
    for x1, y1, x2, y2 in _normalised_boxes(boxes):
        ax.add_patch(Rectangle((x1 * width, y1 * height), (x2 - x1) * width, (y2 - y1) * height,
                               fill=False, edgecolor="white", linewidth=2, linestyle="--"))
    ax.set_title(title if title is not None else ("answer saliency" if peak > 0 else "answer saliency (empty)"),
                 fontsize=9)
    ax.set_axis_off()


def token_heat(ax, tokens: Sequence[str], weights: Sequence[float], *, title: str | None = None,
               fontsize: int = 11) -> None:
    """Write ``tokens`` as running text, each on a background whose colour is its weight (0 to the maximum)."""
    from matplotlib import colormaps

    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=fontsize + 1, loc="left")
    if not tokens:
        ax.text(0.0, 0.9, "(no reasoning tokens)", fontsize=fontsize, transform=ax.transAxes, va="top")
        return
    weights = np.asarray(weights, dtype=np.float64)
    top = weights.max() if weights.size and weights.max() > 0 else 1.0
    cmap = colormaps[TEXT_CMAP]
    figure = ax.figure
    renderer = figure.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    x, y, line = 0.0, 1.0, 1.6 * fontsize / box.height
    for token, weight in zip(tokens, weights):
        shown = token.replace("\n", "\\n") or " "
        text = ax.text(x, y, shown, fontsize=fontsize, transform=ax.transAxes, va="top", ha="left",
                       bbox=dict(boxstyle="square,pad=0.1", facecolor=cmap(0.7 * weight / top), edgecolor="none"))
        extent = text.get_window_extent(renderer)
        advance = extent.width / box.width
        if x > 0 and x + advance > 1.0:  # wrap: move the token to the next line
            x, y = 0.0, y - line
            text.set_position((x, y))
        x += advance
    ax.set_ylim(0, 1)


def plot_explanation(explanation, *, boxes=None, max_think_maps: int = 8) -> Figure:
    """One figure for an :class:`~saliency_r1.explain.Explanation`.

    Top row: the image, then each image with its answer map (and ``boxes``); middle row: where the reasoning
    tokens the answer read most looked (``alpha(t -> image)`` of the first image, at most ``max_think_maps``,
    in reading order, titled with their answer-to-think weight); bottom: the reasoning text shaded by how
    much the answer read each token, and the answer.
    """
    rollout = explanation.rollout
    images = explanation.images
    think_maps = rollout.think_token_maps[0] if rollout.think_token_maps is not None else []
    weights = (rollout.answer_to_think[0].sum(0) if rollout.answer_to_think is not None
               else torch.zeros(len(explanation.think_tokens)))
    chosen = sorted(torch.argsort(weights, descending=True)[:max_think_maps].tolist()) if weights.numel() else []
    figure = _figure(2.3 * max(len(chosen), len(images) + 1, 4), 7.0)
    # Fixed margins (no layout engine): the text wrapping measures the axes as they will be drawn.
    outer = figure.add_gridspec(3, 1, height_ratios=[3.2, 2.0, 0.8], left=0.02, right=0.93, top=0.95,
                                bottom=0.02, hspace=0.3)
    top = outer[0].subgridspec(1, len(images) + 1, wspace=0.05)
    ax = figure.add_subplot(top[0, 0])
    ax.imshow(np.asarray(images[0].convert("RGB")))
    ax.set_title("image" if len(images) == 1 else "image 1", fontsize=9)
    ax.set_axis_off()
    for j, (image, saliency) in enumerate(zip(images, explanation.maps)):
        title = f"answer saliency, image {j + 1}" if len(images) > 1 else "answer saliency"
        if j == 0 and explanation.reward is not None:
            title += f" (reward {explanation.reward:.2f})"
        overlay(figure.add_subplot(top[0, j + 1]), image, saliency, boxes=boxes if j == 0 else None, title=title,
                colorbar=True)
    if chosen:
        strip = outer[1].subgridspec(1, len(chosen), wspace=0.05)
        for j, t in enumerate(chosen):
            overlay(figure.add_subplot(strip[0, j]), images[0], think_maps[0][t], alpha=0.6, stretch="range",
                    title=f"where {explanation.think_tokens[t].strip()!r} looked (read {float(weights[t]):.2f})")
    else:
        ax = figure.add_subplot(outer[1])
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no reasoning tokens to show" if explanation.valid else "invalid completion: no saliency",
                ha="center", va="center", fontsize=10)
    text_ax = figure.add_subplot(outer[2])
    answer = "".join(explanation.answer_tokens).strip()
    token_heat(text_ax, explanation.think_tokens, weights.tolist(),
               title=f"reasoning, shaded by answer-to-think weight  |  answer: {answer or '(none)'}")
    return figure


def plot_rollout_maps(rollout, index: int, images: Sequence, *, boxes=None) -> Figure:
    """The answer map of each image of rollout ``index`` of a :class:`~saliency_r1.explain.RolloutSaliency`
    (``images``: that rollout's images), titled with its validity: for logging during training."""
    maps = rollout.maps[index]
    figure = _figure(3.0 * len(maps), 3.2)
    for j, (image, saliency) in enumerate(zip(images, maps)):
        status = "valid" if float(rollout.valid[index]) > 0 else "invalid"
        overlay(figure.add_subplot(1, len(maps), j + 1), image, saliency, boxes=boxes if j == 0 else None,
                title=f"rollout {index}, image {j + 1} ({status})")
    return figure


def save_png(figure: Figure, path, dpi: int = 110) -> None:
    """Write ``figure`` (made here, on an Agg canvas) as a PNG file."""
    figure.savefig(path, format="png", dpi=dpi)
