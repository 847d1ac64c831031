"""Bad command lines and configs: one line on stderr naming the input and what is allowed, exit status 2
(usage) or 1 (failed work / unexpected error), and nothing left behind."""

import os
from pathlib import Path

import pytest
import torch

import clipdense.cli.common as common
from clipdense.cli import main

IMAGE_FLAGS = ["--random-weights", "--model", "tiny-RN", "--classes", "a, b"]


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--short-side", "-5"], "argument --short-side: must be >= 0, got -5"),
        (["--window", "0"], "argument --window: must be > 0, got 0"),
        (["--stride", "x"], "argument --stride: expected an integer, got 'x'"),
        (["--logit-scale", "nan"], "argument --logit-scale: expected a number, got 'nan'"),
        (["--background-threshold", "1.5"], "argument --background-threshold: must be in [0, 1], got 1.5"),
        (["--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    ],
)
def test_bad_flag_values_are_one_line_with_exit_status_2(tmp_path, capsys, flags, message):
    code = main(["segment", str(tmp_path / "x.png"), *IMAGE_FLAGS, *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("clipdense segment: error:") and message in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "tpu", "banana"])
def test_device_this_machine_lacks(tmp_path, capsys, device, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the device is checked before any model is loaded")

    monkeypatch.setattr(common, "build_predictor", no_model)
    code, _, err = _run(capsys, "segment", tmp_path / "x.png", *IMAGE_FLAGS, "--device", device)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"clipdense: error: --device {device}:"), err
    assert "cpu" in err[0]


def test_out_that_cannot_be_a_folder(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    """--out a file, under a file, or in a read-only folder: refused before the model is loaded."""
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (32, 24)).save(image)
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    loaded = []
    monkeypatch.setattr(common, "build_predictor", lambda args: loaded.append(args))
    cases = {a_file: "is a file, not a folder", a_file / "sub": "is a file, so nothing can be written under it"}
    for out, message in cases.items():
        code, _, err = _run(capsys, "segment", image, *IMAGE_FLAGS, "--out", out)
        assert code == 2 and len(err) == 1 and message in err[0], err
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(common.os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    code, _, err = _run(capsys, "segment", image, *IMAGE_FLAGS, "--out", read_only / "new" / "deeper")
    assert code == 2 and f"no permission to write in {read_only}" in err[0]
    assert not loaded and not (read_only / "new").exists()


def test_eval_zeroshot_out_under_a_file(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    code, _, err = _run(
        capsys, "eval-zeroshot", "--dataset", "ade20k", "--root", tmp_path, "--random-weights", "--out",
        a_file / "report.json",
    )  # fmt: skip
    assert code == 2 and len(err) == 1 and "is a file, so nothing can be written under it" in err[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.precision=fp8", "train.precision='fp8' is not allowed: use one of fp32, bf16, fp16"),
        ("train.iters=0", "train.iters=0 is not allowed: it must be > 0"),
        ("train.batch_size=-2", "train.batch_size=-2 is not allowed: it must be > 0"),
        ("data.workers=-1", "data.workers=-1 is not allowed: it must be >= 0"),
        ("eval.mode=fast", "eval.mode='fast' is not allowed: use one of slide, whole"),
        ("train.seed={bad", "override 'train.seed={bad': the value is not valid YAML"),
        ("train.iterz=5", "unknown config key(s) train.iterz"),
        ("model.overrides.clip_modle=tiny-RN", "model denseclip_fpn_rn50 has no option 'clip_modle'"),
    ],
)
def test_invalid_config_is_one_line_and_creates_no_run_directory(tmp_path, capsys, override, message):
    from tiny_models import write_colour_dataset

    data = write_colour_dataset(tmp_path / "data")
    config = tmp_path / "run.yaml"
    run_dir = tmp_path / "run"
    config.write_text(
        f"run_dir: {run_dir}\nmodel:\n  name: denseclip_fpn_rn50\n  pretrained: null\n  overrides:\n"
        f"    clip_model: tiny-RN\ndata:\n  dataset: folder\n  root: {data}\n  workers: 0\n"
        "train:\n  iters: 2\n  batch_size: 2\n  device: cpu\n"
    )
    code, _, err = _run(capsys, "train", config, override)
    assert code == 2 and len(err) == 1 and err[0].startswith("clipdense: error:") and message in err[0], err
    assert not run_dir.exists()


def test_malformed_yaml_names_file_and_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  iters: 5\n  scales: [1, 2\n")
    code, _, err = _run(capsys, "train", config)
    assert code == 2 and len(err) == 1 and f"{config} line 4: not valid YAML" in err[0], err


def test_unexpected_error_is_one_line_and_traceback_with_verbose(monkeypatch, capsys):
    import clipdense.cli.datasets as datasets

    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(datasets, "cmd_check_dataset", broken)
    args = ["check-dataset", "--dataset", "ade20k", "--root", "nowhere"]
    code, _, err = _run(capsys, *args)
    assert code == 1 and len(err) == 1
    assert err[0].startswith("clipdense: unexpected error: KeyError: 'boom'") and "-v" in err[0], err
    code, _, err = _run(capsys, "-v", *args)
    assert code == 1 and err[0] == "Traceback (most recent call last):" and err[-1].startswith("clipdense: unexpected")


def test_help_shows_defaults(capsys):
    assert main(["segment", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("output folder (default: outputs)", "(default: maskclip)", "(default: 40.0)", "(default: auto"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


def test_every_option_of_every_command_has_a_help_line():
    import argparse

    from clipdense.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction | argparse._VersionAction) and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "clipdense")
    assert not missing, missing


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "local-dir:/models/x", "--pretrained", "w.pt"], "carries its own weights: drop --pretrained"),
        (["--model", "hf-hub:org/x", "--random-weights"], "carries its own weights: drop --random-weights"),
        (["--model", "tiny-RN", "--random-weights", "--pretrained", "w.pt"], "contradict each other"),
    ],
)
def test_weights_flags_that_cannot_apply_are_refused(tmp_path, capsys, flags, message):
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (32, 24)).save(image)
    code, _, err = _run(capsys, "segment", image, "--classes", "a, b", *flags, "--out", tmp_path / "out")
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_segment_records_quick_gelu(tiny_checkpoints, tmp_path, capsys, caplog):
    import json
    import logging

    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (32, 24)).save(image)
    ckpt = tiny_checkpoints["tiny-RN"][1]
    for fmt, flag, expected in (
        ("torchscript", "auto", True),
        ("safetensors", "auto", False),
        ("safetensors", "on", True),
    ):
        code, out, err = _run(
            capsys, "segment", image, "--classes", "a, b", "--model", "tiny-RN", "--pretrained", ckpt[fmt],
            "--quick-gelu", flag, "--out", tmp_path / fmt, "--short-side", "32", "--whole", "--templates", "single",
        )  # fmt: skip
        assert code == 0, err
        assert f"QuickGELU {'on' if expected else 'off'}" in out
        assert json.loads((tmp_path / fmt / "img.json").read_text())["settings"]["quick_gelu"] is expected
    caplog.set_level(logging.INFO, logger="clipdense")
    code, _, err = _run(capsys, "segment", image, "--classes", "a", "--model", "tiny-RN", "--pretrained",
                        ckpt["torchscript"], "--out", tmp_path / "v", "--whole", "--templates", "single")  # fmt: skip
    assert code == 0, err
    assert "tiny-RN: QuickGELU on (OpenAI TorchScript weights)" in caplog.messages
