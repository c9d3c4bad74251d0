"""Deletion and insertion (docs/method.md section 8): rankings, perturbations, and the batched scores against
an unbatched brute force over the model's full logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from saliency_r1.adapters import get_adapter
from saliency_r1.faithfulness import (FaithfulnessOptions, area_under_curve, baseline_pixels, curve_summary,
                                      deletion_insertion, fraction_grid, gaussian_scores, perturbed, pixel_ranking,
                                      random_scores, source_rankings, upsample_map)
from saliency_r1.prompts import SYSTEM_PROMPT, chat_messages
from saliency_r1.tiny import build_tiny_model, build_tiny_processor


@pytest.mark.parametrize("steps", [1, 4, 16, 20, 64])
def test_the_grid_holds_zero_one_and_the_reported_points(steps):
    grid = fraction_grid(steps)
    assert grid == sorted(set(grid)) and grid[0] == 0.0 and grid[-1] == 1.0
    assert {0.05, 0.15, 0.3} <= set(grid) and len(grid) >= steps + 1
    assert all(i / steps in grid or abs(min(abs(g - i / steps) for g in grid)) < 1e-12 for i in range(steps + 1))


@pytest.mark.parametrize("field, value", [("steps", 0), ("baseline", "white"), ("batch_size", 0)])
def test_options_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        FaithfulnessOptions(**{field: value})


def test_ranking_is_descending_with_ties_in_raster_order():
    scores = torch.tensor([[1.0, 3.0, 3.0], [-2.0, 0.0, 3.0]])
    assert pixel_ranking(scores).tolist() == [1, 2, 5, 0, 4, 3]


def test_the_upsampled_map_keeps_its_sign():
    """Negative cells rank below zero cells: the ranking reads the raw map, not relu of it."""
    grid = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    full = upsample_map(grid, 8, 8)
    assert float(full.min()) < 0 < float(full.max())
    order = pixel_ranking(full)
    assert int(order[0]) == 0 and int(order[-1]) == 63  # the top-left corner first, the bottom-right last


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 9), width=st.integers(1, 9), fraction=st.floats(0, 1), seed=st.integers(0, 1000),
       mode=st.sampled_from(["deletion", "insertion"]))
def test_a_perturbation_changes_exactly_the_top_pixels(height, width, fraction, seed, mode):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(1, 256, size=(height, width, 3), dtype=np.uint8)
    baseline = np.zeros_like(pixels)
    ranking = pixel_ranking(torch.from_numpy(rng.random((height, width))))
    count = int(round(fraction * height * width))
    out = perturbed(pixels, baseline, ranking, count, mode).reshape(-1, 3)
    top = set(ranking[:count].tolist())
    for index in range(height * width):
        from_image = index not in top if mode == "deletion" else index in top
        expected = pixels.reshape(-1, 3)[index] if from_image else baseline.reshape(-1, 3)[index]
        assert (out[index] == expected).all()


def test_baselines():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    assert (baseline_pixels(pixels, "black") == 0).all()
    mean = baseline_pixels(pixels, "mean")
    assert mean.shape == pixels.shape and (mean == mean[0, 0]).all()
    np.testing.assert_allclose(mean[0, 0], pixels.reshape(-1, 3).mean(0), atol=0.5)
    blur = baseline_pixels(pixels, "blur")
    assert blur.shape == pixels.shape and blur.std() < pixels.std() / 2  # noise is smoothed away
    with pytest.raises(ValueError, match="baseline"):
        baseline_pixels(pixels, "white")


def test_random_ranking_is_seeded_per_sample_and_gaussian_is_centred():
    assert torch.equal(random_scores(5, 7, 3, 11), random_scores(5, 7, 3, 11))
    assert not torch.equal(random_scores(5, 7, 3, 11), random_scores(5, 7, 3, 12))
    assert not torch.equal(random_scores(5, 7, 3, 11), random_scores(5, 7, 4, 11))
    centre = int(pixel_ranking(gaussian_scores(9, 11))[0])
    assert divmod(centre, 11) == (4, 5)
    rankings = source_rankings({"cot": torch.ones(2, 2)}, (6, 4), seed=0, index=0)
    assert set(rankings) == {"cot", "random", "gaussian"}
    assert all(sorted(r.tolist()) == list(range(24)) for r in rankings.values())  # every pixel exactly once


def test_area_and_reported_points():
    fractions = fraction_grid(4)
    curve = {"deletion": [1 - r for r in fractions], "insertion": [r * r for r in fractions]}
    summary = curve_summary(fractions, curve)
    assert summary["deletion_auc"] == pytest.approx(0.5)
    assert summary["insertion_auc"] == pytest.approx(1 / 3, abs=0.03)  # the trapezoid over this grid
    assert summary["deletion_5"] == pytest.approx(0.95) and summary["deletion_30"] == pytest.approx(0.7)
    assert summary["insertion_30"] == pytest.approx(0.09)
    assert area_under_curve([0.0, 1.0], [2.0, 2.0]) == 2.0


@torch.no_grad()
def _brute_force_score(model, processor, image, question, completion, answer):
    """One image alone, no padding: the full logits' softmax at the rows that predicted the answer tokens.
    (The package's log-probs are float32: agreement to 1e-6 relative.)"""
    messages = chat_messages(get_adapter(model), question, SYSTEM_PROMPT)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[[image]], return_tensors="pt")
    P = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"][0], torch.as_tensor(completion)])[None]
    extra = {}
    if "mm_token_type_ids" in inputs:  # where the image tokens are, for the rotary positions
        extra["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"][0], torch.zeros(len(completion),
                                                                                            dtype=torch.long)])[None]
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                   image_grid_thw=inputs["image_grid_thw"], **extra).logits[0].double()
    probabilities = logits.softmax(-1)
    return float(np.mean([float(probabilities[P + k - 1, completion[k]]) for k in answer]))


