"""Unseen-class splits of the zero-shot segmentation benchmarks used by MaskCLIP+ (Zhou et al., ECCV 2022).

Shipped as ``clipdense/data/splits/<name>_unseen.txt``, one class per line, spelled as in the shipped class
lists (``voc20``, ``context59``/``context60``, ``cocostuff171``; the paper's "aeroplane" is "airplane").
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

from clipdense.data.classnames import synonyms

AVAILABLE_SPLITS: tuple[str, ...] = ("voc", "context", "cocostuff")


def load_unseen_split(name: str) -> list[str]:
    """The unseen class names of a benchmark.

    Args:
        name: ``"voc"`` (5 classes), ``"context"`` (10) or ``"cocostuff"`` (15).

    Returns:
        Class names in the file's order.

    Raises:
        ValueError: Unknown split.
    """
    if name not in AVAILABLE_SPLITS:
        raise ValueError(f"unknown unseen split {name!r}; available: {', '.join(AVAILABLE_SPLITS)}")
    text = (resources.files("clipdense.data") / "splits" / f"{name}_unseen.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _key(name: str) -> str:
    return "".join(name.lower().split())


def class_indices(names: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """Indices of ``names`` in a class list, matched case- and space-insensitively against every synonym
    (``"tvmonitor"`` finds ``"tv monitor"``).

    Args:
        names: Names to look up.
        class_names: The dataset's class entries (may carry comma-separated synonyms).

    Returns:
        Sorted indices.

    Raises:
        ValueError: A name is not in the class list.
    """
    lookup = {_key(s): i for i, entry in enumerate(class_names) for s in synonyms(entry)}
    missing = [n for n in names if _key(n) not in lookup]
    if missing:
        raise ValueError(f"unseen classes {missing} are not in the class list {list(class_names)[:10]}...")
    return sorted({lookup[_key(n)] for n in names})
