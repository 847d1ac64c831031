"""Training and evaluation transforms for semantic segmentation, following DenseCLIP (Rao et al., CVPR 2022).

The training recipe is mmsegmentation's, as used by the DenseCLIP configs::

    RandomRescale((2048, 512), ratio 0.5-2.0) -> RandomCropCatMax(crop, cat_max_ratio=0.75) -> flip 0.5
    -> PhotoMetricDistortion -> CLIP mean/std normalisation -> pad to the crop size (image 0, label 255)

Image and mask are transformed jointly as :class:`torchvision.tv_tensors.Image` and
:class:`torchvision.tv_tensors.Mask` by :mod:`torchvision.transforms.v2`; the few mmseg steps v2 has no
equivalent for are small custom v2 transforms below. All randomness comes from torch's global RNG, so
``torch.manual_seed`` (and the per-worker seeding a ``DataLoader`` does from its ``generator``) makes the
pipeline reproducible.

:func:`build_train_transform` and :func:`build_eval_transform` return callables on the sample dicts of
:class:`clipdense.data.datasets.SegmentationDataset` (``{"image": uint8 3 x H x W, "label": int64 H x W, ...}``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from clipdense.data.photometric import mmseg_contrast, mmseg_hue, mmseg_saturation

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD (RGB, for images in [0, 1]), copied so that the data
# pipeline does not import open_clip (seconds per DataLoader worker); a test pins them to open_clip's values.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PadToSize",
    "PhotoMetricDistortion",
    "RandomCropCatMax",
    "RandomRescale",
    "SampleTransform",
    "build_eval_transform",
    "build_train_transform",
    "rescale_size",
]


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """Turns ``size`` into ``(height, width)``."""
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be a positive int or an (height, width) pair, got {size}")
    return size


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _first_of(flat_inputs: list[Any], kind: type) -> torch.Tensor | None:
    return next((inpt for inpt in flat_inputs if isinstance(inpt, kind)), None)


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Output size of mmcv's ``imrescale``: the largest aspect-preserving size that fits ``scale``.

    The long side becomes at most ``max(scale)`` and the short side at most ``min(scale)``, whatever the
    image's orientation; the scale factor may be above 1 (small images are enlarged).

    Args:
        height: Input height.
        width: Input width.
        scale: Target ``(long, short)`` (either order).

    Returns:
        ``(new_height, new_width)``, each rounded half up as mmcv does.
    """
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class RandomRescale(v2.Transform):
    """Random aspect-preserving rescale, as mmseg's ``Resize(img_scale, ratio_range, keep_ratio=True)``.

    Draws ``r ~ U(ratio_range)``, sets the target scale to ``(int(scale[0] * r), int(scale[1] * r))`` and
    rescales so that the long side is <= the larger and the short side <= the smaller target (see
    :func:`rescale_size`). Images use bilinear interpolation, by default without antialiasing as mmcv's OpenCV
    ``INTER_LINEAR`` (which aliases when shrinking by more than 2x; ``antialias=True`` smooths first); masks use
    nearest.
    Unlike :class:`torchvision.transforms.v2.ScaleJitter`, the bounds apply to the long/short side rather
    than to height/width, so portrait and landscape images are treated alike.

    Args:
        scale: Base ``(long, short)`` scale, e.g. ``(2048, 512)``.
        ratio_range: Range ``(low, high)`` of the random ratio r.
        antialias: Antialias the image when shrinking (False: mmcv's).
    """

    def __init__(
        self,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        antialias: bool = False,
    ) -> None:
        super().__init__()
        if len(scale) != 2 or min(scale) < 1:
            raise ValueError(f"scale must be a (long, short) pair of positive ints, got {scale}")
        if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        ratio = _uniform(*self.ratio_range)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return {"ratio": ratio, "size": list(rescale_size(height, width, target))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # F.resize dispatches on the tv_tensor type: masks are always resized with nearest.
        return F.resize(inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=self.antialias)


class RandomCropCatMax(v2.Transform):
    """Random crop that avoids crops dominated by one class, as mmseg's ``RandomCrop(cat_max_ratio=...)``.

    Up to ten random crop windows are tried; the first whose most frequent class covers less than
    ``cat_max_ratio`` of the labelled (non-ignored) pixels, with at least two classes present, is used, and
    otherwise the last window tried. (mmseg draws an eleventh, unchecked window after ten failures; the
    difference only changes which random window a hopeless sample gets.) The check needs a
    :class:`~torchvision.tv_tensors.Mask` in the sample; without one, or with ``cat_max_ratio >= 1``, this
    is a plain random crop. Inputs smaller than ``size`` are cropped to ``min(size, input size)``, not padded:
    use :class:`PadToSize` afterwards.

    Args:
        size: Crop ``(height, width)`` or one int for a square.
        cat_max_ratio: Upper bound (exclusive) on the share of the largest class in the crop.
        ignore_index: Label value not counted as a class.
        max_tries: Number of windows checked.
    """

    def __init__(
        self, size: int | Sequence[int], cat_max_ratio: float = 0.75, ignore_index: int = 255, max_tries: int = 10
    ) -> None:
        super().__init__()
        self.size = _pair(size, "crop size")
        if not 0 < cat_max_ratio:
            raise ValueError(f"cat_max_ratio must be > 0 (1.0 disables the check), got {cat_max_ratio}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = int(max_tries)

    def _window(self, height: int, width: int) -> tuple[int, int, int, int]:
        crop_h, crop_w = min(self.size[0], height), min(self.size[1], width)
        top = int(torch.randint(0, height - crop_h + 1, ()).item())
        left = int(torch.randint(0, width - crop_w + 1, ()).item())
        return top, left, crop_h, crop_w

    def _acceptable(self, mask: torch.Tensor, window: tuple[int, int, int, int]) -> bool:
        top, left, crop_h, crop_w = window
        crop = mask[..., top : top + crop_h, left : left + crop_w].reshape(-1)
        crop = crop[crop != self.ignore_index]
        if crop.numel() == 0:
            return False
        counts = torch.bincount(crop.long())
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        mask = _first_of(flat_inputs, tv_tensors.Mask)
        window = self._window(height, width)
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries - 1):
                if self._acceptable(mask, window):
                    break
                window = self._window(height, width)
        top, left, crop_h, crop_w = window
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


class PhotoMetricDistortion(v2.Transform):
    """mmseg's ``PhotoMetricDistortion`` on uint8 images (masks pass through unchanged).

    Order: brightness, then contrast either first or last (50/50), saturation, hue; each step is applied
    with probability 0.5, and the image is back in uint8 after each step, as in mmseg. Brightness is mmseg's
    ``img + U(-delta, delta)``, clipped and truncated. ``colour="mmseg"`` (default) does the rest as mmseg
    (:mod:`clipdense.data.photometric`): contrast ``a * img``; saturation: the S channel of OpenCV's 8-bit HSV
    times ``a``; hue: an integer in ``[-delta, delta)`` added to the 8-bit hue (0-179), modulo 180.
    ``colour="torchvision"`` uses torchvision's colour maths instead: ``adjust_contrast`` blends with the mean
    grey (``a * img + (1 - a) * mean``, brightness kept), ``adjust_saturation`` with the greyscale image, and
    ``adjust_hue`` shifts continuously by ``U(-delta, delta) / 180`` of the circle in float HSV.

    Args:
        brightness_delta: Maximal additive brightness change, in uint8 levels.
        contrast_range: Range of the contrast factor.
        saturation_range: Range of the saturation factor.
        hue_delta: Maximal hue shift on the 0-180 scale (18 = 36 degrees).
        p: Probability of each step.
        colour: ``mmseg`` or ``torchvision`` colour maths (see above).
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18,
        p: float = 0.5,
        colour: str = "mmseg",
    ) -> None:
        super().__init__()
        if colour not in ("mmseg", "torchvision"):
            raise ValueError(f"unknown colour maths {colour!r}; use 'mmseg' or 'torchvision'")
        self.colour = colour
        if not 0 <= hue_delta <= 90:
            raise ValueError(f"hue_delta is on the 0-180 hue scale and must be in [0, 90], got {hue_delta}")
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = float(hue_delta)
        self.p = float(p)

    # Only images change; masks and other entries pass through untouched.
    _transformed_types = (tv_tensors.Image, lambda inpt: type(inpt) is torch.Tensor)

    def _maybe(self, low: float, high: float) -> float | None:
        applied = torch.rand(()).item() < self.p
        value = _uniform(low, high)
        return value if applied else None

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        # Every value is drawn on every call, so the RNG stream does not depend on which steps fire.
        brightness = self._maybe(-self.brightness_delta, self.brightness_delta)
        contrast_first = torch.rand(()).item() < 0.5
        contrast = self._maybe(*self.contrast_range)
        saturation = self._maybe(*self.saturation_range)
        hue = self._maybe(-self.hue_delta, self.hue_delta)
        return {
            "brightness": brightness,
            "contrast_first": contrast_first,
            "contrast": contrast,
            "saturation": saturation,
            "hue": hue,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if inpt.dtype != torch.uint8:
            raise TypeError(
                f"PhotoMetricDistortion works on uint8 images (0-255), got dtype {inpt.dtype}; apply it before "
                "converting to float and normalising"
            )
        image = inpt
        if params["brightness"] is not None:
            shifted = (image.float() + params["brightness"]).clamp_(0, 255).to(torch.uint8)
            image = tv_tensors.wrap(shifted, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else shifted
        if self.colour == "mmseg":
            contrast, saturation, hue = mmseg_contrast, mmseg_saturation, _mmseg_hue
        else:
            contrast, saturation, hue = F.adjust_contrast, F.adjust_saturation, _torchvision_hue
        steps = [("contrast", contrast)] if params["contrast_first"] else []
        steps += [("saturation", saturation), ("hue", hue)]
        steps += [] if params["contrast_first"] else [("contrast", contrast)]
        for key, op in steps:
            if params[key] is not None:
                out = op(image.as_subclass(torch.Tensor), params[key])
                image = tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out
        return image


def _mmseg_hue(image: torch.Tensor, delta: float) -> torch.Tensor:
    return mmseg_hue(image, math.floor(delta))  # mmseg's integer shift in [-hue_delta, hue_delta)


def _torchvision_hue(image: torch.Tensor, delta: float) -> torch.Tensor:
    return F.adjust_hue(image, delta / 180.0)


class PadToSize(v2.Transform):
    """Pads at the bottom and right up to a minimum size, as mmseg's ``Pad(size=...)``.

    Inputs already at least ``size`` are left alone.

    Args:
        size: Minimum ``(height, width)`` or one int for a square.
        fill: Fill value per tv_tensor type, as for :class:`torchvision.transforms.v2.Pad`; types not in the
            dict are filled with 0.
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, size: int | Sequence[int], fill: dict[type, float] | None = None) -> None:
        super().__init__()
        self.size = _pair(size, "pad size")
        self.fill = dict(fill) if fill is not None else {tv_tensors.Image: 0, tv_tensors.Mask: 255}

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(self.size[1] - width, 0), max(self.size[0] - height, 0)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = next((value for kind, value in self.fill.items() if isinstance(inpt, kind)), 0)
        return F.pad(inpt, params["padding"], fill=fill)


