"""Iteration-based training of segmentation models and detectors: DDP, AMP, atomic checkpoints, exact resume.

Run with ``clipdense train CONFIG [key=value ...]`` on one process, or under ``torchrun
--nproc_per_node N`` (and ``--nnodes``) for DistributedDataParallel. What makes a resumed run
continue bit for bit where a stopped one left off:

* the data order is a function of (seed, step): :class:`StepSampler` draws one permutation per
  epoch and starts at any step without loading the skipped batches;
* each sample's augmentation is seeded by (seed, epoch, index) (:class:`SeededSamples`), so it
  does not depend on workers, ranks or what was loaded before;
* model, optimiser, scheduler, gradient scaler and RNG states are saved together in a step
  folder, and a ``latest`` pointer is replaced atomically only after the folder is complete
  (RNG, resume checks and logging come from :mod:`clipdense.training.loop`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from clipdense.config import ConfigError, ExperimentConfig, save_config
from clipdense.data.checks import ReportSkipped, SkipBadSamples, SkippedSample
from clipdense.data.datasets import DETECTION_DATASET
from clipdense.fileio import atomic_write_json
from clipdense.runs import build_eval_dataset, is_detection, latest_checkpoint, load_weights, save_checkpoint
from clipdense.training.loop import (
    RunLog,
    StopRequests,
    capture_state,
    check_resume,
    load_state,
    restore_state,
    seed_everything,
    seed_worker,
)

logger = logging.getLogger("clipdense.train")

# The config sections a resume must match, except the keys that do not change the trajectory.
_RESUME_SECTIONS = ("model", "data", "optim", "train")
_RESUME_FREE = {"train.log_every", "train.ckpt_every", "train.eval_every", "data.workers", "model.class_names"}


# ------------------------------------------------------------------------------------------- data order


class StepSampler(Sampler):
    """Infinite stream of ``(epoch, index)`` for this rank, a pure function of (seed, step).

    Each epoch is a seeded permutation cut into global batches of ``batch_size * world_size``
    (the incomplete last batch is dropped); rank r takes its slice of every global batch.

    Args:
        num_samples: Dataset size.
        batch_size: Samples per rank per step.
        rank: This process's rank.
        world_size: Number of processes.
        seed: Data-order seed.
        start_step: First step to yield (resume).
    """

    def __init__(
        self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start_step: int = 0
    ) -> None:
        self.global_batch = batch_size * world_size
        if num_samples < self.global_batch:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one global batch ({self.global_batch}); "
                "lower train.batch_size or add data"
            )
        self.num_samples, self.batch_size, self.rank = num_samples, batch_size, rank
        self.seed, self.start_step = seed, start_step
        self.steps_per_epoch = num_samples // self.global_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step, perm_epoch, perm = self.start_step, None, None
        while True:
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
                perm_epoch = epoch
            start = k * self.global_batch + self.rank * self.batch_size
            for index in perm[start : start + self.batch_size].tolist():
                yield epoch, index
            step += 1


class SeededSamples(Dataset):
    """Runs each item's augmentation under a seed derived from (seed, epoch, index).

    Takes the ``(epoch, index)`` items of :class:`StepSampler`. The global RNG state is restored
    afterwards, so loading in the main process does not disturb the model's dropout.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]


# ------------------------------------------------------------------------------------------- optimiser


def param_groups(model: nn.Module, cfg) -> list[dict[str, Any]]:
    """AdamW groups: backbone at ``lr * backbone_lr_mult``; no weight decay on the parameters that
    ``cfg.no_decay`` names (default: those named ``*norm*`` outside the backbone, as the authors' configs);
    frozen parameters (text encoder) left out.

    The image backbone's and context decoder's parameter names start with ``model.backbone_prefix`` /
    ``model.context_decoder_prefix`` when the model says so (detectors nest them), else ``backbone.`` /
    ``context_decoder.``."""
    backbone = getattr(model, "backbone_prefix", "backbone.")
    context_decoder = getattr(model, "context_decoder_prefix", "context_decoder.")
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_backbone = name.startswith(backbone)
        mult = cfg.backbone_lr_mult if in_backbone else 1.0
        if cfg.no_decay == "norm":
            exempt = "norm" in name and not in_backbone
        elif cfg.no_decay == "context_decoder_1d":
            exempt = name.startswith(context_decoder) and p.ndim == 1
        else:
            raise ValueError(f"optim.no_decay={cfg.no_decay!r}: use 'norm' or 'context_decoder_1d'")
        wd = 0.0 if exempt else cfg.weight_decay
        groups.setdefault((mult, wd), []).append(p)
    return [{"params": ps, "lr": cfg.lr * m, "weight_decay": wd, "lr_mult": m} for (m, wd), ps in groups.items()]


