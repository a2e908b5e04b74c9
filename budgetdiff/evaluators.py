"""Domain evaluators: judge a generated image against its scene's ground-truth spec.

``check_scene_heuristic`` is the simple, training-free checker the foundation's benchmark uses:
segment the foreground against the background colour, take connected components, match them
to the spec's objects (Hungarian assignment on centre distance and colour), then judge each
matched object's colour (per-pixel nearest palette colour, majority vote), shape and size (best
IoU against the renderer's own shape templates drawn at the component's centroid) and position
(the component's centroid falls in the object's 3x3 cell). Texture is not judged. A spec object
with no matching component counts as wrong on every attribute. The metrics issue replaces it
with a trained attribute checker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .scenes import (
    BACKGROUNDS,
    BASE_RESOLUTION,
    CELL_CENTERS_PX,
    COLORS,
    POSITIONS,
    RADIUS_PX,
    SHAPES,
    SIZES,
    SceneSpec,
    _draw_shape,
    object_centers,
)

ATTRIBUTES = ("color", "shape", "size", "position")
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_PALETTE_NAMES = list(COLORS)
_BG_PALETTE = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
_FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as an object pixel
_MIN_COMPONENT_PX = 4
_PALETTE_MATCH_DISTANCE = 70.0
_OFFSETS = (-0.5, 0.0, 0.5)


@dataclass
class SceneCheck:
    """Per-object attribute verdicts (one dict per spec object) and the background verdict."""

    objects: list[dict[str, bool]]
    background_ok: bool

    def accuracy(self) -> dict[str, float]:
        out = {a: float(np.mean([o[a] for o in self.objects])) for a in ATTRIBUTES}
        out["background"] = float(self.background_ok)
        return out


def _template(shape: str, size: str, cx: float, cy: float, res: int) -> np.ndarray:
    """Soft mask of ``shape`` whose centroid (not its bounding centre) lies at (cx, cy)."""
    ss = 4
    img = Image.new("L", (res * ss, res * ss), 0)
    scale = res * ss / BASE_RESOLUTION
    r = RADIUS_PX[size] * scale
    # A triangle's centroid sits 0.2 r below the centre it is drawn around (see scenes.py).
    dy = 0.2 * r if shape == "triangle" else 0.0
    _draw_shape(ImageDraw.Draw(img), shape, cx * ss, cy * ss - dy, r, 255)
    return np.asarray(img.resize((res, res), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _best_shape(comp: dict, res: int) -> tuple[str, str]:
    """(shape, size) whose template, centred on the component and nudged by up to half a pixel,
    overlaps the component best (IoU)."""
    best, best_iou = (SHAPES[0], SIZES[0]), -1.0
    for shape in SHAPES:
        for size in SIZES:
            for dx in _OFFSETS:
                for dy in _OFFSETS:
                    iou = _iou(_template(shape, size, comp["cx"] + dx, comp["cy"] + dy, res), comp["mask"])
                    if iou > best_iou:
                        best, best_iou = (shape, size), iou
    return best


def _cell_of(x: float, y: float, res: int) -> str:
    scale = res / BASE_RESOLUTION
    col = int(np.argmin([abs(x - c * scale) for c in CELL_CENTERS_PX]))
    row = int(np.argmin([abs(y - c * scale) for c in CELL_CENTERS_PX]))
    return POSITIONS[row * 3 + col]


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (BASE_RESOLUTION, BASE_RESOLUTION):
            image = image.resize((BASE_RESOLUTION, BASE_RESOLUTION), Image.Resampling.BOX)
        return np.asarray(image, dtype=np.float32)
    array = np.asarray(image, dtype=np.float32)
    if array.max() <= 1.0:
        array = array * 255.0
    return array


def check_scene_heuristic(image, spec: SceneSpec) -> SceneCheck:
    """Judge ``image`` (PIL or (H, W, 3) array) against the ground-truth ``spec``."""
    rgb = _to_array(image)
    res = rgb.shape[0]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg_rgb = np.median(border, axis=0)
    bg_name = list(BACKGROUNDS)[int(np.argmin(((_BG_PALETTE - bg_rgb) ** 2).sum(1)))]

    foreground = np.sqrt(((rgb - bg_rgb) ** 2).sum(-1)) > _FOREGROUND_DISTANCE
    labels, n = ndimage.label(foreground, structure=np.ones((3, 3)))
    components = []
    for k in range(1, n + 1):
        comp = labels == k
        if comp.sum() < _MIN_COMPONENT_PX:
            continue
        ys, xs = np.nonzero(comp)
        dist = np.sqrt(((rgb[comp][:, None, :] - _PALETTE[None]) ** 2).sum(-1))
        votes = dist.argmin(1)
        solid = dist.min(1) < _PALETTE_MATCH_DISTANCE  # texture and edge pixels match no colour
        votes = votes[solid] if solid.any() else votes
        color = _PALETTE_NAMES[int(np.bincount(votes, minlength=len(_PALETTE)).argmax())]
        components.append({"mask": comp, "cx": xs.mean() + 0.5, "cy": ys.mean() + 0.5, "color": color})

    centers = object_centers(spec, res)
    verdicts = [{a: False for a in ATTRIBUTES} for _ in spec.objects]
    if components:
        # Cost: centre distance in cells, plus one cell for a colour mismatch.
        cell = 10.0 * res / BASE_RESOLUTION
        cost = np.array(
            [
                [
                    np.hypot(c["cx"] - x, c["cy"] - y) / cell + (c["color"] != obj.color)
                    for c in components
                ]
                for obj, (x, y) in zip(spec.objects, centers)
            ]
        )
        rows, cols = linear_sum_assignment(cost)
        for r, c in zip(rows, cols):
            obj, comp = spec.objects[r], components[c]
            best = _best_shape(comp, res)
            verdicts[r] = {
                "color": comp["color"] == obj.color,
                "shape": best[0] == obj.shape,
                "size": best[1] == obj.size,
                "position": _cell_of(comp["cx"], comp["cy"], res) == obj.position,
            }
    return SceneCheck(objects=verdicts, background_ok=bg_name == spec.background)


def _iou(template: np.ndarray, mask: np.ndarray) -> float:
    m = mask.astype(np.float32)
    inter = np.minimum(template, m).sum()
    union = np.maximum(template, m).sum()
    return float(inter / max(union, 1e-6))


def summarize_checks(checks: list[SceneCheck]) -> dict[str, float]:
    """Mean accuracy per attribute over all objects of all scenes, plus background accuracy."""
    if not checks:
        return {}
    objects = [o for c in checks for o in c.objects]
    out = {a: float(np.mean([o[a] for o in objects])) for a in ATTRIBUTES}
    out["all_attributes"] = float(np.mean([all(o.values()) for o in objects]))
    out["background"] = float(np.mean([c.background_ok for c in checks]))
    return out