class SampleTransform:
    """Applies a v2 pipeline to a dataset sample dict, jointly to its image and label.

    ``sample["image"]`` (uint8 3 x H x W) is wrapped as a :class:`~torchvision.tv_tensors.Image` and
    ``sample["label"]`` (int64 H x W), when ``with_label``, as a :class:`~torchvision.tv_tensors.Mask`;
    both come back as plain tensors so the default collate stacks them. Other entries are kept.

    Args:
        pipeline: The v2 transform (usually a :class:`~torchvision.transforms.v2.Compose`).
        with_label: Whether the label goes through the pipeline too (False for evaluation, where the label
            stays at full resolution).
    """

    def __init__(self, pipeline: v2.Transform, with_label: bool = True) -> None:
        self.pipeline = pipeline
        self.with_label = with_label

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"]
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3:
            raise TypeError(
                "sample['image'] must be a uint8 3 x H x W tensor as the dataset readers return, got "
                f"{type(image).__name__} {getattr(image, 'dtype', '')} {tuple(getattr(image, 'shape', ()))}; "
                "apply this transform to raw samples only"
            )
        out = dict(sample)
        if self.with_label:
            result = self.pipeline({"image": tv_tensors.Image(image), "label": tv_tensors.Mask(sample["label"])})
            out["label"] = result["label"].as_subclass(torch.Tensor)
        else:
            result = {"image": self.pipeline(tv_tensors.Image(image))}
        out["image"] = result["image"].as_subclass(torch.Tensor)
        return out

    def __repr__(self) -> str:
        return f"SampleTransform(with_label={self.with_label}, pipeline={self.pipeline})"


