"""Dataset sanity checks and tolerance of bad samples during training.

:func:`check_dataset` reads every image/mask pair of a :class:`~clipdense.data.datasets.SegmentationDataset`
once and reports unreadable files, image/mask size mismatches and out-of-range label values, together with
the per-class pixel histogram, without stopping at the first bad file. :class:`SkipBadSamples` and
:func:`collate_skip_none` let a training run either stop on a bad sample (the default reader error names
the file) or skip it, warn, and report how many were skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from .datasets import LabelConvention, SegmentationDataset, read_image_rgb, read_mask

logger = logging.getLogger(__name__)

#: Errors the dataset readers raise for a bad file (missing, undecodable, size mismatch, bad labels).
BAD_SAMPLE_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, Image.DecompressionBombError)


class SampleProblem(NamedTuple):
    """One problem found in one file.

    Attributes:
        path: The offending file (the image for unreadable images, the mask otherwise).
        problem: What is wrong, starting with its kind ("unreadable image", "unreadable mask", "size
            mismatch", "out-of-range labels", "unexpected error").
    """

    path: str
    problem: str


@dataclass
class DatasetReport:
    """Result of :func:`check_dataset`.

    Attributes:
        name: Dataset name.
        class_names: One name per train id.
        ignore_index: Label value counted in the last histogram bin.
        num_samples: Number of samples checked.
        histogram: Pixel counts, int64 ``[num_classes + 1]``: train ids ``0..C-1`` then ``ignore_index``.
            Only samples without problems are counted.
        problems: Problems found, in dataset order.
    """

    name: str
    class_names: list[str]
    ignore_index: int
    num_samples: int = 0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    problems: list[SampleProblem] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of train classes C."""
        return len(self.class_names)

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems

    def format(self) -> str:
        """Renders the histogram as a text table (id, class, pixels, % of all counted pixels), then the problems."""
        total = int(self.histogram.sum())
        names = [*self.class_names, f"ignore ({self.ignore_index})"]
        width = max(5, min(32, max(len(n) for n in names)))
        lines = [
            f"{self.name}: {self.num_samples} samples checked, {len(self.problems)} problem(s), {total} pixels counted",
            f"{'id':>4}  {'class':<{width}}  {'pixels':>14}  {'%':>7}",
        ]
        for index, (class_name, pixels) in enumerate(zip(names, self.histogram.tolist(), strict=True)):
            shown = class_name if len(class_name) <= width else class_name[: width - 3] + "..."
            share = 100.0 * pixels / total if total else 0.0
            ident = str(index) if index < self.num_classes else "-"
            lines.append(f"{ident:>4}  {shown:<{width}}  {pixels:>14}  {share:>7.2f}")
        absent = [n for n, pixels in zip(self.class_names, self.histogram.tolist(), strict=False) if pixels == 0]
        if absent:
            lines.append(f"classes with no pixels ({len(absent)}): {', '.join(absent)}")
        if self.problems:
            lines.append(f"problems ({len(self.problems)}):")
            lines += [f"  {path}: {problem}" for path, problem in self.problems]
        else:
            lines.append("no problems found")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _out_of_range_values(raw: np.ndarray, uniq: np.ndarray, convention: LabelConvention) -> list[int]:
    bad = []
    for value in uniq.tolist():
        try:
            convention.apply(np.array([[value]], dtype=raw.dtype))
        except ValueError:
            bad.append(value)
    return bad


def _check_sample(
    image_path: Path, label_path: Path, convention: LabelConvention
) -> tuple[list[SampleProblem], np.ndarray | None]:
    """Checks one pair; returns its problems and, if there are none, its histogram ``[C + 1]``."""
    problems: list[SampleProblem] = []
    image = raw = None
    try:
        image = read_image_rgb(image_path)
    except BAD_SAMPLE_ERRORS as error:
        problems.append(SampleProblem(str(image_path), f"unreadable image: {error}"))
    try:
        raw = read_mask(label_path)
    except BAD_SAMPLE_ERRORS as error:
        problems.append(SampleProblem(str(label_path), f"unreadable mask: {error}"))
    if raw is None:
        return problems, None
    if image is not None and tuple(raw.shape[:2]) != tuple(image.shape[1:]):
        problems.append(
            SampleProblem(
                str(label_path),
                f"size mismatch: mask is {raw.shape[0]}x{raw.shape[1]} (H x W) but image {image_path.name} is "
                f"{image.shape[1]}x{image.shape[2]}",
            )
        )
    if raw.ndim != 2 or not (np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.bool_):
        problems.append(
            SampleProblem(
                str(label_path),
                f"not an index mask: shape {tuple(raw.shape)}, dtype {raw.dtype} (expected H x W integer class ids)",
            )
        )
        return problems, None
    uniq, counts = np.unique(raw, return_counts=True)
    try:
        train_ids = convention.apply(uniq[None, :], source=str(label_path))[0]
    except ValueError:
        bad = _out_of_range_values(raw, uniq, convention)
        problems.append(
            SampleProblem(
                str(label_path),
                f"out-of-range labels: raw values {bad} (allowed after conversion: 0..{convention.num_classes - 1} "
                f"and {convention.ignore_index}, reduce_zero_label={convention.reduce_zero_label})",
            )
        )
        return problems, None
    if problems:
        return problems, None
    bins = np.where(train_ids == convention.ignore_index, convention.num_classes, train_ids)
    histogram = np.zeros(convention.num_classes + 1, dtype=np.int64)
    np.add.at(histogram, bins, counts.astype(np.int64))
    return problems, histogram


def check_dataset(dataset: SegmentationDataset, limit: int | None = None, progress: bool = True) -> DatasetReport:
    """Reads every image/mask pair of a dataset and reports problems and the class pixel histogram.

    Files are read directly (the dataset's ``transform`` is not applied); a bad sample never raises, it is
    recorded in ``problems`` and left out of the histogram.

    Args:
        dataset: A reader from :func:`clipdense.data.datasets.build_dataset` (or any SegmentationDataset).
        limit: Check only the first ``limit`` samples.
        progress: Show a tqdm progress bar.

    Returns:
        The report; ``print(report.format())`` for a table.

    Raises:
        TypeError: If ``dataset`` is not a SegmentationDataset (e.g. a wrapper such as SkipBadSamples).
    """
    if not isinstance(dataset, SegmentationDataset):
        raise TypeError(
            f"check_dataset needs a SegmentationDataset (it reads the files listed in .samples), got "
            f"{type(dataset).__name__}; pass the reader itself, not a wrapper"
        )
    convention = dataset.convention
    count = len(dataset) if limit is None else max(0, min(limit, len(dataset)))
    report = DatasetReport(
        name=dataset.name,
        class_names=list(dataset.class_names),
        ignore_index=convention.ignore_index,
        histogram=np.zeros(convention.num_classes + 1, dtype=np.int64),
    )
    for image_path, label_path in tqdm(
        dataset.samples[:count], desc=f"checking {dataset.name}", unit="sample", disable=not progress
    ):
        try:
            problems, histogram = _check_sample(image_path, label_path, convention)
        except Exception as error:  # a check reports, never stops, on one bad sample
            problems, histogram = [SampleProblem(str(image_path), f"unexpected error: {error!r}")], None
        report.num_samples += 1
        report.problems += problems
        if histogram is not None:
            report.histogram += histogram
    return report


class SkippedSample(NamedTuple):
    """A sample :class:`SkipBadSamples` skipped (with ``report=True``), on its way to the training loop.

    Attributes:
        path: The sample's image file.
        reason: The reader's error message.
    """

    path: str
    reason: str


class SkipBadSamples(Dataset):
    """Dataset wrapper that either stops on a bad sample or skips it and counts it.

    A bad sample is one whose reading (or transform) raises one of :data:`BAD_SAMPLE_ERRORS`; other errors
    (bugs) always propagate. With ``skip=False`` the reader's error, which names the file, is re-raised
    unchanged. With ``skip=True`` a warning naming the sample's image file and the error is logged, the
    image path is appended to :attr:`skipped`, and ``None`` is returned: use :func:`collate_skip_none` as
    the DataLoader's ``collate_fn`` to drop it.

    With DataLoader workers each worker process holds its own copy of this wrapper, so :attr:`skipped` in
    the main process only sees samples loaded there (``num_workers=0``). For a total across workers, sum
    ``batch["skipped"]`` (added by :func:`collate_skip_none`) over the batches. To also get the names there,
    pass ``report=True`` and wrap the collate function in :class:`ReportSkipped`.

    Args:
        dataset: The dataset to wrap; its items must be dicts.
        skip: Whether to skip bad samples instead of raising.
        report: Return a :class:`SkippedSample` instead of ``None`` and log nothing: the consumer of the
            batches (via :class:`ReportSkipped`) logs it, in its own process.
    """

    def __init__(self, dataset: Dataset, skip: bool = False, report: bool = False) -> None:
        self.dataset = dataset
        self.skip = skip
        self.report = report
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _describe(self, index: int) -> str:
        samples = getattr(self.dataset, "samples", None)
        if isinstance(samples, Sequence) and 0 <= index < len(samples):
            entry = samples[index]
            return str(entry[0] if isinstance(entry, tuple | list) else entry)
        return f"sample {index} of {self.dataset!r}"

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample | None:
        try:
            return self.dataset[index]
        except BAD_SAMPLE_ERRORS as error:
            if not self.skip:
                raise
            path = self._describe(index)
            self.skipped.append(path)
            if self.report:
                return SkippedSample(path, str(error))
            logger.warning("skipping bad sample %s: %s", path, error)
            return None

    def __repr__(self) -> str:
        return f"SkipBadSamples({self.dataset!r}, skip={self.skip})"


class ReportSkipped:
    """Wraps a collate function (:func:`collate_skip_none`, ``collate_detection``) to pass on which samples
    :class:`SkipBadSamples` (``report=True``) skipped.

    Picklable, so it works in DataLoader workers; the names reach the main process inside the batch.

    Args:
        collate: Collates a list of samples in which skipped ones are ``None``.
    """

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, batch: list[Any]) -> dict[str, Any]:
        """The inner collate's dict, with the skipped samples as ``None``, plus ``"skipped_samples"``: the
        :class:`SkippedSample` entries of ``batch``."""
        skipped = [sample for sample in batch if isinstance(sample, SkippedSample)]
        collated = self.collate([None if isinstance(sample, SkippedSample) else sample for sample in batch])
        collated["skipped_samples"] = skipped
        return collated


def collate_skip_none(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Collates sample dicts after dropping the ``None`` entries :class:`SkipBadSamples` returns.

    Args:
        batch: Sample dicts (e.g. ``"image"`` float32 3 x H x W, ``"label"`` int64 H x W) or None.

    Returns:
        The default-collated dict (``"image"`` B' x 3 x H x W, ...) of the B' remaining samples, plus
        ``"skipped"``: the number of None entries dropped (an int). If every sample was bad, the dict is
        ``{"image": None, "label": None, "skipped": len(batch)}``: the training loop should skip that step.

    Raises:
        TypeError: If the samples are not dicts.
    """
    kept = [sample for sample in batch if sample is not None]
    if any(not isinstance(sample, dict) for sample in kept):
        raise TypeError("collate_skip_none expects dict samples (as the dataset readers return) or None")
    collated: dict[str, Any] = default_collate(kept) if kept else {"image": None, "label": None}
    collated["skipped"] = len(batch) - len(kept)
    return collated
