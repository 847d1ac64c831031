"""The training engine end to end on a generated dataset: learning, exact resume, DDP parity, bad data,
and the trained run through `clipdense eval`, `segment --checkpoint` and `flops`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipdense.cli import main
from clipdense.config import load_config
from clipdense.data.datasets import build_dataset
from clipdense.evaluation.segmentation import evaluate
from clipdense.runs import latest_checkpoint
from clipdense.training.engine import train
from tiny_models import tiny_overrides, write_colour_dataset


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return write_colour_dataset(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def trained_run(colour_data, tmp_path_factory, tiny_configs):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(None, tiny_overrides(colour_data, run_dir, iters=40))
    result = train(cfg, progress=False)
    return cfg, result


def _miou(model, root):
    from clipdense.config import EvalConfig

    return evaluate(
        model, build_dataset("folder", root, "val"), EvalConfig(mode="whole", short_side=None), progress=False
    ).miou


def test_tiny_denseclip_learns(trained_run, colour_data):
    from clipdense.models.registry import create_model
    from clipdense.runs import build_from_run

    cfg, result = trained_run
    assert result["finished"] and result["step"] == 40
    assert len(result["losses"]) == 40
    torch.manual_seed(cfg.train.seed)
    untrained = create_model(cfg.model.name, class_names=cfg.model.class_names, pretrained=None, clip_model="tiny-RN")
    trained, _ = build_from_run(cfg.run_dir)
    assert trained.text_encoder.text_cache is not None  # inference needs no text encoder
    assert _miou(trained, colour_data) > _miou(untrained.eval(), colour_data) + 10
    run = cfg.resolved_run_dir()
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    info = json.loads((run / "run_info.json").read_text())
    assert info["global_batch_size"] == 4
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    decode = [r["decode"] for r in records]
    assert np.mean(decode[-2:]) < 0.6 * decode[0]


def test_text_encoder_frozen_contexts_and_gamma_train(trained_run, tiny_configs):
    from clipdense.models.registry import create_model

    cfg, _ = trained_run
    torch.manual_seed(cfg.train.seed)
    initial = create_model(cfg.model.name, class_names=cfg.model.class_names, pretrained=None, clip_model="tiny-RN")
    before = initial.state_dict()
    after = load_file(str(latest_checkpoint(cfg.run_dir) / "model.safetensors"))
    text_keys = [k for k in before if k.startswith("text_encoder.") and "contexts" not in k]
    assert text_keys and all(torch.equal(before[k], after[k]) for k in text_keys)
    changed = [k for k in before if ("contexts" in k or k == "gamma") and not torch.equal(before[k], after[k])]
    assert any("contexts" in k for k in changed) and "gamma" in changed


def test_resume_equals_uninterrupted_run(colour_data, tmp_path, tiny_configs):
    full = train(load_config(None, tiny_overrides(colour_data, tmp_path / "a", iters=8)), progress=False)
    cfg = load_config(None, tiny_overrides(colour_data, tmp_path / "b", iters=8))
    first = train(cfg, progress=False, stop_after=3)
    assert not first["finished"] and first["step"] == 3
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, progress=False)
    second = train(cfg, resume=True, progress=False)
    assert second["finished"] and first["losses"] + second["losses"] == full["losses"]
    a = load_file(str(latest_checkpoint(tmp_path / "a") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = load_config(None, tiny_overrides(colour_data, tmp_path / "b", iters=8, **{"optim.lr": 0.5}))
    with pytest.raises(ValueError, match="config changed"):
        train(changed, resume=True, progress=False)


def test_resume_may_lengthen_the_run_turn_on_skip_bad_and_respell_the_root(colour_data, tmp_path, tiny_configs):
    run = tmp_path / "r"
    assert train(load_config(None, tiny_overrides(colour_data, run, iters=3)), progress=False)["finished"]
    respelled = colour_data.parent / ".." / colour_data.parent.name / colour_data.name
    longer = tiny_overrides(respelled, run, iters=5, **{"data.skip_bad": "true", "train.log_every": 1})
    result = train(load_config(None, longer), resume=True, progress=False)
    assert result["finished"] and result["step"] == 5 and len(result["losses"]) == 2
    assert latest_checkpoint(run).name == "step_0000005"
    for change, refused in [({"iters": 4}, "train.iters: 5 -> 4"), ({"optim.lr": 0.5}, "optim.lr: 0.001 -> 0.5")]:
        iters = change.pop("iters", 5)
        with pytest.raises(ValueError, match=refused + r".*lengthen train.iters, turn on data.skip_bad"):
            train(load_config(None, tiny_overrides(colour_data, run, iters=iters, **change)), resume=True,
                  progress=False)  # fmt: skip


def _interrupt_during_forward(monkeypatch, at_calls: set[int]):
    """Send this process a real SIGINT inside the forward pass of the given (1-based) training steps."""
    import signal

    import clipdense.training.engine as engine

    forward, calls = engine._forward, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) in at_calls:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", interrupted)
    return forward


def test_ctrl_c_mid_step_stops_at_the_boundary_and_resumes_exactly(colour_data, tmp_path, tiny_configs, monkeypatch):
    import clipdense.training.engine as engine

    full = train(load_config(None, tiny_overrides(colour_data, tmp_path / "a", iters=8)), progress=False)
    cfg = load_config(None, tiny_overrides(colour_data, tmp_path / "b", iters=8))
    forward = _interrupt_during_forward(monkeypatch, {3})
    first = train(cfg, progress=False)
    assert not first["finished"] and first["step"] == 3 and first["losses"] == full["losses"][:3]
    assert latest_checkpoint(cfg.run_dir).name == "step_0000003"
    monkeypatch.setattr(engine, "_forward", forward)
    second = train(cfg, resume=True, progress=False)
    assert second["finished"] and first["losses"] + second["losses"] == full["losses"]
    a = load_file(str(latest_checkpoint(tmp_path / "a") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_second_ctrl_c_aborts_without_saving(colour_data, tmp_path, tiny_configs, monkeypatch):
    import signal

    cfg = load_config(None, tiny_overrides(colour_data, tmp_path, iters=8, **{"train.ckpt_every": 2}))
    forward = _interrupt_during_forward(monkeypatch, set())

    def twice(*args, **kwargs):  # step 3: the first Ctrl-C asks to stop, the second aborts the step
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(1)
        return forward(*args, **kwargs)

    calls = []
    import clipdense.training.engine as engine

    monkeypatch.setattr(engine, "_forward", twice)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    assert latest_checkpoint(cfg.run_dir).name == "step_0000002"  # nothing written after the last checkpoint
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_damaged_newest_checkpoint_falls_back_to_the_newest_complete_one(colour_data, tmp_path, tiny_configs, caplog):
    full = train(load_config(None, tiny_overrides(colour_data, tmp_path / "a", iters=6)), progress=False)
    cfg = load_config(None, tiny_overrides(colour_data, tmp_path / "b", iters=6, **{"train.ckpt_every": 2}))
    train(cfg, progress=False, stop_after=4)  # checkpoints at steps 2 and 4
    root = cfg.resolved_run_dir() / "checkpoints"
    weights = root / "step_0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    (root / ".step_0000005.partial").mkdir()  # left by a crash while saving
    with caplog.at_level("WARNING", logger="clipdense.runs"):
        assert latest_checkpoint(cfg.run_dir).name == "step_0000002"
    assert "step_0000004: model.safetensors has" in caplog.text
    second = train(cfg, resume=True, progress=False)
    assert second["finished"] and second["losses"] == full["losses"][2:]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004", "step_0000006"]
    a = load_file(str(latest_checkpoint(tmp_path / "a") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(cfg.run_dir) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # `latest` naming a deleted folder, and a state.pt cut short: still the newest complete step
    import shutil

    shutil.rmtree(root / "step_0000006")
    assert latest_checkpoint(cfg.run_dir).name == "step_0000004"
    state = root / "step_0000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        latest_checkpoint(cfg.run_dir)


def test_ddp_two_processes_equal_one_process(colour_data, tmp_path, tiny_configs):
    """2 CPU processes (gloo) x batch 2 == 1 process x batch 4 (BN frozen, no dropout, no ignored pixels)."""
    common = {"train.freeze_bn": "true", "data.ratio_range": "[1.0, 1.0]", "data.scale": "[48, 48]",
              "data.crop_size": 48, "model_overrides": {"dropout": 0.0, "context_decoder_dropout": 0.0}}  # fmt: skip
    one = load_config(None, tiny_overrides(colour_data, tmp_path / "one", iters=3, **dict(common)))
    train(one, progress=False)
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, pathlib\n"
        f"sys.path.insert(0, {str(os.path.dirname(__file__) + '/..')!r})\n"
        "from tiny_models import register_tiny_configs\n"
        "import tempfile; register_tiny_configs(pathlib.Path(tempfile.mkdtemp()))\n"
        "from clipdense.config import load_config\n"
        "from clipdense.training.engine import train\n"
        "train(load_config(None, sys.argv[1:]), progress=False)\n"
    )
    two = tiny_overrides(colour_data, tmp_path / "two", iters=3, **{**common, "train.batch_size": 2})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(script),
        *two,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(latest_checkpoint(tmp_path / "one") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "two") / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    assert json.loads((tmp_path / "two" / "run_info.json").read_text())["global_batch_size"] == 4


def test_bad_training_data_error_or_counted_skip(colour_data, tmp_path, tiny_configs):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(colour_data, root)
    (root / "images" / "001.png").write_bytes(b"broken")
    cfg = load_config(None, tiny_overrides(root, tmp_path / "strict", iters=4))
    with pytest.raises(ValueError, match="001.png"):
        train(cfg, progress=False)
    cfg = load_config(None, tiny_overrides(root, tmp_path / "skip", iters=4, **{"data.skip_bad": "true"}))
    result = train(cfg, progress=False)
    assert result["finished"] and result["skipped"] >= 1


def test_cli_eval_segment_flops_check(trained_run, colour_data, tmp_path, capsys):
    cfg, _ = trained_run
    out = tmp_path / "eval.json"
    assert main(["eval", str(cfg.run_dir), "--out", str(out), "--mode", "whole"]) == 0
    report = json.loads(out.read_text())
    assert report["dataset"] == "folder" and len(report["per_class_iou"]) == 3
    image = colour_data / "images" / "011.png"
    assert main(["segment", str(image), "--checkpoint", str(cfg.run_dir), "--out", str(tmp_path / "seg")]) == 0
    labels = np.array(Image.open(tmp_path / "seg" / "011_labels.png"))
    assert labels.shape == (48, 48) and labels.max() <= 2
    assert json.loads((tmp_path / "seg" / "011.json").read_text())["classes"] == [
        "red thing",
        "green thing",
        "blue thing",
    ]
    closed = ["segment", str(image), "--checkpoint", str(cfg.run_dir), "--classes", "dog", "--out", str(tmp_path / "x")]
    assert main(closed) == 1 and "fixed classes" in capsys.readouterr().err  # DenseCLIP is closed-set
    assert main(["check-dataset", "--dataset", "folder", "--root", str(colour_data)]) == 0
    assert "red thing" in capsys.readouterr().out
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  name: denseclip_fpn_rn50\n  overrides:\n    clip_model: tiny-RN\n")
    assert main(["flops", str(config), "--size", "64", "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    assert "excluded (as the paper counts)" in out and "GFLOPs" in out


def test_eval_multiscale_flip_and_sliding_window(trained_run, colour_data):
    from dataclasses import replace

    from clipdense.inference import predict_probs
    from clipdense.runs import build_from_run

    cfg, _ = trained_run
    model, _ = build_from_run(cfg.run_dir)
    image = build_dataset("folder", colour_data, "val")[0]["image"]
    whole = predict_probs(model, image, replace(cfg.eval, mode="whole"))
    one_window = predict_probs(model, image, replace(cfg.eval, mode="slide", crop=64, stride=32))
    torch.testing.assert_close(whole, one_window)  # a window covering the image is the whole image
    slid = predict_probs(model, image, replace(cfg.eval, mode="slide", crop=32, stride=16))
    aug = predict_probs(model, image, replace(cfg.eval, short_side=48, scales=(0.5, 1.0, 1.5), flip=True))
    for probs in (slid, aug):
        assert probs.shape == (3, 48, 48)
        torch.testing.assert_close(probs.sum(0), torch.ones(48, 48))


def test_tiny_ppl_learns_and_reports_uncertainty(colour_data, tmp_path, tiny_configs, capsys):
    from dataclasses import replace

    from clipdense.inference import predict_probs
    from clipdense.models.registry import create_model
    from clipdense.runs import build_from_run

    cfg = load_config(None, tiny_overrides(colour_data, tmp_path / "ppl", model="ppl_fpn_rn50", iters=30))
    result = train(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "ppl" / "metrics.jsonl").read_text().splitlines()]
    assert {"decode", "prob", "div", "kl"} <= set(records[0])
    assert records[-1]["loss"] < 0.5 * records[0]["loss"] and result["finished"]
    torch.manual_seed(cfg.train.seed)
    untrained = create_model("ppl_fpn_rn50", class_names=cfg.model.class_names, pretrained=None, clip_model="tiny-RN")
    model, _ = build_from_run(cfg.run_dir)
    assert _miou(model, colour_data) > _miou(untrained.eval(), colour_data) + 10
    image = build_dataset("folder", colour_data, "val")[0]["image"]
    for mc in (True, False):
        model.mc_inference = mc
        probs = predict_probs(model, image, replace(cfg.eval, mode="whole"))
        torch.testing.assert_close(probs.sum(0), torch.ones(48, 48))
    model.mc_inference = True
    out = tmp_path / "seg"
    args = ["segment", str(colour_data / "images" / "010.png"), "--checkpoint", str(cfg.run_dir), "--out", str(out)]
    assert main([*args, "--uncertainty"]) == 0
    assert Image.open(out / "010_uncertainty.png").size == (48, 48)
    report = json.loads((out / "010.json").read_text())["uncertainty"]
    assert report["image"] > 0 and set(report["class_sigma"]) == {"red thing", "green thing", "blue thing"}
    assert main(["segment", str(colour_data / "images" / "010.png"), "--checkpoint", str(tmp_path / "nope")]) == 1


def test_segment_checkpoint_applies_or_refuses_each_flag(trained_run, colour_data, tmp_path, capsys):
    """Inference flags reach a trained run's eval settings; training-free ones are refused, not ignored."""
    cfg, _ = trained_run
    base = ["segment", str(colour_data / "images" / "011.png"), "--checkpoint", str(cfg.run_dir)]
    out = tmp_path / "seg"
    assert main([*base, "--whole", "--short-side", "0", "--out", str(out)]) == 0
    settings = json.loads((out / "011.json").read_text())["settings"]
    assert settings["mode"] == "whole" and settings["short_side"] is None
    assert main([*base, "--window", "32", "--stride", "16", "--out", str(out)]) == 0
    settings = json.loads((out / "011.json").read_text())["settings"]
    assert (settings["mode"], settings["crop"], settings["stride"]) == ("slide", 32, 16)
    capsys.readouterr()
    for flags in (["--model", "RN50"], ["--mode", "sclip"], ["--templates", "single", "--background-threshold", "0.3"]):
        assert main([*base, *flags, "--out", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flags[0] in err[0] and "only apply without --checkpoint" in err[0], err
    assert not (tmp_path / "refused").exists()


def test_partial_eval_keeps_the_full_report(trained_run, capsys):
    cfg, _ = trained_run
    run = cfg.resolved_run_dir()
    assert main(["eval", str(run), "--mode", "whole"]) == 0
    full = run / "eval_folder_val_whole.json"
    before = full.read_text()
    assert main(["eval", str(run), "--mode", "whole", "--limit", "2"]) == 0
    assert main(["eval", str(run), "--aug", "--limit", "1"]) == 0
    assert full.read_text() == before
    assert json.loads((run / "eval_folder_val_whole_limit2.json").read_text())["settings"]["limit"] == 2
    assert (run / "eval_folder_val_aug_limit1.json").is_file()
    capsys.readouterr()
    assert main(["eval", str(run), "--limit", "0"]) == 2
    assert "--limit: must be > 0" in capsys.readouterr().err
