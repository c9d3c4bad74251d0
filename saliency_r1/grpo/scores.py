"""Scoring a batch of rollouts in the GRPO loop: each reward component per rollout, as device
tensors (no host sync), and the pointing-game rate at log steps."""

from __future__ import annotations

import importlib
import math

import torch


def load_reward_callable(spec: str):
    """``"module:function"`` to the callable."""
    from saliency_r1.errors import ConfigError

    module, _, name = spec.partition(":")
    if not name:
        raise ConfigError(f"--extra-rewards {spec!r} must be written 'module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"--extra-rewards {spec!r}: {error}") from None


def score_rollouts(rollout, examples: list[dict], extra: list) -> dict[str, torch.Tensor]:
    """Each reward component per rollout (float32 ``[B]``, on the maps' device), unweighted.

    ``format`` is the one well-formedness predicate of each completion (``docs/method.md`` section 2); the
    saliency reward is multiplied by the rollout's validity, which is that predicate and finite saliency. ``extra`` callables take TRL's form
    and also receive ``saliency_maps`` and ``saliency_valid``.

    Nothing here waits for the device: the engine's maps are finite (a rollout whose saliency is not
    is invalid, with a zero map), boxes and sizes are checked on the host, so the reward op runs without
    its own value check, whose read would be a second synchronisation of the step.
    """
    from saliency_r1.rewards import accuracy_reward, saliency_in_box

    device = rollout.valid.device
    columns = {"solution": [e["solution"] for e in examples], "bbox": [e["bbox"] for e in examples],
               "image": [e["image"] for e in examples]}
    sizes = [(e["image"].height, e["image"].width) for e in examples]
    well_formed = torch.tensor([float(s.valid) for s in rollout.spans], device=device)
    scores = {"format": well_formed,
              "accuracy": torch.tensor(accuracy_reward(rollout.texts, **columns), device=device),
              "saliency": saliency_in_box([maps[0] for maps in rollout.maps], columns["bbox"], sizes,
                                          valid=rollout.valid, check=False)}
    for fn in extra:
        name = getattr(fn, "__name__", "extra")
        values = fn(completions=rollout.texts, saliency_maps=rollout.maps, saliency_valid=rollout.valid, **columns)
        scores[name] = torch.tensor([math.nan if v is None else v for v in values], device=device, dtype=torch.float32)
    return scores


def pointing_rate(rollout, examples: list[dict]) -> float:
    """Pointing-game hit rate over the rollouts, an invalid rollout a miss (host-side; log steps only)."""
    from saliency_r1.data.loader import parse_normalised_boxes
    from saliency_r1.metrics import pixel_boxes, pointing_game_hit

    hits = 0
    for maps, valid, example in zip(rollout.maps, rollout.valid.tolist(), examples):
        width, height = example["image"].size
        if valid and maps:
            boxes = pixel_boxes(parse_normalised_boxes(example["bbox"]), height, width)
            hits += pointing_game_hit(maps[0], (height, width), boxes)
    return hits / max(1, len(examples))
