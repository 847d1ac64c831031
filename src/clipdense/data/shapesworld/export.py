"""Exporters: ShapesWorld scenes written to disk as an ADE20K-like and/or a COCO-style dataset."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from clipdense.data.shapesworld.config import ShapesWorldConfig, class_names
from clipdense.data.shapesworld.scene import generate_scene
from clipdense.data.shapesworld.streams import TRAIN_SEED_OFFSET, VAL_SEED_OFFSET
from clipdense.fileio import atomic_write_json

__all__ = ["export_coco", "export_semantic", "generate_dataset", "read_semantic_split"]

#: (ADE20K folder, COCO image folder, COCO split name, seed offset) of every exported split.
_SPLITS = (
    ("training", "train2017", "train", TRAIN_SEED_OFFSET),
    ("validation", "val2017", "val", VAL_SEED_OFFSET),
)


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
    """Renders both splits once and writes the requested layouts (see :func:`export_semantic`, :func:`export_coco`).

    Args:
        root: Output folder (created if missing).
        num_train: Number of training images.
        num_val: Number of validation images.
        seed: Base seed.
        cfg: World configuration (default :class:`ShapesWorldConfig`).
        semantic: Write the ADE20K-like layout.
        coco: Write the COCO-style layout.
        progress: Show a tqdm progress bar.

    Returns:
        ``root`` as a Path.
    """
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
    overwrite: bool = False,
) -> Path:
    """Generates a ShapesWorld dataset on disk (entry point for ``clipdense shapesworld generate``).

    The dataset is written to a hidden sibling folder and moved to ``out`` when complete, so an
    interrupted run leaves no half-written dataset, and two datasets are never mixed in one folder.

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
        overwrite: Replace ``out`` if it exists and is not empty (it is swapped out only once the new
            dataset is complete).

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: Unknown format, or ``out`` is not empty and ``overwrite`` is False.
    """
    if fmt not in ("semantic", "coco", "both"):
        raise ValueError(f"Unknown format {fmt!r}; use 'semantic', 'coco' or 'both'.")
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder: choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"{out} is not empty: writing there would mix two datasets. Choose another folder, or pass "
            "--overwrite (overwrite=True) to replace it"
        )
    base = asdict(cfg) if cfg is not None else {}
    cfg = ShapesWorldConfig(**{**base, "image_size": image_size})
    semantic, coco = fmt in ("semantic", "both"), fmt in ("coco", "both")
    partial, old = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"
    for stale in (partial, old):
        shutil.rmtree(stale, ignore_errors=True)
    _export(partial, num_train, num_val, seed, cfg, semantic=semantic, coco=coco, progress=progress)
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def read_semantic_split(
    root: str | Path, split: Literal["training", "validation"] = "validation", limit: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Reads the scenes of one split of a dataset written by :func:`generate_dataset` (semantic layout).

    Args:
        root: The dataset folder (``root/images/<split>/*.png`` and ``root/annotations/<split>/*.png``).
        split: ``"training"`` or ``"validation"``.
        limit: Read only the first this many scenes (file-name order); None: all.

    Returns:
        (H x W x 3 uint8 RGB image, H x W uint8 labels: 0 = background, i + 1 = class i) per scene, in
        file-name order.

    Raises:
        FileNotFoundError: ``root`` has no such split, or an image has no annotation.
    """
    images_dir, labels_dir = Path(root) / "images" / split, Path(root) / "annotations" / split
    images = sorted(images_dir.glob("*.png")) if images_dir.is_dir() else []
    if not images:
        raise FileNotFoundError(
            f"no {split} scenes under {images_dir}: pass a folder written by `clipdense shapesworld generate` "
            "(--format semantic or both)"
        )
    scenes = []
    for path in images[:limit]:
        label = labels_dir / path.name
        if not label.is_file():
            raise FileNotFoundError(f"{path} has no annotation {label}")
        with Image.open(path) as im, Image.open(label) as lab:
            scenes.append((np.array(im.convert("RGB")), np.array(lab)))
    return scenes
