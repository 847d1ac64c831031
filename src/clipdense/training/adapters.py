"""Training the cache adapters (Tip-Adapter, Tip-Adapter-F, PLOT-Adapter) as the authors' ``main.py`` does.

1. **Cache**: ``adapter.augment_epochs`` passes over the k-shot training images in order, each with its own random
   resized crop (0.5..1) and flip; the per-image features are averaged over the passes and normalised into the keys,
   the labels become one-hot values. The run writes a checkpoint (step 0) when the cache is built.
2. **Fine-tuning** (the -F variants, ``train.epochs`` > 0): the keys as a linear layer, AdamW (lr 1e-3, eps 1e-4),
   cosine annealing per step, batch 256, cross-entropy of zero-shot + init_alpha x cache logits (PLOT-Adapter: the
   PLOT term stays out of the loss). After every epoch the validation accuracy at the initial alpha/beta is logged
   and, with ``adapter.select: val``, the best epoch's keys are kept (the authors' code selects on the test split).
3. **Search**: beta over ``search_grid(scale_beta, step_beta)``, alpha over ``search_grid(scale_alpha,
   step_alpha)``, beta outer, first best kept (strict ``>``), on the validation split; ``search.json`` records it.

The run directory follows :mod:`clipdense.training.fewshot`: config, metrics.jsonl, atomic checkpoints (the cache
and, as ``state.pt``, the optimiser, scheduler, RNG and the best keys so far), ``--resume`` bit for bit, Ctrl-C
stopping at a step boundary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clipdense.data.fewshot import Datum, ImageItems, read_fewshot_dataset, subsample_classes
from clipdense.fileio import atomic_write_json
from clipdense.inference.adapters import DATASET_TEMPLATES, AdapterRecipe, adapter_recipe
from clipdense.inference.fewshot import (
    FewShotConfig,
    build_fewshot_model,
    checkpoint_module,
    eval_transform,
    load_fewshot_run,
    save_fewshot_config,
    train_transform,
)
from clipdense.models.adapters import search_grid
from clipdense.runs import latest_checkpoint, load_weights, save_checkpoint
from clipdense.training.engine import SeededSamples, StepSampler, _device
from clipdense.training.loop import RunLog, StopRequests, capture_state, load_state, restore_state, seed_everything

logger = logging.getLogger("clipdense.fewshot")

#: Epoch numbers of the cache's augmented passes in the augmentation seeds (apart from the training epochs').
CACHE_EPOCH = 1_000_000


class _Stop(Exception):
    pass


def recipe_of(cfg: FewShotConfig) -> AdapterRecipe:
    """The config's adapter recipe (nulls filled with the authors' values for the dataset)."""
    return adapter_recipe(cfg.model.name, cfg.data.dataset, cfg.adapter, cfg.train.epochs, cfg.train.batch_size)


@torch.no_grad()
def cache_features(model: nn.Module, items: Sequence[Datum], cfg: FewShotConfig, passes: int, device,
                   progress: bool = True) -> list[torch.Tensor]:  # fmt: skip
    """The per-image features the cache averages over ``passes`` augmented passes (each image's crop and flip drawn
    from (seed, pass, index)), in item order, on the CPU."""
    transform = train_transform(model, cfg.data.crop_scale, cfg.data.flip)
    data = SeededSamples(ImageItems(items, transform), cfg.train.seed)
    sums: list[torch.Tensor] | None = None
    bar = tqdm(total=passes * len(items), desc="cache", unit="img", disable=not progress or None)
    for p in range(passes):
        order = [(CACHE_EPOCH + p, i) for i in range(len(items))]
        loader = DataLoader(data, batch_size=cfg.train.eval_batch_size, sampler=order, num_workers=cfg.data.workers)
        chunks = []
        for images, _ in loader:
            chunks.append([f.cpu() for f in model.cache_features(images.to(device))])
            bar.update(len(images))
        feats = [torch.cat(parts) for parts in zip(*chunks, strict=True)]
        sums = feats if sums is None else [s + f for s, f in zip(sums, feats, strict=True)]
    bar.close()
    return [s / passes for s in sums]


@torch.no_grad()
def eval_features(model: nn.Module, items: Sequence[Datum], cfg: FewShotConfig, device, progress: bool = True):
    """``model.features`` of images with CLIP's test preprocessing, on the CPU, and the labels."""
    loader = DataLoader(ImageItems(items, eval_transform(model)), batch_size=cfg.train.eval_batch_size,
                        num_workers=cfg.data.workers)  # fmt: skip
    chunks, labels = [], []
    for images, lab in tqdm(loader, desc="val features", unit="batch", disable=not progress or None):
        chunks.append([f.cpu() for f in model.features(images.to(device))])
        labels.append(lab)
    return [torch.cat(parts) for parts in zip(*chunks, strict=True)], torch.cat(labels)


