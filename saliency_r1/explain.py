"""One call that explains an answer: image(s) and a question in, an :class:`Explanation` out (the
completion, its spans, the maps, the per-token maps, the flow from the answer through the reasoning
to the image, and the saliency reward when boxes are given). The maps come from the engine,
:mod:`saliency_r1.saliency`; :meth:`Explanation.save` writes the picture, the interactive page and the
numbers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliency_r1.adapters import ModelAdapter, get_adapter
from saliency_r1.saliency import RolloutSaliency, generate_with_saliency, saliency_for_completions
from saliency_r1.spans import Spans, end_of_turn_ids

__all__ = ["Explanation", "completion_token_ids", "explain"]


@dataclass
class Explanation:
    """One answer explained (:func:`explain`).

    Attributes:
        text: the completion, special tokens kept.
        valid: whether it has a well-formed think/answer structure (and finite saliency).
        maps: per image, the raw answer map ``[h', w']``; ``display_maps`` gives their ``relu``.
        think_tokens / answer_tokens: the decoded think and answer tokens, in order.
        image_sizes: per image, the original ``(H, W)`` in pixels (the map is stretched over it).
        images: the images explained.
        reward: the saliency reward against ``boxes`` (float in ``[0, 1]``), or ``None`` without boxes.
        rollout: the full :class:`RolloutSaliency` of the one rollout (per-token maps, answer-to-think
            weights, spans, timings).
        question, model_name, system_prompt: what was asked, of which model, under which system message.
        prompt_text, prompt_ids: the exact prompt (chat template applied) and its token ids, with which
            anyone can recompute the maps.
        boxes: the normalised evidence boxes, or ``None``.
        pointing_hit: the pointing game on the first image's map (15 px), or ``None`` without boxes.
        token_texts: every completion token decoded on its own.
        token_maps: for a completion that is not well formed, the ``direct`` path's maps with every
            completion token taken as an answer token (labelled as such wherever shown); else ``None``.
        timings: seconds: ``"generate"`` or ``"forward"``, ``"saliency"``, ``"total"``.
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
    question: str = ""
    model_name: str = ""
    system_prompt: str = ""
    prompt_text: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    boxes: list[list[float]] | None = None
    pointing_hit: bool | None = None
    token_texts: list[str] = field(default_factory=list)
    token_maps: RolloutSaliency | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def spans(self) -> Spans:
        return self.rollout.spans[0]

    @property
    def display_maps(self) -> list[torch.Tensor]:
        return [m.clamp(min=0) for m in self.maps]

    def to_dict(self) -> dict:
        """Everything as JSON-ready numbers and strings (maps as nested lists, full precision)."""
        rollout, spans = self.rollout, self.spans

        def per_image(maps):
            return None if maps is None else [m.tolist() for m in maps[0]]

        data = {
            "model": self.model_name, "question": self.question, "system_prompt": self.system_prompt,
            "prompt_text": self.prompt_text, "prompt_ids": self.prompt_ids, "completion": self.text,
            "completion_ids": rollout.completion_ids[0].tolist(), "tokens": self.token_texts,
            "spans": {"valid": spans.valid, "template": spans.template, "think": spans.think, "answer": spans.answer},
            "valid": self.valid, "path": rollout.path,
            "images": [{"height": h, "width": w, "grid": list(grid)}
                       for (h, w), grid in zip(self.image_sizes, rollout.image_grids[0])],
            "boxes": self.boxes, "reward": self.reward, "pointing_game_hit": self.pointing_hit,
            "maps": {"answer": [m.tolist() for m in self.maps], "answer_tokens": per_image(rollout.answer_token_maps),
                     "think_tokens": per_image(rollout.think_token_maps),
                     "think_token_logits": per_image(rollout.think_token_logit_maps),
                     "answer_to_think": rollout.answer_to_think[0].tolist() if rollout.answer_to_think else None},
            "timings": self.timings,
        }
        if self.token_maps is not None:
            data["direct_token_maps"] = {"tokens": self.token_maps.spans[0].answer,
                                         "maps": per_image(self.token_maps.answer_token_maps)}
        return data

    def to_html(self, compare: "Explanation | None" = None) -> str:
        """The interactive page (``flow.html``): one file, no network; with ``compare``, both side by side."""
        from saliency_r1.flow import flow_page

        return flow_page([self] if compare is None else [self, compare])

    def _repr_html_(self) -> str:
        """Shown inline in a notebook: the page in a sandboxed frame (its script runs in there)."""
        import html

        return (f'<iframe srcdoc="{html.escape(self.to_html())}" style="width:100%;height:900px;border:0" '
                'sandbox="allow-scripts"></iframe>')

    def save(self, directory: str | Path, compare: "Explanation | None" = None) -> dict[str, Path]:
        """Writes ``overlay.png``, ``flow.html`` and ``explanation.json`` (with ``compare``: the page shows
        both, ``explanation.json`` holds both); returns their paths."""
        from saliency_r1.viz import plot_explanation, save_png

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"overlay": directory / "overlay.png", "flow": directory / "flow.html",
                 "explanation": directory / "explanation.json"}
        save_png(plot_explanation(self, boxes=self.boxes), paths["overlay"])
        paths["flow"].write_text(self.to_html(compare), encoding="utf-8")
        data = self.to_dict() if compare is None else {"explanations": [self.to_dict(), compare.to_dict()]}
        paths["explanation"].write_text(json.dumps(data), encoding="utf-8")
        return paths


