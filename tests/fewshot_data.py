"""Tiny few-shot datasets in the CoOp layouts, written by the tests."""

import json

import numpy as np
from PIL import Image

from clipdense.data.fewshot import LAYOUTS

COLOURS = {"red thing": (220, 40, 40), "green thing": (40, 200, 60), "blue thing": (50, 70, 220)}


def write_split_dataset(root, name="caltech101", per_class=(8, 2, 6), size=32, seed=0):
    """A dataset ``name`` in its CoOp layout: 3 classes whose images are their colour plus noise (learnable), a
    ``split_zhou_*.json`` with train/val/test lists of [relative path, label, class name]."""
    layout = LAYOUTS[name]
    folder = root / layout.folder
    image_dir = folder / layout.image_dir
    rng = np.random.default_rng(seed)
    split = {}
    for s, count in zip(("train", "val", "test"), per_class, strict=True):
        split[s] = []
        for label, (cls, rgb) in enumerate(COLOURS.items()):
            for i in range(count):
                rel = f"{cls.replace(' ', '_')}/{s}_{i}.png"
                (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                image = np.array(rgb, np.int16) + rng.integers(-30, 30, (size, size, 3))
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(image_dir / rel)
                split[s].append([rel, label, cls])
    (folder / layout.split_file).write_text(json.dumps(split))
    return folder
