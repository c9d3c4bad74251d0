"""Loading a policy and its processor: a checkpoint (local folder or hub id) or the tiny model built
in code; wrapping it with LoRA adapters."""

from __future__ import annotations

import functools
import json
from pathlib import Path

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


def tiny_shape(cfg) -> dict:
    """The tiny model's text-config fields from a :class:`~saliency_r1.grpo.config.TrainConfig`."""
    return dict(num_hidden_layers=cfg.tiny_layers, hidden_size=cfg.tiny_hidden, intermediate_size=2 * cfg.tiny_hidden,
                num_attention_heads=cfg.tiny_heads, num_key_value_heads=cfg.tiny_kv_heads)


def load_policy_model(cfg, processor, dtype: torch.dtype = torch.float32):
    """The model of ``cfg.model`` (or the tiny one, built for ``processor``'s tokenizer)."""
    if cfg.model is None:
        from saliency_r1.tiny import build_tiny_model

        return build_tiny_model(processor, seed=cfg.seed, dtype=dtype, **tiny_shape(cfg))
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


def load_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The processor of a checkpoint (local folder or hub id); pixel bounds override the saved ones.

    Where transformers cannot build the family's processor because its video processor needs
    torchvision (absent beside PyTorch's CPU build), the tokenizer and the image processor are loaded
    from the folder and joined without it: images need no video processor. A tiny-model checkpoint
    (saved without an image processor class transformers knows) comes back from ``AutoProcessor`` as a
    bare tokenizer: its processor is rebuilt in code, and its tokenizer checked against the saved one.
    """
    from transformers import AutoProcessor

    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    try:
        processor = AutoProcessor.from_pretrained(path, **bounds)
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
        return _image_only_processor(path, bounds)
    if hasattr(processor, "image_processor"):
        return processor
    from saliency_r1.tiny import build_tiny_processor

    tiny = build_tiny_processor(vocab_size=len(processor), **bounds)
    if tiny.tokenizer.get_vocab() != processor.get_vocab():
        raise ValueError(f"{path}: no processor saved, and its tokenizer is not the tiny model's")
    return tiny


def _image_processor_by_name(path: str):
    """The image processor class a folder's ``preprocessor_config.json`` names, its PIL backend where
    transformers has one (it needs no torchvision)."""
    import json

    import transformers
    from transformers.utils import cached_file

    config = json.loads(Path(cached_file(path, "preprocessor_config.json")).read_text())
    name = config["image_processor_type"].removesuffix("Fast")
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


@functools.lru_cache(maxsize=None)
def image_only_processor_class(processor_class: str):
    """The family's processor class (``"Qwen2_5_VLProcessor"``, ...) without its video processor, which
    needs torchvision. transformers reads a processor's parts from its ``__init__`` signature."""
    import transformers

    base = getattr(transformers, processor_class)

    class ImageOnlyProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{processor_class}"
    return ImageOnlyProcessor


def _image_only_processor(path: str, bounds: dict):
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    from saliency_r1.adapters import adapter_class

    family = adapter_class(AutoConfig.from_pretrained(path).model_type)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        image_processor = AutoImageProcessor.from_pretrained(path, **bounds)
    except ImportError:  # transformers 5.17 gates AutoImageProcessor itself on torchvision: the class by name
        image_processor = _image_processor_by_name(path).from_pretrained(path, **bounds)
    return image_only_processor_class(family.processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def save_in_hub_layout(model, processor, folder) -> Path:
    """``model`` and ``processor`` as a Qwen2.5-VL checkpoint on the hub has them, which every loader
    (``AutoProcessor``, vLLM) reads: weights and configuration, the tokenizer, the image processor under
    its standard class name, the processor class and the chat template. (The tiny model's own processor is
    saved under a test-only class that only this package loads.)"""
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    image_config = processor.image_processor.to_dict()
    image_config.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor")
    (folder / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    return folder


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


# ---------------------------------------------------------------------------------------- any model


class ModelSource:
    """What a model reference names, found before any weight loads: a checkpoint written by ``train``, a
    peft LoRA adapter folder (its base from the adapter's configuration), or a Hugging Face model (a local
    folder in the standard layout, or a hub id) of a supported family.

    >>> source = resolve_model("runs/saliency-r1/checkpoint-40")   # doctest: +SKIP
    >>> processor = source.processor(); model = source.load("cpu", torch.float32)   # doctest: +SKIP
    """

    def __init__(self, reference: str, kind: str, *, run_config=None, base: "ModelSource | None" = None):
        self.reference, self.kind, self.run_config, self.base = reference, kind, run_config, base

    def __repr__(self) -> str:
        return f"ModelSource({self.reference!r}, {self.kind!r})"

    @property
    def system_prompt(self) -> str | None:
        """The system prompt a checkpoint of ``train`` was trained with (``None``: the default one)."""
        return self.run_config.system_prompt if self.run_config is not None else None

    @property
    def saliency_path(self) -> str:
        return self.run_config.saliency_path if self.run_config is not None else "cot"

    @property
    def max_new_tokens(self) -> int:
        return self.run_config.max_completion_length if self.run_config is not None else 256

    @functools.cached_property
    def config(self):
        """The transformers configuration of the model (of the base, for an adapter), read once."""
        from transformers import AutoConfig

        if self.kind == "adapter":
            return self.base.config
        if self.kind == "checkpoint" and self.run_config.lora:
            return self.base.config if self.base is not None else _tiny_config(self.run_config)
        folder = Path(self.reference) / "model" if self.kind == "checkpoint" else self.reference
        return AutoConfig.from_pretrained(str(folder))

    def max_positions(self) -> int | None:
        config = self.config
        text = getattr(config, "text_config", config)
        return getattr(text, "max_position_embeddings", None)

    def processor(self):
        """The processor (cheap: no weights), to check inputs against before the model loads."""
        if self.kind == "checkpoint":
            cfg = self.run_config
            return load_processor(str(Path(self.reference) / "model"), cfg.min_pixels, cfg.max_pixels)
        if self.kind == "adapter":
            has_own = any((Path(self.reference) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
            return load_processor(self.reference) if has_own else self.base.processor()
        return load_processor(self.reference)

    def load(self, device: str | torch.device, dtype: torch.dtype):
        """The model, in eval mode, on ``device`` in ``dtype``."""
        if self.kind == "checkpoint":
            from saliency_r1.grpo.checkpoint import load_trained

            model, _, _ = load_trained(self.reference)
        elif self.kind == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(self.base.load(device, dtype), self.reference)
        else:
            from transformers import AutoModelForImageTextToText

            self.check_family()
            model = AutoModelForImageTextToText.from_pretrained(
                self.reference, dtype=dtype, attn_implementation={"text_config": "sdpa", "vision_config": "sdpa"})
        return model.to(device=device, dtype=dtype).eval()

    def check_family(self) -> None:
        """Raises :class:`~saliency_r1.errors.ConfigError` naming the supported families when the model's is
        not one (a hub id's configuration is read from the hub)."""
        from saliency_r1.adapters import adapter_class
        from saliency_r1.errors import ConfigError

        try:
            adapter_class(self.config.model_type)
        except ValueError as error:
            raise ConfigError(f"{self.reference}: {error}") from None
        except OSError as error:  # a hub id that is not on the hub, or no network to reach it
            raise ConfigError(f"{self.reference}: not a local folder, and its configuration could not be read from "
                              f"the hub ({type(error).__name__}: {str(error).splitlines()[0]})") from None

    def checked_processor(self):
        """:meth:`processor`, with a processor that cannot load reported as a usage error naming the model."""
        from saliency_r1.errors import ConfigError

        try:
            return self.processor()
        except (OSError, ValueError, TypeError, ImportError) as error:
            raise ConfigError(f"{self.reference}: its processor cannot be loaded ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''})") from None


def _tiny_config(cfg):
    from saliency_r1.tiny import build_tiny_processor, tiny_config

    return tiny_config(build_tiny_processor(), **tiny_shape(cfg))


def resolve_model(reference: str) -> ModelSource:
    """What ``reference`` names (see :class:`ModelSource`), checked without loading a weight.

    Raises:
        ConfigError: a folder that does not exist or holds no model, a model of an unsupported family (the
            supported ones named), an adapter whose base cannot be found.
    """
    import json

    from saliency_r1.adapters import supported_model_types
    from saliency_r1.errors import ConfigError
    from saliency_r1.grpo.checkpoint import checkpoint_problem, latest_checkpoint
    from saliency_r1.grpo.config import looks_like_a_path

    path = Path(reference).expanduser()
    if path.is_dir():
        if checkpoint_problem(path) is None:
            from saliency_r1.grpo.config import TrainConfig

            cfg = TrainConfig.load(path / "config.yaml")
            base = resolve_model(cfg.model) if cfg.lora and cfg.model else None
            return ModelSource(str(path), "checkpoint", run_config=cfg, base=base)
        if (path / "adapter_config.json").is_file():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ConfigError(f"{reference}: a LoRA adapter whose adapter_config.json names no base model")
            return ModelSource(str(path), "adapter", base=resolve_model(base))
        if (path / "config.json").is_file():
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
            if model_type not in supported_model_types():
                raise ConfigError(f"{reference}: a {model_type!r} model; saliency-r1 explains the families "
                                  f"{', '.join(supported_model_types())}")
            return ModelSource(str(path), "model")
        problem = checkpoint_problem(path)
        if path.name.startswith("checkpoint-") or (path / "state.json").exists():
            raise ConfigError(f"{reference}: not a complete checkpoint written by train ({problem})")
        latest = latest_checkpoint(path)
        hint = f"; its latest checkpoint is {latest}" if latest else ""
        raise ConfigError(f"{reference}: not a model folder (no config.json), a LoRA adapter (no adapter_config.json) "
                          f"or a checkpoint written by train{hint}")
    if path.exists():
        raise ConfigError(f"{reference}: a file, where a model folder, an adapter folder or a hub id is expected")
    if looks_like_a_path(reference):
        raise ConfigError(f"{reference}: no such folder (a hub model is named 'organisation/name')")
    return ModelSource(reference, "model")  # a hub id: its family is checked when its configuration loads
