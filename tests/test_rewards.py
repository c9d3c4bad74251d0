"""Reward functions in TRL's form: format, accuracy, saliency."""

import doctest

import pytest
import torch
from PIL import Image

import saliency_r1.rewards as rewards_module
from saliency_r1.metrics import energy_in_boxes, pixel_boxes
from saliency_r1.rewards import (accuracy_reward, answers_match, completion_text, format_reward, saliency_in_box,
                                 saliency_reward)


def test_doctests():
    assert doctest.testmod(rewards_module).failed == 0


FORMAT_CASES = [
    ("<think>red square</think><answer>red</answer>", 1.0),
    ("  <think> a\nb </think>\n<answer> red </answer>", 1.0),
    ("<think></think><answer>red</answer>", 1.0),           # an empty reasoning is well formed
    ("<think>x</think><answer> </answer>", 0.0),            # empty answer
    ("<think>x</think> red", 1.0),                          # the plain template: the answer runs to the end
    ("<think>x</think> ", 0.0),                             # ... and must hold something
    ("<answer>red</answer><think>x</think>", 0.0),
    ("<think>x</think><answer>red</answer> and more", 0.0),
    ("<think><think>x</think><answer>a</answer>", 0.0),     # nested tag
    ("<think>x</think><answer>red", 0.0),                   # answer not closed
    ("red", 0.0),
]


@pytest.mark.parametrize("text, expected", FORMAT_CASES)
def test_format(text, expected):
    assert format_reward([text]) == [expected]
    assert format_reward([text + "<|im_end|>"]) == format_reward([text + "<|endoftext|><|endoftext|>"]) == [expected]


@pytest.mark.parametrize("text, expected", FORMAT_CASES)
def test_format_reward_is_the_spans_predicate(text, expected):
    """One definition of a well-formed completion: the format reward on the text and the spans on its
    token ids agree, for a completion that ended with its end-of-turn token."""
    from saliency_r1.spans import find_spans
    from saliency_r1.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert find_spans(ids, tokenizer).valid == bool(expected) == bool(format_reward([text])[0])
    if text.endswith("red") and "<answer>" not in text:  # a plain answer cut off: the ids know, text cannot
        assert not find_spans(ids[:-1], tokenizer).valid


@pytest.mark.parametrize("prediction, solution, expected", [
    ("red", "red", True), ("The Red.", "red", True), ("blue", "red", False),
    ("B", "B", True), ("(B)", "B", True), ("B. a cat", "(B) cat", True), ("b", "B", False), ("C", "B", False),
    ("3", "3.0", True), ("3.0000001", "3", True), ("3.1", "3", False), ("1,000", "1000", True),
    ("50%", "50", True), ("-2", "-2.0", True), ("two", "2", False),
    # Free text starting with a capital word is not a choice letter.
    ("a red circle", "A red circle", True), ("A blue square", "A red circle", False),
    ("I think so", "I don't know", False), ("B: a dog", "B) a dog", True),
])
def test_answers_match(prediction, solution, expected):
    assert answers_match(prediction, solution) is expected


def test_accuracy_reads_the_answer_the_format_predicate_finds():
    """Format and accuracy agree on what the answer is: a plain answer counts, an answer without its
    reasoning does not (it scored accuracy 1 with format 0 before)."""
    completions = ["red", "<think>x</think><answer>red</answer>", "<think>red dark</think> red", "<answer>red</answer>",
                   "<think>x</think><answer>red</answer> and more"]
    assert accuracy_reward(completions, solution=["red"] * 5) == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert [a * f for a, f in zip(accuracy_reward(completions, solution=["red"] * 5), format_reward(completions))] == \
        accuracy_reward(completions, solution=["red"] * 5)  # accurate implies well formed
    with pytest.raises(ValueError, match="solution"):
        accuracy_reward(["a", "b"], solution=["a"])


def test_conversational_completions():
    message = [{"role": "assistant", "content": "<think>x</think><answer>red</answer>"}]
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "<think>x</think><answer>red</answer>"}]}]
    assert completion_text(message) == completion_text(parts) == "<think>x</think><answer>red</answer>"
    assert format_reward([message, parts]) == [1.0, 1.0]
    with pytest.raises(TypeError, match="completion"):
        completion_text(3)


@pytest.mark.parametrize("grid, size", [((4, 4), (112, 112)), ((3, 5), (90, 150)), ((6, 42), (123, 431))])
def test_saliency_reward_is_the_energy_in_the_box(grid, size):
    g = torch.Generator().manual_seed(grid[1])
    maps = [[torch.randn(grid, generator=g)] for _ in range(3)]
    boxes = ["[0.1,0.2,0.5,0.6]", "[[0.0,0.0,0.3,1.0],[0.2,0.5,0.9,0.9]]", "[0.5,0.5,1.0,1.0]"]
    image = Image.new("RGB", (size[1], size[0]))
    valid = [1.0, 1.0, 0.0]
    completions = ["<think> x </think><answer> y </answer>"] * 3
    got = saliency_reward(completions, saliency_maps=maps, bbox=boxes, image=[image] * 3, saliency_valid=valid)
    from saliency_r1.data.loader import parse_normalised_boxes

    expected = [energy_in_boxes(m[0], size, pixel_boxes(parse_normalised_boxes(b), *size)) * v
                for m, b, v in zip(maps, boxes, valid)]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert got[2] == 0.0  # invalid completion
    tensor = saliency_in_box([m[0] for m in maps], boxes, [size] * 3, torch.tensor(valid))
    assert tensor.dtype == torch.float32 and tensor.tolist() == pytest.approx(got)
    assert saliency_reward(completions, saliency_maps=maps, bbox=boxes, images=[[image]] * 3,  # TRL's "images" form
                           saliency_valid=valid) == got
    # Without the validity from the token ids, the text's: one predicate either way.
    assert saliency_reward(["<think> x </think><answer> y"] * 3, saliency_maps=maps, bbox=boxes,
                           image=[image] * 3) == [0.0] * 3
    assert saliency_reward(completions[:2], saliency_maps=maps[:2], bbox=boxes[:2],
                           image=[image] * 2) == pytest.approx(expected[:2], rel=1e-5, abs=1e-6)


def test_saliency_reward_names_missing_inputs():
    grid = [[torch.ones(2, 2)]]
    with pytest.raises(ValueError, match="image"):
        saliency_reward([""], saliency_maps=grid, bbox=["[0,0,1,1]"])
    with pytest.raises(ValueError, match="one entry per completion"):
        saliency_reward([""], saliency_maps=grid, bbox=["[0,0,1,1]", "[0,0,1,1]"], image=[Image.new("RGB", (4, 4))])
    no_map = saliency_reward(["<think>x</think><answer>y</answer>"], saliency_maps=[[]], bbox=["[0,0,1,1]"],
                             image=[Image.new("RGB", (4, 4))])
    assert no_map == [0.0]
