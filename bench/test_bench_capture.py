"""Generation with capture and saliency against plain SDPA generation, and against the public code's way.

Same model, prompts and completions in all three runs: every rollout is steered along a scripted,
well-formed completion (a long think, a short tagged answer) by a logits processor, so that the
saliency work is real and every run generates the same number of tokens.

- ours: :func:`saliency_r1.saliency.generate_with_saliency` (capture during ``generate``, then one
  ``layer_saliency`` call per layer for the batch);
- plain: ``model.generate`` with SDPA (time and peak-memory goals: at most +5 % and +10 %);
- public: eager attention with ``output_attentions=True`` during ``generate`` (what the Saliency-R1 code
  does), before any saliency is computed from it; goal: at least 10x more extra memory than ours.

CPU: a small model (4 layers, hidden 256), 4 rollouts, 256 image tokens, 64 new tokens, one thread
(the CI machine is shared; one thread keeps the timings from measuring the neighbours). CUDA (only when
present): the language model at Qwen2.5-VL-3B's configuration with random weights in bf16 (the vision
tower stays tiny: it is not captured and runs once), 8 rollouts, 1,024 image tokens, 512 new tokens.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList

from common import (DEVICES, QWEN2_5_VL_3B_TEXT_MODEL, SMALL_TEXT_MODEL, ScriptedRows,
                    measure_peak_memory, one_cpu_thread, peak_tensor_bytes, report, scripted_completions,
                    time_median)
from saliency_r1.capture import text_attention
from saliency_r1.saliency import generate_with_saliency
from saliency_r1.tiny import build_tiny_model, build_tiny_processor

CONFIGS = {
    "cpu": dict(model=SMALL_TEXT_MODEL,
                dtype=torch.float32, image=448, rollouts=4, new_tokens=64, rounds=5),
    "cuda": dict(model=QWEN2_5_VL_3B_TEXT_MODEL,
                 dtype=torch.bfloat16, image=896, rollouts=8, new_tokens=512, rounds=3),
}


def _setup(device: str):
    cfg = CONFIGS[device]
    processor = build_tiny_processor(max_pixels=cfg["image"] ** 2)
    with torch.device(device):  # initialise the random weights where they will run
        model = build_tiny_model(processor, dtype=cfg["dtype"], **cfg["model"])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(cfg["image"], cfg["image"], 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the circle?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text] * cfg["rollouts"], images=[image] * cfg["rollouts"], return_tensors="pt").to(device)
    script = scripted_completions(processor.tokenizer, 1, cfg["new_tokens"], " red circle ")[0]
    return cfg, processor, model, inputs, script


@pytest.mark.parametrize("device", DEVICES)
def test_bench_generation_with_capture(benchmark, device):
    cuda = device == "cuda"
    with one_cpu_thread(device):
        cfg, processor, model, inputs, script = _setup(device)
        n = cfg["new_tokens"]
        image_tokens = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
        weights = sum(p.numel() * p.element_size() for p in model.parameters())

        def common():
            return dict(max_new_tokens=n, do_sample=False, logits_processor=LogitsProcessorList([ScriptedRows([script] * cfg["rollouts"])]))

        def ours():
            result = generate_with_saliency(model, processor, inputs, **common())
            if cuda:
                torch.cuda.synchronize()
            return result

        @torch.no_grad()
        def plain():
            return model.generate(**inputs, **common())

        @torch.no_grad()
        def public():
            with text_attention(model, "eager"):
                out = model.generate(**inputs, **common(), output_attentions=True, return_dict_in_generate=True)
            return out.sequences

        result = ours()  # warm-up, and the figures that do not depend on timing
        assert result.valid.tolist() == [1.0] * cfg["rollouts"]
        assert result.sequences.shape[1] - result.prompt_length == n
        assert torch.equal(result.sequences, plain())

        # Ours and plain alternate, and each keeps its fastest round: on a shared machine the neighbours'
        # load comes and goes, and alternating exposes both runs to it alike (the minimum is the run
        # least disturbed). pytest-benchmark records ours as well.
        ours_times, plain_times = [], []
        for _ in range(cfg["rounds"]):
            plain_times.append(time_median(plain, rounds=1, warmup=0, cuda=cuda))
            ours_times.append(time_median(ours, rounds=1, warmup=0, cuda=cuda))
        benchmark.pedantic(ours, warmup_rounds=0, rounds=1)
        ours_s, plain_s = min(ours_times), min(plain_times)
        public_s = time_median(public, rounds=1, warmup=0, cuda=cuda)

        def peak(fn):
            gc.collect()
            return measure_peak_memory(fn, cuda=True) if cuda else peak_tensor_bytes(fn)

        _, plain_peak = peak(plain)
        last, ours_peak = peak(ours)
        _, public_peak = peak(public)
        # What ours adds is what it holds (the captured rows) or its peak excess, whichever is larger: when
        # the capture fits under the prefill's peak, the peaks alone would show no cost at all.
        extra_ours = max(ours_peak - plain_peak, last.captured_bytes)
        extra_public = public_peak - plain_peak
        common_notes = dict(rollouts=cfg["rollouts"], image_tokens=image_tokens, new_tokens=n,
                            layers=cfg["model"]["num_hidden_layers"], hidden=cfg["model"]["hidden_size"],
                            dtype=str(cfg["dtype"]).replace("torch.", ""),
                            captured_MiB=round(last.captured_bytes / 2 ** 20, 2),
                            saliency_s=round(last.timings["saliency"], 4))
        report(benchmark, f"generate + capture + saliency vs plain SDPA generate ({device})", ours_s=ours_s,
               baseline_s=plain_s, ours_peak=ours_peak, baseline_peak=plain_peak,
               time_overhead=f"{100 * (ours_s / plain_s - 1):+.1f}%",
               memory_overhead=f"{100 * (ours_peak / max(plain_peak, 1) - 1):+.1f}%",
               memory_overhead_with_weights=f"{100 * (ours_peak - plain_peak) / (plain_peak + weights):+.1f}%",
               **common_notes)
        report(benchmark, f"generate + capture + saliency vs output_attentions generate ({device})", ours_s=ours_s,
               baseline_s=public_s, ours_peak=ours_peak, baseline_peak=public_peak,
               extra_memory_ratio=f"{extra_public / extra_ours:.1f}x (extra over plain: ours "
                                  f"{extra_ours / 2 ** 20:.1f} MiB, public {extra_public / 2 ** 20:.1f} MiB)",
               **common_notes)
