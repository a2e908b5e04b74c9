"""The procedural scene domain: sample a scene spec, spec <-> prompt, render.

A scene is 1 to 4 objects on a plain background. Each object has a shape, a colour, a size
(small/large), a cell of a 3x3 grid and an optional texture (striped/dotted). Everything is
deterministic from a seed, so a prompt, its spec and its ground-truth image can always be
regenerated. The number of objects is the scene's complexity level: more objects means more
attributes to get right, which is the premise of per-prompt step budgets.

    >>> spec = sample_scene(7)
    >>> prompt = spec_to_prompt(spec, seed=7)
    >>> parse_prompt(prompt) == spec.canonical()
    True
    >>> image = render_scene(spec)          # PIL.Image, 32x32 RGB
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
                 "diamond": "diamonds", "cross": "crosses"}
# Object colours, RGB. Chosen to be far apart from each other and from every background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 180),
    "orange": (250, 135, 20),
    "pink": (250, 130, 200),
    "cyan": (30, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "beige": (225, 205, 160),
}
SIZES: tuple[str, ...] = ("small", "large")
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
# 3x3 grid, row-major. Names are the phrases used in prompts.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
WORD_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
MAX_OBJECTS = 4

# Geometry at the reference resolution of 32 px; everything scales with the output size.
BASE_RESOLUTION = 32
RADIUS_PX = {"small": 3.5, "large": 5.0}
CELL_CENTERS_PX = (5.5, 16.0, 26.5)


@dataclass(frozen=True, order=True)
class SceneObject:
    """One object of a scene."""

    shape: str
    color: str
    size: str
    position: str
    texture: str = "plain"

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) of the object's 3x3 grid cell."""
        index = POSITIONS.index(self.position)
        return divmod(index, 3)


