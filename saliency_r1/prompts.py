"""Prompts: the system prompt that asks for ``<think>`` reasoning and an ``<answer>``, and the
processor inputs of a batch of records (chat template, one image each, left-padded)."""

from __future__ import annotations

import torch

SYSTEM_PROMPT = (
    "You are a helpful assistant. First think about the question step by step inside <think> </think>, "
    "looking at the relevant part of the image, then give the final answer inside <answer> </answer>."
)


def system_prompt_or_default(system_prompt: str | None) -> str:
    """``system_prompt``, or :data:`SYSTEM_PROMPT` when it is ``None``."""
    return SYSTEM_PROMPT if system_prompt is None else system_prompt


def chat_messages(adapter, question: str, system_prompt: str, num_images: int = 1) -> list[dict]:
    """The system message and one user turn holding ``num_images`` images and ``question``."""
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": adapter.user_content(question, num_images)}]


def prompt_texts(processor, adapter, examples: list[dict], system_prompt: str) -> list[str]:
    """Each record's prompt as the chat template renders it (one image placeholder, the generation prompt)."""
    return [processor.apply_chat_template(chat_messages(adapter, example["problem"], system_prompt), tokenize=False,
                                          add_generation_prompt=True) for example in examples]


def prompt_inputs(processor, adapter, examples: list[dict], system_prompt: str, repeat: int = 1):
    """Processor inputs of ``examples``' prompts, each repeated ``repeat`` times in a row (a GRPO group).

    Args:
        processor: the model's processor (chat template, tokenizer, image processor).
        adapter: the model's :class:`~saliency_r1.adapters.ModelAdapter` (the chat template's image part).
        examples: records with ``image`` (PIL) and ``problem``.
        system_prompt: the system message.
        repeat: copies of each prompt, adjacent.

    Returns:
        left-padded ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw`` (and the
        family's per-token type ids where it has them).
    """
    texts = [text for text in prompt_texts(processor, adapter, examples, system_prompt) for _ in range(repeat)]
    images = [[example["image"]] for example in examples for _ in range(repeat)]
    processor.tokenizer.padding_side = "left"  # generation appends after the prompt
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def image_rows(inputs) -> list[slice]:
    """Each sample's rows of ``pixel_values`` (one image per sample, ``t*h*w`` patches each)."""
    counts = inputs["image_grid_thw"].prod(-1).tolist()
    if len(counts) != inputs["input_ids"].shape[0]:
        raise ValueError(f"expected one image per prompt, got {len(counts)} images for "
                         f"{inputs['input_ids'].shape[0]} prompts")
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def select_rows(inputs, rows: list[int], pixel_rows: list[slice]) -> dict:
    """The samples ``rows`` of a batch of prompt inputs, their pixel rows included."""
    picked = {k: v[rows] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    picked["pixel_values"] = torch.cat([inputs["pixel_values"][pixel_rows[r]] for r in rows])
    picked["image_grid_thw"] = inputs["image_grid_thw"][rows]
    return picked
