"""Our lean GRPO loop: configuration, loss, checkpoints, the loop itself, and its plots."""

from saliency_r1.grpo.config import TrainConfig, parse_config
from saliency_r1.grpo.loss import group_advantages, kl_k3, policy_loss

__all__ = ["TrainConfig", "group_advantages", "kl_k3", "parse_config", "policy_loss"]
