"""Evaluation of one model on held-out samples: per sample, the greedy completion, its format, accuracy,
energy-based pointing game (saliency-in-box) and pointing-game hit (``docs/method.md`` section 7), and
on request the faithfulness curves of every map source (section 8) and the model-randomisation check.

Every held-out sample counts in every rate: a completion without a well-formed think/answer
structure has an empty map, so it scores 0 saliency-in-box and a pointing-game miss. Faithfulness
and the randomisation check are measured on the well-formed completions only (an invalid completion
has no answer whose probability to follow, and no map).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from saliency_r1.faithfulness import FaithfulnessOptions

RATES = ("format", "accuracy", "saliency_in_box", "pointing_game")


@dataclass(frozen=True)
class EvaluationOptions:
    """What is generated and measured.

    Args:
        system_prompt: the system message of the prompts.
        max_new_tokens: completion length limit.
        path: saliency path of the reported map (``cot``, ``direct``, ``both``).
        tolerance: pointing-game radius in pixels.
        bf16: generation under bf16 autocast (on a GPU).
        faithfulness: draw the deletion and insertion curves of every map source (``None``: not measured).
        sanity: run the model-randomisation check on the reported map.
        seed: seed of the randomised weights of the sanity check.
    """

    system_prompt: str
    max_new_tokens: int = 64
    path: str = "cot"
    tolerance: float = 15.0
    bf16: bool = False
    faithfulness: FaithfulnessOptions | None = None
    sanity: bool = False
    seed: int = 0


def evaluate_batch(model, processor, examples: list[dict], indices: list[int], options: EvaluationOptions) -> list[dict]:
    """One record per example: ``index``, ``completion``, ``valid``, ``format``, ``accuracy``,
    ``saliency_in_box``, ``pointing_game`` (and ``faithfulness``, ``sanity`` when asked; ``None`` for a
    completion they are not measured on).

    Args:
        model: the policy (unwrapped; a ``PeftModel`` works), in eval mode.
        processor: its processor.
        examples: records with ``image`` (PIL), ``problem``, ``solution``, ``bbox``.
        indices: each example's index in its data set (kept in the record).
        options: see :class:`EvaluationOptions`.
    """
    from saliency_r1.adapters import get_adapter
    from saliency_r1.data.loader import parse_normalised_boxes
    from saliency_r1.metrics import energy_in_boxes, pixel_boxes, pointing_game_hit
    from saliency_r1.prompts import prompt_inputs
    from saliency_r1.rewards import accuracy_reward
    from saliency_r1.saliency import generate_with_saliency

    device = next(model.parameters()).device
    adapter = get_adapter(model)
    inputs = prompt_inputs(processor, adapter, examples, options.system_prompt).to(device)
    precision = torch.autocast(device.type, dtype=torch.bfloat16) if options.bf16 else contextlib.nullcontext()
    with torch.no_grad(), precision:
        rollout = generate_with_saliency(model, processor, inputs, adapter=adapter, path=options.path, do_sample=False,
                                         max_new_tokens=options.max_new_tokens,
                                         suppress_tokens=adapter.vision_token_ids)
    accuracy = accuracy_reward(rollout.texts, solution=[e["solution"] for e in examples])
    records = []
    for b, (example, index) in enumerate(zip(examples, indices)):
        maps, valid = rollout.maps[b], bool(rollout.valid[b]) and bool(rollout.maps[b])
        record = {"index": index, "completion": rollout.texts[b], "valid": valid, "format": bool(rollout.spans[b].valid),
                  "accuracy": accuracy[b], "saliency_in_box": 0.0, "pointing_game": False}
        if valid:  # measured as the reward is paid (docs/method.md sections 4 and 7): an invalid completion misses
            width, height = example["image"].size
            boxes = pixel_boxes(parse_normalised_boxes(example["bbox"]), height, width)
            record["saliency_in_box"] = energy_in_boxes(maps[0], (height, width), boxes)
            record["pointing_game"] = pointing_game_hit(maps[0], (height, width), boxes, options.tolerance)
        records.append(record)
    if options.faithfulness is not None:
        _add_faithfulness(model, processor, adapter, examples, inputs, rollout, records, options)
    if options.sanity:
        _add_sanity(model, processor, adapter, inputs, rollout, records, options)
    return records


def _add_faithfulness(model, processor, adapter, examples, inputs, rollout, records, options) -> None:
    """Every map source of the well-formed completions from one teacher-forced capture, then their curves."""
    from saliency_r1.faithfulness import curve_summary, deletion_insertion, source_rankings
    from saliency_r1.saliency import PATHS, saliency_for_completions_by_path

    faithful = options.faithfulness
    with torch.no_grad():
        by_path = saliency_for_completions_by_path(model, processor, inputs, rollout.completion_ids, paths=PATHS,
                                                   adapter=adapter, attention=True, spans=rollout.spans)
    attention = by_path[PATHS[0]].answer_attention_maps
    for b, (example, record) in enumerate(zip(examples, records)):
        record["faithfulness"] = None
        if not record["valid"]:
            continue
        image = example["image"]
        grid_maps = {path: by_path[path].maps[b][0] for path in PATHS} | {"attention": attention[b][0]}
        rankings = source_rankings(grid_maps, (image.height, image.width), seed=faithful.seed, index=record["index"])
        spans = rollout.spans[b]
        curves = deletion_insertion(model, processor, adapter, image, example["problem"], rollout.completion_ids[b],
                                    spans.answer, rankings, faithful, system_prompt=options.system_prompt)
        record["faithfulness"] = {name: {**curve_summary(faithful.fractions, curve), **curve}
                                  for name, curve in curves.items()}


def _add_sanity(model, processor, adapter, inputs, rollout, records, options) -> None:
    """Rank correlation of each well-formed completion's map with its map under randomised top layers."""
    from saliency_r1.saliency import saliency_for_completions
    from saliency_r1.sanity import cascade_levels, randomised_top_layers, spearman

    for record in records:
        record["sanity"] = {} if record["valid"] else None
    for name, count, vision in cascade_levels(adapter.num_layers):
        with randomised_top_layers(adapter, count, vision=vision, seed=options.seed), torch.no_grad():
            randomised = saliency_for_completions(model, processor, inputs, rollout.completion_ids, adapter=adapter,
                                                  path=options.path, spans=rollout.spans)
        for b, record in enumerate(records):
            if record["valid"]:
                record["sanity"][name] = spearman(rollout.maps[b][0], randomised.maps[b][0])


