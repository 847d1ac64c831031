"""Object placement: size, pose and position of every object, keeping each one partly visible."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clipdense.data.shapesworld.config import SIZE_NAMES, ShapesWorldConfig
from clipdense.data.shapesworld.drawing import polygon_coverage, shape_outline

__all__ = ["PlacedObject", "place_objects"]


def _size_name(fraction: float, cfg: ShapesWorldConfig) -> str:
    """Size word of an object extent (fraction of the image side): its tertile of the configured range."""
    span = cfg.max_size - cfg.min_size
    if span <= 0:
        return SIZE_NAMES[1]
    tertile = int((fraction - cfg.min_size) / span * 3)
    return SIZE_NAMES[min(max(tertile, 0), 2)]


@dataclass
class PlacedObject:
    """One object of a scene after placement, before compositing.

    Attributes:
        class_index: Class index into :func:`~clipdense.data.shapesworld.config.class_names`.
        colour: Colour name.
        shape: Shape name.
        size: Size word ("small" / "medium" / "large").
        centre: ``(x, y)`` centre of the shape, in pixels.
        coverage: S x S float32 anti-aliased coverage of the whole shape.
        full_mask: S x S bool full (amodal) mask, ``coverage >= 0.5``.
    """

    class_index: int
    colour: str
    shape: str
    size: str
    centre: tuple[float, float]
    coverage: np.ndarray  # S x S float32
    full_mask: np.ndarray  # S x S bool


def place_objects(
    rng: np.random.Generator, cfg: ShapesWorldConfig, classes: Sequence[int], seed: int
) -> list[PlacedObject]:
    """Samples size, pose and position of each object; every object keeps min_visible_fraction visible.

    Objects are placed in drawing (back-to-front) order; an object that finds no valid position within
    ``cfg.max_placement_tries`` attempts is dropped.

    Args:
        rng: Random generator of the scene.
        cfg: World configuration.
        classes: Class index of every object to place.
        seed: Seed of the scene (only for the error message).

    Returns:
        The placed objects, in drawing order.

    Raises:
        RuntimeError: Fewer than ``cfg.min_objects`` objects could be placed.
    """
    size = cfg.image_size
    num_shapes = len(cfg.shapes)
    placed: list[PlacedObject] = []
    visible: list[np.ndarray] = []
    for class_index in classes:
        colour, shape = cfg.colours[class_index // num_shapes], cfg.shapes[class_index % num_shapes]
        for _ in range(cfg.max_placement_tries):
            fraction = float(rng.uniform(cfg.min_size, cfg.max_size))
            rotation = 0.0 if shape == "circle" else float(rng.uniform(-1.0, 1.0)) * cfg.max_rotation_deg
            outline = shape_outline(shape, fraction * size / 2.0, rotation)
            lo, hi = outline.min(axis=0), outline.max(axis=0)
            cx = float(rng.uniform(1.0 - lo[0], size - 1.0 - hi[0]))
            cy = float(rng.uniform(1.0 - lo[1], size - 1.0 - hi[1]))
            coverage = polygon_coverage(outline + np.array([cx, cy]), size, cfg.supersample)
            mask = coverage >= 0.5
            area = int(mask.sum())
            if area == 0:
                continue
            remaining = [v & ~mask for v in visible]
            if all(
                r.sum() >= cfg.min_visible_fraction * o.full_mask.sum() for r, o in zip(remaining, placed, strict=True)
            ):
                placed.append(
                    PlacedObject(class_index, colour, shape, _size_name(fraction, cfg), (cx, cy), coverage, mask)
                )
                visible = [*remaining, mask]
                break
    if len(placed) < cfg.min_objects:
        raise RuntimeError(
            f"ShapesWorld: could only place {len(placed)} of {len(classes)} objects for seed {seed} while "
            f"keeping {cfg.min_visible_fraction:.0%} of each visible; lower min_objects/max_size or "
            "raise max_placement_tries."
        )
    return placed