def convert_sync_batchnorm(model: nn.Module, which: str = "heads") -> nn.Module:
    """SyncBatchNorm in place of BatchNorm: ``heads`` outside the image backbone only (``model.backbone_prefix``,
    default ``backbone.``), ``all`` everywhere."""
    if which == "all":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if which != "heads":
        raise ValueError(f"train.sync_bn={which!r}: use 'heads', 'all' or 'off'")
    parent_name, _, child = getattr(model, "backbone_prefix", "backbone.").rstrip(".").rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    backbone = getattr(parent, child, None)
    if backbone is None:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    setattr(parent, child, nn.Identity())  # hidden from the conversion, then put back
    try:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    finally:
        setattr(parent, child, backbone)


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW (``name: adamw``) or SGD with momentum (``name: sgd``) over :func:`param_groups`."""
    groups = param_groups(model, cfg)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimiser optim.name={cfg.name!r}; use 'adamw' or 'sgd'")


def lr_factor(step: int, cfg, total: int, base_lr: float, milestones: Sequence[int] = ()) -> float:
    """The learning rate at ``step`` as a factor of ``base_lr``: mmseg's poly schedule with ``min_lr``
    (``cfg.schedule == "poly"``) or mmdet's step schedule (x ``step_gamma`` at each milestone), both
    with linear warmup from ``warmup_ratio``.

    Args:
        step: Optimiser steps done.
        cfg: The :class:`~clipdense.config.OptimConfig`.
        total: Total steps.
        base_lr: The group's base learning rate.
        milestones: Step-schedule milestones in iterations.
    """
    if cfg.schedule == "poly":
        coeff = (1 - min(step, total) / total) ** cfg.power
        lr = (base_lr - cfg.min_lr) * coeff + cfg.min_lr if base_lr > cfg.min_lr else base_lr * coeff
    elif cfg.schedule == "step":
        lr = base_lr * cfg.step_gamma ** sum(step >= m for m in milestones)
    else:
        raise ValueError(f"unknown optim.schedule={cfg.schedule!r}; use 'poly' or 'step'")
    if step < cfg.warmup_iters:
        k = (1 - step / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        lr *= 1 - k
    return lr / base_lr


# ------------------------------------------------------------------------------------------- setup


def _available_devices() -> str:
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ", ".join(["auto", "cpu", *(["cuda", *cuda] if cuda else []), *(["mps"] if _mps_available() else [])])


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def _device(name: str, local: int, world: int) -> torch.device:
    """The device ``train.device`` names: ``auto``, ``cpu``, ``cuda`` (the GPU of this process's local
    rank), ``cuda:N`` (one process only) or ``mps``.

    Raises:
        ConfigError: The string is no device, or names one this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    available = f"available here: {_available_devices()}"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"train.device={name!r} is not a device name ({available})") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name!r} but CUDA is not available ({available})")
        if device.index is None:
            return torch.device("cuda", local)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name!r}: this machine has no GPU {device.index} ({available})")
        if world > 1:
            raise ConfigError(
                f"train.device={name!r} names one GPU for {world} processes: use train.device=cuda (each "
                "process takes the GPU of its LOCAL_RANK)"
            )
        return device
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"train.device={name!r} but MPS is not available ({available})")
    if device.type not in ("cpu", "mps"):
        raise ConfigError(f"train.device={name!r}: training runs on cpu, cuda or mps ({available})")
    return device


