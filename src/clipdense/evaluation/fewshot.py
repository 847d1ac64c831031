"""Few-shot classification evaluation (CoOp, Zhou et al. IJCV 2022; PLOT, Chen et al. ICLR 2023): top-1 accuracy
and per-class accuracy of a trained run or of zero-shot CLIP on a CoOp-protocol test split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clipdense.data.fewshot import Datum, ImageItems, read_fewshot_dataset
from clipdense.inference.fewshot import (
    FewShotConfig,
    eval_transform,
    load_fewshot_config,
    load_fewshot_run,
    run_splits,
)


@dataclass
class ClassificationReport:
    """Accuracy of a classifier on a labelled split.

    Attributes:
        top1: Top-1 accuracy over all images, in percent (the papers' number).
        per_class: C per-class accuracies in percent (NaN for a class without images).
        mean_per_class: Mean of the defined per-class accuracies.
        num_images: Images evaluated.
        class_names: C names.
    """

    top1: float
    per_class: list[float]
    mean_per_class: float
    num_images: int
    class_names: list[str]

    def format(self, worst: int = 5) -> str:
        """The summary, and the ``worst`` classes."""
        lines = [f"top-1 {self.top1:.2f}%  mean per-class {self.mean_per_class:.2f}%  ({self.num_images} images, "
                 f"{len(self.class_names)} classes)"]  # fmt: skip
        ranked = sorted((a, n) for a, n in zip(self.per_class, self.class_names, strict=True) if not math.isnan(a))
        if ranked and worst:
            lines.append("lowest: " + ", ".join(f"{n} {a:.1f}%" for a, n in ranked[:worst]))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["per_class"] = {
            n: (None if math.isnan(a) else a) for n, a in zip(self.class_names, self.per_class, strict=True)
        }
        return out


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    items: Sequence[Datum],
    class_names: Sequence[str],
    device: str | torch.device = "cpu",
    batch_size: int = 100,
    workers: int = 0,
    progress: bool = True,
) -> ClassificationReport:
    """Top-1 and per-class accuracy with CLIP's test preprocessing (``model.image_size/image_mean/image_std``).

    Args:
        model: A classifier (images -> B x C logits) in eval mode, on ``device``.
        items: The labelled images.
        class_names: C names.
        device: Where the model is.
        batch_size: Images per forward pass.
        workers: DataLoader workers.
        progress: Show a progress bar.
    """
    loader = DataLoader(ImageItems(items, eval_transform(model)), batch_size=batch_size, num_workers=workers)
    c = len(class_names)
    correct, total = torch.zeros(c, dtype=torch.long), torch.zeros(c, dtype=torch.long)
    for images, labels in tqdm(loader, desc="eval", unit="batch", disable=not progress or None):
        pred = model(images.to(device)).argmax(dim=-1).cpu()
        total += torch.bincount(labels, minlength=c)
        correct += torch.bincount(labels[pred == labels], minlength=c)
    per_class = [100.0 * k / n if n else float("nan") for k, n in zip(correct.tolist(), total.tolist(), strict=True)]
    defined = [a for a in per_class if not math.isnan(a)]
    top1 = 100.0 * correct.sum().item() / max(1, total.sum().item())
    return ClassificationReport(
        top1, per_class, sum(defined) / max(1, len(defined)), int(total.sum()), list(class_names)
    )


def _split_items(cfg: FewShotConfig, split: str, root: str | None, classes: str) -> tuple[list[Datum], list[str]]:
    if split not in ("test", "val"):
        raise ValueError(f"unknown split {split!r}; use 'test' or 'val'")
    full = read_fewshot_dataset(cfg.data.dataset, root or cfg.data.root)
    splits = run_splits(cfg, full, classes)
    return (splits.test if split == "test" else splits.val), splits.class_names


def evaluate_fewshot_run(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    split: str = "test",
    root: str | None = None,
    progress: bool = True,
    classes: str | None = None,
) -> ClassificationReport:
    """Evaluate a ``clipdense fewshot train`` run on its dataset's test split (or its k-shot val split).

    Args:
        run_dir: The run directory.
        device: Device.
        split: ``test`` (the papers' numbers) or ``val``.
        root: ``$DATA`` (default: the run's ``data.root``).
        progress: Show a progress bar.
        classes: Class subset (``all``, ``base``, ``new``); default: the run's ``data.subsample_classes``. A run
            trained on the base classes evaluated on ``new`` gives CoCoOp's base-to-new number.
    """
    if not (Path(run_dir) / "config.yaml").is_file():
        load_fewshot_run(run_dir)  # raises its error for a folder that is not a run directory
    cfg = load_fewshot_config(Path(run_dir) / "config.yaml")
    items, names = _split_items(cfg, split, root, classes or cfg.data.subsample_classes)
    trained_on = classes is None or classes == cfg.data.subsample_classes
    if trained_on and names != cfg.model.class_names:
        raise ValueError(f"the classes of {cfg.data.dataset} under {root or cfg.data.root} differ from the run's")
    model, cfg = load_fewshot_run(run_dir, device, class_names=None if trained_on else names)
    return evaluate_classifier(model, items, names, device, cfg.train.eval_batch_size, cfg.data.workers, progress)


def evaluate_zeroshot(
    cfg: FewShotConfig,
    device: str | torch.device = "cpu",
    template: str = "a photo of a {}.",
    root: str | None = None,
    progress: bool = True,
) -> ClassificationReport:
    """Zero-shot CLIP (the config's CLIP, one template) on the config's test split: the few-shot baseline."""
    from clipdense.clip.loading import load_clip
    from clipdense.clip.text import class_text_embeddings
    from clipdense.models.fewshot import ZeroShotClassifier

    items, names = _split_items(cfg, "test", root, cfg.data.subsample_classes)
    clip_name = cfg.model.overrides.get("clip_model", "ViT-B-16" if "vitb16" in cfg.model.name else "RN50")
    loaded = load_clip(clip_name, cfg.model.pretrained, device=device)
    text = class_text_embeddings(loaded, [n.replace("_", " ") for n in names], [template]).to(device)
    model = ZeroShotClassifier(loaded.model, text)
    model.image_size, model.image_mean, model.image_std = loaded.image_size, loaded.mean, loaded.std
    return evaluate_classifier(model, items, names, device, cfg.train.eval_batch_size, cfg.data.workers, progress)


__all__ = ["ClassificationReport", "evaluate_classifier", "evaluate_fewshot_run", "evaluate_zeroshot"]
