"""Few-shot classification runs (CoOp, Zhou et al. IJCV 2022; CoCoOp, CVPR 2022; PLOT, Chen et al. ICLR 2023): their
config, the recipe rules of the reference code, CLIP preprocessing, and rebuilding a trained classifier from its run
directory.

A few-shot run directory (``clipdense fewshot train``) is laid out as a segmentation run's (see
:mod:`clipdense.runs`): ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_*/{model.safetensors,state.pt}``
and ``latest``. The checkpoint holds the learned part only (``prompt_learner.*``, and CoCoOp's ``meta_net.*``) when
CLIP's weights can be loaded again from ``model.pretrained``; with random CLIP weights (``pretrained: null``, tests)
it holds every weight.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from torch import nn

from clipdense.checkpoints import load_state_dict_strict, skip_init
from clipdense.config import ConfigError, _build, _merge, _plain, _read_yaml, parse_overrides
from clipdense.data.fewshot import LAYOUTS, SUBSAMPLES, FewShotSplits, few_shot_splits
from clipdense.fileio import atomic_write_text
from clipdense.inference.adapters import FewShotAdapterConfig, adapter_recipe, is_adapter

logger = logging.getLogger(__name__)


@dataclass
class FewShotModelConfig:
    """Attributes:
    name: ``coop_rn50``, ``plot_rn50``, ``cocoop_vitb16``, ... (``clipdense.list_models("*coop_*")``,
        ``list_models("plot_*")``), or a cache adapter: ``tip_adapter_rn50``, ``tip_adapter_f_rn50``,
        ``plot_adapter_rn50``.
    pretrained: CLIP weights: an open_clip tag, a local file, or null for random weights.
    overrides: Builder options (``clip_model``, ``n_ctx``, ``ctx_init``, ``class_specific``,
        ``class_token_position``, ``n_prompts``, ``eps``, ``max_iter``, ``thresh``, ``global_logits``; the adapters':
        ``templates``, ``eps``, ``plot_weight``, and ``cache_size`` and ``plot_options``, filled in when the run
        starts).
    class_names: Filled in from the dataset when the run starts.
    """

    name: str = "plot_rn50"
    pretrained: str | None = "openai"
    overrides: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None


@dataclass
class FewShotDataConfig:
    """Attributes:
    dataset: One of :data:`clipdense.data.fewshot.LAYOUTS` (the 11 CoOp datasets, or ``shapesworld``).
    root: ``$DATA``, the folder holding the dataset folders (``caltech-101/``, ...).
    shots: Training images per class (1, 2, 4, 8, 16).
    subsample_classes: ``all``, or CoCoOp's base-to-new setting: train on the ``base`` half of the classes
        (:func:`clipdense.data.fewshot.subsample_classes`), then evaluate with ``--classes new``.
    crop_scale: Area range of the training random resized crop (Dassl's ``random_resized_crop``: 0.08..1).
    flip: Random horizontal flips in training (Dassl's ``random_flip``).
    repeat: The k-shot draw fills a class with fewer than k images by drawing with replacement: Dassl before
        2021-10-09 (the CoOp paper's runs) and Tip-Adapter's code. False (current Dassl) keeps all of its images.
        Only classes with fewer than k images are affected (none of the ShapesWorld split).
    workers: DataLoader workers.
    """

    dataset: str = "caltech101"
    root: str = "data"
    shots: int = 16
    subsample_classes: str = "all"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    repeat: bool = False
    workers: int = 4


@dataclass
class FewShotOptimConfig:
    """SGD with a per-epoch cosine schedule after a constant warm-up (Dassl's ``ConstantWarmupScheduler``).

    Attributes:
        lr: Base learning rate (0.002).
        momentum: SGD momentum (0.9).
        weight_decay: Weight decay (5e-4).
        warmup_epochs: Epochs at ``warmup_lr`` first (1); they count among ``train.epochs``.
        warmup_lr: The constant warm-up learning rate (1e-5).
    """

    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5


@dataclass
class FewShotTrainConfig:
    """Attributes:
    epochs: Epochs; null: the reference's rule (:func:`official_epochs`: 50 for 1 shot, 100 for 2/4, 200 for 8/16,
        50 on ImageNet; CoCoOp 10).
    batch_size: Images per step; null: the reference's (:func:`official_batch_size`). A training set smaller than
        a batch is one batch per epoch (Dassl drops the last incomplete batch only when there is a full one).
    seed: Seed of the k-shot draw, the context initialisation and the data order (1, 2, 3).
    device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    log_every: Steps between metrics.jsonl records.
    ckpt_every: Steps between checkpoints (and at the end).
    eval_batch_size: Images per forward pass in evaluation.
    """

    epochs: int | None = None
    batch_size: int | None = None
    seed: int = 1
    device: str = "auto"
    log_every: int = 5
    ckpt_every: int = 500
    eval_batch_size: int = 100


@dataclass
class FewShotConfig:
    name: str = "fewshot"
    run_dir: str | None = None
    model: FewShotModelConfig = field(default_factory=FewShotModelConfig)
    data: FewShotDataConfig = field(default_factory=FewShotDataConfig)
    optim: FewShotOptimConfig = field(default_factory=FewShotOptimConfig)
    train: FewShotTrainConfig = field(default_factory=FewShotTrainConfig)
    adapter: FewShotAdapterConfig = field(default_factory=FewShotAdapterConfig)

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_fewshot_config(path: str | Path | None = None, overrides: Sequence[str] | None = None) -> FewShotConfig:
    """Read a few-shot YAML config (``_base_`` inheritance) and apply ``section.key=value`` overrides.

    Raises:
        FileNotFoundError: A config file does not exist.
        ConfigError: Malformed YAML or override, unknown key, wrong type, or a value out of range.
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    cfg = _build(FewShotConfig, _merge(data, parse_overrides(list(overrides or []))), "")
    if cfg.data.dataset not in LAYOUTS:
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} is not allowed: use one of {', '.join(sorted(LAYOUTS))}")
    for key in ("data.shots", "train.epochs", "train.batch_size", "train.log_every", "train.ckpt_every",
                "train.eval_batch_size", "optim.lr"):  # fmt: skip
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} is not allowed: it must be > 0")
    for key in ("optim.momentum", "optim.weight_decay", "optim.warmup_epochs", "optim.warmup_lr", "data.workers"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"{key} must be >= 0")
    if cfg.data.subsample_classes not in SUBSAMPLES:
        raise ConfigError(f"data.subsample_classes={cfg.data.subsample_classes!r}: use one of {', '.join(SUBSAMPLES)}")
    low, high = cfg.data.crop_scale
    if not 0 < low <= high <= 1:
        raise ConfigError(f"data.crop_scale={list(cfg.data.crop_scale)}: needs 0 < low <= high <= 1")
    if is_adapter(cfg.model.name):
        try:
            adapter_recipe(
                cfg.model.name,
                cfg.data.dataset,
                cfg.adapter,
                cfg.train.epochs,
                cfg.train.batch_size,
                need_plot_run=False,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return cfg


def save_fewshot_config(cfg: FewShotConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


# ------------------------------------------------------------------------------------------- the reference's rules


def official_epochs(shots: int, dataset: str, model_name: str = "") -> int:
    """Epochs of the CoOp/PLOT scripts: 50 for 1 shot, 100 for 2 and 4, 200 otherwise; 50 on ImageNet. CoCoOp's
    configs (``vit_b16_c4_ep10_batch1_ctxv1``): 10."""
    if model_name.startswith("cocoop"):
        return 10
    if dataset == "imagenet":
        return 50
    return 50 if shots == 1 else 100 if shots in (2, 4) else 200


#: PLOT trains with batch 128, except on these "small datasets" (``plot-coop/train.py``).
PLOT_SMALL_BATCH_DATASETS = ("oxford_flowers", "fgvc_aircraft", "stanford_cars")


def official_batch_size(model_name: str, dataset: str) -> int:
    """Batch of the reference configs: CoOp 32; CoCoOp 1; PLOT 128, but 32 on Flowers102, FGVCAircraft and
    StanfordCars."""
    if model_name.startswith("cocoop"):
        return 1
    if model_name.startswith("plot") and dataset not in PLOT_SMALL_BATCH_DATASETS:
        return 128
    return 32


def epoch_lr(epoch: int, cfg: FewShotOptimConfig, epochs: int) -> float:
    """The learning rate of an epoch: ``warmup_lr`` for the warm-up epochs, then cosine annealing from ``lr`` over
    ``epochs`` (Dassl's CosineAnnealingLR(T_max=epochs) after ConstantWarmupScheduler, stepped once per epoch: the
    first epoch after the warm-up runs at ``lr``)."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    t = epoch - cfg.warmup_epochs
    return cfg.lr * (1 + math.cos(math.pi * t / epochs)) / 2


# ------------------------------------------------------------------------------------------- preprocessing


def eval_transform(model: nn.Module):
    """CLIP's own test preprocessing for the model's CLIP (open_clip: bicubic resize of the short side, centre
    crop, normalisation with the weights' mean and std)."""
    import open_clip

    return open_clip.image_transform(model.image_size, is_train=False, mean=model.image_mean, std=model.image_std)


def train_transform(model: nn.Module, crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True):
    """Dassl's few-shot training augmentation: random resized crop (bicubic) to CLIP's size, random flip,
    normalisation with the weights' mean and std. (open_clip's training transform has no flip and a 0.9..1 crop.)"""
    from torchvision.transforms import v2

    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(model.image_size, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(model.image_mean, model.image_std)]
    return v2.Compose(steps)


# ------------------------------------------------------------------------------------------- models and runs


def build_fewshot_model(
    cfg: FewShotConfig, class_names: Sequence[str], pretrained: Any = "config", for_checkpoint: bool = False
) -> nn.Module:
    """The classifier a config names (CLIP weights from ``model.pretrained`` unless ``pretrained`` is given;
    ``for_checkpoint``: skip what a checkpoint overwrites, such as an adapter's text classifier)."""
    from clipdense.models.registry import checkpoint_options, create_model

    weights = cfg.model.pretrained if pretrained == "config" else pretrained
    options = {**cfg.model.overrides, **(checkpoint_options(cfg.model.name) if for_checkpoint else {})}
    return create_model(cfg.model.name, class_names=list(class_names), pretrained=weights, **options)


def saves_clip(cfg: FewShotConfig) -> bool:
    """Whether the run's checkpoints hold CLIP's weights too (random CLIP weights cannot be loaded again)."""
    return cfg.model.pretrained is None


def checkpoint_module(model: nn.Module, cfg: FewShotConfig) -> nn.Module:
    """The module whose state a checkpoint holds: the whole model, or its learned part (see :func:`saves_clip`)."""
    return model if saves_clip(cfg) else _Trainable(model)


class _Trainable(nn.Module):
    """A view of a classifier whose ``state_dict`` is its learned part: the prompt learner (``prompt_learner.``)
    and CoCoOp's meta-net (``meta_net.``); a cache adapter's cache (``cache.``) and PLOT-Adapter's PLOT prompts
    (``plot.prompt_learner.``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if hasattr(model, "cache"):
            self.cache = model.cache
            if hasattr(model, "plot"):
                self.plot = _Trainable(model.plot)
            return
        self.prompt_learner = model.prompt_learner
        if hasattr(model, "meta_net"):
            self.meta_net = model.meta_net


def run_splits(cfg: FewShotConfig, full: FewShotSplits, classes: str | None = None) -> FewShotSplits:
    """The k-shot splits of a run: its dataset, shots, seed and draw rule, and its class subset unless ``classes``
    names another (CoCoOp's base-to-new evaluation)."""
    d = cfg.data
    subset = d.subsample_classes if classes is None else classes
    return few_shot_splits(full, d.shots, cfg.train.seed, d.dataset, subset, d.repeat)


def load_fewshot_run(
    run_dir: str | Path, device: str | torch.device = "cpu", class_names: Sequence[str] | None = None
) -> tuple[nn.Module, FewShotConfig]:
    """Rebuild a trained classifier from its run directory (eval mode, text features cached).

    Args:
        run_dir: The run directory.
        device: Device.
        class_names: Classify among these classes instead of the run's (CoCoOp's base-to-new evaluation). The
            learned contexts must be shared by the classes, and CLIP's weights loadable (``model.pretrained``).

    Raises:
        FileNotFoundError: Not a few-shot run directory, or no checkpoint yet.
        ValueError: ``class_names`` for a run with class-specific contexts or random CLIP weights.
    """
    from safetensors.torch import load_file

    from clipdense.runs import latest_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml); pass the folder `clipdense "
                                "fewshot train` wrote")  # fmt: skip
    cfg = load_fewshot_config(run_dir / "config.yaml")
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/latest is missing)")
    if not cfg.model.class_names:
        raise ValueError(f"{run_dir}/config.yaml names no classes (model.class_names)")
    names = list(class_names) if class_names is not None else cfg.model.class_names
    if names != cfg.model.class_names and saves_clip(cfg):
        raise ValueError(f"{run_dir} trained on random CLIP weights (model.pretrained: null): they cannot be loaded "
                         "for other classes")  # fmt: skip
    if names != cfg.model.class_names and is_adapter(cfg.model.name):
        raise ValueError(f"{run_dir} is a cache adapter: its cache holds the run's classes only")
    loading_logger = logging.getLogger("clipdense.clip.loading")
    level = loading_logger.level
    try:
        if saves_clip(cfg):
            loading_logger.setLevel(logging.ERROR)  # every weight comes from the checkpoint
            with skip_init():
                model = build_fewshot_model(cfg, names, pretrained=None, for_checkpoint=True)
        else:
            model = build_fewshot_model(cfg, names, for_checkpoint=True)
    finally:
        loading_logger.setLevel(level)
    state = load_file(str(folder / "model.safetensors"))
    if names != cfg.model.class_names:
        if state["prompt_learner.ctx"].shape[1] != 1:
            raise ValueError(f"{run_dir} learned class-specific contexts: they do not carry over to other classes")
        state["prompt_learner.token_ids"] = model.prompt_learner.token_ids  # the new classes' prompts
    hint = "the run's config and checkpoint disagree: was config.yaml edited?"
    load_state_dict_strict(checkpoint_module(model, cfg), state, str(folder), hint)
    model = model.to(device).eval()
    model.cache_text_features()
    return model, cfg


@dataclass
class Classification:
    """Top-k classes of one image.

    Attributes:
        labels: k class indices, best first.
        names: Their class names.
        probs: Their softmax probabilities.
    """

    labels: list[int]
    names: list[str]
    probs: list[float]


@torch.no_grad()
def classify(model: nn.Module, images: Sequence[Image.Image], top_k: int = 5, batch_size: int = 32):
    """Classify PIL images with a few-shot classifier (CLIP's test preprocessing).

    Args:
        model: A trained :class:`~clipdense.models.fewshot.CoOp` / :class:`~clipdense.models.fewshot.PLOT` in eval
            mode.
        images: RGB images, any size.
        top_k: Classes reported per image.
        batch_size: Images per forward pass.

    Returns:
        One :class:`Classification` per image.
    """
    transform = eval_transform(model)
    device = model.logit_scale.device
    k = min(top_k, model.num_classes)
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([transform(im.convert("RGB")) for im in images[i : i + batch_size]]).to(device)
        probs, labels = model(batch).float().softmax(dim=-1).topk(k, dim=-1)
        for p, lab in zip(probs.tolist(), labels.tolist(), strict=True):
            out.append(Classification(lab, [model.class_names[j] for j in lab], p))
    return out


@dataclass
class PlanExplanation:
    """PLOT's transport plans for the top classes of one image (see :meth:`clipdense.models.fewshot.PLOT.explain`).

    Attributes:
        view: 3 x S x S uint8 RGB: the image as the model saw it (CLIP's resize and centre crop).
        top: The top-K classes and their probabilities.
        plans: K x N x h x w mass that prompt set n takes from each cell of the feature grid in class k's plan (each
            map sums to 1/N).
        shares: K x N: each prompt set's part of the class's transport similarity (rows sum to 1).
    """

    view: torch.Tensor
    top: Classification
    plans: torch.Tensor
    shares: torch.Tensor


@torch.no_grad()
def explain(model: nn.Module, images: Sequence[Image.Image], top_k: int = 3, batch_size: int = 32):
    """The transport plans of a PLOT classifier's top classes for PIL images (CLIP's test preprocessing).

    Args:
        model: A trained :class:`~clipdense.models.fewshot.PLOT` in eval mode.
        images: RGB images, any size.
        top_k: Classes explained per image.
        batch_size: Images per forward pass.

    Returns:
        One :class:`PlanExplanation` per image.

    Raises:
        ValueError: The model has no transport plans (CoOp, CoCoOp).
    """
    if not hasattr(model, "explain"):
        raise ValueError(f"{type(model).__name__} has no transport plans to show: explanations need a PLOT run")
    transform = eval_transform(model)
    device = model.logit_scale.device
    mean = torch.tensor(model.image_mean).view(3, 1, 1)
    std = torch.tensor(model.image_std).view(3, 1, 1)
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([transform(im.convert("RGB")) for im in images[i : i + batch_size]])
        ex = model.explain(batch.to(device), top_k)
        probs = ex.logits.float().softmax(dim=-1).gather(1, ex.classes).cpu()
        views = (batch * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)
        for j in range(len(batch)):
            labels = ex.classes[j].tolist()
            top = Classification(labels, [model.class_names[c] for c in labels], probs[j].tolist())
            out.append(PlanExplanation(views[j], top, ex.plans[j].float().cpu(), ex.shares[j].float().cpu()))
    return out


def flat_config(cfg: FewShotConfig | dict) -> dict[str, Any]:
    """``{"section.key": value}`` of the trajectory-shaping sections (model, data, optim, train, adapter)."""
    data = cfg.to_dict() if dataclasses.is_dataclass(cfg) else cfg
    sections = ("model", "data", "optim", "train", "adapter")
    return {f"{s}.{k}": v for s in sections for k, v in (data.get(s) or {}).items()}


__all__ = [
    "Classification",
    "PlanExplanation",
    "FewShotConfig",
    "FewShotDataConfig",
    "FewShotModelConfig",
    "FewShotOptimConfig",
    "FewShotTrainConfig",
    "build_fewshot_model",
    "checkpoint_module",
    "classify",
    "epoch_lr",
    "eval_transform",
    "explain",
    "flat_config",
    "load_fewshot_config",
    "load_fewshot_run",
    "official_batch_size",
    "official_epochs",
    "run_splits",
    "save_fewshot_config",
    "train_transform",
]
