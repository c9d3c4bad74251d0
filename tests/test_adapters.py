"""Model adapters: each family's answers against the model it wraps.

Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models share the tiny tokenizer; Qwen3-VL gets an image
processor with its 16-px patches. ``family_model`` is also used by tests/test_explain.py to run the
end-to-end brute-force check on every family.
"""

from __future__ import annotations

import pytest
import torch

from saliency_r1.adapters import (ModelAdapter, Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter, get_adapter,
                                  register_adapter)
from saliency_r1.tiny import _image_processor_class, build_tiny_model, build_tiny_processor

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")


def family_processor(family: str):
    """The tiny processor; for Qwen3-VL with 16-px patches (32-px image tokens)."""
    processor = build_tiny_processor()
    if family == "qwen3_vl":
        lo, hi = 64 * 64, 256 * 256
        processor.image_processor = _image_processor_class()(
            min_pixels=lo, max_pixels=hi, patch_size=16, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": lo, "longest_edge": hi})
    return processor


def family_model(processor, family: str, *, dtype=torch.float64, seed: int = 0, tie: bool = False):
    """A tiny random model of ``family`` whose special token ids are the tiny tokenizer's."""
    if family == "qwen2_5_vl":
        return build_tiny_model(processor, seed=seed, dtype=dtype, tie_word_embeddings=tie)
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    special = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
                    tie_word_embeddings=tie, **special)
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
        cls = Qwen2VLForConditionalGeneration
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        # head_dim 24 != hidden / heads, as in the real Qwen3 models; deepstack into layers 0 and 1.
        text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=1024,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4],
                                     "mrope_interleaved": True},
                    tie_word_embeddings=tie, **special)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0, 1],
                      num_position_embeddings=64)
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
        cls = Qwen3VLForConditionalGeneration
    else:
        raise ValueError(family)
    model = cls._from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


