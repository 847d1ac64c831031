"""Cache-adapter runs on a tiny CoOp-layout folder: Tip-Adapter learns from its cache, Tip-Adapter-F resumes bit for
bit, PLOT-Adapter builds on a PLOT run and refuses one that does not fit; the run folder serves eval and classify."""

import json

import pytest
import torch
from safetensors.torch import load_file

from clipdense.config import ConfigError
from clipdense.evaluation.fewshot import evaluate_fewshot_run
from clipdense.inference.fewshot import load_fewshot_config, load_fewshot_run
from clipdense.runs import latest_checkpoint
from clipdense.training.fewshot import train_fewshot
from fewshot_data import write_split_dataset


def cfg_of(root, run_dir, model, **extra):
    base = {
        "name": "tiny_adapter",
        "run_dir": str(run_dir),
        "model.name": model,
        "model.pretrained": "null",
        "model.overrides": json.dumps({"clip_model": "tiny-ViT", **extra.pop("model_overrides", {})}),
        "data.dataset": "caltech101",
        "data.root": str(root),
        "data.shots": 8,
        "data.workers": 0,
        "data.crop_scale": "[0.5, 1.0]",
        "train.batch_size": 8,
        "train.device": "cpu",
        "train.log_every": 2,
        "adapter.augment_epochs": 2,
        "adapter.search_step": "[8, 8]",
        **extra,
    }
    return load_fewshot_config(None, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_data")
    write_split_dataset(root, "caltech101", per_class=(8, 4, 6))
    return root


@pytest.fixture(scope="module")
def plot_run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("plot") / "run"
    options = {"n_prompts": 2, "n_ctx": 4}
    cfg = cfg_of(data, run, "plot_vitb16", model_overrides=options, **{"train.epochs": 2, "optim.lr": 0.05})
    assert train_fewshot(cfg, progress=False)["finished"]
    return run


def test_tip_adapter_learns_from_its_cache(data, tmp_path):
    """Random CLIP text: the zero-shot classifier is at chance; the cache of 8 shots per colour classifies the test
    images, after a search on the 12 validation images whose result the run records."""
    run = tmp_path / "tip"
    result = train_fewshot(cfg_of(data, run, "tip_adapter_rn50"), progress=False)
    assert result["finished"] and result["step"] == 0 and result["val_acc"] == 100.0
    search = json.loads((run / "search.json").read_text())
    assert search["val_images"] == 12 and search["alpha"] == result["alpha"] and search["split"] == "full"
    grid = [i * (12 - 0.1) / 8 + 0.1 for i in range(8)]  # Caltech101's beta scale 12
    assert search["beta"] in grid
    model, cfg = load_fewshot_run(run)
    assert float(model.cache.alpha) == pytest.approx(result["alpha"]) and model.cache.values.shape == (24, 3)
    assert model.cache.values.sum(dim=0).tolist() == [8.0, 8.0, 8.0]  # one-hot labels, 8 shots each
    torch.testing.assert_close(model.cache.keys.weight.norm(dim=-1), torch.ones(24))
    assert cfg.model.overrides["templates"] == ["a photo of a {}."] and cfg.model.overrides["cache_size"] == 24
    report = evaluate_fewshot_run(run, progress=False)
    assert report.num_images == 18 and report.top1 >= 80.0  # chance: 33%
    zero_shot = model.base_logits(model.features(torch.zeros(1, 3, 32, 32)))
    assert zero_shot.shape == (1, 3)


def test_tip_adapter_f_stops_and_resumes_bit_for_bit(data, tmp_path):
    full = train_fewshot(cfg_of(data, tmp_path / "full", "tip_adapter_f_rn50", **{"train.epochs": 3}), progress=False)
    assert full["finished"] and full["step"] == 9 and len(full["losses"]) == 9
    cfg = cfg_of(data, tmp_path / "split", "tip_adapter_f_rn50", **{"train.epochs": 3})
    stopped = train_fewshot(cfg, progress=False, stop_after=4)
    assert not stopped["finished"] and stopped["step"] == 4
    changed = cfg_of(data, tmp_path / "split", "tip_adapter_f_rn50", **{"train.epochs": 3, "adapter.lr": 0.01})
    with pytest.raises(ValueError, match="config changed"):
        train_fewshot(changed, resume=True, progress=False)
    cfg = cfg_of(data, tmp_path / "split", "tip_adapter_f_rn50", **{"train.epochs": 3})
    resumed = train_fewshot(cfg, resume=True, progress=False)
    assert resumed["finished"] and stopped["losses"] + resumed["losses"] == full["losses"]
    assert (resumed["alpha"], resumed["beta"], resumed["val_acc"]) == (full["alpha"], full["beta"], full["val_acc"])
    a = load_file(str(latest_checkpoint(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "split") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics if "val_acc" in m] == [0, 1, 2]  # one validation per epoch, none repeated
    again = train_fewshot(cfg_of(data, tmp_path / "split", "tip_adapter_f_rn50", **{"train.epochs": 3}), resume=True,
                          progress=False)  # fmt: skip
    assert again["finished"] and again["losses"] == []


def test_plot_adapter_builds_on_a_plot_run(data, tmp_path, plot_run):
    run = tmp_path / "pa"
    cfg = cfg_of(data, run, "plot_adapter_rn50", **{"train.epochs": 2, "adapter.plot_run": str(plot_run)})
    result = train_fewshot(cfg, progress=False)
    assert result["finished"] and result["step"] == 6
    model, cfg = load_fewshot_run(run)
    plot, _ = load_fewshot_run(plot_run)
    torch.testing.assert_close(model.plot.prompt_learner.ctx, plot.prompt_learner.ctx)  # the PLOT run's prompts
    assert model.cache.keys.weight.shape == (2 * 24, model.cache.clip_weights.shape[1])  # two key sets
    assert cfg.model.overrides["plot_options"] == {"n_prompts": 2, "n_ctx": 4}  # the PLOT run's options
    assert model.plot.prompt_learner.n_prompts == 2
    report = evaluate_fewshot_run(run, progress=False)
    assert report.top1 >= 80.0


def test_plot_adapter_refuses_a_plot_run_that_does_not_fit(data, tmp_path, plot_run):
    cfg = cfg_of(data, tmp_path / "x", "plot_adapter_rn50", **{"train.seed": 2, "adapter.plot_run": str(plot_run)})
    with pytest.raises(ValueError, match="train.seed: 2 here, 1 there"):
        train_fewshot(cfg, progress=False)
    with pytest.raises(ValueError, match="plot_run"):
        train_fewshot(cfg_of(data, tmp_path / "y", "plot_adapter_rn50"), progress=False)
    tip = tmp_path / "tip"
    train_fewshot(cfg_of(data, tip, "tip_adapter_rn50"), progress=False)
    with pytest.raises(ValueError, match="not a PLOT run"):
        train_fewshot(cfg_of(data, tmp_path / "z", "plot_adapter_rn50", **{"adapter.plot_run": str(tip)}),
                      progress=False)  # fmt: skip


def test_adapter_config_errors(data, tmp_path):
    with pytest.raises(ConfigError, match="select"):
        cfg_of(data, tmp_path, "tip_adapter_f_rn50", **{"adapter.select": "test"})
    with pytest.raises(ConfigError, match="training-free"):
        cfg_of(data, tmp_path, "tip_adapter_rn50", **{"train.epochs": 3})
    with pytest.raises(ConfigError, match="adapter.bogus"):
        cfg_of(data, tmp_path, "tip_adapter_rn50", **{"adapter.bogus": 1})
