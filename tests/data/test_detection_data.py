"""Tests for COCO detection data: a hand-written 40x30 COCO folder with known problems and a ShapesWorld export."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from clipdense.data.checks import SkipBadSamples
from clipdense.data.detection import (
    CocoDetection,
    build_detection_dataset,
    build_detection_eval_transform,
    build_detection_train_transform,
    collate_detection,
)
from clipdense.data.shapesworld import class_names as shapesworld_class_names
from clipdense.data.shapesworld import export_coco

mask_utils = pytest.importorskip("pycocotools.mask")

H, W = 30, 40


def rect_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Column-major run lengths starting with a run of zeros, written out by hand."""
    flat = mask.ravel(order="F").tolist()
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


# Masks of the kept annotations, by annotation id (the polygon of annotation 1 rasterises to this rectangle).
MASKS = {
    1: rect_mask(2, 3, 12, 11),
    2: rect_mask(35, 20, 40, 30),
    6: rect_mask(4, 5, 30, 25),
    8: rect_mask(20, 20, 21, 21),
}


def base_coco() -> dict[str, Any]:
    """Four 40x30 images; categories listed out of id order (7, 1, 3) so that sorting matters.

    image 1: ann 1 polygon cat 1, ann 2 compressed RLE cat 3 with a box running off the bottom-right corner,
             ann 3 crowd.
    image 2: ann 4 zero width, ann 5 entirely right of the image, ann 6 uncompressed RLE cat 7,
             ann 8 a 1x1 px box cat 3 (polygon).
    image 3: no annotations.   image 4: only a crowd annotation (ann 7).
    """
    images = [{"id": i, "file_name": f"img{i}.png", "height": H, "width": W} for i in (1, 2, 3, 4)]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "iscrowd": 0,
         "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]], "area": 80},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [35.0, 20.0, 10.0, 15.0], "iscrowd": 0,
         "segmentation": compressed_rle(MASKS[2]), "area": 50},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1,
         "segmentation": uncompressed_rle(rect_mask(0, 0, 5, 5)), "area": 25},
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [5, 5, 0, 4], "iscrowd": 0,
         "segmentation": [[5, 5, 6, 5, 6, 9, 5, 9]], "area": 4},
        {"id": 5, "image_id": 2, "category_id": 3, "bbox": [50, 5, 5, 5], "iscrowd": 0,
         "segmentation": [[50, 5, 55, 5, 55, 10, 50, 10]], "area": 25},
        {"id": 6, "image_id": 2, "category_id": 7, "bbox": [4, 5, 26, 20], "iscrowd": 0,
         "segmentation": uncompressed_rle(MASKS[6]), "area": 520},
        {"id": 8, "image_id": 2, "category_id": 3, "bbox": [20, 20, 1, 1], "iscrowd": 0,
         "segmentation": [[20, 20, 21, 20, 21, 21, 20, 21]], "area": 1},
        {"id": 7, "image_id": 4, "category_id": 7, "bbox": [1, 1, 3, 3], "iscrowd": 1,
         "segmentation": compressed_rle(rect_mask(1, 1, 4, 4)), "area": 9},
    ]  # fmt: skip
    categories = [{"id": 7, "name": "bird"}, {"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(root: Path, data: dict[str, Any], split: str = "train2017") -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    for info in data["images"]:
        rng = np.random.default_rng(info["id"])
        pixels = rng.integers(0, 256, (info["height"], info["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / info["file_name"])
    return root


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "coco", base_coco())


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_coco(tmp_path_factory.mktemp("sw") / "coco", num_train=4, num_val=2, seed=0, progress=False)


# ------------------------------------------------------------------------------------------ reading


def test_categories_ids_and_report(coco_root: Path) -> None:
    ds = CocoDetection(coco_root, "train2017")
    assert ds.category_ids == [1, 3, 7] and ds.class_names == ["cat", "dog", "bird"] and ds.num_classes == 3
    assert ds.ids == [1, 2]
    assert [path.name for (path,) in ds.samples] == ["img1.png", "img2.png"]
    assert ds.annotation_report == {
        "images": 4,
        "annotations": 8,
        "kept": 4,
        "clipped": 1,
        "degenerate": 2,
        "crowd": 2,
        "unknown_category": 0,
        "unknown_image": 0,
        "malformed_box": 0,
        "invalid_segmentation": 0,
        "empty_images": 2,
    }
    lines = ds.describe_problems().splitlines()
    assert lines[0] == "instances_train2017.json: 4 images, 8 annotations, 4 kept as training targets; 2 images used"
    assert lines[1] == "  clipped: 1 (boxes partly outside the image, clipped to it), e.g. annotation ids [2]"
    assert lines[2].startswith("  degenerate: 2 (") and lines[2].endswith("e.g. annotation ids [4, 5]")
    assert lines[3].startswith("  crowd: 2 (") and lines[3].endswith("e.g. annotation ids [3, 7]")
    assert lines[4].startswith("  empty_images: 2 (") and "removed (filter_empty=True)" in lines[4]
    assert lines[4].endswith("e.g. image ids [3, 4]") and len(lines) == 5
    # COCOeval's ground truth is the file itself, crowd regions and degenerate boxes included.
    assert len(ds.coco.getAnnIds()) == 8 and ds.coco.anns[3]["iscrowd"] == 1


def test_targets_equal_the_json(coco_root: Path) -> None:
    ds = CocoDetection(coco_root, "train2017", with_masks=True)
    first, second = ds[0], ds[1]
    image, target = first["image"], first["target"]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, H, W)
    saved = torch.from_numpy(np.array(Image.open(coco_root / "train2017" / "img1.png"))).permute(2, 0, 1)
    assert torch.equal(image.as_subclass(torch.Tensor), saved)
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert boxes.canvas_size == (H, W) and boxes.dtype == torch.float32
    # xywh -> xyxy; annotation 2 ([35, 20, 10, 15]) clipped to the 40x30 image.
    assert boxes.tolist() == [[2.0, 3.0, 12.0, 11.0], [35.0, 20.0, 40.0, 30.0]]
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [0, 1]  # categories 1, 3
    assert target["image_id"] == 1
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8 and masks.shape == (2, H, W)
    assert np.array_equal(masks[0].numpy(), MASKS[1]) and np.array_equal(masks[1].numpy(), MASKS[2])
    assert np.array_equal(masks[0].numpy(), ds.coco.annToMask(ds.coco.anns[1]))  # parity with pycocotools

    target = second["target"]
    assert target["image_id"] == 2
    assert target["boxes"].tolist() == [[4.0, 5.0, 30.0, 25.0], [20.0, 20.0, 21.0, 21.0]]
    assert target["labels"].tolist() == [2, 1]  # categories 7, 3
    assert np.array_equal(target["masks"][0].numpy(), MASKS[6])  # uncompressed RLE
    assert np.array_equal(target["masks"][1].numpy(), MASKS[8])


def test_without_masks_and_without_filter(coco_root: Path) -> None:
    ds = build_detection_dataset(coco_root, "train", filter_empty=False)  # "train" -> train2017
    assert ds.split == "train2017" and ds.ids == [1, 2, 3, 4] and ds.annotation_report["empty_images"] == 2
    assert "kept (filter_empty=False)" in ds.describe_problems()
    assert "masks" not in ds[0]["target"]
    for index in (2, 3):  # no annotation / crowd only: N = 0
        target = ds[index]["target"]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    masked = CocoDetection(coco_root, "train2017", with_masks=True, filter_empty=False)
    assert masked[3]["target"]["masks"].shape == (0, H, W)


def test_unknown_category_and_image(tmp_path: Path) -> None:
    data = base_coco()
    data["annotations"].append({"id": 11, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0})
    data["annotations"].append({"id": 12, "image_id": 42, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0})
    data["annotations"].append({"id": 13, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5], "iscrowd": 0})
    root = write_coco(tmp_path / "coco", data)
    with pytest.raises(ValueError, match=r"annotation 11 has category_id 99.*known ids: \[1, 3, 7\]"):
        CocoDetection(root)

    only_image = copy.deepcopy(data)
    only_image["annotations"] = [a for a in data["annotations"] if a["id"] not in (11, 13)]
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(only_image))
    with pytest.raises(ValueError, match=r"annotation 12 refers to image_id 42.*skip_bad_annotations=True"):
        CocoDetection(root)

    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    ds = CocoDetection(root, skip_bad_annotations=True)
    report = ds.annotation_report
    assert (report["unknown_category"], report["unknown_image"], report["malformed_box"]) == (1, 1, 1)
    assert report["kept"] == 4 and report["annotations"] == 11
    text = ds.describe_problems()
    assert "unknown_category: 1 (" in text and "e.g. annotation ids [11]" in text
    assert "unknown_image: 1 (" in text and "e.g. annotation ids [12]" in text
    assert "malformed_box: 1 (" in text and "e.g. annotation ids [13]" in text
    assert ds[0]["target"]["labels"].tolist() == [0, 1]  # the bad annotations are not in the targets


def test_invalid_segmentation_dropped_with_masks_only(tmp_path: Path) -> None:
    data = base_coco()
    data["annotations"][0]["segmentation"] = [[2, 3, 12, 3]]  # 2 points: not a polygon
    data["annotations"][1]["segmentation"] = {"size": [H + 1, W], "counts": "abc"}  # RLE of another size
    root = write_coco(tmp_path / "coco", data)
    ds = CocoDetection(root, with_masks=True)
    assert ds.annotation_report["invalid_segmentation"] == 2 and ds.annotation_report["kept"] == 2
    assert ds.annotation_report["clipped"] == 0  # annotation 2 was dropped before being counted as clipped
    assert ds.ids == [2]
    assert CocoDetection(root).annotation_report["invalid_segmentation"] == 0  # boxes only: still usable


def test_layout_errors(tmp_path: Path, coco_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        CocoDetection(tmp_path / "nowhere")
    with pytest.raises(
        FileNotFoundError, match=r"instances_val\.json or instances_val2017\.json was not found.*instances_train2017"
    ):
        CocoDetection(coco_root, "val")
    (coco_root / "val2017").mkdir()
    (coco_root / "annotations" / "instances_val2017.json").write_text(json.dumps({**base_coco(), "images": []}))
    with pytest.raises(ValueError, match="no images"):
        CocoDetection(coco_root, "val2017")
    (coco_root / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not read"):
        CocoDetection(coco_root, "val2017")
    (coco_root / "val2017").rmdir()
    with pytest.raises(FileNotFoundError, match=r"image folder .*val2017"):
        CocoDetection(coco_root, "val2017")
    data = base_coco()
    data["annotations"] = [a for a in data["annotations"] if a["iscrowd"] or a["id"] in (4, 5)]
    (coco_root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no image has a usable annotation"):
        CocoDetection(coco_root)


def test_missing_image_is_skipped_and_counted(coco_root: Path) -> None:
    (coco_root / "train2017" / "img2.png").unlink()
    ds = CocoDetection(coco_root)
    with pytest.raises(FileNotFoundError, match=r"img2\.png"):
        ds[1]
    wrapped = SkipBadSamples(ds, skip=True)
    batches = list(DataLoader(wrapped, batch_size=2, collate_fn=collate_detection))
    assert len(batches) == 1 and batches[0]["skipped"] == 1
    assert len(batches[0]["images"]) == 1 and batches[0]["targets"][0]["image_id"] == 1
    assert wrapped.skipped == [str(coco_root / "train2017" / "img2.png")]
    assert collate_detection([None, None]) == {"images": None, "targets": None, "skipped": 2}


def test_size_mismatch_raises(coco_root: Path) -> None:
    Image.fromarray(np.zeros((W, H, 3), dtype=np.uint8)).save(coco_root / "train2017" / "img1.png")  # transposed
    ds = CocoDetection(coco_root)
    with pytest.raises(ValueError, match=r"size mismatch: image .*img1\.png is 40x30 .* says 30x40"):
        ds[0]
    assert ds[1]["target"]["image_id"] == 2


# ------------------------------------------------------------------------------------------ transforms


def test_train_transform_resizes_boxes_and_masks(coco_root: Path) -> None:
    raw = CocoDetection(coco_root, with_masks=True)
    ds = CocoDetection(coco_root, with_masks=True, transform=build_detection_train_transform(60, 100, flip_prob=0.0))
    sample, original = ds[0], raw[0]
    image, target = sample["image"], sample["target"]
    assert image.dtype == torch.float32 and image.shape == (3, 60, 80)  # short side 30 -> 60, long 40 -> 80 <= 100
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert torch.allclose(target["boxes"], original["target"]["boxes"] * 2)
    assert target["boxes"].canvas_size == (60, 80) and target["labels"].tolist() == [0, 1]
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (2, 60, 80)
    upsampled = original["target"]["masks"].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert torch.equal(masks.as_subclass(torch.Tensor), upsampled.as_subclass(torch.Tensor))

    capped = CocoDetection(coco_root, transform=build_detection_train_transform(60, 70, flip_prob=0.0))[0]
    assert capped["image"].shape == (3, 52, 70)  # long side capped at 70, short side int(70 * 30 / 40)
    scale = torch.tensor([70 / 40, 52 / 30, 70 / 40, 52 / 30])
    assert torch.allclose(capped["target"]["boxes"], original["target"]["boxes"] * scale)


def test_train_transform_drops_tiny_boxes_with_their_masks(coco_root: Path) -> None:
    ds = CocoDetection(coco_root, with_masks=True, transform=build_detection_train_transform(15, 20, flip_prob=0.0))
    target = ds[1]["target"]  # boxes 26x20 and 1x1 px; halved, the 1 px box becomes 0.5 px and is dropped
    assert target["boxes"].tolist() == [[2.0, 2.5, 15.0, 12.5]]
    assert target["labels"].tolist() == [2] and target["masks"].shape == (1, 15, 20)


def test_forced_flip_mirrors_boxes_and_masks(coco_root: Path) -> None:
    raw = CocoDetection(coco_root, with_masks=True)[0]
    flipped = CocoDetection(
        coco_root, with_masks=True, transform=build_detection_train_transform(30, 41, flip_prob=1.0)
    )[0]
    assert flipped["image"].shape == (3, H, W)  # 30 is already the short side: no resize
    x0, y0, x1, y1 = raw["target"]["boxes"].unbind(-1)
    assert torch.equal(flipped["target"]["boxes"], torch.stack([W - x1, y0, W - x0, y1], dim=-1))
    assert torch.equal(flipped["target"]["masks"], raw["target"]["masks"].flip(-1))
    assert torch.allclose(flipped["image"], raw["image"].flip(-1).float() / 255)


def test_eval_transform_keeps_size_and_boxes(coco_root: Path) -> None:
    raw = CocoDetection(coco_root, with_masks=True)[1]
    sample = CocoDetection(coco_root, with_masks=True, transform=build_detection_eval_transform())[1]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, H, W)
    assert torch.allclose(sample["image"], raw["image"].float() / 255)
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert torch.equal(sample["target"]["boxes"], raw["target"]["boxes"])
    assert (
        torch.equal(sample["target"]["masks"], raw["target"]["masks"])
        and sample["target"]["masks"].dtype == torch.uint8
    )


def test_train_transform_is_seeded_by_torch(coco_root: Path) -> None:
    ds = CocoDetection(coco_root, transform=build_detection_train_transform(30, 41, flip_prob=0.5))
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append([ds[0]["target"]["boxes"][0, 0].item() for _ in range(8)])
    assert draws[0] == draws[1] and {2.0, 28.0} == set(draws[0])  # x0 = 2 unflipped, 40 - 12 flipped


# ------------------------------------------------------------------------------------------ ShapesWorld export


def test_shapesworld_export(shapes_root: Path) -> None:
    for split, count in (("train", 4), ("val", 2)):
        ds = CocoDetection(shapes_root, split, with_masks=True)
        data = json.loads((shapes_root / "annotations" / f"instances_{split}2017.json").read_text())
        assert ds.class_names == shapesworld_class_names() and ds.category_ids == list(
            range(1, len(ds.class_names) + 1)
        )
        assert len(ds) == count and ds.annotation_report["kept"] == len(data["annotations"])
        assert ds.describe_problems().endswith("no annotation problems found")
        for index in range(len(ds)):
            target = ds[index]["target"]
            anns = [a for a in data["annotations"] if a["image_id"] == target["image_id"]]
            expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
            assert target["boxes"].tolist() == expected
            assert target["labels"].tolist() == [a["category_id"] - 1 for a in anns]
            for mask, box in zip(target["masks"], target["boxes"], strict=True):
                rows, cols = torch.nonzero(mask, as_tuple=True)
                mask_box = torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).float()
                assert torch.allclose(mask_box, box, atol=1.0)


def test_shapesworld_batches_for_a_detector(shapes_root: Path) -> None:
    torch.manual_seed(0)
    ds = build_detection_dataset(
        shapes_root, "train", with_masks=True, transform=build_detection_train_transform(64, 100, flip_prob=0.5)
    )
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_detection)))
    assert batch["skipped"] == 0 and len(batch["images"]) == len(batch["targets"]) == 3
    for image, target in zip(batch["images"], batch["targets"], strict=True):
        assert type(image) is torch.Tensor and image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert type(target["boxes"]) is torch.Tensor and target["boxes"].shape[1] == 4
        assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) > 0
        assert target["masks"].shape[1:] == (64, 64) and int(target["labels"].max()) < ds.num_classes
        assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all() and (target["boxes"] <= 64).all()
