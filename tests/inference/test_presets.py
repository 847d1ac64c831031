"""Evaluation presets against the official configs, transcribed independently here from the repositories
(MaskCLIP@245d31f, SCLIP@b56bd30, ClearCLIP@ad68a40, NACLIP@0cac3a6), and ``eval-zeroshot --preset``."""

import json

import numpy as np
import pytest
from PIL import Image

from clipdense.cli import main
from clipdense.data.classnames import AVAILABLE, OFFICIAL, load_classnames, synonyms
from clipdense.inference.presets import DATASETS, PRESETS, REPORTED, get_preset

# (method, dataset): the official settings, field by field, as each repository's config file states them.
OFFICIAL_SETTINGS = {
    # SCLIP configs/cfg_voc21.py: logit_scale=65, prob_thd=0.1, area_thd=0.1; base: slide 224/112, Resize (2048, 336)
    ("sclip", "voc21"): dict(mode="sclip", logit_scale=65.0, background_threshold=0.1, area_threshold=0.1,
                             short_side=336, window=224, stride=112, pamr_steps=0),
    ("sclip", "context60"): dict(logit_scale=50.0, background_threshold=0.1, area_threshold=None),
    ("sclip", "cocoobject"): dict(logit_scale=50.0, background_threshold=0.1),
    ("sclip", "cocostuff171"): dict(logit_scale=40.0, short_side=448, background_threshold=None),
    ("sclip", "cityscapes"): dict(short_side=560, window=224),
    # ClearCLIP: logit_scale 50, Resize (2048, 448), slide 448/224 (cityscapes slide_crop=224), prob_thd per config
    ("clearclip", "voc21"): dict(mode="clearclip", logit_scale=50.0, short_side=448, window=448, stride=224,
                                 background_threshold=0.5),
    ("clearclip", "context60"): dict(background_threshold=0.15),
    ("clearclip", "cocoobject"): dict(background_threshold=0.4),
    ("clearclip", "cityscapes"): dict(window=224, stride=224, background_threshold=None),
    ("clearclip-shipped", "ade20k"): dict(mode="clearclip_qk", window=448),
    # SCLIP's encode_image(csa=False): q-k attention with residual and FFN, interpolate_pos_encoding (scale factor)
    ("sclip-qk", "voc21"): dict(mode="vanilla", pos_resize="scale", logit_scale=65.0, background_threshold=0.1,
                                area_threshold=0.1, short_side=336, window=224, stride=112),
    # NACLIP: logit_scale 40, PAMR 10 steps (8, 16) by default, VOC on the whole image, Cityscapes (2048, 560)
    ("naclip", "voc21"): dict(mode="naclip", window=None, logit_scale=40.0, background_threshold=0.1,
                              pamr_steps=10, pamr_dilations=(8, 16), short_side=336),
    ("naclip", "voc20"): dict(window=None, background_threshold=None),
    ("naclip", "context59"): dict(window=224, stride=112),
    ("naclip", "cityscapes"): dict(short_side=560),
    # MaskCLIP: whole image, ImageNet mean/std, 85 templates, no threshold; context59 Resize (520, 520)
    ("maskclip", "context59"): dict(mode="maskclip", window=None, normalize="imagenet", templates="ensemble",
                                    long_max=520, short_side=520, background_threshold=None, key_smoothing=None,
                                    prompt_denoise=None, patch_fit="pad_stretch"),
    ("maskclip", "cityscapes"): dict(long_max=1024, short_side=512),
    ("maskclip", "voc20"): dict(long_max=2048, short_side=512),
}  # fmt: skip


@pytest.mark.parametrize(("method", "dataset"), sorted(OFFICIAL_SETTINGS))
def test_presets_hold_the_official_settings(method, dataset):
    cfg = get_preset(method, dataset).config
    for field, value in OFFICIAL_SETTINGS[method, dataset].items():
        assert getattr(cfg, field) == value, field


@pytest.mark.parametrize("method", [m for m in PRESETS if m != "maskclip"])
def test_successors_share_the_protocol(method):
    for dataset in DATASETS:
        preset = get_preset(method, dataset)
        cfg = preset.config
        assert (cfg.templates, cfg.resize, cfg.long_max, cfg.synonyms) == ("imagenet", "mmcv", 2048, "max_prob")
        assert preset.class_list == f"{method.split('-')[0]}_{dataset}"
        assert preset.model == ("ViT-B-16", "openai")
        assert method.split("-")[0].lower() in preset.mirrors.lower()


