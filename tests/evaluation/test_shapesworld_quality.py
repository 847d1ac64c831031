"""ShapesWorld: dataset reader on the exported layout, the quality evaluation, the demo, and the
quality bars of the shipped ShapesWorld CLIP (skipped until the weights are shipped)."""

import json
from importlib import resources

import numpy as np
import pytest
import torch

from clipdense.cli import main
from clipdense.clip import load_clip
from clipdense.data.datasets import build_dataset
from clipdense.data.shapesworld import ShapesWorldConfig, class_names, generate_dataset, generate_scene
from clipdense.evaluation.shapesworld import dense_quality, format_quality

WEIGHTS = resources.files("clipdense") / "weights" / "shapesclip_rn.safetensors"
NO_WEIGHTS = "ShapesWorld CLIP weights are not shipped yet: they need a GPU (clipdense shapesworld train)"


def test_exported_folder_reads_back_with_reduced_zero_label(tmp_path):
    root = generate_dataset(
        tmp_path / "sw", num_train=2, num_val=2, seed=3, fmt="semantic", image_size=48, progress=False
    )
    dataset = build_dataset("shapesworld", root, "val")
    assert len(dataset) == 2 and dataset.class_names == class_names()
    for sample in (dataset[0], dataset[1]):
        label = sample["label"]
        assert sample["image"].shape == (3, 48, 48)
        assert label.min() >= 0 and (label[label != 255] < 56).all()
        assert (label == 255).any()  # background is ignored


def test_dense_quality_runs_every_mode_and_scores_in_range(tiny_configs):
    torch.manual_seed(0)
    clip = load_clip("ShapesCLIP-RN", None)
    cfg = ShapesWorldConfig(image_size=64)
    results = dense_quality(clip, cfg, num_scenes=2, progress=False)
    assert [r.mode for r in results] == ["maskclip", "sclip", "clearclip", "naclip", "vanilla"]
    for r in results:
        assert 0 <= r.miou_objects <= 100 and 0 <= r.miou_with_background <= 100
    table = format_quality(results, 0.5)
    assert "value path (maskclip) / q-k path (vanilla)" in table or results[-1].miou_objects == 0
    assert "50.0%" in table


def test_demo_writes_pictures_and_report(tmp_path, capsys):
    assert main(["demo", "--random-weights", "--seed", "3", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "prediction.png", "scene.png", "truth.png"]
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["caption"] == generate_scene(3).caption
    assert "background" in report["iou"]


def test_demo_without_shipped_weights_is_a_clear_error(tmp_path, capsys):
    if WEIGHTS.is_file():
        pytest.skip("weights are shipped")
    assert main(["demo", "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "not in this installation" in err and "--pretrained PATH" in err
    assert not (tmp_path / "d").exists()


@pytest.mark.skipif(not WEIGHTS.is_file(), reason=NO_WEIGHTS)
def test_shipped_model_quality_bars():
    from clipdense.training.clip_pretrain import zero_shot_accuracy

    clip = load_clip("ShapesCLIP-RN", "shapesworld")
    cfg = ShapesWorldConfig(image_size=clip.image_size)
    assert zero_shot_accuracy(clip.model, clip.tokenizer, cfg, num_images=560) >= 0.90
    results = {r.mode: r for r in dense_quality(clip, cfg, num_scenes=100, modes=["maskclip", "vanilla"])}
    assert results["maskclip"].miou_objects >= 45.0
    assert results["maskclip"].miou_objects >= 2 * results["vanilla"].miou_objects


def test_generate_command(tmp_path, capsys):
    assert main(["shapesworld", "generate", "--out", str(tmp_path), "--train", "1", "--val", "1",
                 "--image-size", "32"]) == 0  # fmt: skip
    assert (tmp_path / "classes.txt").read_text().split("\n")[0] == "red circle"
    assert json.loads((tmp_path / "annotations" / "instances_val2017.json").read_text())["images"]
    assert np.asarray(build_dataset("shapesworld", tmp_path, "train")[0]["label"]).shape == (32, 32)
