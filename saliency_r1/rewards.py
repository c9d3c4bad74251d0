"""Reward functions in TRL's form: ``f(completions, **kwargs) -> list[float]``.

``completions`` are strings, or TRL's conversational form (a list of messages whose last
``content`` is the text). Dataset columns (``solution``, ``bbox``, ``image``) arrive as keyword
arguments, one entry per completion; the saliency reward also needs the maps that
:class:`saliency_r1.trl.SaliencyGRPOTrainer` (or our own loop) adds as ``saliency_maps``.
"""

from __future__ import annotations

import math
import re
import string

import torch

_FORMAT = re.compile(r"^\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.DOTALL)
_TAG = re.compile(r"</?(think|answer)>")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A choice letter is letter-shaped: "B", "(B) ...", "B. ...", "B: ...", "B) ...". Not "A red circle"
# or "I think so", whose first word is a capital letter followed by a space.
_CHOICE = re.compile(r"^(?:\(([A-Z])\)|([A-Z])(?:[.:)]|$))")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# End-of-turn markers a decoder may leave on a completion (special tokens kept).
_END_OF_TURN = re.compile(r"(\s*(<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|</s>))+\s*$")


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the last message's ``content``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # multimodal message parts
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def is_well_formed(text: str) -> bool:
    """``<think>`` reasoning ``</think>`` then ``<answer>`` answer ``</answer>``, both non-empty, nothing around.

    >>> is_well_formed("<think> the square is red </think><answer> red </answer>")
    True
    >>> is_well_formed("<think>red square</think><answer>red</answer><|im_end|>")
    True
    >>> is_well_formed("<answer> red </answer>"), is_well_formed("<think><think></think><answer></think><answer>x</answer>")
    (False, False)
    """
    match = _FORMAT.match(_END_OF_TURN.sub("", text))
    return match is not None and all(part.strip() and not _TAG.search(part) for part in match.groups())


def extract_answer(text: str) -> str | None:
    """The text inside the last ``<answer></answer>``, stripped; ``None`` without one.

    >>> extract_answer("<think> hm </think><answer> (B) a cat </answer>")
    '(B) a cat'
    """
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style answer normalisation).

    >>> normalise("  The Red  square. ")
    'red square'
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _choice_letter(text: str) -> str | None:
    match = _CHOICE.match(text.strip())
    return (match.group(1) or match.group(2)) if match else None


def _number(text: str) -> float | None:
    cleaned = text.strip().rstrip(".").replace(",", "").rstrip("%").strip()
    return float(cleaned) if _NUMBER.match(cleaned) else None


