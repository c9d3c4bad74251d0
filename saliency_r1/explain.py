"""One call that explains an answer: image(s) and a question in, an :class:`Explanation` out (the
completion, its spans, the maps, the per-token maps and the saliency reward when boxes are given).
The maps come from the engine, :mod:`saliency_r1.saliency`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saliency_r1.adapters import ModelAdapter, get_adapter
from saliency_r1.saliency import RolloutSaliency, generate_with_saliency
from saliency_r1.spans import Spans

__all__ = ["Explanation", "explain"]


@dataclass
class Explanation:
    """One answer explained (:func:`explain`).

    Attributes:
        text: the completion, special tokens kept.
        valid: whether it has a well-formed think/answer structure.
        maps: per image, the raw answer map ``[h', w']``; ``display_maps`` gives their ``relu``.
        think_tokens / answer_tokens: the decoded think and answer tokens, in order.
        image_sizes: per image, the original ``(H, W)`` in pixels (the map is stretched over it).
        reward: the saliency reward against ``boxes`` (float in ``[0, 1]``), or ``None`` without boxes.
        rollout: the full :class:`RolloutSaliency` of the one rollout (per-token maps, answer-to-think
            weights, spans, timings).
    """

    text: str
    valid: bool
    maps: list[torch.Tensor]
    think_tokens: list[str]
    answer_tokens: list[str]
    image_sizes: list[tuple[int, int]]
    images: list[Any]
    reward: float | None
    rollout: RolloutSaliency

    @property
    def spans(self) -> Spans:
        return self.rollout.spans[0]

    @property
    def display_maps(self) -> list[torch.Tensor]:
        return [m.clamp(min=0) for m in self.maps]


def _as_list(images) -> list:
    return list(images) if isinstance(images, (list, tuple)) else [images]


def explain(model: nn.Module, processor, image, question: str, *, boxes=None, system_prompt: str | None = None,
            path: str = "cot", max_new_tokens: int = 256, adapter: ModelAdapter | None = None,
            **generate_kwargs) -> Explanation:
    """Answer ``question`` about ``image`` and explain the answer with saliency maps.

    Args:
        model: a model served by an adapter, on CPU or GPU.
        processor: its processor (with a chat template).
        image: a PIL image, or a list of them (one map per image).
        question: the user's question.
        boxes: optional evidence boxes, normalised ``[x1, y1, x2, y2]`` in the original image (a list of boxes,
            or a Saliency-R1 string such as ``"[0.1,0.2,0.5,0.9]"``): the saliency reward is computed on the
            first image against them.
        system_prompt: system message; default: the project's reasoning prompt (``<think>`` then ``<answer>``).
        path: ``"cot"``, ``"direct"`` or ``"both"``.
        max_new_tokens: generation budget.
        adapter: defaults to ``get_adapter(model)``.
        generate_kwargs: passed to ``generate`` (default greedy: ``do_sample=False``).

    Returns:
        :class:`Explanation`, with the per-token maps and answer-to-think weights in ``.rollout``.
    """
    from saliency_r1.data.loader import parse_normalised_boxes
    from saliency_r1.prompts import chat_messages, system_prompt_or_default

    if boxes is not None:
        parse_normalised_boxes(boxes)  # before generating: the one validation of boxes
    adapter = adapter or get_adapter(model)
    images = _as_list(image)
    messages = chat_messages(adapter, question, system_prompt_or_default(system_prompt), len(images))
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    device = next(model.parameters()).device
    inputs = processor(text=[text], images=images, return_tensors="pt").to(device)
    generate_kwargs.setdefault("do_sample", False)
    rollout = generate_with_saliency(model, processor, inputs, adapter=adapter, path=path, details=True,
                                     max_new_tokens=max_new_tokens, **generate_kwargs)
    spans = rollout.spans[0]
    ids = rollout.completion_ids[0].tolist()
    tokenizer = getattr(processor, "tokenizer", processor)
    pieces = tokenizer.batch_decode([[ids[k]] for k in range(len(ids))], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    image_sizes = [(im.height, im.width) for im in images]
    reward = None if boxes is None else float(rollout.reward([boxes], [image_sizes[0]])[0])
    return Explanation(text=rollout.texts[0], valid=bool(rollout.valid[0]), maps=rollout.maps[0],
                       think_tokens=[pieces[k] for k in spans.think], answer_tokens=[pieces[k] for k in spans.answer],
                       image_sizes=image_sizes, images=images, reward=reward, rollout=rollout)
