"""Run directories: the resolved ``config.yaml`` plus checkpoint folders, and the model they rebuild.

A run directory written by ``clipdense train`` looks like::

    run_dir/
        config.yaml                     resolved experiment config
        metrics.jsonl                   one JSON object per logged step
        checkpoints/
            latest                      name of the newest complete step folder (replaced atomically)
            step_0001000/
                model.safetensors       every weight of the model (CLIP's included)
                state.pt                optimiser, scheduler, scaler, RNG, step

Training writes it; evaluation, inference and the CLI read it through :func:`build_from_run` (which also takes
an exported model folder or ``hf-hub:org/name``, :mod:`clipdense.hub`; :func:`export_run` writes one), and
:func:`build_eval_dataset` gives the validation data its config names.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clipdense.checkpoints import load_state_dict_strict, skip_init
from clipdense.config import ExperimentConfig, load_config
from clipdense.data.datasets import DETECTION_DATASET, build_dataset
from clipdense.fileio import atomic_write
from clipdense.hub import (
    ExportedModel,
    export_folder,
    is_exported_folder,
    is_hub_id,
    read_eval_reports,
    resolve_exported,
)
from clipdense.models.registry import checkpoint_options, create_model

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2


logger = logging.getLogger(__name__)


def _step_folders(root: Path) -> list[Path]:
    """``step_*`` folders under ``checkpoints/``, oldest first."""
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def save_checkpoint(run_dir: Path, model: nn.Module, state: dict[str, Any], step: int) -> Path:
    """Write ``checkpoints/step_XXXXXXX/{model.safetensors,state.pt}``, then point ``latest`` at it.

    The folder is written as ``.step_XXXXXXX.partial`` and renamed when complete, so a crash never
    leaves a half-written step folder. Stale ``.partial`` folders, step folders past ``step`` (a
    resumed run rewrites them) and all but the newest :data:`KEEP_CHECKPOINTS` are removed.
    """
    root = run_dir / CHECKPOINTS
    folder = root / f"step_{step:07d}"
    partial = root / f".step_{step:07d}.partial"
    for stale in root.glob(".step_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(partial / "model.safetensors"), metadata={"step": str(step)})
    torch.save(state, partial / "state.pt")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    atomic_write(root / "latest", lambda tmp: tmp.write_text(folder.name + "\n"))
    folders = _step_folders(root)
    older, newer = folders[: folders.index(folder)], folders[folders.index(folder) + 1 :]
    for old in newer + older[: max(0, len(older) - KEEP_CHECKPOINTS + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def checkpoint_problem(folder: Path) -> str | None:
    """Why a step folder cannot be resumed from (missing or truncated files), or None if it is complete.

    Cheap checks that catch truncation and deletion without reading the tensors: safetensors must
    accept the weights' header (it checks that the header covers the file exactly), and ``state.pt``
    must be a readable zip archive.
    """
    weights, state = folder / "model.safetensors", folder / "state.pt"
    for path in (weights, state):
        if not path.is_file():
            return f"{path.name} is missing"
    try:
        with safe_open(str(weights), "pt"):
            pass
    except (SafetensorError, OSError) as e:
        return f"model.safetensors has a damaged header or is truncated ({e})"
    try:
        with zipfile.ZipFile(state) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"state.pt is unreadable ({e})"
    return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete step folder of a run, or None if it has none.

    That is normally the one ``checkpoints/latest`` names. When the newest folder is damaged
    (truncated or deleted files) or ``latest`` names a folder that is gone, the newest complete one is
    returned instead, with a warning that names what was skipped and why.

    Raises:
        FileNotFoundError: The run has step folders, but none of them is complete.
    """
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    folders = _step_folders(root)
    if named is None and not folders:
        return None
    skipped = [] if named is None or (root / named).is_dir() else [f"{named} (named by 'latest') is gone"]
    for folder in reversed(folders):
        problem = checkpoint_problem(folder)
        if problem is None:
            if skipped:
                logger.warning("%s: using %s; skipped %s", root, folder.name, "; ".join(skipped))
            return folder
        skipped.append(f"{folder.name}: {problem}")
    raise FileNotFoundError(f"{root} holds no complete checkpoint: {'; '.join(skipped)}")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict strictly (a run's weights must fit its own architecture)."""
    load_state_dict_strict(model, load_file(str(path)), str(path))


def build_architecture(cfg: ExperimentConfig, class_names: list[str] | None = None) -> nn.Module:
    """The model a config names, with random weights and without the random-weights warnings: for
    callers whose weights come from elsewhere (a checkpoint) or do not matter (counting FLOPs).

    Models that declared :func:`~clipdense.models.registry.checkpoint_options` get them, so they skip work
    whose result a checkpoint overwrites (MaskCLIP+ encodes no class names: its classifier is a zero buffer).

    Args:
        cfg: The config (``model.name``, ``model.overrides``).
        class_names: The classes; default ``cfg.model.class_names``.
    """
    loading_logger = logging.getLogger("clipdense.clip.loading")
    level = loading_logger.level
    loading_logger.setLevel(logging.ERROR)
    try:
        names = cfg.model.class_names if class_names is None else class_names
        options = {**cfg.model.overrides, **checkpoint_options(cfg.model.name)}
        return create_model(cfg.model.name, class_names=names, pretrained=None, **options)
    finally:
        loading_logger.setLevel(level)


def build_from_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ExperimentConfig]:
    """Rebuild a trained model from its run directory (resolved config + latest weights), from an exported
    model folder (:func:`export_run`) or from ``hf-hub:org/name`` (:mod:`clipdense.hub`; checksums checked)."""
    exported = resolve_exported(run_dir)
    if exported is not None:
        config_file, weights = exported.config, exported.weights
    else:
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(
                f"{run_dir} is not a run directory (no config.yaml); pass the folder `clipdense train` wrote, an "
                "exported model folder or hf-hub:ORG/NAME"
            )
        folder = latest_checkpoint(run_dir)
        if folder is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/latest is missing)")
        config_file, weights = run_dir / "config.yaml", folder / "model.safetensors"
    cfg = load_config(config_file)
    # The checkpoint holds every weight, CLIP's included: build without loading CLIP weights or computing a random
    # initialisation (load_weights is strict: it overwrites every parameter and persistent buffer), then load all.
    with skip_init():
        model = build_architecture(cfg)
    load_weights(model, weights)
    model = model.to(device).eval()
    if getattr(model, "text_encoder", None) is not None and getattr(model, "prompting", None) != "pre":
        model.cache_text_embeddings()  # fixed after training: inference runs no text encoder
    return model, cfg


