"""Semantic-segmentation metrics from an accumulated confusion matrix.

Definitions follow mmsegmentation: per-class IoU = TP / (TP + FP + FN), per-class accuracy = TP / (TP + FN),
mIoU / mAcc are NaN-means over classes, aAcc = sum(TP) / #labelled pixels, fwIoU = sum_c freq_c * IoU_c with
freq_c the fraction of labelled pixels whose ground truth is c. All values are percentages (0-100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipdense.fileio import atomic_write_json


@dataclass
class SegmentationReport:
    """Result of :meth:`SegmentationMetric.compute`; all values in percent.

    Attributes:
        miou: Mean IoU over classes with a defined IoU.
        macc: Mean per-class accuracy over classes with ground truth.
        aacc: Overall pixel accuracy.
        fwiou: Frequency-weighted IoU.
        per_class_iou: IoU per class, NaN where the class has neither ground truth nor predictions.
        per_class_acc: Accuracy per class, NaN where the class has no ground truth.
        class_names: One name per class.
    """

    miou: float
    macc: float
    aacc: float
    fwiou: float
    per_class_iou: list[float]
    per_class_acc: list[float]
    class_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-safe dict of all fields (NaN becomes None)."""
        return {
            "miou": _json_float(self.miou),
            "macc": _json_float(self.macc),
            "aacc": _json_float(self.aacc),
            "fwiou": _json_float(self.fwiou),
            "per_class_iou": [_json_float(v) for v in self.per_class_iou],
            "per_class_acc": [_json_float(v) for v in self.per_class_acc],
            "class_names": list(self.class_names),
        }

    def format_table(self, digits: int = 2) -> str:
        """Formats a plain-text table of per-class IoU and accuracy, followed by a summary line.

        Args:
            digits: Decimals shown.

        Returns:
            The table; classes without a defined value show ``-``.
        """
        names = self.class_names or [str(i) for i in range(len(self.per_class_iou))]
        iou = [_fmt(v, digits) for v in self.per_class_iou]
        acc = [_fmt(v, digits) for v in self.per_class_acc]
        name_width = max(len("Class"), *(len(n) for n in names))
        value_width = max(len("IoU"), *(len(v) for v in iou + acc))
        rows = [f"{'Class':<{name_width}}  {'IoU':>{value_width}}  {'Acc':>{value_width}}"]
        rows.append("-" * len(rows[0]))
        rows += [
            f"{n:<{name_width}}  {i:>{value_width}}  {a:>{value_width}}"
            for n, i, a in zip(names, iou, acc, strict=True)
        ]
        rows.append("-" * len(rows[0]))
        rows.append(
            f"mIoU: {_fmt(self.miou, digits)}  mAcc: {_fmt(self.macc, digits)}  "
            f"aAcc: {_fmt(self.aacc, digits)}  fwIoU: {_fmt(self.fwiou, digits)}"
        )
        return "\n".join(rows)

    def save_json(self, path: str | Path) -> None:
        """Writes :meth:`to_dict` as JSON, atomically (temporary file in the same folder, then rename).

        Args:
            path: Destination file; its folder must exist.
        """
        atomic_write_json(path, self.to_dict(), indent=2)


class SegmentationMetric:
    """Accumulates a confusion matrix over batches of predictions.

    Args:
        num_classes: Number of classes C.
        ignore_index: Ground-truth value whose pixels are excluded.
        class_names: Optional names for the report (defaults to ``"0"``, ``"1"``, ...).

    Attributes:
        confusion: ``[C, C]`` int64 CPU tensor; ``confusion[t, p]`` counts pixels with ground truth ``t``
            predicted as ``p``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for num_classes={num_classes}; they must match")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Clears the accumulated counts."""
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch to the confusion matrix.

        Args:
            pred: Predicted class ids ``[H, W]`` or ``[B, H, W]`` (integer; take the argmax of logits first).
            target: Ground truth of the same shape; ``ignore_index`` pixels are skipped.

        Raises:
            ValueError: On a shape mismatch, floating-point predictions, or ids outside ``0..C-1``.
        """
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape or pred.dim() not in (2, 3):
            raise ValueError(
                f"pred and target must both be [H, W] or [B, H, W] with equal shapes, got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}; for logits [B, C, H, W] pass argmax(1)"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must hold integer class ids; for logits pass logits.argmax(1)")
        target = target.to(pred.device).long()
        valid = target != self.ignore_index
        t, p = target[valid], pred[valid].long()
        c = self.num_classes
        for what, values in (("target", t), ("pred", p)):
            bad = (values < 0) | (values >= c)
            if bad.any():
                found = torch.unique(values[bad])[:5].tolist()
                raise ValueError(
                    f"{what} contains class ids {found} outside 0..{c - 1} "
                    f"(ignore_index={self.ignore_index}); check num_classes and the label convention"
                )
        counts = torch.bincount(t * c + p, minlength=c * c)
        self.confusion += counts.reshape(c, c).cpu()

    def compute(self) -> SegmentationReport:
        """Computes the metrics from the counts so far.

        Returns:
            The report (values in percent).
        """
        conf = self.confusion.double()
        tp = conf.diagonal()
        gt = conf.sum(1)
        union = gt + conf.sum(0) - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        total = gt.sum()
        if total > 0:
            aacc = (tp.sum() / total).item()
            freq = gt / total
            fwiou = (freq[gt > 0] * iou[gt > 0]).sum().item()
        else:
            aacc = fwiou = float("nan")
        return SegmentationReport(
            miou=100 * torch.nanmean(iou).item(),
            macc=100 * torch.nanmean(acc).item(),
            aacc=100 * aacc,
            fwiou=100 * fwiou,
            per_class_iou=(100 * iou).tolist(),
            per_class_acc=(100 * acc).tolist(),
            class_names=list(self.class_names),
        )


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"
