"""Trained runs as Hugging Face Hub folders: export -> load gives the same outputs bit for bit, the Hub cache
offline, clear errors for missing and changed files, and push against a local fake Hub (HTTP only)."""

import base64
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants
from PIL import Image

from clipdense.cli import main
from clipdense.hub import CHECKED_FILES, MANIFEST, ExportedModelError, verify_folder
from clipdense.inference import DetectionPredictor, TrainedPredictor
from clipdense.runs import build_from_run, export_run
from tiny_models import TINY_DETECTOR, TINY_PPL, write_tiny_run

CLASSES = ["red thing", "green thing", "blue thing"]
MODELS = {  # every trained family: name -> tiny builder options
    "denseclip_fpn_rn50": {"clip_model": "tiny-RN"},
    "ppl_fpn_rn50": {"clip_model": "tiny-RN", **TINY_PPL},
    "maskclip_plus_deeplabv2_r101": {
        "clip_model": "tiny-RN",
        "trunk": "tiny",
        "head_channels": 16,
        "unseen_classes": ["blue thing"],
    },  # fmt: skip
    "denseclip_retinanet_rn50": TINY_DETECTOR,
}


def make_run(run_dir, model: str, step: int = 3):
    return write_tiny_run(run_dir, model, CLASSES, MODELS[model], step)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_configs):
    """A tiny DenseCLIP run with an eval report, and its export."""
    root = tmp_path_factory.mktemp("hub")
    run = make_run(root / "run", "denseclip_fpn_rn50")
    report = {"checkpoint": str(run), "dataset": "folder", "settings": {"mode": "whole"}, "miou": 41.25,
              "macc": 50.0, "per_class_iou": [1.0, 2.0], "zero_shot": {"hiou": 12.5}}  # fmt: skip
    (run / "eval_folder_val.json").write_text(json.dumps(report))
    export_run(run, root / "export", repo_id="my-lab/tiny-denseclip")
    return run, root / "export"


def _outputs(source, image, model: str):
    if "retinanet" in model:
        predictor = DetectionPredictor.from_run(source)
        predictor.set_image(image)
        found = predictor.predict(score_threshold=0.0)
        return [found.boxes, found.scores, found.labels]
    predictor = TrainedPredictor.from_run(source)
    predictor.set_image(image)
    torch.manual_seed(0)  # PPL samples its prompts: the same draws for both
    seg = predictor.predict(probs=True, uncertainty=model.startswith("ppl"))
    return [seg.labels, seg.probs] + ([seg.uncertainty] if seg.uncertainty is not None else [])


@pytest.mark.parametrize("model", sorted(MODELS))
def test_export_then_load_gives_bit_identical_outputs(model, tmp_path, image, tiny_configs):
    run = make_run(tmp_path / model, model)
    out = tmp_path / "export"
    exported = export_run(run, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*CHECKED_FILES, MANIFEST, "README.md"])
    assert exported.manifest["model"] == model and exported.manifest["step"] == 3
    assert exported.manifest["task"] == ("detection" if "retinanet" in model else "segmentation")
    assert (out / "class_names.txt").read_text().splitlines() == CLASSES
    a, cfg_a = build_from_run(run)
    b, cfg_b = build_from_run(out)
    assert cfg_a == cfg_b
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for x, y in zip(_outputs(run, image, model), _outputs(out, image, model), strict=True):
        assert torch.equal(x, y)


def test_model_card_and_manifest(exported):
    run, out = exported
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: clipdense" in card and "pipeline_tag: image-segmentation" in card
    assert "--checkpoint hf-hub:my-lab/tiny-denseclip" in card and "clipdense train config.yaml" in card
    # the eval report's numbers (nested ones by path), not its lists or settings
    assert "| folder_val |" in card and "41.25" in card and "zero_shot/hiou" in card and "per_class_iou" not in card
    manifest = json.loads((out / MANIFEST).read_text())
    for name in CHECKED_FILES:
        assert manifest["files"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert (out / "model.safetensors").read_bytes() == (run / "checkpoints/step_0000003/model.safetensors").read_bytes()


def test_export_command(exported, tmp_path, capsys):
    run, _ = exported
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert "exported denseclip_fpn_rn50 (segmentation, 3 classes, step 3)" in capsys.readouterr().out
    verify_folder(tmp_path / "out")
    assert main(["export", str(run), str(tmp_path / "out")]) == 2  # not empty: refused before any work
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "out"), str(tmp_path / "again")]) == 2  # already exported
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert main(["export", str(run), str(tmp_path / "y"), "--repo-id", "no-slash"]) == 2


