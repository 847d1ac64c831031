"""`clipdense segment` end to end, on checkpoints the tests write: outputs, one-line errors, the console script."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipdense.cli import main
from tiny_models import TINY_CONFIGS

FAST = ["--templates", "single", "--short-side", "64", "--window", "64", "--stride", "32"]


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(50, 70), (64, 48)]):
        p = tmp_path / "in" / f"img{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["state_dict", "wrapped", "safetensors", "torchscript"])
@pytest.mark.parametrize("name", ["tiny-RN", "tiny-ViT"])
def test_segment_writes_overlay_labels_and_areas(tiny_checkpoints, images, tmp_path, capsys, name, fmt):
    out_dir = tmp_path / "out"
    ckpt = tiny_checkpoints[name][1][fmt]
    code, _, err = _run(
        capsys, "segment", *images, "--classes", "cat, grass, sky", "--model", name, "--pretrained", ckpt,
        "--out", out_dir, *FAST,
    )  # fmt: skip
    assert code == 0, err
    for img in images:
        h, w = Image.open(img).size[::-1]
        labels = np.array(Image.open(out_dir / f"{img.stem}_labels.png"))
        assert labels.shape == (h, w) and labels.max() < 3
        overlay = Image.open(out_dir / f"{img.stem}_overlay.png")
        assert overlay.size[1] >= h and overlay.size[0] > w  # legend panel on the right
        report = json.loads((out_dir / f"{img.stem}.json").read_text())
        assert report["classes"] == ["cat", "grass", "sky"]
        assert sum(a["pixels"] for a in report["areas"].values()) == h * w
        counts = np.bincount(labels.ravel(), minlength=3)
        assert [report["areas"][n]["pixels"] for n in report["classes"]] == counts.tolist()
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{i.stem}{s}" for i in images for s in ("_labels.png", "_overlay.png", ".json")
    )


def _bad(tmp_path, tiny_checkpoints, images):
    ckpt = tiny_checkpoints["tiny-RN"][1]["safetensors"]
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    model = ["--model", "tiny-RN", "--pretrained", ckpt]
    return {  # exit status 2: the command line is wrong; 1: the weights are
        "missing image": (["segment", tmp_path / "nope.png", "--classes", "a, b", *model], "image not found", 2),
        "not an image": (["segment", not_image, "--classes", "a, b", *model], "cannot read image", 2),
        "empty classes": (["segment", images[0], "--classes", " ", *model], "no classes", 2),
        "duplicate classes": (["segment", images[0], "--classes", "cat, dog, Cat", *model], "appears twice", 2),
        "missing checkpoint": (
            ["segment", images[0], "--classes", "a", "--model", "tiny-RN", "--pretrained", tmp_path / "x.pt"],
            "checkpoint file not found",
            1,
        ),
        "offline tag": (["segment", images[0], "--classes", "a", "--model", "RN50"], "pass its path", 1),
        "wrong architecture": (
            ["segment", images[0], "--classes", "a", "--model", "tiny-ViT", "--pretrained", ckpt],
            "do not fit the architecture",
            1,
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["missing image", "not an image", "empty classes", "duplicate classes", "missing checkpoint", "offline tag",
     "wrong architecture"],
)  # fmt: skip
def test_bad_input_one_message_no_output(tiny_checkpoints, images, tmp_path, capsys, case):
    args, message, status = _bad(tmp_path, tiny_checkpoints, images)[case]
    out_dir = tmp_path / "out"
    code, _, err = _run(capsys, *args, "--out", out_dir, *FAST)
    assert code == status
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipdense: error:") and message in lines[0], err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_a_truncated_jpeg_among_several_stops_before_any_output(tiny_checkpoints, images, tmp_path, capsys):
    """PIL's verify() passes a truncated JPEG; every input is decoded up front, so nothing is written."""
    truncated = tmp_path / "in" / "cut.jpg"
    data = images[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    model = ["--model", "tiny-RN", "--pretrained", tiny_checkpoints["tiny-RN"][1]["safetensors"]]
    code, _, err = _run(capsys, "segment", images[0], truncated, images[1], "--classes", "a; b", *model,
                        "--out", out_dir, *FAST)  # fmt: skip
    assert code == 2 and "cut.jpg" in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_console_script_with_local_dir_model(tiny_checkpoints, images, tmp_path):
    """The installed entry point in a fresh process, on an open_clip local-dir model."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    reference = tiny_checkpoints["tiny-ViT"][0]
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIGS["tiny-ViT"]}))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, model_dir / "open_clip_model.safetensors")
    out_dir = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "clipdense.cli", "segment", str(images[0]), "--classes", "cat; grass, lawn",
           "--model", f"local-dir:{model_dir}", "--out", str(out_dir), *FAST]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out_dir / "img0.json").read_text())["classes"] == ["cat", "grass"]


def test_random_weights_need_the_flag(tiny_configs, images, tmp_path, capsys):
    code, _, err = _run(capsys, "segment", images[0], "--classes", "a, b", "--model", "tiny-RN", "--random-weights",
                        "--out", tmp_path / "o", *FAST)  # fmt: skip
    assert code == 0, err
    assert torch.tensor(np.array(Image.open(tmp_path / "o" / "img0_labels.png"))).max() < 2


def test_max_pixels_downscales_with_a_notice(tiny_checkpoints, images, tmp_path, capsys):
    model = ["--model", "tiny-RN", "--pretrained", tiny_checkpoints["tiny-RN"][1]["safetensors"]]
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "segment", *images, "--classes", "a, b", *model, "--out", out_dir, *FAST,
                          "--max-pixels", "1000")  # fmt: skip
    assert code == 0, err
    assert (
        "img0.jpg: 70x50 (0.0035 MP) is above --max-pixels 0.001 MP: downscaled to 37x26, outputs are at that size "
        "(--max-pixels 0 keeps the full size)" in out.splitlines()
    )
    assert "img1.jpg: 48x64 (0.00307 MP)" in out
    assert np.array(Image.open(out_dir / "img0_labels.png")).shape == (26, 37)
    assert json.loads((out_dir / "img0.json").read_text())["size"] == [26, 37]
    code, out, _ = _run(capsys, "segment", images[0], "--classes", "a, b", *model, "--out", out_dir, *FAST,
                        "--max-pixels", "0")  # fmt: skip
    assert code == 0 and "max-pixels" not in out
    assert np.array(Image.open(out_dir / "img0_labels.png")).shape == (50, 70)


def test_negative_max_pixels_is_a_usage_error(images, capsys):
    assert main(["segment", str(images[0]), "--classes", "a, b", "--max-pixels", "-1"]) == 2
    assert "--max-pixels: must be >= 0, got -1" in capsys.readouterr().err


def test_class_embeddings_are_cached_on_disk_unless_no_cache(tiny_checkpoints, images, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIPDENSE_CACHE", str(cache))
    model = ["--model", "tiny-RN", "--pretrained", tiny_checkpoints["tiny-RN"][1]["safetensors"]]
    args = ["segment", images[0], "--classes", "cat, grass", *model, "--out", tmp_path / "out", *FAST]
    assert _run(capsys, *args, "--no-cache")[0] == 0
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))
    assert _run(capsys, *args)[0] == 0
    assert len(list(cache.rglob("*.safetensors"))) == 1


def test_segment_a_folder_equals_one_image_at_a_time(tiny_checkpoints, images, tmp_path, capsys):
    folder = images[0].parent
    Image.fromarray(np.full((40, 90, 3), 200, np.uint8)).save(folder / "img2.png")
    (folder / "notes.txt").write_text("not an image: skipped by suffix")
    model = ["--model", "tiny-RN", "--pretrained", tiny_checkpoints["tiny-RN"][1]["safetensors"], *FAST]
    classes = ["--classes", "cat, grass, sky", "--window-batch", "4"]  # 3 + 2 + 1 windows: batches span images
    code, out, err = _run(capsys, "segment", folder, *classes, *model, "--out", tmp_path / "all")
    assert code == 0, err
    assert "segmented 3 images in" in out and "images/s" in out
    for name in ("img0", "img1", "img2"):
        image = folder / f"{name}.{'png' if name == 'img2' else 'jpg'}"
        code, _, err = _run(capsys, "segment", image, *classes, *model, "--out", tmp_path / "one")
        assert code == 0, err
        batched = np.array(Image.open(tmp_path / "all" / f"{name}_labels.png"))
        assert np.array_equal(batched, np.array(Image.open(tmp_path / "one" / f"{name}_labels.png")))
        assert (
            json.loads((tmp_path / "all" / f"{name}.json").read_text())["areas"]
            == json.loads((tmp_path / "one" / f"{name}.json").read_text())["areas"]
        )
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "segment", empty, *classes, *model)
    assert code == 2 and "holds no images" in err
