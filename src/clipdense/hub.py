"""Trained models as Hugging Face Hub folders: write one, check one, find one (``hf-hub:org/name``), push one.

An exported model folder (what ``clipdense export RUN OUT`` writes and ``clipdense push`` uploads)::

    OUT/
        model.safetensors   every weight of the model: the run's latest checkpoint, copied byte for byte
        config.yaml         the run's resolved config (model name, options, class names: what rebuilds it)
        class_names.txt     the classes in label order, one a line (synonyms comma-separated)
        README.md           the model card: task, data, the command that trained it, the metrics of its eval reports
        clipdense_manifest.json   format version, model name, task, step and the SHA-256 of every file above
                            but README.md (a model card may be edited on the Hub; the others must not change)

:func:`clipdense.runs.build_from_run` (and through it ``TrainedPredictor.from_run``, ``DetectionPredictor.from_run``
and every ``--checkpoint``) takes such a folder or ``hf-hub:org/name[@revision]`` as well as a run directory.
Downloads, the Hub cache and ``HF_HUB_OFFLINE`` are huggingface_hub's (``snapshot_download``), and so is pushing
(``HfApi.create_repo`` + ``upload_folder``); this module adds the checksums and the messages.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdense import __version__
from clipdense.config import ExperimentConfig
from clipdense.fileio import atomic_write, file_sha256

HUB_PREFIX = "hf-hub:"
MANIFEST = "clipdense_manifest.json"
WEIGHTS, CONFIG, CLASS_NAMES, CARD = "model.safetensors", "config.yaml", "class_names.txt", "README.md"
FORMAT = "clipdense-model"
FORMAT_VERSION = 1
#: The files whose SHA-256 the manifest holds and every load checks.
CHECKED_FILES = (WEIGHTS, CONFIG, CLASS_NAMES)


class ExportedModelError(ValueError):
    """An exported model folder that cannot be used as it is (changed, damaged or foreign files)."""


@dataclass(frozen=True)
class ExportedModel:
    """A checked exported model folder.

    Attributes:
        folder: The folder (for ``hf-hub:`` ids, the snapshot in the Hugging Face cache).
        manifest: The parsed ``clipdense_manifest.json``.
        source: What the user named: the folder or the ``hf-hub:`` id.
    """

    folder: Path
    manifest: dict[str, Any]
    source: str

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS

    @property
    def config(self) -> Path:
        return self.folder / CONFIG


def is_hub_id(source: str | Path) -> bool:
    """Whether ``source`` names a Hub model (``hf-hub:org/name``) rather than a local path."""
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def is_exported_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a ``clipdense_manifest.json`` (an exported model, maybe damaged)."""
    return (Path(path) / MANIFEST).is_file()


def resolve_exported(source: str | Path, cache_dir: str | Path | None = None) -> ExportedModel | None:
    """The checked exported model that ``source`` names, or None when it names something else (a run directory).

    Args:
        source: ``hf-hub:org/name`` or ``hf-hub:org/name@revision`` (downloaded into, or read from, the Hugging
            Face cache; with ``HF_HUB_OFFLINE=1`` only the cache is read), or a local folder.
        cache_dir: The Hugging Face cache (default: huggingface_hub's, ``HF_HUB_CACHE``).

    Raises:
        FileNotFoundError: An ``hf-hub:`` id that is neither cached nor downloadable; a file of the folder is missing.
        ExportedModelError: A file differs from the manifest's checksum, or the manifest is not clipdense's.
    """
    if is_hub_id(source):
        return verify_folder(download(source, cache_dir), source=source)
    if is_exported_folder(source):
        return verify_folder(source)
    return None


