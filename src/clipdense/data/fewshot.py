"""Few-shot classification data in the CoOp protocol (Zhou et al., IJCV 2022; used by PLOT, Chen et al., ICLR 2023).

The 11 datasets are read in the layouts of CoOp's ``DATASETS.md`` under one data folder ``$DATA``:

==================  ==========================  =================================================================
name                folder                      what is read
==================  ==========================  =================================================================
``imagenet``        ``imagenet/``               ``images/train/<wnid>/*``, ``images/val/<wnid>/*`` (the test set),
                                                ``classnames.txt`` ("<wnid> <name>" lines)
``caltech101``      ``caltech-101/``            ``split_zhou_Caltech101.json``, images under ``101_ObjectCategories/``
``oxford_pets``     ``oxford_pets/``            ``split_zhou_OxfordPets.json``, images under ``images/``
``stanford_cars``   ``stanford_cars/``          ``split_zhou_StanfordCars.json``, paths relative to the folder
``oxford_flowers``  ``oxford_flowers/``         ``split_zhou_OxfordFlowers.json``, images under ``jpg/``
``food101``         ``food-101/``               ``split_zhou_Food101.json``, images under ``images/``
``fgvc_aircraft``   ``fgvc_aircraft/``          ``variants.txt``, ``images_variant_{train,val,test}.txt``, ``images/``
``sun397``          ``sun397/``                 ``split_zhou_SUN397.json``, images under ``SUN397/``
``dtd``             ``dtd/``                    ``split_zhou_DescribableTextures.json``, images under ``images/``
``eurosat``         ``eurosat/``                ``split_zhou_EuroSAT.json``, images under ``2750/``
``ucf101``          ``ucf101/``                 ``split_zhou_UCF101.json``, frames under ``UCF-101-midframes/``
``shapesworld``     ``shapesworld_fewshot/``    ``split_zhou_ShapesWorld.json``, images under ``images/``
                                                (written by :func:`export_shapesworld_fewshot`)
==================  ==========================  =================================================================

A split file holds ``{"train": [...], "val": [...], "test": [...]}``, each entry ``[relative path, label,
class name]``. The k-shot draw (:func:`few_shot_splits`) is Dassl's ``generate_fewshot_dataset``: items grouped by
label in order of first appearance, ``random.sample(items, k)`` per class (all items of a class with fewer, or,
with ``data.repeat``, k of them drawn with replacement as Dassl before October 2021), the
training split with k shots, then the validation split with min(k, 4), from one generator seeded with the run's
seed. It depends on nothing but the dataset, k and the seed, so CoOp and PLOT runs of one seed see the same images.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from clipdense.fileio import atomic_write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Datum:
    """One labelled image.

    Attributes:
        path: Image file.
        label: Class index (0..C-1).
        classname: The class's name as the split file gives it.
    """

    path: str
    label: int
    classname: str


@dataclass(frozen=True)
class DatasetLayout:
    """Where a CoOp-protocol dataset lives under ``$DATA``.

    Attributes:
        folder: The dataset folder under ``$DATA``.
        image_dir: Folder (under ``folder``) the split file's paths are relative to.
        split_file: The CoOp split file in ``folder``; None for ImageNet and FGVCAircraft, which are read from
            their own files.
    """

    folder: str
    image_dir: str
    split_file: str | None


#: The datasets of the CoOp protocol (and the offline ShapesWorld split), by name.
LAYOUTS: dict[str, DatasetLayout] = {
    "imagenet": DatasetLayout("imagenet", "images", None),
    "caltech101": DatasetLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": DatasetLayout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": DatasetLayout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": DatasetLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": DatasetLayout("food-101", "images", "split_zhou_Food101.json"),
    "fgvc_aircraft": DatasetLayout("fgvc_aircraft", "images", None),
    "sun397": DatasetLayout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": DatasetLayout("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": DatasetLayout("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": DatasetLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "shapesworld": DatasetLayout("shapesworld_fewshot", "images", "split_zhou_ShapesWorld.json"),
}

#: The 11 datasets of the CoOp protocol, in the papers' table order.
FEWSHOT_DATASETS: tuple[str, ...] = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
    "sun397", "dtd", "eurosat", "ucf101",
)  # fmt: skip


@dataclass
class FewShotSplits:
    """A dataset's splits and class names.

    Attributes:
        train: Training items (k per class after :func:`few_shot_splits`).
        val: Validation items (ImageNet: its val set, which is also the test set).
        test: Test items (never subsampled).
        class_names: C names, index = label.
    """

    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    class_names: list[str]


def _missing(path: Path, dataset: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{dataset}: {what} not found at {path}. Lay the dataset out as CoOp's DATASETS.md describes under the data "
        "folder (data.root), e.g. $DATA/caltech-101/101_ObjectCategories and "
        "$DATA/caltech-101/split_zhou_Caltech101.json"
    )


def _class_names(items: Sequence[Datum], dataset: str) -> list[str]:
    """C names from the items' (label, classname) pairs; labels must be 0..C-1, one name each."""
    names: dict[int, str] = {}
    for d in items:
        if names.setdefault(d.label, d.classname) != d.classname:
            raise ValueError(f"{dataset}: label {d.label} has two class names, {names[d.label]!r} and {d.classname!r}")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{dataset}: labels must be 0..C-1, got {sorted(names)[:5]}...")
    return [names[i] for i in range(len(names))]


