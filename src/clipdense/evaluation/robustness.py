"""Robustness to ImageNet-C corruptions, as in MaskCLIP (Zhou et al., ECCV 2022), Tables 4/5.

The corruptions themselves come from the ``imagecorruptions`` module of the maintained
``imagecorruptions-imaug`` package (Hendrycks & Dietterich's ImageNet-C code), installed by
``pip install "clipdense[robustness]"``; this module only makes them deterministic, checks their inputs and
sweeps a predictor over corruptions x severities.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

#: The eight corruptions of MaskCLIP's robustness study, spelt as ``imagecorruptions`` spells them.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "gaussian_blur",
    "defocus_blur",
    "spatter",
    "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: ``imagecorruptions`` rejects images with a side below this.
MIN_SIDE = 32

INSTALL_HINT = 'the ImageNet-C corruptions need the imagecorruptions package: pip install "clipdense[robustness]"'


def _backend():
    """Imports ``imagecorruptions`` or raises ModuleNotFoundError naming the extra to install."""
    try:
        return importlib.import_module("imagecorruptions")
    except ImportError as e:  # also a broken install, e.g. the 2020 release on a setuptools without pkg_resources
        raise ModuleNotFoundError(f"{INSTALL_HINT} ({type(e).__name__}: {e})", name="imagecorruptions") from e


def check_available() -> None:
    """Raises ModuleNotFoundError (with the install command) if the corruption package cannot be imported."""
    _backend()


def _check(name: str, severity: int) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Applies one ImageNet-C corruption, deterministically for a given seed.

    The package draws from numpy's global RNG (and impulse noise from its own seed argument); the global
    state is seeded inside and restored afterwards, so callers' random streams are not disturbed.

    Args:
        image: H x W x 3 uint8 RGB image, both sides at least 32 pixels.
        name: One of :data:`CORRUPTIONS`.
        severity: 1 (mild) to 5 (strong).
        seed: Seed of the corruption's randomness (noise, spatter); the same seed gives the same output.

    Returns:
        H x W x 3 uint8 corrupted image, the size of the input.

    Raises:
        ValueError: On an unknown corruption, a severity outside 1..5, or an image that is not H x W x 3 uint8
            with sides of at least 32 pixels.
        ModuleNotFoundError: If the corruption package is not installed.
    """
    _check(name, severity)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"corrupt() needs an H x W x 3 uint8 numpy array, got {got}")
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"image is {h}x{w} (H x W); ImageNet-C corruptions need both sides >= {MIN_SIDE} pixels")
    backend = _backend()
    fn = backend.corruption_dict[name]
    kwargs: dict[str, Any] = {}
    if "seed" in inspect.signature(fn).parameters:  # impulse noise seeds its own Generator, not the global RNG
        kwargs["seed"] = int(seed)
    state = np.random.get_state()
    try:
        np.random.seed(int(seed) % 2**32)
        out = backend.corrupt(np.ascontiguousarray(image), severity=int(severity), corruption_name=name, **kwargs)
    finally:
        np.random.set_state(state)
    out = np.asarray(out)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    if out.shape[:2] != (h, w):
        # ImageNet-C was written for 224 x 224 crops; some releases return a fixed or padded size.
        if out.shape[0] >= h and out.shape[1] >= w:
            out = out[:h, :w]
        else:
            out = np.asarray(Image.fromarray(out.astype(np.uint8)).resize((w, h), Image.BILINEAR))
    return np.ascontiguousarray(np.clip(out, 0, 255).astype(np.uint8))


