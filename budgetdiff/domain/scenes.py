"""The procedural scene domain: sample a scene spec, spec <-> prompt, render.

A scene is 1 to 4 objects on a background. Each object has a shape, a colour, a size
(small/large), a cell of a 3x3 grid and an optional texture (striped/dotted, or speckled).
Everything is deterministic from a seed, so a prompt, its spec and its ground-truth image can
always be regenerated. The number of objects is the scene's complexity level: more objects means
more attributes to get right, which is the premise of per-prompt step budgets.

Random detail (domain version 2). A background may have a material, ``grainy`` (fine: independent
per-pixel grain) or ``mottled`` (coarse: smooth blotches), at a strength ``faintly`` / (unstated:
medium) / ``heavily``; an object may be ``speckled`` (fine grain inside it). The prompt names the
kind and strength of the detail but not its values: the grain is drawn anew for every render seed,
so the ground truth of a prompt is a distribution, not an image. DDIM with few steps loses such
low-variance random detail first (``benchmarks/pilot_detail.py`` computes how much, exactly, for a
perfect denoiser), so prompts differ in how many steps they need, as real prompts do. The detail
attributes are drawn from a random stream of their own, so a scene sampled without detail is the
same scene as in version 1, and its prompt and image are unchanged.

    >>> spec = sample_scene(7)
    >>> prompt = spec_to_prompt(spec, seed=7)
    >>> parse_prompt(prompt) == spec.canonical()
    True
    >>> image = render_scene(spec)          # PIL.Image, 32x32 RGB
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace

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
# Object textures. The first three are version 1's (the attribute checker's classes until it is
# retrained); "speckled" is random fine grain inside the object (version 2).
TEXTURES_V1: tuple[str, ...] = ("plain", "striped", "dotted")
TEXTURES: tuple[str, ...] = TEXTURES_V1 + ("speckled",)
# Background materials (version 2): "plain" is a flat colour; "grainy" is independent per-pixel
# grain (fine), "mottled" is grain smoothed over a few pixels (coarse).
MATERIALS: tuple[str, ...] = ("plain", "grainy", "mottled")
# How strong a material's grain is: the prompt's adverb -> luminance standard deviation of the grain
# on the [-1, 1] pixel scale. The empty adverb (no word) is the medium strength.
STRENGTHS: dict[str, float] = {"faintly": 0.06, "": 0.12, "heavily": 0.24}
SPECKLE_STD = 0.2  # luminance s.d. of a speckled object's grain on the [-1, 1] scale
MOTTLE_SIGMA_PX = 1.5  # Gaussian smoothing (px at 32 px) that turns grain into mottling
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
    """A whole scene: its objects (each in its own grid cell), the background colour and the
    background's material and strength (version 2; "plain" is version 1's flat colour)."""

    objects: tuple[SceneObject, ...]
    background: str = "white"
    seed: int = 0  # render seed: sub-pixel jitter of object centres, and the grain of every material
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    material: str = "plain"
    strength: str = ""  # a key of STRENGTHS; only meaningful when material is not "plain"

    @property
    def has_detail(self) -> bool:
        """Whether any part of the scene carries random detail (a material or a speckled object)."""
        return self.material != "plain" or any(o.texture == "speckled" for o in self.objects)

    @property
    def detail_class(self) -> str:
        """The scene's detail class, for stratified sampling and reports: "plain", or the
        background's strength and material ("faintly grainy", "mottled", ...), or "speckled"
        when only objects carry grain."""
        if self.material != "plain":
            return f"{self.strength} {self.material}".strip()
        return "speckled" if self.has_detail else "plain"

    @property
    def complexity(self) -> int:
        """Complexity level of the scene: its number of objects (1 to 4)."""
        return len(self.objects)

    def canonical(self) -> "SceneSpec":
        """The spec with objects sorted and the render seed cleared, for comparisons."""
        return SceneSpec(objects=tuple(sorted(self.objects)), background=self.background,
                         material=self.material, strength=self.strength)

    def to_dict(self) -> dict:
        data = {
            "background": self.background,
            "seed": self.seed,
            "objects": [vars(o).copy() for o in self.objects],
        }
        if self.material != "plain":  # version 1 specs keep their stored form byte for byte
            data.update(material=self.material, strength=self.strength)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SceneSpec":
        return cls(
            objects=tuple(SceneObject(**o) for o in data["objects"]),
            background=data["background"],
            seed=int(data.get("seed", 0)),
            material=data.get("material", "plain"),
            strength=data.get("strength", ""),
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
    material_prob: float = 0.0,
    speckle_prob: float = 0.0,
    material: str | None = None,
    strength: str | None = None,
) -> SceneSpec:
    """Sample a scene deterministically from ``seed``.

    Args:
        seed: the random seed; the same seed always gives the same scene.
        n_objects: number of objects (1-4); sampled from ``count_weights`` when None.
        count_weights: probabilities of 1, 2, 3, 4 objects.
        texture_prob: probability that an object is striped or dotted rather than plain.
        material_prob: probability that the background has a material (grainy or mottled, at a
            uniformly drawn strength) rather than a flat colour. Version 2; 0 gives version 1.
        speckle_prob: probability that a plain object is speckled instead. Version 2.
        material, strength: fix the background's material (and strength) instead of drawing it.

    The version-2 draws come from a random stream of their own, so with ``material_prob`` and
    ``speckle_prob`` at 0 (and no ``material``) the scene equals version 1's for the same seed.
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
        texture = "plain" if rng.random() >= texture_prob else rng.choice(TEXTURES_V1[1:])
        objects.append(
            SceneObject(
                shape=rng.choice(SHAPES),
                color=rng.choice(list(COLORS)),
                size=rng.choice(SIZES),
                position=position,
                texture=texture,
            )
        )
    detail_rng = random.Random(f"detail-{seed}")
    if material is None:
        material = "plain" if detail_rng.random() >= material_prob else detail_rng.choice(MATERIALS[1:])
    if material not in MATERIALS:
        raise ValueError(f"material must be one of {', '.join(MATERIALS)}, got {material!r}")
    if strength is None:
        strength = detail_rng.choice(list(STRENGTHS)) if material != "plain" else ""
    if strength not in STRENGTHS:
        raise ValueError(f"strength must be one of {list(STRENGTHS)}, got {strength!r}")
    if speckle_prob > 0:
        objects = [replace(o, texture="speckled") if o.texture == "plain" and detail_rng.random() < speckle_prob
                   else o for o in objects]
    return SceneSpec(objects=tuple(objects), background=background, seed=seed,
                     material=material, strength=strength if material != "plain" else "")


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
    return template.format(objects=objects, bg=background_phrase(spec))


