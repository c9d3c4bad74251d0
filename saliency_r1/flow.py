"""The explanation page, ``flow.html``: one self-contained file (the script, the styles, the images and
the maps inline; a content-security policy that forbids every request) showing the completion, the
map over the image, the tokens and the flow from the answer through the reasoning to the image.

The page's maps are ``relu``'d and quantised to 1/255 of each map's peak (a few hundred KB for a
1,280-token image); the exact numbers are in ``explanation.json``. The page's script and styles are
``saliency_r1/assets/flow.html``; this module fills in the data.
"""

from __future__ import annotations

import base64
import io
import json
from importlib import resources

import numpy as np
import torch

COLORMAPS = ("viridis", "magma", "inferno", "plasma", "cividis", "gray", "turbo")
DEFAULT_COLORMAP = "viridis"  # perceptually uniform
DISPLAY_SIDE = 512  # the longest side of the image as the page embeds it (it shows 400 px)
TOKEN_MAP_CELLS = 400_000  # token-map cells the page holds at most (the most-read tokens keep theirs)
LINKS_PER_ANSWER = 3  # reasoning tokens drawn for each answer token, the most-read ones
MIN_LINK = 0.05  # of the strongest link: weaker ones are not drawn


def flow_page(explanations) -> str:
    """The page for one :class:`~saliency_r1.explain.Explanation`, or two side by side (the same controls
    drive both)."""
    template = resources.files("saliency_r1").joinpath("assets/flow.html").read_text(encoding="utf-8")
    data = {"panels": [_panel(e) for e in explanations], "colormaps": _colormaps(),
            "default_colormap": DEFAULT_COLORMAP}
    # Inside a <script>, "</" could close it: JSON allows the escaped form.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return template.replace("/*__DATA__*/null", payload)


def _quantised(values: torch.Tensor) -> dict:
    """``relu(values)`` as uint8 of its peak, base64: ``{"q": ..., "s": peak}``."""
    flat = values.detach().double().clamp(min=0).flatten().cpu()
    peak = float(flat.max()) if flat.numel() else 0.0
    q = (flat / peak * 255).round().to(torch.uint8) if peak > 0 else torch.zeros_like(flat, dtype=torch.uint8)
    return {"q": base64.b64encode(q.numpy().tobytes()).decode("ascii"), "s": peak}


def _image_uri(image) -> str:
    image = image.convert("RGB")
    scale = DISPLAY_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buffer = io.BytesIO()
    if max(image.size) >= 128:  # photographs: JPEG is a tenth of PNG's size
        image.save(buffer, format="JPEG", quality=85)
        kind = "jpeg"
    else:
        image.save(buffer, format="PNG")
        kind = "png"
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _colormaps() -> dict[str, str]:
    from matplotlib import colormaps

    out = {}
    for name in COLORMAPS:
        table = (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
        out[name] = base64.b64encode(table.tobytes()).decode("ascii")
    return out


def _invalid_reason(explanation) -> str:
    if explanation.spans.valid:
        return "its saliency inputs were not finite"
    text = explanation.text
    if "<think>" not in text or "</think>" not in text:
        return "no <think>...</think> reasoning"
    return "no well-formed answer after </think>"


def _panel(explanation) -> dict:
    rollout, spans = explanation.rollout, explanation.spans
    images = [{"src": _image_uri(image), "width": image.width, "height": image.height,
               "grid": list(grid), "map": _quantised(m)}
              for image, grid, m in zip(explanation.images, rollout.image_grids[0], explanation.maps)]
    kinds = {k: "think" for k in spans.think} | {k: "answer" for k in spans.answer}
    tokens = [{"text": text, "kind": kinds.get(k, "other"), "weight": 0.0, "maps": None}
              for k, text in enumerate(explanation.token_texts)]
    links = []
    if explanation.valid:
        for j, k in enumerate(spans.answer):
            tokens[k]["maps"] = [_quantised(maps[j]) for maps in rollout.answer_token_maps[0]]
        read = rollout.answer_to_think[0].double().cpu() if spans.think else torch.zeros(len(spans.answer), 0)
        if read.numel():
            totals = read.sum(0)
            for t, k in enumerate(spans.think):
                tokens[k]["weight"] = float(totals[t] / totals.max()) if totals.max() > 0 else 0.0
            # The most-read reasoning tokens keep their maps when all would not fit.
            cells = sum(h * w for h, w in rollout.image_grids[0])
            kept = torch.argsort(totals, descending=True)[:max(1, TOKEN_MAP_CELLS // max(cells, 1))].tolist()
            for t in kept:
                tokens[spans.think[t]]["maps"] = [_quantised(maps[t]) for maps in rollout.think_token_maps[0]]
            strongest = float(read.max())
            for a, k in enumerate(spans.answer):
                for t in torch.argsort(read[a], descending=True)[:LINKS_PER_ANSWER].tolist():
                    if strongest > 0 and read[a, t] >= MIN_LINK * strongest:
                        links.append([k, spans.think[t], round(float(read[a, t]) / strongest, 4)])
    elif explanation.token_maps is not None:
        direct = explanation.token_maps
        for j, k in enumerate(direct.spans[0].answer):
            tokens[k]["kind"] = "direct"
            tokens[k]["maps"] = [_quantised(maps[j]) for maps in direct.answer_token_maps[0]]
    return {"model": explanation.model_name, "question": explanation.question, "completion": explanation.text,
            "valid": explanation.valid, "invalid_reason": "" if explanation.valid else _invalid_reason(explanation),
            "path": rollout.path, "reward": explanation.reward, "pointing_hit": explanation.pointing_hit,
            "timings": explanation.timings, "boxes": explanation.boxes or [], "images": images, "tokens": tokens,
            "links": links}
