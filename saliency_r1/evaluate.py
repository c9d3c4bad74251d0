"""Held-out evaluation: saliency-in-box fraction (energy-based pointing game), pointing-game rate,
accuracy and format validity of greedy completions, with a progress bar.

Every held-out sample counts in every rate: a completion without a well-formed think/answer
structure has an empty map, so it scores 0 saliency-in-box and a pointing-game miss.
"""

from __future__ import annotations

import contextlib

import torch


def evaluate(model, processor, dataset, *, system_prompt: str, limit: int | None = None, batch_size: int = 8,
             max_new_tokens: int = 64, path: str = "cot", progress: bool = True,
             bf16: bool = False, tolerance: float = 15.0) -> dict[str, float]:
    """Greedy completions on ``dataset`` with saliency, and their metrics.

    Args:
        model: the policy (unwrapped; a ``PeftModel`` works).
        processor: its processor.
        dataset: indexable records with ``image`` (PIL), ``problem``, ``solution``, ``bbox``.
        system_prompt: the system message of the prompts.
        limit: evaluate the first ``limit`` records (default: all).
        batch_size: prompts per generation call.
        max_new_tokens: completion length limit.
        path: saliency path (``cot``, ``direct``, ``both``).
        progress: show a tqdm bar.
        bf16: run generation under bf16 autocast (on a GPU).
        tolerance: pointing-game radius in pixels.

    Returns:
        ``{"saliency_in_box", "pointing_game", "accuracy", "format", "samples"}`` (rates in ``[0, 1]``;
        ``format`` is the fraction of well-formed completions).
    """
    from tqdm.auto import tqdm

    from saliency_r1.adapters import get_adapter
    from saliency_r1.data.loader import parse_normalised_boxes
    from saliency_r1.metrics import energy_in_boxes, pixel_boxes, pointing_game_hit
    from saliency_r1.prompts import prompt_inputs
    from saliency_r1.rewards import accuracy_reward
    from saliency_r1.saliency import generate_with_saliency

    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise ValueError("evaluate needs at least one record")
    device = next(model.parameters()).device
    adapter = get_adapter(model)
    totals = {"saliency_in_box": 0.0, "pointing_game": 0.0, "accuracy": 0.0, "format": 0.0}
    was_training = model.training
    model.eval()
    bar = tqdm(total=count, desc="evaluate", disable=not progress, leave=False)
    for start in range(0, count, batch_size):
        examples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        inputs = prompt_inputs(processor, adapter, examples, system_prompt).to(device)
        precision = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.no_grad(), precision:
            rollout = generate_with_saliency(model, processor, inputs, adapter=adapter, path=path, do_sample=False,
                                             max_new_tokens=max_new_tokens,
                                             suppress_tokens=adapter.vision_token_ids)
        totals["accuracy"] += sum(accuracy_reward(rollout.texts, solution=[e["solution"] for e in examples]))
        for maps, valid, spans, example in zip(rollout.maps, rollout.valid.tolist(), rollout.spans, examples):
            totals["format"] += spans.valid
            # Measured as the reward is paid (docs/method.md sections 4 and 7): an invalid completion misses.
            if not (valid and maps):
                continue
            width, height = example["image"].size
            boxes = pixel_boxes(parse_normalised_boxes(example["bbox"]), height, width)
            totals["saliency_in_box"] += energy_in_boxes(maps[0], (height, width), boxes)
            totals["pointing_game"] += pointing_game_hit(maps[0], (height, width), boxes, tolerance)
        bar.update(len(examples))
    bar.close()
    model.train(was_training)
    return {**{k: v / count for k, v in totals.items()}, "samples": count}
