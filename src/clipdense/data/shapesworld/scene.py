"""Scenes: compositing the placed objects over a background, with exact visible labels and a caption.

Every scene is a pure function of its seed and the config: one random generator, seeded with the seed,
draws (in this order) the object classes, the background name, the object placements, the caption, the
background texture and the colour jitter, so changing any step changes every scene after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clipdense.data.shapesworld.captions import draw_caption, noun_phrase
from clipdense.data.shapesworld.config import COLOURS, ShapesWorldConfig
from clipdense.data.shapesworld.drawing import render_background
from clipdense.data.shapesworld.objects import PlacedObject, place_objects

__all__ = ["Scene", "generate_scene", "single_object_scene"]


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


def _assemble(
    rng: np.random.Generator, cfg: ShapesWorldConfig, objects: list[PlacedObject], background: str, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Composites the image and computes exact visible labels.

    Args:
        rng: Random generator of the scene (draws the background texture and the colour jitter).
        cfg: World configuration.
        objects: The placed objects, in drawing order.
        background: Background texture name.
        seed: Seed of the scene (only for the error message).

    Returns:
        (image, semantic, masks, boxes) as described in :class:`Scene`.
    """
    size = cfg.image_size
    canvas = render_background(background, rng, size)
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
    """Draws background, placements and caption from ``rng`` and renders the scene.

    Args:
        seed: Seed of the scene (recorded in the Scene and used in error messages).
        cfg: World configuration.
        rng: Random generator seeded with ``seed``, after the object classes were drawn.
        classes: Class index of every object, in drawing order.
        caption: None to draw a caption, or a template with an ``{obj}`` field that is filled with the
            first object's noun phrase (with its size word).

    Returns:
        The :class:`Scene`.
    """
    background = str(rng.choice(cfg.backgrounds))
    objects = place_objects(rng, cfg, classes, seed)
    if caption is None:
        text, named, single = draw_caption(rng, cfg, objects, background)
    else:
        text, named, single = caption.format(obj=noun_phrase(objects[0], True)), (0,), True
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
