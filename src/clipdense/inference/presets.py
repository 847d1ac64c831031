"""The papers' evaluation protocols as presets: every setting of the official configs, per method and dataset.

``get_preset("sclip", "voc21")`` returns the :class:`~clipdense.config.SegmenterConfig`, the class list and
the background entry with which the official code evaluates that dataset, and names the file it mirrors.
``clipdense eval-zeroshot --preset NAME --dataset DATASET`` runs it. Transcribed from the official repositories
at these commits:

* MaskCLIP: chongzhou96/MaskCLIP@245d31f (``configs/maskclip/maskclip_vit16_*.py``, mmseg 0.20)
* SCLIP: wangf3014/SCLIP@b56bd30 (``configs/cfg_*.py``, ``clip_segmentor.py``)
* ClearCLIP: mc-lan/ClearCLIP@ad68a40 (``configs/cfg_*.py``, ``clearclip_segmentor.py``)
* NACLIP: sinahmr/NACLIP@0cac3a6 (``configs/cfg_*.py``, ``naclip.py``, ``eval.py``)

Shared by SCLIP, ClearCLIP and NACLIP: the 80 ImageNet templates, one embedding per synonym and the softmax
over all synonyms then the max per class, mmcv's ``Resize(scale=(2048, S), keep_ratio=True)``, the window
scores averaged as cosines before the logit scale, and pixels whose top probability is below ``prob_thd`` given
to class 0 of the class file (for SCLIP's and NACLIP's VOC21 and COCO-Object, 26 stuff words).

Not reproduced (numerics, not protocol): the successors run CLIP in fp16 on the GPU (we run fp32); MaskCLIP's
mmseg ViT uses LayerNorm eps 1e-6 (CLIP's is 1e-5); cv2's fixed-point bilinear resize can differ from ours by
one grey level; ClearCLIP pads windows smaller than 448 centred (only images under 448 px have such windows).
"""

from __future__ import annotations

from dataclasses import dataclass

from clipdense.clip.loading import LoadedCLIP, load_clip
from clipdense.config import PRESET_DATASETS as DATASETS
from clipdense.config import PRESETS, SegmenterConfig
from clipdense.data.classnames import load_classnames
from clipdense.inference.predictor import OpenVocabPredictor

_WITH_BACKGROUND = ("voc21", "context60", "cocoobject")

#: Reported mIoU (ViT-B/16) in DATASETS order (None: not reported), and where each row comes from.
REPORTED: dict[str, tuple[tuple[float | None, ...], str]] = {
    "maskclip": (
        (None, None, None, 49.5, 21.7, 12.5, None, None),
        "MaskCLIP's configs/maskclip/README.md (its own protocol; no ViT-B/16 config for the other datasets)",
    ),
    "sclip": ((59.1, 30.4, 30.5, 80.4, 34.2, 22.4, 32.2, 16.1), "SCLIP paper, Table 1 (without PAMR)"),
    "sclip-qk": ((None,) * 8, "not reported by this preset: SCLIP's code with csa=False, its q-k CLIP baseline"),
    "clearclip": ((51.8, 32.6, 33.0, 80.9, 35.9, 23.9, 30.0, 16.7), "ClearCLIP paper, Table 2"),
    "clearclip-shipped": ((None,) * 8, "not reported: the authors name q-q attention for the paper's numbers"),
    "naclip": (
        (64.07, 34.99, 36.19, 83.03, 38.35, 25.69, 38.27, 19.05),
        "NACLIP README (its default evaluation, with PAMR); the paper's table without PAMR: "
        "58.9, 32.2, 33.2, 79.7, 35.2, 23.3, 35.5, 17.4",
    ),
}


@dataclass(frozen=True)
class Preset:
    """An official evaluation protocol on one dataset.

    Attributes:
        name: Preset name (one of :data:`PRESETS`).
        dataset: Dataset name (one of :data:`DATASETS`).
        config: The inference settings.
        class_list: Shipped class list (see :func:`clipdense.data.classnames.load_classnames`).
        background_index: The list's background entry (whatever its words), or None.
        model: (open_clip architecture, pretrained tag) the papers evaluate.
        mirrors: The official file(s) the settings come from.
        reported_miou: The mIoU reported for this protocol (see :data:`REPORTED`), or None.
    """

    name: str
    dataset: str
    config: SegmenterConfig
    class_list: str
    background_index: int | None
    model: tuple[str, str]
    mirrors: str
    reported_miou: float | None


