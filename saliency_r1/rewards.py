"""Reward functions in TRL's form: ``f(completions, **kwargs) -> list[float]``.

``completions`` are strings, or TRL's conversational form (a list of messages whose last
``content`` is the text). Dataset columns (``solution``, ``bbox``, ``image``) arrive as keyword
arguments, one entry per completion; the saliency reward also needs the maps that
:class:`saliency_r1.trl.SaliencyGRPOTrainer` (or our own loop) adds as ``saliency_maps``.
:func:`saliency_in_box` is the tensor form the loop calls.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

import torch

from saliency_r1.spans import answer_text, is_well_formed

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A choice letter is letter-shaped: "B", "(B) ...", "B. ...", "B: ...", "B) ...". Not "A red circle"
# or "I think so", whose first word is a capital letter followed by a space.
_CHOICE = re.compile(r"^(?:\(([A-Z])\)|([A-Z])(?:[.:)]|$))")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


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


def extract_answer(text: str) -> str | None:
    """The text inside the last ``<answer></answer>``, stripped; ``None`` without one. For references
    written that way (R1-V data); completions go through :func:`saliency_r1.spans.answer_text`.

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
    """1.0 for a well-formed completion (:func:`saliency_r1.spans.is_well_formed`: ``<think>...</think>``,
    then ``<answer>...</answer>`` or a plain answer), else 0.0.

    >>> format_reward(["<think> red square </think><answer> red </answer>", "red"])
    [1.0, 0.0]
    """
    return [float(is_well_formed(completion_text(c))) for c in completions]


def accuracy_reward(completions, solution, **kwargs) -> list[float]:
    """1.0 when the answer of a well-formed completion matches ``solution`` (see :func:`answers_match`).

    The answer is what the one well-formedness predicate finds (:func:`saliency_r1.spans.answer_text`:
    inside ``<answer></answer>``, or after ``</think>`` for the plain template); a completion that is
    not well formed scores 0, as its format and saliency rewards do.

    >>> accuracy_reward(["<think> x </think><answer> Red </answer>", "<answer>red</answer>", "<think>x</think> red"],
    ...                 solution=["red", "red", "red"])
    [1.0, 0.0, 1.0]
    >>> accuracy_reward(["<think> x </think><answer> (B) </answer>"], solution=["<answer> B </answer>"])
    [1.0]
    """
    if len(solution) != len(completions):
        raise ValueError(f"solution has {len(solution)} entries for {len(completions)} completions")
    rewards = []
    for completion, reference in zip(completions, solution):
        answer = answer_text(completion_text(completion))
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