def _distributed(device_name: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device_name, local, world)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _check_resume_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Refuse a resume whose config would change the part of the run already done.

    Beyond the logging and loader settings (:data:`_RESUME_FREE`), a resume may lengthen the run
    (``train.iters`` up: the schedule is then stretched from the resumed step on), turn on
    ``data.skip_bad``, and spell ``data.root`` differently if it is the same folder.
    """
    import yaml

    if not (run_dir / "config.yaml").is_file():
        return
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    now = json.loads(json.dumps(cfg.to_dict()))
    flat = lambda c: {f"{s}.{k}": v for s in _RESUME_SECTIONS for k, v in c.get(s, {}).items()}  # noqa: E731
    old, new = flat(saved), flat(now)
    allowed = {
        "train.iters": lambda a, b: isinstance(a, int) and isinstance(b, int) and b >= a,
        "data.skip_bad": lambda a, b: b or not a,
        "data.root": lambda a, b: a is not None and b is not None and Path(a).resolve() == Path(b).resolve(),
    }
    for key, same_enough in allowed.items():
        if key in old and key in new and same_enough(old[key], new[key]):
            if old[key] != new[key]:
                logger.info("resuming %s with %s: %r -> %r", run_dir, key, old[key], new[key])
            new[key] = old[key]
    hint = (
        "A resume may change only train.log_every/ckpt_every/eval_every and data.workers, lengthen train.iters, "
        "turn on data.skip_bad, or name the same data.root another way; for anything else start a new run "
        "directory."
    )
    check_resume(old, new, run_dir, free=_RESUME_FREE, hint=hint)


# ------------------------------------------------------------------------------------------- data


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def _training_data(cfg: ExperimentConfig, detection: bool):
    """The training dataset with its augmentation, and the DataLoader's collate function."""
    if detection:
        from clipdense.data.detection import build_detection_dataset, build_detection_train_transform, collate_detection

        long_side, short_side = cfg.data.scale
        transform = build_detection_train_transform(min_size=short_side, max_size=long_side)
        dataset = build_detection_dataset(
            cfg.data.root,
            cfg.data.train_split,
            with_masks=cfg.data.with_masks,
            skip_bad_annotations=cfg.data.skip_bad,
            transform=transform,
        )
        return dataset, collate_detection
    from clipdense.data.checks import collate_skip_none
    from clipdense.data.datasets import build_dataset
    from clipdense.data.transforms import build_train_transform

    dataset = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.train_split)
    dataset.transform = build_train_transform(
        cfg.data.crop_size,
        scale=cfg.data.scale,
        ratio_range=cfg.data.ratio_range,
        cat_max_ratio=cfg.data.cat_max_ratio,
        photometric=cfg.data.photometric,
        ignore_index=dataset.ignore_index,
        colour=cfg.data.colour,
        antialias=cfg.data.antialias,
    )
    return dataset, collate_skip_none


# ------------------------------------------------------------------------------------------- training


class _Stop(Exception):
    pass