def _normalise(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def build_train_transform(
    crop_size: int | tuple[int, int],
    scale: tuple[int, int] = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip: float = 0.5,
    photometric: bool = True,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    ignore_index: int = 255,
    colour: str = "mmseg",
    antialias: bool = False,
) -> SampleTransform:
    """Builds DenseCLIP's (mmseg's) training augmentation for ``SegmentationDataset(transform=...)``.

    Steps: :class:`RandomRescale` -> :class:`RandomCropCatMax` -> horizontal flip -> (optional)
    :class:`PhotoMetricDistortion` -> float in [0, 1] -> normalise -> :class:`PadToSize` (image 0, i.e. the
    mean colour; label ``ignore_index``).

    Args:
        crop_size: Crop ``(height, width)`` or one int, e.g. 512 (ViT: 640).
        scale: Base ``(long, short)`` rescale target.
        ratio_range: Range of the random rescale ratio.
        cat_max_ratio: Largest allowed share of one class in a crop (1.0 disables the check).
        flip: Horizontal flip probability.
        photometric: Whether to apply :class:`PhotoMetricDistortion`.
        mean: Per-channel mean for images scaled to [0, 1] (RGB).
        std: Per-channel std for images scaled to [0, 1] (RGB).
        ignore_index: Label value for padding and ignored pixels.
        colour: :class:`PhotoMetricDistortion`'s colour maths (``mmseg`` or ``torchvision``).
        antialias: :class:`RandomRescale`'s antialiasing (False: mmcv's).

    Returns:
        A callable mapping a sample dict with ``"image"`` uint8 3 x H x W and ``"label"`` int64 H x W to the
        same dict with ``"image"`` float32 3 x crop_h x crop_w (normalised) and ``"label"`` int64
        crop_h x crop_w.
    """
    crop = _pair(crop_size, "crop_size")
    steps: list[v2.Transform] = [
        RandomRescale(scale=scale, ratio_range=ratio_range, antialias=antialias),
        RandomCropCatMax(crop, cat_max_ratio=cat_max_ratio, ignore_index=ignore_index),
        v2.RandomHorizontalFlip(p=flip),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion(colour=colour))
    steps += _normalise(mean, std)
    steps.append(PadToSize(crop, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}))
    return SampleTransform(v2.Compose(steps), with_label=True)


