"""Few-shot readers in the CoOp layouts (tiny datasets built here) and the seeded k-shot draw."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from clipdense.data.fewshot import (
    LAYOUTS,
    Datum,
    FewShotSplits,
    export_shapesworld_fewshot,
    few_shot_splits,
    read_fewshot_dataset,
    sample_few_shot,
    subsample_classes,
)
from fewshot_data import write_split_dataset


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


def test_split_file_layout(tmp_path):
    write_split_dataset(tmp_path, "caltech101", per_class=(6, 3, 2))
    full = read_fewshot_dataset("caltech101", tmp_path)
    assert full.class_names == ["red thing", "green thing", "blue thing"]
    assert (len(full.train), len(full.val), len(full.test)) == (18, 9, 6)
    assert full.train[0].path.startswith(str(tmp_path / "caltech-101" / "101_ObjectCategories"))
    assert all(Image.open(d.path).size == (32, 32) for d in full.test)


def test_every_split_file_dataset_reads_its_folder(tmp_path):
    for name, layout in LAYOUTS.items():
        if layout.split_file is None or name == "shapesworld":
            continue
        write_split_dataset(tmp_path, name, per_class=(2, 1, 1))
        full = read_fewshot_dataset(name, tmp_path)
        assert len(full.train) == 6 and full.train[0].path.startswith(str(tmp_path / layout.folder))


def test_imagenet_layout(tmp_path):
    root = tmp_path / "imagenet"
    (root).mkdir()
    (root / "classnames.txt").write_text("n002 goldfish\nn001 tench\n")
    for split, count in (("train", 5), ("val", 2)):
        for wnid in ("n001", "n002"):
            for i in range(count):
                _image(root / "images" / split / wnid / f"{wnid}_{i}.JPEG")
    full = read_fewshot_dataset("imagenet", tmp_path)
    assert full.class_names == ["tench", "goldfish"]  # labels follow the sorted wnids
    assert len(full.train) == 10 and full.val == full.test and len(full.test) == 4
    k = few_shot_splits(full, 2, seed=1, dataset="imagenet")
    assert len(k.train) == 4 and k.val == full.test  # ImageNet keeps its val (= test) set whole


def test_fgvc_aircraft_layout(tmp_path):
    root = tmp_path / "fgvc_aircraft"
    root.mkdir()
    (root / "variants.txt").write_text("707-320\nA300B4\n")
    for split in ("train", "val", "test"):
        lines = []
        for i in range(3):
            for variant in ("707-320", "A300B4"):
                name = f"{split}{i}{variant[:1]}"
                _image(root / "images" / f"{name}.jpg")
                lines.append(f"{name} {variant}")
        (root / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    full = read_fewshot_dataset("fgvc_aircraft", tmp_path)
    assert full.class_names == ["707-320", "A300B4"] and len(full.test) == 6
    assert {d.label for d in full.train if d.classname == "A300B4"} == {1}


def test_missing_split_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="split_zhou_DescribableTextures.json"):
        read_fewshot_dataset("dtd", tmp_path)
    with pytest.raises(ValueError, match="unknown few-shot dataset"):
        read_fewshot_dataset("mnist", tmp_path)


def test_k_shot_draw_is_dassl_and_reproducible(tmp_path):
    write_split_dataset(tmp_path, "dtd", per_class=(20, 6, 2))
    full = read_fewshot_dataset("dtd", tmp_path)
    a = few_shot_splits(full, 4, seed=1)
    b = few_shot_splits(full, 4, seed=1)
    c = few_shot_splits(full, 4, seed=2)
    assert a.train == b.train and a.val == b.val and a.train != c.train
    assert len(a.train) == 12 and len(a.val) == 12  # val: min(k, 4) per class
    assert [sum(d.label == k for d in a.train) for k in range(3)] == [4, 4, 4]
    # Dassl: random.seed(seed), then random.sample per class in order of first appearance, train then val
    random.seed(1)
    expected = []
    for label in range(3):
        expected += random.sample([d for d in full.train if d.label == label], 4)
    assert a.train == expected
    # A class with fewer items than k keeps them all
    assert len(sample_few_shot(full.val, 16, random.Random(0))) == len(full.val)


def test_k_shot_draw_before_october_2021_repeats(tmp_path):
    """Dassl's ``repeat=True`` (its default until 2021-10-09, and Tip-Adapter's): ``random.choices(items, k)`` for a
    class with fewer than k items, ``random.sample`` otherwise; the later classes' draws move with it."""
    items = [Datum(f"{c}{i}.jpg", c, str(c)) for c, n in enumerate((10, 3, 10)) for i in range(n)]
    old = sample_few_shot(items, 5, random.Random(3), repeat=True)
    random.seed(3)
    expected = []
    for label in range(3):
        group = [d for d in items if d.label == label]
        expected += random.sample(group, 5) if len(group) >= 5 else random.choices(group, k=5)
    assert old == expected
    new = sample_few_shot(items, 5, random.Random(3))
    assert [sum(d.label == k for d in new) for k in range(3)] == [5, 3, 5]
    assert [sum(d.label == k for d in old) for k in range(3)] == [5, 5, 5]
    assert new[:5] == old[:5] and new[8:] != old[10:]  # the first class alike; the third drawn from a moved generator
    write_split_dataset(tmp_path, "dtd", per_class=(6, 2, 2))
    full = read_fewshot_dataset("dtd", tmp_path)
    assert len(few_shot_splits(full, 8, seed=1, repeat=True).train) == 8 * len(full.class_names)
    assert len(few_shot_splits(full, 8, seed=1).train) == 6 * len(full.class_names)


