"""Experiment configs: YAML inheritance, overrides, type checks, the shipped configs."""

from pathlib import Path

import pytest

from clipdense.config import ExperimentConfig, load_config, parse_overrides, save_config

# configs/fewshot holds few-shot configs (their own schema; tests/cli/test_fewshot_cli.py parses them)
CONFIGS = sorted(
    p
    for p in (Path(__file__).parents[1] / "configs").rglob("*.yaml")
    if not p.name.startswith("_") and "fewshot" not in p.parts
)


def test_defaults_are_the_paper_recipe():
    cfg = ExperimentConfig()
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.backbone_lr_mult) == (1e-4, 1e-4, 0.1)
    assert (cfg.optim.warmup_iters, cfg.optim.power, cfg.optim.min_lr) == (1500, 0.9, 1e-6)
    assert (cfg.eval.crop, cfg.eval.stride) == (512, 341)


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  iters: 100\n  batch_size: 2\ndata:\n  crop_size: 64\n")
    (tmp_path / "exp.yaml").write_text("_base_: base.yaml\nname: exp\ntrain:\n  iters: 50\n")
    cfg = load_config(tmp_path / "exp.yaml", ["train.batch_size=8", "model.overrides.clip_model=tiny-RN"])
    assert (cfg.name, cfg.train.iters, cfg.train.batch_size, cfg.data.crop_size) == ("exp", 50, 8, 64)
    assert cfg.model.overrides == {"clip_model": "tiny-RN"}
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*train.itres"):
        load_config(None, ["train.itres=5"])
    with pytest.raises(ValueError, match="train.iters"):
        load_config(None, ["train.iters=many"])
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ValueError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_types_are_coerced():
    cfg = load_config(None, ["optim.lr=1", "data.scale=[1024, 256]", "optim.grad_clip=null", "eval.scales=[0.5, 1]"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.scale == (1024, 256) and cfg.eval.scales == (0.5, 1.0)
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 reads "1e-3" as a string
    with pytest.raises(ValueError, match="optim.lr: expected a number"):
        load_config(None, ["optim.lr=fast"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_parse_and_name_registered_models(path):
    from clipdense.models.registry import list_models

    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.model.name in list_models()
