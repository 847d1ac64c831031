"""Readers for semantic-segmentation datasets in their standard folder layouts.

Every reader yields ``{"image": uint8 [3, H, W] RGB, "label": int64 [H, W] train ids, "image_path": str,
"label_path": str}``. Raw mask values are turned into train ids ``0..C-1`` (and ``ignore_index``) by a
:class:`LabelConvention`. ``root`` is always the dataset's own top folder, as in mmsegmentation's ``data/``
folder (e.g. ``data/VOCdevkit/VOC2012``, ``data/ADEChallengeData2016``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset

from .classnames import load_classnames, read_class_file

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_MAX_LISTED = 5  # how many offending files/values an error message names
#: Largest image decoded at full size (1.5 GB as uint8 RGB, about 3x that while decoding). Replaces PIL's
#: decompression-bomb limit (a warning above 89 MP, an error above 179 MP) in the readers here. A JPEG
#: above it still reads with ``max_pixels``: it is decoded at 1/2 .. 1/8 scale.
MAX_DECODE_PIXELS = 500_000_000


class ImageTooLargeError(ValueError):
    """An image too large to decode at the size asked for (see :data:`MAX_DECODE_PIXELS`)."""


_pil_check = {"lock": threading.Lock(), "users": 0, "saved": None}


@contextmanager
def _pil_bomb_check_off() -> Iterator[None]:
    """Turns PIL's decompression-bomb check off inside the block: the readers check sizes themselves.

    PIL's messages read as an attack or (above 179 MP) a crash. Blocks in several threads may overlap;
    ``Image.MAX_IMAGE_PIXELS`` gets its value back when the last one ends. Other code that opens images
    while a block runs is not checked by PIL either.
    """
    with _pil_check["lock"]:
        if _pil_check["users"] == 0:
            _pil_check["saved"], Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _pil_check["users"] += 1
    try:
        yield
    finally:
        with _pil_check["lock"]:
            _pil_check["users"] -= 1
            if _pil_check["users"] == 0:
                Image.MAX_IMAGE_PIXELS = _pil_check["saved"]


def fit_pixels(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """The size that fits ``max_pixels`` with the same aspect ratio (within 1 px), or the size itself.

    Args:
        width: Image width W.
        height: Image height H.
        max_pixels: Most pixels allowed; None or 0: no limit.

    Returns:
        ``(width, height)``, with ``width * height <= max_pixels`` when there is a limit (and no side below 1).
    """
    if not max_pixels or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _check_decode_size(path: Path, full: tuple[int, int], decode: tuple[int, int], hint: str) -> None:
    """Raises ImageTooLargeError (ending with ``hint``) if decoding ``path`` at ``decode`` (W, H) is too large."""
    if decode[0] * decode[1] > MAX_DECODE_PIXELS:
        raise ImageTooLargeError(
            f"{path} is {full[0]}x{full[1]} pixels ({full[0] * full[1] / 1e6:.0f} MP), above the "
            f"{MAX_DECODE_PIXELS / 1e6:.0f} MP that are decoded at once; {hint}"
        )


@dataclass(frozen=True)
class LabelConvention:
    """How raw mask values map to train ids.

    Conversion order: ``lookup`` (if given) maps each raw value ``v`` to ``lookup[v]``; then, with
    ``reduce_zero_label``, 0 becomes ``ignore_index`` and every other value ``k`` becomes ``k - 1``
    (``ignore_index`` stays ``ignore_index``). The result must lie in ``0..num_classes-1`` or equal
    ``ignore_index``.

    Attributes:
        num_classes: Number of train classes C.
        ignore_index: Label value excluded from training and evaluation.
        reduce_zero_label: Whether raw 0 means "unlabelled" and the classes start at raw 1.
        lookup: Optional table remapping raw values, indexed by raw value.
    """

    num_classes: int
    ignore_index: int = 255
    reduce_zero_label: bool = False
    lookup: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"ignore_index {self.ignore_index} collides with a class id (0..{self.num_classes - 1}); "
                "use a value outside the class range such as 255"
            )

    def apply(self, raw: np.ndarray, source: str = "<array>") -> np.ndarray:
        """Converts raw mask values to train ids.

        Args:
            raw: Raw mask ``[H, W]`` of integer (or bool) values.
            source: File name used in error messages.

        Returns:
            Train ids ``[H, W]``, int64, in ``0..num_classes-1`` or ``ignore_index``.

        Raises:
            ValueError: If the mask is not single-channel integer data, or a value is out of range after
                conversion.
        """
        if raw.ndim != 2:
            raise ValueError(
                f"{source}: a label mask must be a single-channel H x W image of class indices, got an "
                f"array of shape {tuple(raw.shape)}; convert colour-coded (RGB) masks to index masks first"
            )
        if not (np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.bool_):
            raise ValueError(f"{source}: label mask must hold integer class indices, got dtype {raw.dtype}")
        label = raw.astype(np.int64)
        if self.lookup is not None:
            table = np.asarray(self.lookup, dtype=np.int64)
            outside = (label < 0) | (label >= len(table))
            if outside.any():
                raise ValueError(
                    f"{source}: raw label values {_few(np.unique(label[outside]))} are not covered by the "
                    f"lookup table (which maps raw values 0..{len(table) - 1}); check the dataset type"
                )
            label = table[label]
        if self.reduce_zero_label:
            was_ignore = label == self.ignore_index
            label = label - 1
            label[label == -1] = self.ignore_index
            label[was_ignore] = self.ignore_index
        bad = (label != self.ignore_index) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            raise ValueError(
                f"{source}: raw label values {_few(np.unique(raw[bad]))} are out of range: after conversion "
                f"(reduce_zero_label={self.reduce_zero_label}) labels must be 0..{self.num_classes - 1} or "
                f"{self.ignore_index} (ignore). Check that the dataset name matches the annotation files "
                "(e.g. *_labelTrainIds.png, not *_labelIds.png) and that the masks are index masks"
            )
        return label


def _to_uint8_rgb(image: Image.Image, path: Path) -> np.ndarray:
    """H x W x 3 uint8 of a PIL image. PIL's ``convert("RGB")`` clips 16-bit and float pixels at 255
    (a 16-bit PNG turns almost white), so those are scaled to 8 bits here: 16-bit by 65535 -> 255,
    floats in [0, 1] by 255; other ranges are refused rather than guessed."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return np.array(image.convert("RGB"))
    values = np.asarray(image).astype(np.float64)
    low, high = (float(np.nanmin(values)), float(np.nanmax(values))) if values.size else (0.0, 0.0)
    top = 1.0 if image.mode == "F" else 65535.0  # mode "I" holds 16-bit data in older PIL versions
    if low < 0.0 or high > top:
        raise ValueError(
            f"{path} is a {image.mode!r} image with values in [{low:.4g}, {high:.4g}]; only [0, {top:g}] can "
            "be read as brightness: convert it to an 8-bit RGB image first"
        )
    scale = 255.0 / top
    gray = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def read_image_rgb(
    path: str | Path, apply_exif_orientation: bool = False, max_pixels: int | None = None
) -> torch.Tensor:
    """Reads an image file as RGB with PIL (grayscale, palette and CMYK images are converted).

    PIL rather than ``torchvision.io.decode_image``, whose decoders are deprecated since torchvision 0.29.
    PIL's decompression-bomb warning/error is replaced by :data:`MAX_DECODE_PIXELS`.

    Args:
        path: Image file.
        apply_exif_orientation: Rotate/flip as the EXIF orientation tag says (for user photos). Keep False
            for datasets: their annotation masks are aligned with the stored pixels.
        max_pixels: Downscale an image with more pixels than this to :func:`fit_pixels` (Lanczos; JPEGs are
            decoded at 1/2 .. 1/8 scale first, which keeps time and memory small). None or 0: full size.

    Returns:
        ``[3, H, W]`` uint8 tensor, ``H * W <= max_pixels`` when a limit is given.

    Raises:
        FileNotFoundError: If the file does not exist.
        ImageTooLargeError: If the image would be decoded with more than :data:`MAX_DECODE_PIXELS` pixels.
        ValueError: If the file cannot be decoded, or is a 16-bit/float image whose values are not
            brightness in [0, 65535] / [0, 1] (those in range are scaled to 8 bits).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    decoded = False  # decoding errors are reported as corrupt files; size and value-range errors as themselves
    try:
        with _pil_bomb_check_off(), Image.open(path) as image:
            full = image.size
            size = fit_pixels(*full, max_pixels)
            if size != full:
                image.draft("RGB", size)  # JPEG: decode at the smallest 1/2^k scale still >= size
            if not max_pixels and image.format in ("JPEG", "MPO"):
                hint = "read it downscaled with a pixel limit (max_pixels; --max-pixels N on the command line)"
            else:
                hint = f"only JPEGs can be decoded downscaled: convert it to JPEG or downscale the {image.format} file"
            _check_decode_size(path, full, image.size, hint)
            image.load()
            if size != image.size:
                if image.mode in ("1", "P"):
                    image = image.convert("RGB")  # PIL resizes these with nearest neighbours
                image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            if apply_exif_orientation:
                image = ImageOps.exif_transpose(image)
            decoded = True
            return torch.from_numpy(_to_uint8_rgb(image, path)).permute(2, 0, 1).contiguous()
    except (OSError, ValueError) as error:
        if decoded or isinstance(error, ImageTooLargeError):
            raise
        raise ValueError(
            f"could not decode image {path} ({error}); the file is corrupt or not an image: re-extract the "
            "dataset or remove this file from the split"
        ) from error


def read_image_size(path: str | Path, apply_exif_orientation: bool = False) -> tuple[int, int]:
    """The size of an image file, from its header (nothing is decoded).

    Args:
        path: Image file.
        apply_exif_orientation: The size as :func:`read_image_rgb` with this flag gives it (W and H swap for
            photos stored rotated by 90 degrees).

    Returns:
        ``(width, height)``.
    """
    with _pil_bomb_check_off(), Image.open(path) as image:
        width, height = image.size
        turned = apply_exif_orientation and image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


def read_mask(path: str | Path) -> np.ndarray:
    """Reads a label mask as stored (palette PNGs give palette indices, not colours).

    Args:
        path: Mask file (usually PNG).

    Returns:
        Raw mask array, ``[H, W]`` for single-channel masks.

    Raises:
        FileNotFoundError: If the file does not exist.
        ImageTooLargeError: If the mask has more than :data:`MAX_DECODE_PIXELS` pixels.
        ValueError: If the file cannot be decoded, or is a 16-bit/float image whose values are not
            brightness in [0, 65535] / [0, 1] (those in range are scaled to 8 bits).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label mask {path} not found")
    try:
        with _pil_bomb_check_off(), Image.open(path) as mask:
            _check_decode_size(path, mask.size, mask.size, "check that it is a label mask")
            return np.array(mask)
    except ImageTooLargeError:
        raise
    except (OSError, ValueError) as error:
        raise ValueError(
            f"could not decode label mask {path} ({error}); the file is corrupt or not an image: "
            "re-extract the dataset or remove this file from the split"
        ) from error


