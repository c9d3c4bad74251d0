"""The tiny model's cold start: supervised steps on worked completions of the synthetic set, as
the paper starts GRPO from a cold-start SFT. A real checkpoint brings its own."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saliency_r1.adapters import get_adapter
from saliency_r1.boxes import PixelBox
from saliency_r1.capture import text_attention
from saliency_r1.logps import completion_logps, pad_completions
from saliency_r1.prompts import image_rows, prompt_inputs, select_rows, system_prompt_or_default


def cold_start_set(data, size: int) -> tuple[list[dict], list[str], list[int]]:
    """The cold start's fixed set, as a real cold start is: the first ``size`` examples of ``data``,
    each with one worked completion whose reasoning names an object drawn once per image (the
    target for a third of them with three objects, so where the policy looks is left for GRPO).
    With this set, naming the target puts the map on it (two model seeds); drawing a fresh object
    at every visit instead gave cold starts where naming the target barely moves the map, or
    moves it away (bench/RESULTS.md, evidence point 8).

    Returns:
        the examples, their worked completions, and the index (into ``example["objects"]``) of the
        object each completion names.
    """
    from saliency_r1.data.synthetic import worked_completion

    if not hasattr(data, "config"):
        raise ValueError("cold_start_steps needs the synthetic set (its reasoning can be written out)")
    examples = [data[i] for i in range(min(size, len(data)))]
    named = [random.Random(i).randrange(len(example["objects"])) for i, example in enumerate(examples)]
    texts = [worked_completion(example, index) for example, index in zip(examples, named)]
    return examples, texts, named


# The worked completion is ``<think> colour attribute </think> ...``: completion token 1, the colour,
# is the row that predicts the attribute, so it is the row that must read the named object.
NAMING_TOKEN = 1


def box_coverage(box_pixels: PixelBox, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The fraction of each image token's cell inside a box, ``[h' * w']`` in raster order.

    Args:
        box_pixels: inclusive ``(x_lo, y_lo, x_hi, y_hi)`` pixels of the image as drawn.
        image_size: ``(height, width)`` of the image as drawn.
        grid: the merged token grid ``(h', w')``, taken to cover the whole image in equal cells. Exact
            when the processor keeps the image's size (sides that are multiples of the 28-px cell, as
            the synthetic set's 112 px); otherwise its resize rounds the sides and this is close.
    """
    height, width = image_size
    x_lo, y_lo, x_hi, y_hi = box_pixels
    mask = torch.zeros(1, 1, height, width)
    mask[..., y_lo:y_hi + 1, x_lo:x_hi + 1] = 1
    return F.adaptive_avg_pool2d(mask, grid).flatten()


def named_coverage(examples: list[dict], named: list[int], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per example, :func:`box_coverage` of the object its worked completion names (:func:`cold_start_set`)."""
    return [box_coverage(example["objects"][index][3], (example["image"].height, example["image"].width), grid)
            for example, index, grid in zip(examples, named, grids)]


@contextlib.contextmanager
def recorded_attention(model):
    """Eager attention in the language layers while inside; yields a list that each forward fills with
    every layer's attention probabilities ``[B, H, S, S]`` (part of the autograd graph)."""
    adapter = get_adapter(model)
    recorded: list[torch.Tensor] = []

    def record(_module, _inputs, output):
        if output[1] is None:
            raise RuntimeError(f"{type(model).__name__} returned no attention probabilities under eager attention")
        recorded.append(output[1])

    handles = [module.register_forward_hook(record) for module in adapter.attention_modules]
    try:
        with text_attention(model, "eager", adapter):
            yield recorded
    finally:
        for handle in handles:
            handle.remove()


def grounding_loss(attention: list[torch.Tensor], image_positions: list[torch.Tensor], naming_position: int,
                   coverage: list[torch.Tensor]) -> torch.Tensor:
    """``-log`` of the share of the naming row's image attention inside the named object's box (at least
    1e-6), averaged over examples, layers and heads.

    Args:
        attention: per layer, ``[B, H, S, S]`` probabilities of ``B`` examples.
        image_positions: per example, the positions of its image tokens.
        naming_position: the position of the row that names the object (the same in every example).
        coverage: per example, each image token's fraction inside the box (:func:`box_coverage`).
    """
    losses = []
    for b, (positions, inside) in enumerate(zip(image_positions, coverage)):
        on_image = torch.stack([layer[b, :, naming_position, positions] for layer in attention]).float()  # [L, H, N]
        share = (on_image @ inside.float()) / on_image.sum(-1)
        losses.append(-share.clamp_min(1e-6).log().mean())
    return torch.stack(losses).mean()


def cold_start(model, processor, data, cfg, device) -> list[float]:
    """Supervised steps on worked completions of the synthetic set: the policy learns the
    ``<think>/<answer>`` format and to name an object of the image and read it before answering.
    The set (:func:`cold_start_set`) is cycled in order, ``cold_start_batch`` examples a step.

    With ``cfg.cold_start_grounding`` > 0 the loss adds that weight times :func:`grounding_loss`: the
    row that names an object learns to look at it, in every layer and head, standing in for the grounding
    a pre-trained VLM is expected to bring; without it the tiny model's reasoning may read the image as a
    bag of features and the saliency reward has nothing to pull (docs/method.md, section 6).

    Returns:
        the loss of every step (the grounding term included).
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.cold_start_lr)
    tokenizer = processor.tokenizer
    adapter = get_adapter(model)
    examples, texts, named = cold_start_set(data, cfg.cold_start_size)
    completions = [torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                   for text in texts]
    # The processor is most of a tiny step's time: run it once over the set, then pick rows.
    prompts = prompt_inputs(processor, adapter, examples, system_prompt_or_default(cfg.system_prompt))
    pixel_rows = image_rows(prompts)
    grounding = cfg.cold_start_grounding > 0
    if grounding:
        for example, index, completion in zip(examples, named, completions):
            colour = example["objects"][index][0]
            if tokenizer.decode(completion[NAMING_TOKEN]).strip() != colour:
                raise ValueError(f"cold_start_grounding: expected the colour {colour!r} as completion token "
                                 f"{NAMING_TOKEN}, right after <think>, got {tokenizer.decode(completion[:3])!r}")
        grids = adapter.image_grids(prompts["image_grid_thw"])
        coverage = [c.to(device) for c in named_coverage(examples, named, grids)]
        image_positions = [p.to(device) for p in adapter.image_positions(prompts["input_ids"])]
    batches = [list(range(i, min(i + cfg.cold_start_batch, len(examples))))
               for i in range(0, len(examples), cfg.cold_start_batch)]
    model.train()
    losses = []
    with recorded_attention(model) if grounding else contextlib.nullcontext() as attention:
        for step in tqdm(range(cfg.cold_start_steps), desc="cold start", disable=not cfg.progress, leave=False):
            picks = batches[step % len(batches)]
            prompt = {k: v.to(device) for k, v in select_rows(prompts, picks, pixel_rows).items()}
            completion_ids, mask = pad_completions([completions[i] for i in picks], tokenizer.pad_token_id, device)
            logps = completion_logps(model, prompt, completion_ids, mask, 1.0)
            loss = -(logps * mask).sum() / mask.sum()
            if grounding:
                # The set's prompts are left-padded to one length, so the naming row's position is shared.
                loss = loss + cfg.cold_start_grounding * grounding_loss(
                    attention, [image_positions[i] for i in picks], prompt["input_ids"].shape[1] + NAMING_TOKEN,
                    [coverage[i] for i in picks])
                attention.clear()
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
