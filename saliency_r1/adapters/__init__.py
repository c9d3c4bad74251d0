"""Model adapters: one small interface (:class:`ModelAdapter`) and one file per model family.

>>> from saliency_r1.adapters import get_adapter
>>> adapter = get_adapter(model)            # picked by model.config.model_type  # doctest: +SKIP
>>> adapter.image_token_id, adapter.num_heads, adapter.o_proj_weight(0).shape  # doctest: +SKIP

Adding a family: a file here with a subclass of :class:`QwenVLAdapter` (same layout) or of
:class:`ModelAdapter` (any layout), decorated with :func:`register_adapter`, and its import below.
Every family file only reads attributes of a model it is given, so it imports on any transformers version.
"""

from saliency_r1.adapters.base import (ModelAdapter, QwenVLAdapter, adapter_class, get_adapter, register_adapter,
                                       supported_model_types)
from saliency_r1.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from saliency_r1.adapters.qwen2_vl import Qwen2VLAdapter
from saliency_r1.adapters.qwen3_vl import Qwen3VLAdapter

__all__ = ["ModelAdapter", "QwenVLAdapter", "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter",
           "adapter_class", "get_adapter", "register_adapter", "supported_model_types"]