def read_split_file(path: str | Path, image_root: str | Path) -> dict[str, list[Datum]]:
    """Read a CoOp split file (``split_zhou_<Name>.json``).

    Args:
        path: The JSON file: ``{"train"|"val"|"test": [[relative path, label, class name], ...]}``.
        image_root: Folder the relative paths start from.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` items in file order.
    """
    data = json.loads(Path(path).read_text())
    out = {}
    for split in ("train", "val", "test"):
        if split not in data:
            raise ValueError(f"{path}: no '{split}' list (a CoOp split file has train, val and test)")
        out[split] = [Datum(str(Path(image_root) / rel), int(label), str(name)) for rel, label, name in data[split]]
    return out


def _read_imagenet(folder: Path) -> dict[str, list[Datum]]:
    """CoOp's ImageNet reader: class folders sorted by wnid give the labels; the val set is the test set.

    Images in a class folder are listed in sorted order (Dassl lists them in ``os.listdir`` order, which depends on
    the file system): a deliberate difference that makes the k-shot draw the same on every machine.
    """
    names_file = folder / "classnames.txt"
    if not names_file.is_file():
        raise _missing(names_file, "imagenet", "classnames.txt")
    wnid_names = {}
    for line in names_file.read_text().splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            wnid_names[wnid] = name
    out = {}
    for split, sub in (("train", "train"), ("test", "val")):
        split_dir = folder / "images" / sub
        if not split_dir.is_dir():
            raise _missing(split_dir, "imagenet", f"images/{sub}/")
        items = []
        for label, wnid in enumerate(sorted(p.name for p in split_dir.iterdir() if p.is_dir())):
            if wnid not in wnid_names:
                raise ValueError(f"imagenet: class folder {wnid} is not in {names_file}")
            for f in sorted(p for p in (split_dir / wnid).iterdir() if not p.name.startswith(".")):
                items.append(Datum(str(f), label, wnid_names[wnid]))
        out[split] = items
    out["val"] = out["test"]
    return out


def _read_fgvc_aircraft(folder: Path) -> dict[str, list[Datum]]:
    """FGVC-Aircraft's own files: ``variants.txt`` (label order) and ``images_variant_<split>.txt``."""
    variants = folder / "variants.txt"
    if not variants.is_file():
        raise _missing(variants, "fgvc_aircraft", "variants.txt")
    names = [line.strip() for line in variants.read_text().splitlines() if line.strip()]
    label_of = {n: i for i, n in enumerate(names)}
    out = {}
    for split in ("train", "val", "test"):
        path = folder / f"images_variant_{split}.txt"
        if not path.is_file():
            raise _missing(path, "fgvc_aircraft", path.name)
        items = []
        for line in path.read_text().splitlines():
            image, _, name = line.strip().partition(" ")
            if image:
                items.append(Datum(str(folder / "images" / f"{image}.jpg"), label_of[name], name))
        out[split] = items
    return out