def answers_match(prediction: str, solution: str) -> bool:
    """Whether ``prediction`` answers like ``solution``.

    Multiple choice when the solution is a capital letter (``"B"``, ``"(B)"``, ``"B. cat"``): the
    letters must agree. Numeric when both parse as numbers: equal up to a relative 1e-6.
    Otherwise normalised exact match.

    >>> answers_match("(b)", "B"), answers_match("B. a cat", "(B)"), answers_match("C", "B")
    (False, True, False)
    >>> answers_match("3.0", "3"), answers_match("1,000", "1000"), answers_match("The Red.", "red")
    (True, True, True)
    >>> answers_match("a red circle", "A red circle"), answers_match("A blue square", "A red circle")
    (True, False)
    """
    letter = _choice_letter(solution)
    if letter is not None:
        return _choice_letter(prediction) == letter
    expected, got = _number(solution), _number(prediction)
    if expected is not None and got is not None:
        return math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)
    return normalise(prediction) == normalise(solution)


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 for a well-formed ``<think>...</think><answer>...</answer>`` completion, else 0.0.

    >>> format_reward(["<think> red square </think><answer> red </answer>", "red"])
    [1.0, 0.0]
    """
    return [float(is_well_formed(completion_text(c))) for c in completions]


def accuracy_reward(completions, solution, **kwargs) -> list[float]:
    """1.0 when the answer inside ``<answer></answer>`` matches ``solution`` (see :func:`answers_match`).

    >>> accuracy_reward(["<think> x </think><answer> Red </answer>", "<answer>2</answer>", "blue"],
    ...                 solution=["red", "3", "blue"])
    [1.0, 0.0, 0.0]
    >>> accuracy_reward(["<think> x </think><answer> (B) </answer>"], solution=["<answer> B </answer>"])
    [1.0]
    """
    if len(solution) != len(completions):
        raise ValueError(f"solution has {len(solution)} entries for {len(completions)} completions")
    rewards = []
    for completion, reference in zip(completions, solution):
        answer = extract_answer(completion_text(completion))
        reference = extract_answer(str(reference)) or str(reference)  # "<answer> B </answer>" as in R1-V data
        rewards.append(float(answer is not None and answers_match(answer, reference)))
    return rewards


def _image_size(image) -> tuple[int, int]:
    """``(H, W)`` of a PIL image (or a list holding one: TRL's ``images`` column)."""
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise ValueError(f"the saliency reward scores one image per completion, got {len(image)}")
        image = image[0]
    return image.height, image.width


def saliency_rewards(saliency_maps, bbox, images, valid=None) -> torch.Tensor:
    """Saliency-in-box reward per completion as a float32 tensor (no host sync), SPEC section 4.

    Args:
        saliency_maps: per completion, per image, the raw ``[h', w']`` map
            (``RolloutSaliency.maps``); the first image's map is scored.
        bbox: per completion, its normalised box(es) (Saliency-R1 string or list).
        images: per completion, its image (PIL; ``(H, W)`` is read from it) or a one-image list.
        valid: optional float ``[B]`` format validity (0 or 1).

    Returns:
        float32 ``[B]`` on the maps' device: mass of the upsampled ``relu(map)`` inside the
        boxes over its total mass, times ``valid``; 0 for a completion without a map.
    """
    from saliency_r1.boxes import saliency_reward as box_reward

    if not (len(saliency_maps) == len(bbox) == len(images)):
        raise ValueError(f"saliency_maps ({len(saliency_maps)}), bbox ({len(bbox)}) and images ({len(images)}) "
                         "need one entry per completion")
    present = [per_image[0] for per_image in saliency_maps if len(per_image)]
    device = present[0].device if present else None
    maps = [per_image[0] if len(per_image) else torch.zeros(1, 1, device=device) for per_image in saliency_maps]
    return box_reward(maps, list(bbox), [_image_size(image) for image in images], valid=valid)


def saliency_reward(completions, saliency_maps, bbox, image=None, images=None, saliency_valid=None,
                    **kwargs) -> list[float]:
    """TRL form of :func:`saliency_rewards`: the fraction of saliency inside the evidence box.

    ``saliency_maps`` (and ``saliency_valid``) are added to the reward keywords by
    :class:`saliency_r1.trl.SaliencyGRPOTrainer`; ``bbox`` and ``image`` (or ``images``) are
    dataset columns.

    >>> from PIL import Image
    >>> grid = torch.zeros(4, 4); grid[0, 0] = 1.0          # all saliency in the top-left cell
    >>> img = Image.new("RGB", (112, 112))
    >>> saliency_reward(["<think>x</think><answer>y</answer>"] * 2, saliency_maps=[[grid], [grid]],
    ...                 bbox=["[0.0,0.0,0.5,0.5]", "[0.5,0.5,1.0,1.0]"], image=[img, img])
    [1.0, 0.0]
    >>> saliency_reward(["<think>x</think> y"], saliency_maps=[[grid]], bbox=["[0,0,1,1]"], image=[img])  # bad format
    [0.0]
    """
    source = image if image is not None else images
    if source is None:
        raise ValueError("the saliency reward needs the images (dataset column 'image' or 'images')")
    # SPEC section 4: the saliency reward is multiplied by the format validity.
    valid = torch.tensor(format_reward(completions), dtype=torch.float32)
    if saliency_valid is not None:
        valid = valid * torch.as_tensor(saliency_valid, dtype=torch.float32)
    return saliency_rewards(saliency_maps, bbox, source, valid).tolist()
