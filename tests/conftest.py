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
