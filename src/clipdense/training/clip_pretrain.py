"""Reproducible contrastive pre-training of ShapesCLIP (a small ResNet CLIP) on ShapesWorld captions.

Usage::

    clipdense shapesworld train --out runs/shapesclip                # the CPU recipe: about 100 min on 2 cores
    clipdense shapesworld train --out runs/shapesclip --recipe gpu   # the larger GPU recipe

The CPU recipe (the :class:`PretrainConfig` defaults) was found by measurement (README, "ShapesWorld"):
128 px scenes rendered once into a memory-mapped cache, a narrow image tower (width 16) and text tower
(width 128), channels-last convolutions, fused AdamW, batch 64, and three phases over one learning-rate
schedule: one-object scenes against the text transformer at its random initialisation (the image tower
learns colour and shape as if from class labels), then the full scenes' captions against the locked image
tower (LiT), then both towers together.

The run is seeded (python, numpy, torch, data order) and resumable: ``out_dir/last.pt`` holds the model,
optimizer, scheduler, step and RNG states and is written atomically every ``ckpt_every`` steps (through
:mod:`clipdense.training.loop`). Starting the same command again continues from it; on CPU the losses
then match an uninterrupted run exactly (on GPU up to non-deterministic kernels). ``--stop-at-step`` /
``--time-limit-min`` end a run early with a checkpoint, to split training across time-limited sessions.

Outputs in ``out_dir``: ``train.log``, ``metrics.jsonl`` (one JSON object per logged step, plus an
``"event": "eval"`` line with the final zero-shot accuracy and training-free mIoU), ``last.pt``, and at the
end ``shapesclip_rn.safetensors`` (open_clip state-dict keys, float16) with ``open_clip_config.json``
(resolved model config, preprocessing and training config). Either::

    clipdense.clip.load_clip("ShapesCLIP-RN", "out_dir/shapesclip_rn.safetensors")  # the default architecture
    clipdense.clip.load_clip("local-dir:out_dir", None)                             # any architecture

loads the weights strictly.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from clipdense.clip.dense import dense_clip_encoder
from clipdense.data.shapesworld import (
    CLIP_SEED_OFFSET,
    ShapesWorldCaptions,
    ShapesWorldConfig,
    render_scene_cache,
)
from clipdense.evaluation.shapesworld import zero_shot_accuracy
from clipdense.fileio import atomic_write, atomic_write_text
from clipdense.training.loop import (
    RunLog,
    StopRequests,
    capture_state,
    check_resume,
    load_state,
    restore_state,
    save_state,
    seed_everything,
    seed_worker,
)

__all__ = [
    "MODEL_CONFIG_PATH",
    "MODEL_NAME",
    "PretrainConfig",
    "PretrainResult",
    "create_model",
    "get_tokenizer",
    "main",
    "register_model_config",
    "resolve_model_config",
    "train",
    "zero_shot_accuracy",
]

logger = logging.getLogger(__name__)

MODEL_NAME = "ShapesCLIP-RN"
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "clip" / "model_configs"
MODEL_CONFIG_PATH = MODEL_CONFIG_DIR / f"{MODEL_NAME}.json"
CONFIG_NAME = "open_clip_config.json"
CHECKPOINT_NAME = "last.pt"
# Fields that must match between a checkpoint and the config resuming it (they shape the trajectory).
_RESUME_KEYS = (
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_frac",
    "grad_clip_norm",
    "image_size",
    "num_scenes",
    "data_seed",
    "seed",
    "single_object_warmup_frac",
    "locked_image_frac",
    "single_object_caption_prob",
    "model_name",
    "model_overrides",
    "init_text_from",
    "lock_text",
    "distill_from",
    "distill_weight",
    "distill_dense_weight",
)


def weights_name(model_name: str) -> str:
    """File name of a run's final weights: ``shapesclip_rn.safetensors`` for ``ShapesCLIP-RN``, and so on."""
    return model_name.lower().replace("-", "_") + ".safetensors"


