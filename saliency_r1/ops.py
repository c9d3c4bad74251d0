"""The saliency ops: loading the compiled library, and the one place where every kernel is registered.

Schemas live in C++ (``kernels/cpu/schemas.cpp``) together with the CPU kernels. This module adds
the CUDA kernels (Triton, imported on first use) and the fake implementations that let the ops run
under ``torch.compile`` and ``FakeTensorMode``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from saliency_r1.kernels.checks import check_layer_saliency_metadata, check_reward_metadata

_PACKAGE_DIR = Path(__file__).resolve().parent
_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` in the saliency-r1 checkout"


def _built_with_torch(library: Path) -> str:
    match = re.search(rb"saliency_r1 built with torch ([^;\x00]*);", library.read_bytes())
    return match.group(1).decode() if match else "an unknown version"


def _load_library() -> None:
    candidates = sorted(_PACKAGE_DIR.glob("_C*.so"))
    if not candidates:
        raise ImportError(f"saliency_r1: the compiled CPU library (_C*.so) is missing from {_PACKAGE_DIR}; {_REBUILD}.")
    library = candidates[0]
    built_for = _built_with_torch(library)
    if built_for != torch.__version__:
        raise ImportError(
            f"saliency_r1: the compiled CPU library {library.name} was built for torch {built_for}, "
            f"but torch {torch.__version__} is installed; {_REBUILD}.")
    try:
        torch.ops.load_library(str(library))
    except OSError as error:
        raise ImportError(
            f"saliency_r1: the compiled CPU library {library.name} (built for torch {built_for}) "
            f"failed to load under torch {torch.__version__}: {error}; {_REBUILD}.") from error


_load_library()


# ---------------------------------------------------------------- fake implementations (torch.compile)

# They check what the kernels check before reading a value (types, ranks, shapes, devices: one argument
# on the meta device and the rest on the CPU is an error, not an empty CPU tensor), with the kernels'
# messages, so that torch.compile rejects what eager rejects.

@torch.library.register_fake("saliency::reward")
def _reward_fake(maps, map_sizes, image_sizes, boxes, box_counts, valid, check=True):
    check_reward_metadata(maps, map_sizes, image_sizes, boxes, box_counts, valid)
    return maps.new_empty((maps.shape[0],), dtype=torch.float32)


@torch.library.register_fake("saliency::layer_saliency")
def _layer_saliency_fake(q_think, lse_think, q_answer, lse_answer, k_think, k_image, v_image, u_answer,
                         lengths, scale, path="cot"):
    check_layer_saliency_metadata(q_think, lse_think, q_answer, lse_answer, k_think, k_image, v_image, u_answer,
                                  lengths, path)
    out_dtype = torch.float64 if q_answer.dtype == torch.float64 else torch.float32
    return q_answer.new_empty((q_answer.shape[0], q_answer.shape[2], k_image.shape[2]), dtype=out_dtype)


# ---------------------------------------------------------------- CUDA kernels (Triton)

@torch.library.register_kernel("saliency::reward", "cuda")
def _reward_cuda(maps, map_sizes, image_sizes, boxes, box_counts, valid, check=True):
    from saliency_r1.kernels.reward import reward_triton
    return reward_triton(maps, map_sizes, image_sizes, boxes, box_counts, valid, check=check)


@torch.library.register_kernel("saliency::layer_saliency", "cuda")
def _layer_saliency_cuda(q_think, lse_think, q_answer, lse_answer, k_think, k_image, v_image, u_answer,
                         lengths, scale, path="cot"):
    from saliency_r1.kernels.layer_saliency import layer_saliency_triton
    return layer_saliency_triton(q_think, lse_think, q_answer, lse_answer, k_think, k_image, v_image,
                                 u_answer, lengths, scale, path)


# ---------------------------------------------------------------- public wrappers

def reward(maps: torch.Tensor, map_sizes: torch.Tensor, image_sizes: torch.Tensor, boxes: torch.Tensor,
           box_counts: torch.Tensor, valid: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Fraction of each upsampled saliency map's mass inside the union of its boxes (docs/method.md section 4).

    Args:
        maps: float ``[B, h_max, w_max]``; rollout ``b``'s raw map fills the top-left
            ``map_sizes[b]`` corner, the rest is padding and ignored. ``relu`` is applied inside.
        map_sizes: int ``[B, 2]``, ``(h', w')`` of each map.
        image_sizes: int ``[B, 2]``, ``(H, W)`` of each image in pixels.
        boxes: int ``[B, K_max, 4]``, inclusive pixel ranges ``(x_lo, y_lo, x_hi, y_hi)``; clamped to
            the image, a box wholly off the image is empty.
        box_counts: int ``[B]``, how many of the ``K_max`` boxes each rollout uses.
        valid: float ``[B]``, multiplier (the format validity, 0 or 1).
        check: raise ``ValueError`` naming the argument for a bad value (a size out of range, a box with
            ``x_hi < x_lo``, NaN or inf in a map, ...). On CUDA that costs one device-to-host copy;
            ``False`` keeps the call asynchronous and gives NaN for the bad rollouts instead.

    Returns:
        float32 ``[B]``: ``valid * mass in boxes / total mass``; 0 where the mass or the box list is empty.
        Image sides are limited to 2**24 pixels.
    """
    return torch.ops.saliency.reward(maps, map_sizes, image_sizes, boxes, box_counts, valid, check)