def _as_list(images) -> list:
    return list(images) if isinstance(images, (list, tuple)) else [images]


def completion_token_ids(tokenizer, completion: str) -> list[int]:
    """A given completion's token ids (special tokens in the text, such as ``<|im_end|>``, parsed), ended
    with the end-of-turn token when the text has none: a completion from elsewhere (vLLM, a paper) is
    one that ended."""
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    stops = end_of_turn_ids(tokenizer)
    if not ids or ids[-1] not in stops:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def explain(model: nn.Module, processor, image, question: str, *, boxes=None, completion: str | None = None,
            system_prompt: str | None = None, path: str = "cot", max_new_tokens: int = 256,
            adapter: ModelAdapter | None = None, model_name: str = "", **generate_kwargs) -> Explanation:
    """Answer ``question`` about ``image`` (or explain a given ``completion``) with saliency maps.

    Args:
        model: a model served by an adapter, on CPU or GPU.
        processor: its processor (with a chat template).
        image: a PIL image, or a list of them (one map per image).
        question: the user's question.
        boxes: optional evidence boxes, normalised ``[x1, y1, x2, y2]`` in the original image (a list of boxes,
            or a Saliency-R1 string such as ``"[0.1,0.2,0.5,0.9]"``): the saliency reward and the pointing
            game are computed on the first image against them.
        completion: explain this completion (teacher-forced, one forward) instead of generating one.
        system_prompt: system message; default: the project's reasoning prompt (``<think>`` then ``<answer>``).
        path: ``"cot"``, ``"direct"`` or ``"both"``.
        max_new_tokens: generation budget.
        adapter: defaults to ``get_adapter(model)``.
        model_name: how the model is named on the page and in the JSON.
        generate_kwargs: passed to ``generate`` (default greedy: ``do_sample=False``).

    Returns:
        :class:`Explanation`, with the per-token maps and answer-to-think weights in ``.rollout``.

    Raises:
        ValueError: a bad box; ``ConfigError`` (a ``ValueError``) for a prompt and completion longer than the
            model's context.
    """
    from saliency_r1.data.loader import parse_normalised_boxes
    from saliency_r1.metrics import pixel_boxes, pointing_game_hit
    from saliency_r1.prompts import chat_messages, system_prompt_or_default

    started = time.perf_counter()
    parsed_boxes = None if boxes is None else parse_normalised_boxes(boxes)  # before any work: one validation
    adapter = adapter or get_adapter(model)
    images = _as_list(image)
    system = system_prompt_or_default(system_prompt)
    text = processor.apply_chat_template(chat_messages(adapter, question, system, len(images)),
                                         add_generation_prompt=True, tokenize=False)
    device = next(model.parameters()).device
    inputs = processor(text=[text], images=images, return_tensors="pt").to(device)
    tokenizer = getattr(processor, "tokenizer", processor)
    if completion is None:
        generate_kwargs.setdefault("do_sample", False)
        rollout = generate_with_saliency(model, processor, inputs, adapter=adapter, path=path, details=True,
                                         max_new_tokens=max_new_tokens, suppress_tokens=adapter.vision_token_ids,
                                         **generate_kwargs)
    else:
        ids = completion_token_ids(tokenizer, completion)
        context = getattr(adapter.text_model.config, "max_position_embeddings", None)
        if context is not None and inputs["input_ids"].shape[1] + len(ids) > context:
            from saliency_r1.errors import ConfigError

            raise ConfigError(f"--completion: the prompt ({inputs['input_ids'].shape[1]} tokens) and the completion "
                             f"({len(ids)} tokens) exceed the model's context of {context} positions")
        rollout = saliency_for_completions(model, processor, inputs, [ids], adapter=adapter, path=path, details=True)
    spans = rollout.spans[0]
    ids = rollout.completion_ids[0].tolist()
    pieces = tokenizer.batch_decode([[token] for token in ids], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    token_maps = None
    if not spans.valid:  # what a malformed completion's tokens read directly, labelled as such where shown
        stops = end_of_turn_ids(tokenizer)
        tokens = [k for k, (token, piece) in enumerate(zip(ids, pieces)) if piece.strip() and token not in stops]
        if tokens:
            token_maps = saliency_for_completions(model, processor, inputs, [ids], adapter=adapter, path="direct",
                                                  spans=[Spans(valid=True, answer=tokens, length=len(ids))])
    image_sizes = [(im.height, im.width) for im in images]
    reward = hit = None
    if parsed_boxes is not None:
        reward = float(rollout.reward([parsed_boxes], [image_sizes[0]])[0])
        height, width = image_sizes[0]
        hit = bool(rollout.valid[0]) and pointing_game_hit(rollout.maps[0][0], (height, width),
                                                           pixel_boxes(parsed_boxes, height, width))
    timings = {k: round(v, 4) for k, v in rollout.timings.items()}
    timings["total"] = round(time.perf_counter() - started, 4)
    return Explanation(
        text=rollout.texts[0], valid=bool(rollout.valid[0]), maps=rollout.maps[0],
        think_tokens=[pieces[k] for k in spans.think], answer_tokens=[pieces[k] for k in spans.answer],
        image_sizes=image_sizes, images=images, reward=reward, rollout=rollout, question=question,
        model_name=model_name, system_prompt=system, prompt_text=text, prompt_ids=inputs["input_ids"][0].tolist(),
        boxes=parsed_boxes, pointing_hit=hit, token_texts=pieces, token_maps=token_maps, timings=timings)