@pytest.mark.parametrize("method", PRESETS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_preset_class_list_fits_its_dataset(method, dataset):
    from clipdense.data.datasets import DATASETS as SPECS

    preset = get_preset(method, dataset)
    entries = load_classnames(preset.class_list)
    assert len(entries) == len(load_classnames(SPECS[dataset].class_list))
    assert preset.background_index == (0 if dataset in ("voc21", "context60", "cocoobject") else None)


def test_official_class_files_are_shipped_beside_ours():
    assert set(AVAILABLE).isdisjoint(OFFICIAL) and len(OFFICIAL) == 29
    voc = load_classnames("sclip_voc21")
    assert synonyms(voc[0])[:3] == ["sky", "wall", "tree"] and len(synonyms(voc[0])) == 26  # background as stuff
    assert voc[1] == "aeroplane" and load_classnames("voc21")[1] == "airplane"  # ours stay available
    assert load_classnames("clearclip_voc21")[0] == "background"
    assert load_classnames("sclip_cocostuff171")[9] == "trafficlight"


def test_reported_numbers_cover_the_eight_datasets():
    for name in PRESETS:
        numbers, source = REPORTED[name]
        assert len(numbers) == len(DATASETS) and source
        assert all(v is None or 0 < v < 100 for v in numbers)
    assert get_preset("sclip", "voc21").reported_miou == 59.1
    assert get_preset("naclip", "ade20k").reported_miou == 19.05


def test_unknown_preset_or_dataset():
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("mask2former", "voc21")
    with pytest.raises(ValueError, match="covers the datasets"):
        get_preset("sclip", "shapesworld")


@pytest.fixture
def voc(tmp_path):
    """Two 40 x 56 VOC2012 images and masks in the standard layout."""
    root = tmp_path / "VOC2012"
    rng = np.random.default_rng(0)
    ids = ["2007_000032", "2007_000033"]
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for image_id in ids:
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        mask = Image.fromarray(rng.choice([0, 1, 15, 255], (40, 56)).astype(np.uint8), mode="P")
        mask.putpalette(list(range(256)) * 3)
        mask.save(root / "SegmentationClass" / f"{image_id}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def test_eval_zeroshot_preset(tiny_configs, voc, tmp_path, capsys):
    out = tmp_path / "sclip.json"
    args = ["eval-zeroshot", "--preset", "sclip", "--dataset", "voc21", "--root", str(voc), "--model", "tiny-ViT",
            "--random-weights", "--templates", "single", "--short-side", "48", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "preset sclip on voc21: mirrors SCLIP configs/cfg_voc21.py" in stdout
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert report["preset"]["class_list"] == "sclip_voc21" and report["preset"]["reported_miou"] == 59.1
    assert (settings["mode"], settings["logit_scale"], settings["area_threshold"]) == ("sclip", 65.0, 0.1)
    assert (settings["short_side"], settings["templates"], settings["synonyms"]) == (48, "single", "max_prob")
    assert report["class_names"][:2] == ["background", "airplane"]  # reported under the dataset's names
    assert 0 <= report["miou"] <= 100

    # a flag overrides the preset; --class-list picks our list instead of the official one
    args[args.index("sclip")] = "naclip"
    assert main([*args, "--pamr-steps", "2", "--class-list", "voc21"]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["pamr_steps"] == 2 and report["settings"]["window"] is None
    assert report["preset"]["class_list"] == "voc21"


def test_eval_zeroshot_preset_errors(tiny_configs, voc, capsys):
    base = ["eval-zeroshot", "--dataset", "voc21", "--root", str(voc), "--model", "tiny-ViT", "--random-weights"]
    assert main([*base, "--preset", "sclip", "--class-list", "nonsense"]) == 2
    assert "--class-list: unknown class list 'nonsense'" in capsys.readouterr().err
    assert main([*base, "--class-list", "voc20"]) == 2
    assert "--class-list has 20 classes; voc21 has 21" in capsys.readouterr().err


def test_preset_predictor_segments_into_the_dataset_ids(tiny_configs):
    import torch

    from clipdense.clip import load_clip
    from clipdense.inference import preset_predictor

    torch.manual_seed(0)
    clip = load_clip("tiny-ViT", None)
    p = preset_predictor("naclip", "voc21", clip)
    assert p.config.pamr_steps == 10 and p._background_index == 0
    p.config.short_side = 48
    p.set_image((torch.rand(3, 40, 56) * 255).to(torch.uint8))
    seg = p.predict()
    assert seg.class_names[:2] == ["sky", "aeroplane"] and seg.labels.shape == (40, 56)
    assert int(seg.labels.max()) < 21


def test_sclip_qk_resizes_positions_by_scale_factor(tiny_configs):
    """SCLIP's q-k baseline runs CLIP's attention with SCLIP's interpolate_pos_encoding: at a non-square window the
    encoder's positions are the scale-factor rule's, not the exact-size resize the vanilla mode has elsewhere."""
    import torch

    from clipdense.clip import load_clip
    from clipdense.clip.dense import resize_grid_embedding
    from clipdense.inference import preset_predictor
    from clipdense.inference.predictor import OpenVocabPredictor

    torch.manual_seed(0)
    clip = load_clip("tiny-ViT", None)
    p = preset_predictor("sclip-qk", "voc21", clip)
    assert (p.encoder.mode, p.encoder.pos_resize) == ("vanilla", "scale")
    assert OpenVocabPredictor(clip, p.config.__class__(mode="vanilla")).encoder.pos_resize == "size"
    pos = clip.model.visual.positional_embedding
    assert not torch.allclose(resize_grid_embedding(pos, (5, 7), "bicubic", "scale"),
                              resize_grid_embedding(pos, (5, 7), "bicubic", "size"))  # fmt: skip
    with pytest.raises(ValueError, match="ViT"):
        OpenVocabPredictor(load_clip("tiny-RN", None), p.config)
