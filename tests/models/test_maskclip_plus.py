"""MaskCLIP+ (Zhou et al., ECCV 2022): pseudo-labels, frozen text classifier and guide, self-training switch,
seen/unseen metrics, shipped splits, and a tiny zero-shot run through the training engine."""

import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipdense.checkpoints import load_trunk_checkpoint
from clipdense.data.classnames import load_classnames
from clipdense.data.splits import class_indices, load_unseen_split
from clipdense.evaluation.metrics import SegmentationMetric
from clipdense.evaluation.zeroshot_split import seen_unseen_report
from clipdense.models import create_model, list_models
from clipdense.models.maskclip_plus import GUIDE_SCALE, build_trunk, pseudo_labels
from tiny_models import tiny_overrides, write_colour_dataset

CLASSES = ["red thing", "green thing", "blue thing", "yellow thing"]


def tiny(name="maskclip_plus_deeplabv2_r101", **kw):
    torch.manual_seed(0)
    opts = dict(clip_model="tiny-RN", trunk="tiny", unseen_classes=["blue thing", "yellow thing"], head_channels=16)
    return create_model(name, class_names=CLASSES, pretrained=None, **{**opts, **kw})


def test_registered():
    assert {"maskclip_plus_deeplabv2_r101", "maskclip_plus_deeplabv3plus_r101"} <= set(list_models("maskclip_plus_*"))


def _scores_and_labels(seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 4, 8, 8, generator=g) * 0.05
    labels = torch.randint(0, 4, (2, 8, 8), generator=g)
    labels[:, 0] = 255
    return scores, labels


def test_zeroshot_pseudo_labels():
    scores, labels = _scores_and_labels()
    target = pseudo_labels(scores, labels, {2, 3}, "zeroshot")
    unseen_pix = (labels == 2) | (labels == 3)
    expected = torch.tensor([2, 3])[scores[:, [2, 3]].argmax(1)]
    assert torch.equal(target[unseen_pix], expected[unseen_pix])
    seen_pix = labels < 2
    assert torch.equal(target[seen_pix], labels[seen_pix])
    assert (target[labels == 255] == 255).all()
    assert set(target[unseen_pix].unique().tolist()) <= {2, 3}


def test_pseudo_labels_upsample_scores_to_labels():
    scores, labels = _scores_and_labels()
    low = scores[:, :, ::2, ::2].contiguous()
    up = F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.equal(pseudo_labels(low, labels, [2, 3]), pseudo_labels(up, labels, [2, 3]))


def test_confidence_threshold():
    scores, labels = _scores_and_labels()
    thr = 0.6
    target = pseudo_labels(scores, labels, {2, 3}, "zeroshot", confidence_threshold=thr)
    conf = F.softmax(GUIDE_SCALE * scores[:, [2, 3]], dim=1).amax(1)
    unseen_pix = (labels == 2) | (labels == 3)
    low, high = unseen_pix & (conf < thr), unseen_pix & (conf >= thr)
    assert low.any() and high.any()
    assert (target[low] == 255).all() and (target[high] != 255).all()
    assert torch.equal(target[labels < 2], labels[labels < 2])  # GT is never thresholded


def test_probability_guides_threshold_their_own_max():
    """A key-smoothed guide returns probabilities: the official conf_thresh compares their max, unscaled."""
    scores, labels = _scores_and_labels()
    probs = F.softmax(3 * scores, dim=1)
    conf, arg = probs.max(1)
    thr = float(conf.median())
    target = pseudo_labels(probs, labels, set(), "annotation_free", confidence_threshold=thr, scale=None)
    keep = (labels != 255) & (conf >= thr)
    assert keep.any() and (~keep & (labels != 255)).any()
    assert torch.equal(target[keep], arg[keep]) and (target[~keep] == 255).all()


def test_annotation_free_pseudo_labels():
    scores, labels = _scores_and_labels()
    target = pseudo_labels(scores, labels, set(), "annotation_free")
    valid = labels != 255
    assert torch.equal(target[valid], scores.argmax(1)[valid])
    assert (target[~valid] == 255).all()
    assert torch.equal(pseudo_labels(scores, None, (), "annotation_free"), scores.argmax(1))


