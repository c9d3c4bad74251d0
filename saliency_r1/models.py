"""Loading a policy and its processor: a checkpoint (local folder or hub id) or the tiny model built
in code; wrapping it with LoRA adapters."""

from __future__ import annotations

import torch


def load_policy(cfg, dtype: torch.dtype = torch.float32):
    """``(model, processor)``: the checkpoint at ``cfg.model``, or the tiny model built in code.

    Args:
        cfg: a :class:`~saliency_r1.grpo.config.TrainConfig` (model, pixel bounds, tiny-model shape, seed).
        dtype: the weights' dtype.
    """
    processor = load_policy_processor(cfg)
    return load_policy_model(cfg, processor, dtype), processor


def load_policy_processor(cfg):
    """The processor of ``cfg.model`` (or the tiny one): cheap, so that data can be checked against it
    before the model loads."""
    if cfg.model is None:
        from saliency_r1.tiny import build_tiny_processor

        return build_tiny_processor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return load_processor(cfg.model, cfg.min_pixels, cfg.max_pixels)


def load_policy_model(cfg, processor, dtype: torch.dtype = torch.float32):
    """The model of ``cfg.model`` (or the tiny one, built for ``processor``'s tokenizer)."""
    if cfg.model is None:
        from saliency_r1.tiny import build_tiny_model

        return build_tiny_model(processor, seed=cfg.seed, dtype=dtype, num_hidden_layers=cfg.tiny_layers,
                                hidden_size=cfg.tiny_hidden, intermediate_size=2 * cfg.tiny_hidden)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        cfg.model, dtype=dtype, attn_implementation={"text_config": "sdpa", "vision_config": "sdpa"})
    # Rollouts must be drawn from pi / T exactly, or the ratio's denominator is wrong: drop the
    # checkpoint's own logit adjustments (Qwen2.5-VL-Instruct ships repetition_penalty=1.05).
    generation = model.generation_config
    generation.repetition_penalty, generation.no_repeat_ngram_size, generation.min_p = 1.0, 0, None
    return model


def image_check(processor):
    """A function that raises ``ValueError`` for an image ``processor`` would reject, for the data loader.

    The Qwen image processors resize with their module's ``smart_resize`` (to multiples of the patch
    size times the merge size, within the pixel bounds), which refuses an aspect ratio over 200: the
    check runs it with the processor's own settings. Any other processor is run on the image itself.
    """
    import sys

    image_processor = getattr(processor, "image_processor", processor)
    resize = getattr(sys.modules.get(type(image_processor).__module__), "smart_resize", None)
    size = getattr(image_processor, "size", None) or {}
    if resize is not None and {"shortest_edge", "longest_edge"} <= set(size):
        factor = image_processor.patch_size * image_processor.merge_size

        def check(image) -> None:
            resize(image.height, image.width, factor=factor, min_pixels=size["shortest_edge"],
                   max_pixels=size["longest_edge"])
    else:
        def check(image) -> None:
            try:
                image_processor(images=[image], return_tensors="pt")
            except Exception as error:  # whatever the processor raises is a reason to skip the record
                raise ValueError(f"the image processor rejects it: {type(error).__name__}: {error}") from None
    return check


def load_processor(path: str, min_pixels: int, max_pixels: int):
    """``AutoProcessor`` of a checkpoint. A tiny-model checkpoint (saved without a video processor)
    comes back from ``AutoProcessor`` as a bare tokenizer: its processor is rebuilt in code, and
    its tokenizer checked against the saved one."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)
    if hasattr(processor, "image_processor"):
        return processor
    from saliency_r1.tiny import build_tiny_processor

    tiny = build_tiny_processor(min_pixels=min_pixels, max_pixels=max_pixels, vocab_size=len(processor))
    if tiny.tokenizer.get_vocab() != processor.get_vocab():
        raise ValueError(f"{path}: no processor saved, and its tokenizer is not the tiny model's")
    return tiny


def lora_base_dtype(cfg, device_type: str) -> torch.dtype:
    """bf16 for the frozen base of a LoRA run under bf16, else fp32. The base gains nothing from
    fp32 weights, and autocast would cast all of it again at every forward (it caches only the
    casts of weights that require grad)."""
    return torch.bfloat16 if cfg.lora and cfg.uses_bf16(device_type) else torch.float32


def with_lora(model, cfg):
    """``model`` with trainable LoRA adapters on ``cfg.lora_targets`` (peft); the base is frozen."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules=cfg.lora_targets))