def pack_maps(maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps of different sizes, zero-padded into the reward op's ``maps`` and ``map_sizes``.

    Args:
        maps: ``B`` tensors ``[h'_b, w'_b]`` on one device (their dtypes are promoted to a common one).

    Returns:
        ``maps`` ``[B, max h', max w']`` and ``map_sizes`` int64 ``[B, 2]``, on the maps' device.

    >>> packed, sizes = pack_maps([torch.ones(2, 3), torch.ones(1, 1)])
    >>> packed.shape, sizes.tolist()
    (torch.Size([2, 2, 3]), [[2, 3], [1, 1]])
    """
    if len(maps) == 0:
        raise ValueError("maps is empty: need at least one [h', w'] map")
    grids = [torch.as_tensor(m) for m in maps]
    for b, grid in enumerate(grids):
        if grid.dim() != 2 or grid.numel() == 0:
            raise ValueError(f"maps[{b}] must be a non-empty [h', w'] map, got shape {tuple(grid.shape)}")
        if not grid.dtype.is_floating_point:
            raise TypeError(f"maps[{b}] must be floating point, got {grid.dtype}")
        if grid.device != grids[0].device:
            raise ValueError(f"maps[{b}] is on {grid.device}, maps[0] on {grids[0].device}: put them on one device")
    dtype = grids[0].dtype
    for grid in grids[1:]:
        dtype = torch.promote_types(dtype, grid.dtype)
    h_max = max(g.shape[0] for g in grids)
    w_max = max(g.shape[1] for g in grids)
    # Padding each small map and stacking: one zero-fill of the whole batch would be a multi-threaded
    # kernel, whose start-up costs more than the copy on a busy machine.
    packed = torch.stack([torch.nn.functional.pad(g.to(dtype), (0, w_max - g.shape[1], 0, h_max - g.shape[0]))
                          for g in grids])
    sizes = torch.tensor([list(g.shape) for g in grids], dtype=torch.int64, device=packed.device)
    return packed, sizes


def saliency_in_box(maps: Sequence[torch.Tensor], boxes: Sequence, image_sizes: Sequence,
                    valid: Sequence[float] | torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
    """The saliency reward of ``B`` rollouts from their maps and normalised boxes (``docs/method.md``
    section 4), as one call of ``torch.ops.saliency.reward``.

    Args:
        maps: ``B`` raw saliency maps ``[h'_b, w'_b]`` (relu is applied inside), on one device.
        boxes: ``B`` entries, each one normalised box or a list of them (strings such as
            ``"[0.12,0.30,0.55,0.81]"``, or lists/tuples of four numbers).
        image_sizes: ``B`` pairs ``(H, W)`` in pixels.
        valid: ``B`` format validities (multipliers, usually 0 or 1); default all 1.
        check: the op's value check (``saliency_r1.ops.reward``): ``False`` gives NaN for a bad map instead
            of an error, and on CUDA spares the device-to-host copy the check costs. Boxes and image sizes
            are checked on the host either way.

    Returns:
        float32 ``[B]`` on the maps' device: ``valid * mass of the upsampled map inside the union of
        the boxes / total mass``, 0 where the mass is 0 or there is no box.

    >>> grid = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    >>> saliency_in_box([grid], ["[0.5,0.0,1.0,1.0]"], [(4, 4)]).tolist()
    [0.875]
    >>> saliency_in_box([grid, grid], ["[0.0,0.0,0.4,1.0]", []], [(4, 4), (4, 4)], valid=[1.0, 1.0]).tolist()
    [0.125, 0.0]
    """
    from saliency_r1.boxes import image_size_pair, pack_boxes
    from saliency_r1.ops import reward

    packed, map_sizes = pack_maps(maps)
    if len(boxes) != len(maps) or len(image_sizes) != len(maps):
        raise ValueError(f"maps, boxes and image_sizes must have one entry per rollout, got {len(maps)}, "
                         f"{len(boxes)} and {len(image_sizes)}")
    device = packed.device
    pixel, counts = pack_boxes(boxes, image_sizes, device)
    sizes = torch.tensor([list(image_size_pair(s, f"image_sizes[{b}]")) for b, s in enumerate(image_sizes)],
                         dtype=torch.int64, device=device)
    if valid is None:
        valid_t = torch.ones(len(maps), dtype=torch.float32, device=device)
    else:
        valid_t = torch.as_tensor(valid, dtype=torch.float32).to(device)
        if valid_t.shape != (len(maps),):
            raise ValueError(f"valid must hold one value per rollout ({len(maps)}), got shape {tuple(valid_t.shape)}")
    return reward(packed, map_sizes, sizes, pixel, counts, valid_t, check)


def saliency_reward(completions, saliency_maps, bbox, image=None, images=None, saliency_valid=None,
                    **kwargs) -> list[float]:
    """TRL form of :func:`saliency_in_box`: the fraction of each completion's saliency inside its
    evidence box(es), scored on the first image's map.

    ``saliency_maps`` (per completion, per image, the raw ``[h', w']`` map) and ``saliency_valid`` are
    added to the reward keywords by :class:`saliency_r1.trl.SaliencyGRPOTrainer`; ``bbox`` and ``image``
    (or ``images``) are dataset columns. The reward is multiplied by the completion's validity:
    ``saliency_valid`` (from its token ids) when given, else :func:`saliency_r1.spans.is_well_formed`
    of its text. A completion without a map scores 0.

    >>> from PIL import Image
    >>> grid = torch.zeros(4, 4); grid[0, 0] = 1.0          # all saliency in the top-left cell
    >>> img = Image.new("RGB", (112, 112))
    >>> saliency_reward(["<think>x</think><answer>y</answer>"] * 2, saliency_maps=[[grid], [grid]],
    ...                 bbox=["[0.0,0.0,0.5,0.5]", "[0.5,0.5,1.0,1.0]"], image=[img, img])
    [1.0, 0.0]
    >>> saliency_reward(["<think>x"], saliency_maps=[[grid]], bbox=["[0,0,1,1]"], image=[img])  # bad format
    [0.0]
    """
    source = image if image is not None else images
    if source is None:
        raise ValueError("the saliency reward needs the images (dataset column 'image' or 'images')")
    if not (len(saliency_maps) == len(bbox) == len(source) == len(completions)):
        raise ValueError(f"completions ({len(completions)}), saliency_maps ({len(saliency_maps)}), bbox ({len(bbox)}) "
                         f"and images ({len(source)}) need one entry per completion")
    valid = (torch.as_tensor(saliency_valid, dtype=torch.float32) if saliency_valid is not None
             else torch.tensor(format_reward(completions), dtype=torch.float32))
    present = [per_image[0] for per_image in saliency_maps if len(per_image)]
    device = present[0].device if present else None
    maps = [per_image[0] if len(per_image) else torch.zeros(1, 1, device=device) for per_image in saliency_maps]
    return saliency_in_box(maps, list(bbox), [_image_size(i) for i in source], valid=valid).tolist()
