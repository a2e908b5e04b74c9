"""Domain evaluators: judge a generated image against its scene's ground-truth spec.

``check_scene_heuristic`` is the simple, training-free checker the foundation's benchmark uses:
segment the foreground against the background colour, take connected components, match them
to the spec's objects (Hungarian assignment on centre distance and colour), then judge each
matched object's colour (per-pixel nearest palette colour, majority vote), shape and size (best
IoU against the renderer's own shape templates drawn at the component's centroid) and position
(the component's centroid falls in the object's 3x3 cell). Texture is not judged. A spec object
with no matching component counts as wrong on every attribute. The metrics issue replaces it
with a trained attribute checker.

The trained domain evaluators live here too (trained by training/clip.py and
training/attributes.py, saved as safetensors + JSON config directories):
- the domain CLIP, a small open_clip model registered from a custom config
  (``build_domain_clip``, ``save_domain_clip``, ``load_domain_clip``; models/clip);
- the attribute checker, a CNN reading each 3x3 grid cell's object and the background
  (``AttributeChecker``, ``load_attribute_checker``; models/attributes), and ``attr_check`` /
  ``scene_attr_acc``, the GenEval-style prompt-faithfulness score ``domain/attr_acc``. It scores
  the attributes a prompt states (``parse.StatedScene``): a full spec states all of them; a
  prompt such as "a red circle in the center on a white background" leaves the size unscored.
"""

from __future__ import annotations

