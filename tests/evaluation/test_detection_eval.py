"""Tests for COCO box / mask AP evaluation against pycocotools run directly on hand-built results."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

mask_util = pytest.importorskip("pycocotools.mask")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from clipdense.evaluation.detection import (  # noqa: E402
    METRIC_NAMES,
    DetectionReport,
    coco_evaluate,
    detections_to_coco,
    evaluate_detection,
)

W, H = 64, 48
CATEGORIES = [(1, "cat"), (3, "dog"), (7, "bird")]
LABEL_TO_CATEGORY = {0: 1, 1: 3, 2: 7}  # written out by hand, independent of the code under test


def rect(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def ellipse_rle(cx: float, cy: float, rx: float, ry: float) -> dict:
    yy, xx = np.mgrid[:H, :W]
    mask = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8)
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


# image id -> [(category id, segmentation)]; bird (7) has a single instance, sizes are small (< 32^2) and medium.
GT_OBJECTS = {
    11: [(1, rect(4, 4, 20, 16)), (3, rect(26, 8, 36, 32))],
    12: [(1, [[40, 4, 60, 4, 50, 20]]), (7, rect(10, 6, 40, 36))],
    15: [(3, ellipse_rle(30, 24, 14, 10)), (1, rect(50, 30, 10, 12))],
    20: [(1, rect(2, 2, 44, 30)), (3, rect(50, 36, 12, 10))],
}


def make_coco(objects: dict[int, list[tuple[int, object]]] = GT_OBJECTS) -> COCO:
    """In-memory ground truth; area and bbox come from the rasterised segmentation, as in COCO."""
    images = [{"id": image_id, "width": W, "height": H, "file_name": f"{image_id}.png"} for image_id in objects]
    annotations = []
    for image_id, objs in objects.items():
        for category_id, segm in objs:
            rles = mask_util.frPyObjects(segm, H, W) if isinstance(segm, list) else [segm]
            rle = mask_util.merge(rles)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": segm,
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in CATEGORIES],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class TinyCocoDetection:
    """Stand-in for ``clipdense.data.detection.CocoDetection``; each image is filled with ``image_id / 100`` so the
    fake detector can tell which image it is given."""

    def __init__(self, coco: COCO) -> None:
        self.coco = coco
        self.category_ids = sorted(coco.getCatIds())
        self.class_names = [coco.cats[c]["name"] for c in self.category_ids]
        self.ids = [img["id"] for img in coco.dataset["images"]]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        image_id = self.ids[i]
        anns = self.coco.imgToAnns[image_id]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
        labels = torch.tensor([self.category_ids.index(a["category_id"]) for a in anns])
        image = torch.full((3, H, W), image_id / 100)
        return {"image": image, "target": {"boxes": boxes, "labels": labels, "image_id": image_id}}


class FakeDetector(nn.Module):
    """Returns fixed per-image predictions (torchvision detection contract), looked up from the image's fill."""

    def __init__(self, predictions: dict[int, dict[str, torch.Tensor]], with_masks: bool = True) -> None:
        super().__init__()
        self.predictions = predictions
        self.with_masks = with_masks
        self.batch_sizes: list[int] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        assert not self.training and not torch.is_grad_enabled()
        self.batch_sizes.append(len(images))
        outputs = []
        for image in images:
            pred = self.predictions[round(image[0, 0, 0].item() * 100)]
            outputs.append({k: v.clone() for k, v in pred.items() if self.with_masks or k != "masks"})
        return outputs


def _stack(dets: list[tuple[list[float], float, int, np.ndarray]]) -> dict[str, torch.Tensor]:
    if not dets:
        return {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 1, H, W),
        }
    return {
        "boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32),
        "scores": torch.tensor([d[1] for d in dets], dtype=torch.float32),
        "labels": torch.tensor([d[2] for d in dets], dtype=torch.int64),
        "masks": torch.from_numpy(np.stack([d[3] for d in dets])[:, None].astype(np.float32)),
    }


