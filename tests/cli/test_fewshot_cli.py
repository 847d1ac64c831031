"""`clipdense fewshot train | eval | grid` and `clipdense classify` on a tiny dataset in the CoOp layout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clipdense.cli import main
from fewshot_data import write_split_dataset

CONFIGS = Path(__file__).parents[2] / "configs" / "fewshot"


def _overrides(root, run, model="plot_vitb16", epochs=2):
    model_overrides = json.dumps({"clip_model": "tiny-ViT", "class_specific": True})
    return [f"run_dir={run}", f"model.name={model}", "model.pretrained=null", f"model.overrides={model_overrides}",
            "data.dataset=dtd", f"data.root={root}", "data.shots=4", "data.workers=0", "optim.lr=0.05",
            f"train.epochs={epochs}", "train.batch_size=4", "train.device=cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_fewshot")
    write_split_dataset(root, "dtd", per_class=(6, 2, 3))
    return root


def test_train_eval_classify(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fewshot", "train", str(CONFIGS / "plot_rn50.yaml"), *_overrides(data, run)]) == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert main(["fewshot", "eval", str(run)]) == 0
    report = json.loads((run / "eval_test.json").read_text())
    assert report["num_images"] == 9 and set(report["per_class"]) == {"red thing", "green thing", "blue thing"}
    assert "top-1" in capsys.readouterr().out
    assert main(["fewshot", "eval", str(run), "--classes", "new"]) == 1  # needs loadable CLIP weights
    assert "random CLIP weights" in capsys.readouterr().err and not (run / "eval_test_new.json").exists()
    image = data / "dtd" / "images" / "red_thing" / "test_0.png"
    out = tmp_path / "classes.json"
    assert main(["classify", str(image), "--checkpoint", str(run), "--top-k", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    probs = rows[0]["probs"]
    assert len(rows[0]["classes"]) == 2 and probs[0] >= probs[1] > 0 and sum(probs) <= 1 + 1e-6

    pictures = tmp_path / "explain"
    assert main(["classify", str(image), "--checkpoint", str(run), "--explain", "--explain-top", "2",
                 "--out", str(pictures)]) == 0  # fmt: skip
    explained = json.loads((pictures / "classify.json").read_text())[0]["explained"]
    panels = [e for e in explained if "png" in e]
    assert len(panels) == 2 * 4 and all((pictures / e["png"]).is_file() for e in panels)  # 2 classes x N = 4
    assert (pictures / "test_0_plans.png").is_file() and {e["rank"] for e in panels} == {1, 2}
    for rank in (1, 2):  # each prompt takes 1/N of the mass; the score shares of a class sum to 1
        assert sum(e["mass"] for e in panels if e["rank"] == rank) == pytest.approx(1.0, abs=1e-5)
        assert sum(e["score_share"] for e in panels if e["rank"] == rank) == pytest.approx(1.0, abs=1e-5)
    assert main(["classify", str(image), "--checkpoint", str(run), "--explain"]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_ctrl_c_stops_with_exit_3_and_resumes(data, tmp_path, monkeypatch, capsys):
    from clipdense.training import loop

    run = tmp_path / "run"
    monkeypatch.setattr(loop.StopRequests, "requested", property(lambda self: True))
    assert main(["fewshot", "train", str(CONFIGS / "coop_rn50.yaml"), *_overrides(data, run, "coop_vitb16")]) == 3
    assert "stopped at step 1" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["fewshot", "train", str(CONFIGS / "coop_rn50.yaml"), *_overrides(data, run, "coop_vitb16"),
                 "--resume"]) == 0  # fmt: skip
    assert "done: 6 steps" in capsys.readouterr().out
    image = data / "dtd" / "images" / "red_thing" / "test_0.png"
    assert main(["classify", str(image), "--checkpoint", str(run), "--explain", "--out", str(tmp_path / "x")]) == 2
    assert "only PLOT runs have transport plans" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_bad_inputs_are_one_line_errors(data, tmp_path, capsys):
    assert main(["fewshot", "eval", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["fewshot", "train", str(tmp_path / "nope.yaml")]) == 2
    assert main(["fewshot", "train", str(CONFIGS / "coop_rn50.yaml"), "data.dataset=mnist"]) == 2
    assert "data.dataset='mnist' is not allowed" in capsys.readouterr().err
    assert main(["fewshot", "train", str(CONFIGS / "coop_rn50.yaml"), f"data.root={tmp_path}", "train.device=cpu",
                 f"run_dir={tmp_path / 'r'}"]) == 1  # fmt: skip
    assert "split_zhou_Caltech101.json" in capsys.readouterr().err


def test_shipped_configs_parse():
    from clipdense.inference.fewshot import load_fewshot_config
    from clipdense.models import list_models

    configs = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("_"))
    assert len(configs) >= 8
    for path in configs:
        cfg = load_fewshot_config(path)
        assert cfg.name == path.stem and cfg.model.name in list_models()
    plot = load_fewshot_config(str(CONFIGS / "plot_rn50.yaml"))
    assert (plot.optim.lr, plot.optim.momentum, plot.optim.weight_decay, plot.model.overrides["n_prompts"]) == (
        0.002, 0.9, 5e-4, 4)  # fmt: skip


def test_fewshot_help_stays_light():
    code = ("import sys\nfrom clipdense.cli import main\nmain(['fewshot', 'train', '--help'])\n"
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def _adapter_overrides(root, run, epochs=1):
    return [f"run_dir={run}", "model.pretrained=null", 'model.overrides={"clip_model": "tiny-ViT"}', "data.dataset=dtd",
            f"data.root={root}", "data.shots=4", "data.workers=0", "train.device=cpu", f"train.epochs={epochs}",
            "adapter.augment_epochs=1", "adapter.search_step=[4, 4]"]  # fmt: skip


def test_adapter_train_eval_classify(data, tmp_path, capsys):
    run = tmp_path / "tip_f"
    assert main(["fewshot", "train", str(CONFIGS / "tip_adapter_f_rn50.yaml"), *_adapter_overrides(data, run)]) == 0
    assert "done: 1 steps" in capsys.readouterr().out  # batch 256 -> one batch of the 12 images per epoch
    config = (run / "config.yaml").read_text()
    assert "'{} texture.'" in config  # DTD's template in Tip-Adapter's datasets/dtd.py
    assert main(["fewshot", "eval", str(run)]) == 0
    assert json.loads((run / "eval_test.json").read_text())["num_images"] == 9
    image = data / "dtd" / "images" / "red_thing" / "test_0.png"
    out = tmp_path / "classes.json"
    assert main(["classify", str(image), "--checkpoint", str(run), "--top-k", "3", "--out", str(out)]) == 0
    assert sum(json.loads(out.read_text())[0]["probs"]) == pytest.approx(1.0, abs=1e-5)
    capsys.readouterr()
    assert main(["classify", str(image), "--checkpoint", str(run), "--explain", "--out", str(tmp_path / "x")]) == 2
    assert "only PLOT runs have transport plans" in capsys.readouterr().err


def test_grid_gives_plot_adapter_its_plot_run(data, tmp_path, capsys):
    """`fewshot grid` trains PLOT, then PLOT-Adapter on that PLOT run of the same shots and seed."""
    out = tmp_path / "grid"
    sets = ["model.pretrained=null", 'model.overrides={"clip_model": "tiny-ViT"}', "data.dataset=dtd",
            f"data.root={data}", "data.workers=0", "train.epochs=1", "train.batch_size=4", "adapter.augment_epochs=1",
            "adapter.search_step=[2, 2]"]  # fmt: skip
    assert main(["fewshot", "grid", str(CONFIGS / "plot_rn50.yaml"), str(CONFIGS / "plot_adapter_rn50.yaml"),
                 "--shots", "2", "--seeds", "1", "--no-zeroshot", "--out", str(out), "--set", *sets]) == 0  # fmt: skip
    saved = (out / "plot_adapter_rn50" / "2shot_seed1" / "config.yaml").read_text()
    assert f"plot_run: {out / 'plot_rn50' / '2shot_seed1'}" in saved
    table = (out / "table.md").read_text()
    assert "| plot_rn50 |" in table and "| plot_adapter_rn50 |" in table
    assert main(["fewshot", "grid", str(CONFIGS / "plot_adapter_rn50.yaml"), "--shots", "2", "--seeds", "1",
                 "--no-zeroshot", "--out", str(tmp_path / "g2"), "--set", *sets]) == 2  # fmt: skip
    assert "list a PLOT config" in capsys.readouterr().err