def test_classifier_is_frozen_text_embeddings_and_set_classes_swaps():
    from clipdense.clip.loading import load_clip
    from clipdense.clip.text import class_text_embeddings

    model = tiny()
    torch.manual_seed(0)  # the same random tiny CLIP as tiny() built
    text = class_text_embeddings(load_clip("tiny-RN", None), CLASSES)
    assert torch.allclose(model.text_embeddings, text)
    assert "text_embeddings" in model.state_dict()  # a rebuilt run gets its classifier back
    assert all(p.data_ptr() != model.text_embeddings.data_ptr() for p in model.parameters())
    before = model.text_embeddings.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    for _ in range(2):
        loss = sum(model.losses(model(x), y).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model.text_embeddings, before)

    model.eval()
    feats = F.normalize(model.features(x), dim=1)
    new = F.normalize(torch.randn(3, text.shape[1]), dim=-1)
    model.set_classes(["a", "b", "c"], new * 3)
    logits = model(x)["logits"]
    assert logits.shape[1] == 3 and model.num_classes == 3 and model.class_names == ["a", "b", "c"]
    expected = torch.einsum("bdhw,cd->bchw", feats, new) / 0.07
    assert torch.allclose(logits, expected, atol=1e-4)


def test_guide_frozen_and_eval_in_train_mode():
    model = tiny()
    model.train()
    assert model.training and model.backbone.training
    assert not any(m.training for m in model.guide.modules())
    assert not any(p.requires_grad for p in model.guide.parameters())
    snapshot = {k: v.clone() for k, v in model.guide.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    loss = sum(model.losses(model(x), y).values())
    loss.backward()
    opt.step()
    assert all(torch.equal(v, model.guide.state_dict()[k]) for k, v in snapshot.items())  # BN stats too
    assert all(p.grad is None for p in model.guide.parameters())


def test_self_training_switches_at_configured_step():
    model = tiny(total_iters=20, self_train_from=0.15)  # switch at forward 3
    assert model.self_train_step == 3
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    unseen_pix = y >= 2
    for step in range(5):
        out = model(x)
        assert int(out["step"]) == step
        targets = model.make_targets(out, y)
        if step < 3:
            assert "guide_scores" in out
            expected = pseudo_labels(out["guide_scores"], y, [2, 3])
        else:
            assert "guide_scores" not in out  # the guide is not run any more
            expected = pseudo_labels(out["logits"].detach(), y, [2, 3], scale=1.0)
        assert torch.equal(targets, expected)
        assert torch.equal(targets[~unseen_pix], y[~unseen_pix])
    assert int(model.step) == 5
    model.eval()
    model(x)
    assert int(model.step) == 5  # only training forwards count
    resumed = tiny(total_iters=20, self_train_from=0.15)
    resumed.load_state_dict(model.state_dict())
    assert int(resumed.step) == 5  # resume restores the schedule position


def test_annotation_free_has_no_self_training():
    model = tiny(protocol="annotation_free", unseen_classes=None, total_iters=2)
    assert model.self_train_step is None
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    y[:, :4] = 255
    for _ in range(3):
        out = model(x)
        targets = model.make_targets(out, y)
        assert torch.equal(targets, pseudo_labels(out["guide_scores"], y, (), "annotation_free"))
        assert (targets[:, :4] == 255).all()


def test_output_strides_and_deeplabv3plus():
    x = torch.randn(2, 3, 64, 48)
    assert tiny().eval()(x)["logits"].shape == (2, 4, 8, 6)
    model = tiny("maskclip_plus_deeplabv3plus_r101")
    out = model(x)
    assert out["logits"].shape == (2, 4, 16, 12)
    assert torch.isfinite(model.losses(out, torch.randint(0, 4, (2, 64, 48)))["decode"])


def test_trunk_checkpoint_roundtrip(tmp_path):
    src = build_trunk("tiny")
    state = {k.replace("stem.0.", "conv1.").replace("stem.1.", "bn1."): v for k, v in src.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "r.pth")
    dst = build_trunk("tiny")
    load_trunk_checkpoint(dst, tmp_path / "r.pth")
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_trunk_checkpoint(build_trunk("tiny"), tmp_path / "bad.pth")


def _no_text_encoding(monkeypatch):
    import clipdense.clip.text
    import clipdense.models.maskclip_plus as maskclip_plus

    def refuse(*args, **kwargs):
        raise AssertionError("the class names were encoded, but the checkpoint holds their embeddings")

    monkeypatch.setattr(maskclip_plus, "class_text_embeddings", refuse)
    monkeypatch.setattr(clipdense.clip.text, "encode_text", refuse)


@pytest.mark.parametrize("name", ["maskclip_plus_deeplabv2_r101", "maskclip_plus_deeplabv3plus_r101"])
def test_run_round_trip_is_exact_without_text_encoding_or_warnings(name, tmp_path, monkeypatch, caplog):
    from clipdense.config import ExperimentConfig, save_config
    from clipdense.models.registry import checkpoint_options
    from clipdense.runs import build_from_run, save_checkpoint

    assert checkpoint_options(name) == {"from_checkpoint": True}
    cfg = ExperimentConfig()
    cfg.model.name, cfg.model.class_names = name, CLASSES
    cfg.model.overrides = dict(clip_model="tiny-RN", trunk="tiny", unseen_classes=["blue thing"], head_channels=16)
    model = tiny(name, unseen_classes=["blue thing"])
    x = torch.randn(2, 3, 32, 32)
    model.train()(x)  # moves the BatchNorm statistics and the step counter off their initial values
    expected = model.eval()(x)["logits"]
    save_config(cfg, tmp_path / "config.yaml")
    save_checkpoint(tmp_path, model, {}, step=1)

    _no_text_encoding(monkeypatch)
    caplog.set_level(logging.INFO)
    caplog.clear()  # tiny() warned of its random CLIP
    loaded, _ = build_from_run(tmp_path)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert torch.equal(loaded(x)["logits"], expected)
    assert torch.equal(loaded.text_embeddings, model.text_embeddings) and int(loaded.step) == 1
    assert loaded.class_names == CLASSES and loaded.unseen == [2]


def test_from_checkpoint_build_has_a_zero_classifier_and_no_training_warnings(monkeypatch, caplog):
    import clipdense.models.maskclip_plus as maskclip_plus

    monkeypatch.setattr(maskclip_plus, "build_trunk", lambda name: build_trunk("tiny"))  # "resnet101", but tiny

    def warnings():  # of this module: the random CLIP's warning is build_architecture's to silence
        return [r for r in caplog.records if r.name == maskclip_plus.__name__ and r.levelno >= logging.WARNING]

    tiny(trunk="resnet101", unseen_classes=None)  # random trunk, zero-shot without unseen classes
    assert len(warnings()) == 2
    caplog.clear()

    _no_text_encoding(monkeypatch)
    model = tiny(trunk="resnet101", unseen_classes=None, from_checkpoint=True)
    assert not warnings()
    assert torch.equal(model.text_embeddings, torch.zeros(len(CLASSES), 32))  # C x D, D: tiny-RN's embed_dim


def test_hiou_is_harmonic_mean():
    ious = [80.0, 60.0, 30.0, float("nan"), 50.0]
    rep = seen_unseen_report(ious, [2, 4])
    assert rep["miou_seen"] == pytest.approx(70.0) and rep["miou_unseen"] == pytest.approx(40.0)
    assert rep["hiou"] == pytest.approx(2 * 70 * 40 / 110)
    assert rep["miou"] == pytest.approx(55.0)
    metric = SegmentationMetric(3)
    metric.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 1, 1, 2]]))
    report = metric.compute()
    from_report = seen_unseen_report(report, [2])
    assert from_report["hiou"] == pytest.approx(seen_unseen_report(report.per_class_iou, [2])["hiou"])
    assert seen_unseen_report([0.0, 50.0], [1])["hiou"] == 0.0