def read_fewshot_dataset(name: str, root: str | Path) -> FewShotSplits:
    """All images of a CoOp-protocol dataset (no k-shot sampling).

    Args:
        name: One of :data:`LAYOUTS`.
        root: ``$DATA``, the folder that holds the dataset folders.

    Raises:
        ValueError: Unknown dataset, or inconsistent labels.
        FileNotFoundError: The split file or folders are missing (the message names the expected path).
    """
    if name not in LAYOUTS:
        raise ValueError(f"unknown few-shot dataset {name!r}; choose one of {sorted(LAYOUTS)}")
    layout = LAYOUTS[name]
    folder = Path(root).expanduser() / layout.folder
    if name == "imagenet":
        splits = _read_imagenet(folder)
    elif name == "fgvc_aircraft":
        splits = _read_fgvc_aircraft(folder)
    else:
        split_file = folder / layout.split_file
        if not split_file.is_file():
            raise _missing(split_file, name, layout.split_file)
        splits = read_split_file(split_file, folder / layout.image_dir)
    names = _class_names([*splits["train"], *splits["test"]], name)
    return FewShotSplits(splits["train"], splits["val"], splits["test"], names)


def sample_few_shot(items: Sequence[Datum], shots: int, rng: random.Random, repeat: bool = False) -> list[Datum]:
    """Dassl's ``generate_fewshot_dataset``: ``shots`` items per class.

    Args:
        items: The pool.
        shots: Items per class.
        rng: The generator (advanced by the draw).
        repeat: What a class with fewer than ``shots`` items gets: False (Dassl since 2021-10-09) keeps all of its
            items; True (Dassl before, the draw of the CoOp paper's runs, and Tip-Adapter's code) draws ``shots``
            of them with replacement (``random.choices``), which also moves the generator for the later classes.

    Returns:
        The chosen items, class by class in order of first appearance.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    by_label: dict[int, list[Datum]] = {}
    for d in items:
        by_label.setdefault(d.label, []).append(d)
    out = []
    for group in by_label.values():
        if len(group) >= shots:
            out.extend(rng.sample(group, shots))
        else:
            out.extend(rng.choices(group, k=shots) if repeat else group)
    return out


def few_shot_splits(
    full: FewShotSplits, shots: int, seed: int, dataset: str = "", classes: str = "all", repeat: bool = False
) -> FewShotSplits:
    """The k-shot splits of one seed, as the CoOp/PLOT code draws them.

    One ``random.Random(seed)`` draws ``shots`` training items per class, then ``min(shots, 4)`` validation items
    per class (ImageNet's validation set is its test set and is not subsampled). Dassl draws from the global
    generator right after ``random.seed(seed)``, which gives the same sequence. The class subset is taken after
    the draw, as Dassl does (:func:`subsample_classes`).

    Args:
        full: All items (:func:`read_fewshot_dataset`).
        shots: k (1, 2, 4, 8, 16).
        seed: The run's seed (1, 2, 3).
        dataset: The dataset's name (``imagenet`` keeps its validation set whole).
        classes: ``all``, or CoCoOp's ``base`` / ``new`` half of the classes.
        repeat: Fill classes with fewer than k items by drawing with replacement (:func:`sample_few_shot`).
    """
    rng = random.Random(seed)
    train = sample_few_shot(full.train, shots, rng, repeat)
    val = full.val if dataset == "imagenet" else sample_few_shot(full.val, min(shots, 4), rng, repeat)
    return subsample_classes(FewShotSplits(train, val, full.test, full.class_names), classes)


#: CoCoOp's class subsets (``base``: the first ceil(C/2) labels, ``new``: the rest).
SUBSAMPLES: tuple[str, ...] = ("all", "base", "new")


def subsample_classes(splits: FewShotSplits, which: str) -> FewShotSplits:
    """CoCoOp's base-to-new split (Dassl's ``subsample_classes``), applied after the k-shot draw.

    The labels in order: the first ceil(C/2) are the base classes, the others the new ones; items of the other
    subset are dropped from every split and the kept labels renumbered from 0.

    Args:
        splits: The (k-shot) splits.
        which: ``all`` (unchanged), ``base`` or ``new``.
    """
    if which not in SUBSAMPLES:
        raise ValueError(f"unknown class subset {which!r}; use one of {SUBSAMPLES}")
    if which == "all":
        return splits
    c = len(splits.class_names)
    half = (c + 1) // 2
    kept = range(half) if which == "base" else range(half, c)
    relabel = {old: new for new, old in enumerate(kept)}

    def sub(items: Sequence[Datum]) -> list[Datum]:
        return [replace(d, label=relabel[d.label]) for d in items if d.label in relabel]

    return FewShotSplits(sub(splits.train), sub(splits.val), sub(splits.test), [splits.class_names[i] for i in kept])


class ImageItems(Dataset):
    """Images and labels of a list of :class:`Datum`.

    Args:
        items: The images.
        transform: PIL RGB image -> 3 x H x W tensor.
    """

    def __init__(self, items: Sequence[Datum], transform: Callable[[Image.Image], object]) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[object, int]:
        d = self.items[index]
        try:
            with Image.open(d.path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read image {d.path}: {e}") from e
        return self.transform(image), d.label


# ------------------------------------------------------------------------------------------- ShapesWorld

#: Seed offset of the ShapesWorld few-shot images (past the segmentation, CLIP and zero-shot streams).
FEWSHOT_SEED_OFFSET = 400_000_000


def export_shapesworld_fewshot(
    root: str | Path,
    train_per_class: int = 32,
    val_per_class: int = 4,
    test_per_class: int = 25,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write the ShapesWorld few-shot classification split in the CoOp layout (offline runs).

    One object per image (:func:`~clipdense.data.shapesworld.single_object_scene`: random size, pose, position and
    background), 56 classes ("red circle", ...). Images are ``images/<class>/<split>_<i>.png``; the split file is
    ``split_zhou_ShapesWorld.json``. Deterministic in ``seed``; an existing complete export is kept.

    Args:
        root: ``$DATA``; the split goes to ``root/shapesworld_fewshot``.
        train_per_class, val_per_class, test_per_class: Images per class in each split (the k-shot pool is the
            training split, so it must hold at least 16).
        image_size: Image side (ShapesCLIP-RN's 128).
        seed: Seed of the scene stream.

    Returns:
        The dataset folder.
    """
    from clipdense.data.shapesworld import ShapesWorldConfig, class_names, single_object_scene

    folder = Path(root).expanduser() / LAYOUTS["shapesworld"].folder
    split_file = folder / LAYOUTS["shapesworld"].split_file
    if split_file.is_file():
        return folder
    cfg = ShapesWorldConfig(image_size=image_size)
    names = class_names(cfg)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    per_class = sum(counts.values())
    split: dict[str, list] = {s: [] for s in counts}
    for label, name in enumerate(names):
        (folder / "images" / name.replace(" ", "_")).mkdir(parents=True, exist_ok=True)
        i = 0
        for s, count in counts.items():
            for j in range(count):
                scene_seed = seed + FEWSHOT_SEED_OFFSET + label * per_class + i
                rel = f"{name.replace(' ', '_')}/{s}_{j:03d}.png"
                Image.fromarray(single_object_scene(scene_seed, cfg, label).image).save(folder / "images" / rel)
                split[s].append([rel, label, name])
                i += 1
    atomic_write_json(split_file, split)  # last: its presence marks a complete export
    return folder


__all__ = [
    "FEWSHOT_DATASETS",
    "LAYOUTS",
    "Datum",
    "DatasetLayout",
    "SUBSAMPLES",
    "FewShotSplits",
    "ImageItems",
    "export_shapesworld_fewshot",
    "few_shot_splits",
    "read_fewshot_dataset",
    "read_split_file",
    "sample_few_shot",
    "subsample_classes",
]
