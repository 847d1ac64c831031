"""Few-shot prompt learning (CoOp, Zhou et al. IJCV 2022; PLOT, Chen et al. ICLR 2023) with the reference recipe.

SGD (lr 0.002, momentum 0.9, weight decay 5e-4) on the prompt contexts only, cross-entropy, a constant warm-up
epoch at 1e-5 and then a per-epoch cosine schedule, epochs by shot count. Run directories, checkpoints and resume
follow ``clipdense train`` (:mod:`clipdense.training.engine`): the data order and each sample's augmentation are
functions of (seed, step) (:class:`~clipdense.training.engine.StepSampler`,
:class:`~clipdense.training.engine.SeededSamples`), checkpoints are written atomically with the optimiser,
scheduler and RNG states, and Ctrl-C stops at a step boundary with a checkpoint from which ``--resume`` continues
bit for bit.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from clipdense.data.fewshot import ImageItems, export_shapesworld_fewshot, read_fewshot_dataset
from clipdense.fileio import atomic_write_json
from clipdense.inference.adapters import is_adapter
from clipdense.inference.fewshot import (
    FewShotConfig,
    build_fewshot_model,
    checkpoint_module,
    epoch_lr,
    flat_config,
    load_fewshot_config,
    official_batch_size,
    official_epochs,
    run_splits,
    save_fewshot_config,
    train_transform,
)
from clipdense.runs import latest_checkpoint, load_weights, save_checkpoint
from clipdense.training.engine import SeededSamples, StepSampler, _device
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

logger = logging.getLogger("clipdense.fewshot")

#: Keys a resume may change: they do not shape the trajectory.
RESUME_FREE = {"train.log_every", "train.ckpt_every", "train.eval_batch_size", "data.workers", "data.root",
               "model.class_names", "train.device"}  # fmt: skip


class _Stop(Exception):
    pass


def prepare_splits(cfg: FewShotConfig):
    """The k-shot splits of the config's dataset, seed and class subset (the ShapesWorld split is generated on first
    use)."""
    if cfg.data.dataset == "shapesworld":
        export_shapesworld_fewshot(cfg.data.root)
    full = read_fewshot_dataset(cfg.data.dataset, cfg.data.root)
    return run_splits(cfg, full)


def _check_resume(run_dir, cfg: FewShotConfig) -> None:
    saved = load_fewshot_config(run_dir / "config.yaml")
    hint = "Start a new run directory to change anything but logging, checkpoint interval, workers or device."
    check_resume(flat_config(saved), flat_config(cfg), run_dir, free=RESUME_FREE, hint=hint)


def train_fewshot(
    cfg: FewShotConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Train CoOp, CoCoOp or PLOT as the config says, or build and tune a cache adapter
    (:func:`clipdense.training.adapters.train_adapter`); returns a summary (step, finished, losses, run directory).

    Args:
        cfg: The experiment.
        resume: Continue from the run directory's newest complete checkpoint.
        progress: Show a progress bar.
        stop_after: Stop (with a checkpoint, resumable) after this step, as an interruption would.

    Raises:
        ValueError: The run directory holds checkpoints and ``resume`` is off, or the config changed on resume.
    """
    if is_adapter(cfg.model.name):
        from clipdense.training.adapters import train_adapter

        return train_adapter(cfg, resume, progress, stop_after)
    device = _device(cfg.train.device, 0, 1)
    run_dir = cfg.resolved_run_dir()
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        logger.warning("no checkpoint in %s: starting from step 0", run_dir)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue, or use another run_dir")

    splits = prepare_splits(cfg)
    cfg.model.class_names = list(splits.class_names)
    if ckpt is not None:
        _check_resume(run_dir, cfg)
    epochs = cfg.train.epochs or official_epochs(cfg.data.shots, cfg.data.dataset, cfg.model.name)
    batch = min(cfg.train.batch_size or official_batch_size(cfg.model.name, cfg.data.dataset), len(splits.train))
    steps_per_epoch = len(splits.train) // batch
    total = epochs * steps_per_epoch

    seed_everything(cfg.train.seed)  # the contexts' initialisation
    model = build_fewshot_model(cfg, splits.class_names).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: epoch_lr(s // steps_per_epoch, cfg.optim, epochs) / cfg.optim.lr
    )
    parts = {"optimizer": optimizer, "scheduler": scheduler}
    saved = checkpoint_module(model, cfg)
    step = 0
    if ckpt is not None:
        load_weights(saved, ckpt / "model.safetensors")
        step = restore_state(load_state(ckpt / "state.pt"), **parts)
    if ckpt is not None and step >= total:
        print(f"the run is already finished (step {step} of {total}): {run_dir}")
        return dict(step=step, finished=True, losses=[], run_dir=str(run_dir))

    run_dir.mkdir(parents=True, exist_ok=True)
    save_fewshot_config(cfg, run_dir / "config.yaml")
    info = {"train_images": len(splits.train), "classes": len(splits.class_names), "batch_size": batch,
            "epochs": epochs, "steps_per_epoch": steps_per_epoch, "total_steps": total, "device": str(device),
            "start_step": step}  # fmt: skip
    atomic_write_json(run_dir / "run_info.json", info, indent=2)

    dataset = ImageItems(splits.train, train_transform(model, cfg.data.crop_scale, cfg.data.flip))
    loader = DataLoader(
        SeededSamples(dataset, cfg.train.seed),
        batch_size=batch,
        sampler=StepSampler(len(dataset), batch, seed=cfg.train.seed, start_step=step),
        num_workers=cfg.data.workers,
        persistent_workers=cfg.data.workers > 0,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    losses: list[float] = []

    def checkpoint():
        return save_checkpoint(run_dir, saved, capture_state(step, **parts), step)

    log = RunLog(run_dir, logger, step if ckpt is not None else None, tensorboard=False, quiet=progress)
    with log:
        message = "%s: %d images, %d classes, batch %d, %d epochs x %d steps on %s, from step %d"
        logger.info(message, cfg.name, len(splits.train), len(splits.class_names), batch, epochs, steps_per_epoch,
                    device, step)  # fmt: skip
        model.train()
        tic, tic_step = time.perf_counter(), step
        data_iter = iter(loader)
        with StopRequests() as stops, log.progress(total, step, cfg.name, show=progress) as bar:
            try:
                while step < total:
                    images, labels = next(data_iter)
                    images, labels = images.to(device), labels.to(device)
                    logits = model(images)
                    loss = F.cross_entropy(logits, labels)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower optim.lr")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    losses.append(loss.item())
                    bar.update(1)
                    if step % cfg.train.log_every == 0 or step == total:
                        acc = (logits.argmax(dim=-1) == labels).float().mean().item() * 100
                        elapsed = time.perf_counter() - tic
                        log.write({"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": loss.item(),
                                   "acc": acc, "lr": optimizer.param_groups[0]["lr"],
                                   "images_per_s": batch * (step - tic_step) / elapsed})  # fmt: skip
                        tic, tic_step = time.perf_counter(), step
                        bar.set_postfix(loss=f"{loss.item():.4f}")
                    if step % cfg.train.ckpt_every == 0 or step == total:
                        checkpoint()
                    if step < total and (stops.requested or (stop_after is not None and step >= stop_after)):
                        raise _Stop()
            except _Stop:
                folder = checkpoint()
                logger.info("stopped at step %d; checkpoint %s; continue with --resume", step, folder)
                print(f"stopped at step {step}: checkpoint saved to {folder}; continue with --resume")
                return dict(step=step, finished=False, losses=losses, run_dir=str(run_dir))
    return dict(step=step, finished=True, losses=losses, run_dir=str(run_dir))


__all__ = ["prepare_splits", "train_fewshot"]
