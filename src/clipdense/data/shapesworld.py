"""ShapesWorld: procedurally generated scenes of coloured shapes for testing CLIP-based dense prediction.

No real CLIP weights or datasets are available offline, so ShapesWorld provides a small synthetic world
with everything a language-guided dense prediction pipeline needs:

* images (coloured shapes of three sizes on muted, textured backgrounds, with partial occlusion),
* exact semantic and instance labels (one class per (colour, shape) pair, e.g. ``"red circle"``),
* natural-language captions ("a small red circle left of a blue square on a striped background"),
  used to pre-train a small CLIP contrastively (see :mod:`clipdense.training.clip_pretrain`).

Every scene is a pure function of an integer seed (:func:`generate_scene`), so arbitrarily many scenes
can be streamed without touching the disk (:class:`ShapesWorldCaptions`) and exported datasets are
reproducible (:func:`export_semantic`, :func:`export_coco`, :func:`generate_dataset`).

Seed streams: exports and datasets add a per-purpose offset to the user seed so that, for seeds and
sizes below 100 million, the segmentation train/val scenes, the CLIP pre-training scenes and the
zero-shot evaluation scenes never share a seed (see ``*_SEED_OFFSET``).
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from clipdense.fileio import atomic_write_json

__all__ = [
    "BACKGROUNDS",
    "CLIP_SEED_OFFSET",
    "COLOURS",
    "EVAL_SEED_OFFSET",
    "SHAPES",
    "SIZE_NAMES",
    "TRAIN_SEED_OFFSET",
    "VAL_SEED_OFFSET",
    "Scene",
    "ShapesWorldCaptions",
    "ShapesWorldConfig",
    "class_names",
    "export_coco",
    "export_semantic",
    "generate_dataset",
    "generate_scene",
    "normalize_image",
    "render_scene_cache",
    "single_object_scene",
    "training_scene",
]

#: Named object colours (RGB). Saturated or extreme, so they stand out from the muted backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 80, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (245, 125, 190),
    "cyan": (40, 200, 215),
    "brown": (125, 75, 35),
}
#: Shapes that can be drawn (all stay distinguishable down to ~12 px).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond")
#: Background textures; each name reads naturally in "on a <name> background".
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "noisy", "gradient")
#: Size words for the tertiles of the configured object size range.
SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")

TRAIN_SEED_OFFSET = 0
VAL_SEED_OFFSET = 100_000_000
CLIP_SEED_OFFSET = 200_000_000
EVAL_SEED_OFFSET = 300_000_000

_SPLITS = (
    ("training", "train2017", "train", TRAIN_SEED_OFFSET),
    ("validation", "val2017", "val", VAL_SEED_OFFSET),
)


@dataclass
class ShapesWorldConfig:
    """Parameters of the ShapesWorld scene generator.

    Attributes:
        image_size: Side length S of the square images, in pixels.
        min_objects: Minimum number of objects per scene.
        max_objects: Maximum number of objects per scene.
        min_size: Smallest object extent (diameter of its circumscribing circle) as a fraction of S.
        max_size: Largest object extent as a fraction of S. The range is split into three tertiles
            named "small", "medium" and "large" in captions.
        shapes: Shape names, a subset of :data:`SHAPES`.
        colours: Colour names, a subset of :data:`COLOURS`.
        backgrounds: Background texture names, a subset of :data:`BACKGROUNDS`.
        min_visible_fraction: Every object keeps at least this fraction of its area visible after
            later objects are drawn over it.
        single_object_caption_prob: Probability that a caption names just one (random) object.
        size_word_prob: Probability that a multi-object caption gives an object's size word.
        max_caption_words: Captions are shortened (prefix, size words, background, then trailing objects
            dropped) to at most this many words so that they fit CLIP's 24-token context.
        max_rotation_deg: Polygonal shapes are rotated uniformly within +-this angle.
        colour_jitter: Per-channel uniform jitter (+-) applied to object colours.
        supersample: Supersampling factor used to anti-alias object edges.
        max_placement_tries: Placement attempts per object before it is dropped.
    """

    image_size: int = 160
    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 0.08
    max_size: float = 0.18
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    backgrounds: tuple[str, ...] = BACKGROUNDS
    min_visible_fraction: float = 0.5
    single_object_caption_prob: float = 0.5
    size_word_prob: float = 0.6
    max_caption_words: int = 18
    max_rotation_deg: float = 12.0
    colour_jitter: int = 12
    supersample: int = 4
    max_placement_tries: int = 100

    def __post_init__(self) -> None:
        self.shapes = tuple(self.shapes)
        self.colours = tuple(self.colours)
        self.backgrounds = tuple(self.backgrounds)
        for kind, values, known in (
            ("shape", self.shapes, SHAPES),
            ("colour", self.colours, tuple(COLOURS)),
            ("background", self.backgrounds, BACKGROUNDS),
        ):
            unknown = [v for v in values if v not in known]
            if unknown or not values or len(set(values)) != len(values):
                raise ValueError(
                    f"ShapesWorldConfig: invalid {kind}s {list(values)} (unknown: {unknown}); "
                    f"use a non-empty list of distinct names from {list(known)}."
                )
        if len(self.shapes) * len(self.colours) > 254:
            raise ValueError("ShapesWorldConfig: more than 254 classes do not fit a uint8 label map; use fewer.")
        if self.image_size < 16:
            raise ValueError(f"ShapesWorldConfig: image_size={self.image_size} is too small; use >= 16.")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"ShapesWorldConfig: need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}."
            )
        if not 0.0 < self.min_size <= self.max_size <= 0.5:
            raise ValueError(
                f"ShapesWorldConfig: need 0 < min_size <= max_size <= 0.5 (fractions of the image side), "
                f"got {self.min_size}, {self.max_size}."
            )
        if not 0.0 < self.min_visible_fraction <= 1.0:
            raise ValueError(
                f"ShapesWorldConfig: min_visible_fraction={self.min_visible_fraction} must be in (0, 1]: "
                "every object needs a visible part to be labelled."
            )
        for name in ("single_object_caption_prob", "size_word_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ShapesWorldConfig: {name}={getattr(self, name)} must be in [0, 1].")
        if self.max_caption_words < 4:
            raise ValueError("ShapesWorldConfig: max_caption_words must be >= 4 to name one object.")
        if self.supersample < 1 or self.max_placement_tries < 1:
            raise ValueError("ShapesWorldConfig: supersample and max_placement_tries must be >= 1.")

    @property
    def num_classes(self) -> int:
        """Number of object classes C (background excluded)."""
        return len(self.colours) * len(self.shapes)


@dataclass
class Scene:
    """One rendered ShapesWorld scene. N objects, listed in drawing (back-to-front) order.

    Attributes:
        image: H x W x 3 uint8 RGB image.
        semantic: H x W uint8 label map: 0 = background, i + 1 = class i of :func:`class_names`.
        masks: N x H x W bool visible (un-occluded) part of every object.
        amodal_masks: N x H x W bool full shape of every object, including parts hidden by later objects.
        boxes: N x 4 float32 ``(x0, y0, x1, y1)`` boxes of the visible parts, in pixel-edge coordinates
            (``x1 = last column + 1``), so ``(x1 - x0, y1 - y0)`` is the box size in pixels.
        labels: (N,) int64 class indices into :func:`class_names`.
        centres: N x 2 float32 ``(x, y)`` centres of the (unoccluded) shapes, in pixels.
        sizes: Size word ("small" / "medium" / "large") of every object.
        caption: Natural-language caption.
        caption_objects: Indices of the objects that the caption names, in caption order.
        single_object_caption: Whether the caption was drawn as a single-object caption.
        background: Background texture name (one of :data:`BACKGROUNDS`).
        seed: The seed the scene was generated from.
    """

    image: np.ndarray
    semantic: np.ndarray
    masks: np.ndarray
    amodal_masks: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    centres: np.ndarray
    sizes: tuple[str, ...]
    caption: str
    caption_objects: tuple[int, ...]
    single_object_caption: bool
    background: str
    seed: int


def class_names(cfg: ShapesWorldConfig | None = None) -> list[str]:
    """Object class names, ``"<colour> <shape>"``, colour-major in config order.

    Args:
        cfg: World configuration (default :class:`ShapesWorldConfig`).

    Returns:
        C names; class i has label i + 1 in semantic maps (0 = background).
    """
    cfg = cfg or ShapesWorldConfig()
    return [f"{colour} {shape}" for colour in cfg.colours for shape in cfg.shapes]


# ----------------------------------------------------------------------------------------------------------
# Geometry and rendering
# ----------------------------------------------------------------------------------------------------------


def _regular_polygon(n: int, radius: float, phase_deg: float) -> np.ndarray:
    angles = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _shape_outline(shape: str, radius: float, rotation_deg: float) -> np.ndarray:
    """Polygon of a shape centred at the origin.

    Args:
        shape: Shape name.
        radius: Half the nominal extent, in pixels.
        rotation_deg: Clockwise rotation (image coordinates, y down).

    Returns:
        K x 2 float64 vertex offsets ``(dx, dy)``.
    """
    r = radius
    if shape == "circle":
        pts = _regular_polygon(48, r, 0.0)
    elif shape == "square":
        h = 0.8 * r
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif shape == "triangle":
        pts = _regular_polygon(3, r, -90.0) + np.array([0.0, 0.12 * r])
    elif shape == "star":
        outer = _regular_polygon(5, r, -90.0)
        inner = _regular_polygon(5, 0.45 * r, -54.0)
        pts = np.stack([outer, inner], axis=1).reshape(10, 2)
    elif shape == "hexagon":
        pts = _regular_polygon(6, r, 0.0)
    elif shape == "cross":
        t = 0.32 * r
        pts = np.array(
            [
                [-t, -r],
                [t, -r],
                [t, -t],
                [r, -t],
                [r, t],
                [t, t],
                [t, r],
                [-t, r],
                [-t, t],
                [-r, t],
                [-r, -t],
                [-t, -t],
            ]
        )
    elif shape == "diamond":
        pts = np.array([[0.0, -r], [0.68 * r, 0.0], [0.0, r], [-0.68 * r, 0.0]])
    else:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {list(SHAPES)}.")
    theta = math.radians(rotation_deg)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return pts @ rot.T


def _coverage(polygon: np.ndarray, size: int, supersample: int) -> np.ndarray:
    """Anti-aliased coverage of a polygon on an S x S pixel grid.

    Renders only the polygon's bounding box at ``supersample`` x resolution and box-filters it down.

    Args:
        polygon: K x 2 vertices in pixel-edge coordinates (pixel (i, j) spans [j, j+1) x [i, i+1)).
        size: Image side S.
        supersample: Supersampling factor.

    Returns:
        S x S float32 coverage in [0, 1].
    """
    x0 = max(int(math.floor(polygon[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(polygon[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(polygon[:, 0].max())) + 1, size)
    y1 = min(int(math.ceil(polygon[:, 1].max())) + 1, size)
    alpha = np.zeros((size, size), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return alpha
    ss = supersample
    canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    local = (polygon - np.array([x0, y0])) * ss
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in local.tolist()], fill=255)
    if ss > 1:
        canvas = canvas.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    alpha[y0:y1, x0:x1] = np.asarray(canvas, dtype=np.float32) / 255.0
    return alpha


def _muted_colour(rng: np.random.Generator, hue: float | None = None) -> tuple[float, float, float]:
    hue = rng.random() if hue is None else hue
    return (hue, float(rng.uniform(0.03, 0.18)), float(rng.uniform(0.45, 0.68)))


def _hsv_to_rgb255(hsv: tuple[float, float, float]) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(*hsv), dtype=np.float32) * 255.0


def _render_background(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted, low-contrast background texture.

    Returns:
        S x S x 3 float32 RGB in [0, 255].
    """
    base_hsv = _muted_colour(rng)
    shift = float(rng.uniform(0.07, 0.14)) * (1.0 if rng.random() < 0.5 else -1.0)
    alt_hsv = (base_hsv[0], base_hsv[1], float(np.clip(base_hsv[2] + shift, 0.35, 0.8)))
    c0, c1 = _hsv_to_rgb255(base_hsv), _hsv_to_rgb255(alt_hsv)
    scale = size / 160.0
    coords = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = coords[:, None], coords[None, :]  # broadcast to S x S
    if name == "plain":
        return np.broadcast_to(c0, (size, size, 3)).copy()
    elif name == "striped":
        angle = math.radians(float(rng.choice([0.0, 45.0, 90.0, 135.0])))
        period = float(rng.uniform(6.0, 14.0)) * scale
        phase = float(rng.random())
        t = (((xx * math.cos(angle) + yy * math.sin(angle)) / period + phase) % 1.0 < 0.5).astype(np.float32)
    elif name == "checkered":
        cell = float(rng.uniform(6.0, 14.0)) * scale
        ox, oy = rng.uniform(0.0, cell, size=2)
        t = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2).astype(np.float32)
    elif name == "dotted":
        spacing = float(rng.uniform(8.0, 14.0)) * scale
        radius = spacing * float(rng.uniform(0.15, 0.3))
        ox, oy = rng.uniform(0.0, spacing, size=2)
        dx = (xx + ox) % spacing - spacing / 2
        dy = (yy + oy) % spacing - spacing / 2
        t = (dx**2 + dy**2 < radius**2).astype(np.float32)
    elif name == "noisy":
        grid = int(rng.integers(6, 16))
        coarse = Image.fromarray((rng.random((grid, grid)) * 255).astype(np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        t = np.clip(0.7 * smooth + 0.3 * rng.random((size, size)), 0.0, 1.0).astype(np.float32)
    elif name == "gradient":
        c1 = _hsv_to_rgb255(_muted_colour(rng, hue=(base_hsv[0] + rng.uniform(0.2, 0.8)) % 1.0))
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
        proj = xx * math.cos(angle) + yy * math.sin(angle)
        t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)).astype(np.float32)
    else:
        raise ValueError(f"Unknown background {name!r}; choose one of {list(BACKGROUNDS)}.")
    t = np.broadcast_to(t, (size, size))[..., None]
    return (c0 + (c1 - c0) * t).astype(np.float32)