def _nan_to_none(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def robustness_sweep(
    predictor,
    dataset,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
    on_image: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Evaluates a training-free predictor on clean and corrupted images of a dataset.

    Each image is read once and corrupted under every (corruption, severity) with seed ``seed + index``, so a
    run is reproducible and independent of the order or subset of conditions. The predictor's classes are
    set to the dataset's.

    Args:
        predictor: An :class:`~clipdense.inference.OpenVocabPredictor` (``set_classes``, ``set_image``,
            ``predict``).
        dataset: A :class:`~clipdense.data.datasets.SegmentationDataset`; samples give ``image``
            (3 x H x W uint8) and ``label`` (H x W int64).
        corruptions: Names from :data:`CORRUPTIONS`.
        severities: Severities from 1 to 5.
        seed: Base seed of the corruptions.
        limit: Evaluate only the first N images.
        progress: Show a tqdm progress bar.
        on_image: Called with each image index once it is done (for logging).

    Returns:
        ``{"clean": mIoU, "results": {name: {"1": mIoU, ..., "5": mIoU, "mean": mIoU}}, "mean":
        {"1": ..., "mean": ...}, "corruptions": [...], "severities": [...], "seed": seed, "images": N}``;
        mIoU in percent, ``None`` where undefined. ``"mean"`` averages over corruptions.

    Raises:
        ValueError: On an unknown corruption or severity, an empty dataset, or a predictor whose class count
            differs from the dataset's.
    """
    from clipdense.evaluation.metrics import SegmentationMetric

    corruptions, severities = list(corruptions), [int(s) for s in severities]
    if not corruptions or not severities:
        raise ValueError("name at least one corruption and one severity")
    for name in corruptions:
        for s in severities:
            _check(name, s)
    check_available()
    names = predictor.set_classes(dataset.class_names)
    if len(names) != dataset.num_classes:
        raise ValueError(
            f"the dataset has {dataset.num_classes} classes but the predictor has {len(names)}: a background "
            "threshold needs a dataset whose class list starts with 'background'"
        )
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count < 1:
        raise ValueError("no images to evaluate (empty dataset or --limit 0)")

    def new_metric():
        return SegmentationMetric(dataset.num_classes, ignore_index=dataset.ignore_index, class_names=names)

    conditions = [(n, s) for n in corruptions for s in severities]
    clean = new_metric()
    metrics = {c: new_metric() for c in conditions}
    for i in tqdm(range(count), desc="robustness", unit="img", disable=not progress):
        sample = dataset[i]
        image = sample["image"]
        array = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        predictor.set_image(array)
        clean.update(predictor.predict().labels, sample["label"])
        for name, s in conditions:
            predictor.set_image(corrupt(array, name, s, seed + i))
            metrics[(name, s)].update(predictor.predict().labels, sample["label"])
        if on_image is not None:
            on_image(i)

    results: dict[str, dict[str, float | None]] = {}
    for name in corruptions:
        row = {str(s): _nan_to_none(metrics[(name, s)].compute().miou) for s in severities}
        row["mean"] = _mean([row[str(s)] for s in severities])
        results[name] = row
    mean_row = {key: _mean([results[n][key] for n in corruptions]) for key in [*map(str, severities), "mean"]}
    return {
        "clean": _nan_to_none(clean.compute().miou),
        "results": results,
        "mean": mean_row,
        "corruptions": corruptions,
        "severities": severities,
        "seed": seed,
        "images": count,
    }


def format_table(results: Mapping[str, Any], digits: int = 1) -> str:
    """Formats a sweep's mIoU as MaskCLIP's robustness table: one row per corruption, one column per severity.

    Args:
        results: What :func:`robustness_sweep` returns (or its JSON, reloaded).
        digits: Decimals shown.

    Returns:
        The table: a header, a row per corruption plus a ``mean`` row (columns severity 1..5 and their mean),
        and a final ``clean mIoU`` line; undefined values show ``-``.
    """

    def fmt(v: float | None) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    keys = [*map(str, results["severities"]), "mean"]
    rows = [[n, *(fmt(results["results"][n].get(k)) for k in keys)] for n in results["corruptions"]]
    rows.append(["mean", *(fmt(results["mean"].get(k)) for k in keys)])
    header = ["corruption", *keys]
    name_w = max(len(r[0]) for r in [header, *rows])
    val_w = max(len(c) for r in [header, *rows] for c in r[1:])

    def line(r: list[str]) -> str:
        return f"{r[0]:<{name_w}}  " + "  ".join(f"{c:>{val_w}}" for c in r[1:])

    out = [line(header), "-" * len(line(header))]
    out += [line(r) for r in rows[:-1]]
    out += ["-" * len(line(header)), line(rows[-1])]
    out.append(f"clean mIoU: {fmt(results['clean'])}  ({results['images']} images, seed {results['seed']})")
    return "\n".join(out)
