"""Tests for the DenseCLIP/mmseg training and evaluation transforms."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from clipdense.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    PadToSize,
    PhotoMetricDistortion,
    RandomCropCatMax,
    RandomRescale,
    build_eval_transform,
    build_train_transform,
    rescale_size,
)

# Well-separated, asymmetric colours: one per label, so image pixels tell which label they belong to.
PALETTE = torch.tensor(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]],
    dtype=torch.uint8,
)
MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def make_sample(image: torch.Tensor, label: torch.Tensor) -> dict:
    return {"image": image, "label": label, "image_path": "img.png", "label_path": "mask.png"}


def blocky_labels(height: int, width: int, block: int, seed: int = 0) -> torch.Tensor:
    """Random labels 0..5 constant on ``block`` x ``block`` tiles, int64 [H, W]."""
    generator = torch.Generator().manual_seed(seed)
    tiles = torch.randint(0, len(PALETTE), (height // block, width // block), generator=generator)
    return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)


def colour_sample(height: int = 96, width: int = 128, block: int = 32) -> dict:
    label = blocky_labels(height, width, block)
    return make_sample(PALETTE[label].permute(2, 0, 1).contiguous(), label)


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    """Normalised float [3, H, W] -> float [3, H, W] in 0..255."""
    return (image * STD + MEAN) * 255


def test_clip_constants_match_open_clip() -> None:
    assert CLIP_MEAN == tuple(OPENAI_DATASET_MEAN) and CLIP_STD == tuple(OPENAI_DATASET_STD)


def test_train_output_shapes_dtypes_and_padding() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 20, 26), dtype=torch.uint8)
    label = torch.randint(0, 4, (20, 26))
    # ratio 1 with the image's own (long, short) scale: no rescale, so the 20 x 26 image is smaller than the crop.
    transform = build_train_transform(32, scale=(26, 20), ratio_range=(1.0, 1.0))
    out = transform(make_sample(image, label))
    assert type(out["image"]) is torch.Tensor and type(out["label"]) is torch.Tensor
    assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.float32
    assert out["label"].shape == (32, 32) and out["label"].dtype == torch.int64
    assert out["image_path"] == "img.png" and out["label_path"] == "mask.png"
    assert (out["label"][20:] == 255).all() and (out["label"][:, 26:] == 255).all()
    assert (out["image"][:, 20:] == 0).all() and (out["image"][:, :, 26:] == 0).all()
    assert (out["label"][:20, :26] != 255).all()
    # The input sample is not modified in place.
    assert image.dtype == torch.uint8 and label.shape == (20, 26)

    rect = build_train_transform((24, 40), scale=(64, 48))(make_sample(image, label))
    assert rect["image"].shape == (3, 24, 40) and rect["label"].shape == (24, 40)
    batch = torch.utils.data.default_collate([out, transform(make_sample(image, label))])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].shape == (2, 32, 32)


def test_train_keeps_image_and_mask_aligned() -> None:
    sample = colour_sample()
    transform = build_train_transform(64, scale=(128, 96), ratio_range=(0.5, 2.0), photometric=False)
    input_labels = set(sample["label"].unique().tolist())
    for seed in range(6):
        torch.manual_seed(seed)
        out = transform(sample)
        label, image = out["label"], unnormalise(out["image"])
        valid = label != 255
        # Nearest-neighbour masks: no label value that was not in the input (255 only from padding).
        assert set(label[valid].unique().tolist()) <= input_labels
        # Away from label edges (7 x 7 neighbourhood of one label, padding included as its own value) the
        # bilinear image must show exactly the colour of the label: crops and flips moved both together.
        grid = label[None, None].float()
        interior = (nnf.max_pool2d(grid, 7, 1, 3) == -nnf.max_pool2d(-grid, 7, 1, 3))[0, 0] & valid
        assert interior.sum() > 0.3 * valid.sum()
        expected = PALETTE[label[interior]].float()
        assert (image[:, interior].T - expected).abs().max() <= 2.0, f"misaligned for seed {seed}"


def test_flip_moves_image_and_mask_together() -> None:
    sample = colour_sample(32, 48, 8)
    transform = build_train_transform((32, 48), scale=(48, 32), ratio_range=(1.0, 1.0), flip=1.0, photometric=False)
    out = transform(sample)
    assert torch.equal(out["label"], sample["label"].flip(-1))
    assert torch.allclose(unnormalise(out["image"]), sample["image"].flip(-1).float(), atol=1e-3)


@pytest.mark.parametrize("ratio", [0.5, 1.0, 1.37, 2.0])
@pytest.mark.parametrize("size", [(30, 40), (40, 30), (10, 100), (50, 50)])
def test_random_rescale_bounds(ratio: float, size: tuple[int, int]) -> None:
    scale = (256, 64)
    long_target, short_target = int(scale[0] * ratio), int(scale[1] * ratio)
    rescale = RandomRescale(scale=scale, ratio_range=(ratio, ratio))
    image = tv_tensors.Image(torch.randint(0, 256, (3, *size), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 3, size))
    out_image, out_mask = rescale(image, mask)
    height, width = out_image.shape[-2:]
    assert out_mask.shape == (height, width)
    assert (height, width) == rescale_size(*size, scale=(long_target, short_target))
    assert max(height, width) <= long_target and min(height, width) <= short_target
    # One bound is reached and the aspect ratio is kept (up to rounding).
    assert max(height, width) >= long_target - 1 or min(height, width) >= short_target - 1
    assert abs(width / height - size[1] / size[0]) <= (size[1] / size[0]) * (1 / min(height, width) + 0.02)
    assert set(out_mask.unique().tolist()) <= {0, 1, 2}


def test_random_rescale_is_mmcvs_bilinear_without_antialiasing() -> None:
    """mmcv's imrescale is OpenCV's INTER_LINEAR: no smoothing before shrinking (antialias=True is the option)."""
    image = tv_tensors.Image(torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8))
    params = {"ratio": 0.25, "size": [30, 40]}
    plain = nnf.interpolate(image[None].float(), size=(30, 40), mode="bilinear", align_corners=False)[0]
    out = RandomRescale().transform(image, params)
    assert (out.int() - plain.round().int()).abs().max() <= 1  # uint8 rounding
    smooth = RandomRescale(antialias=True).transform(image, params)
    assert (smooth.float() - plain).abs().mean() > 5  # a 4x shrink of noise: antialiasing averages it out


def test_random_rescale_draws_ratio_in_range() -> None:
    rescale = RandomRescale(scale=(2048, 512), ratio_range=(0.5, 2.0))
    torch.manual_seed(0)
    image = tv_tensors.Image(torch.zeros(3, 375, 500, dtype=torch.uint8))
    ratios = [rescale.make_params([image])["ratio"] for _ in range(200)]
    assert 0.5 <= min(ratios) < 0.6 and 1.9 < max(ratios) <= 2.0
    with pytest.raises(ValueError, match="ratio_range"):
        RandomRescale(ratio_range=(2.0, 0.5))


def _share_of_largest(mask: torch.Tensor, params: dict) -> float:
    crop = mask[params["top"] : params["top"] + params["height"], params["left"] : params["left"] + params["width"]]
    counts = torch.bincount(crop.reshape(-1))
    return counts.max().item() / counts.sum().item() if (counts > 0).sum() > 1 else 1.0


def test_cat_max_ratio_crop() -> None:
    # 94% class 0; a 6-column stripe of class 1. A 20 x 20 crop obeys the 0.75 ratio only around the stripe
    # (about 21% of windows), so ten tries find one about 90% of the time.
    mask = torch.zeros(100, 100, dtype=torch.int64)
    mask[:, 47:53] = 1
    inputs = [tv_tensors.Mask(mask)]
    torch.manual_seed(0)
    checked = RandomCropCatMax(20, cat_max_ratio=0.75)
    plain = RandomCropCatMax(20, cat_max_ratio=1.0)
    obey_checked = sum(_share_of_largest(mask, checked.make_params(inputs)) < 0.75 for _ in range(200))
    obey_plain = sum(_share_of_largest(mask, plain.make_params(inputs)) < 0.75 for _ in range(200))
    assert obey_checked >= 160 and obey_plain <= 80

    # Hopeless sample (one class only): still a valid crop of the full size, no endless loop.
    params = checked.make_params([tv_tensors.Mask(torch.zeros(30, 40, dtype=torch.int64))])
    assert (params["height"], params["width"]) == (20, 20)
    assert 0 <= params["top"] <= 10 and 0 <= params["left"] <= 20
    # Smaller than the crop: cropped to the input size (padding is a separate step).
    small = checked.make_params([tv_tensors.Mask(torch.zeros(12, 50, dtype=torch.int64))])
    assert (small["top"], small["height"], small["width"]) == (0, 12, 20)


def test_cat_max_ratio_ignores_ignore_index() -> None:
    # Columns 0-17 class 1, 18-19 class 0, 20-39 ignore. A 20-wide window has two real classes only when
    # left <= 17; at left 18 or 19 it holds class 0 and ignore pixels, which pass if ignore counted as a class
    # (about 10% of first tries). All ten tries failing has probability (3/21)^10.
    mask = torch.full((20, 40), 255, dtype=torch.int64)
    mask[:, :18] = 1
    mask[:, 18:20] = 0
    torch.manual_seed(0)
    crop = RandomCropCatMax(20, cat_max_ratio=0.99)
    lefts = [crop.make_params([tv_tensors.Mask(mask)])["left"] for _ in range(200)]
    assert max(lefts) <= 17 and len(set(lefts)) > 10


def test_train_transform_is_reproducible_and_picklable() -> None:
    sample = colour_sample(48, 64, 8)
    transform = build_train_transform(32, scale=(64, 48))
    outputs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outputs.append(transform(sample))
    assert torch.equal(outputs[0]["image"], outputs[1]["image"])
    assert torch.equal(outputs[0]["label"], outputs[1]["label"])
    assert not torch.equal(outputs[0]["image"], outputs[2]["image"])
    clone = pickle.loads(pickle.dumps(transform))  # DataLoader workers may pickle the dataset
    torch.manual_seed(3)
    assert torch.equal(clone(sample)["image"], outputs[0]["image"])


def test_photometric_changes_image_never_mask() -> None:
    sample = colour_sample(32, 32, 8)
    image, mask = tv_tensors.Image(sample["image"]), tv_tensors.Mask(sample["label"])
    distortion = PhotoMetricDistortion()
    changed = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out = distortion({"image": image, "label": mask, "path": "x"})
        assert out["label"] is mask and torch.equal(out["label"], sample["label"]) and out["path"] == "x"
        assert isinstance(out["image"], tv_tensors.Image) and out["image"].dtype == torch.uint8
        assert out["image"].shape == image.shape
        changed += not torch.equal(out["image"], image)
    assert changed >= 9  # each call leaves the image alone with probability 1/16
    off = PhotoMetricDistortion(p=0.0)
    assert torch.equal(off(image), image)
    with pytest.raises(TypeError, match="uint8"):
        distortion(tv_tensors.Image(image.float()))


def test_photometric_steps_torchvision_colour() -> None:
    image = tv_tensors.Image(torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8) * 3)
    distortion = PhotoMetricDistortion(colour="torchvision")
    none = {"brightness": None, "contrast_first": True, "contrast": None, "saturation": None, "hue": None}
    brighter = distortion.transform(image, {**none, "brightness": 20.7})
    assert isinstance(brighter, tv_tensors.Image)
    assert torch.equal(brighter, (image.int() + 20.7).clamp(0, 255).to(torch.uint8))  # additive, as mmseg
    hue = distortion.transform(image, {**none, "hue": 18.0})
    assert torch.equal(hue, F.adjust_hue(image, 0.1))  # 18 on the 0-180 scale = 1/10 of the circle
    contrast_then_sat = F.adjust_saturation(F.adjust_contrast(image, 1.4), 0.6)
    sat_then_contrast = F.adjust_contrast(F.adjust_saturation(image, 0.6), 1.4)
    both = {**none, "contrast": 1.4, "saturation": 0.6}
    assert torch.equal(distortion.transform(image, both), contrast_then_sat)
    assert torch.equal(distortion.transform(image, {**both, "contrast_first": False}), sat_then_contrast)


def test_pad_to_size_fill() -> None:
    image, mask = tv_tensors.Image(torch.ones(3, 5, 7)), tv_tensors.Mask(torch.zeros(5, 7, dtype=torch.int64))
    out_image, out_mask = PadToSize((8, 9), fill={tv_tensors.Image: -1.0, tv_tensors.Mask: 200})(image, mask)
    assert out_image.shape == (3, 8, 9) and out_mask.shape == (8, 9)
    assert (out_image[:, 5:] == -1).all() and (out_image[:, :, 7:] == -1).all() and (out_image[:, :5, :7] == 1).all()
    assert (out_mask[5:] == 200).all() and (out_mask[:5, :7] == 0).all()
    big = tv_tensors.Mask(torch.zeros(10, 10, dtype=torch.int64))
    assert PadToSize(8)(big) is big


def test_eval_transform() -> None:
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    label = torch.randint(0, 3, (40, 60))
    out = build_eval_transform(32)(make_sample(image, label))
    assert out["image"].shape == (3, 32, 48) and out["image"].dtype == torch.float32
    assert out["label"] is label  # evaluation scores the full-resolution annotation
    panorama = make_sample(torch.zeros(3, 20, 200, dtype=torch.uint8), label)
    wide = build_eval_transform(32)(panorama)
    assert wide["image"].shape[-1] == 128  # long side capped at 4 x short side, as mmseg's (2048, 512)
    uncapped = build_eval_transform(32, max_aspect=None)(panorama)
    assert uncapped["image"].shape[-2:] == (32, 320)
    same = build_eval_transform(None)(make_sample(image, label))
    assert torch.allclose(unnormalise(same["image"]), image.float(), atol=1e-3)
    with pytest.raises(TypeError, match="uint8 3 x H x W"):
        build_eval_transform(32)(make_sample(image.float(), label))


def _mmseg_photometric(bgr, brightness, contrast_first, contrast, saturation, hue):
    """mmseg's PhotoMetricDistortion.__call__ (mmseg 0.x) on an H x W x 3 BGR uint8 array with the draws fixed."""
    import cv2

    def convert(img, alpha=1.0, beta=0.0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    img = bgr
    if brightness is not None:
        img = convert(img, beta=brightness)
    if contrast_first and contrast is not None:
        img = convert(img, alpha=contrast)
    if saturation is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=saturation)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if hue is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + hue) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not contrast_first and contrast is not None:
        img = convert(img, alpha=contrast)
    return img


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_photometric_is_mmsegs(seed) -> None:
    """The default colour maths against mmseg's own steps on OpenCV (BGR in, as mmcv loads images): equal but for
    a few values one level apart (OpenCV's HSV -> BGR truncates in its vector loop, rounds in its scalar tail, and
    may dispatch to IPP); torchvision's colour maths are tens of levels away."""
    pytest.importorskip("cv2")
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    params = {"brightness": float(rng.uniform(-32, 32)), "contrast_first": bool(seed % 2),
              "contrast": float(rng.uniform(0.5, 1.5)), "saturation": float(rng.uniform(0.5, 1.5)),
              "hue": float(rng.uniform(-18, 18))}  # fmt: skip
    image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1))
    theirs = _mmseg_photometric(rgb[:, :, ::-1].copy(), **{**params, "hue": int(np.floor(params["hue"]))})
    theirs = theirs[:, :, ::-1].astype(int)
    diff = np.abs(PhotoMetricDistortion().transform(image, params).permute(1, 2, 0).numpy() - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() < 2e-3
    blend = PhotoMetricDistortion(colour="torchvision").transform(image, params).permute(1, 2, 0).numpy()
    assert np.abs(blend - theirs).mean() > 5


def test_opencv_hsv_conversions() -> None:
    """rgb_to_hsv8 equals cv2's integer conversion everywhere; hsv8_to_rgb is within one level of cv2's (equal for
    all but a few values)."""
    cv2 = pytest.importorskip("cv2")
    from clipdense.data.photometric import hsv8_to_rgb, rgb_to_hsv8

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (50, 128, 3), dtype=np.uint8)
    rgb[0, :, :] = np.arange(128)[:, None]  # greys (saturation 0)
    hsv = rgb_to_hsv8(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(hsv, cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
    back = hsv8_to_rgb(torch.from_numpy(hsv).permute(2, 0, 1)).permute(1, 2, 0).numpy().astype(int)
    diff = np.abs(back - cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 2e-3