@pytest.mark.parametrize(
    "split, classes, n", [("voc", "voc20", 5), ("context", "context59", 10), ("cocostuff", "cocostuff171", 15)]
)
def test_shipped_unseen_splits(split, classes, n):
    names = load_unseen_split(split)
    assert len(names) == n
    assert len(class_indices(names, load_classnames(classes))) == n
    with pytest.raises(ValueError):
        load_unseen_split("ade")


def test_unknown_unseen_class_is_an_error():
    with pytest.raises(ValueError, match="not in the class list"):
        tiny(unseen_classes=["purple thing"])


# ------------------------------------------------------------------------- end to end through the engine


def test_tiny_zero_shot_run_through_engine(tmp_path):
    from clipdense.config import EvalConfig, load_config
    from clipdense.data.datasets import build_dataset
    from clipdense.evaluation.segmentation import evaluate
    from clipdense.runs import build_from_run
    from clipdense.training.engine import train

    root = write_colour_dataset(tmp_path / "data")
    iters = 30
    overrides = {
        "trunk": "tiny",
        "unseen_classes": ["blue thing"],
        "total_iters": iters,
        "self_train_from": 0.5,
    }
    cfg = load_config(
        None,
        tiny_overrides(
            root,
            tmp_path / "run",
            model="maskclip_plus_deeplabv2_r101",
            iters=iters,
            model_overrides=overrides,
            **{"optim.backbone_lr_mult": 1.0},
        ),
    )
    result = train(cfg, progress=False)
    losses = result["losses"]
    assert result["finished"] and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])

    model, _ = build_from_run(cfg.run_dir)
    assert int(model.step) == iters and model.unseen == [2]
    report = evaluate(
        model, build_dataset("folder", root, "val"), EvalConfig(mode="whole", short_side=None), "cpu", progress=False
    )
    split = seen_unseen_report(report, model.unseen)
    print("tiny MaskCLIP+ zero-shot:", {k: round(v, 2) for k, v in split.items()})
    assert split["miou"] == pytest.approx(report.miou, nan_ok=True)

    # the command line: seen / unseen / hIoU saved by `eval`, and a new vocabulary at inference
    from clipdense.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", str(cfg.run_dir), "--mode", "whole", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["zero_shot"]) == {"miou_seen", "miou_unseen", "miou", "hiou"}
    image = root / "images" / "010.png"
    seg = tmp_path / "seg"
    classes = "red thing; green thing; blue thing; purple thing"
    assert main(["segment", str(image), "--checkpoint", str(cfg.run_dir), "--classes", classes, "--out", str(seg)]) == 0
    report = json.loads((seg / "010.json").read_text())
    assert report["classes"] == ["red thing", "green thing", "blue thing", "purple thing"]
    assert np.array(Image.open(seg / "010_labels.png")).max() < 4


