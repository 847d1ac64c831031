"""Pixel-level drawing: shape outlines, anti-aliased polygon coverage and the muted background textures."""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from clipdense.data.shapesworld.config import BACKGROUNDS, SHAPES

__all__ = ["polygon_coverage", "render_background", "shape_outline"]


def _regular_polygon(n: int, radius: float, phase_deg: float) -> np.ndarray:
    angles = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def shape_outline(shape: str, radius: float, rotation_deg: float) -> np.ndarray:
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


def polygon_coverage(polygon: np.ndarray, size: int, supersample: int) -> np.ndarray:
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
    """Random low-saturation, mid-value HSV colour (random hue unless given), all in [0, 1]."""
    hue = rng.random() if hue is None else hue
    return (hue, float(rng.uniform(0.03, 0.18)), float(rng.uniform(0.45, 0.68)))


def _hsv_to_rgb255(hsv: tuple[float, float, float]) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(*hsv), dtype=np.float32) * 255.0


def render_background(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted, low-contrast background texture.

    Args:
        name: Texture name (one of :data:`~clipdense.data.shapesworld.config.BACKGROUNDS`).
        rng: Random generator of the scene; its colours and texture parameters are drawn from it.
        size: Image side S.

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
