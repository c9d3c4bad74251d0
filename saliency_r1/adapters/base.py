"""The model adapter interface: what the capture and the saliency computation need to know about a VLM family.

An adapter answers, for one loaded model: which token id marks image tokens (and so where they sit in
a sequence), each image's merged grid ``(h', w')`` from ``image_grid_thw``, which vision tokens must
never be sampled, the language model's attention modules and their output projections ``W_O``, the
final norm (``gamma`` and its epsilon), the unembedding ``W_U`` (tied to the input embedding or not),
the head counts and head size; and how its inputs are laid out: the chat template's image part, the
per-token inputs a teacher-forced forward extends, and where the cache keeps each layer's keys and
values.

Qwen-family models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) share one layout, implemented by
:class:`QwenVLAdapter`; a family with that layout needs only ``model_types`` (and whatever differs),
a family with another layout implements :class:`ModelAdapter`'s abstract members. Either way, one file
in ``saliency_r1/adapters`` that subclasses one of these registers itself with :func:`register_adapter`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Mapping

import torch
from torch import nn


class ModelAdapter(ABC):
    """What the saliency machinery needs from a vision-language model, independent of its family.

    Subclasses set ``model_types`` (the ``config.model_type`` values they serve) and implement the
    abstract members. Every tensor returned is a view of the model's own parameters (no copies).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    # The transformers processor class of the family (its images, its chat template).
    processor_class: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ------------------------------------------------------------------ language model structure

    @property
    @abstractmethod
    def text_model(self) -> nn.Module:
        """The language model (decoder stack) whose attention is captured; its ``config`` selects the attention."""

    @property
    @abstractmethod
    def attention_modules(self) -> list[nn.Module]:
        """The self-attention module of each language layer, in layer order."""

    @abstractmethod
    def o_proj_weight(self, layer: int) -> torch.Tensor:
        """``W_O`` of language layer ``layer``: ``[D, H * d]`` (the ``nn.Linear`` weight of ``o_proj``)."""

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The RMSNorm applied to the residual stream before the head."""

    @property
    @abstractmethod
    def vision_encoder(self) -> nn.Module:
        """The vision tower and its merger: what turns pixels into the image tokens' embeddings."""

    @property
    @abstractmethod
    def norm_weight(self) -> torch.Tensor:
        """``gamma`` of the final norm: ``[D]``."""

    @property
    @abstractmethod
    def norm_eps(self) -> float:
        """Epsilon added to the mean square inside the final norm."""

    @property
    @abstractmethod
    def unembedding(self) -> torch.Tensor:
        """``W_U``: ``[V, D]`` (the head's weight, which is the input embedding when they are tied)."""

    @property
    @abstractmethod
    def num_heads(self) -> int:
        """Query heads ``H`` per language layer."""

    @property
    @abstractmethod
    def num_kv_heads(self) -> int:
        """Key/value heads ``H_kv`` per language layer."""

    @property
    @abstractmethod
    def head_dim(self) -> int:
        """Head size ``d``."""

    @property
    def num_layers(self) -> int:
        """Number of language layers ``L``."""
        return len(self.attention_modules)

    @property
    def scale(self) -> float:
        """Softmax scale ``s`` of the language attention (``d ** -0.5`` unless the module says otherwise)."""
        return float(getattr(self.attention_modules[0], "scaling", self.head_dim ** -0.5))

    # ------------------------------------------------------------------ images

    @property
    @abstractmethod
    def image_token_id(self) -> int:
        """Token id of the placeholder tokens that carry image features."""

    @property
    @abstractmethod
    def merge_size(self) -> int:
        """Patches merged per side into one image token (2 for the Qwen families)."""

    @property
    @abstractmethod
    def vision_token_ids(self) -> list[int]:
        """Ids of the image and video placeholders and the vision start/end markers.

        Generation must never sample them: a sampled ``<|image_pad|>`` is embedded as text while the
        policy generates, but every later teacher-forced forward (the update, a teacher-forced capture)
        would try to place image features on it and fail.
        """

    def user_content(self, question: str, num_images: int = 1) -> list[dict]:
        """The user message's ``content`` for the processor's chat template: the images, then the question."""
        return [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]

    def teacher_forced_inputs(self, prompt: Mapping[str, torch.Tensor], completion_ids: torch.Tensor,
                              completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs of prompts followed by completions, for one teacher-forced forward.

        Args:
            prompt: the processor's inputs of ``B`` left-padded prompts (``input_ids``, ``attention_mask``,
                pixel inputs, and per-token type ids where the family has them).
            completion_ids: ``[B, C]`` right-padded completion ids.
            completion_mask: ``[B, C]``, 1 at completion tokens, 0 at padding.

        Returns:
            the same keys, the per-token ones extended by the completion (whose tokens are text).
        """
        extend = {"input_ids": completion_ids,
                  "attention_mask": completion_mask.to(prompt["attention_mask"].dtype)}
        if "mm_token_type_ids" in prompt:  # 0 marks a text token
            extend["mm_token_type_ids"] = torch.zeros_like(completion_ids, dtype=prompt["mm_token_type_ids"].dtype)
        return {k: torch.cat([v, extend[k]], dim=1) if k in extend else v for k, v in prompt.items()}

    @staticmethod
    def output_cache(output):
        """The key/value cache a ``generate`` or forward output carries (``use_cache=True``)."""
        cache = output.get("cache") if hasattr(output, "get") else None
        if cache is None:
            cache = output.get("past_key_values") if hasattr(output, "get") else None
        if cache is None:
            raise RuntimeError("the model returned no cache: run it with use_cache=True (the saliency reads keys "
                               "and values from the cache)")
        return cache

    @staticmethod
    def layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (after rotary) and values ``[B, H_kv, S, d]`` of language layer ``layer`` in ``cache``."""
        if hasattr(cache, "layers"):
            return cache.layers[layer].keys, cache.layers[layer].values
        return cache[layer][0], cache[layer][1]

    def image_positions(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Positions of the image tokens in each row of ``input_ids`` (``[B, P]``): a list of ``B`` int64
        tensors, in sequence order (all images of the row, one after another, each in raster order)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
        mask = input_ids == self.image_token_id
        return [row.nonzero().flatten() for row in mask]

    def image_grids(self, image_grid_thw: torch.Tensor) -> list[tuple[int, int]]:
        """Each image's merged token grid ``(h', w')`` from ``image_grid_thw`` (``[num_images, 3]``, patch
        counts ``(t, h, w)``); an image contributes ``t * h' * w'`` tokens (``t = 1`` for still images)."""
        if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be [num_images, 3], got shape {tuple(image_grid_thw.shape)}")
        m = self.merge_size
        grids = []
        for t, h, w in image_grid_thw.tolist():
            if t != 1:
                raise ValueError(f"image_grid_thw row {(t, h, w)}: only still images (t == 1) have one map")
            grids.append((h // m, w // m))
        return grids


class QwenVLAdapter(ModelAdapter):
    """The layout shared by Qwen2-VL, Qwen2.5-VL and Qwen3-VL ``...ForConditionalGeneration`` models:
    ``model.model.language_model`` (layers with ``self_attn.o_proj``, final ``norm``), ``model.lm_head``,
    ``config.image_token_id`` (and the other vision token ids) and ``config.vision_config.spatial_merge_size``."""

    @property
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.text_model.layers]

    @property
    def vision_encoder(self) -> nn.Module:
        return self.model.model.visual

    def o_proj_weight(self, layer: int) -> torch.Tensor:
        o_proj = self.attention_modules[layer].o_proj
        weight = o_proj.weight
        # A LoRA-wrapped o_proj (peft) computes with W + delta of its active, unmerged adapters.
        if hasattr(o_proj, "get_delta_weight") and not (o_proj.merged or o_proj.disable_adapters):
            for name in o_proj.active_adapters:
                if name in o_proj.lora_A:
                    weight = weight + o_proj.get_delta_weight(name)
        return weight

    @property
    def final_norm(self) -> nn.Module:
        return self.text_model.norm

    @property
    def norm_weight(self) -> torch.Tensor:
        return self.final_norm.weight

    @property
    def norm_eps(self) -> float:
        norm = self.final_norm
        return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    @property
    def unembedding(self) -> torch.Tensor:
        # With tied embeddings the head's weight is the embedding matrix itself; either way it is [V, D].
        return self.model.get_output_embeddings().weight

    @property
    def num_heads(self) -> int:
        return int(self.attention_modules[0].config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(self.attention_modules[0].config.num_key_value_heads)

    @property
    def head_dim(self) -> int:
        return int(self.attention_modules[0].head_dim)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    @property
    def vision_token_ids(self) -> list[int]:
        config = self.model.config
        names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        return [int(i) for i in (getattr(config, name, None) for name in names) if i is not None]


_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: serve ``cls.model_types`` with ``cls`` in :func:`get_adapter`."""
    if not cls.model_types:
        raise ValueError(f"{cls.__name__}.model_types is empty: name the config.model_type values it serves")
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values an adapter serves."""
    return sorted(_ADAPTERS)


def adapter_class(model_type: str) -> type[ModelAdapter]:
    """The adapter class serving ``model_type``; ``ValueError`` naming the supported ones otherwise."""
    if model_type not in _ADAPTERS:
        raise ValueError(f"no saliency adapter for model_type {model_type!r}; supported: {supported_model_types()}. "
                         "Add one file to saliency_r1/adapters (see saliency_r1/adapters/base.py).")
    return _ADAPTERS[model_type]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model`` (or for the model inside a peft wrapper), chosen by ``model.config.model_type``."""
    if hasattr(model, "get_base_model"):  # peft: LoRA layers sit inside the same modules
        model = model.get_base_model()
    return adapter_class(getattr(getattr(model, "config", None), "model_type", None))(model)