def perfect_predictions(coco: COCO) -> dict[int, dict[str, torch.Tensor]]:
    """Every ground-truth object with its exact box and mask, score 1."""
    category_ids = sorted(coco.getCatIds())
    out = {}
    for image_id in coco.getImgIds():
        dets = []
        for ann in coco.imgToAnns[image_id]:
            x, y, w, h = ann["bbox"]
            dets.append(([x, y, x + w, y + h], 1.0, category_ids.index(ann["category_id"]), coco.annToMask(ann)))
        out[image_id] = _stack(dets)
    return out


def noisy_predictions(coco: COCO, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Jittered boxes, shifted soft masks, a missed object, a duplicate and a false positive."""
    rng = np.random.default_rng(seed)
    category_ids = sorted(coco.getCatIds())
    out = {}
    for image_id in coco.getImgIds():
        dets = []
        for k, ann in enumerate(coco.imgToAnns[image_id]):
            if image_id == 15 and k == 0:
                continue  # missed
            x, y, w, h = ann["bbox"]
            box = (np.array([x, y, x + w, y + h]) + rng.uniform(-2.5, 2.5, 4)).tolist()
            shifted = np.roll(
                coco.annToMask(ann), shift=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1)
            )
            prob = np.clip(0.15 + 0.7 * shifted + rng.normal(0, 0.2, shifted.shape), 0, 1)
            dets.append((box, float(rng.uniform(0.3, 1.0)), category_ids.index(ann["category_id"]), prob))
            if image_id == 20 and k == 0:
                dets.append(([b + 4 for b in box], 0.2, dets[-1][2], np.roll(prob, 4, axis=1)))  # duplicate
        if image_id == 12:
            fp = np.zeros((H, W))
            fp[30:46, 40:60] = 0.9
            dets.append(([40.0, 30.0, 60.0, 46.0], 0.95, 1, fp))  # false positive
        out[image_id] = _stack(dets)
    return out


def hand_results(predictions: dict[int, dict[str, torch.Tensor]], image_ids: list[int]) -> tuple[list, list]:
    """Reference COCO results built detection by detection: (bbox results, segm results without bbox)."""
    bbox_res, segm_res = [], []
    for image_id in image_ids:
        p = predictions[image_id]
        for box, score, label, mask in zip(p["boxes"], p["scores"], p["labels"], p["masks"], strict=True):
            x1, y1, x2, y2 = box.tolist()
            category_id = LABEL_TO_CATEGORY[int(label)]
            bbox_res.append(
                {
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
            rle = mask_util.encode(np.asfortranarray((mask[0].numpy() > 0.5).astype(np.uint8)))
            segm_res.append(
                {"image_id": image_id, "category_id": category_id, "segmentation": rle, "score": float(score)}
            )
    return bbox_res, segm_res


def pycocotools_stats(coco: COCO, results: list, iou_type: str, image_ids: list[int]) -> np.ndarray:
    """``COCOeval.stats[:6]`` straight from pycocotools."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iouType=iou_type)
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[:6]


def assert_matches_stats(values: dict[str, float], stats: np.ndarray) -> None:
    assert list(values) == list(METRIC_NAMES)
    for name, s in zip(METRIC_NAMES, stats, strict=True):
        if s < 0:
            assert math.isnan(values[name]), name
        else:
            assert values[name] == pytest.approx(100 * s, abs=1e-9), name


@pytest.fixture(scope="module")
def coco() -> COCO:
    return make_coco()


@pytest.mark.parametrize(("batch_size", "limit"), [(1, None), (3, None), (2, 3)])
def test_parity_with_pycocotools(coco, batch_size, limit) -> None:
    dataset = TinyCocoDetection(coco)
    predictions = noisy_predictions(coco)
    model = FakeDetector(predictions).train()
    report = evaluate_detection(model, dataset, progress=False, limit=limit, batch_size=batch_size)

    image_ids = dataset.ids[:limit]
    bbox_res, segm_res = hand_results(predictions, image_ids)
    bbox_stats = pycocotools_stats(coco, bbox_res, "bbox", image_ids)
    segm_stats = pycocotools_stats(coco, segm_res, "segm", image_ids)
    assert_matches_stats(report.bbox, bbox_stats)
    assert_matches_stats(report.segm, segm_stats)
    # Non-trivial: the noise lowers AP, and no ground-truth object is large (APl undefined).
    assert 10 < report.bbox["AP"] < 95 and 10 < report.segm["AP"] < 95
    assert math.isnan(report.bbox["APl"]) and math.isnan(report.segm["APl"])
    assert report.num_images == len(image_ids)
    assert report.num_detections == len(bbox_res)
    assert not model.training
    expected_batches = [min(batch_size, len(image_ids) - s) for s in range(0, len(image_ids), batch_size)]
    assert model.batch_sizes == expected_batches


def test_box_only_model_has_no_segm(coco) -> None:
    dataset = TinyCocoDetection(coco)
    predictions = noisy_predictions(coco)
    report = evaluate_detection(FakeDetector(predictions, with_masks=False), dataset, progress=False)
    assert report.segm is None
    assert_matches_stats(
        report.bbox, pycocotools_stats(coco, hand_results(predictions, dataset.ids)[0], "bbox", dataset.ids)
    )
    assert "segm" not in report.format()


def test_perfect_predictions_give_100(coco) -> None:
    report = evaluate_detection(FakeDetector(perfect_predictions(coco)), TinyCocoDetection(coco), progress=False)
    for values in (report.bbox, report.segm):
        for name in ("AP", "AP50", "AP75", "APs", "APm"):
            assert values[name] == pytest.approx(100.0, abs=1e-9), name
        assert math.isnan(values["APl"])


def test_empty_predictions_give_zeros(coco, tmp_path) -> None:
    dataset = TinyCocoDetection(coco)
    empty = {image_id: _stack([]) for image_id in dataset.ids}
    path = tmp_path / "results.json"
    report = evaluate_detection(FakeDetector(empty), dataset, progress=False, results_path=path)
    for values in (report.bbox, report.segm):
        assert [values[n] for n in ("AP", "AP50", "AP75", "APs", "APm")] == [0.0] * 5
        assert math.isnan(values["APl"])
    assert report.num_detections == 0 and report.num_images == 4
    assert json.loads(path.read_text()) == []
    direct = coco_evaluate(coco, [], [11], ("bbox", "segm"))
    assert direct["bbox"]["AP"] == 0.0 and direct["segm"]["AP"] == 0.0


def test_wrong_category_lowers_ap(coco) -> None:
    dataset = TinyCocoDetection(coco)
    predictions = perfect_predictions(coco)
    # The only bird (category 7, label 2) predicted as a cat (label 0, category 1) with the lowest score: cat AP
    # stays 100 (the false positive ranks after all of its true positives), bird AP drops to 0, dog stays 100.
    bird = predictions[12]["labels"] == 2
    assert bird.sum() == 1
    predictions[12]["labels"][bird] = 0
    predictions[12]["scores"][bird] = 0.5
    report = evaluate_detection(FakeDetector(predictions), dataset, progress=False)
    for values in (report.bbox, report.segm):
        for name in ("AP", "AP50", "AP75"):
            assert values[name] == pytest.approx(200 / 3, abs=1e-9), name


def test_detections_to_coco_fields_and_rle_roundtrip() -> None:
    rng = np.random.default_rng(1)
    probs = torch.from_numpy(rng.random((3, 1, H, W)).astype(np.float32))
    output = {
        "boxes": torch.tensor([[1.5, 2.0, 11.5, 22.25], [0.0, 0.0, 64.0, 48.0], [30.0, 10.0, 31.0, 12.0]]),
        "scores": torch.tensor([0.9, 0.5, 0.125]),
        "labels": torch.tensor([2, 0, 1]),
        "masks": probs,
    }
    entries = detections_to_coco(output, 42, [1, 3, 7], with_masks=True)
    assert [e["category_id"] for e in entries] == [7, 1, 3]
    assert entries[0]["bbox"] == [1.5, 2.0, 10.0, 20.25]
    assert entries[1]["bbox"] == [0.0, 0.0, 64.0, 48.0]
    assert [e["score"] for e in entries] == pytest.approx([0.9, 0.5, 0.125])
    assert all(e["image_id"] == 42 and isinstance(e["bbox"][0], float) for e in entries)
    for entry, prob in zip(entries, probs, strict=True):
        rle = entry["segmentation"]
        assert isinstance(rle["counts"], str) and rle["size"] == [H, W]
        np.testing.assert_array_equal(mask_util.decode(rle), (prob[0] > 0.5).numpy().astype(np.uint8))
    json.dumps(entries)  # JSON-safe

    no_masks = detections_to_coco(output, 42, [1, 3, 7], with_masks=False)
    assert all("segmentation" not in e for e in no_masks)
    with pytest.raises(ValueError, match="outside 0..2"):
        detections_to_coco({**output, "labels": torch.tensor([0, 3, 1])}, 42, [1, 3, 7], with_masks=False)


def test_segm_uses_mask_area_not_box_area() -> None:
    # A thin diagonal false positive: mask area small, box area medium. As in detectron2 / mmdetection, mask APs
    # must count it (mask area); pycocotools fed the bbox too would use the box area and ignore it for APs.
    gt = make_coco({1: [(1, rect(4, 4, 10, 10))]})
    diag = np.zeros((1, H, W), dtype=np.float32)
    for t in range(40):
        diag[0, 5 + t, 20 + t] = 1.0
    true_mask = gt.annToMask(gt.imgToAnns[1][0]).astype(np.float32)[None]
    output = {
        "boxes": torch.tensor([[20.0, 5.0, 60.0, 45.0], [4.0, 4.0, 14.0, 14.0]]),
        "scores": torch.tensor([0.95, 0.9]),
        "labels": torch.tensor([0, 0]),
        "masks": torch.from_numpy(np.stack([diag, true_mask])),
    }
    results = detections_to_coco(output, 1, [1, 3, 7], with_masks=True)
    metrics = coco_evaluate(gt, results, [1], ("segm",))
    assert metrics["segm"]["APs"] == pytest.approx(50.0, abs=1e-9)
    assert 100 * pycocotools_stats(gt, results, "segm", [1])[3] == pytest.approx(100.0)  # bbox kept: box area


def test_results_json_written_and_loadable(coco, tmp_path) -> None:
    dataset = TinyCocoDetection(coco)
    path = tmp_path / "results.json"
    report = evaluate_detection(FakeDetector(noisy_predictions(coco)), dataset, progress=False, results_path=path)
    results = json.loads(path.read_text())
    assert len(results) == report.num_detections
    assert {r["image_id"] for r in results} <= set(dataset.ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp file left behind
    # pycocotools reads the file itself and gives the same numbers.
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(str(path)), iouType="bbox")
        evaluator.params.imgIds = dataset.ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert_matches_stats(report.bbox, evaluator.stats[:6])


def test_format_and_to_dict() -> None:
    report = DetectionReport(
        bbox=dict(zip(METRIC_NAMES, [40.23, 61.0, 43.15, 24.0, 44.44, float("nan")], strict=True)),
        segm=dict(zip(METRIC_NAMES, [36.5, 58.01, 38.96, 17.0, 39.2, 52.77], strict=True)),
        num_images=5000,
        num_detections=123,
    )
    text = report.format()
    lines = text.splitlines()
    assert lines[0].split() == ["Type", *METRIC_NAMES]
    assert lines[2].split() == ["bbox", "40.2", "61.0", "43.1", "24.0", "44.4", "-"]
    assert lines[3].split() == ["segm", "36.5", "58.0", "39.0", "17.0", "39.2", "52.8"]
    assert "images: 5000" in text and "detections: 123" in text
    d = json.loads(json.dumps(report.to_dict()))
    assert d["bbox"]["AP"] == 40.23 and d["bbox"]["APl"] is None and d["segm"]["APl"] == 52.77
    assert d["num_images"] == 5000 and d["num_detections"] == 123


def test_rejects_resized_images_and_unknown_ids(coco) -> None:
    class Resized(TinyCocoDetection):
        def __getitem__(self, i):
            sample = super().__getitem__(i)
            sample["image"] = torch.nn.functional.interpolate(sample["image"][None], scale_factor=0.5)[0]
            return sample

    model = FakeDetector(noisy_predictions(coco))
    with pytest.raises(ValueError, match="original size"):
        evaluate_detection(model, Resized(coco), progress=False)
    with pytest.raises(ValueError, match="not in the ground-truth"):
        bad = TinyCocoDetection(coco)
        bad.ids = [99]
        evaluate_detection(model, bad, progress=False)
    with pytest.raises(ValueError, match="no image ids"):
        coco_evaluate(coco, [], [], ("bbox",))