import json as _json
import os as _os
import tempfile as _tempfile
from dataclasses import dataclass
from pathlib import Path as _Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from budgetdiff.domain.parse import StatedObject, StatedScene, parse_stated_scene
from budgetdiff.domain.scenes import (
    BACKGROUNDS,
    BASE_RESOLUTION,
    CELL_CENTERS_PX,
    COLORS,
    POSITIONS,
    RADIUS_PX,
    SHAPES,
    SIZES,
    TEXTURES_V1,
    SceneObject,
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
    """Per-object attribute verdicts (one dict per spec object, holding the attributes that were
    scored) and the background verdict (None when the background was not scored)."""

    objects: list[dict[str, bool]]
    background_ok: bool | None

    def scored(self) -> dict:
        """What was scored: {"objects": [[attribute, ...] per object], "background": bool}."""
        return {"objects": [list(o) for o in self.objects], "background": self.background_ok is not None}

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


# ============================================================================================
# Trained domain evaluators: the domain CLIP (open_clip) and the attribute checker (a CNN).
# Both are saved as a directory of safetensors weights + a JSON config; nothing here trains
# them (see training/clip.py and training/attributes.py) or imports mlflow.
# ============================================================================================

DOMAIN_CLIP_NAME = "budgetdiff-domain-clip"
DOMAIN_CLIP_DIR = "models/clip"
ATTRIBUTE_CHECKER_DIR = "models/attributes"
CLIP_CONFIG_FILE = "open_clip_config.json"     # open_clip's own "local-dir:" format
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
CHECKER_CONFIG_FILE = "config.json"
CHECKER_WEIGHTS_FILE = "model.safetensors"
CLIP_IMAGE_MEAN = (0.5, 0.5, 0.5)
CLIP_IMAGE_STD = (0.5, 0.5, 0.5)


class EvaluatorModelError(FileNotFoundError):
    """A trained evaluator's directory is missing or incomplete."""


def _require_dir(path: str | _os.PathLike, files: tuple[str, ...], stage: str) -> _Path:
    path = _Path(path)
    missing = [f for f in files if not (path / f).is_file()]
    if not path.is_dir() or missing:
        what = "does not exist" if not path.is_dir() else f"lacks {', '.join(missing)}"
        raise EvaluatorModelError(
            f"model directory {str(path)!r} {what}; build it with `dvc repro {stage}`"
        )
    return path


# --------------------------------------------------------------------------------------------
# Domain CLIP
# --------------------------------------------------------------------------------------------
def domain_clip_model_cfg(cfg: dict) -> dict:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) of the domain CLIP.

    Args:
        cfg: the ``train_clip`` params section; reads ``resolution`` (image side, 32),
            ``embed_dim`` (joint embedding size), ``vision`` {width, layers, patch_size,
            head_width} (a ViT) and ``text`` {width, layers, heads, context_length}. The text tower
            uses open_clip's built-in CLIP BPE tokenizer (vocab 49408, ships with the package).
    """
    vision, text = cfg["vision"], cfg["text"]
    return {
        "embed_dim": int(cfg["embed_dim"]),
        "vision_cfg": {
            "image_size": int(cfg["resolution"]),
            "patch_size": int(vision["patch_size"]),
            "width": int(vision["width"]),
            "layers": int(vision["layers"]),
            "head_width": int(vision["head_width"]),
            "mlp_ratio": 4.0,
        },
        "text_cfg": {
            "context_length": int(text["context_length"]),
            "vocab_size": 49408,
            "width": int(text["width"]),
            "heads": int(text["heads"]),
            "layers": int(text["layers"]),
        },
    }


def register_domain_clip(model_cfg: dict, name: str = DOMAIN_CLIP_NAME) -> str:
    """Register ``model_cfg`` with open_clip under ``name`` (a JSON file in a temporary folder,
    added with ``open_clip.add_model_config``); returns the name for ``open_clip.create_model``."""
    import open_clip

    folder = _Path(_tempfile.mkdtemp(prefix="budgetdiff_open_clip_"))
    (folder / f"{name}.json").write_text(_json.dumps(model_cfg))
    open_clip.add_model_config(folder / f"{name}.json")
    return name


def build_domain_clip(cfg: dict, seed: int | None = None):
    """A randomly initialised domain CLIP (open_clip ``CLIP``) for the ``train_clip`` config
    ``cfg``; never fetches pretrained weights. Returns (model, tokenizer)."""
    import open_clip

    import logging

    name = register_domain_clip(domain_clip_model_cfg(cfg))
    if seed is not None:
        torch.manual_seed(seed)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded: intended
    try:
        model = open_clip.create_model(name, pretrained=None, pretrained_image=False, pretrained_text=False)
    finally:
        root.setLevel(level)
    return model, open_clip.get_tokenizer(name)


def save_domain_clip(model, model_cfg: dict, path: str | _os.PathLike, extra: dict | None = None) -> None:
    """Save the domain CLIP in open_clip's ``local-dir:`` format: ``open_clip_config.json``
    ({"model_cfg", "preprocess_cfg", ...extra}) and ``open_clip_model.safetensors``, atomically
    (written to a sibling temporary folder, then renamed)."""
    import shutil

    from safetensors.torch import save_file

    path = _Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    preprocess = {"mean": list(CLIP_IMAGE_MEAN), "std": list(CLIP_IMAGE_STD),
                  "interpolation": "bilinear", "resize_mode": "squash"}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess, **(extra or {})}
    (tmp / CLIP_CONFIG_FILE).write_text(_json.dumps(config, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / CLIP_WEIGHTS_FILE))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_domain_clip(path: str | _os.PathLike = DOMAIN_CLIP_DIR, device: str = "cpu"):
    """Load the domain CLIP saved by ``train_clip``; returns (model in eval mode, tokenizer).

    Raises:
        EvaluatorModelError: the directory or one of its files is missing (names the DVC stage).
    """
    import open_clip

    path = _require_dir(path, (CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE), "train_clip")
    model = open_clip.create_model(f"local-dir:{path}", device=device)
    return model.eval(), open_clip.get_tokenizer(f"local-dir:{path}")


# --------------------------------------------------------------------------------------------
# Attribute checker
# --------------------------------------------------------------------------------------------
CHECKED_ATTRIBUTES = ("color", "shape", "size", "position", "texture")
_CELL_HEADS = (("shape", SHAPES), ("color", tuple(COLORS)), ("size", SIZES), ("texture", TEXTURES_V1))
_N_CELLS = len(POSITIONS)


class AttributeChecker(nn.Module):
    """A small CNN that reads a scene image as a 3x3 grid: for each cell, whether an object is
    there and its shape, colour, size and texture; and the background colour.

    Input: images (N, 3, R, R) in [0, 1], resized to ``resolution``. Architecture: pairs of 3x3
    conv + BatchNorm + ReLU, stride 2 between the widths of ``channels``, then a flattened
    MLP (``hidden`` units) so each cell's head sees the whole image with its position.

    Args:
        resolution: input side in pixels (default 32, the scene domain's).
        channels: conv widths per stage (default (32, 64, 128)).
        hidden: MLP width (default 256).
    """

    def __init__(self, resolution: int = 32, channels: tuple[int, ...] = (32, 64, 128), hidden: int = 256):
        super().__init__()
        self.config = {"resolution": int(resolution), "channels": [int(c) for c in channels], "hidden": int(hidden)}
        layers, c_in = [], 3
        for i, c in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = resolution // 2 ** (len(channels) - 1)
        self.head_sizes = [1] + [len(v) for _, v in _CELL_HEADS]
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * side * side, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, _N_CELLS * sum(self.head_sizes) + len(BACKGROUNDS)),
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: ``occupied`` (N, 9), ``shape`` (N, 9, 5), ``color`` (N, 9, 8), ``size`` (N, 9, 2),
        ``texture`` (N, 9, 3), ``background`` (N, 4)."""
        res = self.config["resolution"]
        if images.shape[-1] != res or images.shape[-2] != res:
            images = F.interpolate(images, size=(res, res), mode="area")
        out = self.mlp(self.features(images * 2.0 - 1.0))
        n_bg = len(BACKGROUNDS)
        cells = out[:, :-n_bg].reshape(out.shape[0], _N_CELLS, sum(self.head_sizes))
        parts = torch.split(cells, self.head_sizes, dim=-1)
        logits = {"occupied": parts[0].squeeze(-1), "background": out[:, -n_bg:]}
        for (name, _), part in zip(_CELL_HEADS, parts[1:]):
            logits[name] = part
        return logits


def attribute_targets(specs: list[SceneSpec]) -> dict[str, torch.Tensor]:
    """Training targets of the checker for ``specs``: ``occupied`` (N, 9) float, per-cell class
    indices (N, 9) with -100 (ignored) in empty cells, ``background`` (N,)."""
    n = len(specs)
    occupied = torch.zeros(n, _N_CELLS)
    classes = {name: torch.full((n, _N_CELLS), -100, dtype=torch.long) for name, _ in _CELL_HEADS}
    for i, spec in enumerate(specs):
        for obj in spec.objects:
            cell = POSITIONS.index(obj.position)
            occupied[i, cell] = 1.0
            for name, vocab in _CELL_HEADS:
                classes[name][i, cell] = vocab.index(getattr(obj, name))
    background = torch.tensor([list(BACKGROUNDS).index(s.background) for s in specs])
    return {"occupied": occupied, "background": background, **classes}


def attribute_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the occupancy BCE, the per-occupied-cell cross-entropies and the background CE."""
    loss = F.binary_cross_entropy_with_logits(logits["occupied"], targets["occupied"])
    loss = loss + F.cross_entropy(logits["background"], targets["background"])
    for name, _ in _CELL_HEADS:
        loss = loss + F.cross_entropy(logits[name].flatten(0, 1), targets[name].flatten(), ignore_index=-100)
    return loss


@torch.no_grad()
def detect_scenes(checker: AttributeChecker, images: torch.Tensor, threshold: float = 0.5) -> list[SceneSpec]:
    """The scenes the checker reads in ``images`` ((N, 3, H, W) in [0, 1]): an object in every
    cell whose occupancy probability exceeds ``threshold`` (default 0.5)."""
    logits = checker(images)
    occupied = torch.sigmoid(logits["occupied"]) > threshold
    picks = {name: logits[name].argmax(-1) for name, _ in _CELL_HEADS}
    backgrounds = logits["background"].argmax(-1)
    scenes = []
    for i in range(images.shape[0]):
        objects = tuple(
            SceneObject(shape=SHAPES[picks["shape"][i, c]], color=list(COLORS)[picks["color"][i, c]],
                        size=SIZES[picks["size"][i, c]], position=POSITIONS[c],
                        texture=TEXTURES_V1[picks["texture"][i, c]])
            for c in range(_N_CELLS) if occupied[i, c]
        )
        scenes.append(SceneSpec(objects=objects, background=list(BACKGROUNDS)[backgrounds[i]]))
    return scenes


def _match_cost(o: StatedObject, d: SceneObject) -> float:
    """Cost of matching prompt object ``o`` to detected object ``d``: distance between their cells
    in cell units + 0.5 per colour or shape mismatch (each only where ``o`` states it). An object
    with no stated position is matched on what it states: 0.25 per size or texture mismatch
    instead of the distance."""
    if o.position is not None:
        cost = np.hypot(o.cell[0] - d.cell[0], o.cell[1] - d.cell[1])
    else:
        cost = 0.25 * ((o.size is not None and o.size != d.size) + (o.texture is not None and o.texture != d.texture))
    return cost + 0.5 * (o.color is not None and o.color != d.color) + 0.5 * (o.shape is not None and o.shape != d.shape)


def compare_scenes(detected: SceneSpec, spec: SceneSpec | StatedScene) -> SceneCheck:
    """Judge a detected scene against the prompt's ``spec``, GenEval-style: match each prompt
    object to a detected object (Hungarian assignment on ``_match_cost``), then check the
    attributes the prompt states (a full ``SceneSpec`` states colour, shape, size, position and
    texture of every object, and the background) of each matched pair; position means the same
    cell. An unmatched prompt object fails every attribute it states; an unstated background is
    not scored (``background_ok`` None)."""
    stated = spec if isinstance(spec, StatedScene) else StatedScene.from_spec(spec)
    verdicts = [{a: False for a in o.stated} for o in stated.objects]
    if detected.objects and stated.objects:
        cost = np.array([[_match_cost(o, d) for d in detected.objects] for o in stated.objects])
        for r, c in zip(*linear_sum_assignment(cost)):
            o, d = stated.objects[r], detected.objects[c]
            verdicts[r] = {a: getattr(o, a) == getattr(d, a) for a in o.stated}
    background_ok = None if stated.background is None else detected.background == stated.background
    return SceneCheck(objects=verdicts, background_ok=background_ok)


def scene_attr_acc(check: SceneCheck) -> float:
    """``domain/attr_acc`` of one image: the fraction of the prompt's stated attributes it
    satisfies, (Σ_objects #{stated attributes correct} + [background correct]) / (#stated
    attributes + [background stated]); for a full spec (5·n_objects + 1) in the denominator.
    NaN when nothing was scored."""
    scored = sum(len(o) for o in check.objects) + (check.background_ok is not None)
    hits = sum(sum(o.values()) for o in check.objects) + int(bool(check.background_ok))
    return hits / scored if scored else float("nan")


def _as_spec(item) -> SceneSpec | StatedScene:
    if isinstance(item, (SceneSpec, StatedScene)):
        return item
    if isinstance(item, str):
        return parse_stated_scene(item)
    raise TypeError(f"expected a SceneSpec, StatedScene or prompt string, got {type(item).__name__}")


def images_to_tensor(images) -> torch.Tensor:
    """A batch of images as float (N, 3, H, W) in [0, 1]. Accepts a tensor (N, 3, H, W) in
    [0, 1], a uint8 or float array (N, H, W, 3), or a list of PIL images / (H, W, 3) arrays of
    one size (uint8 in [0, 255], float in [0, 1])."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, np.ndarray) and images.ndim == 4:
        arrays = images
    else:
        arrays = np.stack([np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images])
    tensor = torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2)
    return tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()


