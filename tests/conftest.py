"""Test-wide set-up: Triton kernels run in the interpreter on CPU tensors when no GPU is present."""

import os

import torch

# Must be set before any @triton.jit is applied (the kernel modules read it at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_device() -> str:
    """Device of the tensors handed to Triton launchers: CUDA on a GPU machine, CPU in the interpreter."""
    return TRITON_DEVICE


@pytest.fixture(scope="session")
def cold_model(tmp_path_factory) -> str:
    """The tiny model after a short cold start, made once per session and shared by the training,
    command-line and TRL tests: its completions are well formed, so every reward term, saliency
    included, is live (a random model never closes </answer>, and an invalid completion's saliency
    reward is 0 by definition)."""
    from saliency_r1.grpo.config import TrainConfig
    from saliency_r1.grpo.cold_start import export_cold_start

    directory = tmp_path_factory.getbasetemp() / "cold-start-tiny"
    # 3e-3 teaches the format in 40 steps (the default 1e-3 needs more to read images).
    export_cold_start(TrainConfig(cold_start_steps=40, cold_start_lr=3e-3, cold_start_batch=8),
                      directory)
    return str(directory)


def save_in_the_hugging_face_layout(model, processor, folder):
    """A model folder as a Qwen2.5-VL checkpoint on the hub has it; on a machine without torchvision,
    AutoProcessor cannot build it (its video processor)."""
    from saliency_r1.models import save_in_hub_layout

    return save_in_hub_layout(model, processor, folder)


@pytest.fixture(scope="session")
def hub_folder(cold_model, tmp_path_factory):
    """The cold-started tiny model saved in the Hugging Face layout (its completions are well formed)."""
    from saliency_r1.grpo.config import TrainConfig
    from saliency_r1.models import load_policy

    model, processor = load_policy(TrainConfig(model=cold_model))
    return str(save_in_the_hugging_face_layout(model, processor, tmp_path_factory.getbasetemp() / "hub-layout"))