@dataclass(frozen=True)
class SceneSpec:
    """A whole scene: its objects (each in its own grid cell) and the background colour."""

    objects: tuple[SceneObject, ...]
    background: str = "white"
    seed: int = 0  # render seed: sub-pixel jitter of object centres
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def complexity(self) -> int:
        """Complexity level of the scene: its number of objects (1 to 4)."""
        return len(self.objects)

    def canonical(self) -> "SceneSpec":
        """The spec with objects sorted and the render seed cleared, for comparisons."""
        return SceneSpec(objects=tuple(sorted(self.objects)), background=self.background)

    def to_dict(self) -> dict:
        return {
            "background": self.background,
            "seed": self.seed,
            "objects": [vars(o).copy() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SceneSpec":
        return cls(
            objects=tuple(SceneObject(**o) for o in data["objects"]),
            background=data["background"],
            seed=int(data.get("seed", 0)),
        )


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
DEFAULT_OBJECT_COUNT_WEIGHTS = (0.4, 0.3, 0.2, 0.1)


def sample_scene(
    seed: int,
    n_objects: int | None = None,
    count_weights: tuple[float, ...] = DEFAULT_OBJECT_COUNT_WEIGHTS,
    texture_prob: float = 0.25,
) -> SceneSpec:
    """Sample a scene deterministically from ``seed``.

    Args:
        seed: the random seed; the same seed always gives the same scene.
        n_objects: number of objects (1-4); sampled from ``count_weights`` when None.
        count_weights: probabilities of 1, 2, 3, 4 objects.
        texture_prob: probability that an object is striped or dotted rather than plain.
    """
    rng = random.Random(seed)
    if n_objects is None:
        n_objects = rng.choices(range(1, MAX_OBJECTS + 1), weights=count_weights)[0]
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n_objects}")
    background = rng.choice(list(BACKGROUNDS))
    cells = rng.sample(POSITIONS, n_objects)
    objects = []
    for position in cells:
        texture = "plain" if rng.random() >= texture_prob else rng.choice(TEXTURES[1:])
        objects.append(
            SceneObject(
                shape=rng.choice(SHAPES),
                color=rng.choice(list(COLORS)),
                size=rng.choice(SIZES),
                position=position,
                texture=texture,
            )
        )
    return SceneSpec(objects=tuple(objects), background=background, seed=seed)


# --------------------------------------------------------------------------------------------
# Spec -> prompt
# --------------------------------------------------------------------------------------------
LEVEL_SEED_STRIDE = 100_000  # per-object-count held-out sets: level k's seeds start at offset + k x this


def held_out_scenes(n: int, offset: int, n_objects: int | None = None,
                    count_weights: tuple[float, ...] | None = None) -> tuple[list[SceneSpec], list[str]]:
    """``n`` fixed scenes from the seeds ``offset``, ``offset + 1``, ... (a seed range that no
    training stream draws from) and their prompts: every evaluation set of the project is one.
    ``n_objects`` fixes the object count, else ``count_weights`` (default
    ``DEFAULT_OBJECT_COUNT_WEIGHTS``) draws it."""
    weights = tuple(count_weights) if count_weights is not None else DEFAULT_OBJECT_COUNT_WEIGHTS
    specs = [sample_scene(offset + i, n_objects=n_objects, count_weights=weights) for i in range(n)]
    return specs, [spec_to_prompt(s) for s in specs]


def level_seed(offset: int, n_objects: int, i: int) -> int:
    """The seed of the ``i``-th scene with ``n_objects`` objects of a per-level held-out set."""
    return offset + LEVEL_SEED_STRIDE * n_objects + i


def level_prompts(prompts_per_level: dict, offset: int) -> tuple[list[str], list[int], list[int]]:
    """(prompts, noise seeds, object counts) of a per-level held-out set: ``n`` scenes per object
    count (``prompts_per_level`` maps counts to ``n``) from the seeds ``level_seed(offset, count, i)``;
    each image's noise seed is its scene seed. bench_adaptive's prompts and tune_skip's."""
    prompts, seeds, levels = [], [], []
    for n_obj, n in sorted((int(k), int(v)) for k, v in prompts_per_level.items()):
        prompts += held_out_scenes(n, level_seed(offset, n_obj, 0), n_objects=n_obj)[1]
        seeds += [level_seed(offset, n_obj, i) for i in range(n)]
        levels += [n_obj] * n
    return prompts, seeds, levels


_SCENE_TEMPLATES = (
    "{objects} on a {bg} background",
    "{objects}, {bg} background",
    "a {bg} background with {objects}",
    "{objects} against a {bg} backdrop",
)


def _position_phrase(positions: list[str], rng: random.Random) -> str:
    def one(p: str) -> str:
        if p == "center":
            return rng.choice(("in the center", "in the middle"))
        return rng.choice(("at the ", "in the ")) + p

    if len(positions) == 1:
        return one(positions[0])
    return ", ".join(one(p) for p in positions[:-1]) + " and " + one(positions[-1])


def _object_group_phrase(group: list[SceneObject], rng: random.Random) -> str:
    first = group[0]
    count = len(group)
    noun = first.shape if count == 1 else SHAPE_PLURALS[first.shape]
    adjectives = [first.size]
    if first.texture != "plain":
        adjectives.append(first.texture)
    adjectives.append(first.color)
    if count == 1:
        article = "an" if adjectives[0][0] in "aeiou" else "a"
    else:
        article = NUMBER_WORDS[count]
    return f"{article} {' '.join(adjectives)} {noun} " + _position_phrase(
        [o.position for o in group], rng
    )


def spec_to_prompt(spec: SceneSpec, seed: int | None = None) -> str:
    """Describe ``spec`` in one of the domain's natural phrasings (chosen by ``seed``).

    Objects sharing shape, colour, size and texture are grouped ("two large blue squares at the
    left and in the top right"). Every phrasing is parsed back by :func:`parse_prompt`.
    """
    rng = random.Random(spec.seed if seed is None else seed)
    groups: dict[tuple, list[SceneObject]] = {}
    for obj in spec.objects:
        groups.setdefault((obj.shape, obj.color, obj.size, obj.texture), []).append(obj)
    ordered = list(groups.values())
    rng.shuffle(ordered)
    phrases = [_object_group_phrase(g, rng) for g in ordered]
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    template = rng.choice(_SCENE_TEMPLATES)
    return template.format(objects=objects, bg=spec.background)


# --------------------------------------------------------------------------------------------
# Prompt -> spec
# --------------------------------------------------------------------------------------------
class PromptParseError(ValueError):
    """The prompt is not one of the scene domain's phrasings."""


_PLURAL_TO_SHAPE = {v: k for k, v in SHAPE_PLURALS.items()}
_BACKGROUND_RE = re.compile(
    r"(?:on an? |, |against an? |^an? )(" + "|".join(BACKGROUNDS) + r") (?:background|backdrop)"
)
_POSITION_RE = re.compile(
    r"(?:at|in) the (" + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r"|middle)\b"
)


def parse_prompt(prompt: str) -> SceneSpec:
    """Parse a prompt in the domain's phrasings back to its (canonical) scene spec.

    Raises:
        PromptParseError: when the prompt names no background, no object, an unknown word where
            an attribute is expected, or a count that disagrees with its positions.
    """
    text = " ".join(prompt.lower().strip().split())
    bg_match = _BACKGROUND_RE.search(text)
    if bg_match is None:
        raise PromptParseError(f"no background colour found in prompt {prompt!r}")
    background = bg_match.group(1)
    body = (text[: bg_match.start()] + " " + text[bg_match.end():]).strip()
    body = re.sub(r"^with ", "", body.strip(" ,"))

    tokens = re.findall(r"[a-z]+|,", body)
    objects: list[SceneObject] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok not in WORD_NUMBERS:
            i += 1
            continue
        count = WORD_NUMBERS[tok]
        i += 1
        size, texture, color, shape = None, "plain", None, None
        while i < len(tokens) and shape is None:
            word = tokens[i]
            if word in SIZES:
                size = word
            elif word in TEXTURES:
                texture = word
            elif word in COLORS:
                color = word
            elif word in SHAPES and count == 1:
                shape = word
            elif word in _PLURAL_TO_SHAPE and count > 1:
                shape = _PLURAL_TO_SHAPE[word]
            else:
                raise PromptParseError(f"unexpected word {word!r} in prompt {prompt!r}")
            i += 1
        if None in (size, color, shape):
            raise PromptParseError(f"incomplete object description in prompt {prompt!r}")
        # Positions follow until the next object group starts.
        start = i
        while i < len(tokens) and tokens[i] not in WORD_NUMBERS:
            i += 1
        positions = [
            "center" if m.group(1) == "middle" else m.group(1)
            for m in _POSITION_RE.finditer(" ".join(tokens[start:i]))
        ]
        if len(positions) != count:
            raise PromptParseError(
                f"{count} object(s) but {len(positions)} position(s) in prompt {prompt!r}"
            )
        objects.extend(SceneObject(shape, color, size, p, texture) for p in positions)
    if not objects:
        raise PromptParseError(f"no object found in prompt {prompt!r}")
    if len({o.position for o in objects}) != len(objects):
        raise PromptParseError(f"two objects share a position in prompt {prompt!r}")
    return SceneSpec(objects=tuple(sorted(objects)), background=background)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
_SUPERSAMPLE = 4


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.92
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        a = r * 0.36
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]
    return None  # circle: drawn as an ellipse


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    poly = _shape_polygon(shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def object_centers(spec: SceneSpec, resolution: int = BASE_RESOLUTION) -> list[tuple[float, float]]:
    """Pixel centres (x, y) of the spec's objects at ``resolution``, with the seed's jitter."""
    rng = random.Random(spec.seed * 7919 + 17)
    scale = resolution / BASE_RESOLUTION
    centers = []
    for obj in spec.objects:
        row, col = obj.cell
        jx, jy = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)
        centers.append(((CELL_CENTERS_PX[col] + jx) * scale, (CELL_CENTERS_PX[row] + jy) * scale))
    return centers


