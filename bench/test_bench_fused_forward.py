"""The fused forward (:func:`saliency_r1.saliency.saliency_fused_forward`: maps and log-probs of given completions
from one teacher-forced forward without a cache) against the plain no-grad forward the trainer runs for the
old policy's log-probs (:func:`saliency_r1.logps.completion_logps`), same batch, same run.

Goals: at most +5% time and +5% peak memory. CPU: the language model at Qwen2.5-VL-3B's layer shapes with
2 layers (a whole 36-layer forward of this batch takes minutes on 2 cores), float32, 8 rollouts of one
prompt with 1,024 image tokens and scripted 512-token completions (a long think, a tagged answer). CUDA
(only when present): all 36 layers in bf16. Memory on CPU is the profiler's tensor allocations during the
call (the weights are not counted in either); on CUDA the caching allocator's peak.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from PIL import Image

from common import (DEVICES, QWEN2_5_VL_3B_TEXT_MODEL, measure_peak_memory, peak_tensor_bytes, report,
                    scripted_completions, time_median)
from saliency_r1.logps import completion_logps, pad_completions
from saliency_r1.saliency import saliency_fused_forward
from saliency_r1.tiny import build_tiny_model, build_tiny_processor

CONFIGS = {
    "cpu": dict(model={**QWEN2_5_VL_3B_TEXT_MODEL, "num_hidden_layers": 2, "tie_word_embeddings": True},
                dtype=torch.float32, image=896, rollouts=8, new_tokens=512, rounds=3),
    "cuda": dict(model=QWEN2_5_VL_3B_TEXT_MODEL, dtype=torch.bfloat16, image=896, rollouts=8, new_tokens=512,
                 rounds=5),
}


@pytest.mark.parametrize("device", DEVICES)
def test_bench_fused_forward_against_the_old_policy_forward(benchmark, device):
    cuda = device == "cuda"
    cfg = CONFIGS[device]
    processor = build_tiny_processor(max_pixels=cfg["image"] ** 2)
    with torch.device(device):
        model = build_tiny_model(processor, dtype=cfg["dtype"], **cfg["model"]).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(cfg["image"], cfg["image"], 3),
                                                              dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the circle?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text] * cfg["rollouts"], images=[image] * cfg["rollouts"], return_tensors="pt").to(device)
    completions = scripted_completions(processor.tokenizer, cfg["rollouts"], cfg["new_tokens"], " red ")
    body, mask = pad_completions([torch.tensor(c) for c in completions], processor.tokenizer.pad_token_id, device)

    @torch.no_grad()
    def plain():
        return completion_logps(model, dict(inputs), body, mask, temperature=1.0)

    def ours():
        return saliency_fused_forward(model, processor, inputs, completions)

    def peak(fn):
        gc.collect()
        return measure_peak_memory(fn, cuda=True) if cuda else peak_tensor_bytes(fn)

    result = ours()
    assert result.valid.tolist() == [1.0] * cfg["rollouts"]
    torch.testing.assert_close(result.completion_logps, plain(), rtol=1e-3, atol=1e-3)
    _, plain_peak = peak(plain)
    _, ours_peak = peak(ours)
    benchmark.pedantic(ours, warmup_rounds=0, rounds=cfg["rounds"])
    ours_s = benchmark.stats.stats.median
    plain_s = time_median(plain, rounds=cfg["rounds"], warmup=0, cuda=cuda)
    time_overhead, memory_overhead = ours_s / plain_s - 1, ours_peak / max(plain_peak, 1) - 1
    image_tokens = sum(h * w for h, w in result.image_grids[0])
    report(benchmark, f"fused forward (maps + log-probs, no cache) vs the old-policy log-prob forward ({device}), "
                      "Qwen2.5-VL-3B layer shapes", ours_s=ours_s, baseline_s=plain_s, ours_peak=ours_peak,
           baseline_peak=plain_peak, time_overhead=f"{100 * time_overhead:+.1f}% (goal <= 5%)",
           memory_overhead=f"{100 * memory_overhead:+.1f}% (goal <= 5%)",
           layers=cfg["model"]["num_hidden_layers"], rollouts=cfg["rollouts"], image_tokens=image_tokens,
           new_tokens=cfg["new_tokens"], dtype=str(cfg["dtype"]).replace("torch.", ""))