def check_scenes(checker: AttributeChecker, images, specs_or_prompts, batch_size: int = 256) -> list[SceneCheck]:
    """Per-image ``SceneCheck`` of ``images`` against their specs, stated scenes or prompts
    (prompts are read with ``parse.parse_stated_scene``: a domain prompt gives its full spec, a
    partial one its stated attributes; an unreadable one raises ``PromptParseError``)."""
    specs = [_as_spec(s) for s in specs_or_prompts]
    tensor = images_to_tensor(images)
    if tensor.shape[0] != len(specs):
        raise ValueError(f"{tensor.shape[0]} images but {len(specs)} specs/prompts")
    device = next(checker.parameters()).device
    checks = []
    for i in range(0, len(specs), batch_size):
        detected = detect_scenes(checker, tensor[i : i + batch_size].to(device))
        checks += [compare_scenes(d, s) for d, s in zip(detected, specs[i : i + batch_size])]
    return checks


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else float("nan")


def summarize_attribute_checks(checks: list[SceneCheck]) -> dict[str, float]:
    """Mean accuracy per attribute (colour, shape, size, position, texture) over the objects
    that state it, ``all_attributes`` (objects right on every stated attribute), ``background``
    (over the scenes that state it), and ``attr_acc`` (the mean per-image ``domain/attr_acc``).
    NaN where nothing was scored."""
    if not checks:
        return {}
    objects = [o for c in checks for o in c.objects]
    out = {a: _mean([o[a] for o in objects if a in o]) for a in CHECKED_ATTRIBUTES}
    out["all_attributes"] = _mean([all(o.values()) for o in objects if o])
    out["background"] = _mean([c.background_ok for c in checks if c.background_ok is not None])
    out["attr_acc"] = _mean([scene_attr_acc(c) for c in checks])
    return out


