"""COCO-style instance detection data (boxes, labels, optional masks) for torchvision detectors.

:class:`CocoDetection` reads the standard COCO layout through pycocotools and yields
``{"image": tv_tensors.Image uint8 3 x H x W, "target": {"boxes": BoundingBoxes N x 4 XYXY, "labels": int64 N,
"masks": Mask uint8 N x H x W (optional), "image_id": int}}``. The annotations are checked once when the dataset
is built (boxes clipped to the image, degenerate boxes and crowd regions left out, unknown category/image ids
reported), so a training run never sees a box that torchvision's detectors would reject.

Labels are contiguous ``0..K-1`` (``category_ids[i]`` is the COCO id of label ``i``), as
:class:`clipdense.models.detectors.CLIPDetector` takes them (it shifts them for R-CNN's background class).

:func:`build_detection_train_transform` and :func:`build_detection_eval_transform` are
:mod:`torchvision.transforms.v2` pipelines on those sample dicts, and :func:`collate_detection` batches them as
lists (images differ in size) for ``model(images, targets)``.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .datasets import read_image_rgb

__all__ = [
    "COCO_LAYOUT",
    "ANNOTATION_PROBLEMS",
    "FATAL_KINDS",
    "PROBLEM_KINDS",
    "CocoDetection",
    "build_detection_dataset",
    "build_detection_eval_transform",
    "build_detection_train_transform",
    "collate_detection",
]

COCO_LAYOUT = """\
<root>/                                   <- e.g. data/coco (or a `clipdense shapesworld generate --format coco` export)
  {train2017,val2017}/<file_name>         images, file_name as in the annotation file
  annotations/instances_{train2017,val2017}.json
                                          COCO instances: "images" (id, file_name, height, width),
                                          "annotations" (id, image_id, category_id, bbox xywh, iscrowd,
                                          segmentation as polygons or RLE), "categories" (id, name)"""

#: Kinds counted in :attr:`CocoDetection.annotation_report`, with what happens to the annotations of each kind.
PROBLEM_KINDS: dict[str, str] = {
    "clipped": "boxes partly outside the image, clipped to it",
    "degenerate": "boxes with zero/negative width or height after clipping (or entirely outside), dropped",
    "crowd": "iscrowd=1 regions, left out of training targets (COCOeval still sees them through .coco)",
    "unknown_category": "category_id not among 'categories', dropped",
    "unknown_image": "image_id not among 'images', dropped",
    "malformed_box": "bbox missing or not 4 finite numbers, dropped",
    "invalid_segmentation": "no polygon with >= 3 points and no RLE of the image size (with_masks only), dropped",
    "empty_images": "images with no training annotation left",
}
#: Kinds that raise unless ``skip_bad_annotations`` (then the annotations are dropped and counted).
FATAL_KINDS: tuple[str, ...] = ("unknown_category", "unknown_image", "malformed_box")
#: Kinds that change or drop an annotation (crowd regions and the images left empty are not problems).
ANNOTATION_PROBLEMS: tuple[str, ...] = tuple(k for k in PROBLEM_KINDS if k not in ("crowd", "empty_images"))
_MAX_EXAMPLES = 3
_SPLIT_ALIASES = {"train": "train2017", "val": "val2017"}


class CocoDetection(Dataset):
    """COCO instances (boxes, labels and optionally masks) in the standard folder layout.

    Annotation file ``root/annotations/instances_{split}.json``, images ``root/{split}/{file_name}``. The
    annotations are checked once here; every kind of :data:`PROBLEM_KINDS` is counted in
    :attr:`annotation_report` and summarised by :meth:`describe_problems`. :attr:`coco` keeps the file
    unchanged (crowd regions and all) as the ground truth for ``COCOeval``.

    Args:
        root: Dataset top folder (see :data:`COCO_LAYOUT`).
        split: Split folder, e.g. ``"train2017"``; ``"train"``/``"val"`` mean ``"train2017"``/``"val2017"``
            when ``instances_{split}.json`` does not exist but the 2017 file does.
        with_masks: Whether targets carry instance masks (Mask R-CNN). Annotations without a usable
            segmentation are then dropped and counted as ``"invalid_segmentation"``.
        transform: Optional callable applied to each sample dict (e.g. :func:`build_detection_train_transform`).
        filter_empty: Remove images left without any training annotation from :attr:`ids` (mmdet's
            ``filter_empty_gt``; keep False for evaluation so every image is scored).
        skip_bad_annotations: Drop and count annotations with an unknown category or image id or a
            malformed bbox instead of raising.

    Attributes:
        coco: The ``pycocotools.coco.COCO`` object of the annotation file.
        class_names: Category names, in category id order (label ``i`` is ``class_names[i]``).
        category_ids: Sorted COCO category ids; label ``i`` is category ``category_ids[i]``.
        ids: Image ids of the samples, ascending.
        samples: ``(image_path,)`` per sample, in :attr:`ids` order.
        annotation_report: Counts: ``"images"`` and ``"annotations"`` in the file, ``"kept"`` annotations used
            as training targets, and one count per kind of :data:`PROBLEM_KINDS`.

    Raises:
        FileNotFoundError: If the root, the annotation file or the image folder is missing.
        ValueError: On an unreadable annotation file, an empty split, an image entry without a size, an
            unknown category/image id or malformed bbox (without ``skip_bad_annotations``), or when
            ``filter_empty`` leaves no image.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train2017",
        with_masks: bool = False,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        filter_empty: bool = True,
        skip_bad_annotations: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"COCO dataset root {self.root} does not exist or is not a folder. Expected layout:\n{COCO_LAYOUT}"
            )
        self.split, self.annotation_file = _resolve_split(self.root, split)
        self.image_dir = self.root / self.split
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"COCO image folder {self.image_dir} (for {self.annotation_file.name}) was not found. "
                f"Expected layout:\n{COCO_LAYOUT}"
            )
        self.with_masks = with_masks
        self.transform = transform
        self.filter_empty = filter_empty
        self.skip_bad_annotations = skip_bad_annotations
        self.coco = _load_coco(self.annotation_file)

        self.category_ids: list[int] = sorted(self.coco.cats)
        if not self.category_ids:
            raise ValueError(
                f"{self.annotation_file}: no 'categories' listed; a COCO instances file needs the category list"
            )
        self.class_names: list[str] = [str(self.coco.cats[c]["name"]) for c in self.category_ids]
        self._label_of = {category: label for label, category in enumerate(self.category_ids)}
        if not self.coco.imgs:
            raise ValueError(
                f"{self.annotation_file}: the split has no images (empty 'images' list); check the annotation file"
            )
        for image_id, info in self.coco.imgs.items():
            if not all(isinstance(info.get(key), int) and info[key] > 0 for key in ("height", "width")):
                raise ValueError(
                    f"{self.annotation_file}: image {image_id} ({info.get('file_name')}) has no positive integer "
                    f"'height'/'width' (got {info.get('height')!r}, {info.get('width')!r}); boxes cannot be "
                    "checked against the image without them"
                )

        self.annotation_report: dict[str, int] = {"images": len(self.coco.imgs), "annotations": 0, "kept": 0}
        self.annotation_report.update(dict.fromkeys(PROBLEM_KINDS, 0))
        self._examples: dict[str, list[int]] = {kind: [] for kind in PROBLEM_KINDS}
        self._targets = self._check_annotations()

        image_ids = sorted(self.coco.imgs)
        empty = [image_id for image_id in image_ids if image_id not in self._targets]
        self.annotation_report["empty_images"] = len(empty)
        self._examples["empty_images"] = empty[:_MAX_EXAMPLES]
        self.ids: list[int] = [i for i in image_ids if i in self._targets] if filter_empty else image_ids
        if not self.ids:
            raise ValueError(
                f"{self.annotation_file}: no image has a usable annotation, so filter_empty=True leaves nothing. "
                f"{self.describe_problems()}"
            )
        self.samples: list[tuple[Path]] = [(self.image_dir / self.coco.imgs[i]["file_name"],) for i in self.ids]

    # ------------------------------------------------------------------------------------------ checks

    def _count(self, kind: str, ann_id: Any, message: str | None = None) -> None:
        """Counts one dropped/changed annotation; raises ``message`` for fatal kinds unless skipping."""
        if message is not None and not self.skip_bad_annotations:
            raise ValueError(
                f"{self.annotation_file}: {message}; fix the annotation file or pass skip_bad_annotations=True "
                "to drop such annotations"
            )
        self.annotation_report[kind] += 1
        if len(self._examples[kind]) < _MAX_EXAMPLES:
            self._examples[kind].append(ann_id)

    def _check_annotations(self) -> dict[int, tuple[np.ndarray, np.ndarray, tuple[int, ...]]]:
        """Checks every annotation of the file; returns ``{image_id: (boxes N x 4, labels N, ann_ids)}``."""
        kept: dict[int, tuple[list[list[float]], list[int], list[int]]] = {}
        known_ids = self.category_ids
        for ann in self.coco.dataset.get("annotations") or []:
            self.annotation_report["annotations"] += 1
            ann_id = ann.get("id")
            image_id = ann.get("image_id")
            info = self.coco.imgs.get(image_id)
            if info is None:
                self._count(
                    "unknown_image",
                    ann_id,
                    f"annotation {ann_id} refers to image_id {image_id!r}, which is not among the "
                    f"{len(self.coco.imgs)} 'images'",
                )
                continue
            category = ann.get("category_id")
            if category not in self._label_of:
                self._count(
                    "unknown_category",
                    ann_id,
                    f"annotation {ann_id} has category_id {category!r}, which is not among the 'categories' "
                    f"(known ids: {known_ids})",
                )
                continue
            if ann.get("iscrowd", 0):
                self._count("crowd", ann_id)
                continue
            box = _xywh_to_xyxy(ann.get("bbox"))
            if box is None:
                self._count(
                    "malformed_box",
                    ann_id,
                    f"annotation {ann_id} has bbox {ann.get('bbox')!r}; expected 4 finite numbers [x, y, w, h]",
                )
                continue
            height, width = info["height"], info["width"]
            clipped = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height)]
            clipped += [min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                self._count("degenerate", ann_id)
                continue
            if self.with_masks and not _segmentation_usable(ann.get("segmentation"), height, width):
                self._count("invalid_segmentation", ann_id)
                continue
            if clipped != box:
                self._count("clipped", ann_id)
            boxes, labels, ann_ids = kept.setdefault(image_id, ([], [], []))
            boxes.append(clipped)
            labels.append(self._label_of[category])
            ann_ids.append(ann_id)
            self.annotation_report["kept"] += 1
        return {
            image_id: (np.asarray(boxes, dtype=np.float32), np.asarray(labels, dtype=np.int64), tuple(ann_ids))
            for image_id, (boxes, labels, ann_ids) in kept.items()
        }

    def describe_problems(self) -> str:
        """Summarises the annotation checks: a header line, then one line per kind found.

        Returns:
            Text such as ``"  clipped: 2 (boxes partly outside the image, clipped to it), e.g. annotation ids
            [4, 17]"``; ``"  no annotation problems found"`` when every count is zero.
        """
        report = self.annotation_report
        lines = [
            f"{self.annotation_file.name}: {report['images']} images, {report['annotations']} annotations, "
            f"{report['kept']} kept as training targets; {len(self.ids)} images used"
        ]
        for kind, meaning in PROBLEM_KINDS.items():
            if report[kind]:
                what = "image ids" if kind == "empty_images" else "annotation ids"
                if kind == "empty_images":
                    meaning += ", removed (filter_empty=True)" if self.filter_empty else ", kept (filter_empty=False)"
                lines.append(f"  {kind}: {report[kind]} ({meaning}), e.g. {what} {self._examples[kind]}")
        if len(lines) == 1:
            lines.append("  no annotation problems found")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------ samples

    @property
    def num_classes(self) -> int:
        """Number of categories K (labels are ``0..K-1``)."""
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Reads one image and its training targets.

        Args:
            index: Sample index (``self.ids[index]`` is the COCO image id).

        Returns:
            ``{"image": tv_tensors.Image uint8 3 x H x W, "target": {"boxes": tv_tensors.BoundingBoxes float32
            N x 4 XYXY (canvas_size (H, W)), "labels": int64 N in 0..K-1, "masks": tv_tensors.Mask uint8
            N x H x W (only with ``with_masks``), "image_id": int}}``, passed through ``transform`` if given.
            N may be 0 (``filter_empty=False``).

        Raises:
            FileNotFoundError: If the image file is missing.
            ValueError: If the image cannot be decoded or its size differs from the annotation file's.
        """
        image_id = self.ids[index]
        (path,) = self.samples[index]
        info = self.coco.imgs[image_id]
        image = read_image_rgb(path)
        height, width = int(image.shape[1]), int(image.shape[2])
        if (height, width) != (info["height"], info["width"]):
            raise ValueError(
                f"size mismatch: image {path} is {height}x{width} (H x W) but {self.annotation_file.name} says "
                f"{info['height']}x{info['width']} for image {image_id}; its boxes would be wrong: restore the "
                "original image file or fix the annotation"
            )
        boxes, labels, ann_ids = self._targets.get(image_id, _NO_TARGETS)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.tensor(labels, dtype=torch.int64).reshape(-1),
            "image_id": int(image_id),
        }
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(self._decode_masks(ann_ids, height, width))
        sample = {"image": tv_tensors.Image(image), "target": target}
        return self.transform(sample) if self.transform is not None else sample

    def _decode_masks(self, ann_ids: Sequence[int], height: int, width: int) -> torch.Tensor:
        """Rasterises the segmentations of ``ann_ids`` as pycocotools' ``annToMask`` does: uint8 N x H x W."""
        masks = [
            mask_utils.decode(_to_rle(self.coco.anns[ann_id]["segmentation"], height, width)) for ann_id in ann_ids
        ]
        if not masks:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        return torch.from_numpy(np.stack(masks).astype(np.uint8, copy=False))

    def __repr__(self) -> str:
        return (
            f"CocoDetection(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
            f"num_classes={self.num_classes}, with_masks={self.with_masks})"
        )


_NO_TARGETS: tuple[np.ndarray, np.ndarray, tuple[int, ...]] = (
    np.zeros((0, 4), dtype=np.float32),
    np.zeros((0,), dtype=np.int64),
    (),
)


def _resolve_split(root: Path, split: str) -> tuple[str, Path]:
    """Returns ``(split folder name, annotation file)``, mapping ``train``/``val`` to the 2017 names if needed."""
    annotations = root / "annotations"
    path = annotations / f"instances_{split}.json"
    if not path.is_file() and split in _SPLIT_ALIASES:
        alias = annotations / f"instances_{_SPLIT_ALIASES[split]}.json"
        if alias.is_file():
            return _SPLIT_ALIASES[split], alias
    if not path.is_file():
        names = [path.name] + ([f"instances_{_SPLIT_ALIASES[split]}.json"] if split in _SPLIT_ALIASES else [])
        found = sorted(p.name for p in annotations.glob("instances_*.json")) if annotations.is_dir() else []
        raise FileNotFoundError(
            f"COCO annotation file {' or '.join(names)} was not found in {annotations} (found there: "
            f"{found or 'nothing'}). Expected layout:\n{COCO_LAYOUT}"
        )
    return split, path


def _load_coco(path: Path) -> Any:
    """Loads an instances file with pycocotools, without its progress prints."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, AssertionError, KeyError, TypeError) as error:  # json.JSONDecodeError is a ValueError
        raise ValueError(
            f"could not read {path} as a COCO instances file ({error!r}); it must be a JSON object with "
            f"'images', 'annotations' and 'categories'. Expected layout:\n{COCO_LAYOUT}"
        ) from error


def _xywh_to_xyxy(bbox: Any) -> list[float] | None:
    """``[x, y, w, h]`` -> ``[x0, y0, x1, y1]``, or None unless ``bbox`` is 4 finite numbers."""
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _valid_polygons(segmentation: list[Any]) -> list[list[float]]:
    # Polygons need >= 3 points (pycocotools would read a 4-number list as a box); detectron2 drops the rest too.
    return [
        list(poly) for poly in segmentation if isinstance(poly, list | tuple) and len(poly) >= 6 and len(poly) % 2 == 0
    ]


def _segmentation_usable(segmentation: Any, height: int, width: int) -> bool:
    """Whether ``segmentation`` holds a polygon with >= 3 points or an RLE of size ``[height, width]``."""
    if isinstance(segmentation, list):
        return bool(_valid_polygons(segmentation))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        return list(segmentation["size"]) == [height, width]
    return False


def _to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Polygons, uncompressed or compressed RLE -> one compressed RLE, as ``COCO.annToRLE`` does."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(_valid_polygons(segmentation), height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


# ---------------------------------------------------------------------------------------------- transforms


def _target_labels(sample: dict[str, Any]) -> torch.Tensor:
    # A module-level function, not a lambda, so that DataLoader workers can pickle the transform.
    return sample["target"]["labels"]


def _to_float_image() -> v2.Transform:
    return v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


def build_detection_train_transform(min_size: int = 800, max_size: int = 1333, flip_prob: float = 0.5) -> v2.Compose:
    """Builds the training augmentation for :class:`CocoDetection` samples (mmdet's 1x detection recipe).

    Steps: keep-ratio resize (short side to ``min_size``, long side capped at ``max_size``: mmdet's
    ``Resize((1333, 800), keep_ratio=True)``) -> horizontal flip -> ``v2.SanitizeBoundingBoxes`` (drops
    boxes under 1 px with their labels and masks) -> image to float32 in [0, 1]. The image is not
    mean/std normalised: torchvision's detectors normalise inside their ``GeneralizedRCNNTransform`` (which
    also resizes to its own ``min_size``/``max_size``: build the model with the same values so that it is a
    no-op). Randomness comes from torch's global RNG only.

    Args:
        min_size: Target short side.
        max_size: Upper bound on the long side.
        flip_prob: Horizontal flip probability.

    Returns:
        A v2 transform mapping a sample (``"image"`` uint8 3 x H x W, ``"target"`` with ``"boxes"`` N x 4,
        ``"labels"`` N, optional ``"masks"`` N x H x W) to the resized sample with ``"image"`` float32
        3 x H' x W' in [0, 1], boxes in the new coordinates and masks uint8 N' x H' x W' (N' <= N).
    """
    if min_size < 1 or max_size <= min_size:
        raise ValueError(f"need 1 <= min_size < max_size, got min_size={min_size}, max_size={max_size}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    return v2.Compose(
        [
            v2.Resize(min_size, max_size=max_size, antialias=True),
            v2.RandomHorizontalFlip(p=flip_prob),
            v2.SanitizeBoundingBoxes(labels_getter=_target_labels),
            _to_float_image(),
        ]
    )


def build_detection_eval_transform() -> v2.Compose:
    """Builds the evaluation transform: the image to float32 in [0, 1], nothing else.

    No resize: the detector's own transform resizes and maps its predictions back to the original size, so
    they can be scored against :attr:`CocoDetection.coco` directly.

    Returns:
        A v2 transform mapping a sample with ``"image"`` uint8 3 x H x W to the same sample with ``"image"``
        float32 3 x H x W in [0, 1]; the target is unchanged.
    """
    return v2.Compose([_to_float_image()])


# ---------------------------------------------------------------------------------------------- batching


def _plain(value: Any) -> Any:
    return value.as_subclass(torch.Tensor) if isinstance(value, tv_tensors.TVTensor) else value


def collate_detection(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Batches detection samples as lists, after dropping the ``None`` entries of :class:`SkipBadSamples`.

    Args:
        batch: Samples ``{"image": 3 x H_i x W_i, "target": {...}}`` (sizes may differ) or None.

    Returns:
        ``{"images": [3 x H_i x W_i plain tensors], "targets": [dicts of plain tensors and "image_id"],
        "skipped": number of None entries}``, ready for ``model(images, targets)``. If every sample was bad,
        ``images`` and ``targets`` are None: the training loop should skip that step.

    Raises:
        TypeError: If a sample is not a dict with ``"image"`` and ``"target"``.
    """
    kept = [sample for sample in batch if sample is not None]
    if any(not isinstance(sample, dict) or "image" not in sample or "target" not in sample for sample in kept):
        raise TypeError("collate_detection expects {'image', 'target'} sample dicts (as CocoDetection returns) or None")
    skipped = len(batch) - len(kept)
    if not kept:
        return {"images": None, "targets": None, "skipped": skipped}
    images = [_plain(sample["image"]) for sample in kept]
    targets = [{key: _plain(value) for key, value in sample["target"].items()} for sample in kept]
    return {"images": images, "targets": targets, "skipped": skipped}


def build_detection_dataset(
    root: str | Path,
    split: str,
    with_masks: bool = False,
    skip_bad_annotations: bool = False,
    filter_empty: bool = True,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> CocoDetection:
    """Builds a :class:`CocoDetection` reader (see there for the arguments and the checks).

    Args:
        root: Dataset top folder with ``annotations/instances_{split}.json`` and ``{split}/``.
        split: ``"train2017"``, ``"val2017"`` (or ``"train"``/``"val"``), or any split with its own file.
        with_masks: Whether targets carry instance masks.
        skip_bad_annotations: Drop and count unknown category/image ids and malformed boxes instead of raising.
        filter_empty: Remove images without any training annotation.
        transform: Optional sample transform.

    Returns:
        The dataset.
    """
    return CocoDetection(
        root,
        split,
        with_masks=with_masks,
        transform=transform,
        filter_empty=filter_empty,
        skip_bad_annotations=skip_bad_annotations,
    )
