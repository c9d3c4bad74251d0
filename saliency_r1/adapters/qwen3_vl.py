"""Qwen3-VL: 16-px patches merged 2 x 2 into 32-px image tokens, and "deepstack": features of some vision
layers are added to the residual stream at the image positions after the first language layers."""

from saliency_r1.adapters.base import QwenVLAdapter, register_adapter


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    """``Qwen3VLForConditionalGeneration``."""

    model_types = ("qwen3_vl",)

    @property
    def deepstack_layers(self) -> tuple[int, ...]:
        # Qwen3VLTextModel adds the k-th deepstack feature after decoder layer k, for each of the vision
        # layers named in deepstack_visual_indexes.
        indexes = getattr(self.model.config.vision_config, "deepstack_visual_indexes", ()) or ()
        return tuple(range(len(indexes)))
