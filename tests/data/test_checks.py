"""Tests for dataset checks and bad-sample handling, on a tiny folder-layout dataset with three bad samples."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipdense.data.checks import SkipBadSamples, check_dataset, collate_skip_none
from clipdense.data.datasets import SegmentationDataset, build_dataset
from clipdense.data.transforms import build_train_transform

H, W = 16, 20
CLASSES = ["background", "cat", "dog"]


def write_pair(root: Path, stem: str, seed: int, mask_values: list[int], mask_size: tuple[int, int] = (H, W)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
    mask = rng.choice(np.array(mask_values, dtype=np.uint8), size=mask_size)
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


@pytest.fixture
def bad_dataset(tmp_path: Path) -> SegmentationDataset:
    """Five samples: a, e good; b corrupt image; c mask of the wrong size; d labels 7 and 9 out of range."""
    root = tmp_path / "mydata"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    write_pair(root, "a", 0, [0, 1, 2, 255])
    write_pair(root, "b", 1, [0, 1])
    (root / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    write_pair(root, "c", 2, [0, 2], mask_size=(H, W + 3))
    write_pair(root, "d", 3, [0, 1, 7, 9])
    write_pair(root, "e", 4, [1, 2, 255])
    return build_dataset("folder", root)


def independent_histogram(mask_files: list[Path]) -> list[int]:
    counts = [0] * (len(CLASSES) + 1)
    for path in mask_files:
        values = np.array(Image.open(path)).ravel().tolist()
        for value in values:
            counts[3 if value == 255 else value] += 1
    return counts


def test_check_dataset_reports_every_problem(bad_dataset: SegmentationDataset) -> None:
    report = check_dataset(bad_dataset, progress=False)
    assert report.num_samples == 5 and report.num_classes == 3 and not report.ok
    found = {Path(path).relative_to(bad_dataset.samples[0][0].parents[1]).as_posix(): p for path, p in report.problems}
    assert sorted(found) == ["images/b.png", "masks/c.png", "masks/d.png"]
    assert found["images/b.png"].startswith("unreadable image") and "b.png" in found["images/b.png"]
    assert found["masks/c.png"] == "size mismatch: mask is 16x23 (H x W) but image c.png is 16x20"
    assert found["masks/d.png"].startswith("out-of-range labels: raw values [7, 9]")

    root = bad_dataset.samples[0][1].parent
    expected = independent_histogram([root / "a.png", root / "e.png"])
    assert report.histogram.tolist() == expected and sum(expected) == 2 * H * W

    text = report.format()
    lines = text.splitlines()
    assert lines[0].startswith("folder: 5 samples checked, 3 problem(s)")
    cat_row = next(line for line in lines if line.split()[:2] == ["1", "cat"])
    assert cat_row.split()[2] == str(expected[1])
    assert float(cat_row.split()[3]) == pytest.approx(100 * expected[1] / sum(expected), abs=0.01)
    assert "ignore (255)" in text
    for name in ("b.png", "c.png", "d.png"):
        assert name in text


def test_check_dataset_limit_and_type(bad_dataset: SegmentationDataset) -> None:
    report = check_dataset(bad_dataset, limit=1, progress=False)
    assert report.num_samples == 1 and report.ok and "no problems found" in report.format()
    with pytest.raises(TypeError, match="SegmentationDataset"):
        check_dataset(SkipBadSamples(bad_dataset), progress=False)


def test_skip_bad_samples_raises_by_default(bad_dataset: SegmentationDataset) -> None:
    strict = SkipBadSamples(bad_dataset, skip=False)
    assert strict[0]["image"].shape == (3, H, W)
    with pytest.raises(ValueError, match=r"could not decode image .*b\.png"):
        strict[1]
    with pytest.raises(ValueError, match=r"size mismatch.*c\.png"):
        strict[2]
    with pytest.raises(ValueError, match=r"d\.png: raw label values \[7, 9\] are out of range"):
        strict[3]
    assert strict.skipped == []


def test_skip_bad_samples_skips_and_counts(bad_dataset: SegmentationDataset, caplog: pytest.LogCaptureFixture) -> None:
    bad_dataset.transform = build_train_transform(8, scale=(W, H), ratio_range=(1.0, 1.0))
    lenient = SkipBadSamples(bad_dataset, skip=True)
    with caplog.at_level(logging.WARNING, logger="clipdense.data.checks"):
        batch = next(iter(torch.utils.data.DataLoader(lenient, batch_size=5, collate_fn=collate_skip_none)))
    assert batch["skipped"] == 3 and batch["image"].shape == (2, 3, 8, 8) and batch["label"].shape == (2, 8, 8)
    assert [Path(p).name for p in batch["image_path"]] == ["a.png", "e.png"]
    assert [Path(p).name for p in lenient.skipped] == ["b.png", "c.png", "d.png"]
    assert len(caplog.records) == 3 and all("skipping bad sample" in r.getMessage() for r in caplog.records)
    assert "b.png" in caplog.records[0].getMessage()


def test_skip_count_with_workers(bad_dataset: SegmentationDataset) -> None:
    # With workers the wrapper in the main process sees nothing; the batches carry the count.
    lenient = SkipBadSamples(bad_dataset, skip=True)
    loader = torch.utils.data.DataLoader(lenient, batch_size=2, num_workers=1, collate_fn=collate_skip_none)
    assert sum(batch["skipped"] for batch in loader) == 3
    assert lenient.skipped == []


def test_collate_skip_none() -> None:
    sample = {"image": torch.zeros(3, 4, 4), "label": torch.zeros(4, 4, dtype=torch.int64), "image_path": "x"}
    batch = collate_skip_none([None, sample, sample, None, None])
    assert batch["skipped"] == 3 and batch["image"].shape == (2, 3, 4, 4) and batch["image_path"] == ["x", "x"]
    assert collate_skip_none([None, None]) == {"image": None, "label": None, "skipped": 2}
    assert collate_skip_none([sample])["skipped"] == 0
    with pytest.raises(TypeError, match="dict samples"):
        collate_skip_none([torch.zeros(2)])
