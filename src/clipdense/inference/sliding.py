"""Dense inference of trained segmentation models: whole image or sliding window, multi-scale + flip."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from torchvision.transforms.v2 import functional as TF

from clipdense.clip.dense import pad_to_multiple
from clipdense.config import EvalConfig
from clipdense.data.transforms import rescale_size
from clipdense.inference.bands import Reduced, reduce_in_bands, upsample_rows

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, precision: str) -> torch.autocast:
    """``torch.autocast`` for an inference precision (``fp32``: off)."""
    return torch.autocast(device_type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def prepare_model(model: nn.Module, cfg: EvalConfig) -> nn.Module:
    """Puts a segmentation model in eval mode (and channels-last format if ``cfg`` asks) for :func:`predict_dense`."""
    model.eval()
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of sliding windows covering ``size`` (the last window ends at the border)."""
    if size <= crop:
        return [0]
    n = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(n)]


def normalize(image: torch.Tensor, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD) -> torch.Tensor:
    """3 x H x W uint8 -> 3 x H x W float normalised with CLIP's statistics."""
    mean = torch.tensor(mean, device=image.device).view(3, 1, 1)
    std = torch.tensor(std, device=image.device).view(3, 1, 1)
    return (image.float() / 255 - mean) / std


def eval_view(image: torch.Tensor, scale: float, cfg: EvalConfig) -> torch.Tensor:
    """The normalised view of an image at one test scale ratio.

    With ``cfg.resize == "mmcv"``, mmseg's ``MultiScaleFlipAug(img_scale=(long_max, short_side))``: the scale
    ``(int(long_max * r), int(short_side * r))``, mmcv's keep-ratio rescale of the uint8 image (bilinear, no
    antialiasing), then the normalisation; with ``torchvision``, the short side to ``round(short_side * r)``.

    Args:
        image: 3 x H x W uint8 image.
        scale: The ratio r (1.0 unless multi-scale).
        cfg: Evaluation settings (``short_side``, ``resize``, ``long_max``).

    Returns:
        3 x h x w float image normalised with CLIP's statistics.
    """
    if cfg.short_side is None:
        return normalize(image)
    if cfg.resize == "mmcv":
        h, w = image.shape[-2:]
        size = rescale_size(h, w, (int(cfg.long_max * scale), int(cfg.short_side * scale)))
        return normalize(image if size == (h, w) else TF.resize(image, list(size), antialias=False))
    if cfg.resize != "torchvision":
        raise ValueError(f"unknown eval.resize {cfg.resize!r}; use 'mmcv' or 'torchvision'")
    return TF.resize(normalize(image), [max(1, round(cfg.short_side * scale))], antialias=True)