@dataclass
class PretrainConfig:
    """Contrastive pre-training configuration.

    Attributes:
        out_dir: Output folder (logs, checkpoints, final weights).
        steps: Total optimizer steps.
        batch_size: Image-caption pairs per step.
        lr: Peak learning rate of the one-cycle schedule.
        weight_decay: AdamW weight decay (not applied to biases, norms, embeddings or the logit scale).
        warmup_frac: Fraction of steps spent warming up (OneCycleLR ``pct_start``).
        grad_clip_norm: Gradient-norm clipping threshold (None: no clipping).
        image_size: Image side S of scenes and model input.
        num_scenes: Number of distinct training scenes (generated on the fly).
        data_seed: Seed of scene 0 (scene i uses ``data_seed + i``).
        seed: Seed of initialisation and data order.
        single_object_warmup_frac: Fraction of the steps (the first ones) trained on one-object scenes with
            their plain captions ("a photo of a small red circle", see
            :func:`~clipdense.data.shapesworld.training_scene`) against the text transformer at its random
            initialisation (only the text projection, final norm and logit scale train). From scratch, both
            towers must discover shape words together, which takes thousands of steps on full scenes; against
            fixed random text features the image tower learns colour and shape at once, as with class labels.
        locked_image_frac: Fraction of the steps right after the warm-up in which the image tower is locked
            (eval mode, no gradients) and the text tower learns the full scenes' captions against it, as in
            LiT (Zhai et al., CVPR 2022); then both towers train.
        single_object_caption_prob: Fraction of captions that name one object of the scene (the others
            name all, or as many as fit); single-object captions are what make the dense features local.
        cache: Render the ``num_scenes`` scenes once into a memory-mapped uint8 cache (in ``cache_dir``)
            and train from it; False renders every scene again each time it is drawn (same pixels).
        cache_dir: Scene cache folder (default ``out_dir/scene_cache``, removed when the run finishes;
            a folder given here is kept, so that several runs can share it).
        bf16: Use bf16 autocast on CUDA (ignored on CPU).
        channels_last: Run the image tower in channels-last memory format (faster convolutions on CPU).
        threads: torch intra-op threads (None: torch's default, one per core).
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
        workers: DataLoader worker processes (the scene cache is rendered by one process per core).
        log_every: Log every this many steps.
        ckpt_every: Save ``last.pt`` every this many steps.
        eval_images: Images for the final zero-shot accuracy (0: skip).
        eval_scenes: Held-out scenes for the final training-free segmentation mIoU (0: skip).
        resume: Continue from ``out_dir/last.pt`` if present (else start over, overwriting it).
        stop_at_step: End this invocation (with a checkpoint) once this global step is reached.
        time_limit_min: End this invocation (with a checkpoint) after this many minutes.
        model_name: open_clip model config name.
        model_overrides: Recursively merged over the model config (e.g. a tiny architecture for tests).
        init_text_from: ``"MODEL:TAG"`` of a CLIP whose text tower (token and positional embeddings,
            transformer, final norm, projection, logit scale) initialises this one, e.g.
            ``"ShapesCLIP-RN:shapesworld"`` (the shipped weights); the text configs and ``embed_dim`` must
            match. None: random initialisation.
        lock_text: Keep the whole text tower fixed for the whole run (LiT, Zhai et al. CVPR 2022, with the
            towers' roles swapped: a trained text tower teaches a new image tower); only the logit scale
            trains on the text side. Needs ``init_text_from``.
        distill_from: ``"MODEL:TAG"`` of a frozen CLIP whose image embeddings the image tower also learns to
            match (cosine distance, weight ``distill_weight``, added to the contrastive loss): a dense
            per-image target where the contrastive loss over a batch of 64 captions can be met by colour alone.
            None: contrastive loss only.
        distill_weight: Weight of the distillation term.
        distill_dense_weight: Weight of the dense distillation term: the MaskCLIP dense embeddings (value path
            of the last block) average-pooled to the teacher's grid against the teacher's, cell by cell
            (cosine distance): local targets in the text space, for the path that MaskCLIP segments with.
    """

    out_dir: str = "runs/shapesclip_rn"
    steps: int = 8000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    grad_clip_norm: float | None = 1.0
    image_size: int = 128
    num_scenes: int = 100_000
    data_seed: int = CLIP_SEED_OFFSET
    seed: int = 0
    single_object_warmup_frac: float = 0.35
    locked_image_frac: float = 0.1
    single_object_caption_prob: float = 0.5
    cache: bool = True
    cache_dir: str | None = None
    bf16: bool = True
    channels_last: bool = True
    threads: int | None = None
    device: str = "auto"
    workers: int = 0
    log_every: int = 20
    ckpt_every: int = 250
    eval_images: int = 560
    eval_scenes: int = 100
    resume: bool = True
    stop_at_step: int | None = None
    time_limit_min: float | None = None
    model_name: str = MODEL_NAME
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_text_from: str | None = None
    lock_text: bool = False
    distill_from: str | None = None
    distill_weight: float = 1.0
    distill_dense_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.lock_text and self.init_text_from is None:
            raise ValueError(
                "PretrainConfig.lock_text needs init_text_from: a locked random text tower learns nothing."
            )
        for name in ("init_text_from", "distill_from"):
            source = getattr(self, name)
            if source is not None and ":" not in source:
                raise ValueError(f"PretrainConfig.{name} must be MODEL:TAG, got {source!r}.")
        if self.distill_weight < 0 or self.distill_dense_weight < 0:
            raise ValueError("PretrainConfig.distill_weight and distill_dense_weight must be >= 0.")
        for name in ("steps", "batch_size", "num_scenes", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.batch_size < 2:
            raise ValueError("PretrainConfig.batch_size must be >= 2: a contrastive loss needs negatives.")
        if self.workers < 0 or self.eval_images < 0 or self.eval_scenes < 0:
            raise ValueError("PretrainConfig.workers, eval_images and eval_scenes must be >= 0.")
        if not 0.0 < self.warmup_frac < 1.0:
            raise ValueError(f"PretrainConfig.warmup_frac must be in (0, 1), got {self.warmup_frac}.")
        for name in ("single_object_warmup_frac", "locked_image_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PretrainConfig.{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.single_object_warmup_frac + self.locked_image_frac > 1.0:
            raise ValueError("PretrainConfig: single_object_warmup_frac + locked_image_frac must be <= 1.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"PretrainConfig.threads must be >= 1 or None, got {self.threads}.")
        self.world()  # validates the world options

    def phases(self) -> tuple[int, int]:
        """(end of the one-object warm-up, end of the locked-image phase), in steps."""
        warm = round(self.single_object_warmup_frac * self.steps)
        return warm, min(warm + round(self.locked_image_frac * self.steps), self.steps)

    def world(self) -> ShapesWorldConfig:
        """The ShapesWorld configuration of the training scenes."""
        return ShapesWorldConfig(image_size=self.image_size, single_object_caption_prob=self.single_object_caption_prob)


#: Named presets of :class:`PretrainConfig` fields. ``cpu`` is the dataclass defaults: the recipe found by
#: measurement on 2 CPU cores (README, "ShapesWorld"). ``gpu`` is the earlier, larger recipe for a GPU
#: (160 px, batch 512, the wider ShapesCLIP of the first design); its weights load with ``local-dir:OUT``.
RECIPES: dict[str, dict[str, Any]] = {
    "cpu": {},
    "gpu": {
        "steps": 3000,
        "batch_size": 512,
        "lr": 5e-4,
        "warmup_frac": 0.1,
        "image_size": 160,
        "num_scenes": 120_000,
        "single_object_warmup_frac": 0.0,
        "locked_image_frac": 0.0,
        "cache": False,
        "workers": 8,
        "model_overrides": {"vision_cfg": {"width": 32}, "text_cfg": {"width": 256, "heads": 4, "layers": 4}},
    },
    # ShapesCLIP-ViT (patch 8 at 128 px: a 16 x 16 token grid) taught by the shipped ShapesCLIP-RN: its text tower,
    # locked (the text side already names colours, shapes, sizes, relations and backgrounds), and its image
    # embeddings, distilled. Patch 8 because the stride-32 RN's 4 x 4 grid is what limits its masks; 23.7 pairs/s
    # at width 128 x 6 layers on 2 cores (width 192: 12.6; patch 16 at 256 px: 17.9). Contrastive loss alone at
    # lr 1e-3 with no warm-up sat at 21-23% zero-shot from step 250 to 500 (README, "ShapesWorld"), hence the
    # distillation, the one-object warm-up and the lower learning rate.
    "vit": {
        "model_name": "ShapesCLIP-ViT",
        "out_dir": "runs/shapesclip_vit",
        "steps": 1300,
        "lr": 5e-4,
        "warmup_frac": 0.1,
        "num_scenes": 60_000,
        "single_object_warmup_frac": 0.3,
        "locked_image_frac": 0.0,
        "init_text_from": "ShapesCLIP-RN:shapesworld",
        "lock_text": True,
        "distill_from": "ShapesCLIP-RN:shapesworld",
    },
}


@dataclass
class PretrainResult:
    """What :func:`train` did.

    Attributes:
        step: Global step reached.
        finished: Whether all steps are done (final weights written).
        losses: (step, loss) of every step run in this invocation.
        weights_path: Final safetensors file (None unless finished).
        zero_shot_accuracy: Final zero-shot accuracy (None unless finished and evaluated).
        miou_objects: Final training-free mIoU (%) on object pixels of the ``maskclip`` (value path) and
            ``vanilla`` (q-k path) modes (None unless finished and evaluated).
    """

    step: int
    finished: bool
    losses: list[tuple[int, float]]
    weights_path: Path | None = None
    zero_shot_accuracy: float | None = None
    miou_objects: dict[str, float] | None = None


# ----------------------------------------------------------------------------------------------------------
# Model and tokenizer
# ----------------------------------------------------------------------------------------------------------


def register_model_config() -> None:
    """Registers ``ShapesCLIP-RN`` and ``ShapesCLIP-ViT`` with open_clip (idempotent)."""
    from clipdense.clip.loading import register_model_configs

    if not MODEL_CONFIG_PATH.is_file():
        raise FileNotFoundError(
            f"ShapesCLIP model config not found at {MODEL_CONFIG_PATH}; reinstall clipdense with its package data."
        )
    register_model_configs()


@functools.cache
def _source_clip(source: str) -> torch.nn.Module:
    """The CLIP ``MODEL:TAG`` on the CPU, loaded once per run for both ``init_text_from`` and ``distill_from``."""
    from clipdense.clip.loading import load_clip

    name, tag = source.split(":", 1)
    return load_clip(name, tag, device="cpu").model


def _init_text_tower(model: torch.nn.Module, source: str) -> None:
    """Copies the text tower (every weight outside ``visual.``) of the CLIP ``MODEL:TAG`` into ``model``."""
    teacher = _source_clip(source).state_dict()
    text = {k: v for k, v in teacher.items() if not k.startswith("visual.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    wrong = sorted(k for k in own if k not in text or text[k].shape != own[k].shape)
    if wrong:
        raise ValueError(
            f"init_text_from={source!r}: its text tower does not fit this model ({len(wrong)} keys differ, e.g. "
            f"{wrong[0]}); use the same text_cfg and embed_dim."
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(text[k].to(v.dtype))
    logger.info("text tower initialised from %s (%d tensors)", source, len(own))


class _Objective:
    """The training loss of one batch: open_clip's contrastive loss, plus, with a teacher CLIP, ``weight`` x the
    mean cosine distance of the image embeddings to the teacher's and ``dense_weight`` x that of the MaskCLIP
    dense embeddings (value path) average-pooled to the teacher's grid to the teacher's, cell by cell."""

    def __init__(self, teacher: torch.nn.Module | None = None, weight: float = 1.0, dense_weight: float = 0.0) -> None:
        from open_clip.loss import ClipLoss

        self.contrastive, self.teacher, self.weight, self.dense_weight = ClipLoss(), teacher, weight, dense_weight

    def __call__(self, model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Loss of ``model`` on ``images`` (B x 3 x S x S) and their tokenized captions ``texts`` (B x L)."""
        if self.teacher is None or self.dense_weight == 0:
            image_features, text_features, logit_scale = model(images, texts)
            student_dense = None
        else:
            out = dense_clip_encoder(model.visual, "maskclip")(images)  # global_embed is encode_image's
            image_features = F.normalize(out.global_embed, dim=-1)
            text_features, logit_scale = model.encode_text(texts, normalize=True), model.logit_scale.exp()
            student_dense = out.dense
        loss = self.contrastive(image_features, text_features, logit_scale)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            if student_dense is None:
                target = self.teacher.encode_image(images, normalize=True)
            else:
                teacher_out = dense_clip_encoder(self.teacher.visual, "maskclip")(images)
                target, target_dense = F.normalize(teacher_out.global_embed, dim=-1), teacher_out.dense
        loss = loss + self.weight * (1.0 - (image_features * target.to(image_features.dtype)).sum(-1)).mean()
        if student_dense is not None:
            pooled = F.adaptive_avg_pool2d(student_dense, target_dense.shape[-2:])
            cosine = F.cosine_similarity(pooled, target_dense.to(pooled.dtype), dim=1)  # B x h x w
            loss = loss + self.dense_weight * (1.0 - cosine).mean()
        return loss


def _load_teacher(source: str, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The frozen image tower's CLIP ``MODEL:TAG`` (eval mode, no gradients) for ``distill_from``."""
    teacher = copy.deepcopy(_source_clip(source)).to(device).float().eval().requires_grad_(False)
    if channels_last:
        teacher.visual.to(memory_format=torch.channels_last)
    logger.info("distilling the image embeddings of %s", source)
    return teacher


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_model_config(cfg: PretrainConfig) -> dict[str, Any]:
    """Model config: the named open_clip config, merged with ``model_overrides``, image size set.

    Returns:
        Dict with ``embed_dim``, ``vision_cfg``, ``text_cfg`` (and any other CLIP kwargs).
    """
    import open_clip

    register_model_config()
    base = open_clip.get_model_config(cfg.model_name)
    if base is None:
        raise ValueError(
            f"Unknown open_clip model {cfg.model_name!r}; register its JSON with open_clip.add_model_config first."
        )
    resolved = _merge(base, cfg.model_overrides)
    resolved["vision_cfg"]["image_size"] = cfg.image_size
    return resolved


def create_model(cfg: PretrainConfig, model_cfg: dict[str, Any] | None = None) -> torch.nn.Module:
    """Builds a randomly initialised CLIP for ``cfg`` (uses the current torch RNG state)."""
    import open_clip

    model_cfg = model_cfg if model_cfg is not None else resolve_model_config(cfg)
    return open_clip.create_model(cfg.model_name, pretrained=None, **copy.deepcopy(model_cfg))


def get_tokenizer(cfg: PretrainConfig, model_cfg: dict[str, Any] | None = None):
    """open_clip tokenizer for the model, with the model's context length (24 for ShapesCLIP-RN)."""
    import open_clip

    model_cfg = model_cfg if model_cfg is not None else resolve_model_config(cfg)
    return open_clip.get_tokenizer(cfg.model_name, context_length=model_cfg["text_cfg"]["context_length"])


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


class _StreamSampler(Sampler[int]):
    """Endless stream of per-epoch random permutations of ``range(n)``, starting at a global position.

    Sample ``p`` of the stream depends only on (seed, p), so a resumed run sees exactly the samples an
    uninterrupted one would.
    """

    def __init__(self, n: int, seed: int, start: int) -> None:
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.n)
        while True:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            yield from torch.randperm(self.n, generator=generator)[offset:].tolist()
            epoch, offset = epoch + 1, 0


class _Collate:
    """Stacks images and tokenizes captions (runs in the DataLoader workers)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: Sequence[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, captions = zip(*batch, strict=True)
        return torch.stack(images), self.tokenizer(list(captions))


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was requested but CUDA is not available; use --device cpu or auto.")
    return device


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale", "embedding"))
        (no_decay if exclude else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_final(model: torch.nn.Module, cfg: PretrainConfig, model_cfg: dict[str, Any], out: Path) -> Path:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    weights = out / weights_name(cfg.model_name)
    # float16 halves the file (the shipped weights must stay small); last.pt keeps float32 for training on.
    state = {
        k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    metadata = {"format": "pt", "model_name": cfg.model_name, "dtype": "float16"}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    config = {
        "model_name": cfg.model_name,
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "size": cfg.image_size,
            "mean": list(OPENAI_DATASET_MEAN),
            "std": list(OPENAI_DATASET_STD),
        },
        "train_cfg": asdict(cfg),
    }
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return weights


def _cache_dir(cfg: PretrainConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir is not None else Path(cfg.out_dir) / "scene_cache"


#: The one-object warm-up scenes start this far after ``data_seed`` (inside the CLIP seed range).
WARMUP_SEED_SHIFT = 50_000_000


@dataclass
class _Stream:
    """Steps ``start`` to ``stop - 1`` draw their batches from ``dataset``."""

    start: int
    stop: int
    dataset: ShapesWorldCaptions


def _streams(cfg: PretrainConfig, cache_dir: Path | None) -> list[_Stream]:
    """The run's data: one-object warm-up scenes (if any), then full scenes; cached first if asked."""
    world = cfg.world()
    warm = cfg.phases()[0]
    parts = []
    if warm > 0:
        parts.append((0, warm, min(warm * cfg.batch_size, cfg.num_scenes), cfg.data_seed + WARMUP_SEED_SHIFT, True))
    if warm < cfg.steps:
        parts.append((warm, cfg.steps, cfg.num_scenes, cfg.data_seed, False))
    streams = []
    for start, stop, count, seed, single in parts:
        cache = None
        if cache_dir is not None:
            cache = cache_dir / f"{'single_object' if single else 'scenes'}_{cfg.image_size}px"
            logger.info("scene cache: %s", cache)
            render_scene_cache(cache, count, seed, world, workers=os.cpu_count() or 1, single_object=single)
        streams.append(_Stream(start, stop, ShapesWorldCaptions(count, seed, world, cache, single_object=single)))
    return streams


def train(cfg: PretrainConfig) -> PretrainResult:
    """Runs (or resumes) contrastive pre-training. See the module docstring for outputs.

    Args:
        cfg: Training configuration.

    Returns:
        A :class:`PretrainResult`.
    """
    device = _resolve_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model_cfg = resolve_model_config(cfg)
    model = create_model(cfg, model_cfg)
    if cfg.init_text_from is not None:
        _init_text_tower(model, cfg.init_text_from)
    model = model.to(device)
    if cfg.channels_last:
        model.visual.to(memory_format=torch.channels_last)
    tokenizer = get_tokenizer(cfg, model_cfg)
    # One fused kernel per step instead of a loop over tensors (about 7x faster AdamW on CPU).
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.lr,
        total_steps=cfg.steps,
        # OneCycleLR divides by zero unless both of its phases are longer than one step
        pct_start=min(max(cfg.warmup_frac, 1.5 / cfg.steps), 1.0 - 0.5 / cfg.steps),
        anneal_strategy="cos",
        cycle_momentum=False,
    )
    out = Path(cfg.out_dir)
    ckpt_path, parts = out / CHECKPOINT_NAME, {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    resume_step = None
    if cfg.resume and ckpt_path.exists():
        ckpt = load_state(ckpt_path)
        hint = "Use the original settings, another --out folder, or --no-resume to start over."
        check_resume(ckpt["config"], {k: asdict(cfg)[k] for k in _RESUME_KEYS}, ckpt_path, hint=hint)
        resume_step = restore_state(ckpt, **parts)
    step = resume_step or 0

    def save_checkpoint(at_step: int) -> None:
        state = {**capture_state(at_step, **parts), "config": asdict(cfg), "model_cfg": model_cfg}
        save_state(ckpt_path, state)
        logger.info("saved checkpoint at step %d", at_step)

    with RunLog(out, logger, resume_step) as log:
        if resume_step is None:
            logger.info("starting %s: %s", cfg.model_name, json.dumps(asdict(cfg)))
        else:
            logger.info("resumed from %s at step %d", ckpt_path, step)
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        logger.info("model: %.2fM parameters on %s, config %s", millions, device, json.dumps(model_cfg))
        losses: list[tuple[int, float]] = []
        cache_dir = _cache_dir(cfg) if cfg.cache else None
        if step < cfg.steps:
            batches_at = functools.partial(_batches_at, cfg, _streams(cfg, cache_dir), tokenizer, device)
            teacher = None if cfg.distill_from is None else _load_teacher(cfg.distill_from, device, cfg.channels_last)
            objective = _Objective(teacher, cfg.distill_weight, cfg.distill_dense_weight)
            losses = _loop(cfg, model, optimizer, scheduler, objective, batches_at, device, step, log, save_checkpoint)
            step = losses[-1][0] if losses else step
        if step < cfg.steps:
            return PretrainResult(step=step, finished=False, losses=losses)

        weights = _save_final(model, cfg, resolve_model_config(cfg), out)
        logger.info("saved final weights to %s", weights)
        if cache_dir is not None and cfg.cache_dir is None and cache_dir.exists():
            shutil.rmtree(cache_dir)  # the default cache lives in the run folder and is only needed for training
            logger.info("removed the scene cache %s", cache_dir)
        result = PretrainResult(step=step, finished=True, losses=losses, weights_path=weights)
        if cfg.eval_images > 0 or cfg.eval_scenes > 0:
            _evaluate_saved(cfg, out, device, result)
            record = {"event": "eval", "step": step, "zero_shot_accuracy": result.zero_shot_accuracy}
            record.update({"images": cfg.eval_images, "scenes": cfg.eval_scenes, "miou_objects": result.miou_objects})
            log.write(record)
        return result


def _batches_at(
    cfg: PretrainConfig, streams: list[_Stream], tokenizer, device: torch.device, at_step: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches from ``at_step`` to the end of the stream that holds it."""
    stream = next(s for s in streams if s.start <= at_step < s.stop)
    loader = DataLoader(
        stream.dataset,
        batch_size=cfg.batch_size,
        sampler=_StreamSampler(len(stream.dataset), cfg.seed, start=(at_step - stream.start) * cfg.batch_size),
        num_workers=cfg.workers,
        collate_fn=_Collate(tokenizer),
        pin_memory=device.type == "cuda",
        drop_last=True,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(cfg.seed),
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    return itertools.islice(loader, stream.stop - at_step)


def _evaluate_saved(cfg: PretrainConfig, out: Path, device: torch.device, result: PretrainResult) -> None:
    """Scores the weights as saved (what users load), at the training image size, into ``result``."""
    from clipdense.clip.loading import load_clip
    from clipdense.evaluation.shapesworld import dense_quality

    clip = load_clip(f"local-dir:{out}", None, device=device)
    world = ShapesWorldConfig(image_size=cfg.image_size)
    if cfg.eval_images > 0:
        result.zero_shot_accuracy = zero_shot_accuracy(clip.model, clip.tokenizer, world, cfg.eval_images)
        logger.info("zero-shot accuracy over %d images: %.4f", cfg.eval_images, result.zero_shot_accuracy)
    if cfg.eval_scenes > 0:
        quality = dense_quality(clip, world, num_scenes=cfg.eval_scenes, modes=("maskclip", "vanilla"), progress=False)
        result.miou_objects = {q.mode: q.miou_objects for q in quality}
        logger.info("training-free mIoU on object pixels over %d scenes: %s", cfg.eval_scenes, result.miou_objects)


#: Text-tower parameters that train during the one-object warm-up (see ``single_object_warmup_frac``).
_UNLOCKED_TEXT = ("text_projection", "ln_final.weight", "ln_final.bias", "logit_scale")


def _set_phase(model: torch.nn.Module, cfg: PretrainConfig, step: int) -> None:
    """Locks what the recipe's phase at ``step`` locks (a function of the step, so resumed runs agree)."""
    warm, locked_image_end = cfg.phases()
    for name, param in model.named_parameters():
        if name.startswith("visual."):
            param.requires_grad_(not warm <= step < locked_image_end)
        elif cfg.lock_text:
            param.requires_grad_(name == "logit_scale")
        elif name not in _UNLOCKED_TEXT:
            param.requires_grad_(step >= warm)
    model.visual.train(not warm <= step < locked_image_end)  # a locked tower keeps its BatchNorm statistics


def _loop(
    cfg: PretrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: _Objective,
    batches_at: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    device: torch.device,
    step: int,
    log: RunLog,
    save_checkpoint: Callable[[int], None],
) -> list[tuple[int, float]]:
    """Optimizes from ``step`` until done or stopped; checkpoints on the way. Returns (step, loss) pairs."""
    losses: list[tuple[int, float]] = []
    model.train()
    start_time = last_time = time.monotonic()
    last_step = step
    max_logit_scale = math.log(100.0)
    stop_at = min(cfg.steps, cfg.stop_at_step) if cfg.stop_at_step is not None else cfg.steps
    batches = batches_at(step)
    boundaries = {0: "one-object warm-up, text transformer locked", cfg.phases()[0]: "image tower locked",
                  cfg.phases()[1]: "both towers train"}  # fmt: skip
    with StopRequests() as stops, log.progress(cfg.steps, step, "ShapesCLIP pretrain") as bar:
        while step < stop_at:
            _set_phase(model, cfg, step)
            if step in boundaries and (step > 0 or cfg.phases()[0] > 0):
                logger.info("step %d: %s", step, boundaries[step])
            batch = next(batches, None)
            if batch is None:  # the stream ended: the next one starts here
                batches = batches_at(step)
                batch = next(batches)
            images, texts = batch
            images = images.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            texts = texts.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16):
                loss = loss_fn(model, images, texts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, max_logit_scale)
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"Loss became {value} at step {step}; lower --lr or check the data. "
                    f"The last good checkpoint is {log.out_dir / CHECKPOINT_NAME}."
                )
            losses.append((step, value))
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if step % cfg.log_every == 0 or step == stop_at:
                now = time.monotonic()
                record = {
                    "step": step,
                    "loss": value,
                    "lr": lr,
                    "logit_scale": float(model.logit_scale.detach().exp()),
                    "samples_per_s": (step - last_step) * cfg.batch_size / max(now - last_time, 1e-9),
                    "elapsed_s": now - start_time,
                }
                log.write(record)
                last_time, last_step = now, step
            out_of_time = cfg.time_limit_min is not None and time.monotonic() - start_time > 60.0 * cfg.time_limit_min
            if step % cfg.ckpt_every == 0 or step == stop_at or out_of_time or stops.requested:
                save_checkpoint(step)  # at a step boundary, so a Ctrl-C mid-step still resumes bit for bit
            if out_of_time:
                logger.info("time limit of %.1f min reached at step %d; stopping", cfg.time_limit_min, step)
                break
            if stops.requested:
                logger.info(
                    "stopped by %s at step %d; the same command resumes", signal.Signals(stops.signal).name, step
                )
                break
    return losses


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    d = PretrainConfig()
    p = argparse.ArgumentParser(
        prog="clipdense shapesworld train",
        description="Contrastive pre-training of ShapesCLIP on ShapesWorld captions (resumable). The defaults are "
        "the CPU recipe (about 100 minutes on 2 cores); --recipe gpu is the larger GPU recipe. Any option given "
        "overrides the recipe's value.",
    )
    arg = p.add_argument
    arg("--recipe", choices=sorted(RECIPES), default="cpu", help="preset of the options below (default: cpu)")
    arg("--out", dest="out_dir", help=f"output folder (default: {d.out_dir})")
    arg("--steps", type=int, help=f"optimizer steps (cpu: {d.steps})")
    arg("--batch-size", type=int, help=f"pairs per step (cpu: {d.batch_size})")
    arg("--lr", type=float, help=f"peak learning rate (cpu: {d.lr})")
    arg("--weight-decay", type=float, help=f"AdamW weight decay (cpu: {d.weight_decay})")
    arg("--warmup-frac", type=float, help=f"one-cycle warm-up fraction (cpu: {d.warmup_frac})")
    arg("--grad-clip-norm", type=float, help=f"gradient clipping, <= 0: off (cpu: {d.grad_clip_norm})")
    arg("--image-size", type=int, help=f"training image side (cpu: {d.image_size})")
    arg("--num-scenes", type=int, help=f"distinct training scenes (cpu: {d.num_scenes})")
    arg(
        "--single-object-warmup-frac",
        type=float,
        help=f"first steps: one-object scenes, text transformer locked (cpu: {d.single_object_warmup_frac})",
    )
    arg("--locked-image-frac", type=float,
        help=f"next steps: image tower locked, text learns the captions (cpu: {d.locked_image_frac})")  # fmt: skip
    arg("--single-object-captions", dest="single_object_caption_prob", type=float,
        help=f"fraction of single-object captions (cpu: {d.single_object_caption_prob})")  # fmt: skip
    arg("--data-seed", type=int, help=f"seed of scene 0 (default: {d.data_seed})")
    arg("--seed", type=int, help=f"init and data-order seed (default: {d.seed})")
    arg("--no-cache", dest="cache", action="store_const", const=False, help="render scenes on the fly, no cache")
    arg("--cache-dir", help="scene cache folder, kept after training (default: OUT/scene_cache, removed at the end)")
    arg("--no-bf16", dest="bf16", action="store_const", const=False, help="disable bf16 autocast on CUDA")
    arg("--no-channels-last", dest="channels_last", action="store_const", const=False,
        help="keep the image tower in the default memory format")  # fmt: skip
    arg("--threads", type=int, help="torch intra-op threads (default: one per core)")
    arg("--device", help=f"auto, cpu, cuda, cuda:N (default: {d.device})")
    arg("--workers", type=int, help=f"DataLoader workers (cpu: {d.workers})")
    arg("--log-every", type=int, help=f"log interval in steps (default: {d.log_every})")
    arg("--ckpt-every", type=int, help=f"checkpoint interval in steps (default: {d.ckpt_every})")
    arg("--eval-images", type=int, help=f"final zero-shot images, 0: skip (default: {d.eval_images})")
    arg("--eval-scenes", type=int, help=f"final segmentation scenes, 0: skip (default: {d.eval_scenes})")
    arg("--no-resume", dest="resume", action="store_const", const=False, help="ignore OUT/last.pt and start over")
    arg("--stop-at-step", type=int, help="checkpoint and exit at this step")
    arg("--time-limit-min", type=float, help="checkpoint and exit after this many minutes")
    arg("--model-name", help=f"open_clip model config (default: {d.model_name})")
    arg("--model-overrides", help="JSON merged over the model config, e.g. '{\"embed_dim\": 128}'")
    arg("--init-text-from", help="MODEL:TAG whose text tower initialises this one (vit: ShapesCLIP-RN:shapesworld)")
    arg("--lock-text", dest="lock_text", action="store_const", const=True,
        help="keep the text tower fixed (vit recipe: on)")  # fmt: skip
    arg("--distill-from", help="MODEL:TAG whose image embeddings the image tower also matches")
    arg("--distill-weight", type=float, help=f"weight of the distillation term (default: {d.distill_weight})")
    arg("--distill-dense-weight", type=float,
        help=f"weight of the dense (value path) distillation term (default: {d.distill_dense_weight})")  # fmt: skip
    return p


def config_from_args(argv: Sequence[str] | None = None) -> PretrainConfig:
    """The :class:`PretrainConfig` of a command line: the recipe's values, then every option given."""
    args = vars(_parser().parse_args(argv))
    given = {k: v for k, v in args.items() if v is not None and k != "recipe"}
    if "model_overrides" in given:
        try:
            given["model_overrides"] = json.loads(given["model_overrides"])
        except json.JSONDecodeError as e:
            raise SystemExit(f"--model-overrides is not valid JSON ({e}); pass e.g. '{{\"embed_dim\": 128}}'.") from e
    if given.get("grad_clip_norm", 1.0) <= 0:
        given["grad_clip_norm"] = None
    return PretrainConfig(**{**RECIPES[args["recipe"]], **given})


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point. Returns 0 (also after an early, resumable stop: see the printed status)."""
    cfg = config_from_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = train(cfg)
    if result.finished:
        accuracy = "n/a" if result.zero_shot_accuracy is None else f"{result.zero_shot_accuracy:.4f}"
        print(f"done: step {result.step}, weights {result.weights_path}, zero-shot accuracy {accuracy}")
        if result.miou_objects:
            print("mIoU on object pixels: " + ", ".join(f"{k} {v:.1f}" for k, v in result.miou_objects.items()))
        return 0
    print(f"stopped at step {result.step} of {cfg.steps}; run the same command again to resume")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