def train(
    cfg: ExperimentConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Train a model as the config says; returns a summary (final step, losses, run directory).

    Args:
        cfg: The experiment.
        resume: Continue from the run directory's latest checkpoint (exactly where it stopped).
        progress: Show a progress bar (rank 0).
        stop_after: Stop (with a checkpoint, resumable) after this step, as an interruption would.
    """
    from clipdense.models.registry import create_model

    rank, world, device = _distributed(cfg.train.device)
    main_process = rank == 0
    run_dir = cfg.resolved_run_dir()
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        logger.warning("no checkpoint in %s: starting from step 0", run_dir)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue, or use another run_dir")
    if ckpt is not None:
        _check_resume_config(run_dir, cfg)

    seed_everything(cfg.train.seed)
    detection = is_detection(cfg)
    dataset, collate = _training_data(cfg, detection)
    cfg.model.class_names = list(dataset.class_names)
    model = create_model(
        cfg.model.name, class_names=cfg.model.class_names, pretrained=cfg.model.pretrained, **cfg.model.overrides
    ).to(device)
    if detection != (getattr(model, "task", "segmentation") == "detection"):
        raise ValueError(
            f"model {cfg.model.name} and dataset {cfg.data.dataset} do not match: detectors train on "
            f"data.dataset={DETECTION_DATASET}, segmentors on segmentation datasets"
        )
    if detection and model.with_masks and not cfg.data.with_masks:
        raise ValueError(f"{cfg.model.name} predicts instance masks: set data.with_masks=true")
    steps_per_epoch = len(dataset) // (cfg.train.batch_size * world)
    total_iters = cfg.train.epochs * steps_per_epoch if cfg.train.epochs else cfg.train.iters
    milestones = [round(m * steps_per_epoch) if cfg.train.epochs else int(m) for m in cfg.optim.steps]
    if cfg.train.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"{cfg.model.name} does not support gradient checkpointing")
        model.set_grad_checkpointing(True)
    if world > 1 and device.type == "cuda" and cfg.train.sync_bn != "off":
        model = convert_sync_batchnorm(model, cfg.train.sync_bn)
    elif world > 1 and cfg.train.sync_bn != "off" and main_process:
        logger.warning("SyncBatchNorm needs CUDA: BatchNorm statistics stay per process on %s", device)

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [
            lambda s, base=g["lr"]: lr_factor(s, cfg.optim, total_iters, base, milestones)
            for g in optimizer.param_groups
        ],
    )
    precision = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision is torch.float16)
    parts = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}

    step, skipped_total = 0, 0
    if ckpt is not None:
        load_weights(model, ckpt / "model.safetensors")
        state = load_state(ckpt / "state.pt")
        step, skipped_total = restore_state(state, **parts), int(state.get("skipped", 0))
    if ckpt is not None and step >= total_iters:  # nothing to train: leave the run's outputs as they are
        if main_process:
            print(f"the run is already finished (step {step} of {total_iters}): {run_dir}")
        return dict(step=step, finished=True, losses=[], run_dir=str(run_dir), skipped=skipped_total)
    # raises for a training set smaller than one global batch: before the run directory is created
    sampler = StepSampler(len(dataset), cfg.train.batch_size, rank, world, cfg.train.seed, start_step=step)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def checkpoint() -> Path:
        return save_checkpoint(run_dir, model, {**capture_state(step, **parts), "skipped": skipped_total}, step)

    def result(finished: bool) -> dict[str, Any]:
        return dict(step=step, finished=finished, losses=losses_seen, run_dir=str(run_dir), skipped=skipped_total)

    global_batch = cfg.train.batch_size * world
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        info = {
            "world_size": world,
            "batch_size_per_process": cfg.train.batch_size,
            "global_batch_size": global_batch,
            "total_iters": total_iters,
            "steps_per_epoch": steps_per_epoch,
            "device": str(device),
            "start_step": step,
        }
        atomic_write_json(run_dir / "run_info.json", info, indent=2)
    resume_step = step if ckpt is not None else None
    log = RunLog(run_dir, logger, resume_step, tensorboard=True, quiet=progress, enabled=main_process)
    with log:
        if main_process:
            message = "%s: global batch %d (%d x %d processes) on %s, from step %d"
            logger.info(message, cfg.name, global_batch, cfg.train.batch_size, world, device, step)
            print(f"global batch size {global_batch} ({cfg.train.batch_size} per process x {world})")
            if detection:  # what the annotation checks clipped, dropped or skipped: in train.log, and shown if any
                from clipdense.data.detection import ANNOTATION_PROBLEMS

                summary = dataset.describe_problems()
                logger.info("%s", summary)
                if any(dataset.annotation_report[k] for k in ANNOTATION_PROBLEMS):
                    print(summary)

        samples = SeededSamples(SkipBadSamples(dataset, skip=cfg.data.skip_bad, report=True), cfg.train.seed)
        loader = DataLoader(
            samples,
            batch_size=cfg.train.batch_size,
            sampler=sampler,
            num_workers=cfg.data.workers,
            collate_fn=ReportSkipped(collate),
            persistent_workers=cfg.data.workers > 0,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(cfg.train.seed),  # leaves the global RNG (dropout) alone
        )
        losses_seen: list[float] = []
        evaluate = main_process and bool(cfg.train.eval_every)
        model.train()
        if cfg.train.freeze_bn:
            _freeze_bn(model)
        tic, tic_step = time.perf_counter(), step
        named: set[str] = set()  # skipped samples already in train.log
        requested = 0
        data_iter = iter(loader)
        with StopRequests() as stops, log.progress(total_iters, step, cfg.name, show=progress) as bar:
            try:
                while step < total_iters:
                    batch = next(data_iter)
                    skipped = _all_reduce_int(batch["skipped"], world)
                    if skipped:
                        skipped_total += skipped
                        _log_skipped(batch["skipped_samples"], world, main_process, named)
                    if batch["images" if detection else "image"] is None:
                        raise ValueError(
                            "a whole batch was skipped as bad samples; check the dataset (clipdense check-dataset)"
                        )
                    losses, loss = _forward(ddp, model, batch, detection, device, precision)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower optim.lr or use fp32")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.optim.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(
                            [p for g in optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip
                        )
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    step += 1
                    losses_seen.append(loss.item())
                    bar.update(1)
                    if main_process and (step % cfg.train.log_every == 0 or step == total_iters):
                        elapsed = time.perf_counter() - tic
                        record = {
                            "step": step,
                            "loss": loss.item(),
                            **{k: v.item() for k, v in losses.items()},
                            "lr": optimizer.param_groups[0]["lr"],
                            "images_per_s": global_batch * (step - tic_step) / elapsed,
                            "skipped": skipped_total,
                        }
                        tic, tic_step = time.perf_counter(), step
                        log.write(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
                    if (step % cfg.train.ckpt_every == 0 or step == total_iters) and main_process:
                        checkpoint()
                    if evaluate and step % cfg.train.eval_every == 0 and step < total_iters:
                        _evaluate_during_training(model, cfg, device, log, step)
                    requested = _all_reduce_int(int(stops.requested), world)
                    if step < total_iters and (requested or (stop_after is not None and step >= stop_after)):
                        raise _Stop()  # at a step boundary: the checkpoint below is a consistent state
            except _Stop:
                if main_process:
                    folder = checkpoint()
                    logger.info("stopped at step %d; checkpoint %s; continue with --resume", step, folder)
                    print(f"stopped at step {step}: checkpoint saved to {folder}; continue with --resume")
                return result(finished=False)
        if skipped_total and main_process:
            print(f"skipped {skipped_total} bad samples in total (see train.log)")
        if evaluate and requested:  # a stop asked for on the last step: finished, but no time for evaluation
            logger.info("stop requested on the last step: final evaluation skipped")
            print(f"stop requested on the last step: final evaluation skipped; run clipdense eval {run_dir}")
        elif evaluate:
            _evaluate_during_training(model, cfg, device, log, step)
    if world > 1:
        dist.barrier()
    return result(finished=True)


def _forward(ddp, model, batch, detection: bool, device: torch.device, precision) -> tuple[dict, torch.Tensor]:
    """The losses of one batch (under autocast) and their sum."""
    with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
        if detection:  # torchvision detectors compute their losses in forward
            images = [im.to(device, non_blocking=True) for im in batch["images"]]
            targets = [{k: _to(v, device) for k, v in t.items()} for t in batch["targets"]]
            losses = ddp(images, targets)
        else:
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            losses = model.losses(ddp(images), labels)
        return losses, sum(losses.values())


def _log_skipped(samples: list[SkippedSample], world: int, main_process: bool, named: set[str]) -> None:
    """Logs the bad samples every rank skipped in this step to train.log, each file once per run."""
    if world > 1:
        gathered: list[list[SkippedSample] | None] = [None] * world
        dist.all_gather_object(gathered, samples)
        samples = [sample for rank_samples in gathered for sample in rank_samples or []]
    for path, reason in samples:
        if main_process and path not in named:
            named.add(path)
            logger.warning("skipped bad sample %s: %s", path, reason)


def _all_reduce_int(value: int, world: int) -> int:
    if world == 1:
        return value
    t = torch.tensor([value])
    dist.all_reduce(t)
    return int(t.item())


def _evaluate_during_training(model, cfg, device, log: RunLog, step: int) -> None:
    try:
        val = build_eval_dataset(cfg)
    except FileNotFoundError as e:
        logger.warning("no validation split, skipping evaluation: %s", e)
        return
    if is_detection(cfg):
        from clipdense.evaluation.detection import evaluate_detection

        report = evaluate_detection(model, val, device, progress=False, limit=cfg.eval.limit)
        ap = report.to_dict()  # NaN (nothing to score in an area range) -> None, valid JSON
        record = {
            "step": step,
            **{f"val_{kind}_{k}": v for kind in ("bbox", "segm") for k, v in (ap[kind] or {}).items()},
        }
    else:
        from clipdense.evaluation.segmentation import evaluate

        # the training model keeps its memory format: channels-last inputs would convert its weights every call
        report = evaluate(model, val, dataclasses.replace(cfg.eval, channels_last=False), device, progress=False)
        record = {"step": step, "val_miou": report.miou, "val_macc": report.macc, "val_aacc": report.aacc}
    model.train()
    if cfg.train.freeze_bn:
        _freeze_bn(model)
    log.write(record)