def _successor(name: str, dataset: str) -> tuple[SegmenterConfig, str]:
    """SCLIP, ClearCLIP (paper or shipped attention) and NACLIP."""
    bg = dataset in _WITH_BACKGROUND
    common = dict(templates="imagenet", resize="mmcv", synonyms="max_prob", patch_fit="truncate")
    if name in ("sclip", "sclip-qk"):
        short = {"cocostuff171": 448, "cityscapes": 560}.get(dataset, 336)
        scale = {"voc21": 65.0, "context60": 50.0, "cocoobject": 50.0}.get(dataset, 40.0)
        # sclip-qk: encode_image(csa=False), CLIP's own q-k attention (residual and FFN kept), with SCLIP's
        # interpolate_pos_encoding (DINO's scale factor), which the vanilla mode alone resizes by size
        mode, resize = ("sclip", None) if name == "sclip" else ("vanilla", "scale")
        cfg = SegmenterConfig(mode=mode, pos_resize=resize, short_side=short, window=224, stride=112,
                              logit_scale=scale, background_threshold=0.1 if bg else None,
                              area_threshold=0.1 if dataset == "voc21" else None, **common)  # fmt: skip
        what = "" if name == "sclip" else " with encode_image(csa=False)"
        return cfg, f"SCLIP configs/cfg_{{}}.py + configs/base_config.py{what}"
    if name in ("clearclip", "clearclip-shipped"):
        window = 224 if dataset == "cityscapes" else 448
        threshold = {"voc21": 0.5, "context60": 0.15, "cocoobject": 0.4}.get(dataset)
        mode = "clearclip" if name == "clearclip" else "clearclip_qk"
        cfg = SegmenterConfig(mode=mode, short_side=448, window=window, stride=224, logit_scale=50.0,
                              background_threshold=threshold, **common)  # fmt: skip
        attention = "model_type='ClearCLIP' (the paper's q-q)" if name == "clearclip" else "as shipped (q-k)"
        return cfg, f"ClearCLIP configs/cfg_{{}}.py + configs/base_config.py with {attention}"
    if name == "naclip":
        window = None if dataset in ("voc21", "voc20") else 224
        cfg = SegmenterConfig(mode="naclip", short_side=560 if dataset == "cityscapes" else 336, window=window,
                              stride=112, logit_scale=40.0, background_threshold=0.1 if bg else None,
                              pamr_steps=10, pamr_dilations=(8, 16), **common)  # fmt: skip
        return cfg, "NACLIP configs/cfg_{}.py, eval.py defaults (--arch reduced --attn naclip --std 5 --pamr on)"
    raise AssertionError(name)


def _maskclip(dataset: str) -> tuple[SegmenterConfig, str]:
    """MaskCLIP's own protocol: whole image, ImageNet normalisation, 85 templates, no threshold."""
    scale = {"context59": (520, 520), "cityscapes": (1024, 512)}.get(dataset, (2048, 512))
    cfg = SegmenterConfig(mode="maskclip", templates="ensemble", normalize="imagenet", resize="mmcv",
                          long_max=scale[0], short_side=scale[1], window=None, patch_fit="pad_stretch",
                          logit_scale=1.0)  # fmt: skip
    files = {
        "voc20": "maskclip_vit16_512x512_voc12aug_20.py",
        "context59": "maskclip_vit16_520x520_pascal_context_59.py",
        "cocostuff171": "maskclip_vit16_512x512_coco-stuff164k.py",
        "cityscapes": "maskclip_vit16_1024x512_cityscapes.py",
        "ade20k": "maskclip_r50_512x512_ade20k.py's pipeline (no ViT-B/16 config)",
    }
    source = files.get(dataset, "no config for this dataset: the pipeline of maskclip_vit16_512x512_voc12aug_20.py")
    return cfg, f"MaskCLIP configs/maskclip/{source}"


def get_preset(name: str, dataset: str) -> Preset:
    """The official evaluation protocol of a method on a dataset.

    Args:
        name: One of :data:`PRESETS`.
        dataset: One of :data:`DATASETS`.

    Returns:
        The preset.

    Raises:
        ValueError: An unknown preset or dataset.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if dataset not in DATASETS:
        raise ValueError(f"preset {name!r} covers the datasets {', '.join(DATASETS)}; got {dataset!r}")
    if name == "maskclip":
        config, mirrors = _maskclip(dataset)
        official = dataset not in _WITH_BACKGROUND  # MaskCLIP ships no list for the background datasets
        class_list = f"maskclip_{dataset}" if official else dataset
    else:
        config, mirrors = _successor(name, dataset)
        config_name = {"cocoobject": "coco_object", "cocostuff171": "coco_stuff164k", "cityscapes": "city_scapes"}
        mirrors = mirrors.format(config_name.get(dataset, dataset))
        class_list = f"{name.split('-')[0]}_{dataset}"
    reported = REPORTED[name][0][DATASETS.index(dataset)]
    background = 0 if dataset in _WITH_BACKGROUND else None
    return Preset(name, dataset, config, class_list, background, ("ViT-B-16", "openai"), mirrors, reported)


def preset_predictor(
    name: str, dataset: str, clip: LoadedCLIP | None = None, device: str = "cpu"
) -> OpenVocabPredictor:
    """A predictor with a preset's settings and class list set, ready for ``set_image`` / ``predict``.

    Args:
        name: One of :data:`PRESETS`.
        dataset: One of :data:`DATASETS`.
        clip: The CLIP to use; default: the preset's model (ViT-B-16, OpenAI weights), loaded on ``device``.
        device: Where to load the default model.

    Returns:
        The predictor; its labels are the dataset's train ids.
    """
    preset = get_preset(name, dataset)
    clip = clip if clip is not None else load_clip(*preset.model, device=device)
    predictor = OpenVocabPredictor(clip, preset.config)
    predictor.set_classes(load_classnames(preset.class_list), background_index=preset.background_index)
    return predictor
