"""Experiment configuration: dataclasses, YAML files with ``_base_`` inheritance, ``key=value`` overrides.

A YAML file maps onto :class:`ExperimentConfig` section by section; unknown keys are errors (a
typo must not silently train the wrong thing). Each run writes its resolved config next to its
checkpoints, so a run directory fully describes how its weights were made.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clipdense.fileio import atomic_write_text


@dataclass
class ModelConfig:
    """Attributes:
    name: A name from ``clipdense.list_models()``.
    pretrained: CLIP weights: an open_clip tag, a local checkpoint file, or null for random weights.
    overrides: Extra keyword arguments for ``create_model`` (e.g. ``clip_model``).
    class_names: Filled in from the dataset when the run starts (written to the resolved config).
    """

    name: str = "denseclip_fpn_rn50"
    pretrained: str | None = "openai"
    overrides: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None


@dataclass
class DataConfig:
    """Attributes:
    dataset: A name from ``clipdense.data.datasets.list_datasets()`` (segmentation), or ``coco`` for
        detection / instance segmentation (COCO instances JSON layout, e.g. ShapesWorld's COCO export).
    root: The dataset folder in its standard layout.
    crop_size: Training crop (square; segmentation).
    scale: Segmentation: mmseg-style rescale target (long, short) before the random ratio. Detection:
        mmdet's keep-ratio resize (long side cap, short side), e.g. (1333, 800).
    with_masks: Detection: read instance masks (Mask R-CNN).
    ratio_range: Random rescale ratio range.
    cat_max_ratio: Max share of one class in a random crop.
    photometric: Photometric distortion on/off.
    colour: Its colour maths: ``mmseg`` (the authors': contrast ``a * img``, saturation and hue in OpenCV's 8-bit
        HSV) or ``torchvision`` (blends with the mean grey / the greyscale image, continuous hue shift).
    antialias: Antialias the random rescale when it shrinks (False: mmcv's OpenCV bilinear).
    workers: DataLoader workers per process.
    skip_bad: Skip (and count) unreadable/invalid samples instead of stopping with an error.
    """

    dataset: str = "ade20k"
    root: str = "data/ADEChallengeData2016"
    train_split: str = "train"
    val_split: str = "val"
    crop_size: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True
    colour: Literal["mmseg", "torchvision"] = "mmseg"
    antialias: bool = False
    workers: int = 4
    skip_bad: bool = False
    with_masks: bool = False


@dataclass
class OptimConfig:
    """Optimiser with parameter groups and a learning-rate schedule with linear warmup (default: DenseCLIP's
    AdamW recipe; MaskCLIP+ uses SGD with momentum 0.9).

    Attributes:
        schedule: ``poly`` (mmseg: power, min_lr) or ``step`` (mmdet: x step_gamma at each of ``steps``).
        steps: Step-schedule milestones, in epochs when ``train.epochs`` is set, else in iterations.
        no_decay: The parameters without weight decay. ``norm``: the authors' configs (mmcv ``custom_keys``
            ``backbone`` lr x 0.1, ``norm`` decay x 0, the longer key matched first): every trainable parameter
            whose name contains ``norm`` outside the image backbone (the context decoder's ``norm1..3``, PPL's
            decoder norms). ``context_decoder_1d``: every 1-d parameter of the context decoder (biases and the
            projections' LayerNorms too; clipdense's rule before it matched the authors').
    """

    name: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["poly", "step"] = "poly"
    steps: tuple[float, ...] = ()
    step_gamma: float = 0.1
    momentum: float = 0.9
    lr: float = 1e-4
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 0.1
    no_decay: Literal["norm", "context_decoder_1d"] = "norm"
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 0.9
    min_lr: float = 1e-6
    grad_clip: float | None = None


@dataclass
class TrainConfig:
    """Attributes:
    iters: Total optimiser steps.
    epochs: If set, train this many epochs instead (iters = epochs x (dataset size // global batch)).
    batch_size: Images per process per step (global batch = batch_size x world size).
    precision: ``fp32`` (the authors' DenseCLIP, PPL and MaskCLIP+ training), ``bf16`` or ``fp16`` autocast (fp16
        uses a gradient scaler).
    grad_checkpointing: Recompute activations of the image backbone in the backward pass.
    sync_bn: SyncBatchNorm under multi-GPU DDP (CUDA only): ``heads`` (the authors' ``norm_cfg=SyncBN`` of the
        neck and heads; the CLIP backbone's own BatchNorm2d stay per process, as in their code), ``all`` (the
        backbone's too) or ``off``.
    freeze_bn: Keep BatchNorm layers in eval mode (running statistics fixed).
    """

    iters: int = 80000
    epochs: int | None = None
    batch_size: int = 4
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_checkpointing: bool = False
    sync_bn: Literal["heads", "all", "off"] = "heads"
    freeze_bn: bool = False
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 4000
    eval_every: int = 8000
    device: str = "auto"


@dataclass
class EvalConfig:
    """Attributes:
    mode: ``slide`` or ``whole`` inference.
    short_side: Resize the short side to this before inference (null: keep).
    resize: The rule of that resize. ``mmcv`` (the authors' mmseg test pipeline): ``Resize((long_max, short_side),
        keep_ratio=True)`` at each scale, i.e. one factor ``min(long_max / long, short_side / short)`` (so the long
        side is capped at ``long_max``), sides rounded half up, bilinear on the uint8 image without antialiasing.
        ``torchvision``: the short side to ``short_side`` exactly, the long side uncapped and truncated,
        antialiased, on the normalised image.
    long_max: ``mmcv`` only: the long-side bound (mmseg's 2048), times the scale ratio.
    crop, stride: Sliding-window crop and stride.
    scales: Multi-scale ratios of ``short_side`` (DenseCLIP: 0.5..1.75 step 0.25).
    flip: Average with the horizontally flipped image.
    precision: Inference autocast: ``fp32`` (exact), ``bf16`` or ``fp16`` (faster where the hardware has them;
        labels may differ at near-ties).
    channels_last: Run convolutions in channels-last memory format (the same arithmetic, reordered: ~20%
        faster for ResNet trunks on CPU; results equal to float rounding).
    """

    mode: Literal["slide", "whole"] = "slide"
    short_side: int | None = 512
    resize: Literal["mmcv", "torchvision"] = "mmcv"
    long_max: int = 2048
    crop: int = 512
    stride: int = 341
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    limit: int | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = True


#: Evaluation presets (:mod:`clipdense.inference.presets`): the four methods, plus ClearCLIP's shipped config.
PRESETS: tuple[str, ...] = ("maskclip", "sclip", "sclip-qk", "clearclip", "clearclip-shipped", "naclip")

#: The datasets of the shared eight-dataset benchmark the presets cover, in the papers' column order.
PRESET_DATASETS: tuple[str, ...] = (
    "voc21", "context60", "cocoobject", "voc20", "context59", "cocostuff171", "cityscapes", "ade20k",
)  # fmt: skip

#: The training-free dense modes (:func:`clipdense.clip.dense.dense_clip_encoder`).
MODES: tuple[str, ...] = ("maskclip", "sclip", "clearclip", "naclip", "vanilla", "clearclip_qk")


@dataclass
class SegmenterConfig:
    """Inference settings; the defaults follow the shared protocol of MaskCLIP's successors, tuned for photos.

    The papers' evaluation protocols are presets (:mod:`clipdense.inference.presets`); the fields below that
    default to our choice name the official behaviour they replace.

    Attributes:
        mode: Dense mode (``maskclip``, ``sclip``, ``clearclip``, ``naclip``, ``vanilla``).
        pos_resize: ViT only: how the positional grid is resized to the token grid, ``size`` (exactly, as MaskCLIP
            and DenseCLIP) or ``scale`` (DINO's scale factor, as SCLIP, ClearCLIP and NACLIP); None: the mode's
            official rule (``scale`` for the successors' modes). The rules differ at non-square sizes.
        templates: Prompt template set (``ensemble`` = 80 ImageNet + 5 scene templates, MaskCLIP's;
            ``imagenet`` = the 80 of SCLIP, ClearCLIP and NACLIP; ``single``).
        short_side: Resize the shorter image side to this before inference (None: keep).
        resize: Size rule of that resize: ``torchvision`` (long side truncated, antialiased) or ``mmcv`` (the
            official mmseg ``Resize(scale=(long_max, short_side), keep_ratio=True)``: one scale factor
            ``min(long_max / long, short_side / short)``, sides rounded half up, bilinear without antialiasing,
            so 333 x 500 -> 336 x 505).
        long_max: ``mmcv`` only: the long-side bound of the rescale (mmseg's 2048).
        normalize: Image normalisation: ``clip`` (the weights' mean/std) or ``imagenet`` (MaskCLIP's configs
            normalise with ImageNet's mean/std).
        window: Sliding-window crop size; None for whole-image inference.
        stride: Sliding-window stride.
        patch_fit: A window whose sides are not multiples of the patch size: ``pad`` (zero-pad bottom/right,
            upsample the scores to the padded size, crop), ``pad_stretch`` (pad the same, but upsample to the
            window's own size, as mmseg's ``AdaptivePadding`` + resize do in MaskCLIP) or ``truncate`` (drop the
            remainder pixels and stretch the scores over the window, as the stride-16 convolution of SCLIP and
            NACLIP does in whole-image mode).
        logit_scale: Temperature applied to cosine scores before the softmax over classes. With key smoothing the
            refined outputs are probabilities and their softmax is taken unscaled, as mmseg does after MaskCLIP.
        synonyms: How a class's synonyms are reduced: ``max_cosine`` (the best synonym's cosine, then the
            softmax over classes) or ``max_prob`` (the official SCLIP/ClearCLIP/NACLIP reduction: the softmax over
            all synonyms of all classes, then the max per class).
        background_threshold: Pixels whose top class probability is below this become background
            (a ``background`` class is prepended when the list has none); SCLIP's ``prob_thd``.
        area_threshold: SCLIP's ``area_thd``: a class (background excepted) predicted on no more than this
            fraction of the non-background pixels is removed and its pixels re-labelled; None: off.
        prompt_denoise: MaskCLIP prompt denoising threshold (0.5 in MaskCLIP's code); None: off.
        key_smoothing: MaskCLIP key smoothing threshold (1.0 in MaskCLIP+'s annotation-free configs); None: off.
        key_norm: Key normalisation of key smoothing: ``official`` (per channel over positions, the authors'
            code) or ``cosine`` (per pixel, the paper's formula); see :func:`clipdense.clip.refine.key_smoothing`.
        pamr_steps: PAMR iterations on the full-resolution scores (NACLIP: 10); 0: off.
        pamr_dilations: PAMR's neighbourhood dilations (NACLIP: 8 and 16).
        window_batch: Windows encoded per forward pass.
    """

    mode: str = "maskclip"
    pos_resize: Literal["size", "scale"] | None = None
    templates: str = "ensemble"
    short_side: int | None = 336
    resize: Literal["torchvision", "mmcv"] = "torchvision"
    long_max: int = 2048
    normalize: Literal["clip", "imagenet"] = "clip"
    window: int | None = 224
    stride: int = 112
    patch_fit: Literal["pad", "pad_stretch", "truncate"] = "pad"
    logit_scale: float = 40.0
    synonyms: Literal["max_cosine", "max_prob"] = "max_cosine"
    background_threshold: float | None = None
    area_threshold: float | None = None
    prompt_denoise: float | None = None
    key_smoothing: float | None = None
    key_norm: Literal["official", "cosine"] = "official"
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)
    window_batch: int = 16

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}'; choose one of {MODES}")
        if self.window is not None and not 0 < self.stride <= self.window:
            raise ValueError(f"stride must be in (0, window]; got stride {self.stride}, window {self.window}")
        for name in ("background_threshold", "area_threshold", "prompt_denoise", "key_smoothing"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1]; got {value}")
        choices = {"resize": ("torchvision", "mmcv"), "synonyms": ("max_cosine", "max_prob"),
                   "key_norm": ("official", "cosine"), "normalize": ("clip", "imagenet"),
                   "patch_fit": ("pad", "pad_stretch", "truncate")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {allowed}")
        if self.pamr_steps < 0 or any(d <= 0 for d in self.pamr_dilations):
            raise ValueError(f"pamr_steps must be >= 0 and dilations > 0; got {self.pamr_steps}, {self.pamr_dilations}")
        self.pamr_dilations = tuple(self.pamr_dilations)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    run_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConfigError(ValueError):
    """A config that cannot describe a run: a malformed file or override, an unknown key, a value out of range."""


#: Keys whose value must be > 0 (or >= 0) when set; the check runs after types are checked.
_POSITIVE = (
    "data.crop_size", "optim.lr", "train.iters", "train.epochs", "train.batch_size", "train.log_every",
    "train.ckpt_every", "eval.short_side", "eval.crop", "eval.stride", "eval.limit",
)  # fmt: skip
_NON_NEGATIVE = (
    "data.workers", "data.cat_max_ratio", "optim.weight_decay", "optim.warmup_iters", "optim.min_lr",
    "optim.momentum", "train.eval_every", "optim.grad_clip",
)  # fmt: skip


def _check_ranges(cfg: ExperimentConfig) -> None:
    for key in (*_POSITIVE, *_NON_NEGATIVE):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        if key in _POSITIVE and value <= 0:
            raise ConfigError(f"{key}={value} is not allowed: it must be > 0")
        if value < 0:
            raise ConfigError(f"{key}={value} is not allowed: it must be >= 0 ({key}=0 turns it off)"
                              if key in ("train.eval_every", "optim.grad_clip") else
                              f"{key}={value} is not allowed: it must be >= 0")  # fmt: skip
    if not 0 < cfg.data.ratio_range[0] <= cfg.data.ratio_range[1]:
        raise ConfigError(f"data.ratio_range={list(cfg.data.ratio_range)}: needs 0 < low <= high")
    if any(s <= 0 for s in cfg.eval.scales) or not cfg.eval.scales:
        raise ConfigError(f"eval.scales={list(cfg.eval.scales)}: needs at least one ratio, each > 0")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config inheritance loops through {path}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return _merge(_read_yaml(path.parent / base, (*seen, path)), data)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {tp} ({'; '.join(errors)})")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}={value!r} is not allowed: use one of {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise ConfigError(f"{where}: expected a {origin.__name__}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(f'{where}.{k}'.lstrip('.') for k in unknown)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in data.items()})


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.iters=100", "model.overrides.clip_model=tiny-RN"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                "quote strings with special characters, e.g. key='{a'"
            ) from e
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (with ``_base_`` inheritance) and apply ``key=value`` overrides.

    Args:
        path: YAML file, or None for the defaults.
        overrides: ``section.key=value`` strings.

    Returns:
        The typed config.

    Raises:
        FileNotFoundError: A config file (or its ``_base_``) does not exist.
        ConfigError: Malformed YAML or override, unknown key, wrong type, or a value out of range.
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(ExperimentConfig, data, "")
    _check_ranges(cfg)
    return cfg


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
