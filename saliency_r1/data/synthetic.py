"""A grounded-VQA set built in code: coloured shapes on a cluttered background.

Each image holds a few objects with distinct colours and distinct shapes, each drawn in a light
or a dark tone of its colour, scattered over grey clutter. The question names one object and
asks for an attribute of it that only that object shows, so the answer needs that object and
nothing else, and its box is the evidence region:

- ``"shade"`` (default): "Is the red object light or dark?". The tone is in every pixel of the
  object, so even a tiny randomly initialised model learns to read it, and naming an object in
  its reasoning makes it look there (what the CPU evidence of learning needs).
- ``"shape"``: "What color is the square?" / "What shape is the red object?". Shapes are
  harder to read from 28-px image tokens: the tiny model does not learn them on CPU.

Every example is a pure function of ``(seed, index)``: the set needs no storage and is the same
on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220),
    "yellow": (235, 215, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SHADES: tuple[str, ...] = ("light", "dark")
QUESTIONS: tuple[str, ...] = ("shade", "shape")


def tone(rgb: tuple[int, int, int], shade: str) -> tuple[int, int, int]:
    """The light (towards white) or dark (towards black) tone of a colour."""
    if shade == "light":
        return tuple(255 - (255 - c) * 45 // 100 for c in rgb)
    return tuple(c * 45 // 100 for c in rgb)


@dataclass(frozen=True)
class SyntheticConfig:
    """How the synthetic images are drawn.

    Args:
        image_size: side of the square image in pixels (112 gives a 4 x 4 grid of 28-px cells).
        num_objects: objects per image, each with its own colour and shape (at most 4).
        min_object: smallest object side in pixels.
        max_object: largest object side in pixels.
        clutter: number of grey distractor strokes and dots in the background.
        questions: ``"shade"`` (is the named object light or dark) or ``"shape"`` (the colour of
            the named shape, or the shape of the named colour); see the module docstring.
    """

    image_size: int = 112
    num_objects: int = 3
    min_object: int = 24
    max_object: int = 36
    clutter: int = 40
    questions: str = "shade"

    def __post_init__(self) -> None:
        if self.questions not in QUESTIONS:
            raise ValueError(f"questions must be one of {QUESTIONS}, got {self.questions!r}")
        if not 1 <= self.num_objects <= len(SHAPES):
            raise ValueError(f"num_objects must be in [1, {len(SHAPES)}], got {self.num_objects}")
        if not 4 <= self.min_object <= self.max_object <= self.image_size:
            raise ValueError(f"need 4 <= min_object <= max_object <= image_size, got "
                             f"{self.min_object}, {self.max_object}, {self.image_size}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)],
                     fill=fill)


def _place(rng: random.Random, cfg: SyntheticConfig, taken: list[tuple[int, int, int, int]]):
    """A box that overlaps no box in ``taken`` (rejection sampling; the images are sparse)."""
    for _ in range(200):
        side = rng.randint(cfg.min_object, cfg.max_object)
        x0 = rng.randint(0, cfg.image_size - side)
        y0 = rng.randint(0, cfg.image_size - side)
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        if all(box[2] < t[0] - 2 or box[0] > t[2] + 2 or box[3] < t[1] - 2 or box[1] > t[3] + 2 for t in taken):
            return box
    raise ValueError(f"could not place {cfg.num_objects} objects of up to {cfg.max_object} px "
                     f"in a {cfg.image_size} px image; lower num_objects or max_object")


def normalised_box(box_pixels: tuple[int, int, int, int], size: int) -> str:
    """The ``bbox`` string of an inclusive pixel box in a ``size``-pixel square image.

    Normalised so that ``floor(W * x1) = x_lo`` and ``floor(W * x2) = x_hi`` (docs/method.md section 4): the
    centre of each pixel, which survives rounding to 4 decimals.

    >>> normalised_box((0, 10, 27, 55), 112)
    '[0.0045,0.0938,0.2455,0.4955]'
    """
    return "[" + ",".join(f"{(v + 0.5) / size:.4f}" for v in box_pixels) + "]"


def make_example(seed: int, index: int, config: SyntheticConfig = SyntheticConfig()) -> dict:
    """One example, a pure function of ``(seed, index)``.

    Returns a record in the Saliency-R1 format plus helpers:
        ``image`` (PIL RGB, ``image_size`` square), ``problem`` (str), ``solution`` (str),
        ``bbox`` (str, normalised ``[x1,y1,x2,y2]`` of the target object),
        ``box_pixels`` (inclusive integer ``(x_lo, y_lo, x_hi, y_hi)``), ``target`` (colour, shape, shade),
        ``objects`` (every object as ``(colour, shape, shade, box_pixels)``, the target at index
        ``target_index``), ``questions`` (which kind of question, see :class:`SyntheticConfig`).
    """
    rng = random.Random(f"saliency-r1-synthetic/{seed}/{index}")
    size = config.image_size
    image = Image.new("RGB", (size, size), tuple(rng.randint(200, 245) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(config.clutter):  # grey strokes and dots: no colour, so they never answer the question
        grey = rng.randint(90, 180)
        x, y = rng.randrange(size), rng.randrange(size)
        if rng.random() < 0.5:
            draw.line((x, y, x + rng.randint(-15, 15), y + rng.randint(-15, 15)), fill=(grey,) * 3, width=1)
        else:
            r = rng.randint(1, 3)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(grey,) * 3)
    colors = rng.sample(sorted(COLORS), config.num_objects)
    shapes = rng.sample(SHAPES, config.num_objects)
    shades = [rng.choice(SHADES) for _ in colors]
    boxes: list[tuple[int, int, int, int]] = []
    for color, shape, shade in zip(colors, shapes, shades):
        box = _place(rng, config, boxes)
        boxes.append(box)
        _draw_shape(draw, shape, box, tone(COLORS[color], shade))
    target = rng.randrange(config.num_objects)
    color, shape, shade = colors[target], shapes[target], shades[target]
    if config.questions == "shade":
        problem, solution = f"Is the {color} object light or dark?", shade
    elif rng.random() < 0.5:
        problem, solution = f"What color is the {shape}?", color
    else:
        problem, solution = f"What shape is the {color} object?", shape
    return {"image": image, "problem": problem, "solution": solution, "bbox": normalised_box(boxes[target], size),
            "box_pixels": boxes[target], "target": (color, shape, shade), "target_index": target,
            "objects": list(zip(colors, shapes, shades, boxes)), "questions": config.questions}


def worked_completion(example: dict, described: int | None = None) -> str:
    """A well-formed completion for ``example``: the reasoning names one object by its colour and
    reads off the attribute the question asks about, the answer is right.

    ``described`` picks the object the reasoning names (default: the target). The cold start
    trains on completions that name one object per image, drawn at random once, so that the policy
    starts out looking at any object and only a reward for looking at the evidence tells it which.

    >>> example = {"objects": [("red", "square", "dark", (0, 0, 9, 9))], "target_index": 0, "solution": "dark"}
    >>> worked_completion(dict(example, questions="shade"))
    '<think>red dark</think><answer>dark</answer>'
    >>> worked_completion(dict(example, questions="shape", solution="red"))
    '<think>red square</think><answer>red</answer>'
    """
    color, shape, shade, _ = example["objects"][example["target_index"] if described is None else described]
    read = shade if example["questions"] == "shade" else shape
    return f"<think>{color} {read}</think><answer>{example['solution']}</answer>"


class SyntheticGroundedVQA:
    """A deterministic, indexable grounded-VQA set of ``length`` examples.

    Args:
        length: number of examples.
        seed: the set; two sets with different seeds share no images (use one seed for
            training and another for held-out evaluation).
        config: drawing parameters (see :class:`SyntheticConfig`).

    ``dataset[i]`` is :func:`make_example(seed, i, config)`; a slice or list of indices gives a list.
    """

    def __init__(self, length: int, seed: int = 0, config: SyntheticConfig = SyntheticConfig()):
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        self.length, self.seed, self.config = length, seed, config

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} examples")
        return make_example(self.seed, index % self.length, self.config)

    def to_hf(self):
        """The same records as a ``datasets.Dataset`` (image, problem, solution, bbox), e.g. for TRL."""
        import datasets

        rows = [self[i] for i in range(self.length)]
        return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("image", "problem", "solution", "bbox")},
                                          features=datasets.Features({
                                              "image": datasets.Image(), "problem": datasets.Value("string"),
                                              "solution": datasets.Value("string"), "bbox": datasets.Value("string")}))
