"""Tests for the dataset readers, on tiny synthetic copies of each real folder layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipdense.data.classnames import load_classnames
from clipdense.data.datasets import (
    DATASETS,
    ImageTooLargeError,
    LabelConvention,
    SegmentationDataset,
    build_dataset,
    fit_pixels,
    list_datasets,
    read_image_rgb,
    read_image_size,
    read_mask,
)

H, W = 20, 24


def write_image(path: Path, seed: int = 0, mode: str = "RGB") -> np.ndarray:
    """Writes a random image (JPEG or PNG by suffix) and returns its pixels [H, W, 3] or [H, W]."""
    rng = np.random.default_rng(seed)
    shape = (H, W, 3) if mode == "RGB" else (H, W)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def mask_with(values: list[int], dtype: type = np.uint8) -> np.ndarray:
    """A [H, W] mask whose rows cycle through ``values``."""
    return np.array([values[i % len(values)] for i in range(H)], dtype=dtype)[:, None].repeat(W, axis=1)


def write_mask(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask)
    if palette:
        rng = np.random.default_rng(1)
        image.putpalette(rng.integers(0, 256, size=768, dtype=np.uint8).tobytes())
        assert image.mode == "P"
    image.save(path)


def expected(raw: np.ndarray, mapping: dict[int, int]) -> torch.Tensor:
    return torch.from_numpy(np.vectorize(lambda v: mapping.get(int(v), int(v)))(raw).astype(np.int64))


def check_sample(sample: dict, num_label: torch.Tensor) -> None:
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, H, W)
    assert sample["label"].dtype == torch.int64 and sample["label"].shape == (H, W)
    assert torch.equal(sample["label"], num_label)
    assert Path(sample["image_path"]).is_file() and Path(sample["label_path"]).is_file()


# ---------------------------------------------------------------------------------------------- layouts


def make_voc(root: Path, raw: np.ndarray, ids=("2007_000032", "2007_000033"), split: str = "val") -> Path:
    for i, image_id in enumerate(ids):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", seed=i)
        write_mask(root / "SegmentationClass" / f"{image_id}.png", raw, palette=True)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    split_file.parent.mkdir(parents=True)
    split_file.write_text("\n".join(ids) + "\n\n")
    return root


def test_voc21(tmp_path: Path) -> None:
    raw = mask_with([0, 1, 5, 20, 255])
    dataset = build_dataset("voc21", make_voc(tmp_path / "VOC2012", raw))
    assert len(dataset) == 2 and len(dataset.class_names) == 21 and dataset.class_names[0] == "background"
    assert dataset.num_classes == 21 and dataset.ignore_index == 255
    assert Path(dataset[0]["image_path"]).name == "2007_000032.jpg"
    check_sample(dataset[1], expected(raw, {}))


def test_voc20(tmp_path: Path) -> None:
    raw = mask_with([0, 1, 5, 20, 255])
    dataset = build_dataset("voc20", make_voc(tmp_path / "VOC2012", raw))
    assert dataset.class_names == load_classnames("voc20")
    check_sample(dataset[0], expected(raw, {0: 255, 1: 0, 5: 4, 20: 19}))


def test_voc21aug(tmp_path: Path) -> None:
    voc_raw, sbd_raw = mask_with([0, 1, 255]), mask_with([0, 7, 20])
    root = make_voc(tmp_path / "VOC2012", voc_raw, ids=("2007_000032", "2007_000039"), split="train")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    write_image(root / "JPEGImages" / "2007_000033.jpg")
    write_mask(root / "SegmentationClass" / "2007_000033.png", voc_raw, palette=True)
    # mmseg's converter writes SBD masks as plain index PNGs; aug.txt excludes VOC train/val ids. One SBD mask
    # also exists for a VOC train id: the VOC annotation must win.
    for i, image_id in enumerate(["2008_000002", "2008_000003"]):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", seed=i)
        write_mask(root / "SegmentationClassAug" / f"{image_id}.png", sbd_raw)
    write_mask(root / "SegmentationClassAug" / "2007_000032.png", sbd_raw)
    (root / "ImageSets" / "Segmentation" / "aug.txt").write_text("2008_000003\n2008_000002\n2007_000032\n")

    train = build_dataset("voc21aug", root, split="train")
    names = [(Path(image).stem, Path(mask).parent.name) for image, mask in train.samples]
    assert names == [
        ("2007_000032", "SegmentationClass"),
        ("2007_000039", "SegmentationClass"),
        ("2008_000003", "SegmentationClassAug"),
        ("2008_000002", "SegmentationClassAug"),
    ]
    assert train.class_names == load_classnames("voc21") and train.num_classes == 21
    check_sample(train[0], expected(voc_raw, {}))
    check_sample(train[3], expected(sbd_raw, {}))
    assert len(build_dataset("voc21aug", root, split="train_aug")) == 4
    assert len(build_dataset("voc21aug", root, split="aug")) == 3
    val = build_dataset("voc21aug", root)
    assert [Path(mask).parent.name for _, mask in val.samples] == ["SegmentationClass"]
    (root / "ImageSets" / "Segmentation" / "aug.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)aug\.txt.*Expected layout.*voc_aug\.py"):
        build_dataset("voc21aug", root, split="train")


def make_context(root: Path, raw: np.ndarray) -> Path:
    for i, image_id in enumerate(["2008_000002", "2008_000003", "2008_000007"]):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", seed=i)
        write_mask(root / "SegmentationClassContext" / f"{image_id}.png", raw)
    split_dir = root / "ImageSets" / "SegmentationContext"
    split_dir.mkdir(parents=True)
    (split_dir / "val.txt").write_text("2008_000002\n2008_000007\n")
    (split_dir / "train.txt").write_text("2008_000003\n")
    return root


def test_context60_and_59(tmp_path: Path) -> None:
    raw = mask_with([0, 1, 30, 59])
    root = make_context(tmp_path / "VOC2010", raw)
    c60 = build_dataset("context60", root)
    assert len(c60) == 2 and len(c60.class_names) == 60 and c60.class_names[0] == "background"
    check_sample(c60[1], expected(raw, {}))
    c59 = build_dataset("context59", root, split="train")
    assert len(c59) == 1 and len(c59.class_names) == 59
    check_sample(c59[0], expected(raw, {0: 255, 1: 0, 30: 29, 59: 58}))


def make_coco(root: Path, folder: str, suffix: str, raw: np.ndarray) -> Path:
    for i, image_id in enumerate(["000000000139", "000000000285"]):
        write_image(root / "images" / folder / f"{image_id}.jpg", seed=i)
        write_mask(root / "annotations" / folder / f"{image_id}{suffix}", raw)
    return root


def test_cocostuff171(tmp_path: Path) -> None:
    raw = mask_with([0, 80, 170, 255])
    root = make_coco(tmp_path / "coco_stuff164k", "val2017", "_labelTrainIds.png", raw)
    dataset = build_dataset("cocostuff171", root)
    assert len(dataset) == 2 and len(dataset.class_names) == 171
    check_sample(dataset[0], expected(raw, {}))
    assert len(build_dataset("cocostuff171", root, split="val2017")) == 2
    with pytest.raises(FileNotFoundError, match="train2017"):
        build_dataset("cocostuff171", root, split="train")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        build_dataset("cocostuff171", root, split="test")


def test_cocoobject(tmp_path: Path) -> None:
    raw = mask_with([0, 1, 80, 255])
    root = make_coco(tmp_path / "coco_stuff164k", "train2017", "_instanceTrainIds.png", raw)
    dataset = build_dataset("cocoobject", root, split="train")
    assert len(dataset) == 2 and len(dataset.class_names) == 81 and dataset.class_names[0] == "background"
    check_sample(dataset[1], expected(raw, {}))


def test_cityscapes(tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    raw = mask_with([0, 7, 18, 255])
    names = [("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000001_000019")]
    pixels = {}
    for i, (city, prefix) in enumerate(names):
        pixels[prefix] = write_image(root / "leftImg8bit" / "val" / city / f"{prefix}_leftImg8bit.png", seed=i)
        write_mask(root / "gtFine" / "val" / city / f"{prefix}_gtFine_labelTrainIds.png", raw)
        write_mask(root / "gtFine" / "val" / city / f"{prefix}_gtFine_labelIds.png", mask_with([33]))
    dataset = build_dataset("cityscapes", root)
    assert len(dataset) == 2 and len(dataset.class_names) == 19
    sample = dataset[1]
    check_sample(sample, expected(raw, {}))
    assert sample["label_path"].endswith("lindau_000001_000019_gtFine_labelTrainIds.png")
    # PNG is lossless: decoded RGB pixels must match exactly, channel order included.
    assert torch.equal(sample["image"], torch.from_numpy(pixels["lindau_000001_000019"]).permute(2, 0, 1))


def make_ade(root: Path, folder: str, raw: np.ndarray, n: int = 3) -> Path:
    for i in range(n):
        write_image(root / "images" / folder / f"ADE_{folder[:3]}_{i + 1:08d}.jpg", seed=i)
        write_mask(root / "annotations" / folder / f"ADE_{folder[:3]}_{i + 1:08d}.png", raw)
    return root


def test_ade20k(tmp_path: Path) -> None:
    raw = mask_with([0, 1, 5, 150])
    root = make_ade(tmp_path / "ADEChallengeData2016", "validation", raw)
    dataset = build_dataset("ade20k", root)
    assert len(dataset) == 3 and len(dataset.class_names) == 150
    check_sample(dataset[2], expected(raw, {0: 255, 1: 0, 5: 4, 150: 149}))
    assert len(build_dataset("ade20k", root, split="validation")) == 3
    make_ade(root, "training", raw, n=1)
    assert len(build_dataset("ade20k", root, split="train")) == 1


def make_folder(root: Path, raw: np.ndarray) -> Path:
    write_image(root / "images" / "a.jpg", seed=0)
    write_image(root / "images" / "b.png", seed=1, mode="L")  # grayscale: must come back as 3 channels
    (root / "images" / "notes.md").write_text("not an image")
    for stem in ("a", "b"):
        write_mask(root / "masks" / f"{stem}.png", raw)
    (root / "classes.txt").write_text("# classes\nbackground\ncat, kitty\ngrass\n")
    return root


def test_folder(tmp_path: Path) -> None:
    raw = mask_with([0, 1, 2, 255])
    root = make_folder(tmp_path / "mydata", raw)
    dataset = build_dataset("folder", root)
    assert dataset.class_names == ["background", "cat, kitty", "grass"] and dataset.num_classes == 3
    assert len(dataset) == 2
    for sample in dataset:
        check_sample(sample, expected(raw, {}))
    (root / "val.txt").write_text("b\n")
    val = build_dataset("folder", root)
    assert len(val) == 1 and val[0]["image_path"].endswith("b.png")
    with pytest.raises(FileNotFoundError, match="train.txt not found, but val.txt exist"):
        build_dataset("folder", root, split="train")
    (root / "val.txt").write_text("b\nzzz\n")
    with pytest.raises(FileNotFoundError, match="zzz"):
        build_dataset("folder", root)


def test_folder_out_of_range(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "mydata", mask_with([0, 3]))
    dataset = build_dataset("folder", root)
    with pytest.raises(ValueError, match=r"a\.png: raw label values \[3\] are out of range"):
        dataset[0]


def test_registry() -> None:
    expected_names = (
        "voc21 voc20 voc21aug context60 context59 cocostuff171 cocoobject cityscapes ade20k folder shapesworld".split()
    )
    assert list_datasets() == expected_names
    for name, spec in DATASETS.items():
        assert spec.name == name
        if spec.class_list is not None:
            assert spec.convention is not None
            assert len(load_classnames(spec.class_list)) == spec.convention.num_classes
            assert spec.has_background == (load_classnames(spec.class_list)[0] == "background")


# ----------------------------------------------------------------------------------------------- errors


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'voc'.*voc21"):
        build_dataset("voc", tmp_path)


@pytest.mark.parametrize("name", ["voc21", "context59", "cocostuff171", "cityscapes", "ade20k", "folder"])
def test_missing_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*Expected layout"):
        build_dataset(name, tmp_path / "nowhere")


def test_missing_split_file(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012", mask_with([0]))
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Segmentation/train\.txt.*Expected layout"):
        build_dataset("voc21", root, split="train")


def test_missing_folder_names_layout(tmp_path: Path) -> None:
    root = tmp_path / "ADEChallengeData2016"
    (root / "images" / "validation").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=r"(?s)annotations/validation was not found.*ADEChallengeData2016/ +<- root"
    ):
        build_dataset("ade20k", root)


def test_image_without_mask(tmp_path: Path) -> None:
    root = make_ade(tmp_path / "ADEChallengeData2016", "validation", mask_with([1]))
    (root / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="have no label mask.*ADE_val_00000002.jpg"):
        build_dataset("ade20k", root)


def test_split_lists_missing_image(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012", mask_with([0]))
    (root / "JPEGImages" / "2007_000033.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="image.*not found.*2007_000033.jpg"):
        build_dataset("voc21", root)


def test_empty_split(tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    (root / "leftImg8bit" / "val").mkdir(parents=True)
    (root / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(ValueError, match="split 'val' is empty"):
        build_dataset("cityscapes", root)


def test_mask_size_mismatch(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012", mask_with([0]))
    write_mask(root / "SegmentationClass" / "2007_000033.png", np.zeros((H, W + 1), np.uint8), palette=True)
    dataset = build_dataset("voc21", root)
    dataset[0]
    with pytest.raises(ValueError, match=r"size mismatch.*2007_000033.jpg is 20x24.*2007_000033.png is 20x25"):
        dataset[1]


@pytest.mark.parametrize(("name", "bad"), [("voc21", 21), ("voc20", 21), ("ade20k", 151), ("context59", 60)])
def test_out_of_range_label(tmp_path: Path, name: str, bad: int) -> None:
    if name == "ade20k":
        root = make_ade(tmp_path / "ADEChallengeData2016", "validation", mask_with([0, bad]))
    elif name == "context59":
        root = make_context(tmp_path / "VOC2010", mask_with([0, bad]))
    else:
        root = make_voc(tmp_path / "VOC2012", mask_with([0, bad]))
    with pytest.raises(ValueError, match=rf"\.png: raw label values \[{bad}\] are out of range"):
        build_dataset(name, root)[0]


def test_corrupt_image(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012", mask_with([0]))
    (root / "JPEGImages" / "2007_000033.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    dataset = build_dataset("voc21", root)
    dataset[0]
    with pytest.raises(ValueError, match=r"could not decode image .*2007_000033\.jpg"):
        dataset[1]


def test_corrupt_mask(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012", mask_with([0]))
    (root / "SegmentationClass" / "2007_000032.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"could not decode label mask .*2007_000032\.png"):
        build_dataset("voc21", root)[0]


def test_rgb_mask_rejected(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012", mask_with([0]))
    write_mask(root / "SegmentationClass" / "2007_000032.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(ValueError, match="single-channel"):
        build_dataset("voc21", root)[0]


# ------------------------------------------------------------------------------------ label convention


def test_convention_lookup_then_reduce() -> None:
    table = tuple([255] * 256)
    table = (0, 255, 3, 1) + table[4:]
    convention = LabelConvention(num_classes=3, lookup=table, reduce_zero_label=True)
    raw = np.array([[0, 1, 2, 3]], dtype=np.uint8)
    np.testing.assert_array_equal(convention.apply(raw), [[255, 255, 2, 0]])
    assert convention.apply(raw).dtype == np.int64


def test_convention_uint16_and_errors() -> None:
    convention = LabelConvention(num_classes=300, ignore_index=65535)
    raw = np.array([[0, 299, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(convention.apply(raw), raw.astype(np.int64))
    with pytest.raises(ValueError, match=r"m\.png: raw label values \[300\]"):
        convention.apply(np.array([[300]], dtype=np.uint16), source="m.png")
    with pytest.raises(ValueError, match="collides"):
        LabelConvention(num_classes=300)
    with pytest.raises(ValueError, match="lookup table"):
        LabelConvention(2, lookup=(0, 1)).apply(np.array([[2]]))


def test_dataset_checks_class_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 class names.*3 classes"):
        SegmentationDataset([(tmp_path / "a.jpg", tmp_path / "a.png")], ["a", "b"], LabelConvention(3))
    with pytest.raises(ValueError, match="no samples"):
        SegmentationDataset([], ["a"], LabelConvention(1))


def test_transform_and_dataloader(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012", mask_with([0, 3]))
    dataset = build_dataset("voc21", root)
    dataset.transform = lambda s: {**s, "image": s["image"].float() / 255}
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 3, H, W) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, H, W)


def test_read_image_rgb_exif(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(path, exif=exif)
    assert read_image_rgb(path).shape == (3, H, W)
    assert read_image_rgb(path, apply_exif_orientation=True).shape == (3, W, H)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_image_rgb(tmp_path / "missing.jpg")


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    from clipdense.data.datasets import read_image_rgb

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    image = read_image_rgb(tmp_path / "g16.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    expected = np.clip(np.rint(ramp / 257.0), 0, 255).astype(np.uint8)
    assert np.array_equal(image[0].numpy(), expected) and torch.equal(image[0], image[2])
    assert (image == 255).float().mean() < 0.01  # PIL's convert("RGB") made 99.6% of them 255
    unit = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(unit).save(tmp_path / "f.tiff")
    assert read_image_rgb(tmp_path / "f.tiff")[0, -1, -1] == 255 and read_image_rgb(tmp_path / "f.tiff")[0, 0, 0] == 0
    Image.fromarray(unit * 1000).save(tmp_path / "f1000.tiff")
    with pytest.raises(ValueError, match=r"values in \[0, 1000\].*8-bit"):
        read_image_rgb(tmp_path / "f1000.tiff")


def _gradient(width: int, height: int) -> np.ndarray:
    """A smooth [height, width, 3] uint8 image (compresses well, survives downscaling)."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return np.stack([x, y, (x + y) / 2], axis=2).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_read_image_rgb_downscales_above_max_pixels(tmp_path, suffix):
    path = tmp_path / f"big{suffix}"
    Image.fromarray(_gradient(2000, 1500)).save(path)
    image = read_image_rgb(path, max_pixels=250_000)
    _, height, width = image.shape
    assert (width, height) == fit_pixels(2000, 1500, 250_000) == (577, 433)
    assert height * width <= 250_000 and abs(width - height * 2000 / 1500) <= 1
    expected = torch.from_numpy(_gradient(width, height)).permute(2, 0, 1).float()
    assert (image.float() - expected).abs().mean() < 3  # the same picture, smaller
    assert read_image_rgb(path, max_pixels=3_000_000).shape == (3, 1500, 2000)  # not above the limit: as stored
    assert fit_pixels(4000, 3000, None) == fit_pixels(4000, 3000, 0) == (4000, 3000)
    assert fit_pixels(4000, 3000, 1_000_000) == (1154, 866)