@pytest.mark.parametrize("family,cls", [
    ("qwen2_5_vl", Qwen2_5_VLAdapter),
    ("qwen2_vl", Qwen2VLAdapter),
    ("qwen3_vl", Qwen3VLAdapter),
])
def test_adapter_matches_the_model(family, cls):
    processor = family_processor(family)
    model = family_model(processor, family, dtype=torch.float32)
    adapter = get_adapter(model)
    assert type(adapter) is cls
    text = model.model.language_model
    cfg = model.config.text_config
    assert adapter.text_model is text
    assert adapter.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert adapter.merge_size == 2
    tokenizer = processor.tokenizer
    assert adapter.vision_token_ids == [tokenizer.convert_tokens_to_ids(t) for t in (
        "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")]
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads) == (
        cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert adapter.head_dim == head_dim and adapter.scale == pytest.approx(head_dim ** -0.5)
    assert [m is layer.self_attn for m, layer in zip(adapter.attention_modules, text.layers)] == [True] * cfg.num_hidden_layers
    for layer in range(adapter.num_layers):
        weight = adapter.o_proj_weight(layer)
        assert weight is text.layers[layer].self_attn.o_proj.weight
        assert weight.shape == (cfg.hidden_size, cfg.num_attention_heads * head_dim)
    assert adapter.final_norm is text.norm and adapter.norm_weight is text.norm.weight
    assert adapter.norm_eps == cfg.rms_norm_eps
    assert adapter.unembedding is model.lm_head.weight and adapter.unembedding.shape == (len(processor.tokenizer),
                                                                                          cfg.hidden_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_embeddings_share_the_unembedding(family):
    processor = family_processor(family)
    model = family_model(processor, family, dtype=torch.float32, tie=True)
    adapter = get_adapter(model)
    assert adapter.unembedding.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forced_inputs_and_the_cache(family):
    """The adapter lays out prompt + completion for one forward (per-token type ids extended with text), and
    reads each layer's keys and values back from the cache that forward returns."""
    from saliency_r1.data.synthetic import SyntheticGroundedVQA
    from saliency_r1.prompts import prompt_inputs

    processor = family_processor(family)
    model = family_model(processor, family, dtype=torch.float32)
    adapter = get_adapter(model)
    examples = [SyntheticGroundedVQA(2, seed=1)[i] for i in range(2)]
    prompt = dict(prompt_inputs(processor, adapter, examples, "Answer."))
    user = [m for m in processor.apply_chat_template([{"role": "user", "content": adapter.user_content("q", 2)}],
                                                     tokenize=False).split("<|vision_start|>")]
    assert len(user) == 3  # two image parts, then the question
    completion = torch.tensor([[11, 12, 13], [14, 15, 0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    batch = adapter.teacher_forced_inputs(prompt, completion, mask)
    P = prompt["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][:, P:], completion) and torch.equal(batch["input_ids"][:, :P], prompt["input_ids"])
    assert batch["attention_mask"].dtype == prompt["attention_mask"].dtype
    assert batch["attention_mask"][:, P:].tolist() == [[1, 1, 1], [1, 1, 0]]
    if "mm_token_type_ids" in prompt:
        assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
        assert not batch["mm_token_type_ids"][:, P:].any()
    assert batch["pixel_values"] is prompt["pixel_values"]
    with torch.no_grad():
        output = model(**batch, use_cache=True)
    cache = adapter.output_cache(output)
    for layer in range(adapter.num_layers):
        keys, values = adapter.layer_kv(cache, layer)
        assert keys.shape == values.shape == (2, adapter.num_kv_heads, P + 3, adapter.head_dim)
    with pytest.raises(RuntimeError, match="use_cache=True"):
        adapter.output_cache({"logits": output.logits})


def test_image_positions_and_grids():
    processor = build_tiny_processor()
    adapter = get_adapter(build_tiny_model(processor))
    image = adapter.image_token_id
    ids = torch.tensor([[0, image, image, 3, image], [image, 1, 2, 3, 4]])
    assert [p.tolist() for p in adapter.image_positions(ids)] == [[1, 2, 4], [0]]
    assert adapter.image_grids(torch.tensor([[1, 4, 6], [1, 8, 2]])) == [(2, 3), (4, 1)]
    with pytest.raises(ValueError, match="t == 1"):
        adapter.image_grids(torch.tensor([[2, 4, 4]]))
    with pytest.raises(ValueError, match=r"image_grid_thw must be \[num_images, 3\]"):
        adapter.image_grids(torch.tensor([1, 4, 4]))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, P\]"):
        adapter.image_positions(torch.tensor([1, 2]))


def test_unknown_family_is_named():
    class Config:
        model_type = "llava"

    class Model(torch.nn.Module):
        config = Config()

    with pytest.raises(ValueError, match="no saliency adapter for model_type 'llava'"):
        get_adapter(Model())
    with pytest.raises(ValueError, match="model_types is empty"):
        register_adapter(type("Nameless", (Qwen2VLAdapter,), {"model_types": ()}))
    assert issubclass(Qwen3VLAdapter, ModelAdapter)


def test_lora_wrapped_model_and_o_proj():
    # The adapter sees through peft's wrapper, and a LoRA on o_proj enters W_O as o_proj computes it.
    from peft import LoraConfig, get_peft_model

    processor = build_tiny_processor()
    model = get_peft_model(build_tiny_model(processor), LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    o_proj = model.get_base_model().model.language_model.layers[0].self_attn.o_proj
    torch.nn.init.normal_(o_proj.lora_B["default"].weight)  # B = 0 at init would hide a missing delta
    adapter = get_adapter(model)
    x = torch.randn(3, adapter.num_heads * adapter.head_dim)
    torch.testing.assert_close(o_proj(x), x @ adapter.o_proj_weight(0).T)
    with model.disable_adapter():
        torch.testing.assert_close(o_proj(x), x @ adapter.o_proj_weight(0).T)
