"""Shared fixtures: tiny CLIP architectures registered with open_clip, offline Hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: fail fast, never reach out

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_models import TINY_CONFIGS, StateHolder, register_tiny_configs  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep clipdense's on-disk caches (text embeddings) out of the user's ~/.cache, in-process and in subprocesses."""
    old = os.environ.get("CLIPDENSE_CACHE")
    os.environ["CLIPDENSE_CACHE"] = str(tmp_path_factory.mktemp("clipdense_cache"))
    yield os.environ["CLIPDENSE_CACHE"]
    if old is None:
        os.environ.pop("CLIPDENSE_CACHE", None)
    else:
        os.environ["CLIPDENSE_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def tiny_configs(tmp_path_factory):
    register_tiny_configs(tmp_path_factory.mktemp("configs"))
    return sorted(TINY_CONFIGS)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_configs):
    """Random-weight checkpoints of each tiny architecture in every supported file format."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name in tiny_configs:
        torch.manual_seed(0)
        model = open_clip.create_model(name).eval()
        sd = model.state_dict()
        paths = {
            "state_dict": root / f"{name}.pt",
            "wrapped": root / f"{name}_wrapped.pth",
            "safetensors": root / f"{name}.safetensors",
            "torchscript": root / f"{name}_openai.pt",
        }
        torch.save(sd, paths["state_dict"])
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, paths["wrapped"])
        save_file({k: v.contiguous() for k, v in sd.items()}, str(paths["safetensors"]))
        torch.jit.save(torch.jit.script(StateHolder(sd)), str(paths["torchscript"]))
        out[name] = (model, paths)
    return out
