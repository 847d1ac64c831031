"""The training engine on the edges of a run: bad samples named in train.log, resuming a finished run,
device strings, throughput of partial log intervals, configs refused before a run directory exists,
and a stop on the last step."""

import json
import os
import shutil
import signal
from types import SimpleNamespace

import pytest
import torch

import clipdense.training.engine as engine
from clipdense.config import load_config
from clipdense.runs import latest_checkpoint
from clipdense.training.engine import train
from tiny_models import tiny_overrides, write_colour_dataset


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return write_colour_dataset(tmp_path_factory.mktemp("colours"))


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _count_checkpoints(monkeypatch) -> list[int]:
    """The steps engine.train saves checkpoints at, in order."""
    save, steps = engine.save_checkpoint, []

    def counted(run_dir, model, state, step):
        steps.append(step)
        return save(run_dir, model, state, step)

    monkeypatch.setattr(engine, "save_checkpoint", counted)
    return steps


@pytest.mark.parametrize("workers", [0, 1])
def test_skipped_samples_are_named_once_in_train_log(colour_data, tmp_path, tiny_configs, workers):
    root = tmp_path / "data"
    shutil.copytree(colour_data, root)
    (root / "images" / "001.png").write_bytes(b"broken")  # a training sample: seen once per epoch of 2 steps
    overrides = {"data.skip_bad": "true", "data.workers": workers, "train.log_every": 1}
    result = train(load_config(None, tiny_overrides(root, tmp_path / "run", iters=4, **overrides)), progress=False)
    assert result["finished"] and result["skipped"] == 2  # 4 steps = 2 epochs
    assert _records(tmp_path / "run")[-1]["skipped"] == 2
    named = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if "001.png" in line]
    assert len(named) == 1 and "could not decode image" in named[0]


def test_resume_of_a_finished_run_changes_nothing(colour_data, tmp_path, tiny_configs, capsys, monkeypatch):
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(colour_data, run, iters=3, **{"train.eval_every": 1000}))
    assert train(cfg, progress=False)["finished"]
    files = ("metrics.jsonl", "run_info.json", "config.yaml", "train.log")
    before = {name: (run / name).read_bytes() for name in files}
    assert [r["step"] for r in _records(run)] == [3, 3] and "val_miou" in _records(run)[-1]
    saves = _count_checkpoints(monkeypatch)
    result = train(cfg, resume=True, progress=False)
    assert result["finished"] and result["step"] == 3 and result["losses"] == [] and saves == []
    assert {name: (run / name).read_bytes() for name in files} == before
    assert f"already finished (step 3 of 3): {run}" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="cuda:1 exists here")
@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda:1", "train.device='cuda:1'.*available here: auto, cpu"), ("gpu", "train.device='gpu'.*not a device"),
     ("cuda:x", "train.device='cuda:x'"), ("meta", "train.device='meta'")],
)  # fmt: skip
def test_bad_device_is_refused_before_the_run_directory(colour_data, tmp_path, tiny_configs, device, message):
    cfg = load_config(None, tiny_overrides(colour_data, tmp_path / "run", iters=2, **{"train.device": device}))
    with pytest.raises(ValueError, match=message):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_device_strings():
    assert engine._distributed("cpu")[2] == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert engine._distributed("auto")[2] == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device='cuda'.*CUDA is not available"):
            engine._distributed("cuda")


def test_images_per_s_counts_the_steps_of_partial_intervals(colour_data, tmp_path, tiny_configs, monkeypatch):
    clock = [0.0]  # one second per step, so images_per_s is the global batch (4) whatever the interval
    forward = engine._forward

    def one_second(*args, **kwargs):
        clock[0] += 1.0
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", one_second)
    monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    cfg = load_config(None, tiny_overrides(colour_data, tmp_path / "run", iters=12))  # log_every 5
    assert not train(cfg, progress=False, stop_after=3)["finished"]
    assert train(cfg, resume=True, progress=False)["finished"]
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records] == [5, 10, 12]  # intervals of 2, 5 and 2 steps
    assert [r["images_per_s"] for r in records] == [4.0, 4.0, 4.0]


def test_configs_that_cannot_run_leave_no_run_directory(colour_data, tmp_path, tiny_configs):
    typo = tiny_overrides(colour_data, tmp_path / "typo", iters=2, model_overrides={"no_such_option": 1})
    with pytest.raises((TypeError, ValueError), match="no_such_option"):
        train(load_config(None, typo), progress=False)
    assert not (tmp_path / "typo").exists()
    big = tiny_overrides(colour_data, tmp_path / "big", iters=2, **{"train.batch_size": 16})  # 8 training samples
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(load_config(None, big), progress=False)
    assert not (tmp_path / "big").exists()


def test_stop_on_the_last_step_finishes_the_run_with_one_checkpoint(colour_data, tmp_path, tiny_configs, monkeypatch):
    saves = _count_checkpoints(monkeypatch)
    cfg = load_config(None, tiny_overrides(colour_data, tmp_path / "a", iters=3))
    result = train(cfg, progress=False, stop_after=3)
    assert result["finished"] and result["step"] == 3 and saves == [3]
    assert latest_checkpoint(tmp_path / "a").name == "step_0000003"

    forward, calls = engine._forward, []

    def sigterm_on_last_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", sigterm_on_last_step)
    saves.clear()
    cfg = load_config(None, tiny_overrides(colour_data, tmp_path / "b", iters=3, **{"train.eval_every": 1000}))
    result = train(cfg, progress=False)
    assert result["finished"] and result["step"] == 3 and saves == [3]
    assert [r["step"] for r in _records(tmp_path / "b")] == [3]  # the final evaluation is left to `clipdense eval`
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