class SegmentationDataset(Dataset):
    """Image/mask pairs with a label convention.

    Args:
        samples: ``(image_path, mask_path)`` pairs.
        class_names: One entry per train id (synonyms allowed, see :mod:`clipdense.data.classnames`).
        convention: Mapping from raw mask values to train ids.
        name: Dataset name, for messages.
        transform: Optional callable applied to each sample dict before it is returned.

    Items are dicts ``{"image": uint8 [3, H, W], "label": int64 [H, W], "image_path": str,
    "label_path": str}``.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str | Path, str | Path]],
        class_names: Sequence[str],
        convention: LabelConvention,
        name: str = "custom",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        if len(samples) == 0:
            raise ValueError(f"{name}: the dataset has no samples; check the root folder and split")
        if len(class_names) != convention.num_classes:
            raise ValueError(
                f"{name}: {len(class_names)} class names given but the label convention has "
                f"{convention.num_classes} classes; they must match"
            )
        self.samples = [(Path(image), Path(mask)) for image, mask in samples]
        self.class_names = list(class_names)
        self.convention = convention
        self.name = name
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """Number of train classes C."""
        return self.convention.num_classes

    @property
    def ignore_index(self) -> int:
        """Label value to ignore."""
        return self.convention.ignore_index

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.samples[index]
        image = read_image_rgb(image_path)
        raw = read_mask(label_path)
        if tuple(raw.shape[:2]) != tuple(image.shape[1:]):
            raise ValueError(
                f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[2]} (H x W) but its "
                f"mask {label_path} is {raw.shape[0]}x{raw.shape[1]}; masks must have exactly the image size "
                "(pair the right files and do not resize annotations)"
            )
        label = torch.from_numpy(self.convention.apply(raw, source=str(label_path)))
        sample = {
            "image": image,
            "label": label,
            "image_path": str(image_path),
            "label_path": str(label_path),
        }
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return f"SegmentationDataset(name={self.name!r}, samples={len(self)}, num_classes={self.num_classes})"


FindSamples = Callable[[Path, str], list[tuple[Path, Path]]]


@dataclass(frozen=True)
class DatasetSpec:
    """Describes one dataset layout.

    Attributes:
        name: Dataset name as passed to :func:`build_dataset`.
        class_list: Name of the shipped class list, or None when read from ``root/classes.txt``.
        has_background: Whether train id 0 is a "background" class.
        convention: Label convention, or None when derived from ``root/classes.txt``.
        layout: Human-readable folder layout, shown in error messages.
        find_samples: ``(root, split) -> [(image_path, mask_path), ...]``.
    """

    name: str
    class_list: str | None
    has_background: bool
    convention: LabelConvention | None
    layout: str
    find_samples: FindSamples = field(repr=False)


# ----------------------------------------------------------------------------------------------- layouts

_VOC_LAYOUT = """\
VOCdevkit/VOC2012/                     <- root
  JPEGImages/<id>.jpg
  SegmentationClass/<id>.png           palette PNG: 0 background, 1..20 classes, 255 border
  ImageSets/Segmentation/<split>.txt   one image id per line (train, val, trainval)"""

_VOC_AUG_LAYOUT = """\
VOCdevkit/VOC2012/                     <- root (as made by mmsegmentation's tools/dataset_converters/voc_aug.py)
  JPEGImages/<id>.jpg
  SegmentationClass/<id>.png           VOC masks: 0 background, 1..20 classes, 255 border
  SegmentationClassAug/<id>.png        SBD masks converted to index PNGs (0..20, 255)
  ImageSets/Segmentation/train.txt     VOC train ids (masks from SegmentationClass)
  ImageSets/Segmentation/aug.txt       SBD ids not in VOC train/val (masks from SegmentationClassAug)
  ImageSets/Segmentation/val.txt       VOC val ids (masks from SegmentationClass)
split "train" (alias "train_aug", "trainaug") = train.txt + aug.txt (10582 images, mmseg's
pascal_voc12_aug config); "aug" = aug.txt only; any other split = SegmentationClass + <split>.txt"""

_CONTEXT_LAYOUT = """\
VOCdevkit/VOC2010/                          <- root
  JPEGImages/<id>.jpg
  SegmentationClassContext/<id>.png         0 background, 1..59 classes (59-class masks, as made by
                                            mmsegmentation's tools/dataset_converters/pascal_context.py)
  ImageSets/SegmentationContext/<split>.txt one image id per line (train, val)"""

_COCOSTUFF_LAYOUT = """\
coco_stuff164k/                                          <- root
  images/{train2017,val2017}/<id>.jpg
  annotations/{train2017,val2017}/<id>_labelTrainIds.png 0..170, 255 ignore (as made by mmsegmentation's
                                                         tools/dataset_converters/coco_stuff164k.py)"""

_COCOOBJECT_LAYOUT = """\
coco_stuff164k/                                             <- root
  images/{train2017,val2017}/<id>.jpg
  annotations/{train2017,val2017}/<id>_instanceTrainIds.png 0 background, 1..80 objects, 255 ignore
                                                            (converted from the COCO instance annotations)"""

_CITYSCAPES_LAYOUT = """\
cityscapes/                                                <- root
  leftImg8bit/<split>/<city>/<prefix>_leftImg8bit.png
  gtFine/<split>/<city>/<prefix>_gtFine_labelTrainIds.png  0..18, 255 ignore (as made by cityscapesscripts'
                                                           createTrainIdLabelImgs)"""

_ADE_LAYOUT = """\
ADEChallengeData2016/                          <- root
  images/{training,validation}/<id>.jpg
  annotations/{training,validation}/<id>.png   0 other (ignored), 1..150 classes"""

_FOLDER_LAYOUT = """\
<root>/
  classes.txt           one class name per line (line i = label value i)
  images/<stem>.<ext>   ext: jpg, jpeg, png, bmp, tif, tiff or webp
  masks/<stem>.png      labels 0..C-1, 255 ignore
  <split>.txt           optional, one stem per line; without any split files all images are used"""

_SHAPESWORLD_LAYOUT = """\
<root>/                                        <- written by `clipdense shapesworld generate`
  classes.txt                                  object class names, line i = label value i + 1
  images/{training,validation}/<id>.png
  annotations/{training,validation}/<id>.png   0 background (ignored), 1..C objects"""

_COCO_SPLITS = {"train": "train2017", "val": "val2017", "train2017": "train2017", "val2017": "val2017"}
_VOC_AUG_SPLITS = ("train", "train_aug", "trainaug", "aug")
_ADE_SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


def _few(values: Sequence[Any] | np.ndarray) -> str:
    values = [str(v) for v in list(values)]
    more = f" ... ({len(values)} in total)" if len(values) > _MAX_LISTED else ""
    return "[" + ", ".join(values[:_MAX_LISTED]) + more + "]"


def _require(path: Path, what: str, name: str, layout: str, is_dir: bool = True) -> Path:
    if not (path.is_dir() if is_dir else path.is_file()):
        kind = "folder" if is_dir else "file"
        raise FileNotFoundError(f"{name}: expected {what} {kind} {path} was not found. Expected layout:\n{layout}")
    return path


def _map_split(split: str, mapping: dict[str, str], name: str) -> str:
    if split not in mapping:
        raise ValueError(f"{name}: unknown split {split!r}; use one of {', '.join(sorted(mapping))}")
    return mapping[split]


def _check_pairs(
    pairs: list[tuple[Path, Path]], name: str, split: str, where: Path, layout: str
) -> list[tuple[Path, Path]]:
    if not pairs:
        raise ValueError(
            f"{name}: split {split!r} is empty (no images found under {where}). Expected layout:\n{layout}"
        )
    missing_images = [image for image, _ in pairs if not image.is_file()]
    if missing_images:
        raise FileNotFoundError(
            f"{name}: {len(missing_images)} image(s) of split {split!r} not found: {_few(missing_images)}. "
            f"Expected layout:\n{layout}"
        )
    missing_masks = [(image, mask) for image, mask in pairs if not mask.is_file()]
    if missing_masks:
        listed = _few([f"{image} (expected mask {mask})" for image, mask in missing_masks])
        raise FileNotFoundError(
            f"{name}: {len(missing_masks)} image(s) of split {split!r} have no label mask: {listed}. "
            f"Expected layout:\n{layout}"
        )
    return pairs


def _read_ids(split_file: Path) -> list[str]:
    return [line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _find_with_split_file(
    root: Path, split: str, *, name: str, layout: str, image_dir: str, mask_dir: str, split_dir: str
) -> list[tuple[Path, Path]]:
    images = _require(root / image_dir, "image", name, layout)
    masks = _require(root / mask_dir, "mask", name, layout)
    split_file = _require(root / split_dir / f"{split}.txt", "split", name, layout, is_dir=False)
    pairs = [(images / f"{i}.jpg", masks / f"{i}.png") for i in _read_ids(split_file)]
    return _check_pairs(pairs, name, split, split_file, layout)


def _find_voc_aug(root: Path, split: str, *, name: str, layout: str) -> list[tuple[Path, Path]]:
    if split not in _VOC_AUG_SPLITS:
        return _find_with_split_file(root, split, name=name, layout=layout, **_VOC_DIRS)
    images = _require(root / "JPEGImages", "image", name, layout)
    split_dir = root / "ImageSets" / "Segmentation"
    aug_masks = _require(root / "SegmentationClassAug", "mask", name, layout)
    aug_file = _require(split_dir / "aug.txt", "split", name, layout, is_dir=False)
    pairs: list[tuple[Path, Path]] = []
    voc_ids: set[str] = set()
    if split != "aug":
        voc_masks = _require(root / "SegmentationClass", "mask", name, layout)
        voc_list = list(dict.fromkeys(_read_ids(_require(split_dir / "train.txt", "split", name, layout, False))))
        voc_ids = set(voc_list)
        pairs += [(images / f"{i}.jpg", voc_masks / f"{i}.png") for i in voc_list]
    # An id listed in both files keeps its finer VOC annotation (mmseg's aug.txt excludes VOC train ids anyway).
    aug_ids = [i for i in dict.fromkeys(_read_ids(aug_file)) if i not in voc_ids]
    pairs += [(images / f"{i}.jpg", aug_masks / f"{i}.png") for i in aug_ids]
    return _check_pairs(pairs, name, split, split_dir, layout)


def _find_coco(root: Path, split: str, *, name: str, layout: str, mask_suffix: str) -> list[tuple[Path, Path]]:
    folder = _map_split(split, _COCO_SPLITS, name)
    images = _require(root / "images" / folder, "image", name, layout)
    masks = _require(root / "annotations" / folder, "annotation", name, layout)
    pairs = [(image, masks / f"{image.stem}{mask_suffix}") for image in sorted(images.glob("*.jpg"))]
    return _check_pairs(pairs, name, split, images, layout)


def _find_cityscapes(root: Path, split: str, *, name: str, layout: str) -> list[tuple[Path, Path]]:
    images = _require(root / "leftImg8bit" / split, "image", name, layout)
    masks = _require(root / "gtFine" / split, "annotation", name, layout)
    suffix = "_leftImg8bit.png"
    pairs = []
    for image in sorted(images.glob(f"*/*{suffix}")):
        prefix = image.name[: -len(suffix)]
        pairs.append((image, masks / image.parent.name / f"{prefix}_gtFine_labelTrainIds.png"))
    return _check_pairs(pairs, name, split, images, layout)


def _find_ade(root: Path, split: str, *, name: str, layout: str, image_suffix: str = ".jpg") -> list[tuple[Path, Path]]:
    folder = _map_split(split, _ADE_SPLITS, name)
    images = _require(root / "images" / folder, "image", name, layout)
    masks = _require(root / "annotations" / folder, "annotation", name, layout)
    pairs = [(image, masks / f"{image.stem}.png") for image in sorted(images.glob(f"*{image_suffix}"))]
    return _check_pairs(pairs, name, split, images, layout)


def _find_folder(root: Path, split: str, *, name: str, layout: str) -> list[tuple[Path, Path]]:
    images_dir = _require(root / "images", "image", name, layout)
    masks = _require(root / "masks", "mask", name, layout)
    by_stem: dict[str, Path] = {}
    for image in sorted(images_dir.iterdir()):
        if image.is_file() and image.suffix.lower() in IMAGE_EXTENSIONS:
            if image.stem in by_stem:
                raise ValueError(
                    f"{name}: images {by_stem[image.stem]} and {image} share the stem {image.stem!r}; "
                    "masks are matched by stem, so rename or remove one of them"
                )
            by_stem[image.stem] = image
    split_file = root / f"{split}.txt"
    if split_file.is_file():
        stems = _read_ids(split_file)
        unknown = [stem for stem in stems if stem not in by_stem]
        if unknown:
            raise FileNotFoundError(
                f"{name}: {len(unknown)} stem(s) listed in {split_file} have no image in {images_dir}: "
                f"{_few(unknown)}. Expected layout:\n{layout}"
            )
        where = split_file
    else:
        other_splits = sorted(p.name for p in root.glob("*.txt") if p.name != "classes.txt")
        if other_splits:
            raise FileNotFoundError(
                f"{name}: split file {split_file} not found, but {', '.join(other_splits)} exist; create "
                "it or pick an existing split (without any split files all images form every split)"
            )
        stems, where = sorted(by_stem), images_dir
    pairs = [(by_stem[stem], masks / f"{stem}.png") for stem in stems]
    return _check_pairs(pairs, name, split, where, layout)


def _spec(
    name: str,
    class_list: str | None,
    has_background: bool,
    convention: LabelConvention | None,
    layout: str,
    find: Callable[..., list[tuple[Path, Path]]],
    **find_kwargs: str,
) -> DatasetSpec:
    return DatasetSpec(
        name,
        class_list,
        has_background,
        convention,
        layout,
        partial(find, name=name, layout=layout, **find_kwargs),
    )


_VOC_DIRS = {
    "image_dir": "JPEGImages",
    "mask_dir": "SegmentationClass",
    "split_dir": "ImageSets/Segmentation",
}
_CONTEXT_DIRS = {
    "image_dir": "JPEGImages",
    "mask_dir": "SegmentationClassContext",
    "split_dir": "ImageSets/SegmentationContext",
}

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _spec("voc21", "voc21", True, LabelConvention(21), _VOC_LAYOUT, _find_with_split_file, **_VOC_DIRS),
        _spec(
            "voc20",
            "voc20",
            False,
            LabelConvention(20, reduce_zero_label=True),
            _VOC_LAYOUT,
            _find_with_split_file,
            **_VOC_DIRS,
        ),
        _spec("voc21aug", "voc21", True, LabelConvention(21), _VOC_AUG_LAYOUT, _find_voc_aug),
        _spec(
            "context60",
            "context60",
            True,
            LabelConvention(60),
            _CONTEXT_LAYOUT,
            _find_with_split_file,
            **_CONTEXT_DIRS,
        ),
        _spec(
            "context59",
            "context59",
            False,
            LabelConvention(59, reduce_zero_label=True),
            _CONTEXT_LAYOUT,
            _find_with_split_file,
            **_CONTEXT_DIRS,
        ),
        _spec(
            "cocostuff171",
            "cocostuff171",
            False,
            LabelConvention(171),
            _COCOSTUFF_LAYOUT,
            _find_coco,
            mask_suffix="_labelTrainIds.png",
        ),
        _spec(
            "cocoobject",
            "cocoobject",
            True,
            LabelConvention(81),
            _COCOOBJECT_LAYOUT,
            _find_coco,
            mask_suffix="_instanceTrainIds.png",
        ),
        _spec("cityscapes", "cityscapes", False, LabelConvention(19), _CITYSCAPES_LAYOUT, _find_cityscapes),
        _spec("ade20k", "ade20k", False, LabelConvention(150, reduce_zero_label=True), _ADE_LAYOUT, _find_ade),
        _spec("folder", None, False, None, _FOLDER_LAYOUT, _find_folder),
        _spec("shapesworld", None, False, None, _SHAPESWORLD_LAYOUT, _find_ade, image_suffix=".png"),
    )
}


#: The detection / instance segmentation dataset name: the COCO instances layout (``clipdense.data.detection``).
DETECTION_DATASET = "coco"


def list_datasets() -> list[str]:
    """Returns the names accepted by :func:`build_dataset`."""
    return list(DATASETS)


def build_dataset(name: str, root: str | Path, split: str = "val") -> SegmentationDataset:
    """Builds a dataset reader for one of the standard layouts.

    Args:
        name: One of :func:`list_datasets` (see :data:`DATASETS` for layouts).
        root: The dataset's own top folder, e.g. ``data/VOCdevkit/VOC2012``.
        split: Split name, e.g. ``"val"`` or ``"train"``.

    Returns:
        The dataset, with ``class_names`` from the shipped list (``folder``: from ``root/classes.txt``).

    Raises:
        ValueError: On an unknown dataset or split name, or an empty split.
        FileNotFoundError: If a folder or file of the layout is missing, or an image has no mask.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{name}: dataset root {root} does not exist or is not a folder. Expected layout:\n{spec.layout}"
        )
    if spec.class_list is None:
        class_file = _require(root / "classes.txt", "class list", name, spec.layout, is_dir=False)
        class_names = read_class_file(class_file)
        # ShapesWorld stores objects as 1..C with 0 = background, like ADE20K.
        convention = LabelConvention(len(class_names), reduce_zero_label=name == "shapesworld")
    else:
        assert spec.convention is not None
        class_names, convention = load_classnames(spec.class_list), spec.convention
    samples = spec.find_samples(root, split)
    return SegmentationDataset(samples, class_names, convention, name=name)
