"""Tests for the confusion-matrix segmentation metrics against an independent numpy computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from clipdense.evaluation import SegmentationMetric, SegmentationReport


def numpy_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> dict:
    """Reference metrics computed per class with boolean masks (no confusion matrix), in percent."""
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    ious, accs, freqs = [], [], []
    for c in range(num_classes):
        inter = np.sum((pred == c) & (target == c))
        union = np.sum((pred == c) | (target == c))
        gt = np.sum(target == c)
        ious.append(inter / union if union else np.nan)
        accs.append(inter / gt if gt else np.nan)
        freqs.append(gt / target.size)
    ious, accs, freqs = np.array(ious), np.array(accs), np.array(freqs)
    return {
        "miou": 100 * np.nanmean(ious),
        "macc": 100 * np.nanmean(accs),
        "aacc": 100 * np.mean(pred == target),
        "fwiou": 100 * np.nansum(freqs * ious),
        "iou": 100 * ious,
        "acc": 100 * accs,
    }


def test_matches_numpy_on_random_batches() -> None:
    rng = np.random.default_rng(0)
    num_classes = 7
    metric = SegmentationMetric(num_classes)
    preds, targets = [], []
    for _ in range(3):
        target = rng.integers(0, num_classes, size=(2, 16, 20))
        target[rng.random(target.shape) < 0.1] = 255
        # Correlated predictions: right about half the time.
        pred = np.where(rng.random(target.shape) < 0.5, target, rng.integers(0, num_classes, size=target.shape))
        pred[pred == 255] = 0
        metric.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred)
        targets.append(target)
    report = metric.compute()
    ref = numpy_metrics(np.concatenate(preds), np.concatenate(targets), num_classes)
    for key in ("miou", "macc", "aacc", "fwiou"):
        assert getattr(report, key) == pytest.approx(ref[key], abs=1e-6)
    np.testing.assert_allclose(report.per_class_iou, ref["iou"], atol=1e-6)
    np.testing.assert_allclose(report.per_class_acc, ref["acc"], atol=1e-6)
    assert metric.confusion.dtype == torch.int64 and metric.confusion.device.type == "cpu"
    assert metric.confusion.sum() == sum(int(np.sum(t != 255)) for t in targets)


def test_single_image_2d_and_uint8_targets() -> None:
    rng = np.random.default_rng(1)
    target = rng.integers(0, 4, size=(10, 12)).astype(np.uint8)
    pred = rng.integers(0, 4, size=(10, 12))
    metric = SegmentationMetric(4)
    metric.update(torch.from_numpy(pred), torch.from_numpy(target))
    ref = numpy_metrics(pred, target, 4)
    assert metric.compute().miou == pytest.approx(ref["miou"], abs=1e-6)


def test_ignore_index_excluded() -> None:
    target = torch.tensor([[0, 1, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 0]])
    metric = SegmentationMetric(2)
    metric.update(pred, target)
    report = metric.compute()
    assert report.miou == 100 and report.aacc == 100 and report.fwiou == 100
    assert metric.confusion.sum() == 2
    custom = SegmentationMetric(2, ignore_index=-1)
    custom.update(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, -1]]))
    assert custom.compute().aacc == 100


def test_absent_classes_are_nan() -> None:
    # Class 2: no GT, no prediction -> NaN IoU and Acc. Class 3: predicted but no GT -> IoU 0, Acc NaN.
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 3, 1, 1]])
    metric = SegmentationMetric(4, class_names=["a", "b", "c", "d"])
    metric.update(pred, target)
    report = metric.compute()
    iou, acc = report.per_class_iou, report.per_class_acc
    assert iou[0] == pytest.approx(50) and iou[1] == 100 and math.isnan(iou[2]) and iou[3] == 0
    assert acc[0] == pytest.approx(50) and acc[1] == 100 and math.isnan(acc[2]) and math.isnan(acc[3])
    assert report.miou == pytest.approx(50)  # nanmean of 50, 100, 0
    assert report.macc == pytest.approx(75)
    assert report.aacc == pytest.approx(75)
    assert report.fwiou == pytest.approx(0.5 * 50 + 0.5 * 100)


def test_perfect_prediction() -> None:
    target = torch.randint(0, 5, (2, 8, 8))
    metric = SegmentationMetric(5)
    metric.update(target.clone(), target)
    report = metric.compute()
    assert (report.miou, report.macc, report.aacc, report.fwiou) == (100, 100, 100, 100)


def test_empty_and_reset() -> None:
    metric = SegmentationMetric(3)
    report = metric.compute()
    assert all(math.isnan(v) for v in (report.miou, report.macc, report.aacc, report.fwiou))
    metric.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    metric.reset()
    assert metric.confusion.sum() == 0


def test_update_errors() -> None:
    metric = SegmentationMetric(3)
    with pytest.raises(ValueError, match="equal shapes"):
        metric.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="argmax"):
        metric.update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class ids"):
        metric.update(torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target contains class ids \[3, 7\]"):
        metric.update(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[3, 7, 255]]))
    with pytest.raises(ValueError, match=r"pred contains class ids \[-1\]"):
        metric.update(torch.tensor([[-1, 0]]), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="class names"):
        SegmentationMetric(3, class_names=["a"])


def test_report_dict_table_and_json(tmp_path) -> None:
    metric = SegmentationMetric(3, class_names=["sky", "traffic light", "cat"])
    metric.update(torch.tensor([[0, 1, 1, 0]]), torch.tensor([[0, 1, 0, 0]]))
    report = metric.compute()
    data = report.to_dict()
    assert data["per_class_iou"][2] is None and data["per_class_acc"][2] is None
    assert data["class_names"] == ["sky", "traffic light", "cat"]
    json.dumps(data, allow_nan=False)

    table = report.format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["Class", "IoU", "Acc"]
    assert len({len(line) for line in lines[:-1]}) == 1, "columns must be aligned"
    assert "traffic light" in table and "-" in lines[4]
    assert lines[-1].startswith("mIoU: ") and "mAcc: " in lines[-1] and "aAcc: 75.00" in lines[-1]
    assert "fwIoU: " in lines[-1]

    path = tmp_path / "result.json"
    path.write_text("old")
    report.save_json(path)
    assert json.loads(path.read_text()) == data
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_report_defaults() -> None:
    report = SegmentationReport(50.0, 50.0, 50.0, 50.0, [50.0, float("nan")], [50.0, float("nan")])
    assert report.format_table().splitlines()[2].split() == ["0", "50.00", "50.00"]