@pytest.mark.slow
def test_batched_scores_equal_each_image_scored_alone():
    """Every point of every curve is the answer's mean probability for that perturbed image, computed alone;
    the ends are shared by all sources (the original image, the all-baseline image)."""
    processor = build_tiny_processor()
    model = build_tiny_model(processor, dtype=torch.float64, seed=2).eval()
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8))
    tokens = processor.tokenizer("<think>red circle</think><answer>dark</answer>", add_special_tokens=False)["input_ids"]
    completion = torch.tensor(tokens + [processor.tokenizer.eos_token_id])
    answer = [len(tokens) - 2]  # "dark": between <answer> and </answer>, one token in the tiny vocabulary
    assert processor.tokenizer.decode(completion[answer]).strip() == "dark"
    grid_maps = {"cot": torch.from_numpy(rng.standard_normal((2, 3))), "attention": torch.rand(2, 3, dtype=torch.float64)}
    rankings = source_rankings(grid_maps, (56, 84), seed=0, index=0)
    options = FaithfulnessOptions(steps=4, baseline="mean", batch_size=3)
    curves = deletion_insertion(model, processor, get_adapter(model), image, "what?", completion, answer, rankings,
                                options, system_prompt=SYSTEM_PROMPT)
    pixels = np.asarray(image)
    baseline = baseline_pixels(pixels, "mean")
    original = _brute_force_score(model, processor, image, "what?", completion, answer)
    emptied = _brute_force_score(model, processor, Image.fromarray(baseline), "what?", completion, answer)
    for name, ranking in rankings.items():
        for mode in ("deletion", "insertion"):
            for fraction, got in zip(options.fractions, curves[name][mode]):
                count = int(round(fraction * pixels.shape[0] * pixels.shape[1]))
                picture = Image.fromarray(perturbed(pixels, baseline, ranking, count, mode))
                want = _brute_force_score(model, processor, picture, "what?", completion, answer)
                assert got == pytest.approx(want, rel=1e-6, abs=1e-12), (name, mode, fraction)
        assert curves[name]["deletion"][0] == pytest.approx(original) == curves[name]["insertion"][-1]
        assert curves[name]["deletion"][-1] == pytest.approx(emptied) == curves[name]["insertion"][0]