def background_phrase(spec: SceneSpec) -> str:
    """The words before "background": the colour, preceded by the material and its strength
    ("heavily grainy gray", "mottled beige", "white")."""
    if spec.material == "plain":
        return spec.background
    return " ".join(w for w in (spec.strength, spec.material, spec.background) if w)


# --------------------------------------------------------------------------------------------
# Prompt -> spec
# --------------------------------------------------------------------------------------------
class PromptParseError(ValueError):
    """The prompt is not one of the scene domain's phrasings."""


_PLURAL_TO_SHAPE = {v: k for k, v in SHAPE_PLURALS.items()}
_BACKGROUND_RE = re.compile(
    r"(?:on an? |, |against an? |^an? )"
    r"(?:(?:(" + "|".join(s for s in STRENGTHS if s) + r") )?(" + "|".join(MATERIALS[1:]) + r") )?"
    r"(" + "|".join(BACKGROUNDS) + r") (?:background|backdrop)"
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
    strength, material, background = bg_match.group(1) or "", bg_match.group(2) or "plain", bg_match.group(3)
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
    return SceneSpec(objects=tuple(sorted(objects)), background=background, material=material,
                     strength=strength)


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
    """Render ``spec`` to a uint8 array (H, W, 3); with ``with_mask`` also a float object mask.

    Shapes are drawn supersampled and box-filtered; random detail (a background material,
    speckled objects) is added afterwards at the domain's 32 px grid, drawn from the render seed.
    """
    big = resolution * _SUPERSAMPLE
    scale = big / BASE_RESOLUTION
    image = Image.new("RGB", (big, big), BACKGROUNDS[spec.background])
    need_mask = with_mask or spec.has_detail
    mask = Image.new("L", (big, big), 0) if need_mask else None
    speckle = Image.new("L", (big, big), 0) if any(o.texture == "speckled" for o in spec.objects) else None
    draw = ImageDraw.Draw(image)
    mask_draw = ImageDraw.Draw(mask) if mask is not None else None
    for obj, (cx, cy) in zip(spec.objects, object_centers(spec, big)):
        r = RADIUS_PX[obj.size] * scale
        color = COLORS[obj.color]
        _draw_shape(draw, obj.shape, cx, cy, r, color)
        if mask_draw is not None:
            _draw_shape(mask_draw, obj.shape, cx, cy, r, 255)
        if obj.texture == "speckled":
            _draw_shape(ImageDraw.Draw(speckle), obj.shape, cx, cy, r, 255)
        if obj.texture in ("plain", "speckled"):
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
    mask_small = (np.asarray(mask.resize((resolution, resolution), Image.Resampling.BOX)).astype(np.float32) / 255.0
                  if mask is not None else None)
    if spec.has_detail:
        speckle_small = (np.asarray(speckle.resize((resolution, resolution), Image.Resampling.BOX)).astype(np.float32)
                         / 255.0 if speckle is not None else None)
        small = _add_detail(small, spec, mask_small, speckle_small)
    if not with_mask:
        return small
    return small, mask_small


def object_masks(spec: SceneSpec, resolution: int = BASE_RESOLUTION) -> np.ndarray:
    """Each object's coverage of each pixel, (n_objects, H, W) float in [0, 1], at the spec's
    render seed (the same sub-pixel jitter as ``render_scene_array``)."""
    big = resolution * _SUPERSAMPLE
    scale = big / BASE_RESOLUTION
    masks = []
    for obj, (cx, cy) in zip(spec.objects, object_centers(spec, big)):
        mask = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(mask), obj.shape, cx, cy, RADIUS_PX[obj.size] * scale, 255)
        masks.append(np.asarray(mask.resize((resolution, resolution), Image.Resampling.BOX)).astype(np.float32) / 255.0)
    return np.stack(masks) if masks else np.zeros((0, resolution, resolution), np.float32)


