"""``clipdense shapesworld report``: the claims report's arithmetic and its --quick path on a tiny setting."""

import json
import math
from dataclasses import replace

import pytest
import torch

from clipdense.cli import main
from clipdense.training import claims
from clipdense.training.claims import QUICK, auroc, summarise, verdicts


def test_auroc_by_hand():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of the 4 pairs are ordered -> 0.75
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])) == 0.75
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([True, False])) == 0.5  # a tie counts one half
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([False, True])) == 1.0
    assert math.isnan(auroc(torch.tensor([0.3]), torch.tensor([True])))


def test_summary_and_verdicts():
    results = [
        {"claim": "detection", "name": "clip_retinanet_shapesworld", "metric": "box AP", "value": v, "seed": s,
         "steps": 10, "wall_s": 1.0, "config": "c"} for s, v in ((0, 10.0), (1, 12.0))
    ] + [
        {"claim": "detection", "name": "denseclip_retinanet_shapesworld", "metric": "box AP", "value": 13.0,
         "seed": 0, "steps": 10, "wall_s": 2.0, "config": "d"}
    ]  # fmt: skip
    rows = summarise(results)
    assert rows[0]["mean"] == 11.0 and rows[0]["spread"] == 2.0 and rows[0]["seeds"] == [0, 1]
    assert rows[1]["spread"] is None
    (v,) = verdicts(rows)
    assert v["statement"] == "DenseCLIP RetinaNet > CLIP RetinaNet" and v["holds"] is True
    assert (v["higher"], v["lower"]) == (13.0, 11.0) and v["within_spread"] is True  # gap 2.0, spread 2.0
    rows[1]["mean"] = 13.5  # a gap of 2.5, outside the baseline's seed spread
    assert verdicts(rows)[0]["within_spread"] is False
    chance = [{"claim": "ppl", "name": "PPL entropy as an error detector", "metric": "AUROC", "mean": 0.53,
               "spread": None}]  # fmt: skip
    (v,) = [v for v in verdicts(chance) if v["statement"].endswith("(AUROC > 0.5)")]
    assert (v["higher"], v["lower"], v["holds"]) == (0.53, 0.5, True)


def test_quick_report_on_a_tiny_setting(tmp_path, monkeypatch, capsys):
    tiny = replace(QUICK, train_scenes=8, val_scenes=1, seg_iters=1, batch_size=2, quality_scenes=2)
    monkeypatch.setattr(claims, "QUICK", tiny)
    out = tmp_path / "report"
    args = ["shapesworld", "report", "--quick", "--claims", "ppl", "training_free", "--out", str(out)]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "## Summary: the papers' directions" in stdout and f"saved {out / 'report.md'}" in stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"budget", "claims", "results", "verdicts", "wall_s", "notes"}
    assert report["complete"] and report["budget"]["seg_iters"] == 1
    assert set(report["claims"]) == {"ppl", "training_free"}
    names = {(r["claim"], r["name"]) for r in report["results"]}
    assert ("ppl", "ppl_fpn_shapesworld") in names and ("training_free", "naclip + both") in names
    assert len([r for r in report["results"] if r["claim"] == "training_free"]) == 5 * len(claims.REFINEMENTS)
    for r in report["results"]:
        assert set(r) >= {"claim", "name", "metric", "value", "seed", "steps", "wall_s", "config"}
        if r["value"] is None:  # undefined (e.g. no correct pixel after one step), never NaN or inf
            continue
        assert math.isfinite(r["value"])
        low, high = {"AUROC": (0, 1), "mean entropy (nats)": (0, math.log(56) + 1e-4)}.get(r["metric"], (0, 100))
        assert low <= r["value"] <= high, r
    trained = [r for r in report["results"] if r["steps"]]
    assert trained and all(r["seed"] == 0 and r["steps"] == 1 and r["config"].endswith(".yaml") for r in trained)
    assert {v["statement"] for v in report["verdicts"]} >= {"PPL > DenseCLIP", "SCLIP > MaskCLIP"}

    # finished runs are reused: a second report trains nothing and measures the same numbers
    monkeypatch.setattr(claims, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = claims.run_report(out, tiny, claims=["ppl"], progress=False)
    first = {(r["name"], r["metric"]): r["value"] for r in report["results"] if r["claim"] == "ppl"}
    assert {(r["name"], r["metric"]): r["value"] for r in again["results"]} == first


def test_unknown_claim_is_a_usage_error(tmp_path, capsys):
    assert main(["shapesworld", "report", "--claims", "speed", "--out", str(tmp_path / "r")]) == 2
    assert "--claims: unknown speed" in capsys.readouterr().err


def test_a_tagged_run_trains_in_its_own_folder(tmp_path, monkeypatch):
    """MaskCLIP+ without self-training is the zero-shot config plus an override: it must not reuse the plain run."""
    trained = []

    def fake_train(cfg, resume=False, progress=True):
        trained.append((cfg.resolved_run_dir(), cfg.model.overrides.get("self_train_from")))
        (cfg.resolved_run_dir() / "checkpoints" / "step_1").mkdir(parents=True)
        return {"finished": True, "step": 1}

    monkeypatch.setattr(claims, "train", fake_train)
    monkeypatch.setattr(claims, "latest_checkpoint", lambda d: next(iter((d / "checkpoints").glob("step_*")), None))
    report = claims._Report(tmp_path, QUICK, claims.CONFIGS, "cpu", progress=False)
    config = "maskclip_plus_zeroshot_shapesworld"
    plain, _, _ = report._run(config, 0, 1)
    tagged, _, _ = report._run(config, 0, 1, ["model.overrides.self_train_from=null"], f"{config}_noself")
    assert plain != tagged and [t[1] for t in trained] == [0.1, None]
    assert report._run(config, 0, 1)[0] == plain and len(trained) == 2  # finished: reused, not retrained
