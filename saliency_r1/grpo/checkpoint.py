"""Checkpoints that resume exactly: weights (or the LoRA adapter), optimizer, scheduler, every
RNG state, the data position and the resolved configuration.

Layout of ``output_dir/checkpoint-<step>/``::

    model/            save_pretrained of the model (full fine-tuning) or of the adapter (LoRA)
    optimizer.pt      AdamW state
    scheduler.pt      learning-rate schedule state
    rng-<rank>.pt     python, numpy and torch (CPU and CUDA) generator states of each process
    state.json        step, data position and anything else the loop keeps
    config.yaml       the resolved TrainConfig

A LoRA run of the tiny model also keeps its cold-started base once, in ``output_dir/base-model/``
(``save_pretrained`` of model and processor): the adapters were trained on it, and loading it is
what resuming and :func:`load_trained` do instead of running the cold start again.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")
BASE_MODEL_DIR = "base-model"


def rng_state() -> dict:
    """Every generator the loop draws from (sampling uses torch's, data order its own seeded one)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, *, model, optimizer, scheduler, state: dict, config, rank: int = 0,
                    is_main: bool = True, processor=None) -> Path:
    """Writes a checkpoint; every process calls it (each saves its RNG state, the main one the rest).

    Args:
        directory: the checkpoint directory (created).
        model: the unwrapped model (a ``PeftModel`` saves only its adapter).
        optimizer, scheduler: their ``state_dict()`` is saved.
        state: JSON-serialisable loop state (``step``, ``data_position``, ...).
        config: the resolved :class:`~saliency_r1.grpo.config.TrainConfig`.
        rank: this process's index; ``is_main``: whether it writes the shared files.
        processor: saved beside the model when given, so the checkpoint loads on its own.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), directory / f"rng-{rank}.pt")
    if is_main:
        model.save_pretrained(directory / "model")
        if processor is not None:
            processor.save_pretrained(directory / "model")
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")
        (directory / "state.json").write_text(json.dumps(state, indent=2))
        config.save(directory / "config.yaml")
    return directory


def load_checkpoint(directory: str | Path, *, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restores what :func:`save_checkpoint` wrote into ``model`` (unwrapped), ``optimizer`` and
    ``scheduler`` and this process's RNG state; returns the loop state."""
    directory = Path(directory)
    if not (directory / "state.json").is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint (no state.json)")
    load_weights(model, directory / "model")
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))
    rng_file = directory / f"rng-{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} is missing: resume with the number of processes that saved it")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((directory / "state.json").read_text())


def load_weights(model, directory: str | Path) -> None:
    """Loads ``save_pretrained`` weights (full model or adapter) into ``model`` in place, exactly.

    Full models are streamed tensor by tensor from the safetensors files into the parameters, so
    resuming never holds a second copy of the model.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
        return
    files = sorted(directory.glob("*.safetensors"))
    targets = model.state_dict()  # views of the parameters and buffers: copy_ writes into the model
    saved_keys = []
    for file in files:  # reads only the headers
        with safe_open(file, "pt", device="cpu") as handle:
            saved_keys += handle.keys()
    mapping = saved_key_mapping(list(targets), saved_keys)
    if mapping is not None:  # model keys not saved must be tied to saved ones (lm_head and embeddings)
        filled = set(mapping.values())
        storages = {targets[key].data_ptr() for key in filled}
        if any(targets[key].data_ptr() not in storages for key in set(targets) - filled):
            mapping = None
    if mapping is None:
        # A renaming we cannot undo by name: let from_pretrained apply its own mapping, then copy
        # (this path holds a second copy of the model for the duration of the load).
        copy = type(model).from_pretrained(directory, dtype=next(model.parameters()).dtype)
        model.load_state_dict(copy.state_dict())
        return
    with torch.no_grad():
        for file in files:
            with safe_open(file, "pt", device="cpu") as handle:
                for key in handle.keys():
                    target = targets[mapping[key]]
                    tensor = handle.get_tensor(key)
                    if tensor.shape != target.shape:
                        raise ValueError(f"{file}: {key} has shape {tuple(tensor.shape)}, the model's "
                                         f"{mapping[key]} {tuple(target.shape)}")
                    target.copy_(tensor)


def saved_key_mapping(model_keys: list[str], saved_keys: list[str]) -> dict[str, str] | None:
    """``{saved key: model key}`` when the two name sets differ only by wrapper segments that
    transformers adds or drops on save (``model.``, ``language_model.``: Qwen2.5-VL saves
    ``model.layers.0...`` for ``model.language_model.layers.0...``), else ``None``.

    Every saved key must find exactly one model key (model keys left over must be tied weights,
    which :func:`load_weights` checks).

    >>> saved_key_mapping(["model.language_model.norm.weight", "model.visual.x", "lm_head.weight"],
    ...                   ["model.norm.weight", "visual.x", "lm_head.weight"])["model.norm.weight"]
    'model.language_model.norm.weight'
    """
    def canonical(key: str) -> str:
        return ".".join(part for part in key.split(".") if part not in ("model", "language_model"))

    by_name: dict[str, list[str]] = {}
    for key in model_keys:
        by_name.setdefault(canonical(key), []).append(key)
    mapping = {}
    for key in saved_keys:
        found = by_name.get(canonical(key), [])
        if len(found) != 1:
            return None
        mapping[key] = found[0]
    return mapping if len(set(mapping.values())) == len(mapping) else None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``output_dir``, or ``None``."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := _NAME.match(p.name)) and (p / "state.json").is_file()]
    return max(found)[1] if found else None


def save_model_dir(directory: str | Path, model, processor) -> Path:
    """``save_pretrained`` of ``model`` and ``processor`` into ``directory``."""
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def load_trained(checkpoint: str | Path):
    """``(model, processor, cfg)`` of a checkpoint written by ``train``, ready for evaluation (in eval
    mode, on the device the run trained on: the GPU when there is one, unless ``use_cpu``).

    A full fine-tune loads from ``checkpoint/model``; a LoRA run rebuilds its base as the run had it
    (the checkpoint it started from, or the tiny model with its saved cold-started base) and loads
    the adapter.
    """
    from saliency_r1.grpo.config import TrainConfig
    from saliency_r1.models import load_policy, lora_base_dtype, with_lora

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.yaml").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint written by train (no config.yaml)")
    cfg = TrainConfig.load(checkpoint / "config.yaml")
    device = cfg.device_type()
    base_dtype = lora_base_dtype(cfg, device)  # the base the adapter was trained on
    model, processor = load_policy(cfg, base_dtype if cfg.model else torch.float32)
    if cfg.lora:
        if cfg.cold_start_steps and cfg.model is None:
            base = checkpoint.parent / BASE_MODEL_DIR
            if not base.is_dir():
                raise FileNotFoundError(f"{checkpoint}: the tiny model's cold-started base, which its LoRA adapter "
                                        f"was trained on, should be in {base}, which is missing")
            load_weights(model, base)
        model = with_lora(model.to(base_dtype), cfg)
    load_weights(model, checkpoint / "model")
    return model.to(device).eval(), processor, cfg
