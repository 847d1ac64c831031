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
    narrow = {"fpn_channels": 32} if "fpn" in model else {}
    base = {
        "name": "tiny",
        "run_dir": str(run_dir),
        "model.name": model,
        "model.pretrained": "null",
        "model.overrides": json.dumps({"clip_model": "tiny-RN", **narrow, **extra.pop("model_overrides", {})}),
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


def write_shapes_coco(root, num_train=24, num_val=8, seed=0):
    """A ShapesWorld COCO export with 4 classes (red/blue circle/square), 1-2 large objects on 64 px scenes."""
    from clipdense.data.shapesworld import ShapesWorldConfig, export_coco

    cfg = ShapesWorldConfig(
        image_size=64, colours=("red", "blue"), shapes=("circle", "square"), min_size=0.3, max_size=0.45, max_objects=2
    )
    return export_coco(root, num_train=num_train, num_val=num_val, seed=seed, cfg=cfg, progress=False)


# Small torchvision detector settings for CPU tests: 128 px inputs, a 32-wide FPN, few RPN proposals and RoI samples.
TINY_DETECTOR = {
    "clip_model": "tiny-RN",
    "input_resolution": None,
    "min_size": 128,
    "max_size": 160,
    "fpn_channels": 32,
}
TINY_RCNN = {"rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 64}


def detection_overrides(root, run_dir, model="denseclip_retinanet_rn50", iters=24, **extra):
    model_overrides = {**TINY_DETECTOR, **extra.pop("model_overrides", {})}
    if "maskrcnn" in model:
        model_overrides["detector_kwargs"] = TINY_RCNN
    base = {
        "name": "tiny_det",
        "run_dir": str(run_dir),
        "model.name": model,
        "model.pretrained": "null",
        "model.overrides": json.dumps(model_overrides),
        "data.dataset": "coco",
        "data.root": str(root),
        "data.scale": "[160, 128]",
        "data.with_masks": "maskrcnn" in model,
        "data.workers": 0,
        "optim.lr": "1e-3",
        "optim.schedule": "step",
        "optim.steps": f"[{int(iters * 0.8)}]",
        "optim.warmup_iters": 5,
        "optim.grad_clip": 1.0,
        "train.iters": iters,
        "train.batch_size": 4,
        "train.precision": "fp32",
        "train.log_every": 4,
        "train.ckpt_every": 1000,
        "train.eval_every": 0,
        "train.device": "cpu",
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


TINY_PPL = {"n_samples": 3, "prob_decoder_width": 32, "prob_decoder_layers": 1}


def write_tiny_run(run_dir, model="denseclip_fpn_rn50", class_names=("red thing", "green thing", "blue thing"),
                   model_overrides=None, step=3):  # fmt: skip
    """A run directory as `clipdense train` leaves it (resolved config + one checkpoint) with a tiny random-weight
    model, written in a second instead of trained: for tests of what reads runs (export, the app, predictors)."""
    import torch

    from clipdense.config import load_config, save_config
    from clipdense.models.registry import create_model
    from clipdense.runs import save_checkpoint

    detector = "retinanet" in model or "maskrcnn" in model
    options = model_overrides
    if options is None:
        options = TINY_DETECTOR if detector else {"clip_model": "tiny-RN"}
        if model.startswith("ppl_"):  # fewer, narrower Monte-Carlo decoder passes
            options = {**options, **TINY_PPL}
    write = detection_overrides if detector else tiny_overrides
    cfg = load_config(None, write("data", run_dir, model=model, model_overrides=options))
    cfg.model.class_names = list(class_names)
    torch.manual_seed(0)
    net = create_model(model, class_names=list(class_names), pretrained=None, **cfg.model.overrides)
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    save_checkpoint(run_dir, net, {"step": step}, step)
    return run_dir