def _logits(model: nn.Module, x: torch.Tensor, multiple: int = 32, channels_last: bool = False) -> torch.Tensor:
    """B x 3 x h x w -> B x K x h x w logits at the input resolution (input zero-padded to the
    backbone's output stride, logits cropped back)."""
    h, w = x.shape[-2:]
    padded = pad_to_multiple(x, multiple)
    if channels_last:
        padded = padded.contiguous(memory_format=torch.channels_last)
    out = model(padded)["logits"]
    out = F.interpolate(out.float(), size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return out[..., :h, :w]


def infer_logits(model: nn.Module, x: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """Whole-image or sliding-window logits (averaged over overlapping windows).

    Args:
        model: Segmentation model returning ``{"logits": B x K x h' x w'}``.
        x: 1 x 3 x H x W normalised image.
        cfg: ``mode``, ``crop``, ``stride``.

    Returns:
        1 x K x H x W logits.
    """
    if cfg.mode == "whole":
        return _logits(model, x, channels_last=cfg.channels_last)
    if cfg.mode != "slide":
        raise ValueError(f"unknown inference mode '{cfg.mode}'; use 'whole' or 'slide'")
    h, w = x.shape[-2:]
    total = count = None
    for y in window_starts(h, cfg.crop, cfg.stride):
        for x0 in window_starts(w, cfg.crop, cfg.stride):
            crop = x[..., y : y + cfg.crop, x0 : x0 + cfg.crop]
            logits = _logits(model, crop, channels_last=cfg.channels_last)
            if total is None:
                total = x.new_zeros(1, logits.shape[1], h, w)
                count = x.new_zeros(1, 1, h, w)
            total[..., y : y + crop.shape[-2], x0 : x0 + crop.shape[-1]] += logits
            count[..., y : y + crop.shape[-2], x0 : x0 + crop.shape[-1]] += 1
    return total / count


@torch.inference_mode()
def predict_dense(
    model: nn.Module,
    image: torch.Tensor,
    cfg: EvalConfig,
    *,
    keep_probs: bool = False,
    entropy: bool = False,
    device: torch.device | str | None = None,
) -> Reduced:
    """Labels and top probabilities at the image's resolution, probabilities averaged over scales (and flips).

    Each view's logits stay at its inference resolution; the upsampling to the image, the softmax and
    the average over views run a band of rows at a time (:func:`~clipdense.inference.bands.reduce_in_bands`).

    Args:
        model: Segmentation model in eval mode.
        image: 3 x H x W uint8 image (on the model's device).
        cfg: Evaluation settings.
        keep_probs: Also return the K x H x W probabilities.
        entropy: Also return the per-pixel entropy.
        device: Where the outputs go (default: the image's device).

    Returns:
        H x W labels and confidences (and what was asked for).
    """
    h, w = image.shape[-2:]
    views = []  # 1 x K x h' x w' logits of each scale (and flip)
    with autocast(image.device.type, cfg.precision):
        for scale in cfg.scales:
            xs = eval_view(image, scale, cfg)
            views.append(infer_logits(model, xs[None], cfg))
            if cfg.flip:
                views.append(infer_logits(model, xs.flip(-1)[None], cfg).flip(-1))

    def band_probs(start: int, stop: int) -> torch.Tensor:
        total = None
        for logits in views:
            p = upsample_rows(logits, (h, w), start, stop)[0].softmax(0)
            total = p if total is None else total + p
        return total / len(views)

    num_classes = views[0].shape[1]
    return reduce_in_bands(
        band_probs, (h, w), num_classes, entropy=entropy, keep_probs=keep_probs, device=device or image.device
    )


def predict_probs(model: nn.Module, image: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """Class probabilities at the image's resolution, averaged over scales (and flips).

    Args:
        model: Segmentation model in eval mode.
        image: 3 x H x W uint8 image (on the model's device).
        cfg: Evaluation settings.

    Returns:
        K x H x W probabilities (:func:`predict_dense` gives labels without keeping them all).
    """
    return predict_dense(model, image, cfg, keep_probs=True).probs


@torch.inference_mode()
def predict_uncertainty(model: nn.Module, image: torch.Tensor, cfg: EvalConfig) -> dict[str, torch.Tensor] | None:
    """PPL's uncertainty outputs for one image (None for models without them).

    Args:
        model: Segmentation model in eval mode.
        image: 3 x H x W uint8 image.
        cfg: Evaluation settings (``short_side`` is used; one whole-image pass).

    Returns:
        ``pixel``: H x W predictive entropy across the Monte-Carlo samples (nats);
        ``sigma``: K text-side standard deviations (geometric mean over attributes and dimensions).
    """
    h, w = image.shape[-2:]
    x = eval_view(image, 1.0, cfg)
    padded = pad_to_multiple(x[None], 32)
    out = model(padded)
    if "uncertainty" not in out:
        return None
    grid = out["uncertainty"][:, None].float()
    grid = F.interpolate(grid, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    grid = grid[..., : x.shape[-2], : x.shape[-1]]
    pixel = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return {"pixel": pixel, "sigma": out["sigma"][0].float()}
