"""Tiny CLIP architectures, an OpenAI-style TorchScript holder and a tiny learnable dataset, for fast CPU tests."""

import json

import numpy as np
import open_clip
import torch
from PIL import Image

TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_CONFIGS = {
    "tiny-RN": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": TINY_TEXT,
    },
    "tiny-ViT": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": TINY_TEXT,
    },
}


def register_tiny_configs(directory) -> None:
    for name, cfg in TINY_CONFIGS.items():
        path = directory / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)


class StateHolder(torch.nn.Module):
    """A TorchScript archive holding a CLIP state dict the way OpenAI's .pt files do."""

    def __init__(self, state):
        super().__init__()
        for key, value in state.items():
            parent = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.register_buffer(leaf, value.clone())
        self.register_buffer("input_resolution", torch.tensor(224))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 220]], np.uint8)


def write_colour_dataset(root, n=12, size=48, seed=0):
    """A `folder`-layout dataset where each pixel's class is its colour (plus noise): learnable in a few steps."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("red thing\ngreen thing\nblue thing\n")
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        cuts = sorted(rng.integers(4, size - 4, 2))
        mask[:, cuts[0] :] = 1
        mask[:, cuts[1] :] = 2
        if i % 2:
            mask = mask.T.copy()
        image = COLOURS[mask].astype(np.int16) + rng.integers(-25, 25, (size, size, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
    (root / "train.txt").write_text("".join(f"{i:03d}\n" for i in range(n - 4)))
    (root / "val.txt").write_text("".join(f"{i:03d}\n" for i in range(n - 4, n)))
    return root


def tiny_overrides(root, run_dir, model="denseclip_fpn_rn50", iters=30, **extra):
    base = {
        "name": "tiny",
        "run_dir": str(run_dir),
        "model.name": model,
        "model.pretrained": "null",
        "model.overrides": json.dumps({"clip_model": "tiny-RN", **extra.pop("model_overrides", {})}),
        "data.dataset": "folder",
        "data.root": str(root),
        "data.crop_size": 32,
        "data.scale": "[64, 48]",
        "data.workers": 0,
        "optim.lr": 1e-3,
        "optim.warmup_iters": 5,
        "train.iters": iters,
        "train.batch_size": 4,
        "train.precision": "fp32",
        "train.log_every": 5,
        "train.ckpt_every": 1000,
        "train.eval_every": 0,
        "train.device": "cpu",
        "eval.mode": "whole",
        "eval.short_side": "null",
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]
