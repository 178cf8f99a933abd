"""The embedded default dataset: procedurally generated shapes with template captions. No download, ever.

Each image shows one or two objects on a dark background. An object has a shape, a colour and a size; one
object is placed in a named region ("at the top left"), two objects stand in a spatial relation ("left of").
Captions come from templates::

    "a small red circle left of a large blue square"     "a large blue square right of a small red circle"
    "a small green triangle at the top left"

Everything is a pure function of ``(seed, split, index)``, so any sample can be regenerated on any worker at
any time: no cache, exact resume for free.

Compositional hold-out: a few (colour, shape) pairs (one per shape, e.g. "red circle") never occur in the
training split; every evaluation image contains at least one of them. Each colour and each shape is seen in
training, only the combination is new, so retrieval on the evaluation split measures whether the model
composes attributes rather than memorises captions.
"""

from __future__ import annotations

import numpy as np

COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235),
    "yellow": (240, 220, 40), "purple": (160, 60, 210), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.13, "large": 0.24}  # object half-extent as a fraction of the image side
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
REGIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
           "bottom right": (0.72, 0.72), "centre": (0.5, 0.5)}
BACKGROUND = (28, 28, 34)
COLOUR_NAMES = tuple(COLOURS)
# (colour, shape) pairs never shown in training: one per shape, each with a different colour.
HELD_OUT = frozenset({("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "cross")})
TRAIN, EVAL = 0, 1


def _mask(shape: str, size: int, cx: float, cy: float, half: float) -> np.ndarray:
    """Boolean ``[size, size]`` mask of one object centred at pixel ``(cx, cy)`` with half-extent ``half``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half * 0.85) & (np.abs(dy) <= half * 0.85)
    if shape == "triangle":  # apex up: inside when below the two slanted edges and above the base
        return (dy <= half * 0.8) & (dy >= -half + 2.0 * np.abs(dx))
    if shape == "cross":
        arm = half * 0.38
        return ((np.abs(dx) <= half) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= half) & (np.abs(dx) <= arm))
    raise ValueError(shape)


def _draw_object(rng: np.random.Generator, split: int) -> tuple[str, str, str]:
    """(size, colour, shape): training never draws a held-out pair; evaluation always does."""
    size = ("small", "large")[rng.integers(2)]
    if split == EVAL:
        colour, shape = sorted(HELD_OUT)[rng.integers(len(HELD_OUT))]
        return size, colour, shape
    while True:
        colour, shape = COLOUR_NAMES[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
        if (colour, shape) not in HELD_OUT:
            return size, colour, shape


def _describe(obj: tuple[str, str, str]) -> str:
    return f"a {obj[0]} {obj[1]} {obj[2]}"


def generate(seed: int, split: int, index: int, image_size: int) -> tuple[np.ndarray, list[str]]:
    """Sample ``index`` of ``split``: ``(image uint8 [image_size, image_size, 3], captions)``.

    Two-object images have two captions (the relation read from either object), one-object images one.
    """
    rng = np.random.default_rng([seed, split, index])
    image = np.empty((image_size, image_size, 3), dtype=np.float32)
    image[:] = BACKGROUND
    image += rng.normal(0.0, 6.0, size=image.shape).astype(np.float32)  # sensor-like noise: no pixel-exact cues
    first = _draw_object(rng, split)
    two = split == EVAL or rng.random() < 0.75
    if not two:
        region = tuple(REGIONS)[rng.integers(len(REGIONS))]
        cx, cy = REGIONS[region]
        jitter = rng.uniform(-0.06, 0.06, size=2)
        objects = [(first, (cx + jitter[0], cy + jitter[1]))]
        captions = [f"{_describe(first)} at the {region}" if region != "centre" else f"{_describe(first)} in the centre"]
    else:
        second = _draw_object(rng, TRAIN)  # the second object may be any training pair
        while second[1:] == first[1:]:
            second = _draw_object(rng, TRAIN)
        relation = tuple(RELATIONS)[rng.integers(len(RELATIONS))]
        # first's centre, then second's on the other side along the relation's axis, well separated
        along, across = rng.uniform(0.25, 0.32), rng.uniform(0.3, 0.7, size=2)
        if relation in ("left of", "right of"):
            sign = -1.0 if relation == "left of" else 1.0
            p1, p2 = (0.5 + sign * along, across[0]), (0.5 - sign * along, across[1])
        else:
            sign = -1.0 if relation == "above" else 1.0
            p1, p2 = (across[0], 0.5 + sign * along), (across[1], 0.5 - sign * along)
        objects = [(first, p1), (second, p2)]
        captions = [f"{_describe(first)} {relation} {_describe(second)}",
                    f"{_describe(second)} {RELATIONS[relation]} {_describe(first)}"]
    for (size, colour, shape), (fx, fy) in objects:
        mask = _mask(shape, image_size, fx * image_size, fy * image_size, SIZES[size] * image_size)
        tint = np.asarray(COLOURS[colour], dtype=np.float32) + rng.normal(0.0, 8.0, size=3).astype(np.float32)
        image[mask] = tint
    return np.clip(image, 0, 255).astype(np.uint8), captions


def train_captions_contain_held_out(seed: int, n: int, image_size: int = 16) -> bool:
    """True if any of the first ``n`` training captions names a held-out pair (a self-check for the tests)."""
    names = {f"{c} {s}" for c, s in HELD_OUT}
    return any(name in caption for i in range(n) for caption in generate(seed, TRAIN, i, image_size)[1] for name in names)
