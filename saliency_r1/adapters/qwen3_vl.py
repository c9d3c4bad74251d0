"""Qwen3-VL: 16-px patches merged 2 x 2 into 32-px image tokens. Its "deepstack" adds features of some
vision layers to the residual stream at the image positions after the first language layers: they
are part of the values the saliency reads at those positions, so nothing in the layout differs."""

from saliency_r1.adapters.base import QwenVLAdapter, register_adapter


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    """``Qwen3VLForConditionalGeneration``."""

    model_types = ("qwen3_vl",)
    processor_class = "Qwen3VLProcessor"