def _size_name(fraction: float, cfg: ShapesWorldConfig) -> str:
    span = cfg.max_size - cfg.min_size
    if span <= 0:
        return SIZE_NAMES[1]
    tertile = int((fraction - cfg.min_size) / span * 3)
    return SIZE_NAMES[min(max(tertile, 0), 2)]


@dataclass
class _Object:
    class_index: int
    colour: str
    shape: str
    size: str
    centre: tuple[float, float]
    coverage: np.ndarray  # S x S float32
    full_mask: np.ndarray  # S x S bool


def _place_objects(
    rng: np.random.Generator, cfg: ShapesWorldConfig, classes: Sequence[int], seed: int
) -> list[_Object]:
    """Samples size, pose and position of each object; every object keeps min_visible_fraction visible."""
    size = cfg.image_size
    num_shapes = len(cfg.shapes)
    placed: list[_Object] = []
    visible: list[np.ndarray] = []
    for class_index in classes:
        colour, shape = cfg.colours[class_index // num_shapes], cfg.shapes[class_index % num_shapes]
        for _ in range(cfg.max_placement_tries):
            fraction = float(rng.uniform(cfg.min_size, cfg.max_size))
            rotation = 0.0 if shape == "circle" else float(rng.uniform(-1.0, 1.0)) * cfg.max_rotation_deg
            outline = _shape_outline(shape, fraction * size / 2.0, rotation)
            lo, hi = outline.min(axis=0), outline.max(axis=0)
            cx = float(rng.uniform(1.0 - lo[0], size - 1.0 - hi[0]))
            cy = float(rng.uniform(1.0 - lo[1], size - 1.0 - hi[1]))
            coverage = _coverage(outline + np.array([cx, cy]), size, cfg.supersample)
            mask = coverage >= 0.5
            area = int(mask.sum())
            if area == 0:
                continue
            remaining = [v & ~mask for v in visible]
            if all(
                r.sum() >= cfg.min_visible_fraction * o.full_mask.sum() for r, o in zip(remaining, placed, strict=True)
            ):
                placed.append(_Object(class_index, colour, shape, _size_name(fraction, cfg), (cx, cy), coverage, mask))
                visible = [*remaining, mask]
                break
    if len(placed) < cfg.min_objects:
        raise RuntimeError(
            f"ShapesWorld: could only place {len(placed)} of {len(classes)} objects for seed {seed} while "
            f"keeping {cfg.min_visible_fraction:.0%} of each visible; lower min_objects/max_size or "
            "raise max_placement_tries."
        )
    return placed


def _noun_phrase(obj: _Object, with_size: bool) -> str:
    words = [obj.size, obj.colour, obj.shape] if with_size else [obj.colour, obj.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)}"


