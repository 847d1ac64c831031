"""The recipe of the cache adapters (Tip-Adapter, Tip-Adapter-F, PLOT-Adapter): their config section and the
authors' per-dataset settings.

Every ``null`` in a config's ``adapter`` section takes the value of the authors' config for the run's dataset
(``gaopengcuhk/Tip-Adapter`` ``configs/<dataset>.yaml``, ``CHENGY12/PLOT`` ``plot-adapter/configs/<dataset>.yaml``);
ShapesWorld takes Caltech101's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

#: The adapter models and the method of each.
ADAPTER_METHODS: dict[str, str] = {
    "tip_adapter_rn50": "tip_adapter",
    "tip_adapter_f_rn50": "tip_adapter_f",
    "plot_adapter_rn50": "plot_adapter",
}

#: Zero-shot templates of Tip-Adapter's ``datasets/<dataset>.py`` (ImageNet: its 7-template ensemble).
DATASET_TEMPLATES: dict[str, tuple[str, ...]] = {
    "imagenet": ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                 "a {} in a video game.", "art of the {}.", "a photo of the small {}."),
    "caltech101": ("a photo of a {}.",),
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "stanford_cars": ("a photo of a {}.",),
    "oxford_flowers": ("a photo of a {}, a type of flower.",),
    "food101": ("a photo of {}, a type of food.",),
    "fgvc_aircraft": ("a photo of a {}, a type of aircraft.",),
    "sun397": ("a photo of a {}.",),
    "dtd": ("{} texture.",),
    "eurosat": ("a centered satellite photo of {}.",),
    "ucf101": ("a photo of a person doing {}.",),
    "shapesworld": ("a photo of a {}.",),
}  # fmt: skip

# (init_beta, init_alpha, search_scale (beta, alpha), search_step (beta, alpha), train_epoch) of the authors' configs.
_TIP = {
    "caltech101": (1, 3, (12, 5), (200, 20), 20),
    "dtd": (1, 2, (13, 13), (200, 20), 20),
    "eurosat": (1, 2, (12, 10), (200, 20), 100),
    "fgvc_aircraft": (1, 5, (30, 30), (200, 20), 20),
    "food101": (1, 1.17, (10, 10), (200, 20), 20),
    "imagenet": (1, 1.17, (7, 3), (200, 20), 20),
    "oxford_flowers": (1, 10, (50, 50), (200, 20), 20),
    "oxford_pets": (1, 1.17, (7, 3), (200, 20), 20),
    "stanford_cars": (1, 3, (20, 10), (200, 20), 20),
    "sun397": (1, 1.17, (12, 10), (200, 20), 20),
    "ucf101": (1, 3, (7, 3), (200, 20), 20),
}
_PLOT = {
    "caltech101": (0.16, 1.82, (12, 10), (20, 200), 20),
    "dtd": (0.1, 7.2, (13, 13), (200, 20), 20),
    "eurosat": (3.67, 0.1, (12, 10), (200, 20), 100),
    "fgvc_aircraft": (1.4, 1.4, (7, 10), (20, 200), 20),
    "food101": (0.1, 4.06, (10, 10), (20, 20), 5),
    "imagenet": (1.0, 2.17, (3, 7), (20, 200), 20),
    "oxford_flowers": (2.32, 0.2, (3, 20), (20, 200), 80),
    "oxford_pets": (0.1, 1.0, (7, 7), (20, 200), 20),
    "stanford_cars": (0.1, 8, (20, 10), (200, 20), 20),
    "sun397": (6.8, 0.1, (12, 10), (20, 20), 20),
    "ucf101": (5.59, 0.1, (7, 3), (200, 20), 20),
}
#: What the two repositories share: AdamW lr 1e-3 (eps 1e-4, torch's weight decay 0.01), batch 256, 10 augmented
#: passes for the cache, random resized crop 0.5..1 (bicubic) and flips.
SHARED = dict(lr=0.001, adam_eps=1e-4, weight_decay=0.01, batch_size=256, augment_epochs=10)

SEARCH_SPLITS = ("full", "kshot")
SELECTIONS = ("val", "last")


@dataclass
class FewShotAdapterConfig:
    """The ``adapter`` section (cache adapters only; null: the authors' value for the dataset).

    Attributes:
        augment_epochs: Augmented passes over the training images averaged into the cache keys (10).
        lr: AdamW learning rate of the -F fine-tuning (1e-3), cosine-annealed per step to 0, no warm-up.
        adam_eps: AdamW eps (1e-4).
        weight_decay: AdamW weight decay (torch's default, 0.01, which the authors' code keeps).
        init_alpha, init_beta: Fusion weight and sharpness while fine-tuning (and before the search).
        search_scale: (beta, alpha) upper ends of the search grids (:func:`~clipdense.models.adapters.search_grid`).
        search_step: (beta, alpha) grid sizes.
        search_split: ``full``: search on the dataset's whole validation split (the authors' code); ``kshot``: on
            the run's k-shot validation split (min(k, 4) per class, Dassl's).
        select: Which fine-tuning epoch's keys are kept: ``val``, the best on the search split (the authors' code
            picks the best epoch on the *test* split, which clipdense does not do); ``last``.
        plot_run: PLOT-Adapter: the run directory of the trained PLOT (same dataset, shots, seed and CLIP).
    """

    augment_epochs: int | None = None
    lr: float | None = None
    adam_eps: float | None = None
    weight_decay: float | None = None
    init_alpha: float | None = None
    init_beta: float | None = None
    search_scale: tuple[float, float] | None = None
    search_step: tuple[int, int] | None = None
    search_split: str = "full"
    select: str = "val"
    plot_run: str | None = None


@dataclass(frozen=True)
class AdapterRecipe:
    """A resolved ``adapter`` section (no nulls), with the method, epochs and batch."""

    method: str
    augment_epochs: int
    lr: float
    adam_eps: float
    weight_decay: float
    init_alpha: float
    init_beta: float
    search_scale: tuple[float, float]
    search_step: tuple[int, int]
    search_split: str
    select: str
    plot_run: str | None
    epochs: int
    batch_size: int


def is_adapter(model_name: str) -> bool:
    """Whether a few-shot model is a cache adapter (trained by :mod:`clipdense.training.adapters`)."""
    return model_name in ADAPTER_METHODS


def adapter_recipe(model_name: str, dataset: str, section: FewShotAdapterConfig, epochs: int | None,
                   batch_size: int | None, need_plot_run: bool = True) -> AdapterRecipe:  # fmt: skip
    """Fill the nulls of an ``adapter`` section (and of ``train.epochs``/``train.batch_size``) with the authors'
    values for the dataset; Tip-Adapter (training-free) has 0 epochs.

    Raises:
        ValueError: Not an adapter model, an unknown option value, or PLOT-Adapter without ``plot_run`` (when
            ``need_plot_run``; a config may leave it to the command line or to ``fewshot grid``).
    """
    if model_name not in ADAPTER_METHODS:
        raise ValueError(f"{model_name!r} is not a cache adapter; use one of {sorted(ADAPTER_METHODS)}")
    method = ADAPTER_METHODS[model_name]
    if section.search_split not in SEARCH_SPLITS:
        raise ValueError(f"adapter.search_split={section.search_split!r}: use one of {SEARCH_SPLITS}")
    if section.select not in SELECTIONS:
        raise ValueError(f"adapter.select={section.select!r}: use one of {SELECTIONS}")
    if method == "plot_adapter" and not section.plot_run and need_plot_run:
        raise ValueError("PLOT-Adapter needs a trained PLOT: set adapter.plot_run=RUN (a `clipdense fewshot train "
                         "configs/fewshot/plot_rn50.yaml` run on the same dataset, shots and seed)")  # fmt: skip
    table = _PLOT if method == "plot_adapter" else _TIP
    beta, alpha, scale, step, official = table.get(dataset, table["caltech101"])
    values = {f.name: getattr(section, f.name) for f in fields(section)}
    defaults = dict(SHARED, init_beta=beta, init_alpha=alpha, search_scale=scale, search_step=step)
    for key, default in defaults.items():
        if key in values and values[key] is None:
            values[key] = default
    values["search_scale"] = tuple(float(v) for v in values["search_scale"])
    values["search_step"] = tuple(int(v) for v in values["search_step"])
    if min(values["search_step"]) < 1:
        raise ValueError(f"adapter.search_step={list(values['search_step'])}: the grids need >= 1 value each")
    if epochs is None:
        epochs = 0 if method == "tip_adapter" else official
    elif method == "tip_adapter" and epochs:
        raise ValueError("tip_adapter_rn50 is training-free (train.epochs 0); fine-tune with tip_adapter_f_rn50")
    return AdapterRecipe(method=method, epochs=epochs, batch_size=batch_size or SHARED["batch_size"], **values)


__all__ = [
    "ADAPTER_METHODS",
    "DATASET_TEMPLATES",
    "AdapterRecipe",
    "FewShotAdapterConfig",
    "adapter_recipe",
    "is_adapter",
]
