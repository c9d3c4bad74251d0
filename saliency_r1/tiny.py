"""A tiny Qwen2.5-VL built entirely in code: tokenizer, processor and randomly initialised model.

No weights or vocabularies can be downloaded in tests, CI or the CPU demo, so everything the
real checkpoints ship is built here: a byte-level BPE tokenizer trained on a small built-in corpus
(so the demo's words are single tokens and generation stays short), Qwen's special tokens, the
``<think>``/``<answer>`` tags as single ordinary tokens, Qwen's chat template, Qwen2-VL's image processor with small pixel bounds, and a model of a few layers that
runs ``generate`` in milliseconds.

>>> processor = build_tiny_processor()
>>> model = build_tiny_model(processor)
>>> model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
True
"""

from __future__ import annotations

import functools
import json

import torch

from saliency_r1.prompts import SYSTEM_PROMPT

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)
# One token each, but not special: decoding with skip_special_tokens=True (as TRL does) must keep
# them, or the format and accuracy rewards would never see the tags.
TEMPLATE_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2.5-VL's chat template, reduced to what the tiny model needs: text and image parts, an
# optional system message, and the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words of the synthetic grounded-VQA set and of the reasoning template, so that each becomes one
# token; anything else still tokenises (byte-level), only into more pieces.
_CORPUS_WORDS = """
a an the is are of in on at to and or what which where how many colour color shape object objects
image picture look looking left right top bottom middle centre center upper lower corner side
red green blue yellow orange purple pink white black gray grey brown cyan magenta light dark pale deep bright
circle square triangle star cross diamond ring rectangle shape shapes background clutter
answer question think reasoning step first then so therefore because see i it this that there
one two three four five six seven eight nine ten zero yes no true false option options
A B C D E 0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ( ) [ ] - + = /
""".split()


def _corpus() -> list[str]:
    words = _CORPUS_WORDS + [word.capitalize() for word in _CORPUS_WORDS if word.isalpha()]
    lines = [" ".join(words)]
    lines += [f"{word} " * 8 for word in words]
    lines.append(SYSTEM_PROMPT)
    return lines


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS + TEMPLATE_TAGS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    data = json.loads(tokenizer.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] in SPECIAL_TOKENS
    return json.dumps(data)


def build_tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"  # batched generation appends after the prompt
    return tokenizer


def _image_processor_class():
    # transformers >= 5.2x splits a PIL backend off; it needs no torchvision (absent on CPU here).
    try:
        from transformers import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil
    except ImportError:
        from transformers import Qwen2VLImageProcessor
        return Qwen2VLImageProcessor


def build_tiny_processor(min_pixels: int = 56 * 56, max_pixels: int = 224 * 224, vocab_size: int = 1024):
    """A ``Qwen2_5_VLProcessor`` whose tokenizer is built in code.

    Images are resized to multiples of 28 px within ``[min_pixels, max_pixels]``: a 224 x 224 image
    becomes an 8 x 8 grid of image tokens.
    """
    image_processor = _image_processor_class()(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    from saliency_r1.models import image_only_processor_class

    tokenizer = build_tiny_tokenizer(vocab_size)
    return image_only_processor_class("Qwen2_5_VLProcessor")(image_processor=image_processor, tokenizer=tokenizer,
                                                             chat_template=CHAT_TEMPLATE)


def tiny_config(processor, **overrides):
    """A ``Qwen2_5_VLConfig`` of two language layers (hidden 64, 4 query / 2 key-value heads) and
    one vision block, with the token ids of ``processor``'s tokenizer.

    ``overrides`` set text-config fields (``num_hidden_layers=4``, ``hidden_size=128``, ...).
    """
    from transformers import Qwen2_5_VLConfig

    tokenizer = processor.tokenizer
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                tie_word_embeddings=False, bos_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text.update(overrides)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # mrope sections split head_dim / 2 rotary frequencies over (time, height, width).
    half = head_dim // 2
    text["rope_parameters"] = dict(text["rope_parameters"],
                                   mrope_section=[half - 2 * (half // 3), half // 3, half // 3])
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids,
                            tie_word_embeddings=text["tie_word_embeddings"])


def build_tiny_model(processor, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     attn_implementation: str = "sdpa", **overrides):
    """A randomly initialised tiny ``Qwen2_5_VLForConditionalGeneration`` (see :func:`tiny_config`)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config(processor, **overrides)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation,
                                                            dtype=dtype)
    generation = model.generation_config
    generation.eos_token_id = processor.tokenizer.eos_token_id
    generation.pad_token_id = processor.tokenizer.pad_token_id
    generation.bos_token_id = processor.tokenizer.pad_token_id
    return model.eval()
