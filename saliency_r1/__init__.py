"""saliency-r1: saliency-map rewards that teach vision-language models to look where they reason."""

from saliency_r1.ops import layer_saliency, reward

__all__ = ["layer_saliency", "reward"]
