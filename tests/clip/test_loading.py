"""load_clip on checkpoints written in every supported format, and its errors."""

import json
import time

import open_clip
import pytest
import torch

from clipdense.clip import CLIPLoadError, load_clip, read_state_dict
from clipdense.clip.loading import PACKAGED_WEIGHTS


def _same_weights(model, reference) -> bool:
    ref = reference.state_dict()
    return all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fmt", ["state_dict", "wrapped", "safetensors", "torchscript"])
@pytest.mark.parametrize("name", ["tiny-RN", "tiny-ViT"])
def test_every_format_loads_exact_weights(tiny_checkpoints, name, fmt):
    reference, paths = tiny_checkpoints[name]
    clip = load_clip(name, paths[fmt])
    assert _same_weights(clip.model, reference)
    assert not clip.model.training
    # OpenAI's TorchScript archives were trained with QuickGELU; plain state dicts keep the config's choice.
    assert clip.quick_gelu == (fmt == "torchscript")
    act = clip.model.transformer.resblocks[0].mlp.gelu
    assert isinstance(act, open_clip.transformer.QuickGELU) == (fmt == "torchscript")
    x = torch.randn(1, 3, clip.image_size, clip.image_size)
    if fmt != "torchscript":
        torch.testing.assert_close(clip.model.encode_image(x), reference.encode_image(x))


def test_quick_gelu_override(tiny_checkpoints):
    _, paths = tiny_checkpoints["tiny-RN"]
    assert load_clip("tiny-RN", paths["torchscript"], quick_gelu=False).quick_gelu is False
    assert load_clip("tiny-RN", paths["state_dict"], quick_gelu=True).quick_gelu is True


def test_tag_with_quick_gelu_is_honoured(tiny_checkpoints, monkeypatch):
    """A tag whose config says quick_gelu (as open_clip's 'openai' tags do) builds a QuickGELU model."""
    _, paths = tiny_checkpoints["tiny-RN"]
    cfg = {"url": "", "hf_hub": "org/x/", "quick_gelu": True, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: cfg if tag == "openai" else {})
    monkeypatch.setattr(open_clip, "download_pretrained", lambda c, cache_dir=None: str(paths["state_dict"]))
    monkeypatch.setattr("clipdense.clip.loading._cached_or_reachable", lambda *args: None)  # not cached, online
    clip = load_clip("tiny-RN", "openai")
    assert clip.quick_gelu and clip.mean == (0.5,) * 3
    assert isinstance(clip.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_wrong_architecture_names_the_mismatch(tiny_checkpoints):
    _, paths = tiny_checkpoints["tiny-RN"]
    with pytest.raises(CLIPLoadError, match="do not fit the architecture 'tiny-ViT'.*missing keys"):
        load_clip("tiny-ViT", paths["safetensors"])


def test_missing_keys_are_an_error_extra_keys_a_warning(tiny_checkpoints, tmp_path, caplog):
    reference, _ = tiny_checkpoints["tiny-RN"]
    sd = reference.state_dict()
    partial = {k: v for k, v in sd.items() if k != "logit_scale"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CLIPLoadError, match="1 missing keys"):
        load_clip("tiny-RN", tmp_path / "partial.pt")
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    clip = load_clip("tiny-RN", tmp_path / "extra.pt")
    assert _same_weights(clip.model, reference)
    assert "unexpected keys" in caplog.text


def test_missing_file_and_unknown_tag(tiny_configs, tmp_path):
    with pytest.raises(CLIPLoadError, match="checkpoint file not found"):
        load_clip("tiny-RN", tmp_path / "nope.pt")
    with pytest.raises(CLIPLoadError, match="neither a pretrained tag"):
        load_clip("tiny-RN", "openai")
    with pytest.raises(CLIPLoadError, match="unknown CLIP architecture"):
        load_clip("not-a-model", None)


def test_offline_tag_fails_fast_with_instructions():
    start = time.monotonic()
    with pytest.raises(CLIPLoadError, match=r"RN50/openai.*pass its path"):
        load_clip("RN50", "openai")
    assert time.monotonic() - start < 30


def test_hf_hub_offline_is_a_clear_error():
    with pytest.raises(CLIPLoadError, match="Hugging Face cache"):
        load_clip("hf-hub:someone/not-cached", None)
    with pytest.raises(CLIPLoadError, match="carries its own weights"):
        load_clip("hf-hub:someone/not-cached", "openai")


def test_local_dir(tiny_checkpoints, tmp_path):
    from safetensors.torch import save_file

    from tiny_models import TINY_CONFIGS

    reference, _ = tiny_checkpoints["tiny-ViT"]
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CONFIGS["tiny-ViT"], "preprocess_cfg": {"mean": [0.1, 0.2, 0.3]}})
    )
    with pytest.raises(CLIPLoadError, match="no weights"):
        load_clip(f"local-dir:{tmp_path}", None)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    clip = load_clip(f"local-dir:{tmp_path}", None)
    assert _same_weights(clip.model, reference)
    assert clip.mean == (0.1, 0.2, 0.3)


