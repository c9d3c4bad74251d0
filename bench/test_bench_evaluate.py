"""The faithfulness evaluation of one sample (``docs/method.md`` section 8): the maps of every source from one
teacher-forced capture, then the deletion and insertion curves of all six sources on the default grid
(16 steps plus the reported points: 20 fractions), every perturbed image scored in batched forwards.

Baseline, timed in the same run: explaining the same completion once (one teacher-forced forward with
capture and the ``cot`` map, what ``saliency-r1 explain --completion`` does), so the ratio reads as "a
faithfulness sample costs N explanations".

CPU: the demo's tiny model on a 112 px image (4 x 4 image tokens), the CPU use case. CUDA (only when
present): the language model at Qwen2.5-VL-3B's configuration with random weights in bf16, a 448 px
image (256 image tokens) and a 256-token completion; the time per sample is what a GPU evaluation costs.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from PIL import Image

from common import (DEVICES, QWEN2_5_VL_3B_TEXT_MODEL, measure_peak_memory, peak_tensor_bytes, report,
                    scripted_completions, time_median)
from saliency_r1.adapters import get_adapter
from saliency_r1.faithfulness import MAP_SOURCES, FaithfulnessOptions, deletion_insertion, source_rankings
from saliency_r1.prompts import SYSTEM_PROMPT, prompt_inputs
from saliency_r1.saliency import PATHS, saliency_for_completions, saliency_for_completions_by_path
from saliency_r1.tiny import build_tiny_model, build_tiny_processor

CONFIGS = {
    "cpu": dict(model={}, dtype=torch.float32, image=112, new_tokens=24, batch=32),
    "cuda": dict(model=QWEN2_5_VL_3B_TEXT_MODEL, dtype=torch.bfloat16, image=448, new_tokens=256, batch=32),
}


@pytest.mark.parametrize("device", DEVICES)
def test_bench_faithfulness_per_sample(benchmark, device):
    cuda = device == "cuda"
    cfg = CONFIGS[device]
    processor = build_tiny_processor(max_pixels=cfg["image"] ** 2)
    with torch.device(device):
        model = build_tiny_model(processor, dtype=cfg["dtype"], **cfg["model"]).eval()
    adapter = get_adapter(model)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(cfg["image"], cfg["image"], 3),
                                                              dtype=np.uint8))
    example = {"image": image, "problem": "what colour is the circle?"}
    inputs = prompt_inputs(processor, adapter, [example], SYSTEM_PROMPT).to(device)
    completion = [scripted_completions(processor.tokenizer, 1, cfg["new_tokens"], " red ")[0]]
    options = FaithfulnessOptions(batch_size=cfg["batch"])

    def explanation():
        return saliency_for_completions(model, processor, inputs, completion, adapter=adapter)

    def ours():
        by_path = saliency_for_completions_by_path(model, processor, inputs, completion, paths=PATHS, adapter=adapter,
                                                   attention=True)
        spans = by_path["cot"].spans[0]
        assert spans.valid
        maps = {path: by_path[path].maps[0][0] for path in PATHS} | {
            "attention": by_path["cot"].answer_attention_maps[0][0]}
        rankings = source_rankings(maps, (image.height, image.width), seed=0, index=0)
        return deletion_insertion(model, processor, adapter, image, example["problem"],
                                  by_path["cot"].completion_ids[0], spans.answer, rankings, options,
                                  system_prompt=SYSTEM_PROMPT)

    def peak(fn):
        gc.collect()
        return measure_peak_memory(fn, cuda=True) if cuda else peak_tensor_bytes(fn)

    with torch.no_grad():
        curves = ours()
        assert set(curves) == set(MAP_SOURCES)
        assert all(len(c["deletion"]) == len(options.fractions) for c in curves.values())
        _, ours_peak = peak(ours)
        _, baseline_peak = peak(explanation)
        benchmark.pedantic(ours, warmup_rounds=0, rounds=3 if not cuda else 2)
        baseline_s = time_median(explanation, rounds=3, cuda=cuda)
    ours_s = benchmark.stats.stats.median
    images = 2 * len(MAP_SOURCES) * (len(options.fractions) - 2) + 2  # the two ends are shared
    report(benchmark, f"faithfulness of one sample, 6 map sources x 20 fractions ({device}) vs one explanation",
           ours_s=ours_s, baseline_s=baseline_s, ours_peak=ours_peak, baseline_peak=baseline_peak,
           perturbed_images=images, per_image_ms=round(1e3 * ours_s / images, 2),
           layers=model.config.text_config.num_hidden_layers,
           image_tokens=sum(h * w for h, w in adapter.image_grids(inputs["image_grid_thw"])),
           completion_tokens=cfg["new_tokens"], dtype=str(cfg["dtype"]).replace("torch.", ""))