def test_no_decompression_bomb_noise_and_pil_limit_restored(tmp_path, monkeypatch):
    """Images above PIL's MAX_IMAGE_PIXELS (even 2x above: an error in PIL) read without PIL's warning."""
    import threading
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(_gradient(64, 48)).save(tmp_path / "a.jpg")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "m.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image_rgb(tmp_path / "a.jpg").shape == (3, 48, 64)
        assert read_mask(tmp_path / "m.png").shape == (48, 64)
        assert read_image_size(tmp_path / "a.jpg") == (64, 48)
        threads = [threading.Thread(target=read_image_rgb, args=(tmp_path / "a.jpg",)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_too_large_to_decode_is_refused_with_its_size(tmp_path, monkeypatch):
    import clipdense.data.datasets as datasets

    monkeypatch.setattr(datasets, "MAX_DECODE_PIXELS", 1000)
    Image.fromarray(_gradient(64, 48)).save(tmp_path / "a.png")
    Image.fromarray(_gradient(64, 48)).save(tmp_path / "a.jpg")
    for path, limit, hint in [("a.png", None, "only JPEGs"), ("a.png", 500, "only JPEGs"), ("a.jpg", None, "limit")]:
        with pytest.raises(ImageTooLargeError, match=f"64x48 pixels \\(0 MP\\), above the 0 MP.*{hint}") as error:
            read_image_rgb(tmp_path / path, max_pixels=limit)
        assert "corrupt" not in str(error.value)
    assert read_image_rgb(tmp_path / "a.jpg", max_pixels=500).shape == (3, 19, 25)  # decoded at 1/2 scale
    with pytest.raises(ImageTooLargeError, match="label mask"):
        read_mask(tmp_path / "a.png")


def test_read_image_size_follows_exif(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "r.jpg", exif=exif)
    assert read_image_size(tmp_path / "r.jpg") == (W, H)
    assert read_image_size(tmp_path / "r.jpg", apply_exif_orientation=True) == (H, W)
    assert read_image_rgb(tmp_path / "r.jpg", apply_exif_orientation=True, max_pixels=100).shape[1:] == (10, 9)
