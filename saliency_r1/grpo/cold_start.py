"""The tiny model's cold start: supervised steps on worked completions of the synthetic set, as
the paper starts GRPO from a cold-start SFT. A real checkpoint brings its own."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saliency_r1.adapters import get_adapter
from saliency_r1.logps import completion_logps, pad_completions
from saliency_r1.prompts import image_rows, prompt_inputs, select_rows, system_prompt_or_default


def cold_start_set(data, size: int) -> tuple[list[dict], list[str]]:
    """The cold start's fixed set, as a real cold start is: the first ``size`` examples of ``data``,
    each with one worked completion whose reasoning names an object drawn once per image (the
    target for a third of them with three objects, so where the policy looks is left for GRPO).
    With this set, naming the target puts the map on it (two model seeds); drawing a fresh object
    at every visit instead gave cold starts where naming the target barely moves the map, or
    moves it away (bench/RESULTS.md, evidence point 8)."""
    from saliency_r1.data.synthetic import worked_completion

    if not hasattr(data, "config"):
        raise ValueError("cold_start_steps needs the synthetic set (its reasoning can be written out)")
    examples = [data[i] for i in range(min(size, len(data)))]
    texts = [worked_completion(example, random.Random(i).randrange(len(example["objects"])))
             for i, example in enumerate(examples)]
    return examples, texts


def cold_start(model, processor, data, cfg, device) -> list[float]:
    """Supervised steps on worked completions of the synthetic set: the policy learns the
    ``<think>/<answer>`` format and to name an object of the image and read it before answering.
    The set (:func:`cold_start_set`) is cycled in order, ``cold_start_batch`` examples a step.

    Returns:
        the loss of every step.
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.cold_start_lr)
    eos = processor.tokenizer.eos_token_id
    examples, texts = cold_start_set(data, cfg.cold_start_size)
    completions = [torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
                   for text in texts]
    # The processor is most of a tiny step's time: run it once over the set, then pick rows.
    prompts = prompt_inputs(processor, get_adapter(model), examples, system_prompt_or_default(cfg.system_prompt))
    pixel_rows = image_rows(prompts)
    batches = [list(range(i, min(i + cfg.cold_start_batch, len(examples))))
               for i in range(0, len(examples), cfg.cold_start_batch)]
    model.train()
    losses = []
    for step in tqdm(range(cfg.cold_start_steps), desc="cold start", disable=not cfg.progress, leave=False):
        picks = batches[step % len(batches)]
        prompt = {k: v.to(device) for k, v in select_rows(prompts, picks, pixel_rows).items()}
        completion_ids, mask = pad_completions([completions[i] for i in picks], processor.tokenizer.pad_token_id,
                                               device)
        logps = completion_logps(model, prompt, completion_ids, mask, 1.0)
        loss = -(logps * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # milliseconds of tiny-model steps: a sync per step is immaterial here
    model.eval()
    return losses


def export_cold_start(cfg, directory: str | Path) -> Path:
    """Builds the tiny model, runs ``cfg.cold_start_steps`` of cold start and saves model and
    processor to ``directory`` (``save_pretrained``), so that runs can start from it with
    ``--model DIRECTORY --cold-start-steps 0`` (the evidence runs and the tests share one)."""
    from saliency_r1.data.sets import load_data
    from saliency_r1.models import load_policy

    directory = Path(directory)
    if cfg.model is not None:
        raise ValueError("export_cold_start builds the tiny model: leave cfg.model unset")
    model, processor = load_policy(cfg)
    train_data, _ = load_data(cfg)
    cold_start(model, processor, train_data, cfg, torch.device("cpu"))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
