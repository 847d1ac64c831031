"""Evaluation of a trained run directory, as ``clipdense eval`` does it.

Segmentors get mIoU / mAcc / aAcc / fwIoU (plus mIoU(seen), mIoU(unseen) and hIoU when the model has unseen
classes), detectors COCO box (and mask) AP. The model and its config come from the run directory
(:func:`clipdense.runs.build_from_run`); the dataset, split and inference settings default to the config's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clipdense.config import ExperimentConfig
from clipdense.data.datasets import DETECTION_DATASET, build_dataset
from clipdense.evaluation.metrics import SegmentationReport
from clipdense.evaluation.segmentation import evaluate
from clipdense.evaluation.zeroshot_split import seen_unseen_report
from clipdense.inference.sliding import prepare_model
from clipdense.runs import build_eval_dataset, build_from_run

if TYPE_CHECKING:
    from clipdense.evaluation.detection import DetectionReport

#: The scales of ``aug=True`` (with flip): DenseCLIP's multi-scale evaluation.
AUG_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclass
class RunEvaluation:
    """What :func:`evaluate_run` returns.

    Attributes:
        run_dir: The run directory.
        checkpoint: The run directory as the report names it.
        task: ``"segmentation"`` or ``"detection"``.
        dataset: Dataset name (detectors: ``"coco"``).
        split: The split evaluated.
        report: A :class:`~clipdense.evaluation.metrics.SegmentationReport` or
            :class:`~clipdense.evaluation.detection.DetectionReport`.
        settings: Segmentation: the inference settings used (``EvalConfig`` fields); None for detectors.
        zero_shot: Segmentation with unseen classes: ``miou_seen``, ``miou_unseen``, ``miou``, ``hiou``; else None.
        root: Detectors: the dataset folder; else None.
        detections_path: Where the raw detections were written (COCO results JSON), or None.
        variant: What differs from the run's own evaluation settings (``"aug"``, ``"whole_limit50"``), or
            ``""``; it names the report file, so a partial or augmented evaluation keeps the full one.
    """

    run_dir: Path
    checkpoint: str
    task: str
    dataset: str
    split: str
    report: SegmentationReport | DetectionReport
    settings: dict[str, Any] | None = None
    zero_shot: dict[str, float] | None = None
    root: str | None = None
    detections_path: Path | None = None
    variant: str = ""

    @property
    def default_path(self) -> Path:
        """Where ``clipdense eval`` writes :meth:`to_dict` unless told:
        ``run_dir/eval_<dataset>_<split>[_<variant>].json``."""
        return self.run_dir / f"eval_{self.dataset}_{self.split}{'_' if self.variant else ''}{self.variant}.json"

    def format(self) -> str:
        """The report as text: the per-class table (and the seen/unseen line), or the COCO AP table."""
        if self.task == "detection":
            return self.report.format()
        text = self.report.format_table()
        if self.zero_shot is not None:
            text += "\n" + "  ".join(f"{k}: {v:.2f}" for k, v in self.zero_shot.items())
        return text

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: run, dataset and settings, then the metrics (``settings`` may hold tuples)."""
        if self.task == "detection":
            head = {"checkpoint": self.checkpoint, "dataset": self.dataset, "root": self.root, "split": self.split}
            return {**head, **self.report.to_dict()}
        payload = {"checkpoint": self.checkpoint, "dataset": self.dataset, "settings": self.settings}
        payload.update(self.report.to_dict())
        if self.zero_shot is not None:
            payload["zero_shot"] = self.zero_shot
        return payload


