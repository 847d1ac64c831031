"""A tiny detector trained through `clipdense train` on ShapesWorld's COCO export; eval, detect, bad input."""

import json

import pytest
import torch

from clipdense.cli import main
from clipdense.evaluation.detection import evaluate_detection
from clipdense.models.registry import create_model
from clipdense.training.config import load_config
from clipdense.training.engine import build_eval_dataset, build_from_run, train
from tiny_models import detection_overrides, write_shapes_coco


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return write_shapes_coco(tmp_path_factory.mktemp("shapes_coco"))


@pytest.fixture(scope="module")
def trained(shapes_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("det_run") / "run"
    # 7 epochs of 24 images at batch 4 = 42 steps; lr x0.1 after epoch 6 (mmdet's epoch-based step schedule)
    overrides = detection_overrides(shapes_root, run, **{"train.epochs": 7, "optim.steps": "[6]"})
    torch.manual_seed(0)
    result = train(load_config(None, overrides), progress=False)
    return run, result


def test_tiny_denseclip_retinanet_learns(trained):
    run, result = trained
    assert result["finished"] and result["step"] == 42
    info = json.loads((run / "run_info.json").read_text())
    assert info["total_iters"] == 42 and info["steps_per_epoch"] == 6
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"classification", "bbox_regression", "aux_box"} <= set(records[0])
    lr = {r["step"]: r["lr"] for r in records}
    assert lr[32] == pytest.approx(1e-3) and lr[36] == pytest.approx(1e-4)  # milestone at step 36
    losses = result["losses"]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4

    model, cfg = build_from_run(run)
    val = build_eval_dataset(cfg)
    after = evaluate_detection(model, val, progress=False)
    torch.manual_seed(0)
    untrained = create_model(cfg.model.name, class_names=cfg.model.class_names, pretrained=None, **cfg.model.overrides)
    before = evaluate_detection(untrained, val, progress=False)
    assert after.bbox["AP"] > before.bbox["AP"] + 5, (before.bbox, after.bbox)


def test_eval_and_detect_commands(trained, shapes_root, tmp_path, capsys):
    run, _ = trained
    assert main(["eval", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and "bbox" in printed
    saved = json.loads((run / "eval_coco_val.json").read_text())
    model, cfg = build_from_run(run)
    direct = evaluate_detection(model, build_eval_dataset(cfg), progress=False)
    assert saved["bbox"]["AP"] == pytest.approx(direct.bbox["AP"])
    assert json.loads((run / "results_coco_val.json").read_text())  # COCO results format, for other tools

    image = shapes_root / "val2017" / "sw_000000.png"
    assert (
        main(["detect", str(image), "--checkpoint", str(run), "--out", str(tmp_path), "--score-threshold", "0.1"]) == 0
    )
    report = json.loads((tmp_path / "sw_000000.json").read_text())
    assert all(d["score"] >= 0.1 and d["class"] in cfg.model.class_names for d in report["detections"])
    assert (tmp_path / "sw_000000_detections.png").stat().st_size > 0
    assert main(["detect", str(image), "--checkpoint", str(run), "--score-threshold", "2"]) == 1


def test_model_and_data_must_match(shapes_root, tmp_path, tiny_configs):
    masks_off = detection_overrides(shapes_root, tmp_path / "a", model="denseclip_maskrcnn_rn50", iters=1)
    masks_off = [o for o in masks_off if not o.startswith("data.with_masks")]
    with pytest.raises(ValueError, match="with_masks"):
        train(load_config(None, masks_off), progress=False)
    segmentor = detection_overrides(
        shapes_root,
        tmp_path / "b",
        iters=1,
        **{"model.name": "denseclip_fpn_rn50", "model.overrides": '{"clip_model": "tiny-RN"}'},
    )
    with pytest.raises(ValueError, match="do not match"):
        train(load_config(None, segmentor), progress=False)


def test_unknown_category_is_an_error_or_a_counted_skip(shapes_root, tmp_path, tiny_configs):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(shapes_root, root)
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="99"):
        train(load_config(None, detection_overrides(root, tmp_path / "r1", iters=1)), progress=False)
    result = train(load_config(None, detection_overrides(root, tmp_path / "r2", iters=1, **{"data.skip_bad": True})))
    assert result["finished"]
    assert "unknown_category" in (tmp_path / "r2" / "train.log").read_text()
