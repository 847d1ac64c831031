"""Segmentation evaluation on a dataset, mIoU / mAcc / aAcc / fwIoU: trained models and training-free predictors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

from clipdense.config import EvalConfig
from clipdense.evaluation.metrics import SegmentationMetric, SegmentationReport
from clipdense.inference.sliding import predict_dense


def evaluate(
    model: nn.Module, dataset, cfg: EvalConfig, device: torch.device | str = "cpu", progress: bool = True
) -> SegmentationReport:
    """mIoU / mAcc / aAcc / fwIoU of a model on a dataset (items with "image" uint8 and "label")."""
    model.eval()
    metric = SegmentationMetric(dataset.num_classes, dataset.ignore_index, class_names=list(dataset.class_names))
    count = len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
    for i in tqdm(range(count), desc="eval", unit="img", disable=not progress):
        sample = dataset[i]
        labels = predict_dense(model, sample["image"].to(device), cfg).labels
        metric.update(labels.cpu(), sample["label"])
    return metric.compute()


def evaluate_predictor(
    predictor,
    dataset,
    limit: int | None = None,
    corruption: str | None = None,
    severity: int | None = None,
    seed: int = 0,
    progress: bool = True,
    classes: Sequence[str] | None = None,
    background_index: int | None = None,
) -> SegmentationReport:
    """mIoU / mAcc / aAcc / fwIoU of a training-free predictor on a dataset, optionally under a corruption.

    What ``clipdense eval-zeroshot`` runs. The predictor's classes are set to the dataset's. With a corruption,
    image ``i`` is corrupted with seed ``seed + i``, as :func:`~clipdense.evaluation.robustness.robustness_sweep`
    does, so the two agree.

    Args:
        predictor: An :class:`~clipdense.inference.OpenVocabPredictor` (``set_classes``, ``set_image``,
            ``predict``).
        dataset: A :class:`~clipdense.data.datasets.SegmentationDataset`; samples give ``image``
            (3 x H x W uint8) and ``label`` (H x W int64).
        limit: Evaluate only the first N images.
        corruption: An ImageNet-C corruption (one of :data:`~clipdense.evaluation.robustness.CORRUPTIONS`)
            applied to every image, or None.
        severity: Its severity, 1 to 5 (with ``corruption`` only).
        seed: Base seed of the corruption.
        progress: Show a tqdm progress bar.
        classes: The class entries to segment with, in the dataset's label order (e.g. an official class-name
            file with synonyms); default: the dataset's names. The report names the dataset's classes.
        background_index: The entry of ``classes`` that is the background, whatever its words.

    Returns:
        The report, over ``min(limit, len(dataset))`` images.

    Raises:
        ValueError: If the predictor's class count differs from the dataset's (a background threshold on a
            dataset without a ``background`` class), or on a corruption without a severity or vice versa.
        ModuleNotFoundError: With a corruption, if the corruption package is not installed.
    """
    if (corruption is None) != (severity is None):
        raise ValueError("a corruption needs a severity (1..5), and a severity needs a corruption")
    name = getattr(dataset, "name", "the dataset")
    if classes is not None and len(classes) != dataset.num_classes:
        raise ValueError(f"{name} has {dataset.num_classes} classes but {len(classes)} class entries were given")
    extra = {} if background_index is None else {"background_index": background_index}
    names = predictor.set_classes(dataset.class_names if classes is None else classes, **extra)
    if classes is not None and len(names) == dataset.num_classes:
        names = list(dataset.class_names)
    if len(names) != dataset.num_classes:
        raise ValueError(
            f"{name} has {dataset.num_classes} classes but the predictor has {len(names)}: "
            "a background threshold needs a dataset whose class list starts with 'background'"
        )
    metric = SegmentationMetric(dataset.num_classes, ignore_index=dataset.ignore_index, class_names=names)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for i in tqdm(range(count), desc=f"eval {name}", unit="img", disable=not progress):
        sample = dataset[i]
        image = sample["image"]
        if corruption is not None:
            from clipdense.evaluation.robustness import corrupt

            # Per-image seed = seed + index, as in `robustness_sweep`, so the two agree.
            image = corrupt(image.permute(1, 2, 0).numpy(), corruption, severity, seed + i)
        predictor.set_image(image)
        metric.update(predictor.predict().labels, sample["label"])
    return metric.compute()