def _chunked(feats: Sequence[torch.Tensor], size: int, device) -> list[list[torch.Tensor]]:
    n = len(feats[0])
    return [[f[i : i + size].to(device) for f in feats] for i in range(0, n, size)]


@torch.no_grad()
def cache_logits_of(model: nn.Module, chunks: list[list[torch.Tensor]], beta: float) -> torch.Tensor:
    """N x C cache logits of pre-computed features (chunk by chunk: PLOT-Adapter's Sinkhorn runs per chunk)."""
    return torch.cat([model.cache_logits(c, beta).cpu() for c in chunks])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()


def search_alpha_beta(
    base: torch.Tensor,
    cache_logits: Callable[[float], torch.Tensor],
    labels: torch.Tensor,
    betas: Sequence[float],
    alphas: Sequence[float],
    progress: bool = True,
) -> tuple[float, float, float]:
    """The official grid search: beta outer, alpha inner, the first (beta, alpha) with the best accuracy kept.

    Args:
        base: N x C logits that do not depend on alpha and beta.
        cache_logits: beta -> N x C cache logits.
        labels: N labels.
        betas, alphas: The grids.
        progress: Show a progress bar over beta.

    Returns:
        (best accuracy, beta, alpha).
    """
    best = (-1.0, float(betas[0]), float(alphas[0]))
    for beta in tqdm(betas, desc="search", unit="beta", disable=not progress or None):
        cache = cache_logits(beta)
        for alpha in alphas:
            acc = accuracy(base + alpha * cache, labels)
            if acc > best[0]:
                best = (acc, float(beta), float(alpha))
    return best


def search_items(cfg: FewShotConfig, recipe: AdapterRecipe, kshot_val: Sequence[Datum]) -> list[Datum]:
    """The validation images of the search: the dataset's whole validation split, or the run's k-shot one."""
    if recipe.search_split == "kshot":
        return list(kshot_val)
    full = read_fewshot_dataset(cfg.data.dataset, cfg.data.root)
    return subsample_classes(full, cfg.data.subsample_classes).val


def _attach_plot(cfg: FewShotConfig, recipe: AdapterRecipe, class_names: Sequence[str]) -> nn.Module:
    """Load the PLOT run of ``adapter.plot_run``, check it fits the adapter run, and record its options."""
    plot, plot_cfg = load_fewshot_run(recipe.plot_run)

    def draw(c: FewShotConfig) -> dict[str, Any]:  # what decides the k-shot images and the CLIP
        d = c.data
        return {
            "data.dataset": d.dataset,
            "data.shots": d.shots,
            "train.seed": c.train.seed,
            "data.subsample_classes": d.subsample_classes,
            "data.repeat": d.repeat,
            "model.pretrained": c.model.pretrained,
            "clip_model": c.model.overrides.get("clip_model", "RN50"),
        }

    mine, theirs = draw(cfg), draw(plot_cfg)
    if not plot_cfg.model.name.startswith("plot_") or not hasattr(plot, "explain"):
        raise ValueError(f"adapter.plot_run={recipe.plot_run} is a {plot_cfg.model.name} run, not a PLOT run")
    differ = [f"{k}: {mine[k]!r} here, {theirs[k]!r} there" for k in mine if mine[k] != theirs[k]]
    if plot_cfg.model.class_names != list(class_names):
        differ.append("other classes")
    if differ:
        raise ValueError(f"the PLOT run {recipe.plot_run} does not fit this run ({'; '.join(differ)})")
    cfg.model.overrides["plot_options"] = {k: v for k, v in plot_cfg.model.overrides.items() if k != "clip_model"}
    return plot


def _load_plot_prompts(model: nn.Module, plot: nn.Module, run: str) -> None:
    """Copy the trained prompts into the adapter's PLOT; its CLIP must be the PLOT run's."""
    model.plot.prompt_learner.load_state_dict(plot.prompt_learner.state_dict())
    ours, theirs = model.plot.state_dict(), plot.state_dict()
    if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k].to(ours[k])) for k in ours):
        raise ValueError(f"the CLIP weights of the PLOT run {run} differ from this run's model.pretrained")


