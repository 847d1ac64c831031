"""A tiny detector trained through `clipdense train` on ShapesWorld's COCO export; eval, detect, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from clipdense.cli import main
from clipdense.config import load_config
from clipdense.evaluation.detection import evaluate_detection
from clipdense.models.registry import create_model
from clipdense.runs import build_eval_dataset, build_from_run, latest_checkpoint
from clipdense.training.engine import train
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
    assert main(["detect", str(image), "--checkpoint", str(run), "--score-threshold", "2"]) == 2
    assert main(["segment", str(image), "--checkpoint", str(run), "--out", str(tmp_path)]) == 1  # not a segmentor


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


def test_detection_resume_equals_uninterrupted_run(shapes_root, tmp_path, tiny_configs):
    full = train(load_config(None, detection_overrides(shapes_root, tmp_path / "a", iters=5)), progress=False)
    cfg = load_config(None, detection_overrides(shapes_root, tmp_path / "b", iters=5))
    first = train(cfg, progress=False, stop_after=2)
    second = train(cfg, resume=True, progress=False)
    assert second["finished"] and first["losses"] + second["losses"] == full["losses"]
    a = load_file(str(latest_checkpoint(tmp_path / "a") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ppl_mask_rcnn_under_ddp(shapes_root, tmp_path, tiny_configs):
    """2 gloo processes train PPL Mask R-CNN (every trainable parameter gets a gradient: DDP needs no
    find_unused_parameters) and the run evaluates with box and mask AP."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, pathlib, tempfile\n"
        f"sys.path.insert(0, {str(os.path.dirname(__file__) + '/..')!r})\n"
        "from tiny_models import register_tiny_configs\n"
        "register_tiny_configs(pathlib.Path(tempfile.mkdtemp()))\n"
        "from clipdense.config import load_config\n"
        "from clipdense.training.engine import train\n"
        "train(load_config(None, sys.argv[1:]), progress=False)\n"
    )
    args = detection_overrides(
        shapes_root,
        tmp_path / "ddp",
        model="ppl_maskrcnn_rn50",
        iters=2,
        **{"train.batch_size": 2, "train.eval_every": 1, "eval.limit": 2},
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    proc = subprocess.run([*cmd, str(script), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "run_info.json").read_text())["global_batch_size"] == 4
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert {"prob", "div", "kl", "loss_mask"} <= set(next(r for r in records if "loss" in r))
    assert [r["step"] for r in records if "val_segm_AP" in r] == [1, 2]  # COCO AP during and after training
    model, cfg = build_from_run(tmp_path / "ddp")
    report = evaluate_detection(model, build_eval_dataset(cfg), progress=False, limit=2)
    assert report.segm is not None and set(report.segm) == set(report.bbox)


def test_check_dataset_reports_annotation_problems_and_unreadable_images(shapes_root, tmp_path, capsys):
    import shutil

    assert main(["check-dataset", "--dataset", "coco", "--root", str(shapes_root), "--split", "val"]) == 0
    assert "no annotation problems found" in capsys.readouterr().out
    root = tmp_path / "bad"
    shutil.copytree(shapes_root, root)
    (root / "val2017" / "sw_000001.png").write_bytes(b"broken")
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"][0] = -5.0  # partly outside the image: clipped
    data["annotations"][1]["category_id"] = 42
    path.write_text(json.dumps(data))
    assert main(["check-dataset", "--dataset", "coco", "--root", str(root), "--split", "val"]) == 1
    out = capsys.readouterr().out
    assert "clipped: 1" in out and "unknown_category: 1" in out and "sw_000001.png" in out
