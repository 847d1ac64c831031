"""Start-up without network: cached weights load with no network attempt, missing ones fail in a second."""

import json
import re
import time

import numpy as np
import open_clip
import pytest
import torch
from huggingface_hub import constants as hf_constants
from PIL import Image
from safetensors.torch import save_file

from clipdense.cli import main
from clipdense.clip import CLIPLoadError, load_clip, loading
from tiny_models import TINY_CONFIGS

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def online(monkeypatch):
    """Hub offline mode off, the default Hub endpoint and no proxy, whatever the environment says."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://huggingface.co")
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def connections(monkeypatch, online):
    """Every connection attempt recorded and refused as if DNS failed."""
    calls = []

    def refuse(address, timeout=None):
        calls.append((*address, timeout))
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(loading.socket, "create_connection", refuse)
    return calls


@pytest.fixture
def no_downloads(monkeypatch):
    """Any call into open_clip's downloaders fails the test: the fast paths must not reach them."""

    def fail(*args, **kwargs):
        pytest.fail(f"open_clip download called: {args} {kwargs}")

    monkeypatch.setattr(open_clip, "download_pretrained", fail)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", fail)


def _hub_snapshot(cache, repo_id):
    """An empty snapshot folder in the Hugging Face cache layout, with refs/main pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    snapshot = repo / "snapshots" / REV
    snapshot.mkdir(parents=True)
    return snapshot


def _save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _same_weights(model, reference) -> bool:
    ref = reference.state_dict()
    return all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def _tag(monkeypatch, cfg):
    """Make ``cfg`` the pretrained config of tag 'openai' of every architecture."""
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: cfg if tag == "openai" else {})


def test_offline_mode_fails_at_once_without_a_connection(monkeypatch, tmp_path, no_downloads):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(loading.socket, "create_connection", lambda *a, **k: pytest.fail("network attempted"))
    start = time.monotonic()
    with pytest.raises(CLIPLoadError) as info:
        load_clip("RN50", "openai", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 3
    message = str(info.value)
    assert "RN50/openai are not in the Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE is set)" in message
    assert "--pretrained PATH" in message and "pass its path" in message
    assert "skip this network check" not in message


def test_unreachable_hub_fails_at_once_and_names_the_host(tmp_path, connections, no_downloads):
    start = time.monotonic()
    with pytest.raises(CLIPLoadError) as info:
        load_clip("RN50", "openai", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 3
    assert connections == [("huggingface.co", 443, 2)]  # one quick check, no retries
    message = str(info.value)
    assert "huggingface.co cannot be reached ([Errno -2] Name or service not known): no network?" in message
    assert "load_clip('RN50', '/path/to/weights.pt')" in message
    assert message.endswith("Set HF_HUB_OFFLINE=1 to skip this network check.")


def test_the_check_goes_where_the_download_would(monkeypatch, tmp_path, connections, no_downloads):
    """A Hub mirror (HF_ENDPOINT), a URL-only tag's own host, and a proxy when one is configured."""
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://hf-mirror.example:8443")
    with pytest.raises(CLIPLoadError, match="hf-mirror.example cannot be reached"):
        load_clip("RN50", "openai", cache_dir=str(tmp_path))
    _tag(monkeypatch, {"url": "http://weights.example/clip/tiny.pt"})
    with pytest.raises(
        CLIPLoadError, match=re.escape(f"tiny-RN/openai are not in {tmp_path}, and weights.example cannot")
    ):
        load_clip("tiny-RN", "openai", cache_dir=str(tmp_path))
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    with pytest.raises(CLIPLoadError, match="proxy.example cannot be reached"):
        load_clip("tiny-RN", "openai", cache_dir=str(tmp_path))
    assert connections == [("hf-mirror.example", 8443, 2), ("weights.example", 80, 2), ("proxy.example", 3128, 2)]


def test_reachable_host_downloads_through_open_clip(monkeypatch, tmp_path, tiny_checkpoints, online):
    reference, paths = tiny_checkpoints["tiny-RN"]
    calls = []

    class Connection:
        def close(self):
            calls.append("closed")

    monkeypatch.setattr(
        loading.socket, "create_connection", lambda address, timeout: calls.append(address) or Connection()
    )
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, cache_dir=None: str(paths["safetensors"]))
    _tag(monkeypatch, {"hf_hub": "org/tiny/"})
    clip = load_clip("tiny-RN", "openai", cache_dir=str(tmp_path))
    assert calls == [("huggingface.co", 443), "closed"]
    assert _same_weights(clip.model, reference)