def train_adapter(
    cfg: FewShotConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Build the cache, fine-tune it (-F variants) and search alpha/beta; returns a summary (step, finished, losses,
    run directory, and the search's val_acc, alpha, beta).

    Args:
        cfg: The experiment (``model.name`` a cache adapter).
        resume: Continue from the run directory's newest complete checkpoint.
        progress: Show progress bars.
        stop_after: Stop (with a checkpoint, resumable) after this fine-tuning step, as an interruption would.

    Raises:
        ValueError: The run directory holds checkpoints and ``resume`` is off, the config changed on resume, or the
            PLOT run does not fit.
    """
    from clipdense.training.fewshot import _check_resume, prepare_splits

    recipe = recipe_of(cfg)
    device = _device(cfg.train.device, 0, 1)
    run_dir = cfg.resolved_run_dir()
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        logger.warning("no checkpoint in %s: starting from step 0", run_dir)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue, or use another run_dir")

    splits = prepare_splits(cfg)
    names = list(splits.class_names)
    cfg.model.class_names = names
    cfg.model.overrides["cache_size"] = len(splits.train)
    cfg.model.overrides.setdefault("templates", list(DATASET_TEMPLATES.get(cfg.data.dataset, ("a photo of a {}.",))))
    plot = _attach_plot(cfg, recipe, names) if recipe.method == "plot_adapter" else None
    if ckpt is not None:
        _check_resume(run_dir, cfg)
    batch = min(recipe.batch_size, len(splits.train))
    steps_per_epoch = len(splits.train) // batch
    total = recipe.epochs * steps_per_epoch

    seed_everything(cfg.train.seed)  # random CLIP weights (tests) are then the PLOT run's
    model = build_fewshot_model(cfg, names)
    if plot is not None:
        _load_plot_prompts(model, plot, recipe.plot_run)
        del plot
    model = model.to(device).eval()
    model.cache_text_features()
    optimizer = torch.optim.AdamW(model.cache.keys.parameters(), lr=recipe.lr, eps=recipe.adam_eps,
                                  weight_decay=recipe.weight_decay)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 + math.cos(math.pi * s / max(1, total))) / 2)
    parts = {"optimizer": optimizer, "scheduler": scheduler}
    saved = checkpoint_module(model, cfg)
    step, best = 0, {"acc": -1.0, "epoch": -1, "keys": None}
    if ckpt is not None:
        load_weights(saved, ckpt / "model.safetensors")
        state = load_state(ckpt / "state.pt")
        step = restore_state(state, **parts)
        best = state["best"]
        if state["phase"] == "done":
            print(f"the run is already finished: {run_dir}")
            return dict(step=step, finished=True, losses=[], run_dir=str(run_dir), **state["search"])

    run_dir.mkdir(parents=True, exist_ok=True)
    save_fewshot_config(cfg, run_dir / "config.yaml")
    info = {"method": recipe.method, "cache_size": len(splits.train), "classes": len(names), "batch_size": batch,
            "epochs": recipe.epochs, "steps_per_epoch": steps_per_epoch, "total_steps": total, "device": str(device),
            "start_step": step, "recipe": {k: v for k, v in vars(recipe).items()}}  # fmt: skip
    atomic_write_json(run_dir / "run_info.json", info, indent=2)

    at = {"step": step}  # the fine-tuning loop advances it

    def checkpoint(phase: str, search: dict | None = None):
        state = {**capture_state(at["step"], **parts), "phase": phase, "best": best, "search": search or {}}
        return save_checkpoint(run_dir, saved, state, at["step"])

    losses: list[float] = []
    log = RunLog(run_dir, logger, step if ckpt is not None else None, tensorboard=False, quiet=progress)
    with log:
        logger.info("%s (%s): cache of %d images, %d classes, %d epochs x %d steps of batch %d on %s, from step %d",
                    cfg.name, recipe.method, len(splits.train), len(names), recipe.epochs, steps_per_epoch, batch,
                    device, step)  # fmt: skip
        if ckpt is None:
            feats = cache_features(model, splits.train, cfg, recipe.augment_epochs, device, progress)
            keys = model.keys_from_cache_features(feats)
            model.cache.fill(keys.to(device), torch.tensor([d.label for d in splits.train], device=device))
            checkpoint("train")
        val = search_items(cfg, recipe, splits.val)
        val_feats, val_labels = eval_features(model, val, cfg, device, progress)
        chunks = _chunked(val_feats, cfg.train.eval_batch_size, device)
        base = torch.cat([model.base_logits(c).cpu() for c in chunks])

        def val_accuracy() -> float:
            return accuracy(base + recipe.init_alpha * cache_logits_of(model, chunks, recipe.init_beta), val_labels)

        if total:
            try:
                _fine_tune(model, cfg, recipe, splits.train, batch, total, steps_per_epoch, at, parts, best, losses,
                           log, val_accuracy, checkpoint, progress, stop_after)  # fmt: skip
            except _Stop:
                step = at["step"]
                folder = checkpoint("train")
                logger.info("stopped at step %d; checkpoint %s; continue with --resume", step, folder)
                print(f"stopped at step {step}: checkpoint saved to {folder}; continue with --resume")
                return dict(step=step, finished=False, losses=losses, run_dir=str(run_dir))
            step = at["step"]
            if recipe.select == "val" and best["keys"] is not None:
                with torch.no_grad():
                    model.cache.keys.weight.copy_(best["keys"].to(device))
        acc, beta, alpha = search_alpha_beta(
            base, lambda b: cache_logits_of(model, chunks, b), val_labels,
            search_grid(recipe.search_scale[0], recipe.search_step[0]),
            search_grid(recipe.search_scale[1], recipe.search_step[1]), progress,
        )  # fmt: skip
        model.cache.alpha.fill_(alpha)
        model.cache.beta.fill_(beta)
        search = {"val_acc": acc, "alpha": alpha, "beta": beta, "val_images": len(val), "split": recipe.search_split,
                  "best_epoch": best["epoch"], "init_val_acc": val_accuracy()}  # fmt: skip
        atomic_write_json(run_dir / "search.json", search, indent=2)
        log.write({"step": step, "search_val_acc": acc, "alpha": alpha, "beta": beta})
        logger.info("search on %d %s validation images: %.2f%% at beta %.3f, alpha %.3f", len(val),
                    recipe.search_split, acc, beta, alpha)  # fmt: skip
        checkpoint("done", search)
    return dict(step=step, finished=True, losses=losses, run_dir=str(run_dir), **search)


def _fine_tune(model, cfg, recipe, items, batch, total, steps_per_epoch, at, parts, best, losses, log, val_accuracy,
               checkpoint, progress, stop_after) -> None:  # fmt: skip
    """Tip-Adapter-F's loop from step ``at["step"]`` to ``total`` (raises :class:`_Stop` to stop early)."""
    device = model.cache.values.device
    step = at["step"]
    optimizer, scheduler = parts["optimizer"], parts["scheduler"]
    dataset = ImageItems(items, train_transform(model, cfg.data.crop_scale, cfg.data.flip))
    loader = DataLoader(SeededSamples(dataset, cfg.train.seed), batch_size=batch,
                        sampler=StepSampler(len(dataset), batch, seed=cfg.train.seed, start_step=step),
                        num_workers=cfg.data.workers)  # fmt: skip
    data_iter = iter(loader)
    with StopRequests() as stops, log.progress(total, step, cfg.name, show=progress) as bar:
        while step < total:
            images, labels = next(data_iter)
            images, labels = images.to(device), labels.to(device)
            feats = model.train_features(images)
            logits = model.base_logits(feats, training=True) + recipe.init_alpha * model.cache_logits(
                feats, recipe.init_beta
            )
            loss = F.cross_entropy(logits, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower adapter.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            at["step"] = step
            losses.append(loss.item())
            bar.update(1)
            record = {}
            if step % cfg.train.log_every == 0 or step == total:
                record = {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": loss.item(),
                          "acc": accuracy(logits.detach(), labels), "lr": optimizer.param_groups[0]["lr"]}  # fmt: skip
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % steps_per_epoch == 0:
                acc = val_accuracy()
                record = {**record, "step": step, "epoch": step // steps_per_epoch - 1, "val_acc": acc}
                if acc > best["acc"]:
                    keys = model.cache.keys.weight.detach().cpu().clone()
                    best.update(acc=acc, epoch=step // steps_per_epoch - 1, keys=keys)
            if record:
                log.write(record)
            if step % steps_per_epoch == 0 or step % cfg.train.ckpt_every == 0 or step == total:
                checkpoint("train")
            if step < total and (stops.requested or (stop_after is not None and step >= stop_after)):
                raise _Stop()


__all__ = ["accuracy", "cache_features", "eval_features", "recipe_of", "search_alpha_beta", "train_adapter"]
