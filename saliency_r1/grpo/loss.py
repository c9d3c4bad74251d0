"""GRPO pieces as plain functions: group advantages, the clipped surrogate, the k3 KL.

docs/method.md section 5. Shapes: ``B`` rollouts (``B = prompts x G``, each group of ``G`` contiguous),
``T`` completion positions (right-padded, ``mask`` marks the real tokens).
"""

from __future__ import annotations

import torch

ADVANTAGE_SCALES = ("group", "batch", "none")
NORMALISATIONS = ("sequence", "token", "constant")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """``A_i = (r_i - mean of its group) / (std + eps)``.

    Args:
        rewards: float ``[B]``, groups of ``group_size`` contiguous rollouts of one prompt.
        group_size: ``G``; ``B`` must be a multiple of it.
        scale: ``"group"`` divides by the group's std, ``"batch"`` by the whole batch's std,
            ``"none"`` only centres (Dr. GRPO). Stds are unbiased, as in TRL.
        eps: added to the std so a group of equal rewards gets advantage 0, not NaN.

    Returns:
        float ``[B]``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    else:
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return centred / (std + eps)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                eps_low: float = 0.2, eps_high: float = 0.2, normalisation: str = "sequence",
                max_completion_length: int | None = None, token_count: torch.Tensor | float | None = None,
                beta: float = 0.0, ref_logps: torch.Tensor | None = None,
                sampling_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO surrogate, with an optional k3 KL penalty.

    Per token: ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL``,
    ``ratio = exp(logps - old_logps)``.

    Args:
        logps: float ``[B, T]`` log-probs of the sampled tokens under the policy being trained.
        old_logps: float ``[B, T]`` under the policy that generated them (equal to ``logps`` on the
            first inner iteration; detached).
        advantages: float ``[B]`` (or ``[B, T]``).
        mask: ``[B, T]``, 1 on completion tokens, 0 on padding.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` (DAPO raises ``eps_high``).
        normalisation: ``"sequence"`` (GRPO: token mean per sequence, then mean over sequences),
            ``"token"`` (DAPO: sum over all tokens / their count) or ``"constant"`` (Dr. GRPO: sum /
            ``(B * max_completion_length)``).
        max_completion_length: needed for ``"constant"``.
        token_count: for ``"token"``: the number of tokens to divide by, so that micro-batches of
            one accumulated step share one denominator; defaults to ``mask.sum()``.
        beta: KL coefficient; ``ref_logps`` (``[B, T]``) is needed when it is not 0.
        sampling_weights: ``[B, T]`` or ``[B, 1]``, detached: importance weights of the generating policy
            against the sampler that drew the tokens (vLLM), from :func:`importance_sampling_weights`; they
            multiply each token's surrogate term, before the KL term is added (TRL's order).

    Returns:
        ``(loss, stats)``: the scalar loss, and detached tensors (no host sync) ``clip_fraction``
        (tokens whose clipped term was the active one, as TRL's ``clip_ratio/region_mean``) and
        ``kl`` (mean per-token KL, 0 when ``beta == 0``).
    """
    if logps.shape != old_logps.shape or logps.shape != mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [B, T]")
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if sampling_weights is not None:
        per_token = per_token * sampling_weights
    kl = torch.zeros((), device=logps.device)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps, the reference policy's log-probs [B, T]")
        per_token_kl = kl_k3(logps, ref_logps)
        per_token = per_token + beta * per_token_kl
        kl = ((per_token_kl * mask).sum() / mask.sum().clamp(min=1.0)).detach()

    if normalisation == "sequence":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif normalisation == "token":
        denominator = mask.sum().clamp(min=1.0) if token_count is None else token_count
        loss = (per_token * mask).sum() / denominator
    else:
        if max_completion_length is None:
            raise ValueError("normalisation='constant' needs max_completion_length")
        loss = (per_token * mask).sum() / (logps.shape[0] * max_completion_length)

    with torch.no_grad():
        region = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        clip_fraction = (region.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"clip_fraction": clip_fraction, "kl": kl}


IMPORTANCE_SAMPLING_MODES = ("token_truncate", "sequence_mask")


def importance_sampling_weights(old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor,
                                mode: str = "token_truncate", cap: float = 3.0) -> tuple[torch.Tensor, dict]:
    """Weights that correct for sampling from another engine's distribution (vLLM's numerics, not the
    trainer's): ``r = exp(old_logps - sampling_logps)``, TRL's two basic forms.

    Args:
        old_logps: ``[B, T]`` the generating policy's log-probs (the trainer's forward).
        sampling_logps: ``[B, T]`` the sampler's log-probs of the same tokens; NaN where it gave none
            (weight 1 there).
        mask: ``[B, T]``, 1 on completion tokens.
        mode: ``"token_truncate"`` (per token, ``min(r, cap)``: truncated importance sampling) or
            ``"sequence_mask"`` (per sequence, ``r`` of the summed log-ratio, 0 for a sequence whose ratio
            exceeds ``cap``; TRL 1.16's default).
        cap: the bound.

    Returns:
        ``(weights, stats)``: ``[B, T]`` or ``[B, 1]`` detached weights; ``stats`` (detached, no host sync):
        ``ratio_mean`` and ``ratio_max`` of the ratios before the bound over the masked tokens (sequences),
        ``capped_fraction`` of them that the bound changed.
    """
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"mode must be one of {IMPORTANCE_SAMPLING_MODES}, got {mode!r}")
    if not cap > 0:
        raise ValueError(f"cap must be positive, got {cap}")
    if old_logps.shape != sampling_logps.shape or old_logps.shape != mask.shape:
        raise ValueError(f"old_logps {tuple(old_logps.shape)}, sampling_logps {tuple(sampling_logps.shape)} and "
                         f"mask {tuple(mask.shape)} must all be [B, T]")
    with torch.no_grad():
        mask = mask.to(old_logps.dtype)
        difference = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
        if mode == "token_truncate":
            ratio, counted = torch.exp(difference), mask
            weights = ratio.clamp(max=cap)
        else:
            ratio, counted = torch.exp(difference.sum(-1, keepdim=True)), (mask.sum(-1, keepdim=True) > 0).to(mask)
            weights = ratio.masked_fill(ratio > cap, 0.0)
        total = counted.sum().clamp(min=1.0)
        stats = {"ratio_mean": (ratio * counted).sum() / total,
                 "ratio_max": (ratio * counted).amax() if ratio.numel() else ratio.new_zeros(()),
                 "capped_fraction": ((ratio > cap).to(mask) * counted).sum() / total}
    return weights, stats