def _write_hub_cache(cache, repo_id: str, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """The Hugging Face cache layout that snapshot_download reads offline: refs/main -> snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_load_from_the_hub_cache_offline(exported, tmp_path, image, monkeypatch, capsys):
    _, out = exported
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 (conftest sets it too)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _write_hub_cache(tmp_path / "cache", "my-lab/tiny-denseclip", out)
    a, _ = build_from_run(out)
    b, _ = build_from_run("hf-hub:my-lab/tiny-denseclip")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    code = main(["segment", str(image), "--checkpoint", "hf-hub:my-lab/tiny-denseclip", "--out", str(tmp_path / "o")])
    assert code == 0
    assert json.loads((tmp_path / "o" / "img.json").read_text())["classes"] == CLASSES
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*offline"):
        build_from_run("hf-hub:my-lab/not-there")
    capsys.readouterr()
    assert main(["segment", str(image), "--checkpoint", "hf-hub:my-lab/not-there", "--out", str(tmp_path / "p")]) == 1
    assert "hf-hub:my-lab/not-there is not in the Hugging Face cache" in capsys.readouterr().err


def test_changed_or_missing_files_are_clear_errors(exported, tmp_path, image, capsys):
    _, out = exported
    bad = shutil.copytree(out, tmp_path / "changed")
    weights = bytearray((bad / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of one weight
    (bad / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ExportedModelError, match="model.safetensors has SHA-256 .* changed or damaged after export"):
        build_from_run(bad)
    assert main(["segment", str(image), "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "model.safetensors has SHA-256" in capsys.readouterr().err
    gone = shutil.copytree(out, tmp_path / "gone")
    (gone / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        TrainedPredictor.from_run(gone)
    edited = shutil.copytree(out, tmp_path / "card")
    (edited / "README.md").write_text("an edited model card\n")  # the card is not checked: it may be edited
    build_from_run(edited)
    foreign = shutil.copytree(out, tmp_path / "foreign")
    (foreign / MANIFEST).write_text(json.dumps({"format": "something-else", "files": {}}))
    with pytest.raises(ExportedModelError, match="format 'something-else'"):
        build_from_run(foreign)


class FakeHub:
    """A local HTTP server answering the Hub endpoints an upload uses (create repo, card check, preupload, commit)."""

    def __init__(self):
        self.repos, self.files, self.auth = {}, {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, payload, code=200):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.auth.append(self.headers.get("authorization"))
                parts = self.path.split("/")
                if self.path == "/api/repos/create":
                    data = json.loads(body)
                    repo_id = f"{data['organization']}/{data['name']}"
                    hub.repos[repo_id] = data
                    return self._send({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": "1"})
                if self.path == "/api/validate-yaml":  # the model card's metadata, checked before upload
                    return self._send({"errors": [], "warnings": []})
                if "preupload" in parts:  # every file inline in the commit: no LFS server needed
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._send({"files": modes})
                if "commit" in parts:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    url = f"{hub.url}/{parts[3]}/{parts[4]}/commit/{'a' * 40}"
                    return self._send({"commitUrl": url, "commitOid": "a" * 40})
                self._send({"error": f"not faked: {self.path}"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_push_uploads_the_checked_folder(exported, tmp_path, monkeypatch, capsys):
    run, out = exported
    hub = FakeHub()
    try:
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # the fake Hub is on this machine
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)  # as HF_ENDPOINT does
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        assert main(["push", str(run), "my-lab/tiny-denseclip", "--private"]) == 0
        assert f"{hub.url}/my-lab/tiny-denseclip/commit/" in capsys.readouterr().out
        assert hub.repos["my-lab/tiny-denseclip"]["visibility"] == "private"
        assert set(hub.auth) == {"Bearer hf_test_token"}
        assert sorted(hub.files) == sorted([*CHECKED_FILES, MANIFEST, "README.md"])
        for name in CHECKED_FILES:  # the files of an export of the run, byte for byte
            assert hub.files[name] == (out / name).read_bytes()
        # an exported folder is pushed as it is; a damaged one is refused before anything is sent
        hub.files.clear()
        assert main(["push", str(out), "my-lab/tiny-denseclip"]) == 0
        assert hub.files[MANIFEST] == (out / MANIFEST).read_bytes()
        bad = shutil.copytree(out, tmp_path / "bad")
        (bad / "class_names.txt").write_text("cat\n")
        hub.files.clear()
        assert main(["push", str(bad), "my-lab/tiny-denseclip"]) == 1
        assert "class_names.txt has SHA-256" in capsys.readouterr().err and not hub.files
    finally:
        hub.server.shutdown()
