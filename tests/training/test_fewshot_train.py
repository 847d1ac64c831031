"""Few-shot training: a tiny CoOp/PLOT run learns, and a stopped run resumes bit for bit."""

import json

import pytest
import torch

from clipdense.evaluation.fewshot import evaluate_fewshot_run
from clipdense.inference.fewshot import (
    FewShotOptimConfig,
    epoch_lr,
    load_fewshot_config,
    load_fewshot_run,
    official_batch_size,
    official_epochs,
)
from clipdense.training.fewshot import train_fewshot
from fewshot_data import write_split_dataset


def tiny_cfg(root, run_dir, model="coop_rn50", epochs=12, **extra):
    clip = "tiny-ViT" if "vit" in model else "tiny-RN"
    overrides = {"clip_model": clip, "class_specific": True, **extra.pop("model_overrides", {})}
    base = {
        "name": "tiny_fewshot",
        "run_dir": str(run_dir),
        "model.name": model,
        "model.pretrained": "null",
        "model.overrides": json.dumps(overrides),
        "data.dataset": "caltech101",
        "data.root": str(root),
        "data.shots": 8,
        "data.workers": 0,
        "data.crop_scale": "[0.5, 1.0]",
        "optim.lr": 0.05,
        "train.epochs": epochs,
        "train.batch_size": 8,
        "train.device": "cpu",
        "train.log_every": 3,
        "train.ckpt_every": 1000,
        **extra,
    }
    return load_fewshot_config(None, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot_data")
    write_split_dataset(root, "caltech101", per_class=(8, 2, 6))
    return root


@pytest.mark.parametrize("model", ["coop_vitb16", "plot_vitb16"])
def test_a_tiny_run_learns(data, tmp_path, model):
    """3 colour classes, 8 shots, a random tiny CLIP ViT (whose features tell the colours apart; the random tiny
    ResNet's global features are all but constant), class-specific contexts: accuracy rises from chance to 80%+."""
    cfg = tiny_cfg(data, tmp_path / "run", model)
    result = train_fewshot(cfg, progress=False)
    assert result["finished"] and result["step"] == 12 * 3
    first, last = sum(result["losses"][:3]) / 3, sum(result["losses"][-3:]) / 3
    assert last < 0.5 * first
    report = evaluate_fewshot_run(tmp_path / "run", progress=False)
    assert report.num_images == 18 and report.top1 >= 80.0  # chance: 33%
    assert len(report.per_class) == 3
    _, cfg_loaded = load_fewshot_run(tmp_path / "run")
    assert cfg_loaded.model.class_names == ["red thing", "green thing", "blue thing"]


def test_stop_and_resume_is_bit_exact(data, tmp_path):
    full = train_fewshot(tiny_cfg(data, tmp_path / "full", epochs=2), progress=False)
    stopped = train_fewshot(tiny_cfg(data, tmp_path / "split", epochs=2), progress=False, stop_after=4)
    assert not stopped["finished"] and stopped["step"] == 4
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_fewshot(tiny_cfg(data, tmp_path / "split", epochs=2), progress=False)
    with pytest.raises(ValueError, match="config changed"):
        train_fewshot(tiny_cfg(data, tmp_path / "split", epochs=2, **{"optim.lr": 0.01}), resume=True, progress=False)
    resumed = train_fewshot(tiny_cfg(data, tmp_path / "split", epochs=2), resume=True, progress=False)
    assert resumed["finished"] and stopped["losses"] + resumed["losses"] == full["losses"]
    a, _ = load_fewshot_run(tmp_path / "full")
    b, _ = load_fewshot_run(tmp_path / "split")
    assert torch.equal(a.prompt_learner.ctx, b.prompt_learner.ctx)


@pytest.mark.parametrize("model", ["coop_rn50", "cocoop_rn50"])
def test_pretrained_runs_save_only_the_contexts(tmp_path, model):
    """With loadable CLIP weights (the shipped ShapesWorld CLIP) a checkpoint holds the prompt learner (and CoCoOp's
    meta-net) only, and loading the run restores them."""
    from safetensors import safe_open

    from clipdense.data.fewshot import LAYOUTS

    root = tmp_path / "data"
    write_split_dataset(root, "shapesworld", per_class=(2, 1, 1), size=128)
    overrides = ["model.pretrained=shapesworld", 'model.overrides={"clip_model": "ShapesCLIP-RN"}',
                 "train.epochs=1", "data.shots=1", f"model.name={model}"]  # fmt: skip
    cfg = load_fewshot_config(None, [f"run_dir={tmp_path / 'run'}", "data.dataset=shapesworld", f"data.root={root}",
                                     "data.workers=0", "train.device=cpu", *overrides])  # fmt: skip
    assert LAYOUTS["shapesworld"].folder == "shapesworld_fewshot"
    assert train_fewshot(cfg, progress=False)["finished"]
    (folder,) = (tmp_path / "run" / "checkpoints").glob("step_*")
    meta = [f"meta_net.linear{i}.{p}" for i in (1, 2) for p in ("bias", "weight")] if model == "cocoop_rn50" else []
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == [*meta, "prompt_learner.ctx", "prompt_learner.token_ids"]
        saved = {k: f.get_tensor(k) for k in f.keys()}
    loaded, _ = load_fewshot_run(tmp_path / "run")
    for key, value in saved.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert (loaded.text_cache is None) == (model == "cocoop_rn50")  # CoCoOp's text features depend on the image


def test_base_to_new(tmp_path, data):
    """Train on the base classes, evaluate on the new ones with the same contexts (CoCoOp's setting)."""
    root = tmp_path / "data"
    write_split_dataset(root, "shapesworld", per_class=(2, 1, 2), size=128)
    cfg = load_fewshot_config(None, [f"run_dir={tmp_path / 'run'}", "data.dataset=shapesworld", f"data.root={root}",
                                     "data.workers=0", "train.device=cpu", "model.pretrained=shapesworld",
                                     'model.overrides={"clip_model": "ShapesCLIP-RN"}', "model.name=cocoop_rn50",
                                     "train.epochs=1", "data.shots=2", "data.subsample_classes=base"])  # fmt: skip
    assert train_fewshot(cfg, progress=False)["finished"]
    trained = load_fewshot_config(tmp_path / "run" / "config.yaml")
    assert trained.model.class_names == ["red thing", "green thing"]  # ceil(3 / 2) base classes
    base = evaluate_fewshot_run(tmp_path / "run", progress=False)
    new = evaluate_fewshot_run(tmp_path / "run", progress=False, classes="new")
    assert base.class_names == trained.model.class_names and base.num_images == 4
    assert new.class_names == ["blue thing"] and new.num_images == 2
    model, _ = load_fewshot_run(tmp_path / "run")
    other, _ = load_fewshot_run(tmp_path / "run", class_names=["blue thing"])
    assert torch.equal(model.prompt_learner.ctx, other.prompt_learner.ctx)
    assert torch.equal(model.meta_net.linear1.weight, other.meta_net.linear1.weight)
    assert other.prompt_learner.class_names == ["blue thing"]
    # Class-specific contexts and random CLIP weights do not carry over to other classes.
    csc = [f"run_dir={tmp_path / 'csc'}", "model.name=coop_rn50",
           'model.overrides={"clip_model": "ShapesCLIP-RN", "class_specific": true}']  # fmt: skip
    assert train_fewshot(load_fewshot_config(tmp_path / "run" / "config.yaml", csc), progress=False)["finished"]
    with pytest.raises(ValueError, match="class-specific"):
        load_fewshot_run(tmp_path / "csc", class_names=["blue thing"])
    assert train_fewshot(tiny_cfg(data, tmp_path / "random", epochs=1), progress=False)["finished"]
    with pytest.raises(ValueError, match="random CLIP weights"):
        load_fewshot_run(tmp_path / "random", class_names=["blue thing"])


def test_recipe_rules():
    assert [official_epochs(k, "dtd") for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert official_epochs(16, "imagenet") == 50
    assert official_epochs(16, "imagenet", "cocoop_vitb16") == 10 and official_batch_size("cocoop_vitb16", "dtd") == 1
    assert official_batch_size("coop_rn50", "dtd") == 32
    assert official_batch_size("plot_rn50", "dtd") == 128 and official_batch_size("plot_rn50", "stanford_cars") == 32
    cfg = FewShotOptimConfig()
    lrs = [epoch_lr(e, cfg, 50) for e in range(50)]
    assert lrs[0] == 1e-5 and lrs[1] == 0.002  # warm-up epoch, then the cosine starts at the base lr
    assert lrs[26] == pytest.approx(0.001) and all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))
