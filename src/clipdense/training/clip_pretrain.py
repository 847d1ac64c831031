"""Reproducible contrastive pre-training of ShapesCLIP (a small ResNet CLIP) on ShapesWorld captions.

Usage::

    python -m clipdense.training.clip_pretrain --out runs/shapesclip --steps 3000 --batch-size 512

The run is seeded (python, numpy, torch, data order) and resumable: ``out_dir/last.pt`` holds the model,
optimizer, scheduler, step and RNG states and is written atomically every ``ckpt_every`` steps. Starting
the same command again continues from it; on CPU the losses then match an uninterrupted run exactly
(on GPU up to non-deterministic kernels). ``--stop-at-step`` / ``--time-limit-min`` end a run early
with a checkpoint, to split training across time-limited sessions.

Outputs in ``out_dir``: ``train.log``, ``metrics.jsonl`` (one JSON object per logged step, plus an
``"event": "eval"`` line), ``last.pt``, and at the end ``shapesclip_rn.safetensors`` (open_clip state-dict
keys) with ``open_clip_config.json`` (resolved model config, preprocessing and training config). Either::

    open_clip.create_model("ShapesCLIP-RN", pretrained="out_dir/shapesclip_rn.safetensors")
    open_clip.create_model("local-dir:out_dir")

loads the weights strictly (the first form needs :func:`register_model_config` and, for a non-default
architecture, the same overrides as keyword arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from clipdense.data.shapesworld import (
    CLIP_SEED_OFFSET,
    EVAL_SEED_OFFSET,
    ShapesWorldCaptions,
    ShapesWorldConfig,
    class_names,
    normalize_image,
    single_object_scene,
)
from clipdense.fileio import atomic_write, atomic_write_text

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
MODEL_CONFIG_PATH = Path(__file__).resolve().parents[1] / "clip" / "model_configs" / f"{MODEL_NAME}.json"
WEIGHTS_NAME = "shapesclip_rn.safetensors"
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
    "model_name",
    "model_overrides",
)


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
        bf16: Use bf16 autocast on CUDA (ignored on CPU).
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
        workers: DataLoader worker processes.
        log_every: Log every this many steps.
        ckpt_every: Save ``last.pt`` every this many steps.
        eval_images: Images for the final zero-shot accuracy (0: skip).
        resume: Continue from ``out_dir/last.pt`` if present (else start over, overwriting it).
        stop_at_step: End this invocation (with a checkpoint) once this global step is reached.
        time_limit_min: End this invocation (with a checkpoint) after this many minutes.
        model_name: open_clip model config name.
        model_overrides: Recursively merged over the model config (e.g. a tiny architecture for tests).
    """

    out_dir: str = "runs/shapesclip_rn"
    steps: int = 3000
    batch_size: int = 512
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    grad_clip_norm: float | None = 1.0
    image_size: int = 160
    num_scenes: int = 120_000
    data_seed: int = CLIP_SEED_OFFSET
    seed: int = 0
    bf16: bool = True
    device: str = "auto"
    workers: int = 8
    log_every: int = 20
    ckpt_every: int = 250
    eval_images: int = 560
    resume: bool = True
    stop_at_step: int | None = None
    time_limit_min: float | None = None
    model_name: str = MODEL_NAME
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_scenes", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.batch_size < 2:
            raise ValueError("PretrainConfig.batch_size must be >= 2: a contrastive loss needs negatives.")
        if self.workers < 0 or self.eval_images < 0:
            raise ValueError("PretrainConfig.workers and eval_images must be >= 0.")
        if not 0.0 < self.warmup_frac < 1.0:
            raise ValueError(f"PretrainConfig.warmup_frac must be in (0, 1), got {self.warmup_frac}.")


