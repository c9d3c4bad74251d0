"""Qwen2-VL: 14-px patches merged 2 x 2 into 28-px image tokens; images enter only as token embeddings."""

from saliency_r1.adapters.base import QwenVLAdapter, register_adapter


@register_adapter
class Qwen2VLAdapter(QwenVLAdapter):
    """``Qwen2VLForConditionalGeneration``."""

    model_types = ("qwen2_vl",)
    processor_class = "Qwen2VLProcessor"