def download(source: str, cache_dir: str | Path | None = None) -> Path:
    """The local snapshot of ``hf-hub:org/name[@revision]``: from the Hugging Face cache, downloaded if needed.

    Raises:
        FileNotFoundError: Not cached while offline (``HF_HUB_OFFLINE=1``) or the Hub cannot be reached, no such
            repository (or a private one without a token), or no such revision.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = source.removeprefix(HUB_PREFIX).partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"{source}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache_dir))
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{source}: no such model on the Hugging Face Hub, or a private one: check the name, or log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{source}: the repository has no revision '{revision}'") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{source} is not in the Hugging Face cache and the Hub cannot be used (offline mode, HF_HUB_OFFLINE, "
            "or no network): run once with network access, or download the folder and pass its path"
        ) from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{source}: the Hugging Face Hub refused the download ({e})") from None


def verify_folder(folder: str | Path, source: str | None = None) -> ExportedModel:
    """Check an exported folder against its manifest: every listed file present, with the listed SHA-256.

    Args:
        folder: The folder.
        source: How to name it in messages (default: the folder's path).

    Raises:
        FileNotFoundError: No manifest, or a listed file is missing.
        ExportedModelError: The manifest is unreadable or not clipdense's, or a file was changed or damaged.
    """
    folder = Path(folder)
    name = source or str(folder)
    again = "export it again (`clipdense export RUN OUT`) or download it again"
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not an exported clipdense model: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise ExportedModelError(f"{name}: {MANIFEST} is unreadable ({e}); {again}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ExportedModelError(
            f"{name}: {MANIFEST} is format {manifest.get('format')!r} version {manifest.get('format_version')}; "
            f"this clipdense ({__version__}) reads {FORMAT!r} up to version {FORMAT_VERSION}: upgrade clipdense"
        )
    for needed in CHECKED_FILES:
        if needed not in files:
            raise ExportedModelError(f"{name}: {MANIFEST} lists no checksum for {needed}; {again}")
    for file, expected in files.items():
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{name}: {file} is missing (the folder is incomplete); {again}")
        found = file_sha256(folder / file)
        if found != expected:
            raise ExportedModelError(
                f"{name}: {file} has SHA-256 {found[:12]}..., the manifest says {expected[:12]}...: the file was "
                f"changed or damaged after export; {again}"
            )
    return ExportedModel(folder, manifest, name)


def _flat_metrics(report: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of an ``eval_*.json`` report, nested sections joined with ``/`` (``bbox/AP``); lists skipped."""
    out: dict[str, float] = {}
    for key, value in report.items():
        if key in ("settings",):
            continue
        if isinstance(value, Mapping):
            out.update(_flat_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def read_eval_reports(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """The metrics of a run's ``eval_*.json`` reports (``clipdense eval``), by report name; unreadable ones skipped."""
    reports = {}
    for path in sorted(Path(run_dir).glob("eval_*.json")):
        try:
            reports[path.stem.removeprefix("eval_")] = _flat_metrics(json.loads(path.read_text()))
        except (ValueError, OSError, AttributeError):
            continue
    return reports


def model_card(
    cfg: ExperimentConfig,
    task: str,
    step: int | None,
    metrics: Mapping[str, Mapping[str, float]],
    repo_id: str | None = None,
) -> str:
    """The README.md of an exported model: Hub metadata, how to use it, how it was trained, its metrics.

    Args:
        cfg: The run's resolved config.
        task: ``"segmentation"`` or ``"detection"``.
        step: The training step of the weights.
        metrics: Report name -> metric -> value (:func:`read_eval_reports`).
        repo_id: The Hub repository, for the usage lines (default: a placeholder).
    """
    from huggingface_hub import ModelCardData

    name = f"{HUB_PREFIX}{repo_id or 'ORG/NAME'}"
    detection = task == "detection"
    uncertainty = cfg.model.name.startswith("ppl_")
    data = ModelCardData(
        library_name="clipdense",
        pipeline_tag="object-detection" if detection else "image-segmentation",
        tags=["clipdense", "clip", cfg.model.name, "object-detection" if detection else "semantic-segmentation"],
    )
    classes = cfg.model.class_names or []
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {cfg.name}: `{cfg.model.name}`",
        "",
        f"A {'detector' if detection else 'segmentation model'} trained with "
        f"[clipdense](https://github.com/clipdense/clipdense) on `{cfg.data.dataset}` ({len(classes)} classes)"
        f"{f', step {step}' if step is not None else ''}. CLIP: `{cfg.model.overrides.get('clip_model', 'RN50')}` "
        f"(`{cfg.model.pretrained}` weights at the start of training; every weight is in `{WEIGHTS}`).",
        "",
        "## Use",
        "",
        "```bash",
        'pip install "clipdense"',
        f"clipdense {'detect' if detection else 'segment'} image.jpg --checkpoint {name}"
        + (" --uncertainty" if uncertainty else ""),
        "```",
        "",
        "```python",
        f"from clipdense.inference import {'DetectionPredictor' if detection else 'TrainedPredictor'}",
        "",
        f'predictor = {"DetectionPredictor" if detection else "TrainedPredictor"}.from_run("{name}")',
        'predictor.set_image("image.jpg")',
        "result = predictor.predict()",
        "```",
        "",
        "## Training",
        "",
        f"`clipdense train {CONFIG}` with the resolved config of this folder reproduces the run (model, data, "
        f"optimiser, {f'{cfg.train.epochs} epochs' if cfg.train.epochs else f'{cfg.train.iters} iterations'}, seed "
        f"{cfg.train.seed}); point `data.root` at the dataset.",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        names = sorted({k for m in metrics.values() for k in m})
        lines += ["| report | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for report, values in metrics.items():
            cells = [f"{values[k]:.2f}" if k in values else "" for k in names]
            lines.append(f"| {report} | " + " | ".join(cells) + " |")
    else:
        lines.append("No `clipdense eval` report was in the run directory when it was exported.")
    lines += ["", "## Classes", "", ", ".join(f"`{c}`" for c in classes) or "(none)", ""]
    lines += ["## Files", "", f"`{MANIFEST}` holds the SHA-256 of `{WEIGHTS}`, `{CONFIG}` and `{CLASS_NAMES}`; "
              "clipdense checks them at every load.", ""]  # fmt: skip
    return "\n".join(lines)


def export_folder(
    out_dir: str | Path,
    *,
    weights: str | Path,
    config: str | Path,
    cfg: ExperimentConfig,
    task: str,
    step: int | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> ExportedModel:
    """Write an exported model folder (see the module docstring) from a weights file and its resolved config.

    The weights and the config are copied byte for byte, so the exported model computes exactly what the run does.
    Most callers want :func:`clipdense.runs.export_run`, which finds these in a run directory.

    Args:
        out_dir: The folder to write; it must be empty or absent unless ``overwrite``.
        weights: The ``model.safetensors`` to ship.
        config: The resolved ``config.yaml`` it was trained with (``cfg`` read from it).
        cfg: The config.
        task: ``"segmentation"`` or ``"detection"``.
        step: The training step of the weights (for the card and the manifest).
        metrics: Report name -> metrics, for the card.
        repo_id: The Hub repository, for the card's usage lines.
        overwrite: Replace the files of a non-empty ``out_dir``.

    Returns:
        The written folder, checked.

    Raises:
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is off.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not an empty folder: choose another, or overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, out / WEIGHTS)
    shutil.copyfile(config, out / CONFIG)
    atomic_write(out / CLASS_NAMES, lambda tmp: tmp.write_text("".join(f"{c}\n" for c in cfg.model.class_names or ())))
    card = model_card(cfg, task, step, metrics or {}, repo_id)
    atomic_write(out / CARD, lambda tmp: tmp.write_text(card))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "clipdense_version": __version__,
        "model": cfg.model.name,
        "task": task,
        "step": step,
        "num_classes": len(cfg.model.class_names or ()),
        "files": {name: file_sha256(out / name) for name in CHECKED_FILES},
    }
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return verify_folder(out)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload a checked exported folder to a Hub model repository (created if missing).

    Args:
        folder: The exported folder (:func:`export_folder`); checked before anything is sent.
        repo_id: ``org/name``.
        private: Create the repository private (an existing one keeps its visibility).
        token: A Hub token (default: huggingface_hub's: ``HF_TOKEN`` or the saved login).
        revision: The branch to commit to (default: the repository's default branch).
        commit_message: Default: "Upload <model> with clipdense <version>".
        endpoint: Another Hub server (default: huggingface_hub's, ``HF_ENDPOINT``).

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    model = verify_folder(folder)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    message = commit_message or f"Upload {model.manifest.get('model')} with clipdense {__version__}"
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(model.folder),
        repo_type="model",
        revision=revision,
        commit_message=message,
        allow_patterns=[MANIFEST, CARD, *CHECKED_FILES],
    )
    return str(getattr(info, "commit_url", info))


__all__ = [
    "ExportedModel",
    "ExportedModelError",
    "download",
    "export_folder",
    "is_exported_folder",
    "is_hub_id",
    "model_card",
    "push_folder",
    "read_eval_reports",
    "resolve_exported",
    "verify_folder",
]
