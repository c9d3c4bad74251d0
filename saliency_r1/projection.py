"""The projected answer vectors ``u[l, h, a] = W_O[l, h]^T g_a`` that ``layer_saliency`` contracts with the values.

docs/method.md section 3: with the final RMSNorm frozen at its actual scale, a vector ``x`` added to the residual at
answer position ``a`` changes the logit of the answer token ``y_a`` by ``<g_a, x>``, where

    g_a = gamma * W_U[y_a] / rms(x_a).

Head ``h`` of layer ``l`` adds ``W_O[l, h] o_h`` to the residual, so its effect on that logit is
``<W_O[l, h]^T g_a, o_h>``. Only the answer tokens' rows of ``W_U`` are read (``index_select``), never the
whole vocabulary.

Typical use, per layer ``l`` (``g`` once per batch)::

    g = answer_logit_directions(model.norm.weight, lm_head.weight, answer_ids, rms)
    u = project_answer_vectors(g, layer.self_attn.o_proj.weight, num_heads).to(q.dtype)
"""

from __future__ import annotations

import torch


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: bf16 weights are widened, never multiplied in bf16."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def answer_logit_directions(norm_weight: torch.Tensor, unembedding: torch.Tensor, answer_token_ids: torch.Tensor,
                            rms: torch.Tensor, *, check_ids: bool = True) -> torch.Tensor:
    """The logit directions ``g_a = gamma * W_U[y_a] / rms(x_a)`` of the answer tokens.

    Args:
        norm_weight: ``[D]``, the final RMSNorm's weight ``gamma``.
        unembedding: ``[V, D]``, the unembedding ``W_U`` (``lm_head.weight``); only rows ``answer_token_ids``
            are read.
        answer_token_ids: integer ``[B, A]``, the answer tokens ``y_a`` (padding: any id in ``[0, V)``).
        rms: ``[B, A]``, ``rms(x_a)`` of the residual entering the final norm at each answer position (the
            norm's own ``sqrt(mean(x^2) + eps)``).
        check_ids: raise for ids outside ``[0, V)``. Reading them costs a device-to-host copy on a GPU; a
            caller that checked them on the host before copying them there (the saliency engine) passes False.

    Returns:
        ``[B, A, D]``, float32 (float64 if any input is float64).
    """
    if norm_weight.dim() != 1:
        raise ValueError(f"norm_weight must be [D], got shape {tuple(norm_weight.shape)}")
    if unembedding.dim() != 2 or unembedding.shape[1] != norm_weight.shape[0]:
        raise ValueError(f"unembedding must be [V, D] with D={norm_weight.shape[0]} (norm_weight's), "
                         f"got shape {tuple(unembedding.shape)}")
    if answer_token_ids.dim() != 2:
        raise ValueError(f"answer_token_ids must be [B, A], got shape {tuple(answer_token_ids.shape)}")
    if answer_token_ids.dtype.is_floating_point or answer_token_ids.dtype.is_complex:
        raise TypeError(f"answer_token_ids must be an integer tensor, got {answer_token_ids.dtype}")
    if rms.shape != answer_token_ids.shape:
        raise ValueError(f"rms must be [B, A] = {tuple(answer_token_ids.shape)} (answer_token_ids' shape), "
                         f"got {tuple(rms.shape)}")
    vocab = unembedding.shape[0]
    if check_ids and answer_token_ids.numel() and not (
            0 <= int(answer_token_ids.min()) and int(answer_token_ids.max()) < vocab):
        raise ValueError(f"answer_token_ids must lie in [0, {vocab}) (unembedding's V), got values in "
                         f"[{int(answer_token_ids.min())}, {int(answer_token_ids.max())}]")
    dtype = _compute_dtype(norm_weight, unembedding, rms)
    rows = unembedding.index_select(0, answer_token_ids.reshape(-1).long()).to(dtype)  # [B * A, D]
    rows = rows.view(*answer_token_ids.shape, unembedding.shape[1])  # explicit D: A may be 0
    return rows * norm_weight.to(dtype) / rms.to(dtype).unsqueeze(-1)


def project_answer_vectors(g: torch.Tensor, o_proj_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``u[b, h, a] = W_O[:, h*d:(h+1)*d]^T g[b, a]``: the answer directions seen through each head's output block.

    Args:
        g: ``[B, A, D]`` logit directions from :func:`answer_logit_directions`.
        o_proj_weight: ``[D, H * d]``, the layer's ``o_proj.weight`` (``nn.Linear`` layout: ``o_proj(o) = W_O o``
            with ``o`` the heads' outputs concatenated).
        num_heads: ``H``, the number of query heads.

    Returns:
        ``[B, H, A, d]`` (float32, or float64 if an input is float64); cast it to the queries' dtype before
        :func:`saliency_r1.ops.layer_saliency`.
    """
    if g.dim() != 3:
        raise ValueError(f"g must be [B, A, D], got shape {tuple(g.shape)}")
    if o_proj_weight.dim() != 2 or o_proj_weight.shape[0] != g.shape[2]:
        raise ValueError(f"o_proj_weight must be [D, H * d] with D={g.shape[2]} (g's), "
                         f"got shape {tuple(o_proj_weight.shape)}")
    if num_heads <= 0 or o_proj_weight.shape[1] % num_heads:
        raise ValueError(f"num_heads={num_heads} must be positive and divide o_proj_weight's "
                         f"H * d = {o_proj_weight.shape[1]}")
    dtype = _compute_dtype(g, o_proj_weight)
    batch, answers, _ = g.shape
    u = g.to(dtype) @ o_proj_weight.to(dtype)  # [B, A, H * d]: row a is W_O^T g_a, head blocks side by side
    return u.view(batch, answers, num_heads, o_proj_weight.shape[1] // num_heads).transpose(1, 2).contiguous()