def _relation(a: int, b: int, objects: Sequence[_Object]) -> str:
    """Spatial relation of object ``a`` relative to object ``b`` ("<a> left of <b>")."""
    if np.any(objects[a].full_mask & objects[b].full_mask):
        return "in front of" if a > b else "behind"
    dx = objects[a].centre[0] - objects[b].centre[0]
    dy = objects[a].centre[1] - objects[b].centre[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _caption(
    rng: np.random.Generator, cfg: ShapesWorldConfig, objects: Sequence[_Object], background: str
) -> tuple[str, tuple[int, ...], bool]:
    """Draws a caption. Returns (caption, indices of named objects, whether it is a single-object caption)."""
    single = bool(rng.random() < cfg.single_object_caption_prob)
    background_phrase = f" on a {background} background"
    if single:
        index = int(rng.integers(len(objects)))
        with_size = bool(rng.random() < 0.75)
        template = int(rng.integers(4))
        phrase = _noun_phrase(objects[index], with_size)
        caption = [
            f"a photo of {phrase}",
            phrase,
            phrase + background_phrase,
            f"a photo of {phrase}{background_phrase}",
        ]
        return caption[template], (index,), True

    order = [int(i) for i in rng.permutation(len(objects))]
    with_size = rng.random(len(objects)) < cfg.size_word_prob
    prefix = str(rng.choice(["", "a photo of ", "an image of "]))
    with_background = bool(rng.random() < 0.6)

    def compose(named: list[int], use_prefix: bool, use_sizes: bool, use_background: bool) -> str:
        clauses = []
        for k in range(0, len(named), 2):
            a = named[k]
            clause = _noun_phrase(objects[a], use_sizes and bool(with_size[a]))
            if k + 1 < len(named):
                b = named[k + 1]
                other = _noun_phrase(objects[b], use_sizes and bool(with_size[b]))
                clause += f" {_relation(a, b, objects)} {other}"
            clauses.append(clause)
        text = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
        return (prefix if use_prefix else "") + text + (background_phrase if use_background else "")

    # Shorten step by step until the caption fits: drop prefix, size words, background, trailing objects.
    variants = [(True, True, True), (False, True, True), (False, False, True), (False, False, False)]
    for count in range(len(order), 0, -1):
        for use_prefix, use_sizes, use_background in variants:
            text = compose(order[:count], use_prefix, use_sizes, use_background and with_background)
            if len(text.split()) <= cfg.max_caption_words:
                return text, tuple(order[:count]), False
    return text, tuple(order[:1]), False


def _assemble(
    rng: np.random.Generator, cfg: ShapesWorldConfig, objects: list[_Object], background: str, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Composites the image and computes exact visible labels. Returns image, semantic, masks, boxes."""
    size = cfg.image_size
    canvas = _render_background(background, rng, size)
    semantic = np.zeros((size, size), dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int64)
    for k, obj in enumerate(objects):
        jitter = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, size=3)
        colour = np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255).astype(np.float32)
        ys, xs = np.nonzero(obj.coverage.any(axis=1))[0], np.nonzero(obj.coverage.any(axis=0))[0]
        window = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
        alpha = obj.coverage[window][..., None]
        canvas[window] = canvas[window] * (1.0 - alpha) + colour * alpha
        semantic[obj.full_mask] = obj.class_index + 1
        owner[obj.full_mask] = k
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    masks = owner[None] == np.arange(len(objects))[:, None, None]
    boxes = np.zeros((len(objects), 4), dtype=np.float32)
    for k, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if xs.size == 0:  # cannot happen: min_visible_fraction > 0 is enforced by the config
            raise RuntimeError(
                f"ShapesWorld: object {k} of seed {seed} is fully occluded; set min_visible_fraction > 0."
            )
        boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return image, semantic, masks, boxes


def _build_scene(
    seed: int, cfg: ShapesWorldConfig, rng: np.random.Generator, classes: Sequence[int], caption: str | None
) -> Scene:
    background = str(rng.choice(cfg.backgrounds))
    objects = _place_objects(rng, cfg, classes, seed)
    if caption is None:
        text, named, single = _caption(rng, cfg, objects, background)
    else:
        text, named, single = caption.format(obj=_noun_phrase(objects[0], True)), (0,), True
    image, semantic, masks, boxes = _assemble(rng, cfg, objects, background, seed)
    return Scene(
        image=image,
        semantic=semantic,
        masks=masks,
        amodal_masks=np.stack([o.full_mask for o in objects]),
        boxes=boxes,
        labels=np.array([o.class_index for o in objects], dtype=np.int64),
        centres=np.array([o.centre for o in objects], dtype=np.float32).reshape(-1, 2),
        sizes=tuple(o.size for o in objects),
        caption=text,
        caption_objects=named,
        single_object_caption=single,
        background=background,
        seed=seed,
    )


def generate_scene(seed: int, cfg: ShapesWorldConfig | None = None) -> Scene:
    """Renders the scene for a seed (deterministic: the same seed and config give the same scene).

    Objects are drawn back to front; later objects may partly cover earlier ones, but every object keeps
    at least ``cfg.min_visible_fraction`` of its area visible. Edges are anti-aliased by supersampling, while
    the labels are hard masks (coverage >= 0.5 at the final resolution) that follow the drawing order.

    Args:
        seed: Non-negative integer seed.
        cfg: World configuration (default :class:`ShapesWorldConfig`).

    Returns:
        The :class:`Scene`.
    """
    cfg = cfg or ShapesWorldConfig()
    rng = np.random.default_rng(seed)
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    classes = [int(c) for c in rng.integers(cfg.num_classes, size=count)]
    return _build_scene(seed, cfg, rng, classes, caption=None)


def single_object_scene(seed: int, cfg: ShapesWorldConfig | None, class_index: int) -> Scene:
    """Renders a scene with exactly one object of a given class (for zero-shot classification).

    Args:
        seed: Non-negative integer seed (size, pose, position and background are random).
        cfg: World configuration (default :class:`ShapesWorldConfig`).
        class_index: Class index into :func:`class_names`.

    Returns:
        A :class:`Scene` with N = 1 and caption "a photo of a <size> <colour> <shape>".
    """
    cfg = cfg or ShapesWorldConfig()
    if not 0 <= class_index < cfg.num_classes:
        raise ValueError(f"class_index={class_index} is out of range; this config has {cfg.num_classes} classes.")
    rng = np.random.default_rng(seed)
    return _build_scene(seed, cfg, rng, [class_index], caption="a photo of {obj}")


# ----------------------------------------------------------------------------------------------------------
# Torch dataset
# ----------------------------------------------------------------------------------------------------------


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """Converts an image to a CLIP input tensor.

    Args:
        image: H x W x 3 uint8 RGB image.

    Returns:
        3 x H x W float32 tensor normalised with the OpenAI CLIP mean and std.
    """
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean) / std


def training_scene(seed: int, cfg: ShapesWorldConfig, single_object: bool = False) -> Scene:
    """Scene ``seed`` of a training stream: :func:`generate_scene`, or with ``single_object`` the
    one-object scene ``single_object_scene(seed, cfg, seed % C)`` ("a photo of a <size> <colour> <shape>")."""
    return single_object_scene(seed, cfg, seed % cfg.num_classes) if single_object else generate_scene(seed, cfg)


class ShapesWorldCaptions(Dataset):
    """Image-caption pairs for contrastive training: rendered on the fly, or read from a scene cache.

    Item ``i`` is scene ``training_scene(base_seed + i, cfg, single_object)``. With ``cache`` (a folder
    written by :func:`render_scene_cache` for the same scenes) the pixels and caption are read from its
    memory-mapped arrays instead of being rendered again: the same values, at a fraction of the CPU time.

    Args:
        num_scenes: Dataset length.
        base_seed: Seed of item 0 (default keeps clear of the exported segmentation splits).
        cfg: World configuration (default :class:`ShapesWorldConfig`).
        cache: A complete scene cache of exactly these scenes, or None to render on the fly.
        single_object: One-object scenes with their plain captions instead of full scenes.

    Raises:
        ValueError: The cache is incomplete or holds other scenes.
    """

    def __init__(
        self,
        num_scenes: int = 120_000,
        base_seed: int = CLIP_SEED_OFFSET,
        cfg: ShapesWorldConfig | None = None,
        cache: str | Path | None = None,
        single_object: bool = False,
    ) -> None:
        if num_scenes < 1:
            raise ValueError(f"ShapesWorldCaptions: num_scenes must be >= 1, got {num_scenes}.")
        self.num_scenes = num_scenes
        self.base_seed = base_seed
        self.cfg = cfg or ShapesWorldConfig()
        self.single_object = single_object
        self.cache = None if cache is None else Path(cache)
        if self.cache is not None:
            found = _read_cache_meta(self.cache)
            expected = _cache_meta(num_scenes, base_seed, self.cfg, single_object)
            if found is None or not found.get("complete") or _meta_key(found) != _meta_key(expected):
                raise ValueError(
                    f"{self.cache} is not a complete scene cache of these scenes ({num_scenes} scenes from seed "
                    f"{base_seed}, {self.cfg.image_size} px); build it with render_scene_cache(...)."
                )
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None  # opened lazily, once per process

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """Returns (3 x S x S normalised float32 image, caption)."""
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"ShapesWorldCaptions index {index} out of range [0, {self.num_scenes}).")
        if self.cache is None:
            scene = training_scene(self.base_seed + index, self.cfg, self.single_object)
            return normalize_image(scene.image), scene.caption
        if self._arrays is None:
            self._arrays = tuple(np.load(self.cache / name, mmap_mode="r") for name in _CACHE_ARRAYS)
        images, captions = self._arrays
        return normalize_image(np.array(images[index])), captions[index].decode("ascii")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}  # DataLoader workers map the files themselves


# ----------------------------------------------------------------------------------------------------------
# Scene cache: render once, train for many epochs
# ----------------------------------------------------------------------------------------------------------

_CACHE_META = "cache.json"
_CACHE_ARRAYS = ("images.npy", "captions.npy")
_CACHE_VERSION = 1
#: Caption slots in the cache are fixed-width ASCII; captions are capped at 18 words, far below this.
_CAPTION_BYTES = 192


def _cache_meta(num_scenes: int, base_seed: int, cfg: ShapesWorldConfig, single_object: bool) -> dict:
    return {
        "version": _CACHE_VERSION,
        "num_scenes": num_scenes,
        "base_seed": base_seed,
        "single_object": single_object,
        "config": asdict(cfg),
    }


def _meta_key(meta: dict) -> str:
    keys = ("version", "num_scenes", "base_seed", "single_object", "config")
    return json.dumps({k: meta.get(k) for k in keys}, sort_keys=True)


def _read_cache_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / _CACHE_META).read_text())
    except (OSError, ValueError):
        return None


def _render_range(job: tuple[int, int, ShapesWorldConfig, bool]) -> tuple[np.ndarray, list[bytes]]:
    """Renders training scenes ``seed0 .. seed0 + count - 1``: (count x S x S x 3 uint8 images, ASCII captions)."""
    seed0, count, cfg, single_object = job
    scenes = [training_scene(seed0 + i, cfg, single_object) for i in range(count)]
    return np.stack([s.image for s in scenes]), [s.caption.encode("ascii") for s in scenes]


def render_scene_cache(
    root: str | Path,
    num_scenes: int,
    base_seed: int = CLIP_SEED_OFFSET,
    cfg: ShapesWorldConfig | None = None,
    workers: int = 2,
    chunk: int = 512,
    progress: bool = True,
    single_object: bool = False,
) -> Path:
    """Renders training scenes ``base_seed .. base_seed + num_scenes - 1`` (:func:`training_scene`) once
    into memory-mapped arrays.

    Layout: ``root/images.npy`` (N x S x S x 3 uint8), ``root/captions.npy`` (N fixed-width ASCII byte
    strings) and ``root/cache.json`` (what the cache holds and how far rendering got). Rendering goes
    chunk by chunk in ``workers`` processes; an interrupted call keeps every finished chunk and the next
    call continues from there. A complete cache of the same scenes is reused as is; a cache of other
    scenes is replaced.

    Args:
        root: Cache folder (created if missing).
        num_scenes: Number of scenes N.
        base_seed: Seed of scene 0.
        cfg: World configuration (default :class:`ShapesWorldConfig`).
        workers: Rendering processes (0 or 1: render in this process).
        chunk: Scenes per unit of work (and per progress record).
        progress: Show a tqdm progress bar.
        single_object: One-object scenes (see :func:`training_scene`).

    Returns:
        ``root`` as a Path, ready for ``ShapesWorldCaptions(..., cache=root)``.
    """
    cfg = cfg or ShapesWorldConfig()
    if num_scenes < 1 or chunk < 1:
        raise ValueError(f"num_scenes and chunk must be >= 1, got {num_scenes}, {chunk}.")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = _cache_meta(num_scenes, base_seed, cfg, single_object)
    found = _read_cache_meta(root)
    same = found is not None and _meta_key(found) == _meta_key(meta)
    if same and found.get("complete"):
        return root
    done = int(found.get("rendered", 0)) if same else 0
    size = cfg.image_size
    paths = [root / name for name in _CACHE_ARRAYS]
    shapes = [((num_scenes, size, size, 3), np.uint8), ((num_scenes,), f"S{_CAPTION_BYTES}")]
    if done and all(p.is_file() for p in paths):
        images, captions = (np.load(p, mmap_mode="r+") for p in paths)
    else:
        done = 0
        images, captions = (
            np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=shape)
            for p, (shape, dtype) in zip(paths, shapes, strict=True)
        )
    atomic_write_json(root / _CACHE_META, {**meta, "complete": False, "rendered": done})
    jobs = [(base_seed + s, min(chunk, num_scenes - s), cfg, single_object) for s in range(done, num_scenes, chunk)]
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_render_range, jobs) if pool is not None else map(_render_range, jobs)
        with tqdm(total=num_scenes, initial=done, desc="ShapesWorld scene cache", unit="scene",
                  disable=not progress) as bar:  # fmt: skip
            for batch, texts in results:
                if max(map(len, texts)) > _CAPTION_BYTES:
                    raise ValueError(f"a caption is longer than {_CAPTION_BYTES} bytes; raise _CAPTION_BYTES.")
                images[done : done + len(texts)] = batch
                captions[done : done + len(texts)] = texts
                done += len(texts)
                images.flush()
                captions.flush()
                atomic_write_json(root / _CACHE_META, {**meta, "complete": done == num_scenes, "rendered": done})
                bar.update(len(texts))
    finally:
        if pool is not None:
            pool.terminate()
    del images, captions
    return root


# ----------------------------------------------------------------------------------------------------------
# Exporters
# ----------------------------------------------------------------------------------------------------------


def _encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of an H x W bool mask: compressed via pycocotools when importable, else uncompressed."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        flat = mask.ravel(order="F").astype(np.int8)
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
        counts = np.diff(bounds).tolist()
        if flat.size and flat[0] == 1:
            counts = [0, *counts]
        return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _export(
    root: str | Path,
    num_train: int,
    num_val: int,
    seed: int,
    cfg: ShapesWorldConfig | None,
    semantic: bool,
    coco: bool,
    progress: bool,
) -> Path:
    cfg = cfg or ShapesWorldConfig()
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}.")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    root = Path(root)
    names = class_names(cfg)
    counts = {"training": num_train, "validation": num_val}
    captions: dict[str, dict[str, str]] = {}
    coco_sets: dict[str, dict] = {}
    for split, coco_dir, _, _ in _SPLITS:
        if semantic:
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        if coco:
            (root / coco_dir).mkdir(parents=True, exist_ok=True)
            (root / "annotations").mkdir(parents=True, exist_ok=True)
    if semantic:
        (root / "classes.txt").write_text("\n".join(names) + "\n")

    with tqdm(total=num_train + num_val, desc="ShapesWorld export", unit="img", disable=not progress) as bar:
        for split, coco_dir, _, offset in _SPLITS:
            captions[split] = {}
            images: list[dict] = []
            annotations: list[dict] = []
            for index in range(counts[split]):
                scene = generate_scene(seed + offset + index, cfg)
                stem = f"sw_{index:06d}"
                picture = Image.fromarray(scene.image)
                captions[split][stem] = scene.caption
                if semantic:
                    picture.save(root / "images" / split / f"{stem}.png")
                    Image.fromarray(scene.semantic).save(root / "annotations" / split / f"{stem}.png")
                if coco:
                    picture.save(root / coco_dir / f"{stem}.png")
                    image_id = index + 1
                    images.append(
                        {
                            "id": image_id,
                            "file_name": f"{stem}.png",
                            "height": cfg.image_size,
                            "width": cfg.image_size,
                        }
                    )
                    for mask, box, label in zip(scene.masks, scene.boxes, scene.labels, strict=True):
                        x0, y0, x1, y1 = (float(v) for v in box)
                        annotations.append(
                            {
                                "id": len(annotations) + 1,
                                "image_id": image_id,
                                "category_id": int(label) + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": int(mask.sum()),
                                "iscrowd": 0,
                                "segmentation": _encode_rle(mask),
                            }
                        )
                bar.update(1)
            coco_sets[split] = {"images": images, "annotations": annotations}

    meta = {"seed": seed, "config": asdict(cfg), "num_train": num_train, "num_val": num_val}
    meta["seed_start"] = {split: seed + offset for split, _, _, offset in _SPLITS}
    atomic_write_json(root / "captions.json", captions)
    atomic_write_json(root / "shapesworld_meta.json", meta)
    if coco:
        categories = [
            {"id": i + 1, "name": name, "supercategory": name.split(" ", 1)[1]} for i, name in enumerate(names)
        ]
        for split, _, coco_split, _ in _SPLITS:
            payload = {
                "info": {"description": "ShapesWorld synthetic scenes", "version": "1.0"},
                "licenses": [],
                "categories": categories,
                **coco_sets[split],
            }
            atomic_write_json(root / "annotations" / f"instances_{coco_split}2017.json", payload)
    return root


def export_semantic(
    root: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    cfg: ShapesWorldConfig | None = None,
    progress: bool = True,
) -> Path:
    """Writes an ADE20K-like semantic segmentation dataset.

    Layout: ``root/images/{training,validation}/sw_XXXXXX.png`` (RGB),
    ``root/annotations/{training,validation}/sw_XXXXXX.png`` (uint8, 0 = background, i + 1 = class i),
    ``root/classes.txt`` (class names without background, one per line), ``root/captions.json``
    (``{split: {stem: caption}}``) and ``root/shapesworld_meta.json`` (config and seeds).
    Training image i is ``generate_scene(seed + TRAIN_SEED_OFFSET + i)``, validation image j is
    ``generate_scene(seed + VAL_SEED_OFFSET + j)``.

    Args:
        root: Output folder (created if missing).
        num_train: Number of training images.
        num_val: Number of validation images.
        seed: Base seed.
        cfg: World configuration (default :class:`ShapesWorldConfig`).
        progress: Show a tqdm progress bar.

    Returns:
        ``root`` as a Path.
    """
    return _export(root, num_train, num_val, seed, cfg, semantic=True, coco=False, progress=progress)


def export_coco(
    root: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    cfg: ShapesWorldConfig | None = None,
    progress: bool = True,
) -> Path:
    """Writes a COCO-style instance segmentation dataset.

    Layout: ``root/{train,val}2017/sw_XXXXXX.png`` and ``root/annotations/instances_{train,val}2017.json``
    (category ids 1..C in :func:`class_names` order, image ids 1..N, bbox xywh of the visible part,
    RLE segmentation of the visible part: compressed when pycocotools is installed, else uncompressed
    column-major run lengths). Scenes are the same as :func:`export_semantic` for the same seed.

    Args:
        root: Output folder (created if missing).
        num_train: Number of training images.
        num_val: Number of validation images.
        seed: Base seed.
        cfg: World configuration (default :class:`ShapesWorldConfig`).
        progress: Show a tqdm progress bar.

    Returns:
        ``root`` as a Path.
    """
    return _export(root, num_train, num_val, seed, cfg, semantic=False, coco=True, progress=progress)


def generate_dataset(
    out: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    fmt: Literal["semantic", "coco", "both"] = "semantic",
    image_size: int = 160,
    cfg: ShapesWorldConfig | None = None,
    progress: bool = True,
) -> Path:
    """Generates a ShapesWorld dataset on disk (entry point for ``clipdense shapesworld generate``).

    Args:
        out: Output folder.
        num_train: Number of training images.
        num_val: Number of validation images.
        seed: Base seed.
        fmt: "semantic" (ADE20K-like, see :func:`export_semantic`), "coco" (see :func:`export_coco`) or
            "both" (both layouts in one folder, rendering every scene once).
        image_size: Image side in pixels; overrides ``cfg.image_size``.
        cfg: World configuration (default :class:`ShapesWorldConfig`).
        progress: Show a tqdm progress bar.

    Returns:
        ``out`` as a Path.
    """
    if fmt not in ("semantic", "coco", "both"):
        raise ValueError(f"Unknown format {fmt!r}; use 'semantic', 'coco' or 'both'.")
    base = asdict(cfg) if cfg is not None else {}
    cfg = ShapesWorldConfig(**{**base, "image_size": image_size})
    semantic, coco = fmt in ("semantic", "both"), fmt in ("coco", "both")
    return _export(out, num_train, num_val, seed, cfg, semantic=semantic, coco=coco, progress=progress)