@dataclass
class PretrainResult:
    """What :func:`train` did.

    Attributes:
        step: Global step reached.
        finished: Whether all steps are done (final weights written).
        losses: (step, loss) of every step run in this invocation.
        weights_path: Final safetensors file (None unless finished).
        zero_shot_accuracy: Final zero-shot accuracy (None unless finished and evaluated).
    """

    step: int
    finished: bool
    losses: list[tuple[int, float]]
    weights_path: Path | None = None
    zero_shot_accuracy: float | None = None


# ----------------------------------------------------------------------------------------------------------
# Model and tokenizer
# ----------------------------------------------------------------------------------------------------------


def register_model_config() -> None:
    """Registers ``ShapesCLIP-RN`` with open_clip (idempotent)."""
    import open_clip

    if MODEL_NAME in open_clip.list_models():
        return
    if not MODEL_CONFIG_PATH.is_file():
        raise FileNotFoundError(
            f"ShapesCLIP model config not found at {MODEL_CONFIG_PATH}; reinstall clipdense with its package data."
        )
    open_clip.add_model_config(MODEL_CONFIG_PATH)


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


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def zero_shot_accuracy(
    model: torch.nn.Module,
    tokenizer,
    cfg: ShapesWorldConfig | None = None,
    num_images: int = 560,
    seed: int = 0,
    batch_size: int = 128,
) -> float:
    """Zero-shot classification accuracy on single-object ShapesWorld scenes.

    Image j shows one object of class ``j % C`` (balanced classes) and is
    ``single_object_scene(EVAL_SEED_OFFSET + seed + j, cfg, j % C)``; it is classified among all C class
    names with the prompt "a photo of a {}" by cosine similarity.

    Args:
        model: open_clip CLIP model (its device is used; bf16 autocast on CUDA).
        tokenizer: Matching tokenizer (callable on a list of strings).
        cfg: World configuration; ``cfg.image_size`` must match the model input size.
        num_images: Number of images.
        seed: Evaluation seed.
        batch_size: Images per forward pass.

    Returns:
        Top-1 accuracy in [0, 1].
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    cfg = cfg or ShapesWorldConfig()
    names = class_names(cfg)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _autocast(device, bf16=True):
            text = model.encode_text(tokenizer([f"a photo of a {name}" for name in names]).to(device), normalize=True)
        correct = 0
        for start in range(0, num_images, batch_size):
            indices = range(start, min(start + batch_size, num_images))
            targets = torch.tensor([j % len(names) for j in indices], device=device)
            images = torch.stack(
                [
                    normalize_image(single_object_scene(EVAL_SEED_OFFSET + seed + j, cfg, j % len(names)).image)
                    for j in indices
                ]
            ).to(device)
            with _autocast(device, bf16=True):
                features = model.encode_image(images, normalize=True)
            predictions = (features.float() @ text.float().T).argmax(dim=1)
            correct += int((predictions == targets).sum())
    finally:
        model.train(was_training)
    return correct / num_images


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        # numpy's key array as a tensor, so that the checkpoint loads with weights_only=True
        "numpy": tuple(torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v for v in np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(tuple(v.numpy() if isinstance(v, torch.Tensor) else v for v in state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops metric lines logged after ``step`` (by an interrupted run) to match the resume point."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _save_final(model: torch.nn.Module, cfg: PretrainConfig, model_cfg: dict[str, Any], out: Path) -> Path:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    weights = out / WEIGHTS_NAME
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    atomic_write(
        weights, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "model_name": cfg.model_name})
    )
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


def train(cfg: PretrainConfig) -> PretrainResult:
    """Runs (or resumes) contrastive pre-training. See the module docstring for outputs.

    Args:
        cfg: Training configuration.

    Returns:
        A :class:`PretrainResult`.
    """
    from open_clip.loss import ClipLoss

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        return _train(cfg, out, ClipLoss())
    finally:
        logger.removeHandler(handler)
        handler.close()


def _train(cfg: PretrainConfig, out: Path, loss_fn: torch.nn.Module) -> PretrainResult:
    device = _resolve_device(cfg.device)
    _seed_everything(cfg.seed)
    model_cfg = resolve_model_config(cfg)
    model = create_model(cfg, model_cfg).to(device)
    tokenizer = get_tokenizer(cfg, model_cfg)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.lr,
        total_steps=cfg.steps,
        pct_start=cfg.warmup_frac,
        anneal_strategy="cos",
        cycle_momentum=False,
    )
    metrics_path, ckpt_path = out / "metrics.jsonl", out / CHECKPOINT_NAME

    step = 0
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = ckpt["config"]
        mismatched = [k for k in _RESUME_KEYS if saved.get(k) != asdict(cfg)[k]]
        if mismatched:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {asdict(cfg)[k]!r}" for k in mismatched)
            raise ValueError(
                f"Cannot resume from {ckpt_path}: the config differs ({details}). Use the original settings, "
                "another --out folder, or --no-resume to start over."
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["step"])
        _set_rng_state(ckpt["rng"])
        _truncate_metrics(metrics_path, step)
        logger.info("resumed from %s at step %d", ckpt_path, step)
    else:
        if metrics_path.exists():
            metrics_path.unlink()
        logger.info("starting %s: %s", cfg.model_name, json.dumps(asdict(cfg)))
    logger.info(
        "model: %.2fM parameters on %s, config %s",
        sum(p.numel() for p in model.parameters()) / 1e6,
        device,
        json.dumps(model_cfg),
    )

    def save_checkpoint(at_step: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": at_step,
            "rng": _rng_state(),
            "config": asdict(cfg),
            "model_cfg": model_cfg,
        }
        atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
        logger.info("saved checkpoint at step %d", at_step)

    losses: list[tuple[int, float]] = []
    if step < cfg.steps:
        world = ShapesWorldConfig(image_size=cfg.image_size)
        dataset = ShapesWorldCaptions(cfg.num_scenes, base_seed=cfg.data_seed, cfg=world)
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=_StreamSampler(cfg.num_scenes, cfg.seed, start=step * cfg.batch_size),
            num_workers=cfg.workers,
            collate_fn=_Collate(tokenizer),
            pin_memory=device.type == "cuda",
            drop_last=True,
            worker_init_fn=_worker_init,
            generator=torch.Generator().manual_seed(cfg.seed),
            prefetch_factor=4 if cfg.workers > 0 else None,
        )
        losses = _loop(cfg, model, optimizer, scheduler, loss_fn, loader, device, step, metrics_path, save_checkpoint)
        step = losses[-1][0] if losses else step

    if step < cfg.steps:
        return PretrainResult(step=step, finished=False, losses=losses)

    weights = _save_final(model, cfg, resolve_model_config(cfg), out)
    logger.info("saved final weights to %s", weights)
    accuracy = None
    if cfg.eval_images > 0:
        accuracy = zero_shot_accuracy(model, tokenizer, ShapesWorldConfig(image_size=cfg.image_size), cfg.eval_images)
        logger.info("zero-shot accuracy over %d images: %.4f", cfg.eval_images, accuracy)
        _append_metrics(
            metrics_path,
            {"event": "eval", "step": step, "zero_shot_accuracy": accuracy, "images": cfg.eval_images},
        )
    return PretrainResult(step=step, finished=True, losses=losses, weights_path=weights, zero_shot_accuracy=accuracy)


def _loop(
    cfg: PretrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    step: int,
    metrics_path: Path,
    save_checkpoint,
) -> list[tuple[int, float]]:
    """Optimizes from ``step`` until done or stopped; checkpoints on the way. Returns (step, loss) pairs."""
    losses: list[tuple[int, float]] = []
    model.train()
    start_time = last_time = time.monotonic()
    last_step = step
    max_logit_scale = math.log(100.0)
    stop_at = min(cfg.steps, cfg.stop_at_step) if cfg.stop_at_step is not None else cfg.steps
    bar = tqdm(total=cfg.steps, initial=step, desc="ShapesCLIP pretrain", unit="step", dynamic_ncols=True)
    batches = iter(loader)
    try:
        while step < stop_at:
            images, texts = next(batches)
            images = images.to(device, non_blocking=True)
            texts = texts.to(device, non_blocking=True)
            with _autocast(device, cfg.bf16):
                image_features, text_features, logit_scale = model(images, texts)
                loss = loss_fn(image_features, text_features, logit_scale)
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
                    f"The last good checkpoint is {metrics_path.parent / CHECKPOINT_NAME}."
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
                _append_metrics(metrics_path, record)
                logger.info(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
                last_time, last_step = now, step
            out_of_time = cfg.time_limit_min is not None and time.monotonic() - start_time > 60.0 * cfg.time_limit_min
            if step % cfg.ckpt_every == 0 or step == stop_at or out_of_time:
                save_checkpoint(step)
            if out_of_time:
                logger.info("time limit of %.1f min reached at step %d; stopping", cfg.time_limit_min, step)
                break
    finally:
        bar.close()
    return losses


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    d = PretrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m clipdense.training.clip_pretrain",
        description="Contrastive pre-training of ShapesCLIP on on-the-fly ShapesWorld captions (resumable).",
    )
    p.add_argument("--out", default=d.out_dir, help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup-frac", type=float, default=d.warmup_frac, help="one-cycle warm-up fraction")
    p.add_argument("--grad-clip-norm", type=float, default=d.grad_clip_norm, help="gradient clipping (<= 0: off)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="image side (default: %(default)s)")
    p.add_argument("--num-scenes", type=int, default=d.num_scenes, help="distinct training scenes")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of scene 0")
    p.add_argument("--seed", type=int, default=d.seed, help="init and data-order seed")
    p.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="log interval in steps")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="checkpoint interval in steps")
    p.add_argument("--eval-images", type=int, default=d.eval_images, help="final zero-shot images (0: skip)")
    p.add_argument("--no-resume", action="store_true", help="ignore OUT/last.pt and start over")
    p.add_argument("--stop-at-step", type=int, default=None, help="checkpoint and exit at this step")
    p.add_argument("--time-limit-min", type=float, default=None, help="checkpoint and exit after this many minutes")
    p.add_argument("--model-name", default=d.model_name, help="open_clip model config (default: %(default)s)")
    p.add_argument(
        "--model-overrides",
        default="{}",
        help="JSON merged over the model config, e.g. '{\"embed_dim\": 128}'",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point. Returns 0 (also after an early, resumable stop: see the printed status)."""
    args = _parser().parse_args(argv)
    try:
        overrides = json.loads(args.model_overrides)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--model-overrides is not valid JSON ({e}); pass e.g. '{{\"embed_dim\": 128}}'.") from e
    cfg = PretrainConfig(
        out_dir=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_frac=args.warmup_frac,
        grad_clip_norm=args.grad_clip_norm if args.grad_clip_norm and args.grad_clip_norm > 0 else None,
        image_size=args.image_size,
        num_scenes=args.num_scenes,
        data_seed=args.data_seed,
        seed=args.seed,
        bf16=not args.no_bf16,
        device=args.device,
        workers=args.workers,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        eval_images=args.eval_images,
        resume=not args.no_resume,
        stop_at_step=args.stop_at_step,
        time_limit_min=args.time_limit_min,
        model_name=args.model_name,
        model_overrides=overrides,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = train(cfg)
    if result.finished:
        accuracy = "n/a" if result.zero_shot_accuracy is None else f"{result.zero_shot_accuracy:.4f}"
        print(f"done: step {result.step}, weights {result.weights_path}, zero-shot accuracy {accuracy}")
        return 0
    print(f"stopped at step {result.step} of {cfg.steps}; run the same command again to resume")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
