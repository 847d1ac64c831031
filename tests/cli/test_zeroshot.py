"""`clipdense eval-zeroshot` end to end, on a dataset folder the tests write."""

import json

import numpy as np
from PIL import Image

from clipdense.cli import main

FAST = ["--templates", "single", "--short-side", "64", "--window", "64", "--stride", "32"]


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _write_ade(root, n=3):
    rng = np.random.default_rng(0)
    for split in ("validation",):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
                root / "images" / split / f"ADE_val_{i:08d}.jpg"
            )
            Image.fromarray(rng.integers(0, 151, (40, 56), dtype=np.uint8)).save(
                root / "annotations" / split / f"ADE_val_{i:08d}.png"
            )


def test_eval_zeroshot_reports_metrics(tiny_checkpoints, tmp_path, capsys):
    root = tmp_path / "ADEChallengeData2016"
    _write_ade(root)
    out = tmp_path / "report.json"
    ckpt = tiny_checkpoints["tiny-RN"][1]["state_dict"]
    code, stdout, err = _run(
        capsys, "eval-zeroshot", "--dataset", "ade20k", "--root", root, "--model", "tiny-RN", "--pretrained", ckpt,
        "--out", out, *FAST,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["images"] == 3 and report["dataset"] == "ade20k"
    assert len(report["per_class_iou"]) == 150
    for key in ("miou", "macc", "aacc", "fwiou"):
        assert 0 <= report[key] <= 100
        assert key.replace("miou", "mIoU") in stdout or key in stdout.lower()


def test_eval_zeroshot_missing_root(tmp_path, capsys):
    code, _, err = _run(capsys, "eval-zeroshot", "--dataset", "voc21", "--root", tmp_path / "nope", "--random-weights")
    assert code == 1 and "VOC" in err


def test_eval_zeroshot_default_report_goes_under_outputs(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    """Not into the current folder, and a partial run (--limit) does not overwrite the full report."""
    root = tmp_path / "ADEChallengeData2016"
    _write_ade(root)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ckpt = tiny_checkpoints["tiny-RN"][1]["state_dict"]
    args = ["eval-zeroshot", "--dataset", "ade20k", "--root", root, "--model", "tiny-RN", "--pretrained", ckpt, *FAST]
    assert _run(capsys, *args)[0] == 0
    assert _run(capsys, *args, "--limit", "2")[0] == 0
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]
    assert json.loads((work / "outputs" / "eval_ade20k_maskclip.json").read_text())["images"] == 3
    assert json.loads((work / "outputs" / "eval_ade20k_maskclip_limit2.json").read_text())["images"] == 2


def test_eval_zeroshot_on_shapesworld_uses_the_shipped_clip(tmp_path, capsys):
    """No model flags: the shipped ShapesWorld CLIP (offline), with its own settings, as `segment` and `demo`."""
    from clipdense.data.shapesworld import generate_dataset

    root = generate_dataset(tmp_path / "sw", 1, 2, seed=5, fmt="semantic", image_size=64, progress=False)
    out = tmp_path / "sw.json"
    code, _, err = _run(capsys, "eval-zeroshot", "--dataset", "shapesworld", "--root", root, "--split", "validation",
                        "--out", out)  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["images"] == 2 and report["settings"]["model"].startswith("ShapesCLIP-RN")
    assert report["settings"]["templates"] == "single"