def export_run(
    run_dir: str | Path, out_dir: str | Path, repo_id: str | None = None, overwrite: bool = False
) -> ExportedModel:
    """Write a run's latest checkpoint as a Hugging Face Hub model folder (:mod:`clipdense.hub`): the weights,
    the resolved config, the class names, a model card with the metrics of the run's ``eval_*.json`` reports,
    and a manifest of SHA-256 checksums. :func:`build_from_run` loads the folder back.

    Args:
        run_dir: A ``clipdense train`` run directory.
        out_dir: The folder to write (empty or absent, unless ``overwrite``).
        repo_id: The Hub repository it is meant for (``org/name``), named in the card's usage lines.
        overwrite: Replace the files of a non-empty ``out_dir``.

    Raises:
        FileNotFoundError: Not a run directory, or it has no complete checkpoint.
    """
    if is_hub_id(run_dir) or is_exported_folder(run_dir):
        raise ValueError(f"{run_dir} is already an exported model: push or copy it as it is")
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml); pass a `clipdense train` run")
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/latest is missing)")
    cfg = load_config(run_dir / "config.yaml")
    step = int(folder.name.removeprefix("step_")) if folder.name.removeprefix("step_").isdigit() else None
    return export_folder(
        out_dir,
        weights=folder / "model.safetensors",
        config=run_dir / "config.yaml",
        cfg=cfg,
        task="detection" if is_detection(cfg) else "segmentation",
        step=step,
        metrics=read_eval_reports(run_dir),
        repo_id=repo_id,
        overwrite=overwrite,
    )


def is_detection(cfg: ExperimentConfig) -> bool:
    """Whether the config trains a detector (``data.dataset: coco``, the COCO instances layout)."""
    return cfg.data.dataset == DETECTION_DATASET


def build_eval_dataset(cfg: ExperimentConfig, root: str | None = None, split: str | None = None):
    """The validation dataset of a config (segmentation: no transform; detection: every image, original size)."""
    name, root, split = cfg.data.dataset, root or cfg.data.root, split or cfg.data.val_split
    if name == DETECTION_DATASET:
        from clipdense.data.detection import build_detection_dataset, build_detection_eval_transform

        return build_detection_dataset(
            root, split, with_masks=cfg.data.with_masks, filter_empty=False, transform=build_detection_eval_transform()
        )
    return build_dataset(name, root, split)