def test_shipped_configs_are_consistent():
    from pathlib import Path

    from clipdense.config import load_config
    from clipdense.data.datasets import DATASETS

    paths = sorted((Path(__file__).parents[2] / "configs" / "maskclip_plus").glob("maskclip_plus_*.yaml"))
    assert len(paths) == 7
    for path in paths:
        cfg = load_config(path)
        over = cfg.model.overrides
        assert over["total_iters"] == cfg.train.iters and cfg.optim.backbone_lr_mult == 1.0
        if over["protocol"] == "zeroshot":
            names = load_classnames(DATASETS[cfg.data.dataset].class_list)
            assert class_indices(load_unseen_split(over["unseen_classes"]), names)
        else:  # the authors' anno_free configs: RN50 guides unrefined; ViT-B/16 kspd: ks 1.0, pd 0.5; 2k/4k/8k iters
            refine = (over.get("key_smoothing", 0.0), over.get("prompt_denoise", 0.0))
            assert refine == ((1.0, 0.5) if over["clip_model"] == "ViT-B-16" else (0.0, 0.0))
            assert cfg.train.iters == {"voc20": 2000, "context59": 4000, "cocostuff171": 8000}[cfg.data.dataset]
        assert cfg.optim.min_lr == 1e-4


def test_clip_trunk_is_a_dilated_copy_of_the_guide_tower():
    model = tiny(trunk="clip")
    trunk, visual = model.backbone, model.guide.encoder.visual
    tower = {k: v for k, v in visual.state_dict().items() if not k.startswith("attnpool")}
    trunk_state = trunk.state_dict()
    assert len(trunk_state) == len(tower)  # every tower weight but the attention pool's, and nothing else
    assert all(torch.equal(a, b) for a, b in zip(trunk_state.values(), tower.values(), strict=True))
    assert not {p.data_ptr() for p in trunk.parameters()} & {p.data_ptr() for p in visual.parameters()}
    trunk.eval()
    visual.eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        low, high = trunk(x)
        assert low.shape[-2:] == (16, 12) and high.shape[-2:] == (8, 6)  # output strides 4 and 8
        # the undilated part computes exactly what the guide's tower does
        assert torch.equal(trunk.layer2(low), visual.layer2(visual.layer1(visual.stem(x))))
    rates = [[b.conv2.dilation[0] for b in layer] for layer in (trunk.layer3, trunk.layer4)]
    assert rates == [[1] + [2] * (len(trunk.layer3) - 1), [2] + [4] * (len(trunk.layer4) - 1)]
    assert not any(isinstance(m, torch.nn.AvgPool2d) for m in [*trunk.layer3.modules(), *trunk.layer4.modules()])
    assert isinstance(visual.layer3[0].avgpool, torch.nn.AvgPool2d)  # the guide keeps its strides
    with pytest.raises(ValueError, match="CLIP ResNet"):
        tiny(trunk="clip", clip_model="tiny-ViT")
