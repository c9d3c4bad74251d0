"""GRPO advantages and loss, against TRL 1.16's own computation (as Liger's GRPO tests do)."""

import types
from collections import defaultdict

import pytest
import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from saliency_r1.grpo.loss import group_advantages, importance_sampling_weights, kl_k3, policy_loss


def _trl_advantages(rewards, group_size, scale):
    """TRL 1.16 ``_generate_and_score_completions``, sum_then_normalize branch, verbatim in substance."""
    mean = rewards.view(-1, group_size).mean(dim=1).repeat_interleave(group_size)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    return advantages if scale == "none" else advantages / (std + 1e-4)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("groups, size", [(1, 2), (3, 4), (5, 8)])
def test_advantages_match_trl(scale, groups, size):
    rewards = torch.rand(groups * size, generator=torch.Generator().manual_seed(groups + size))
    rewards[:size] = 0.5  # one group with equal rewards: advantage 0, never NaN
    ours = group_advantages(rewards, size, scale)
    torch.testing.assert_close(ours, _trl_advantages(rewards, size, scale))
    assert torch.all(ours[:size].abs() < 1e-6) if scale != "batch" else True


def test_advantages_name_bad_arguments():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, "rank")


def _trl_loss(loss_type, logps, old_logps, advantages, mask, *, eps_low, eps_high, beta, ref_logps, max_len):
    """Runs TRL 1.16's ``GRPOTrainer._compute_loss`` itself on a stand-in trainer whose model forward
    returns the given log-probs."""
    identity = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x,
                                     reduce=lambda x, reduction="sum": x, num_processes=1, sync_gradients=True)
    trainer = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=identity, max_completion_length=max_len, _metrics={"train": defaultdict(list)},
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    inputs = {"prompt_ids": torch.zeros(logps.shape[0], 1, dtype=torch.long), "prompt_mask": torch.ones(logps.shape[0], 1),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps,
              "num_items_in_batch": mask.sum()}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("normalisation, loss_type", [("sequence", "grpo"), ("token", "dapo"), ("constant", "dr_grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("B, T", [(4, 7), (6, 42)])
def test_loss_and_gradient_match_trl(normalisation, loss_type, beta, B, T):
    g = torch.Generator().manual_seed(B * T)
    old = -torch.rand(B, T, generator=g) * 3
    logps_ours = (old + 0.4 * torch.randn(B, T, generator=g)).requires_grad_()  # ratios both sides of the clip
    logps_trl = logps_ours.detach().clone().requires_grad_()
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    for row in range(B):  # ragged completions, one of full length
        mask[row, int(torch.randint(1, T + 1, (1,), generator=g)) if row else T:] = 0
    advantages = torch.randn(B, generator=g)
    kwargs = dict(eps_low=0.2, eps_high=0.28)
    ours, stats = policy_loss(logps_ours, old, advantages, mask, normalisation=normalisation, max_completion_length=T,
                              beta=beta, ref_logps=ref, **kwargs)
    theirs, metrics = _trl_loss(loss_type, logps_trl, old, advantages, mask, beta=beta, ref_logps=ref, max_len=T,
                                **kwargs)
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(logps_ours.grad, logps_trl.grad)
    assert stats["clip_fraction"].item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
    assert 0 < stats["clip_fraction"].item() < 1
    if beta:
        assert stats["kl"].item() == pytest.approx(metrics["kl"][0], rel=1e-5)


def test_loss_at_old_policy_is_minus_mean_advantage_and_kl_is_zero_at_reference():
    logps = -torch.rand(3, 5)
    advantages = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = policy_loss(logps, logps, advantages, torch.ones(3, 5))
    assert loss.item() == pytest.approx(-advantages.mean().item())
    assert stats["clip_fraction"].item() == 0
    assert torch.all(kl_k3(logps, logps) == 0) and torch.all(kl_k3(logps, logps - 0.3) > 0)


def test_token_normalisation_shares_a_denominator_across_micro_batches():
    g = torch.Generator().manual_seed(0)
    logps, old = -torch.rand(6, 4, generator=g), -torch.rand(6, 4, generator=g)
    mask = (torch.rand(6, 4, generator=g) > 0.3).float()
    advantages = torch.randn(6, generator=g)
    whole, _ = policy_loss(logps, old, advantages, mask, normalisation="token")
    parts = sum(policy_loss(logps[s], old[s], advantages[s], mask[s], normalisation="token",
                            token_count=mask.sum())[0] for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(parts, whole)


def test_loss_names_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), normalisation="constant")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        policy_loss(x, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


def _trl_importance_weights(old, sampling, mask, mode, cap):
    """TRL 1.16 ``_generate_and_score_completions``'s vLLM importance-sampling block, in substance."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode == "sequence_mask":
        ratio = torch.exp(diff.sum(-1, keepdim=True))
        return ratio.masked_fill(ratio > cap, 0.0)
    return torch.exp(diff).clamp(max=cap)


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_importance_sampling_weights_match_trl(mode):
    generator = torch.Generator().manual_seed(3)
    old = -torch.rand(6, 9, generator=generator) * 3
    sampling = old + torch.randn(6, 9, generator=generator) * 0.8
    sampling[3] = old[3] - 1.0  # the sampler far less likely than the policy: ratios far above the cap
    sampling[0, 2] = float("nan")  # the sampler gave no log-prob there: weight 1
    mask = torch.ones(6, 9)
    mask[1, 5:] = 0
    mask[2] = 0  # an empty completion
    weights, stats = importance_sampling_weights(old, sampling, mask, mode, cap=2.0)
    torch.testing.assert_close(weights, _trl_importance_weights(old, sampling, mask, mode, 2.0))
    assert 0 < float(stats["capped_fraction"]) < 1 and float(stats["ratio_max"]) > 2.0
    if mode == "token_truncate":
        assert weights[0, 2] == 1.0 and float(weights.max()) == 2.0
    else:
        assert weights.shape == (6, 1) and bool((weights == 0).any())


def test_importance_weights_multiply_each_tokens_surrogate_before_the_kl():
    generator = torch.Generator().manual_seed(4)
    logps = -torch.rand(4, 5, generator=generator)
    old, ref = logps + 0.1 * torch.randn(4, 5, generator=generator), logps - 0.2
    advantages, mask = torch.randn(4, generator=generator), torch.ones(4, 5)
    weights = torch.rand(4, 5, generator=generator) * 2
    weighted, _ = policy_loss(logps, old, advantages, mask, normalisation="token", beta=0.1, ref_logps=ref,
                              sampling_weights=weights)
    ratio = torch.exp(logps - old)
    surrogate = -torch.min(ratio * advantages[:, None], ratio.clamp(0.8, 1.2) * advantages[:, None])
    expected = ((surrogate * weights + 0.1 * kl_k3(logps, ref)) * mask).sum() / mask.sum()
    torch.testing.assert_close(weighted, expected)


def test_importance_sampling_weights_name_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        importance_sampling_weights(x, x, x, "sequence_truncate")
    with pytest.raises(ValueError, match="cap must be positive"):
        importance_sampling_weights(x, x, x, cap=0.0)
    with pytest.raises(ValueError, match=r"must all be \[B, T\]"):
        importance_sampling_weights(x, torch.zeros(2, 4), x)