def aggregate(records: list[dict]) -> dict[str, float]:
    """The mean of every rate over ``records`` (and ``samples``, their count)."""
    if not records:
        raise ValueError("no records to aggregate")
    return {**{rate: sum(float(r[rate]) for r in records) / len(records) for rate in RATES}, "samples": len(records)}


def evaluate(model, processor, dataset, *, system_prompt: str, limit: int | None = None, batch_size: int = 8,
             max_new_tokens: int = 64, path: str = "cot", progress: bool = True,
             bf16: bool = False, tolerance: float = 15.0) -> dict[str, float]:
    """Greedy completions on ``dataset`` with saliency, and their rates (the training loop's held-out check).

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

    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise ValueError("evaluate needs at least one record")
    options = EvaluationOptions(system_prompt=system_prompt, max_new_tokens=max_new_tokens, path=path,
                                tolerance=tolerance, bf16=bf16)
    was_training = model.training
    model.eval()
    records = []
    with tqdm(total=count, desc="evaluate", disable=not progress, leave=False) as bar:
        for start in range(0, count, batch_size):
            indices = list(range(start, min(start + batch_size, count)))
            records += evaluate_batch(model, processor, [dataset[i] for i in indices], indices, options)
            bar.update(len(indices))
    model.train(was_training)
    return aggregate(records)