def attr_check(images, specs_or_prompts, checker: AttributeChecker | None = None,
               checker_dir: str | _os.PathLike = ATTRIBUTE_CHECKER_DIR) -> dict[str, float]:
    """Per-attribute accuracies of ``images`` against their scene specs or prompts, judged by
    the trained attribute checker (the replacement of ``check_scene_heuristic`` for benchmarks).

    Args:
        images: tensor (N, 3, H, W) in [0, 1], array (N, H, W, 3), or a list of PIL images/arrays.
        specs_or_prompts: one ``SceneSpec``, ``StatedScene`` or prompt per image (a prompt that
            leaves attributes unstated is scored on those it states).
        checker: a loaded checker; default: ``load_attribute_checker(checker_dir)``.
        checker_dir: where the ``train_attributes`` stage saved it (default models/attributes).

    Returns:
        {color, shape, size, position, texture, all_attributes, background, attr_acc}.
    """
    checker = checker if checker is not None else load_attribute_checker(checker_dir)
    return summarize_attribute_checks(check_scenes(checker, images, specs_or_prompts))


def save_attribute_checker(checker: AttributeChecker, path: str | _os.PathLike, extra: dict | None = None) -> None:
    """Save ``config.json`` + ``model.safetensors`` to ``path`` atomically (sibling temp folder)."""
    import shutil

    from safetensors.torch import save_file

    path = _Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CHECKER_CONFIG_FILE).write_text(_json.dumps({**checker.config, **(extra or {})}, indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in checker.state_dict().items()},
              str(tmp / CHECKER_WEIGHTS_FILE))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_attribute_checker(path: str | _os.PathLike = ATTRIBUTE_CHECKER_DIR, device: str = "cpu") -> AttributeChecker:
    """Load the checker saved by ``train_attributes`` (eval mode).

    Raises:
        EvaluatorModelError: the directory or one of its files is missing (names the DVC stage).
    """
    from safetensors.torch import load_file

    path = _require_dir(path, (CHECKER_CONFIG_FILE, CHECKER_WEIGHTS_FILE), "train_attributes")
    config = _json.loads((path / CHECKER_CONFIG_FILE).read_text())
    checker = AttributeChecker(config["resolution"], tuple(config["channels"]), config["hidden"])
    checker.load_state_dict(load_file(str(path / CHECKER_WEIGHTS_FILE), device=device))
    return checker.to(device).eval()
