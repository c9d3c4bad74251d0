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
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

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
                    is_main: bool = True, processor=None, barrier=None) -> Path:
    """Writes a checkpoint atomically; every process calls it (each saves its RNG state, the main one the rest).

    Everything goes into a hidden ``.partial-<name>`` directory beside ``directory``, ``state.json`` (the
    completeness marker) last, each file flushed to disk; then the directory is renamed into place. A
    run killed at any moment leaves either a complete ``checkpoint-<step>`` or none (a stale partial
    directory is removed by the next save or ignored by :func:`latest_checkpoint`).

    Args:
        directory: the checkpoint directory.
        model: the unwrapped model (a ``PeftModel`` saves only its adapter).
        optimizer, scheduler: their ``state_dict()`` is saved.
        state: JSON-serialisable loop state (``step``, ``data_position``, ...).
        config: the resolved :class:`~saliency_r1.grpo.config.TrainConfig`.
        rank: this process's index; ``is_main``: whether it writes the shared files.
        processor: saved beside the model when given, so the checkpoint loads on its own.
        barrier: with several processes, a callable that waits for all of them
            (``accelerator.wait_for_everyone``).

    Raises:
        RuntimeError: the weights hold NaN or inf (nothing is written).
    """
    directory = Path(directory)
    barrier = barrier or (lambda: None)
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise RuntimeError(f"refusing to write {directory}: its weights hold NaN or inf ({len(bad)} tensors, "
                           f"{bad[0]} first); the last checkpoint written is intact")
    partial = directory.parent / f".partial-{directory.name}"
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
        partial.mkdir(parents=True)
    barrier()
    _save_durably(rng_state(), partial / f"rng-{rank}.pt")
    if is_main:
        model.save_pretrained(partial / "model")
        if processor is not None:
            processor.save_pretrained(partial / "model")
        _save_durably(optimizer.state_dict(), partial / "optimizer.pt")
        _save_durably(scheduler.state_dict(), partial / "scheduler.pt")
        config.save(partial / "config.yaml")
    barrier()
    if is_main:
        _fsync_files(partial)
        _write_durably(partial / "state.json", json.dumps(state, indent=2))
        if directory.exists():  # the same step saved again (a resumed run): the new one replaces it
            replaced = directory.parent / f".replaced-{directory.name}"
            shutil.rmtree(replaced, ignore_errors=True)
            directory.rename(replaced)
            partial.rename(directory)
            shutil.rmtree(replaced)
        else:
            partial.rename(directory)
        _fsync(directory.parent)
    barrier()
    return directory


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_files(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            _fsync(file)


def _save_durably(obj, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def checkpoint_problem(directory: str | Path) -> str | None:
    """Why ``directory`` is not a complete checkpoint, or ``None`` when it is one."""
    directory = Path(directory)
    try:
        state = json.loads((directory / "state.json").read_text())
    except FileNotFoundError:
        return "no state.json"
    except (ValueError, OSError) as error:
        return f"state.json is unreadable ({error})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "state.json holds no step"
    for needed in ("config.yaml", "optimizer.pt", "scheduler.pt", "model"):
        if not (directory / needed).exists():
            return f"no {needed}"
    return None


def load_checkpoint(directory: str | Path, *, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restores what :func:`save_checkpoint` wrote into ``model`` (unwrapped), ``optimizer`` and
    ``scheduler`` and this process's RNG state; returns the loop state."""
    directory = Path(directory)
    problem = checkpoint_problem(directory)
    if problem:
        raise FileNotFoundError(f"{directory} is not a complete checkpoint: {problem}")
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
    """The complete checkpoint with the highest step in ``output_dir``, or ``None``; incomplete ones (a
    run killed while writing one, before saves were atomic) are skipped with a warning naming them."""
    found = sorted(((int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
                    if (m := _NAME.match(p.name)) and p.is_dir()), reverse=True)
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def save_model_dir(directory: str | Path, model, processor) -> Path:
    """``save_pretrained`` of ``model`` and ``processor`` into ``directory``, atomically (written beside it,
    then renamed into place)."""
    directory = Path(directory)
    partial = directory.parent / f".partial-{directory.name}"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    _fsync_files(partial)
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    _fsync(directory.parent)
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
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint written by train: {problem}")
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
