"""COCO box / mask AP of torchvision-style detectors with pycocotools (DenseCLIP Tables 3-4).

The model contract is torchvision's: in eval mode ``model(list_of_images)`` returns one dict per image with
``"boxes"`` (N x 4 XYXY pixels), ``"scores"`` (N), ``"labels"`` (N, contiguous 0..K-1) and, for instance
segmentation, ``"masks"`` (N x 1 x H x W probabilities). Predictions are converted to COCO result entries and
scored with the official ``COCOeval``; AP values are percentages (0-100) like the papers' tables, NaN where
COCOeval has nothing to score (e.g. APl when no ground-truth object is large).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from tqdm import tqdm

from clipdense.fileio import atomic_write_json

METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""Names of ``COCOeval.stats[0:6]`` in order."""

IOU_TYPES: tuple[str, ...] = ("bbox", "segm")


def detections_to_coco(
    output: dict[str, torch.Tensor],
    image_id: int,
    category_ids: Sequence[int],
    with_masks: bool,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Converts one image's detector output to COCO result entries.

    Args:
        output: ``"boxes"`` N x 4 XYXY in the image's pixel coordinates, ``"scores"`` N, ``"labels"`` N contiguous
            class indices 0..K-1, and when ``with_masks`` ``"masks"`` N x 1 x H x W (or N x H x W) probabilities at
            the image size.
        image_id: COCO id of the image.
        category_ids: Sorted COCO category ids; contiguous label ``i`` is category ``category_ids[i]``.
        with_masks: Whether to add a ``"segmentation"`` RLE of ``mask > mask_threshold`` to each entry.
        mask_threshold: Probability above which a mask pixel is foreground.

    Returns:
        One dict per detection: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` (floats), ``score`` and,
        with masks, ``segmentation`` (compressed RLE with ``counts`` as str, so it can be written to JSON).

    Raises:
        ValueError: On a label outside ``0..K-1``, mismatched lengths, or missing masks when ``with_masks``.
    """
    boxes = output["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
    scores = output["scores"].detach().to("cpu", torch.float64).reshape(-1)
    labels = output["labels"].detach().to("cpu", torch.int64).reshape(-1)
    n = boxes.shape[0]
    if scores.numel() != n or labels.numel() != n:
        raise ValueError(f"image {image_id}: got {n} boxes, {scores.numel()} scores and {labels.numel()} labels")
    if n and (labels.min() < 0 or labels.max() >= len(category_ids)):
        bad = sorted({int(v) for v in labels if not 0 <= v < len(category_ids)})[:5]
        raise ValueError(
            f"image {image_id}: labels {bad} outside 0..{len(category_ids) - 1}; the model must predict contiguous "
            f"labels for the dataset's {len(category_ids)} categories (no background class)"
        )
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    results = [
        {"image_id": int(image_id), "category_id": int(category_ids[label]), "bbox": box, "score": score}
        for box, score, label in zip(xywh, scores.tolist(), labels.tolist(), strict=True)
    ]
    if not with_masks:
        return results
    if "masks" not in output:
        raise ValueError(f"image {image_id}: with_masks=True but the output has no 'masks' (keys: {sorted(output)})")
    masks = output["masks"].detach()
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"image {image_id}: masks must be N x 1 x H x W, got {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.dim() != 3 or masks.shape[0] != n:
        raise ValueError(f"image {image_id}: expected {n} masks N x 1 x H x W, got {tuple(output['masks'].shape)}")
    if n == 0:
        return results
    binary = (masks > mask_threshold).to("cpu", torch.uint8).numpy()
    # pycocotools wants H x W x N in Fortran order.
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for entry, rle in zip(results, rles, strict=True):
        rle["counts"] = rle["counts"].decode("ascii")
        entry["segmentation"] = rle
    return results


def coco_evaluate(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    image_ids: Iterable[int],
    iou_types: Sequence[str] = ("bbox",),
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """Runs ``COCOeval`` on results restricted to some images.

    ``results`` is not modified (``loadRes`` writes into the dicts, so it gets a copy). For ``"segm"`` the ``bbox``
    field is dropped first, as in detectron2 and mmdetection: otherwise ``loadRes`` takes the box area as the
    detection's area and the small / medium / large split of mask AP would use box areas.

    Args:
        coco_gt: Ground truth.
        results: COCO result entries (see :func:`detections_to_coco`); may be empty.
        image_ids: Images to score (``params.imgIds``); images without detections count as all misses.
        iou_types: Any of ``"bbox"``, ``"segm"``.
        verbose: Let pycocotools print its progress and summary.

    Returns:
        ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}`` in percent; NaN where COCOeval reports -1 (no
        ground truth in that area range). With no results every defined value is 0.

    Raises:
        ValueError: On an unknown IoU type, no image ids, or segm without ``segmentation`` in the results.
    """
    image_ids = sorted({int(i) for i in image_ids})
    if not image_ids:
        # COCOeval treats an empty imgIds as "all images", which would silently score the whole set.
        raise ValueError("no image ids to evaluate")
    out = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unknown iou type '{iou_type}'; use one of {IOU_TYPES}")
        dets = copy.deepcopy(results)
        if iou_type == "segm":
            if any("segmentation" not in d for d in dets):
                raise ValueError("segm evaluation needs a 'segmentation' in every result (a model with masks)")
            for d in dets:
                d.pop("bbox", None)
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
            if dets:
                coco_dt = coco_gt.loadRes(dets)
            else:
                # loadRes indexes results[0]; an empty result set scores as all misses.
                coco_dt = COCO()
                coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": []}
                coco_dt.dataset["categories"] = copy.deepcopy(coco_gt.dataset.get("categories", []))
                coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        out[iou_type] = {
            name: 100.0 * float(v) if v >= 0 else math.nan
            for name, v in zip(METRIC_NAMES, evaluator.stats[: len(METRIC_NAMES)], strict=True)
        }
    return out


@dataclass
class DetectionReport:
    """COCO AP of a detector; values in percent, NaN where COCOeval has nothing to score.

    Attributes:
        bbox: Box AP: ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``.
        segm: Mask AP with the same keys, None for box-only models.
        num_images: Images evaluated.
        num_detections: Detections scored (over all images).
    """

    bbox: dict[str, float]
    segm: dict[str, float] | None = None
    num_images: int = 0
    num_detections: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-safe dict of all fields (NaN becomes None)."""
        return {
            "bbox": {k: _json_float(v) for k, v in self.bbox.items()},
            "segm": None if self.segm is None else {k: _json_float(v) for k, v in self.segm.items()},
            "num_images": self.num_images,
            "num_detections": self.num_detections,
        }

    def format(self, digits: int = 1) -> str:
        """Formats the rows bbox / segm with columns AP AP50 AP75 APs APm APl, as in DenseCLIP's Tables 3-4.

        Args:
            digits: Decimals shown.

        Returns:
            The table followed by a line with the image and detection counts; undefined values show ``-``.
        """
        rows = [("bbox", self.bbox)] + ([("segm", self.segm)] if self.segm is not None else [])
        cells = [[_fmt(values.get(name, math.nan), digits) for name in METRIC_NAMES] for _, values in rows]
        width = max(len(name) for name in METRIC_NAMES)
        width = max(width, *(len(c) for row in cells for c in row))
        lines = ["Type  " + "  ".join(f"{name:>{width}}" for name in METRIC_NAMES)]
        lines.append("-" * len(lines[0]))
        for (kind, _), row in zip(rows, cells, strict=True):
            lines.append(f"{kind:<4}  " + "  ".join(f"{c:>{width}}" for c in row))
        lines.append("-" * len(lines[0]))
        lines.append(f"images: {self.num_images}  detections: {self.num_detections}")
        return "\n".join(lines)

    def save_json(self, path: str | Path) -> None:
        """Writes :meth:`to_dict` as JSON, atomically (temporary file in the same folder, then rename).

        Args:
            path: Destination file; its folder must exist.
        """
        atomic_write_json(path, self.to_dict(), indent=2)


@torch.no_grad()
def evaluate_detection(
    model: nn.Module,
    dataset,
    device: torch.device | str = "cpu",
    progress: bool = True,
    limit: int | None = None,
    batch_size: int = 1,
    results_path: str | Path | None = None,
) -> DetectionReport:
    """Box (and mask) COCO AP of a detector on a COCO-style dataset.

    Dataset errors propagate; the caller decides whether to skip or stop.

    Args:
        model: Detector; ``model(list of 3 x H x W float images)`` returns one dict per image with ``"boxes"``
            N x 4 XYXY pixels, ``"scores"`` N, ``"labels"`` N contiguous 0..K-1 and, when ``model.with_masks``,
            ``"masks"`` N x 1 x H x W probabilities. Put in eval mode here.
        dataset: Has ``coco`` (ground-truth ``COCO``), ``category_ids`` (sorted, label ``i`` <-> ``category_ids[i]``)
            and items ``{"image": 3 x H x W float in [0, 1] at the original size, "target": {"image_id", ...}}``.
        device: Where the model runs.
        progress: Show a tqdm bar.
        limit: Evaluate only the first ``limit`` images.
        batch_size: Images per model call.
        results_path: If given, the raw COCO results (JSON list) are written there atomically.

    Returns:
        The report; ``segm`` is None for box-only models.

    Raises:
        ValueError: On an empty selection, an image id unknown to the ground truth, or an image whose size differs
            from its annotation (boxes would be in the wrong coordinates).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count <= 0:
        raise ValueError(f"nothing to evaluate: dataset has {len(dataset)} images and limit={limit}")
    with_masks = bool(getattr(model, "with_masks", False))
    coco_gt, category_ids = dataset.coco, list(dataset.category_ids)
    model.eval()
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    bar = tqdm(total=count, desc="eval", unit="img", disable=not progress)
    for start in range(0, count, batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        ids = [_image_id(sample, coco_gt) for sample in samples]
        images = [sample["image"].to(device) for sample in samples]
        outputs = model(images)
        if len(outputs) != len(images):
            raise ValueError(f"model returned {len(outputs)} outputs for {len(images)} images")
        for image_id, output in zip(ids, outputs, strict=True):
            results += detections_to_coco(output, image_id, category_ids, with_masks)
        image_ids += ids
        bar.update(len(samples))
    bar.close()
    if results_path is not None:
        atomic_write_json(results_path, results)
    metrics = coco_evaluate(coco_gt, results, image_ids, ("bbox", "segm") if with_masks else ("bbox",))
    return DetectionReport(
        bbox=metrics["bbox"], segm=metrics.get("segm"), num_images=len(image_ids), num_detections=len(results)
    )


def _image_id(sample: dict[str, Any], coco_gt: COCO) -> int:
    """The sample's COCO image id, checked against the ground truth's image record."""
    image_id = int(sample["target"]["image_id"])
    info = coco_gt.imgs.get(image_id)
    if info is None:
        raise ValueError(f"image id {image_id} is not in the ground-truth COCO; check the dataset's annotation file")
    size = tuple(sample["image"].shape[-2:])
    expected = (info.get("height"), info.get("width"))
    if None not in expected and size != expected:
        raise ValueError(
            f"image {image_id} is {size[0]}x{size[1]} but its annotation says {expected[0]}x{expected[1]}; "
            "evaluate at the original size (the eval transform must not resize)"
        )
    return image_id


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"
