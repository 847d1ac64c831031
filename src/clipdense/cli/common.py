"""What the command groups share: the model flags, the CLIP and predictor they build, input checks, file writing.

Nothing heavy is imported at module level: ``clipdense --help`` must stay quick.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipdense.fileio import atomic_write

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from clipdense.inference import OpenVocabPredictor, SegmenterConfig

DEFAULT_MODEL = "RN50"
DEFAULT_PRETRAINED = "openai"
#: The model of ``segment`` when no --model is given: the ShapesWorld CLIP that ships with the package,
#: so that the main job works on a fresh install with no network.
OFFLINE_MODEL, OFFLINE_PRETRAINED = "ShapesCLIP-RN", "shapesworld"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--device`` (default: :func:`default_device`)."""
    p.add_argument("--device", default=default_device())


def add_model_args(p: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL) -> None:
    """The CLIP and training-free inference flags of ``segment``, ``eval-zeroshot`` and ``robustness``."""
    from clipdense.clip.dense import MODES
    from clipdense.inference import SegmenterConfig

    d = SegmenterConfig()
    shipped = " (the shipped ShapesWorld CLIP)" if default_model == OFFLINE_MODEL else ""
    g = p.add_argument_group("model and inference")
    g.add_argument(
        "--model",
        default=None,
        help=f"open_clip architecture, hf-hub:org/repo or local-dir:PATH (default: {default_model}{shipped})",
    )
    g.add_argument(
        "--pretrained",
        default=None,
        help="pretrained tag (openai, laion2b_s34b_b88k, ...) or a checkpoint file (.pt, .bin, .safetensors) "
        f"(default: {OFFLINE_PRETRAINED} for {OFFLINE_MODEL}, {DEFAULT_PRETRAINED} otherwise)",
    )
    g.add_argument("--random-weights", action="store_true", help="use random weights (for smoke tests only)")
    g.add_argument("--quick-gelu", choices=("auto", "on", "off"), default="auto", help="QuickGELU activation")
    g.add_argument("--mode", choices=MODES, default=d.mode, help="training-free dense mode")
    # None below: the value the model's weights were made for (shipped weights), else the library default.
    g.add_argument("--templates", default=None, help=f"prompt templates: ensemble, imagenet, scene, single "
                   f"(default: {d.templates}; single for the ShapesWorld CLIP)")  # fmt: skip
    g.add_argument("--short-side", type=int, default=None, help=f"resize the short side to this, 0: keep "
                   f"(default: {d.short_side}; the ShapesWorld CLIP: its training size)")  # fmt: skip
    g.add_argument("--window", type=int, default=None, help=f"sliding-window crop size (default: {d.window})")
    g.add_argument("--stride", type=int, default=None, help=f"sliding-window stride (default: {d.stride})")
    g.add_argument("--whole", action="store_true", help="whole-image inference instead of sliding windows "
                   "(the ShapesWorld CLIP's default)")  # fmt: skip
    g.add_argument("--logit-scale", type=float, default=d.logit_scale, help="temperature before the softmax")
    g.add_argument("--background-threshold", type=float, default=None, help="top probability below this -> background")
    g.add_argument("--key-smoothing", type=float, default=None, help="MaskCLIP key smoothing threshold (e.g. 0.5)")
    g.add_argument("--prompt-denoise", type=float, default=None, help="MaskCLIP prompt denoising threshold (e.g. 0.5)")
    add_device_arg(g)
    p.set_defaults(default_model=default_model)


def model_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """(model name, pretrained) from --model/--pretrained/--random-weights and the command's default model."""
    model = args.model or args.default_model
    if args.random_weights or model.startswith(("hf-hub:", "local-dir:")):
        return model, None
    if args.pretrained is not None:
        return model, args.pretrained
    return model, OFFLINE_PRETRAINED if model == OFFLINE_MODEL else DEFAULT_PRETRAINED


def segmenter_config(args: argparse.Namespace, recommended: dict) -> SegmenterConfig:
    """Inference settings: the flags given, then what the weights recommend, then the library defaults."""
    from clipdense.inference import SegmenterConfig

    chosen = {k: v for k, v in recommended.items() if k in ("templates", "short_side", "window", "stride")}
    for name in ("templates", "short_side", "window", "stride"):
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    if args.whole:
        chosen["window"] = None
    if chosen.get("short_side") == 0:
        chosen["short_side"] = None
    return SegmenterConfig(
        mode=args.mode,
        logit_scale=args.logit_scale,
        background_threshold=args.background_threshold,
        prompt_denoise=args.prompt_denoise,
        key_smoothing=args.key_smoothing,
        **chosen,
    )


def build_predictor(args: argparse.Namespace) -> OpenVocabPredictor:
    """The training-free predictor that :func:`add_model_args`' flags describe."""
    from clipdense.clip.loading import load_clip
    from clipdense.inference import OpenVocabPredictor

    model, pretrained = model_source(args)
    quick_gelu = {"auto": None, "on": True, "off": False}[args.quick_gelu]
    clip = load_clip(model, pretrained, device=args.device, quick_gelu=quick_gelu)
    return OpenVocabPredictor(clip, segmenter_config(args, dict(clip.inference)))


def check_images(paths: Sequence[str]) -> list[Path]:
    """Fail before any model work if an input is missing, not an image, truncated or out of range.

    Every image is decoded in full (PIL's ``verify`` misses truncated files), so one bad file never
    leaves a half-done batch behind.
    """
    from clipdense.data.datasets import read_image_rgb

    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise CLIError(f"image not found: {p}")
        try:
            read_image_rgb(p)
        except ValueError as e:
            raise CLIError(f"cannot read image '{p}': {e}") from e
        out.append(p)
    stems = [p.stem for p in out]
    if len(set(stems)) != len(stems):
        raise CLIError("two input images share a file name; their outputs would overwrite each other")
    return out


def write_png(path: Path, image: Image.Image | np.ndarray) -> None:
    """Write a PIL image or an H x W (x 3) uint8 / uint16 array as a PNG, atomically."""

    def write(tmp: Path) -> None:
        from PIL import Image

        picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
        picture.save(tmp, format="PNG")

    atomic_write(path, write)


def write_json(path: Path, obj: Any, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=default)))
