"""Tests for the ShapesWorld scene generator, captions dataset and exporters."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from clipdense.data.shapesworld import (
    COLOURS,
    SIZE_NAMES,
    ShapesWorldCaptions,
    ShapesWorldConfig,
    class_names,
    export_coco,
    export_semantic,
    generate_dataset,
    generate_scene,
    normalize_image,
    render_scene_cache,
    single_object_scene,
)
from clipdense.data.shapesworld import streams as sw  # the module whose _render_range the cache test patches

SEEDS = range(40)


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(seed) for seed in SEEDS]


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _decode_uncompressed_rle(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    values = np.concatenate([np.full(n, k % 2, dtype=bool) for k, n in enumerate(rle["counts"])])
    return values.reshape((w, h)).T


def test_class_names_order_and_count():
    cfg = ShapesWorldConfig()
    names = class_names(cfg)
    assert len(names) == cfg.num_classes == len(cfg.colours) * len(cfg.shapes)
    assert len(set(names)) == len(names)
    assert names[0] == f"{cfg.colours[0]} {cfg.shapes[0]}"
    assert names[1] == f"{cfg.colours[0]} {cfg.shapes[1]}"
    assert names == class_names(ShapesWorldConfig())


def test_scene_is_deterministic_per_seed():
    a, b, c = generate_scene(7), generate_scene(7), generate_scene(8)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.semantic, b.semantic)
    assert np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.labels, b.labels)
    assert a.caption == b.caption and a.background == b.background
    assert not np.array_equal(a.image, c.image)


def test_scene_arrays_have_documented_shapes(scenes):
    size = ShapesWorldConfig().image_size
    for scene in scenes:
        n = len(scene.labels)
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        assert scene.semantic.shape == (size, size) and scene.semantic.dtype == np.uint8
        assert scene.masks.shape == scene.amodal_masks.shape == (n, size, size) and scene.masks.dtype == bool
        assert scene.boxes.shape == (n, 4) and scene.labels.dtype == np.int64
        assert scene.centres.shape == (n, 2) and len(scene.sizes) == n
        assert set(scene.sizes) <= set(SIZE_NAMES)
        assert scene.background in ShapesWorldConfig().backgrounds


def test_semantic_map_matches_instances(scenes):
    for scene in scenes:
        assert not np.any(scene.masks.sum(axis=0) > 1), "visible masks must not overlap"
        expected = np.zeros_like(scene.semantic)
        for mask, label in zip(scene.masks, scene.labels, strict=True):
            expected[mask] = label + 1
        assert np.array_equal(scene.semantic, expected)
        assert np.all(scene.semantic[~scene.masks.any(axis=0)] == 0)


def test_occlusion_follows_drawing_order_and_cap(scenes):
    cap = ShapesWorldConfig().min_visible_fraction
    occluded = 0
    for scene in scenes:
        for k in range(len(scene.labels)):
            hidden_by_later = scene.amodal_masks[k + 1 :].any(axis=0)
            assert np.array_equal(scene.masks[k], scene.amodal_masks[k] & ~hidden_by_later)
            assert scene.masks[k].sum() >= cap * scene.amodal_masks[k].sum()
            occluded += int(scene.masks[k].sum() < scene.amodal_masks[k].sum())
    assert occluded > 0, "some objects should be partly occluded in 40 scenes"


def test_boxes_are_mask_bounding_boxes(scenes):
    for scene in scenes:
        for mask, box in zip(scene.masks, scene.boxes, strict=True):
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_labels_agree_with_rendered_colours(scenes):
    names = class_names()
    jitter = ShapesWorldConfig().colour_jitter
    for scene in scenes:
        for mask, label in zip(scene.masks, scene.labels, strict=True):
            interior = _erode(_erode(mask))
            if interior.sum() < 4:
                continue
            colour = np.array(COLOURS[names[label].split()[0]])
            mean = scene.image[interior].astype(np.float64).mean(axis=0)
            assert np.all(np.abs(mean - colour) <= jitter + 3), (scene.seed, names[label], mean)


def test_object_count_within_bounds():
    cfg = ShapesWorldConfig(min_objects=2, max_objects=3, image_size=64)
    counts = {len(generate_scene(seed, cfg).labels) for seed in range(60)}
    assert counts == {2, 3}
    default = {len(generate_scene(seed).labels) for seed in SEEDS}
    assert default <= set(range(1, 5)) and len(default) >= 3


def test_caption_names_objects(scenes):
    names = class_names()
    for scene in scenes:
        assert scene.caption_objects and len(set(scene.caption_objects)) == len(scene.caption_objects)
        for index in scene.caption_objects:
            colour, shape = names[scene.labels[index]].split()
            assert colour in scene.caption and shape in scene.caption, (scene.caption, colour, shape)
        assert len(scene.caption.split()) <= ShapesWorldConfig().max_caption_words
        if scene.single_object_caption:
            assert len(scene.caption_objects) == 1
    multi = [s for s in scenes if not s.single_object_caption and len(s.labels) > 1]
    relations = ("left of", "right of", "above", "below", "in front of", "behind")
    assert any(any(r in s.caption for r in relations) for s in multi)


def test_single_object_caption_fraction():
    for prob in (0.5, 0.2):
        cfg = ShapesWorldConfig(single_object_caption_prob=prob, image_size=48)
        fraction = np.mean([generate_scene(seed, cfg).single_object_caption for seed in range(200)])
        assert abs(fraction - prob) < 0.12, (prob, fraction)


def test_single_object_scene():
    cfg = ShapesWorldConfig(image_size=64)
    for class_index in (0, 13, cfg.num_classes - 1):
        scene = single_object_scene(class_index, cfg, class_index)
        assert scene.labels.tolist() == [class_index]
        assert class_names(cfg)[class_index] in scene.caption and scene.caption.startswith("a photo of a")
        assert set(np.unique(scene.semantic)) == {0, class_index + 1}
    with pytest.raises(ValueError, match="out of range"):
        single_object_scene(0, cfg, cfg.num_classes)


def test_config_validation():
    with pytest.raises(ValueError, match="shape"):
        ShapesWorldConfig(shapes=("circle", "blob"))
    with pytest.raises(ValueError, match="min_objects"):
        ShapesWorldConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="single_object_caption_prob"):
        ShapesWorldConfig(single_object_caption_prob=1.5)


def test_captions_dataset_items():
    cfg = ShapesWorldConfig(image_size=48)
    dataset = ShapesWorldCaptions(num_scenes=5, base_seed=100, cfg=cfg)
    assert len(dataset) == 5
    image, caption = dataset[2]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    expected = generate_scene(102, cfg)
    assert caption == expected.caption
    assert torch.equal(image, normalize_image(expected.image))
    assert -2.0 < float(image.min()) and float(image.max()) < 2.5
    with pytest.raises(IndexError):
        dataset[5]


def test_scene_cache_items_equal_rendered_items(tmp_path):
    cfg = ShapesWorldConfig(image_size=40, single_object_caption_prob=0.7)
    root = render_scene_cache(tmp_path / "cache", 11, base_seed=500, cfg=cfg, workers=2, chunk=4, progress=False)
    cached = ShapesWorldCaptions(11, base_seed=500, cfg=cfg, cache=root)
    rendered = ShapesWorldCaptions(11, base_seed=500, cfg=cfg)
    for index in range(11):
        (a, caption_a), (b, caption_b) = cached[index], rendered[index]
        assert caption_a == caption_b and torch.equal(a, b)
    assert np.load(root / "images.npy", mmap_mode="r").shape == (11, 40, 40, 3)
    with pytest.raises(IndexError):
        cached[11]


def test_single_object_training_scenes(tmp_path):
    cfg = ShapesWorldConfig(image_size=32)
    root = render_scene_cache(tmp_path / "c", 5, base_seed=170, cfg=cfg, workers=0, progress=False, single_object=True)
    cached = ShapesWorldCaptions(5, base_seed=170, cfg=cfg, cache=root, single_object=True)
    rendered = ShapesWorldCaptions(5, base_seed=170, cfg=cfg, single_object=True)
    for i in range(5):
        scene = single_object_scene(170 + i, cfg, (170 + i) % cfg.num_classes)
        assert cached[i][1] == rendered[i][1] == scene.caption and torch.equal(cached[i][0], rendered[i][0])
        assert class_names(cfg)[(170 + i) % cfg.num_classes] in scene.caption
    with pytest.raises(ValueError, match="not a complete scene cache"):
        ShapesWorldCaptions(5, base_seed=170, cfg=cfg, cache=root)  # full scenes asked, one-object scenes cached


def test_scene_cache_is_reused_resumed_and_checked(tmp_path, monkeypatch):
    cfg = ShapesWorldConfig(image_size=32)
    root = tmp_path / "cache"
    real = sw._render_range
    calls = []

    def interrupted(job):
        calls.append(job[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped while rendering the third chunk
        return real(job)

    monkeypatch.setattr(sw, "_render_range", interrupted)
    with pytest.raises(KeyboardInterrupt):
        render_scene_cache(root, 10, base_seed=7, cfg=cfg, workers=0, chunk=3, progress=False)
    meta = json.loads((root / "cache.json").read_text())
    assert meta["rendered"] == 6 and not meta["complete"]
    with pytest.raises(ValueError, match="not a complete scene cache"):
        ShapesWorldCaptions(10, base_seed=7, cfg=cfg, cache=root)
    calls.clear()
    monkeypatch.setattr(sw, "_render_range", lambda job: (calls.append(job[0]), real(job))[1])
    render_scene_cache(root, 10, base_seed=7, cfg=cfg, workers=0, chunk=3, progress=False)
    assert calls == [13, 16]  # only the missing chunks were rendered
    cached = ShapesWorldCaptions(10, base_seed=7, cfg=cfg, cache=root)
    assert all(cached[i][1] == generate_scene(7 + i, cfg).caption for i in range(10))
    calls.clear()
    render_scene_cache(root, 10, base_seed=7, cfg=cfg, workers=0, chunk=3, progress=False)
    assert calls == []  # complete: reused as is
    with pytest.raises(ValueError, match="not a complete scene cache"):
        ShapesWorldCaptions(10, base_seed=8, cfg=cfg, cache=root)  # other scenes
    render_scene_cache(root, 4, base_seed=8, cfg=cfg, workers=0, chunk=3, progress=False)  # replaced
    assert ShapesWorldCaptions(4, base_seed=8, cfg=cfg, cache=root)[3][1] == generate_scene(11, cfg).caption


def test_export_semantic_layout_and_contents(tmp_path):
    cfg = ShapesWorldConfig(image_size=48)
    root = export_semantic(tmp_path / "sw", num_train=3, num_val=2, seed=5, cfg=cfg, progress=False)
    assert (root / "classes.txt").read_text().splitlines() == class_names(cfg)
    captions = json.loads((root / "captions.json").read_text())
    for split, offset, count in (("training", sw.TRAIN_SEED_OFFSET, 3), ("validation", sw.VAL_SEED_OFFSET, 2)):
        stems = sorted(p.stem for p in (root / "images" / split).glob("*.png"))
        assert stems == [f"sw_{i:06d}" for i in range(count)]
        for i, stem in enumerate(stems):
            scene = generate_scene(5 + offset + i, cfg)
            image = np.asarray(Image.open(root / "images" / split / f"{stem}.png"))
            label = Image.open(root / "annotations" / split / f"{stem}.png")
            assert label.mode == "L"
            assert np.array_equal(image, scene.image)
            assert np.array_equal(np.asarray(label), scene.semantic)
            assert captions[split][stem] == scene.caption


def test_export_coco_with_pycocotools(tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    cfg = ShapesWorldConfig(image_size=48)
    root = export_coco(tmp_path / "coco", num_train=3, num_val=2, seed=1, cfg=cfg, progress=False)
    for split, offset, count in (("train", sw.TRAIN_SEED_OFFSET, 3), ("val", sw.VAL_SEED_OFFSET, 2)):
        coco = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
        assert sorted(coco.getCatIds()) == list(range(1, cfg.num_classes + 1))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == class_names(cfg)
        assert len(coco.getImgIds()) == count
        for image_id in coco.getImgIds():
            info = coco.loadImgs(image_id)[0]
            scene = generate_scene(1 + offset + image_id - 1, cfg)
            assert np.array_equal(np.asarray(Image.open(root / f"{split}2017" / info["file_name"])), scene.image)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert len(anns) == len(scene.labels)
            for ann, mask, box, label in zip(anns, scene.masks, scene.boxes, scene.labels, strict=True):
                assert ann["category_id"] == label + 1
                assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
                x0, y0, x1, y1 = box.tolist()
                assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
                assert ann["area"] == mask.sum()


def test_export_coco_uncompressed_rle_without_pycocotools(tmp_path, monkeypatch):
    try:  # cross-check the uncompressed format with pycocotools' own decoder when it is installed
        from pycocotools import mask as mask_utils
    except ImportError:
        mask_utils = None
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # makes `from pycocotools import mask` fail
    cfg = ShapesWorldConfig(image_size=40)
    root = export_coco(tmp_path / "coco", num_train=2, num_val=0, seed=3, cfg=cfg, progress=False)
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert (
        len(data["images"]) == 2
        and not json.loads((root / "annotations" / "instances_val2017.json").read_text())["annotations"]
    )
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image_id, anns in by_image.items():
        scene = generate_scene(3 + image_id - 1, cfg)
        for ann, mask in zip(anns, scene.masks, strict=True):
            assert isinstance(ann["segmentation"]["counts"], list)
            assert np.array_equal(_decode_uncompressed_rle(ann["segmentation"]), mask)
            if mask_utils is not None:
                rle = mask_utils.frPyObjects(ann["segmentation"], *ann["segmentation"]["size"])
                assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)


def test_generate_dataset_both_formats(tmp_path):
    root = generate_dataset(
        tmp_path / "both", num_train=2, num_val=1, seed=0, fmt="both", image_size=40, progress=False
    )
    assert (root / "classes.txt").exists()
    assert (root / "annotations" / "instances_train2017.json").exists()
    a = np.asarray(Image.open(root / "images" / "training" / "sw_000001.png"))
    b = np.asarray(Image.open(root / "train2017" / "sw_000001.png"))
    assert a.shape == (40, 40, 3) and np.array_equal(a, b)
    meta = json.loads((root / "shapesworld_meta.json").read_text())
    assert meta["config"]["image_size"] == 40
    with pytest.raises(ValueError, match="format"):
        generate_dataset(tmp_path / "bad", 1, 1, fmt="voc")


def test_generate_refuses_a_non_empty_folder_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "sw"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        generate_dataset(out, 1, 1, fmt="semantic", image_size=32, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written
    generate_dataset(out, 1, 1, fmt="semantic", image_size=32, progress=False, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "classes.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sw"]  # no .partial / .old folders left
    with pytest.raises(ValueError, match="is a file"):
        generate_dataset(out / "classes.txt", 1, 1, progress=False)