def test_same_draw_for_coop_and_plot(tmp_path):
    """The draw depends on dataset, shots and seed only: the training code gives CoOp and PLOT the same images."""
    from clipdense.inference.fewshot import load_fewshot_config
    from clipdense.training.fewshot import prepare_splits

    write_split_dataset(tmp_path, "eurosat", per_class=(10, 4, 2))
    draws = []
    for name in ("coop_rn50", "plot_rn50"):
        cfg = load_fewshot_config(None, [f"model.name={name}", "data.dataset=eurosat", f"data.root={tmp_path}",
                                         "data.shots=2", "train.seed=3"])  # fmt: skip
        draws.append(prepare_splits(cfg))
    assert draws[0].train == draws[1].train and draws[0].val == draws[1].val


def test_base_to_new_classes_are_dassls():
    """Dassl's subsample_classes: the first ceil(C/2) labels are base, the rest new, relabelled from 0."""
    names = ["a", "b", "c", "d", "e"]

    def items(split):
        return [Datum(f"{split}/{n}_{i}.png", label, n) for label, n in enumerate(names) for i in range(2)]

    full = FewShotSplits(items("train"), items("val"), items("test"), names)
    base, new = subsample_classes(full, "base"), subsample_classes(full, "new")
    assert base.class_names == ["a", "b", "c"] and new.class_names == ["d", "e"]
    assert [(d.label, d.classname) for d in new.test] == [(0, "d"), (0, "d"), (1, "e"), (1, "e")]
    assert len(base.train) == 6 and {d.classname for d in base.val} == {"a", "b", "c"}
    assert subsample_classes(full, "all") is full
    with pytest.raises(ValueError, match="class subset"):
        subsample_classes(full, "novel")


def test_shapesworld_export(tmp_path):
    folder = export_shapesworld_fewshot(tmp_path, train_per_class=2, val_per_class=1, test_per_class=1, image_size=32)
    split = json.loads((folder / "split_zhou_ShapesWorld.json").read_text())
    assert len(split["train"]) == 112 and split["train"][0][2] == "red circle"
    full = read_fewshot_dataset("shapesworld", tmp_path)
    assert len(full.class_names) == 56 and Image.open(full.test[0].path).size == (32, 32)