def test_random_weights_only_when_asked(tiny_configs, caplog):
    clip = load_clip("tiny-RN", None)
    assert clip.pretrained is None
    assert "random weights" in caplog.text


@pytest.mark.parametrize("key", list(PACKAGED_WEIGHTS))
def test_packaged_weights_are_found_and_checksummed(monkeypatch, key):
    from dataclasses import replace

    from clipdense.clip import loading

    shipped = loading.PACKAGED_WEIGHTS[key]
    clip = load_clip(*key)
    assert clip.inference == dict(shipped.inference) and clip.description == shipped.description
    assert clip.fingerprint == load_clip(*key).fingerprint  # stable: keyed by the checksum, not the path
    monkeypatch.setitem(loading.PACKAGED_WEIGHTS, key, replace(shipped, sha256="0" * 64))
    with pytest.raises(CLIPLoadError, match="damaged or was replaced"):
        load_clip(*key)
    monkeypatch.setitem(loading.PACKAGED_WEIGHTS, key, replace(shipped, file="missing.safetensors"))
    with pytest.raises(CLIPLoadError, match="not in this installation.*--pretrained PATH"):
        load_clip(*key)


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CLIPLoadError, match="could not read CLIP weights"):
        read_state_dict(bad)
    torch.save({"a": 1}, tmp_path / "notsd.pt")
    with pytest.raises(CLIPLoadError, match="does not hold a CLIP state dict"):
        read_state_dict(tmp_path / "notsd.pt")


def test_hf_hub_from_a_populated_cache(tiny_checkpoints, tmp_path):
    """hf-hub: names resolve offline from the Hugging Face cache layout (refs/main -> snapshots/<rev>/)."""
    from safetensors.torch import save_file

    from tiny_models import TINY_CONFIGS

    reference, _ = tiny_checkpoints["tiny-RN"]
    repo = tmp_path / "models--someone--tiny-clip"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIGS["tiny-RN"]}))
    sd = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(sd, snapshot / "open_clip_model.safetensors")
    clip = load_clip("hf-hub:someone/tiny-clip", None, cache_dir=str(tmp_path))
    assert _same_weights(clip.model, reference)


def test_skipped_initialisation_is_exact_and_restored(tiny_checkpoints):
    """Random init is skipped when a checkpoint overwrites every weight; nn.init works again afterwards."""
    import torch

    from clipdense.clip.loading import load_clip

    reference, files = tiny_checkpoints["tiny-RN"]
    init_normal = torch.nn.init.normal_
    loaded = load_clip("tiny-RN", files["safetensors"])
    assert torch.nn.init.normal_ is init_normal
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert torch.nn.Linear(64, 64).weight.std() > 0.01


def test_a_tampered_packaged_file_is_refused(monkeypatch, tmp_path):
    """A flipped byte inside the tensor data of the shipped weights: refused at load, never used."""
    from importlib import resources
    from types import SimpleNamespace

    from clipdense.clip import loading

    key = ("ShapesCLIP-RN", "shapesworld")
    source = loading._verified_packaged_file(*key, loading.PACKAGED_WEIGHTS[key])
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / source.name).write_bytes(bytes(data))
    files = SimpleNamespace(files=lambda pkg: tmp_path if pkg == "clipdense" else resources.files(pkg))
    monkeypatch.setattr(loading, "resources", SimpleNamespace(files=files.files, as_file=resources.as_file))
    with pytest.raises(CLIPLoadError, match="damaged or was replaced"):
        load_clip(*key)