def _texture_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    # Darken bright colours, lighten dark ones, so the pattern shows on every colour.
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if lum > 110:
        return tuple(int(c * 0.45) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c + (255 - c) * 0.6) for c in rgb)  # type: ignore[return-value]


def render_scene_array(
    spec: SceneSpec, resolution: int = BASE_RESOLUTION, with_mask: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Render ``spec`` to a uint8 array (H, W, 3); with ``with_mask`` also a float object mask."""
    big = resolution * _SUPERSAMPLE
    scale = big / BASE_RESOLUTION
    image = Image.new("RGB", (big, big), BACKGROUNDS[spec.background])
    mask = Image.new("L", (big, big), 0) if with_mask else None
    draw = ImageDraw.Draw(image)
    mask_draw = ImageDraw.Draw(mask) if mask is not None else None
    for obj, (cx, cy) in zip(spec.objects, object_centers(spec, big)):
        r = RADIUS_PX[obj.size] * scale
        color = COLORS[obj.color]
        _draw_shape(draw, obj.shape, cx, cy, r, color)
        if mask_draw is not None:
            _draw_shape(mask_draw, obj.shape, cx, cy, r, 255)
        if obj.texture == "plain":
            continue
        # The pattern is drawn on a layer and pasted through the shape's own mask.
        layer = Image.new("RGB", (big, big), _texture_color(color))
        pattern = Image.new("L", (big, big), 0)
        pdraw = ImageDraw.Draw(pattern)
        period = 2.0 * scale if obj.size == "small" else 2.5 * scale
        if obj.texture == "striped":
            y = cy - r
            while y < cy + r:
                pdraw.rectangle([cx - r, y, cx + r, y + period / 2 - 1], fill=255)
                y += period
        else:  # dotted
            dot = period * 0.3
            y = cy - r + period / 2
            while y < cy + r:
                x = cx - r + period / 2
                while x < cx + r:
                    pdraw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=255)
                    x += period
                y += period
        shape_mask = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(shape_mask), obj.shape, cx, cy, r, 255)
        pattern = Image.fromarray(np.minimum(np.asarray(pattern), np.asarray(shape_mask)))
        image.paste(layer, (0, 0), pattern)
    small = np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX))
    if not with_mask:
        return small
    mask_small = np.asarray(mask.resize((resolution, resolution), Image.Resampling.BOX))
    return small, mask_small.astype(np.float32) / 255.0


def render_scene(spec: SceneSpec, resolution: int = BASE_RESOLUTION) -> Image.Image:
    """Render ``spec`` to an RGB PIL image of ``resolution`` x ``resolution`` pixels."""
    return Image.fromarray(render_scene_array(spec, resolution))
