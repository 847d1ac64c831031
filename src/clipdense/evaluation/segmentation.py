"""Evaluation of trained segmentation models on a dataset: mIoU / mAcc / aAcc / fwIoU."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from clipdense.config import EvalConfig
from clipdense.evaluation.metrics import SegmentationMetric, SegmentationReport
from clipdense.inference.sliding import predict_probs


def evaluate(
    model: nn.Module, dataset, cfg: EvalConfig, device: torch.device | str = "cpu", progress: bool = True
) -> SegmentationReport:
    """mIoU / mAcc / aAcc / fwIoU of a model on a dataset (items with "image" uint8 and "label")."""
    model.eval()
    metric = SegmentationMetric(dataset.num_classes, dataset.ignore_index, class_names=list(dataset.class_names))
    count = len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
    for i in tqdm(range(count), desc="eval", unit="img", disable=not progress):
        sample = dataset[i]
        probs = predict_probs(model, sample["image"].to(device), cfg)
        metric.update(probs.argmax(0).cpu(), sample["label"])
    return metric.compute()
