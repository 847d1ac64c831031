"""Segmentation evaluation: confusion-matrix metrics and reports."""

from clipdense.evaluation.metrics import SegmentationMetric, SegmentationReport

__all__ = ["SegmentationMetric", "SegmentationReport"]
