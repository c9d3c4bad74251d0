"""Plain-torch reference of ``saliency::layer_saliency`` (docs/method.md section 3): materialises every probability.

For tests and benchmarks only. It computes in the dtype of its inputs (bf16 inputs give bf16 arithmetic,
float64 inputs float64), which is what the tests need: the kernels' error against the float64 reference is
bounded by twice this reference's own error in the kernels' input dtype.
"""

from __future__ import annotations

import torch

_PATHS = ("cot", "direct", "both")


def layer_saliency_reference(q_think: torch.Tensor, lse_think: torch.Tensor, q_answer: torch.Tensor,
                             lse_answer: torch.Tensor, k_think: torch.Tensor, k_image: torch.Tensor,
                             v_image: torch.Tensor, u_answer: torch.Tensor, lengths: torch.Tensor, scale: float,
                             path: str = "cot") -> torch.Tensor:
    """One layer's ``S(a, i)``, summed over heads, by materialising ``alpha(a -> t)``, ``alpha(t -> i)``, ``alpha(a -> i)``.

    Args:
        q_think: ``[B, H, T, d]`` queries of the think rows.
        lse_think: ``[B, H, T]`` their softmax log-sum-exp.
        q_answer: ``[B, H, A, d]`` queries of the answer rows.
        lse_answer: ``[B, H, A]`` their log-sum-exp.
        k_think: ``[B, H_kv, T, d]`` keys at the think positions.
        k_image: ``[B, H_kv, N, d]`` keys at the image positions.
        v_image: ``[B, H_kv, N, d]`` values at the image positions.
        u_answer: ``[B, H, A, d]`` projected answer vectors ``W_O[l,h]^T g_a``.
        lengths: int ``[B, 3]``, valid ``(N_b, T_b, A_b)`` per rollout.
        scale: softmax scale.
        path: ``"cot"``, ``"direct"`` or ``"both"``.

    Returns:
        ``[B, A, N]``: float64 for float64 inputs, else float32 (computed in the input dtype, then cast).
        Padding entries are 0.
    """
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
    dtype = q_answer.dtype
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    batch, heads, answers, _ = q_answer.shape
    groups = heads // k_image.shape[1]
    out = torch.zeros(batch, answers, k_image.shape[2], dtype=out_dtype, device=q_answer.device)
    for b, (n, t, a) in enumerate(lengths.tolist()):
        if n == 0 or a == 0:
            continue
        k_img = k_image[b, :, :n].repeat_interleave(groups, dim=0)  # [H, n, d]
        v_img = v_image[b, :, :n].repeat_interleave(groups, dim=0)
        q_a, lse_a, u_a = q_answer[b, :, :a], lse_answer[b, :, :a, None].to(dtype), u_answer[b, :, :a]
        weight = torch.zeros(heads, a, n, dtype=dtype, device=q_answer.device)
        if path in ("cot", "both") and t > 0:
            k_t = k_think[b, :, :t].repeat_interleave(groups, dim=0)
            alpha_at = torch.exp(scale * (q_a @ k_t.transpose(1, 2)) - lse_a)  # [H, a, t]
            alpha_ti = torch.exp(scale * (q_think[b, :, :t] @ k_img.transpose(1, 2))
                                 - lse_think[b, :, :t, None].to(dtype))  # [H, t, n]
            weight = weight + alpha_at @ alpha_ti
        if path in ("direct", "both"):
            weight = weight + torch.exp(scale * (q_a @ k_img.transpose(1, 2)) - lse_a)
        value_dot = u_a @ v_img.transpose(1, 2)  # [H, a, n]: <v_i, W_O^T g_a>
        out[b, :a, :n] = (weight * value_dot).sum(0).to(out_dtype)
    return out
