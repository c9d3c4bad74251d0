"""Qwen2.5-VL: the Qwen2-VL layout (14-px patches, 2 x 2 merge, ``<|image_pad|>`` tokens) with a windowed
vision tower, which the capture leaves alone."""

from saliency_r1.adapters.base import QwenVLAdapter, register_adapter


@register_adapter
class Qwen2_5_VLAdapter(QwenVLAdapter):
    """``Qwen2_5_VLForConditionalGeneration``."""

    model_types = ("qwen2_5_vl",)
    processor_class = "Qwen2_5_VLProcessor"