def layer_saliency(q_think: torch.Tensor, lse_think: torch.Tensor, q_answer: torch.Tensor,
                   lse_answer: torch.Tensor, k_think: torch.Tensor, k_image: torch.Tensor,
                   v_image: torch.Tensor, u_answer: torch.Tensor, lengths: torch.Tensor, scale: float,
                   path: str = "cot") -> torch.Tensor:
    """One layer's saliency ``S(a, i)`` of docs/method.md section 3, summed over heads.

    Batches are padded: rollout ``b`` uses the first ``lengths[b] = (N_b, T_b, A_b)`` image, think
    and answer entries; padding is ignored and its outputs are 0.

    Args:
        q_think: ``[B, H, T, d]`` queries (after rotary) of the think rows.
        lse_think: float32 ``[B, H, T]`` softmax log-sum-exp of the think rows' scaled scores.
        q_answer: ``[B, H, A, d]`` queries of the answer rows (the rows that predicted the answer tokens).
        lse_answer: float32 ``[B, H, A]`` their log-sum-exp.
        k_think: ``[B, H_kv, T, d]`` keys (after rotary) at the think positions.
        k_image: ``[B, H_kv, N, d]`` keys at the image positions.
        v_image: ``[B, H_kv, N, d]`` values at the image positions.
        u_answer: ``[B, H, A, d]`` projected answer vectors ``W_O[l,h]^T g_a``.
        lengths: int64 ``[B, 3]``, ``(N_b, T_b, A_b)``.
        scale: softmax scale ``s`` (usually ``d ** -0.5``).
        path: ``"cot"`` (through the think tokens, the default), ``"direct"`` (answer to image), or ``"both"``.

    Returns:
        ``[B, A, N]``, float64 for float64 inputs, else float32 (bf16/fp16 accumulate in fp32).
        float64 is served on CPU only; the CUDA (Triton) kernel takes fp32, bf16 and fp16.

    Values are not checked, but for ``lengths`` (the C++ kernel raises; the CUDA kernel, to avoid a host
    synchronisation per call, gives that rollout NaN): a NaN or inf input gives non-finite outputs for
    its rollout only, never a finite number. The saliency engine makes such a rollout invalid
    (``docs/method.md`` section 3.3).
    """
    return torch.ops.saliency.layer_saliency(q_think, lse_think, q_answer, lse_answer, k_think, k_image,
                                             v_image, u_answer, lengths, scale, path)