def test_cache_lookup_follows_open_clips_file_order(tmp_path, connections):
    snapshot = _hub_snapshot(tmp_path, "org/tiny")
    look = loading._cached_or_reachable
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"bin")
    assert look("x", {"hf_hub": "org/tiny/"}, str(tmp_path), "") == str(snapshot / "open_clip_pytorch_model.bin")
    (snapshot / "open_clip_model.safetensors").write_bytes(b"safe")  # open_clip tries the safetensors one first
    assert look("x", {"hf_hub": "org/tiny/"}, str(tmp_path), "") == str(snapshot / "open_clip_model.safetensors")
    (snapshot / "weights.bin").write_bytes(b"named")
    assert look("x", {"hf_hub": "org/tiny/weights.bin"}, str(tmp_path), "") == str(snapshot / "weights.bin")
    (snapshot / "weights.safetensors").write_bytes(b"named, safe")
    assert look("x", {"hf_hub": "org/tiny/weights.bin"}, str(tmp_path), "") == str(snapshot / "weights.safetensors")
    (tmp_path / "RN.pt").write_bytes(b"url")  # where open_clip writes a URL download: cache_dir/<basename>
    assert look("x", {"url": "https://weights.example/a/RN.pt"}, str(tmp_path), "") == str(tmp_path / "RN.pt")
    assert look("x", {"file": "/some/file.pt"}, None, "") == "/some/file.pt"
    assert connections == []


@pytest.mark.parametrize("where", ["hub", "url"])
def test_cached_tag_loads_without_network(monkeypatch, tmp_path, tiny_checkpoints, connections, no_downloads, where):
    reference, _ = tiny_checkpoints["tiny-RN"]
    _tag(monkeypatch, {"hf_hub": "org/tiny/", "url": "https://weights.example/a/tiny.safetensors", "quick_gelu": True})
    snapshot = _hub_snapshot(tmp_path, "org/tiny")
    _save(reference, snapshot / "open_clip_model.safetensors" if where == "hub" else tmp_path / "tiny.safetensors")
    start = time.monotonic()
    clip = load_clip("tiny-RN", "openai", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 3
    assert _same_weights(clip.model, reference) and clip.quick_gelu
    assert connections == []


def test_cached_hf_hub_repo_loads_without_network(tmp_path, tiny_checkpoints, connections, no_downloads):
    reference, _ = tiny_checkpoints["tiny-ViT"]
    snapshot = _hub_snapshot(tmp_path, "someone/tiny-clip")
    config = {"model_cfg": TINY_CONFIGS["tiny-ViT"], "preprocess_cfg": {"mean": [0.1, 0.2, 0.3]}}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(
        CLIPLoadError, match="files of hf-hub:someone/tiny-clip are not in the Hugging Face cache, and hugg"
    ):
        load_clip("hf-hub:someone/tiny-clip", None, cache_dir=str(tmp_path))  # the config alone is not enough
    _save(reference, snapshot / "open_clip_model.safetensors")
    clip = load_clip("hf-hub:someone/tiny-clip", None, cache_dir=str(tmp_path))
    assert _same_weights(clip.model, reference)
    assert clip.mean == (0.1, 0.2, 0.3) and clip.name == "hf-hub:someone/tiny-clip"
    assert clip.tokenizer(["a cat"]).shape == (1, 77)
    assert connections == [("huggingface.co", 443, 2)]  # only the attempt while the weights were missing


def test_cli_reports_no_network_in_one_line(monkeypatch, tmp_path, capsys, connections):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache, wherever this runs
    monkeypatch.setenv("HOME", str(tmp_path))  # and an empty ~/.cache/clip
    image = tmp_path / "g.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    start = time.monotonic()
    code = main(["segment", str(image), "--classes", "a,b", "--model", "RN50", "--out", str(tmp_path / "out")])
    elapsed = time.monotonic() - start
    out, err = capsys.readouterr()
    assert code == 1 and elapsed < 3
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        "clipdense: error: the weights for RN50/openai are not in the Hugging Face cache, and huggingface.co cannot be "
        "reached ([Errno -2] Name or service not known): no network?"
    )
    assert connections == [("huggingface.co", 443, 2)]