def build_eval_transform(
    short_side: int | None = 512,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    max_aspect: float | None = 4.0,
) -> SampleTransform:
    """Builds the evaluation transform: rescale the image only, then normalise.

    The label is left at full resolution so predictions are scored on the original annotation (upsample
    the logits to the label size). The default reproduces mmseg's test ``Resize((2048, 512), keep_ratio)``.

    Args:
        short_side: Target short side (DenseCLIP: 512, ViT: 640), or None to keep the image size.
        mean: Per-channel mean for images scaled to [0, 1] (RGB).
        std: Per-channel std for images scaled to [0, 1] (RGB).
        max_aspect: Caps the long side at ``max_aspect * short_side`` (4: mmseg's (2048, 512) test scale);
            None for no cap.

    Returns:
        A callable mapping a sample dict with ``"image"`` uint8 3 x H x W to the same dict with ``"image"``
        float32 3 x H' x W' (normalised; ``min(H', W') == short_side`` unless the long-side cap applies) and
        the label unchanged.
    """
    steps: list[v2.Transform] = []
    if short_side is not None:
        if short_side < 1:
            raise ValueError(f"short_side must be a positive int or None, got {short_side}")
        max_size = None if max_aspect is None else int(max_aspect * short_side)
        steps.append(v2.Resize(short_side, max_size=max_size, antialias=True))
    steps += _normalise(mean, std)
    return SampleTransform(v2.Compose(steps), with_label=False)