def evaluate_run(
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    *,
    dataset: str | None = None,
    root: str | None = None,
    split: str | None = None,
    mode: str | None = None,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    aug: bool = False,
    limit: int | None = None,
    save_detections: bool = False,
    progress: bool = True,
) -> RunEvaluation:
    """Evaluate the latest checkpoint of a ``clipdense train`` run on its validation data (or another dataset).

    Args:
        run_dir: The run directory (``config.yaml`` and ``checkpoints/``).
        device: Where the model runs.
        dataset: Dataset name (default: the config's); detectors take only ``"coco"``.
        root: Dataset folder (default: the config's).
        split: Split (default: the config's ``data.val_split``).
        mode: Segmentation: ``"slide"`` or ``"whole"`` inference (default: the config's ``eval.mode``).
        scales: Segmentation: ratios of the short side (default: the config's).
        flip: Segmentation: also average over the horizontally flipped image.
        aug: Segmentation: multi-scale (:data:`AUG_SCALES`) and flip, as the papers evaluate.
        limit: Evaluate only the first N images.
        save_detections: Detectors: write the raw detections, COCO results format, to
            ``run_dir/results_coco_<split>.json``.
        progress: Show a progress bar.

    Returns:
        The report with what was evaluated; :meth:`RunEvaluation.to_dict` is the JSON ``clipdense eval`` writes.

    Raises:
        FileNotFoundError: If ``run_dir`` is not a run directory with a checkpoint, or the dataset is missing.
        ValueError: If the dataset's classes differ from the model's, or on segmentation options for a detector.
    """
    model, cfg = build_from_run(run_dir, device)
    variant = "_".join(
        part
        for part in (
            mode,
            "aug" if aug else None,
            "scales" + "-".join(f"{s:g}" for s in scales) if scales and not aug else None,
            "flip" if flip and not aug else None,
            f"limit{limit}" if limit is not None else None,
        )
        if part
    )
    if getattr(model, "task", None) == "detection":
        if dataset not in (None, DETECTION_DATASET):
            raise ValueError(f"a detector is evaluated on a COCO-layout dataset (dataset 'coco'), not {dataset}")
        ignored = [f for f, v in (("mode", mode), ("scales", scales), ("flip", flip), ("aug", aug)) if v]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} apply to segmentation; detectors are evaluated at their own scale")
        split = split or cfg.data.val_split
        found = _evaluate_detector(Path(run_dir), model, cfg, device, root, split, limit, save_detections, progress)
        return replace(found, variant=variant)
    data = build_dataset(dataset or cfg.data.dataset, root or cfg.data.root, split or cfg.data.val_split)
    if list(data.class_names) != list(cfg.model.class_names):
        raise ValueError(
            f"the model was trained on {len(cfg.model.class_names)} classes, the dataset has {data.num_classes}"
        )
    overrides = {k: v for k, v in {"mode": mode, "scales": tuple(scales) if scales else None,
                                   "limit": limit}.items() if v is not None}  # fmt: skip
    if flip:
        overrides["flip"] = True
    if aug:
        overrides.update(scales=AUG_SCALES, flip=True)
    eval_cfg = replace(cfg.eval, **overrides)
    report = evaluate(prepare_model(model, eval_cfg), data, eval_cfg, device, progress=progress)
    unseen = getattr(model, "unseen", None)  # zero-shot protocol: seen / unseen / harmonic mean
    return RunEvaluation(
        run_dir=Path(run_dir),
        checkpoint=str(run_dir),
        task="segmentation",
        dataset=data.name,
        split=split or cfg.data.val_split,
        report=report,
        settings=vars(eval_cfg),
        zero_shot=seen_unseen_report(report, unseen) if unseen else None,
        variant=variant,
    )


def _evaluate_detector(
    run: Path, model, cfg: ExperimentConfig, device, root: str | None, split: str, limit: int | None,
    save_detections: bool, progress: bool,
) -> RunEvaluation:  # fmt: skip
    from clipdense.evaluation.detection import evaluate_detection

    data = build_eval_dataset(cfg, root, split)
    if list(data.class_names) != list(cfg.model.class_names):
        raise ValueError(
            f"the model was trained on {len(cfg.model.class_names)} classes, the dataset has {len(data.class_names)}"
        )
    name = f"results_coco_{split}.json" if limit is None else f"results_coco_{split}_limit{limit}.json"
    results = run / name if save_detections else None
    report = evaluate_detection(model, data, device, progress=progress, limit=limit, results_path=results)
    return RunEvaluation(
        run_dir=run,
        checkpoint=str(run),
        task="detection",
        dataset=DETECTION_DATASET,
        split=split,
        report=report,
        root=str(data.root),
        detections_path=results,
    )