def detail_field(seed: int, material: str, resolution: int, salt: int = 0) -> np.ndarray:
    """Unit-variance grain for ``material`` ("grainy": independent per pixel of the 32 px grid;
    "mottled": the same grain smoothed by a Gaussian of ``MOTTLE_SIGMA_PX`` and rescaled to unit
    variance), drawn from the render ``seed`` and resized (nearest) to ``resolution``."""
    rng = np.random.default_rng([seed, 0xD7A1, MATERIALS.index(material), salt])
    n = BASE_RESOLUTION
    grain = rng.standard_normal((n, n))
    if material == "mottled":
        radius = int(np.ceil(3 * MOTTLE_SIGMA_PX))
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * (offsets / MOTTLE_SIGMA_PX) ** 2)
        kernel /= kernel.sum()
        # Circular convolution, so every pixel has the same variance: (sum of k^2)^2 for a
        # separable kernel k, hence the division by sum(k^2).
        for axis in (0, 1):
            grain = sum(w * np.roll(grain, int(k), axis=axis) for k, w in zip(offsets, kernel))
        grain /= float(np.sum(kernel ** 2))
    if resolution != n:
        index = (np.arange(resolution) * n) // resolution
        grain = grain[np.ix_(index, index)]
    return grain.astype(np.float32)


def _add_detail(image: np.ndarray, spec: SceneSpec, object_mask: np.ndarray,
                speckle_mask: np.ndarray | None) -> np.ndarray:
    """Add the spec's luminance grain (the same on R, G and B) to a rendered uint8 image."""
    n = image.shape[0]
    delta = np.zeros((n, n), np.float32)
    if spec.material != "plain":
        delta += STRENGTHS[spec.strength] * (1.0 - object_mask) * detail_field(spec.seed, spec.material, n)
    if speckle_mask is not None:
        delta += SPECKLE_STD * speckle_mask * detail_field(spec.seed, "grainy", n, salt=1)
    out = image.astype(np.float32) + 127.5 * delta[..., None]  # [-1, 1] scale -> 0..255
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_scene(spec: SceneSpec, resolution: int = BASE_RESOLUTION) -> Image.Image:
    """Render ``spec`` to an RGB PIL image of ``resolution`` x ``resolution`` pixels."""
    return Image.fromarray(render_scene_array(spec, resolution))


def without_detail(spec: SceneSpec) -> SceneSpec:
    """The same scene without its random detail: a flat background, speckled objects plain."""
    objects = tuple(replace(o, texture="plain") if o.texture == "speckled" else o for o in spec.objects)
    return replace(spec, objects=objects, material="plain", strength="")


def with_seed(spec: SceneSpec, seed: int) -> SceneSpec:
    """The same scene with another render seed (other sub-pixel jitter, other grain)."""
    return replace(spec, seed=seed)
