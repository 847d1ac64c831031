"""Seen/unseen metrics of zero-shot semantic segmentation (as reported by MaskCLIP+, Zhou et al., ECCV 2022).

hIoU is the harmonic mean of the seen and unseen mIoU, 2 * s * u / (s + u).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from clipdense.evaluation.metrics import SegmentationReport


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def seen_unseen_report(report: SegmentationReport | Sequence[float], unseen: Sequence[int]) -> dict[str, float]:
    """mIoU over seen classes, unseen classes, all classes, and their harmonic mean.

    Args:
        report: A :class:`SegmentationReport` or C per-class IoUs (percent; NaN where undefined, skipped).
        unseen: Indices of the unseen classes.

    Returns:
        ``miou_seen``, ``miou_unseen``, ``miou``, ``hiou`` (NaN where undefined; hIoU is 0 if either is 0).
    """
    ious = list(report.per_class_iou if isinstance(report, SegmentationReport) else report)
    unseen = set(int(i) for i in unseen)
    if any(i < 0 or i >= len(ious) for i in unseen):
        raise ValueError(f"unseen indices {sorted(unseen)} out of range for {len(ious)} classes")
    seen_m = _mean([v for i, v in enumerate(ious) if i not in unseen])
    unseen_m = _mean([v for i, v in enumerate(ious) if i in unseen])
    if math.isnan(seen_m) or math.isnan(unseen_m):
        hiou = float("nan")
    else:
        hiou = 2 * seen_m * unseen_m / (seen_m + unseen_m) if seen_m + unseen_m > 0 else 0.0
    return {"miou_seen": seen_m, "miou_unseen": unseen_m, "miou": _mean(ious), "hiou": hiou}
